"""Helpers shared by the benchmark sections.

Every section measures the model its bundle runs: networks, schedulers and inferers come from the
bundle's own configs through :func:`bundle_parser` / :func:`bundle_objects` (MONAI's
``ConfigParser``), with the benchmark's settings applied as overrides, never rebuilt by hand::

    net, inferer = bundle_objects("resdce", "network", "inferer",
                                  overrides={"network_size": "small", "device": "cpu", "num_inference_steps": 4})
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def bundle_parser(
    bundle: str,
    config: str | Sequence[str] = ("train.json", "inference.json"),
    overrides: Mapping[str, Any] | None = None,
):
    """A ``monai.bundle.ConfigParser`` of ``bundles/<bundle>/configs/<config>`` with ``overrides`` applied.

    Args:
        bundle: the bundle's folder name under ``bundles/`` (``"resdce"``, ``"dcediff"``, ...).
        config: a config file name, or several stacked in order as ``--config_file "['a.json','b.json']"``
            stacks them (later files override earlier ones).
        overrides: ``{id: value}`` set before parsing, exactly as ``--id value`` on the command line;
            nested ids with ``#`` (``"inferer#progress"``); a value may be a ``$`` expression or a
            ``@`` reference. Typical: ``network_size``, ``device`` (a string such as ``"cpu"``),
            ``num_inference_steps``.
    """
    from monai.bundle import ConfigParser

    files = [config] if isinstance(config, str) else list(config)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f) for f in files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def bundle_objects(
    bundle: str,
    *ids: str,
    config: str | Sequence[str] = ("train.json", "inference.json"),
    overrides: Mapping[str, Any] | None = None,
) -> list:
    """The parsed objects ``ids`` (e.g. ``"network"``, ``"inferer"``, ``"train#inferer"``) of one
    :func:`bundle_parser`, in order. Objects referencing each other share instances (``inferer``'s
    sampler is ``slice_inferer``, whose ``scheduler`` is ``scheduler``), as when the bundle runs."""
    parser = bundle_parser(bundle, config, overrides)
    return [parser.get_parsed_content(i) for i in ids]


def n_params(net: torch.nn.Module) -> int:
    """Number of parameters of ``net`` (all of them, trainable or not)."""
    return sum(p.numel() for p in net.parameters())


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


def training_rate(compute_loss: Callable[[], torch.Tensor], optimizer, device: torch.device, n: int) -> dict:
    """Optimiser steps per second (``"ips"``) of ``n`` training steps, AMP with a gradient scaler on CUDA
    (as the bundles' trainers run), after one warm-up step; on CUDA also the peak GPU memory
    (``"peak_mib"``). ``compute_loss()`` runs the forward pass and returns the loss."""
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(enabled=cuda)

    def step():
        with torch.autocast(device.type, enabled=cuda):
            loss = compute_loss()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return with_peak_memory({"ips": n / timed(lambda: [step() for _ in range(n)], warmup=1, device=device)}, device)


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
    peak RSS only ever grows). ``fn`` must be importable (a module-level function). A child that dies
    without answering (e.g. killed by the kernel when memory runs out) raises ``RuntimeError`` with
    its exit code instead of leaving the parent waiting.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))
    p.start()
    child.close()  # only the child writes: its death closes the pipe
    try:
        out, rss, err = parent.recv()
    except EOFError:
        p.join()
        why = " (killed: out of memory?)" if p.exitcode == -9 else ""
        raise RuntimeError(f"benchmark child {fn.__name__}{args} died with exit code {p.exitcode}{why}") from None
    p.join()
    if err:
        raise RuntimeError(f"benchmark child failed: {err}")
    return out, rss


def eval_means(summary_json: str | Path) -> dict[str, dict[str, float]]:
    """``{"<method>/<phase>/<region>": {metric: mean, f"{metric}_std": std}, ...}`` of a bundle evaluation's
    ``summary.json`` (written by :func:`common.handlers.metrics.report`), plus ``"n_cases"``."""
    summary = json.loads(Path(summary_json).read_text())["summary"]
    out: dict = {}
    n = 0
    for name, stats in summary.items():
        out[name] = {k: v["mean"] for k, v in stats.items()} | {f"{k}_std": v["std"] for k, v in stats.items()}
        n = max([n] + [v["n"] for v in stats.values()])
    out["n_cases"] = n
    return out


def write_record(path: str | Path, summary_json: str | Path, **info) -> dict:
    """Keep a documented run's evaluation (means per method/phase/region) and how it was made, as JSON
    beside the bundle's docs, so that the benchmark table can report it without re-running it."""
    from common.io import save_json

    rec = dict(info, means=eval_means(summary_json))
    save_json(rec, path)
    return rec


def read_record(path: str | Path) -> dict | None:
    """The record at ``path``, or ``None`` when that run has not been recorded."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def measure_on(device_name: str, fn: Callable, *args) -> tuple[Any, str]:
    """``fn(*args)`` measured on ``device_name`` and a memory note: peak CUDA memory allocated (the
    result's ``"peak_mib"``) on a GPU; on the CPU ``fn`` runs in a fresh process (:func:`isolated`) and
    the note is that process's peak RSS."""
    if device_name == "cuda":
        res = fn(*args)
        return res, f"{res.get('peak_mib', float('nan')):.0f} MiB peak CUDA allocated"
    res, rss = isolated(fn, *args)
    return res, f"{rss:.0f} MiB peak RSS of the process"


def devices() -> list[str]:
    """The devices a section measures: the CPU, then CUDA where this machine has a GPU."""
    from common.device import get_device

    return ["cpu"] + (["cuda"] if get_device().type == "cuda" else [])


def per_device(
    section_rows: Callable[[str, str], list[dict]], presets: Sequence[str] = ("small", "paper")
) -> list[dict]:
    """``section_rows(device, preset)`` for every device of :func:`devices` and every preset, in that order."""
    return [r for dev in devices() for preset in presets for r in section_rows(dev, preset)]


def row(what: str, value: str, device: str, note: str) -> dict:
    """One row of the benchmark table."""
    return {"what": what, "value": value, "device": device, "note": note}


def training_row(
    device: str,
    preset: str,
    measure_training: Callable,
    what: Callable[..., str],
    how: str,
    batch: int | None = None,
    cpu_batch_note: str = "",
) -> dict:
    """The row of ``measure_training(preset, device[, batch])``'s training rate (``"ips"``, :func:`training_rate`),
    measured by :func:`measure_on`: ``what(result[, batch])`` was measured, ``how`` it trains (", AMP" added on
    CUDA), the memory note. Where ``batch`` (the paper's) is given, a paper-sized network on a CPU is measured
    with batch 2 instead and the note ends with ``cpu_batch_note``."""
    args = () if batch is None else (batch if (preset == "small" or device == "cuda") else 2,)
    train, mem = measure_on(device, measure_training, preset, device, *args)
    extra = cpu_batch_note if args and args[0] != batch else ""
    amp = ", AMP" if device == "cuda" else ""
    return row(what(train, *args), f"{train['ips']:.2f} it/s", device, f"{how}{amp}; {mem}{extra}")


def inference_parts(bundle: str, preset: str, device_name: str, steps: int, *ids: str, **overrides) -> list:
    """The bundle's ``network`` (on ``device_name``), volume ``inferer`` and ``ids`` from its ``inference.json``
    with ``network_size=preset``, ``num_inference_steps=steps``, no progress bar, and ``overrides``."""
    settings = {"network_size": preset, "device": device_name, "num_inference_steps": steps, "inferer#progress": False}
    return bundle_objects(bundle, "network", "inferer", *ids, overrides={**settings, **overrides})


def training_steps(preset: str, device: torch.device, iters: int) -> int:
    """How many training steps to time: ``iters``, or one for a paper-sized network on a CPU."""
    return iters if preset == "small" or device.type == "cuda" else 1


def warmup_runs(device: torch.device) -> int:
    """Untimed runs before timing: one on CUDA (allocations, kernel selection), none on a CPU."""
    return 1 if device.type == "cuda" else 0


def with_peak_memory(out: dict, device: torch.device) -> dict:
    """``out`` with the peak CUDA memory allocated (``"peak_mib"``) on a GPU; unchanged on a CPU."""
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
