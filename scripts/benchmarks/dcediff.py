"""DCE-diff: per-volume (160x160x16) inference time at 1000 DDPM steps (the paper) and 50 DDIM steps,
next to ResDCE-diff's 15 steps measured in the same run with the same volume inferer (all 16 slices
of the volume in one batch per step), for the small and paper-sized networks (untrained: timing only).

A step is one network evaluation on the 16-slice batch plus the scheduler update, and costs the same
at every t, so a chain is timed over its last ``k`` steps and scaled to its length when running it in
full would exceed the time budget (always the case for 1000 steps on a CPU); each row says which.
Networks, schedulers and inferers are the bundles' own, parsed from their ``inference.json``
(``scripts.benchmarks.common.bundle_objects``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

SHAPE = (160, 160, 16)
# a chain whose estimate exceeds this is timed over a few steps and scaled; on a CPU the budget is
# small so that all CPU rows together stay within a few minutes
FULL_RUN_BUDGET_S = {"cuda": 180.0, "cpu": 20.0}


def dcediff_chain_parts(size: str, device_name: str, sampler: str, steps: int):
    """DCE-diff's network (on ``device_name``), volume inferer and number of condition channels from
    ``bundles/dcediff/configs/inference.json`` with ``network_size=size``, ``sampler`` ("ddpm" or
    "ddim") and ``num_inference_steps=steps`` (no progress bar)."""
    from scripts.benchmarks.common import inference_parts

    net, inferer, keys = inference_parts("dcediff", size, device_name, steps, "input_keys", sampler=sampler)
    return net.eval(), inferer, len(keys)


def resdce_chain_parts(size: str, device_name: str, steps: int = 15):
    """ResDCE-diff's network, volume inferer and condition channels from its ``inference.json``."""
    from scripts.benchmarks.resdce import build

    net, inferer, c_cond = build(size, device_name, steps)
    return net.eval(), inferer, c_cond


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Chain:
    """A bundle's sampling chain (its volume inferer's ``num_inference_steps`` steps) on one network,
    timed over its last ``k`` steps: the scheduler's timesteps are set once as the inferer sets them,
    then cut to their last ``k`` for a run (the inferer told not to reset them)."""

    def __init__(self, volume_inferer, cond, net, device: torch.device) -> None:
        self.inferer, self.cond, self.net, self.device = volume_inferer, cond, net, device
        self.scheduler = volume_inferer.sampler.scheduler
        self.total_steps = int(volume_inferer.num_inference_steps)
        self.scheduler.set_timesteps(self.total_steps, device=device)
        self.all_steps = self.scheduler.timesteps.clone()

    def run(self, k: int) -> float:
        self.scheduler.timesteps = self.all_steps[-k:]
        self.inferer.num_inference_steps = None
        try:
            _sync(self.device)
            t0 = time.perf_counter()
            self.inferer(self.cond, self.net)
            _sync(self.device)
            return time.perf_counter() - t0
        finally:
            self.scheduler.timesteps = self.all_steps
            self.inferer.num_inference_steps = self.total_steps


def time_chains(
    chains: dict[str, Chain],
    probe_steps: int,
    repeat: int,
    warmup: bool,
    budget_s: dict[str, float] = FULL_RUN_BUDGET_S,
) -> dict[str, dict]:
    """Per chain: the best (minimum) time of ``probe_steps`` steps over ``repeat`` rounds, the chains
    interleaved within each round so a burst of load on a shared machine hits all of them alike;
    then the whole chain is run if that estimate fits the device's budget, else the estimate is kept."""
    if warmup:  # allocations, kernel selection (skipped where one step costs tens of seconds)
        for c in chains.values():
            c.run(1)
    best = {name: float("inf") for name in chains}
    for _ in range(repeat):
        for name, c in chains.items():
            best[name] = min(best[name], c.run(probe_steps) / probe_steps)
    out = {}
    for name, c in chains.items():
        per_step = best[name]
        if per_step * c.total_steps <= budget_s.get(c.device.type, 20.0) and probe_steps < c.total_steps:
            full = c.run(c.total_steps)
            out[name] = {
                "total_s": full,
                "step_s": full / c.total_steps,
                "scaled": False,
                "probe": c.total_steps,
                "repeat": 1,
            }
        else:
            out[name] = {
                "total_s": per_step * c.total_steps,
                "step_s": per_step,
                "scaled": probe_steps < c.total_steps,
                "probe": probe_steps,
                "repeat": repeat,
            }
    return out


def measure(
    size: str, device_name: str, shape: tuple[int, int, int] = SHAPE, budget_s: dict[str, float] = FULL_RUN_BUDGET_S
) -> dict:
    """Chain times of one size on one device, for volumes of ``shape``. Where a step costs tens of
    seconds (paper nets on a CPU) each network is stepped once, without warm-up, and the 50-step DDIM
    chain reuses the DDPM step time (a step is one evaluation of the same network on the same batch
    either way)."""
    from scripts.benchmarks.common import n_params, with_peak_memory

    device = torch.device(device_name)
    fast = size == "small" or device.type == "cuda"
    torch.manual_seed(0)
    chains = {}
    for kind, steps in (("ddpm", 1000), ("ddim", 50)) if fast else (("ddpm", 1000),):
        dnet, vol, c_cond = dcediff_chain_parts(size, device_name, kind, steps)
        chains[f"dcediff_{kind}{steps}"] = Chain(vol, torch.randn(1, c_cond, *shape, device=device), dnet, device)
    rnet, rvol, c_cond = resdce_chain_parts(size, device_name, 15)
    chains["resdce15"] = Chain(rvol, torch.randn(1, c_cond, *shape, device=device), rnet, device)
    out: dict = {"dcediff_params_m": n_params(dnet) / 1e6, "resdce_params_m": n_params(rnet) / 1e6}
    out.update(
        time_chains(chains, probe_steps=2 if fast else 1, repeat=2 if fast else 1, warmup=fast, budget_s=budget_s)
    )
    if not fast:
        ddpm = out["dcediff_ddpm1000"]
        out["dcediff_ddim50"] = {**ddpm, "total_s": ddpm["step_s"] * 50, "scaled": True, "reused": True}
    return with_peak_memory(out, device)


def _how(r: dict, steps: int) -> str:
    if r.get("reused"):
        return f"the DDPM step time ({r['step_s']:.2f} s/step, 1 step measured) x {steps}, not run"
    if r["scaled"]:
        best = f", best of {r['repeat']} interleaved rounds" if r["repeat"] > 1 else ""
        return f"measured {r['probe']} step(s){best} ({r['step_s']:.2f} s/step) x {steps}, not run in full"
    return f"run in full ({r['step_s']:.3f} s/step)"


def _rows(dev: str, size: str) -> list[dict]:
    from scripts.benchmarks.common import row

    if dev == "cpu":  # the machine may be shared: say how loaded it was
        threads = (
            f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
    else:
        threads = torch.cuda.get_device_name(0)
    res = measure(size, dev)
    mem = f"; peak CUDA allocated {res['peak_mib']:.0f} MiB" if "peak_mib" in res else ""
    base = f"untrained, 16 slices batched, {threads}{mem}"
    d1000, d50, r15 = res["dcediff_ddpm1000"], res["dcediff_ddim50"], res["resdce15"]
    volume = "one 160x160x16 volume"
    return [
        row(
            f"dcediff inference, {volume}, 1000 DDPM steps (paper), {size} net",
            f"{d1000['total_s']:.1f} s",
            dev,
            f"{res['dcediff_params_m']:.2f}M params, {base}; {_how(d1000, 1000)}",
        ),
        row(
            f"dcediff inference, {volume}, 50 DDIM steps, {size} net",
            f"{d50['total_s']:.1f} s",
            dev,
            f"{res['dcediff_params_m']:.2f}M params, {base}; {_how(d50, 50)}",
        ),
        row(
            f"resdce inference (same run), {volume}, 15 steps, {size} net",
            f"{r15['total_s']:.1f} s",
            dev,
            f"{res['resdce_params_m']:.2f}M params, {base}; {_how(r15, 15)}",
        ),
        row(
            f"speed-up of resdce (15 steps) over dcediff, {size} nets",
            f"{d1000['total_s'] / r15['total_s']:.1f}x vs 1000 DDPM, {d50['total_s'] / r15['total_s']:.2f}x vs 50 DDIM",
            dev,
            f"step ratios 66.7 and 3.33; per-step cost dcediff/resdce "
            f"{d1000['step_s'] / r15['step_s']:.2f} (different networks); the paper reports 3.56x",
        ),
    ]


def rows(tmp: Path, sizes: tuple[str, ...] = ("small", "paper")) -> list[dict]:
    from scripts.benchmarks.common import per_device

    return per_device(_rows, sizes)


def cost_case(preset: str, device_name: str, quick: bool = False):
    """The cost table's case (``scripts.benchmarks.cost``): one 160x160x16 volume with the bundle's default
    sampler and steps (on a CPU the paper-sized network on 4 of the 16 slices, scaled). The steps are
    timed with the DDIM sampler (the DDPM chain runs all T steps or none): one step is one forward of the
    same network on the same slices either way."""
    from scripts.benchmarks.common import bundle_parser, volume_cost_case

    p = bundle_parser("dcediff")
    c, steps = len(p.get_parsed_content("input_keys")), int(p.get_parsed_content("num_inference_steps"))
    sampler = p.get_parsed_content("sampler")
    case = volume_cost_case("dcediff", SHAPE, c, steps, preset, device_name, quick, {"paper": 4}, sampler="ddim")
    case.what += f" ({sampler}" + (", steps timed with ddim)" if sampler != "ddim" else ")")
    return case


if __name__ == "__main__":  # python -m scripts.benchmarks.dcediff [small] [paper]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for r in rows(Path(tmp), tuple(sys.argv[1:]) or ("small", "paper")):
            print(json.dumps(r))
