"""Inference cost per bundle and precision (the benchmark's second table): for every bundle whose
benchmark module defines ``cost_case(preset, device_name, quick) -> CostCase``, the time per sampling
step and per volume in fp32, in ``auto`` (what the bundles run by default; it resolves per machine)
and in bf16 forced, the peak memory, the FLOPs of one step (torch's ``FlopCounterMode``) and the
achieved GFLOP/s against the machine's measured matmul rate in the same precision (emulated bf16,
on a CPU without native bf16, against the fp32 rate: it runs on those units), so that a reader
sees how close each network runs to the limit. The small and the paper-sized networks; with
``--quick`` (``BENCH_QUICK=1``) only the small ones on tiny inputs (a check that it runs).

    python -m scripts.benchmark --only cost [--quick]

A bundle adopts the table by adding ``cost_case`` to its module (see :class:`scripts.benchmarks.common.CostCase`).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cases() -> dict[str, object]:
    """``{module name: cost_case}`` of every benchmark module that defines one, in name order."""
    found = {}
    for mod in sorted(pkgutil.iter_modules([str(HERE)]), key=lambda m: m.name):
        if mod.name in ("common", "cost", "gpu"):
            continue
        module = importlib.import_module(f"scripts.benchmarks.{mod.name}")
        if hasattr(module, "cost_case"):
            found[mod.name] = module.cost_case
    return found


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import cost_rows, devices, machine_peak_rows, quick

    q = quick()
    out = []
    for dev in devices():
        peaks, peak_rows = machine_peak_rows(dev)
        out += peak_rows
        for preset in ("small",) if q else ("small", "paper"):
            for cost_case in cases().values():
                out += cost_rows(cost_case(preset, dev, q), preset, dev, peaks)
    if q:
        for r in out:
            r["note"] = "QUICK (tiny inputs, not a measurement); " + r["note"]
    return out
