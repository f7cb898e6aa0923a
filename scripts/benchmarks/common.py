"""Helpers shared by the benchmark sections."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any], repeat: int = 1, warmup: int = 0, device: torch.device | None = None) -> float:
    """Best wall-clock seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs (CUDA-synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _child(conn, fn, args):
    try:
        out = fn(*args)
        conn.send((out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, None))
    except Exception as e:  # report, don't hang the parent
        conn.send((None, 0.0, repr(e)))
    finally:
        conn.close()


def isolated(fn: Callable, *args) -> tuple[Any, float]:
    """Run ``fn(*args)`` in a fresh process; return its result and that process's peak RSS in MiB.

    On the CPU this is the honest peak-memory figure of one configuration (a long-lived process's
    peak RSS only ever grows). ``fn`` must be importable (a module-level function).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))
    p.start()
    out, rss, err = parent.recv()
    p.join()
    if err:
        raise RuntimeError(f"benchmark child failed: {err}")
    return out, rss
