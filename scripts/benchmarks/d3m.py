"""D3M: per-volume (BraTS 240x240x155) inference at 250 and 50 DDIM steps, time per step, peak
memory, training iterations per second, for the small and paper-sized networks (untrained: timing
only). Network, scheduler, inferers and loss are the bundle's, parsed from its configs
(``scripts.benchmarks.common.bundle_objects``). On a CPU one step of a few slices is measured and
scaled to the volume (the row says so)."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE = (240, 240, 155)
CPU_SLICES = 4  # slices of one measured step on a CPU
DEMO_RECORD = Path(__file__).resolve().parents[2] / "bundles" / "d3m" / "docs" / "demo_cpu_run.json"
BRAIN_ONLY_RECORD = DEMO_RECORD.with_name("brain_only_cpu_run.json")
#: the three ways the bundle's inferer covers a volume: --brain_only / --crop_to_brain
BRAIN_ONLY_MODES = {
    "full volume": {"brain_only": False},
    "brain only (default)": {"brain_only": True, "crop_to_brain": False},
    "brain only + crop": {"brain_only": True, "crop_to_brain": True},
}


def build(preset: str, device_name: str, num_inference_steps: int = 1):
    """The bundle's network (on ``device_name``) and volume inferer from ``configs/inference.json``."""
    from scripts.benchmarks.common import inference_parts

    net, inferer, keys = inference_parts("d3m", preset, device_name, num_inference_steps, "input_keys")
    return net, inferer, len(keys)


def measure_inference(preset: str, device_name: str, shape: tuple[int, int, int] = SHAPE, steps=(250, 50)) -> dict:
    """Seconds per step (all slices of the volume batched; on a CPU ``CPU_SLICES`` slices scaled to the volume)."""
    from scripts.benchmarks.common import n_params, timed, warmup_runs, with_peak_memory

    device = torch.device(device_name)
    net, one, c_cond = build(preset, device_name, 1)
    net.eval()
    d = shape[2] if device.type == "cuda" else CPU_SLICES
    cond = torch.rand(1, c_cond, shape[0], shape[1], d, device=device)
    t = timed(lambda: one(cond, net), repeat=1, warmup=warmup_runs(device), device=device)
    t_step = t * shape[2] / d
    out = {
        "step_s": t_step,
        "params_m": n_params(net) / 1e6,
        "scaled": d != shape[2],
        **{f"vol{n}_s": t_step * n for n in steps},
    }
    return with_peak_memory(out, device)


def measure_training(preset: str, device_name: str, batch: int = 16, iters: int = 3, size: int = 256) -> dict:
    """Training iterations per second of the bundle's ``train#inferer`` + ``train#loss`` + ``train#optimizer``."""
    from scripts.benchmarks.common import bundle_objects, n_params, training_rate, training_steps

    device = torch.device(device_name)
    net, inferer, loss_fn, opt, sched = bundle_objects(
        "d3m",
        "network",
        "train#inferer",
        "train#loss",
        "train#optimizer",
        "scheduler",
        config="train.json",
        overrides={"network_size": preset, "device": device_name},
    )
    net.train()
    x0 = torch.rand(batch, 2, size, size, device=device) * 2 - 1
    c = torch.rand(batch, 3, size, size, device=device)

    def loss():
        t = torch.randint(0, sched.num_train_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        return loss_fn(inferer(x0, net, noise, t, condition=c), sched.get_velocity(x0, noise, t))

    rate = training_rate(loss, opt, device, training_steps(preset, device, iters))
    return {**rate, "params_m": n_params(net) / 1e6}


def _rows(dev: str, preset: str) -> list[dict]:
    from scripts.benchmarks.common import measure_on, row, training_row

    res, mem = measure_on(dev, measure_inference, preset, dev)
    out = []
    for steps in (250, 50):
        note = f"{res['params_m']:.1f}M params, all slices batched; {mem}"
        if res["scaled"]:
            note += f"; one step of {CPU_SLICES} slices measured and scaled to 155 slices x {steps} steps"
        what = f"d3m inference, one 240x240x155 volume, {steps} DDIM steps, {preset} net"
        out.append(row(what, f"{res[f'vol{steps}_s']:.0f} s ({res['step_s']:.2f} s/step)", dev, note))
    train = training_row(
        dev,
        preset,
        measure_training,
        lambda train, batch: f"d3m training, batch {batch} slices 256x256, {preset} net",
        "Adam, abar-weighted v MSE + smoothness, warp in the graph",
        batch=16,
        cpu_batch_note="; the paper's batch 16 is too large for a CPU run",
    )
    return out + [train]


def demo_row() -> list[dict]:
    """The recorded short CPU training (docs/demo_cpu_run.json), not re-run."""
    from scripts.benchmarks.common import read_record, row

    rec = read_record(DEMO_RECORD)
    if rec is None:
        return []
    return [
        row(
            f"d3m tumour-region PSNR / SSIM on {rec['n_cases']} held-out brain phantoms ({rec['iterations']} iterations)",
            rec["value"],
            rec.get("device", "cpu"),
            f"{rec['note']} (recorded in bundles/d3m/docs/demo_cpu_run.json, not re-run here)",
        )
    ]


def measure_brain_only(
    shape: tuple[int, int, int] = SHAPE,
    steps: int = 2,
    preset: str = "small",
    device_name: str = "cpu",
    seed: int = 0,
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
) -> dict:
    """Seconds per volume of the bundle's inferer (``inference.json``, ``steps`` DDIM steps) on one
    BraTS-sized brain phantom (``make_brain_phantom(shape=shape)``, 1 mm (``spacing``; ``None``: the
    phantom's field of view over ``shape``), skull-stripped: the brain is
    ``t1n > 0``) in each of :data:`BRAIN_ONLY_MODES`, after one untimed run on a small crop (kernel
    selection); also the slices that hold brain and the brain's in-plane box."""
    import numpy as np

    from common.phantoms.brain import make_brain_phantom
    from scripts.benchmarks.common import bundle_parser, inference_parts, timed

    ph = make_brain_phantom(seed, shape=shape, spacing=spacing)
    keys = bundle_parser("d3m").get_parsed_content("input_keys")
    vol = np.stack([ph.images[k] / max(float(ph.images[k].max()), 1e-6) for k in keys]).astype(np.float32)
    cond = torch.from_numpy(vol)[None].to(device_name)
    brain = ph.images["t1n"] > 0
    rows_, cols_ = np.nonzero(brain.any(2).any(1))[0], np.nonzero(brain.any(2).any(0))[0]
    out = {
        "shape": [int(n) for n in shape],
        "steps": steps,
        "preset": preset,
        "brain_slices": int(brain.any((0, 1)).sum()),
        "brain_box": [int(rows_[-1] - rows_[0] + 1), int(cols_[-1] - cols_[0] + 1)],
        "threads": torch.get_num_threads(),
        "seconds": {},
    }
    for mode, overrides in BRAIN_ONLY_MODES.items():
        net, inferer = inference_parts("d3m", preset, device_name, steps, **overrides)
        net.eval()
        inferer(cond[..., :2], net)  # one-time set-up on 2 slices, untimed
        out["seconds"][mode] = timed(lambda: inferer(cond, net), device=torch.device(device_name))
    return out


def record_brain_only(note: str = "", **kwargs) -> dict:
    """Run :func:`measure_brain_only` and write its record (``docs/brain_only_cpu_run.json``)."""
    import time

    from common.io import save_json
    from scripts.benchmarks.common import cpu_model

    rec = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": cpu_model(), "note": note}
    rec.update(measure_brain_only(**kwargs))
    save_json(rec, BRAIN_ONLY_RECORD)
    print(rec)
    return rec


def brain_only_row() -> list[dict]:
    """The recorded brain-only timing (docs/brain_only_cpu_run.json), not re-run."""
    from scripts.benchmarks.common import read_record, row

    rec = read_record(BRAIN_ONLY_RECORD)
    if rec is None:
        return []
    secs = rec["seconds"]
    full = secs["full volume"]
    value = "; ".join(f"{m} {s:.0f} s ({s / full:.2f}x)" for m, s in secs.items())
    what = (
        f"d3m inference per volume, BraTS-sized phantom {'x'.join(map(str, rec['shape']))} (brain in "
        f"{rec['brain_slices']} of {rec['shape'][2]} slices, box {rec['brain_box'][0]} x {rec['brain_box'][1]}), "
        f"{rec['steps']} DDIM steps, {rec['preset']} net"
    )
    note = f"{rec['cpu']}, {rec['threads']} threads, fp32, {rec['date']}"
    note += f"; {rec['note']}" if rec.get("note") else ""
    return [row(what, value, "cpu", note + " (recorded in bundles/d3m/docs/brain_only_cpu_run.json, not re-run here)")]


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import per_device

    return per_device(_rows) + demo_row() + brain_only_row()


def cost_case(preset: str, device_name: str, quick: bool = False):
    """The cost table's case (``scripts.benchmarks.cost``): one 240x240x155 volume at the bundle's 250 DDIM
    steps, brain in every slice (random input > 0); on a CPU 4 slices, scaled."""
    from scripts.benchmarks.common import bundle_parser, volume_cost_case

    p = bundle_parser("d3m")
    c, steps = len(p.get_parsed_content("input_keys")), int(p.get_parsed_content("num_inference_steps"))
    slices = {"small": CPU_SLICES, "paper": CPU_SLICES}
    return volume_cost_case("d3m", SHAPE, c, steps, preset, device_name, quick, slices)


if __name__ == "__main__":
    import fire

    fire.Fire({"record_brain_only": record_brain_only})
