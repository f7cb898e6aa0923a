"""Speed and memory benchmark: writes a markdown table (``make bench`` -> benchmark.md).

Rows are added by each part of the project (phantom generation, DICOM ingest, each bundle's
training and inference). Every row says what was measured, on which device, and how. Timings are
wall-clock seconds on the machine that runs it; nothing here is asserted by a test.

    python -m scripts.benchmark --out benchmark.md   # from the repository root [--only phantoms,ingest,resdce,dcediff,ressrdiff] [--readme README.md]

Besides ``out``, the README's table between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is
rewritten (atomically): the rows of the sections that ran are replaced, every other section's rows
are kept, so ``--only resdce`` refreshes only resdce's rows. Each row carries its section (first
column); under the table one line per section says when and on what it was measured. Rows that carry
a ``precision`` (the ``cost`` section) go to a second table with :data:`COST_COLUMNS`;
``--only cost --quick`` checks that it runs (tiny inputs, README untouched).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import fire
import torch

from common.device import get_device

try:
    from scripts.benchmarks.common import timed
except ModuleNotFoundError:  # run as a file: the repository root is not on the path
    sys.exit("run it from the repository root as a module: python -m scripts.benchmark [options]")

ROOT = Path(__file__).resolve().parents[1]

SHARED_STUDY = ROOT.parent / "shared" / "data" / "prostatex" / "ProstateX-0218"


def bench_phantoms(tmp: Path) -> list[dict]:
    from common.phantoms import write_phantoms

    rows = []
    for kind in ("prostate", "brain", "breast"):
        n = 2
        t = timed(lambda: write_phantoms(tmp / f"ph_{kind}", kinds=(kind,), **{f"n_{kind}": n}))
        rows.append(
            {
                "what": f"phantom generation: {kind} (NIfTI{' + DICOM' if kind == 'prostate' else ''})",
                "value": f"{t / n:.2f} s / subject",
                "device": "cpu",
                "note": f"{n} subjects, default sizes",
            }
        )
    return rows


def bench_ingest(tmp: Path) -> list[dict]:
    if not SHARED_STUDY.exists():
        return [
            {
                "what": "DICOM ingest + registration (ProstateX-0218)",
                "value": "skipped",
                "device": "cpu",
                "note": f"{SHARED_STUDY} not found",
            }
        ]
    from common.ingest import time_ingest

    t = time_ingest(SHARED_STUDY)
    parts = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items() if k.endswith("_s") and k != "total_s")
    return [
        {
            "what": "DICOM ingest + registration + crop, one real study (ProstateX-0218)",
            "value": f"{t['total_s']:.1f} s",
            "device": "cpu",
            "note": f"{t.get('n_dce', '?')} DCE time points; {parts}",
        }
    ]


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


COLUMNS = ("section", "what", "value", "device", "note")
#: the second table's columns (rows carrying a ``precision``: ``scripts/benchmarks/cost.py``)
COST_COLUMNS = (
    "section", "what", "precision", "s/step", "s/volume", "peak memory", "GFLOP/step", "GFLOP/s",
    "of matmul peak", "device", "note",
)  # fmt: skip
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = ROOT / "README.md"
GENERATED = "<!-- written by scripts/benchmark.py (make bench, or --only <sections>): edit there, not here -->"


def _cell(value) -> str:
    return str(value).replace("\n", " ").replace("|", "\\|")


def table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Markdown table of ``rows`` (dicts with the keys ``columns``; ``|`` in a cell is escaped)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def is_cost(row: dict) -> bool:
    """Whether ``row`` belongs to the cost table (:data:`COST_COLUMNS`): it says its precision."""
    return "precision" in row


def tables(rows: list[dict]) -> str:
    """The main table of ``rows``, then (when any) the cost table of those with a precision."""
    cost = [r for r in rows if is_cost(r)]
    text = table([r for r in rows if not is_cost(r)])
    if cost:
        text += (
            "\nInference cost per precision (time per sampling step and per volume, peak memory, FLOPs of one "
            "step by torch's FlopCounterMode, achieved GFLOP/s against the matmul rate measured in the same "
            "run in that precision; emulated bf16 against the fp32 rate):\n\n" + table(cost, COST_COLUMNS)
        )
    return text


def parse_block(block: str) -> tuple[list[dict], dict[str, str]]:
    """The rows (dicts with :data:`COLUMNS`) and the per-section "measured on" lines
    (``- `section`: text``) of a README block written by :func:`render_block`."""
    rows, measured, columns = [], {}, COLUMNS
    for line in block.splitlines():
        line = line.strip()
        m = re.fullmatch(r"- `([^`]+)`: (.*)", line)
        if m:
            measured[m.group(1)] = m.group(2)
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]
            if cells in (list(COLUMNS), list(COST_COLUMNS)):  # a table's header: its rows follow
                columns = tuple(cells)
            elif len(cells) == len(columns):
                row = dict(zip(columns, cells))
                rows.append(row if columns == COLUMNS else {k: v for k, v in row.items() if v or k == "precision"})
    return rows, measured


def render_block(rows: list[dict], measured: dict[str, str]) -> str:
    """The text between the README markers: the table, then when and where each section was measured."""
    order = list(dict.fromkeys(r["section"] for r in rows))
    notes = "".join(f"- `{s}`: {measured[s]}\n" for s in order if s in measured)
    # blank lines around the table, so that the marker comments are never read as table rows
    return GENERATED + "\n\n" + tables(rows) + ("\nMeasured (per section):\n\n" + notes if notes else "") + "\n"


def merge_rows(old: list[dict], new: list[dict], sections: list[str]) -> list[dict]:
    """``old`` with the rows of ``sections`` replaced by ``new``'s rows of those sections, in place
    (where a section's first old row stood); sections not in ``old`` are appended; other rows kept."""
    by_section: dict[str, list[dict]] = {}
    for r in new:
        by_section.setdefault(r["section"], []).append(r)
    out, placed = [], set()
    for r in old:
        s = r["section"]
        if s not in sections:
            out.append(r)
        elif s not in placed:
            out += by_section.get(s, [])
            placed.add(s)
    for s in sections:
        if s not in placed:
            out += by_section.get(s, [])
    return out


def update_readme(readme: str | Path, rows: list[dict], sections: list[str], measured_on: str) -> str:
    """Replace, atomically, the rows of ``sections`` in ``readme``'s block between :data:`START` and
    :data:`END` with ``rows`` (keeping every other section's rows and notes); returns the new block.
    Raises ``ValueError`` when the markers are missing."""
    from common.io import atomic_path

    readme = Path(readme)
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{readme} has no '{START}' ... '{END}' block for the benchmark table")
    old_rows, measured = parse_block(text[i + len(START) : j])
    measured.update({s: measured_on for s in sections if any(r["section"] == s for r in rows)})
    block = render_block(merge_rows(old_rows, rows, sections), measured)
    with atomic_path(readme) as tmp_path:
        tmp_path.write_text(text[: i + len(START)] + "\n" + block + text[j:])
    return block


def machine() -> str:
    """One line: date (UTC), processor, torch threads and version, default device (and GPU)."""
    from scripts.benchmarks.common import cpu_model

    dev = get_device()
    return (
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {cpu_model()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"default device {dev}" + (f" ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else "")
    )


def run(
    sections: dict[str, Callable[[Path], list[dict]]],
    names: list[str],
    out: str | Path = "benchmark.md",
    readme: str | Path | None = README,
) -> list[dict]:
    """Run ``sections[name]`` for each of ``names``; write all rows to ``out`` (rewritten after every
    section) and, at the end, replace those sections' rows in ``readme``'s marked block (``None``:
    leave the README alone). A failing section gives one "failed" row in ``out``, and a section whose
    rows are all "skipped" (its data absent) gives those; either keeps its old README rows. Returns
    the rows, each carrying its ``"section"``."""
    unknown = [n for n in names if n not in sections]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; choose from {sorted(sections)}")
    from common.io import atomic_path

    out = Path(out) if Path(out).is_absolute() else ROOT / out
    measured_on = machine()
    header = f"# Benchmark\n\nMachine: {measured_on}\n\n"
    rows: list[dict] = []
    ok: list[str] = []

    def write() -> str:  # after every section, so that what was measured survives a later failure
        text = header + tables(rows)
        with atomic_path(out) as tmp_path:
            tmp_path.write_text(text)
        return text

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                got = [{**r, "section": name} for r in sections[name](Path(tmp))]
                rows += got
                if any(r.get("value") != "skipped" for r in got):  # e.g. ingest without the shared study
                    ok.append(name)
            except Exception as e:  # one failing section (e.g. out of memory) must not lose the others
                rows.append(
                    {
                        "section": name,
                        "what": f"section {name}",
                        "value": "failed",
                        "device": str(get_device()),
                        "note": str(e),
                    }
                )
            print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
            write()
    print(write())
    if readme:
        update_readme(readme, [r for r in rows if r["section"] in ok], ok, measured_on)
        print(f"[bench] {readme}: rows of {', '.join(ok) or 'no section'} replaced", flush=True)
    return rows


def main(out: str = "benchmark.md", only: str | tuple = "", readme: str = str(README), quick: bool = False) -> None:
    """Run the benchmark sections (all by default, or the comma-separated ``only``), write the table
    to ``out`` and replace those sections' rows in ``readme``'s ``<!-- bench:start -->`` block
    (``--readme ""``: do not touch it). ``--quick``: the sections that have one take their quick path
    (``BENCH_QUICK=1``: the cost table on small networks and tiny inputs, a check that it runs) and the
    README is left alone."""
    if quick:
        os.environ["BENCH_QUICK"] = "1"
        readme = ""
    sections = discover()
    names = [s for s in (only.split(",") if isinstance(only, str) else only) if s] or list(sections)
    run(sections, names, out, readme or None)


if __name__ == "__main__":
    fire.Fire(main)
