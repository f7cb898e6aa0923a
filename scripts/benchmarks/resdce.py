"""ResDCE-diff: per-volume (160x160x16) inference at 15 and 4 steps, time per step, peak memory,
training iterations per second, for the small and paper-sized networks (untrained: timing only).
The network, scheduler and inferers are the bundle's, parsed from its configs (``common.bundle_objects``)."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE = (160, 160, 16)
DEMO_RECORD = Path(__file__).resolve().parents[2] / "bundles" / "resdce" / "docs" / "demo_cpu_run.json"
PHASES = ("dce_onset", "dce_early", "dce_late")
MAX_STEP_SECONDS_FULL = 20.0  # above this per step, measure one step and scale (and say so)


def build(preset: str, device_name: str, num_inference_steps: int = 15):
    """The bundle's network (on ``device_name``), volume inferer and number of condition channels,
    from ``configs/inference.json`` with ``network_size=preset`` and ``num_inference_steps`` (no
    progress bar)."""
    from scripts.benchmarks.common import inference_parts

    net, inferer, keys = inference_parts("resdce", preset, device_name, num_inference_steps, "input_keys")
    return net, inferer, len(keys)


def measure_inference(
    preset: str, device_name: str, shape: tuple[int, int, int] = SHAPE, steps: tuple[int, ...] = (15, 4)
) -> dict:
    """Seconds per step and per volume of ``shape`` at each of ``steps`` (run in full when affordable)."""
    from scripts.benchmarks.common import n_params, timed, warmup_runs, with_peak_memory

    device = torch.device(device_name)
    net, one, c_cond = build(preset, device_name, 1)
    net.eval()
    cond = torch.randn(1, c_cond, *shape, device=device)
    t_step = timed(lambda: one(cond, net), repeat=1, warmup=warmup_runs(device), device=device)
    out = {"step_s": t_step, "params_m": n_params(net) / 1e6}
    for n in steps:
        if t_step * n <= MAX_STEP_SECONDS_FULL * 4:
            one.num_inference_steps = n  # the same inferer object, respaced as the bundle's option does
            out[f"vol{n}_s"] = timed(lambda: one(cond, net), device=device)
            out[f"vol{n}_scaled"] = False
        else:
            out[f"vol{n}_s"] = t_step * n
            out[f"vol{n}_scaled"] = True
    return with_peak_memory(out, device)


def measure_training(
    preset: str, device_name: str, batch: int = 8, iters: int = 3, shape: tuple[int, int] = SHAPE[:2]
) -> dict:
    """Training iterations per second (``"ips"``; on CUDA also ``"peak_mib"``, and ``"params_m"``) of
    the bundle's training forward (``train#inferer``), loss (``train#loss``) and optimiser
    (``train#optimizer``) from ``configs/train.json``, on random batches of ``batch`` slices."""
    from scripts.benchmarks.common import bundle_objects, n_params, training_rate, training_steps

    device = torch.device(device_name)
    net, inferer, loss_fn, opt, t_max, in_keys, out_keys = bundle_objects(
        "resdce",
        "network",
        "train#inferer",
        "train#loss",
        "train#optimizer",
        "num_train_timesteps",
        "input_keys",
        "target_keys",
        config="train.json",
        overrides={"network_size": preset, "device": device_name},
    )
    net.train()
    x0 = torch.randn(batch, len(out_keys), *shape, device=device)
    y = torch.randn(batch, len(in_keys), *shape, device=device)

    def loss():
        t = torch.randint(0, t_max, (batch,), device=device)
        return loss_fn(inferer(x0, net, torch.randn_like(x0), t, condition=y), x0)

    rate = training_rate(loss, opt, device, training_steps(preset, device, iters))
    return {**rate, "params_m": n_params(net) / 1e6}


def _rows(dev: str, preset: str) -> list[dict]:
    from scripts.benchmarks.common import measure_on, row, training_row

    res, mem = measure_on(dev, measure_inference, preset, dev)
    out = []
    for steps in (15, 4):
        note = f"{res['params_m']:.1f}M params, 16 slices batched; {mem}"
        if res[f"vol{steps}_scaled"]:
            note += f"; measured 1 step ({res['step_s']:.1f} s) x {steps}, not run in full"
        what = f"resdce inference, one 160x160x16 volume, {steps} steps, {preset} net"
        out.append(row(what, f"{res[f'vol{steps}_s']:.1f} s ({res['step_s']:.2f} s/step)", dev, note))
    # the paper's batch of 8 whole slices needs > 22 GiB for the paper net on a CPU (killed on a
    # 24 GiB machine): there it is measured with 2 slices and says so
    train = training_row(
        dev,
        preset,
        measure_training,
        lambda train, batch: f"resdce training, batch {batch} slices 160x160, {preset} net",
        "Adam, MSE on x0",
        batch=8,
        cpu_batch_note="; the paper's batch 8 does not fit in 24 GiB on a CPU",
    )
    return out + [train]


def demo_row() -> list[dict]:
    """Model vs. copy_pre PSNR of the recorded ``make demo`` run (read from its record, not re-run)."""
    from scripts.benchmarks.common import read_record, row

    rec = read_record(DEMO_RECORD)
    if rec is None:
        return []
    m = rec["means"]

    def psnr(method: str, region: str) -> str:
        return " / ".join(f"{m[f'{method}/{p}/{region}']['psnr']:.1f}" for p in PHASES)

    return [
        row(
            f"resdce PSNR onset / early / late on {m['n_cases']} held-out phantom subjects (`make demo`, "
            f"{rec['iterations']} iterations)",
            f"whole image: model {psnr('resdce', 'whole')} dB vs copy_pre {psnr('copy_pre', 'whole')} dB; "
            f"prostate: model {psnr('resdce', 'organ_mask')} dB vs copy_pre {psnr('copy_pre', 'organ_mask')} dB",
            rec.get("device", "cpu"),
            f"{rec['note']} (recorded in {DEMO_RECORD.relative_to(DEMO_RECORD.parents[3])} by `{rec['command']}`, "
            "not re-run here)",
        )
    ]


def record(eval_dir: str = "demo_output/resdce/eval", iterations: int = 300, patch: int = 64, note: str = "") -> dict:
    """Record the evaluation of a finished ``make demo`` (its ``summary.json``) for the benchmark table.

    ``python -m scripts.benchmarks.resdce record [--eval_dir demo_output/resdce/eval] [--note "..."]``
    """
    from scripts.benchmarks.common import write_record

    root = DEMO_RECORD.parents[3]
    return write_record(
        DEMO_RECORD,
        root / eval_dir / "summary.json",
        command="make demo; python -m scripts.benchmarks.resdce record",
        iterations=iterations,
        device="cuda" if torch.cuda.is_available() else "cpu",
        note=note or f"small net, {iterations} iterations of 8 {patch}x{patch} crops, 15 sampling steps",
    )


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import per_device

    return per_device(_rows) + demo_row()


def cost_case(preset: str, device_name: str, quick: bool = False):
    """The cost table's case (``scripts.benchmarks.cost``): one 160x160x16 volume at the bundle's 15 steps
    (on a CPU the paper-sized network on 4 of the 16 slices, scaled)."""
    from scripts.benchmarks.common import bundle_parser, volume_cost_case

    p = bundle_parser("resdce")
    c, steps = len(p.get_parsed_content("input_keys")), int(p.get_parsed_content("num_inference_steps"))
    return volume_cost_case("resdce", SHAPE, c, steps, preset, device_name, quick, {"paper": 4})


if __name__ == "__main__":
    import fire

    fire.Fire({"record": record})
