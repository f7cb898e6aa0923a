"""ResDCE-diff: per-volume (160x160x16) inference at 15 and 4 steps, time per step, peak memory,
training iterations per second, for the small and paper-sized networks (untrained: timing only)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from common.device import get_device

SHAPE = (160, 160, 16)
MAX_STEP_SECONDS_FULL = 20.0  # above this per step, measure one step and scale (and say so)


def build(preset: str, device):
    from common.engines import DiffusionVolumeInferer, ResidualShiftInferer
    from common.networks import SwinDiffusionUNet
    from common.schedulers import ResidualShiftScheduler

    net = SwinDiffusionUNet(preset=preset, spatial_dims=2, in_channels=6, out_channels=3).to(device).eval()
    sampler = ResidualShiftInferer(ResidualShiftScheduler(num_train_timesteps=15).to(device))
    return net, sampler, DiffusionVolumeInferer


def measure_inference(preset: str, device_name: str) -> dict:
    from scripts.benchmarks.common import timed

    device = torch.device(device_name)
    net, sampler, VolumeInferer = build(preset, device)
    cond = torch.randn(1, 3, *SHAPE, device=device)
    one = VolumeInferer(sampler, out_channels=3, num_inference_steps=1, progress=False, amp=True)
    t_step = timed(lambda: one(cond, net), repeat=1, warmup=1 if device.type == "cuda" else 0, device=device)
    out = {"step_s": t_step, "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    for steps in (15, 4):
        if t_step * steps <= MAX_STEP_SECONDS_FULL * 4:
            inf = VolumeInferer(sampler, out_channels=3, num_inference_steps=steps, progress=False, amp=True)
            out[f"vol{steps}_s"] = timed(lambda: inf(cond, net), device=device)
            out[f"vol{steps}_scaled"] = False
        else:
            out[f"vol{steps}_s"] = t_step * steps
            out[f"vol{steps}_scaled"] = True
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_training(preset: str, device_name: str, batch: int = 8, iters: int = 3) -> float:
    from common.engines import ResidualShiftInferer
    from common.networks import SwinDiffusionUNet
    from common.schedulers import ResidualShiftScheduler
    from scripts.benchmarks.common import timed

    device = torch.device(device_name)
    net = SwinDiffusionUNet(preset=preset, spatial_dims=2, in_channels=6, out_channels=3).to(device).train()
    inferer = ResidualShiftInferer(ResidualShiftScheduler(num_train_timesteps=15).to(device))
    opt = torch.optim.Adam(net.parameters(), lr=5e-5)
    x0 = torch.randn(batch, 3, *SHAPE[:2], device=device)
    y = torch.randn(batch, 3, *SHAPE[:2], device=device)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")

    def step():
        t = torch.randint(0, 15, (batch,), device=device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            loss = torch.nn.functional.mse_loss(inferer(x0, net, torch.randn_like(x0), t, condition=y), x0)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    n = iters if preset == "small" or device.type == "cuda" else 1
    return n / timed(lambda: [step() for _ in range(n)], warmup=1, device=device)


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import isolated

    devices = ["cpu"] + (["cuda"] if get_device().type == "cuda" else [])
    out = []
    for dev in devices:
        for preset in ("small", "paper"):
            if dev == "cuda":
                res = measure_inference(preset, dev)
                rss = res.get("peak_mib", math.nan)
                mem = f"{rss:.0f} MiB peak CUDA allocated"
            else:
                res, rss = isolated(measure_inference, preset, dev)
                mem = f"{rss:.0f} MiB peak RSS of the process"
            for steps in (15, 4):
                note = f"{res['params_m']:.1f}M params, 16 slices batched; {mem}"
                if res[f"vol{steps}_scaled"]:
                    note += f"; measured 1 step ({res['step_s']:.1f} s) x {steps}, not run in full"
                out.append({"what": f"resdce inference, one 160x160x16 volume, {steps} steps, {preset} net",
                            "value": f"{res[f'vol{steps}_s']:.1f} s ({res['step_s']:.2f} s/step)", "device": dev, "note": note})
            ips = measure_training(preset, dev) if dev == "cuda" else isolated(measure_training, preset, dev)[0]
            out.append({"what": f"resdce training, batch 8 slices 160x160, {preset} net",
                        "value": f"{ips:.2f} it/s", "device": dev,
                        "note": "Adam, MSE on x0" + (", AMP" if dev == "cuda" else "")})
    return out
