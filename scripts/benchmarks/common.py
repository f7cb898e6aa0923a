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
import platform
import resource
import time
from dataclasses import dataclass, field
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


def training_rate(
    compute_loss: Callable[[], torch.Tensor], optimizer, device: torch.device, n: int, auto_precisions=None
) -> dict:
    """Optimiser steps per second (``"ips"``) of ``n`` training steps, after one warm-up step, under the
    autocast the bundles' trainers use in ``precision auto`` (:func:`common.device.training_autocast` with
    ``auto_precisions``, the bundle's setting, default both: bf16 on a GPU with bf16, else fp16, float32
    on a CPU) and a gradient scaler; on CUDA also the peak GPU memory (``"peak_mib"``).
    ``compute_loss()`` runs the forward pass and returns the loss."""
    from common.device import AUTO_PRECISIONS, training_autocast

    dtype = training_autocast("auto", device, AUTO_PRECISIONS if auto_precisions is None else auto_precisions)
    scaler = torch.amp.GradScaler(enabled=dtype is not None)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
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


# --- inference cost per precision: time per step and per volume, peak memory, FLOPs, GFLOP/s vs the matmul peak

#: the precisions of the cost rows: float32, the bundles' default ``auto`` (whatever it resolves to on the
#: machine) and bfloat16 forced (labelled as such: on a CPU without native bf16 it is emulated)
COST_PRECISIONS = ("fp32", "auto", "bf16")
_MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, as ``lscpu`` shows it), its core count and whether it
    computes bfloat16 natively, e.g. ``"AMD EPYC (2 cores, no native bf16)"``."""
    import os

    from common.device import cpu_has_native_bf16

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {'native' if cpu_has_native_bf16() else 'no native'} bf16)"


def quick() -> bool:
    """Whether the benchmark runs its quick path (``python -m scripts.benchmark --quick``: small networks,
    tiny inputs, one step; checks that the sections run, the figures mean nothing). An environment
    variable (``BENCH_QUICK=1``), so that the measuring child processes see it too."""
    import os

    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of ``fn()`` as torch's ``FlopCounterMode`` counts them: matrix products
    and convolutions (a multiply-add = 2 FLOPs; elementwise operations, normalisations and the
    schedulers' arithmetic are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeat: int = 3, device: str = "cpu") -> float:
    """The machine's measured matrix-multiply rate in GFLOP/s: best of ``repeat`` ``torch.mm`` of two
    ``n`` x ``n`` matrices of ``dtype`` (2 n^3 FLOPs each) after one warm-up, with the current thread count."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t = timed(lambda: torch.mm(a, b), repeat=repeat, warmup=1, device=dev)
    return 2.0 * n**3 / t / 1e9


@dataclass
class CostCase:
    """One bundle's inference as the cost rows measure it (picklable: it goes to a measuring child).

    Args:
        bundle: the bundle's folder name; its ``train.json`` + ``inference.json`` build network and inferer.
        what: the volume in words, e.g. ``"one 160x160x16 volume, 15 steps"``.
        inputs: shapes of the random inputs of the volume inferer after the network (first the volume
            (1, C, H, W, D)); a list instead of a shape is passed as a tensor as is (e.g. time points).
        steps: sampling steps of one volume (the bundle's default).
        scale: volumes per measured input (e.g. 155 / 4 when 4 of 155 slices are measured).
        timed_steps: steps run per timed call (the inferer's ``num_inference_steps``) when ``respaced``.
        respaced: the inferer takes ``num_inference_steps``; otherwise one call runs all ``steps``.
        overrides: more config overrides (as ``--id value``).
        repeat: timed calls (the best is kept; a call on a 32-voxel crop warms up first, untimed).
    """

    bundle: str
    what: str
    inputs: tuple
    steps: int
    scale: float = 1.0
    timed_steps: int = 1
    respaced: bool = True
    overrides: dict = field(default_factory=dict)
    repeat: int = 1


def measure_cost(case: CostCase, preset: str, device_name: str, precision: str, flops: bool = True) -> dict:
    """Seconds per sampling step and per volume, FLOPs per step (one network forward over the step's
    slices or windows; ``flops=False`` skips the count), the precision the inferer used and, on CUDA,
    the peak memory (``"peak_mib"``), of ``case`` with ``network_size=preset`` at ``precision``."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps_per_call = case.timed_steps if case.respaced else case.steps
    extra = dict(case.overrides, precision=precision)
    if case.respaced:
        net, inferer = inference_parts(case.bundle, preset, device_name, case.timed_steps, **extra)
    else:
        net, inferer = bundle_objects(
            case.bundle, "network", "inferer", overrides={"network_size": preset, "device": device_name, **extra}
        )
    net.eval()
    g = torch.Generator().manual_seed(0)
    args = [
        torch.tensor(s, dtype=torch.float32) if isinstance(s, list) else torch.rand(*s, generator=g)
        for s in case.inputs
    ]
    args = [a.to(device) for a in args]
    call = lambda: inferer(args[0], net, *args[1:])  # noqa: E731
    # one-time set-up (kernel selection, lazy initialisation) on a small crop first, untimed
    small = args[0][(slice(None), slice(None), *(slice(0, 32) for _ in args[0].shape[2:]))]
    inferer(small, net, *args[1:])
    t = timed(call, repeat=case.repeat, warmup=warmup_runs(device), device=device)
    out = {
        "step_s": t / steps_per_call,
        "params_m": n_params(net) / 1e6,
        "precision_used": getattr(inferer, "precision_used", precision),
    }
    out["volume_s"] = out["step_s"] * case.steps * case.scale
    if flops:
        if case.respaced:
            inferer.num_inference_steps = 1
        out["gflop_step"] = count_flops(call) / (1 if case.respaced else case.steps) / 1e9
    return with_peak_memory(out, device)


def bf16_emulated(device_name: str) -> bool:
    """Whether bf16 runs emulated on ``device_name``'s fp32 units (a CPU without native bf16)."""
    from common.device import cpu_has_native_bf16

    return device_name == "cpu" and not cpu_has_native_bf16()


def percent(fraction: float) -> str:
    """A share as the cost table prints it: whole percents from 10 %, two significant digits below."""
    p = 100 * fraction
    return f"{p:.0f}" if p >= 10 else f"{p:.2g}"


def cost_rows(case: CostCase, preset: str, device_name: str, peaks: Mapping[str, float]) -> list[dict]:
    """The cost-table rows of ``case`` on ``device_name`` (one per precision of :data:`COST_PRECISIONS`),
    each measured in a fresh process on a CPU (:func:`measure_on`); ``peaks`` = matmul GFLOP/s per
    precision name (:func:`machine_peak_rows`). FLOPs are counted once (fp32): autocast changes the
    dtype, not the operations. Where ``auto`` resolves to fp32 its row reuses the fp32 run; on a CPU
    without native bf16 the forced-bf16 row is measured for the small network only (emulated bf16 runs
    6-10x slower than fp32 there; the paper-sized rows would take most of the benchmark's time)."""
    from common.device import resolve_precision

    out, gflop, measured = [], None, {}
    allowed = bundle_parser(case.bundle, "train.json").get_parsed_content("auto_precisions")
    for precision in COST_PRECISIONS:
        same = resolve_precision(precision, device_name, allowed)[0] is None and "fp32" in measured
        emulated = precision == "bf16" and bf16_emulated(device_name) and preset != "small"
        if same:  # `auto` is fp32 on this machine: the fp32 run is its figure (measured once)
            res, mem = measured["fp32"]
        elif emulated:  # 6-10x fp32 without native bf16 units: the small network's row shows the ratio
            continue
        elif quick():  # in this process: quick checks that it runs, peak memory is not measured
            res, mem = measure_cost(case, preset, device_name, precision, gflop is None), "not measured (quick)"
        else:
            res, mem = measure_on(device_name, measure_cost, case, preset, device_name, precision, gflop is None)
        measured[precision] = (res, mem)
        gflop = res.get("gflop_step", gflop)
        used = res["precision_used"]
        label = {"fp32": "fp32", "auto": f"auto (= {used})", "bf16": f"bf16 (forced: {used})"}[precision]
        rate = gflop / res["step_s"]
        dtype = used.split()[0]  # "bf16 channels_last" -> "bf16"
        # emulated bf16 runs on the fp32 units: their rate is its ceiling
        ref = "fp32" if dtype == "bf16" and bf16_emulated(device_name) else dtype
        peak = peaks.get(ref)
        scaled = []
        if case.respaced and case.timed_steps != case.steps:
            scaled.append(f"{case.timed_steps} step(s) timed x {case.steps}")
        if case.scale != 1:
            scaled.append(f"input measured x {case.scale:g} for the volume")
        if same:
            scaled.append("the fp32 row's run (auto resolves to fp32 here)")
        out.append(
            {
                "what": f"{case.bundle} inference, {case.what}, {preset} net ({res['params_m']:.1f}M params)",
                "precision": label,
                "s/step": f"{res['step_s']:.3g}",
                "s/volume": f"{res['volume_s']:.4g}",
                "peak memory": mem.replace(" of the process", ""),
                "GFLOP/step": f"{gflop:.4g}",
                "GFLOP/s": f"{rate:.3g}",
                "of matmul peak": (f"{percent(rate / peak)} % of {ref}" + (" (bf16 emulated)" if ref != dtype else ""))
                if peak
                else "",
                "device": device_name,
                "note": "; ".join(scaled) or "run in full",
            }
        )
    return out


def machine_peak_rows(device_name: str, n: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """The measured matmul peak per precision name (fp32, bf16; fp16 on CUDA) and their cost-table rows.

    On a CPU without native bf16 the bf16 row is torch.mm's emulated path (about 1 GFLOP/s, far below
    oneDNN's emulated bf16 convolutions), so :func:`cost_rows` sets bf16 rows against the fp32 peak there."""
    n = n or (256 if quick() else 1024)  # bf16 without native units runs at ~1 GFLOP/s: 2048^3 would take minutes
    names = ("fp32", "bf16") + (("fp16",) if device_name == "cuda" else ())
    peaks = {p: matmul_gflops(_MATMUL_DTYPES[p], n, device=device_name) for p in names}
    rows = [
        {
            "what": f"matmul {n}x{n}x{n} (torch.mm), the machine's peak",
            "precision": p,
            "GFLOP/s": f"{v:.4g}",
            "of matmul peak": f"100 % of {p}",
            "device": device_name,
            "note": f"{torch.get_num_threads()} torch threads"
            + (
                "; emulated (no native bf16): bf16 rows are set against fp32"
                if p == "bf16" and bf16_emulated(device_name)
                else ""
            ),
        }
        for p, v in peaks.items()
    ]
    return peaks, rows


def volume_cost_case(
    bundle: str,
    shape: tuple[int, int, int],
    channels: int,
    steps: int,
    preset: str,
    device_name: str,
    quick: bool = False,
    cpu_slices: Mapping[str, int] | None = None,
    **overrides,
) -> CostCase:
    """The :class:`CostCase` of a slice-wise volume inferer on a (1, ``channels``, *``shape``) volume
    with ``steps`` sampling steps: on CUDA the whole volume, up to 50 steps timed; on a CPU
    ``cpu_slices[preset]`` slices (all when absent) scaled to the volume, 2 steps timed for the small
    network and 1 for the paper-sized one; ``quick``: a 32 x 32 x 2 volume, 1 step (not a measurement)."""
    h, w, d = shape
    what = f"one {h}x{w}x{d} volume, {steps} steps"
    overrides = {"inferer#progress": False, **overrides}
    if quick:
        return CostCase(bundle, what, ((1, channels, 32, 32, 2),), steps, 1.0, 1, overrides=overrides)
    if device_name == "cuda":
        return CostCase(bundle, what, ((1, channels, h, w, d),), steps, 1.0, min(steps, 50), overrides=overrides)
    k = (cpu_slices or {}).get(preset, d)
    small = preset == "small"
    return CostCase(
        bundle, what, ((1, channels, h, w, k),), steps, d / k, 2 if small else 1, True, overrides, 1 + small
    )
