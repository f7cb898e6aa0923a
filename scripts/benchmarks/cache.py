"""Dataset cache: peak memory and time to the first training iteration of d3m on 8 and 64 BraTS-sized
(240x240x155) brain phantom cases, per ``--cache`` setting (:func:`common.data.datasets.make_dataset`).

Two phantom subjects are rendered at the BraTS grid (1 mm, 240x240x155) and listed ``n`` times under
``n`` case ids in a ``datalist.json`` (training section): every entry is a distinct case to the
dataset (cached apart, hashed apart on disk), its files come from the page cache. Each run is
``python -m monai.bundle run training`` of the bundle's own ``train.json`` in a fresh process with the
small network on the CPU, one iteration of one volume (2 slices), no validation; measured: seconds
from the process start to the log line of iteration 1, the process tree's peak memory (sum of PSS of
the trainer and its DataLoader workers, sampled every 0.2 s) and the trainer's own peak RSS, and the log lines saying what is cached where.

    python -m scripts.benchmarks.cache                     # print the rows
    python -m scripts.benchmark --only cache --readme README.md

The old default (every case in memory: ``--cache memory``) is run on 8 and 16 cases and extrapolated
linearly to 64 (64 cases would need about 13 GiB on a machine other jobs share); the row says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundles" / "d3m" / "configs"
SHAPE = (240, 240, 155)
N_SOURCES = 2
BUDGET_MIB = 1024  # the in-memory budget of the ``auto`` rows (a machine whose budget holds < 8 cases)
FIRST_ITER = re.compile(r"Iter: 1/")
CACHE_LINE = re.compile(r"(training|validation) dataset: .*")


def make_sources(root: Path, n: int = N_SOURCES) -> list[str]:
    """Render ``n`` BraTS-sized brain phantoms under ``root/brain`` (once); their case folders."""
    from common.phantoms.brain import write_brain_phantoms

    brain = root / "brain"
    if not (brain / "datalist.json").exists():
        write_brain_phantoms(root, n=n, progress=False, shape=SHAPE, spacing=(1.0, 1.0, 1.0))
    return sorted(str(p) for p in brain.iterdir() if p.is_dir() and p.name.startswith("BraTS-"))


def write_cases(root: Path, sources: list[str], n: int) -> Path:
    """``root/n<n>/datalist.json``: ``n`` training cases ``case000``... naming the source cases' files in turn."""
    out = root / f"n{n}"
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        src = Path(sources[i % len(sources)])
        entries.append(
            {
                "id": f"case{i:03d}",
                **{k: str(src / f"{src.name}-{k}.nii.gz") for k in ("t1n", "t1c", "t2w", "t2f", "seg")},
            }
        )
    (out / "datalist.json").write_text(json.dumps({"training": entries, "validation": [], "testing": []}))
    return out


def _tree_pss(pid: int) -> int:
    """Sum of PSS (bytes) of ``pid`` and its descendants (0 for processes already gone)."""
    import psutil

    total = 0
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def _rss(pid: int) -> int:
    """RSS (bytes) of ``pid`` alone (0 when gone)."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def train_once(dataset_dir: Path, out_dir: Path, cache: str, **overrides) -> dict:
    """One d3m training run (one iteration) in a fresh process; its timings, memory and cache log lines."""
    args = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out_dir),
        "num_iterations": 1,
        "epoch_length": 1,
        "val_interval": 0,
        "batch_size": 2,
        "slices_per_volume": 2,
        "network_size": "small",
        "device": "cpu",
        "resume": False,
        "cache": cache,
        **overrides,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training"]
    cmd += ["--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.json")]
    cmd += ["--logging_file", str(CONFIGS / "logging.conf")]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    state = {"first_iter_s": None, "lines": [], "cache": []}

    def read():
        for line in proc.stdout:
            state["lines"].append(line)
            if state["first_iter_s"] is None and FIRST_ITER.search(line):
                state["first_iter_s"] = time.perf_counter() - t0
            m = CACHE_LINE.search(line)
            if m:
                state["cache"].append(m.group(0).strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        peak_pss = max(peak_pss, _tree_pss(proc.pid))
        peak_rss = max(peak_rss, _rss(proc.pid))
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(state["lines"][-15:])
        raise RuntimeError(f"d3m training ({cache}, {dataset_dir}) failed with exit code {proc.returncode}:\n{tail}")
    return {
        "first_iter_s": state["first_iter_s"],
        "wall_s": wall,
        "peak_mib": peak_pss / 2**20,
        "trainer_rss_mib": peak_rss / 2**20,
        "cache": state["cache"],
    }


def _row(what: str, value: str, note: str) -> dict:
    from scripts.benchmarks.common import row

    return row(what, value, "cpu", note)


def measure(root: Path) -> dict[str, dict[int, dict]]:
    """``{setting: {n_cases: train_once result}}`` for the settings of the table."""
    sources = make_sources(root / "src")
    sets = {n: write_cases(root, sources, n) for n in (8, 16, 64)}
    disk = root / "disk_cache"
    runs = {
        "auto": ({"cache_memory_mib": BUDGET_MIB}, (8, 64)),
        "disk": ({"cache_dir": str(disk)}, (8, 64)),
        "memory": ({}, (8, 16)),
    }
    out: dict[str, dict[int, dict]] = {}
    for mode, (overrides, sizes) in runs.items():
        out[mode] = {}
        for n in sizes:
            res = train_once(sets[n], root / f"out_{mode}_{n}", mode, **overrides)
            print(f"cache {mode}, {n} cases: {res}", flush=True)
            out[mode][n] = res
    return out


def rows_from(results: dict[str, dict[int, dict]]) -> list[dict]:
    """Table rows of :func:`measure`'s results: per setting, the trainer's peak RSS and the process tree's
    peak PSS at the smallest and largest case count, their growth per added case, and the log's cache line."""
    rows = []
    how = (
        f"d3m train.json, small net, 1 iteration of 2 slices, no validation, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} "
        "phantom cases; trainer = peak RSS of the training process, tree = peak sum of PSS of it and its 2 "
        "DataLoader workers; first iteration = seconds from the start of the process (2 CPU cores shared with "
        "other jobs: times are loose)"
    )
    labels = {
        "auto": f"d3m training memory, --cache auto (default) with a {BUDGET_MIB} MiB budget (--cache_memory_mib)",
        "disk": "d3m training memory, --cache auto with --cache_dir (PersistentDataset on disk, first run)",
        "memory": "d3m training memory, --cache memory (every case in memory, the former cache_rate 1.0 as meant)",
    }

    def growth(key, a, b, n0, n1):
        return (b[key] - a[key]) / (n1 - n0)

    for mode, by_n in results.items():
        ns = sorted(by_n)
        n0, n1 = ns[0], ns[-1]
        a, b = by_n[n0], by_n[n1]
        g_rss, g_tree = growth("trainer_rss_mib", a, b, n0, n1), growth("peak_mib", a, b, n0, n1)

        def fmt(r: dict) -> str:
            return f"trainer {r['trainer_rss_mib']:.0f} MiB, tree {r['peak_mib']:.0f} MiB, first iteration {r['first_iter_s']:.0f} s"

        value = f"{n0} cases: {fmt(a)}; {n1} cases: {fmt(b)}; per added case: trainer {g_rss:+.1f} MiB, tree {g_tree:+.1f} MiB"
        note = how
        if n1 < 64:

            def est(key: str) -> float:
                return a[key] + growth(key, a, b, n0, n1) * (64 - n0)

            value += f"; 64 cases (extrapolated): trainer {est('trainer_rss_mib'):.0f} MiB, tree {est('peak_mib'):.0f} MiB, first iteration {est('first_iter_s'):.0f} s"
            note += f"; 64 cases not run (about 13 GiB cached): extrapolated linearly from {n0} and {n1} cases"
        log = b["cache"][0] if b["cache"] else "no cache line in the log"
        rows.append(_row(labels[mode], value, f"{note}; log at {n1} cases: {log}"))
    return rows


def rows(tmp: Path | None = None) -> list[dict]:
    """The section's rows (``scripts/benchmark.py --only cache``)."""
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        return rows_from(measure(Path(d)))


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        res = measure(root)
        (root / "results.json").write_text(json.dumps(res, indent=1))
        for r in rows_from(res):
            print(r)
    else:
        for r in rows():
            print(r)
