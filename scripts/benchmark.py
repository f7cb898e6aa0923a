"""Speed and memory benchmark: writes a markdown table (``make bench`` -> benchmark.md).

Rows are added by each part of the project (phantom generation, DICOM ingest, each bundle's
training and inference). Every row says what was measured, on which device, and how. Timings are
wall-clock seconds on the machine that runs it; nothing here is asserted by a test.

    python scripts/benchmark.py --out benchmark.md [--only phantoms,ingest,resdce,dcediff,ressrdiff]
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.device import get_device  # noqa: E402
from scripts.benchmarks.common import timed  # noqa: E402

SHARED_STUDY = ROOT.parent / "shared" / "data" / "prostatex" / "ProstateX-0218"


def bench_phantoms(tmp: Path) -> list[dict]:
    from common.phantoms import write_phantoms

    rows = []
    for kind in ("prostate", "brain", "breast"):
        n = 2
        t = timed(lambda: write_phantoms(tmp / f"ph_{kind}", kinds=(kind,), **{f"n_{kind}": n}))
        rows.append({"what": f"phantom generation: {kind} (NIfTI{' + DICOM' if kind == 'prostate' else ''})",
                     "value": f"{t / n:.2f} s / subject", "device": "cpu", "note": f"{n} subjects, default sizes"})
    return rows


def bench_ingest(tmp: Path) -> list[dict]:
    if not SHARED_STUDY.exists():
        return [{"what": "DICOM ingest + registration (ProstateX-0218)", "value": "skipped",
                 "device": "cpu", "note": f"{SHARED_STUDY} not found"}]
    from common.ingest import time_ingest

    t = time_ingest(SHARED_STUDY)
    parts = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items() if k.endswith("_s") and k != "total_s")
    return [{"what": "DICOM ingest + registration + crop, one real study (ProstateX-0218)",
             "value": f"{t['total_s']:.1f} s", "device": "cpu", "note": f"{t.get('n_dce', '?')} DCE time points; {parts}"}]


def discover() -> dict[str, Callable[[Path], list[dict]]]:
    """The built-in sections, then ``rows`` of every module in ``scripts/benchmarks/`` (one per bundle)."""
    import importlib
    import pkgutil

    sections: dict[str, Callable[[Path], list[dict]]] = {"phantoms": bench_phantoms, "ingest": bench_ingest}
    for mod in pkgutil.iter_modules([str(ROOT / "scripts" / "benchmarks")]):
        module = importlib.import_module(f"scripts.benchmarks.{mod.name}")
        if hasattr(module, "rows"):
            sections[mod.name] = module.rows
    return sections


def main(out: str = "benchmark.md", only: str | tuple = "") -> None:
    """Run the benchmark sections (all by default) and write the markdown table to ``out``."""
    sections = discover()
    names = [s for s in (only.split(",") if isinstance(only, str) else only) if s] or list(sections)
    unknown = [n for n in names if n not in sections]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {sorted(sections)}")
    rows: list[dict] = []
    dev = get_device()
    header = (
        f"# Benchmark\n\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, default device {dev}"
        + (f" ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else "")
        + f"\n\n| what | value | device | note |\n|---|---|---|---|\n"
    )
    from common.io import atomic_path

    def write() -> str:  # after every section, so that what was measured survives a later failure
        table = header + "".join(f"| {r['what']} | {r['value']} | {r['device']} | {r['note']} |\n" for r in rows)
        with atomic_path(ROOT / out if not Path(out).is_absolute() else out) as tmp_path:
            tmp_path.write_text(table)
        return table

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                rows += sections[name](Path(tmp))
            except Exception as e:  # one failing section (e.g. out of memory) must not lose the others
                rows.append({"what": f"section {name}", "value": "failed", "device": str(dev), "note": str(e)})
            print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
            write()
    print(write())


if __name__ == "__main__":
    fire.Fire(main)
