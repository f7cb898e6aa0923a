"""Res-SRDiff: inference time per slice and per volume (prostate T2w grid 320x320x20) at 4 steps (the
default, respaced from T = 15) and at 15 steps, for the small and paper-sized networks (untrained:
timing only), plus the model-vs-bicubic PSNR the bundle's documented short CPU run measured. The network, scheduler
and inferer are the bundle's, parsed from its ``inference.json`` (``common.bundle_objects``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SLICE = (320, 320)
DEPTH = 20
STEPS = (4, 15)
MAX_FULL_SECONDS = 20.0  # a measurement that would take longer is extrapolated from one step (and says so)
EVAL_RECORD = Path(__file__).resolve().parents[2] / "bundles" / "ressrdiff" / "docs" / "phantom_cpu_run.json"


def build(preset: str, device_name: str, steps: int = 4):
    """The bundle's network (on ``device_name``), volume inferer and condition channels from ``configs/inference.json``
    with ``network_size=preset`` and ``num_inference_steps=steps`` (no progress bar); the slice
    batching is the bundle's default (all slices of a volume in one batch on CUDA, one slice per
    forward pass on the CPU)."""
    from scripts.benchmarks.common import inference_parts

    net, inferer, c_in = inference_parts("ressrdiff", preset, device_name, steps, "network_def#in_channels")
    return net.eval(), inferer, int(c_in) - inferer.out_channels


def measure(
    preset: str,
    device_name: str,
    slice_shape: tuple[int, int] = SLICE,
    depth: int = DEPTH,
    steps: tuple[int, ...] = STEPS,
) -> dict:
    """Seconds for one slice and for one volume of ``slice_shape`` x ``depth``, at each of ``steps``
    (run in full when affordable)."""
    from scripts.benchmarks.common import n_params, timed, with_peak_memory

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    net, inf, c_cond = build(preset, device_name, 1)
    chunk = int(inf.slice_batch_size or 0)
    out = {"params_m": n_params(net) / 1e6, "chunk": chunk}

    def run(what: str, d: int) -> None:
        cond = torch.randn(1, c_cond, *slice_shape, d, device=device)
        inf.num_inference_steps = 1
        step = out[f"{what}_step_s"] = timed(lambda: inf(cond, net), warmup=1 if (cuda or d == 1) else 0, device=device)
        for n in steps:
            full = cuda or step * n <= MAX_FULL_SECONDS
            if full:
                inf.num_inference_steps = n  # respaced from T, as the bundle's num_inference_steps does
                out[f"{what}{n}_s"] = timed(lambda: inf(cond, net), device=device)
            else:
                out[f"{what}{n}_s"] = step * n
            out[f"{what}{n}_scaled"] = not full

    run("slice", 1)
    if cuda or out["slice_step_s"] * depth <= 3 * MAX_FULL_SECONDS:
        run("volume", depth)
    else:  # one full-volume step would take minutes: slices are independent, so scale the slice by depth
        out["volume_step_s"] = out["slice_step_s"] * depth
        for n in steps:
            out[f"volume{n}_s"], out[f"volume{n}_scaled"] = out[f"slice{n}_s"] * depth, "slices"
    return with_peak_memory(out, device)


def _scaled_note(flag, step: float, n: int) -> str:
    if flag == "slices":
        return f"; extrapolated: per-slice time x {DEPTH} slices, not run"
    if flag:
        return f"; measured 1 step ({step:.1f} s) x {n}, not run in full"
    return ""


def phantom_run_row() -> list[dict]:
    """The model-vs-bicubic PSNR of the documented short CPU run (read from its record, not re-run)."""
    from scripts.benchmarks.common import read_record, row

    rec = read_record(EVAL_RECORD)
    if rec is None:
        return []
    m = rec["means"]
    psnr = {k.split("/")[0]: v["psnr"] for k, v in m.items() if k.endswith("/whole")}
    return [
        row(
            f"ressrdiff PSNR on {m['n_cases']} held-out phantom T2w volumes (x{'x'.join(map(str, rec['factors']))}), "
            f"{rec['iterations']} training iterations",
            f"model {psnr['ressrdiff']:.2f} dB vs bicubic {psnr['bicubic']:.2f} dB (nearest {psnr['nearest']:.2f} dB)",
            rec.get("device", "cpu"),
            f"{rec['note']} (recorded in {EVAL_RECORD.relative_to(EVAL_RECORD.parents[3])} by "
            f"`{rec['command']}`, not re-run here)",
        )
    ]


def _rows(dev: str, preset: str) -> list[dict]:
    from scripts.benchmarks.common import measure_on, row

    res, mem = measure_on(dev, measure, preset, dev)
    batching = "all slices in one batch" if res["chunk"] == 0 else f"{res['chunk']} slice per forward pass"
    out = []
    # (what, its shape, how it is batched, decimals of its seconds)
    for what, shape, how, digits in (("slice", SLICE, "", 2), ("volume", (*SLICE, DEPTH), f", {batching}", 1)):
        for n in STEPS:
            step = res[f"{what}_step_s"]
            out.append(
                row(
                    f"ressrdiff inference, one {'x'.join(map(str, shape))} {what}, {n} steps, {preset} net",
                    f"{res[f'{what}{n}_s']:.{digits}f} s ({step:.2f} s/step)",
                    dev,
                    f"{res['params_m']:.1f}M params{how}; {mem}" + _scaled_note(res[f"{what}{n}_scaled"], step, n),
                )
            )
    return out


def record(
    dataset_dir: str = "data/phantoms/prostate/nifti",
    out: str = "/tmp/ressrdiff_phantom_run",
    iterations: int = 300,
    batch_size: int = 8,
    patch: int = 96,
    lr: float = 5e-4,
    warmup: int = 30,
    back_interpolator: str = "nearest",
    num_samples: int = 1,
) -> dict:
    """Run the documented short CPU training + evaluation and write its record (``EVAL_RECORD``).

    ``python -m scripts.benchmarks.ressrdiff record`` from the repository root, after ``make phantoms``
    (or ``make demo``). The training and evaluation are the bundle's own commands (``monai.bundle.run``),
    with the overrides listed in the record; the record is what :func:`phantom_run_row` reports.
    """
    import time

    from monai.bundle import run as bundle_run

    root = EVAL_RECORD.parents[3]
    configs = root / "bundles" / "ressrdiff" / "configs"
    data, out_dir = (root / dataset_dir).resolve(), Path(out).resolve()
    overrides = dict(
        network_size="small",
        num_workers=0,
        num_iterations=iterations,
        epoch_length=max(1, iterations // 3),
        val_interval=0,
        patch_size=[patch, patch],
        batch_size=batch_size,
        lr=lr,
        warmup_iterations=warmup,
        resume=False,
        back_interpolator=back_interpolator,
    )
    t0 = time.perf_counter()
    bundle_run(
        "training",
        config_file=str(configs / "train.json"),
        logging_file=str(configs / "logging.conf"),
        dataset_dir=str(data),
        output_dir=str(out_dir / "models"),
        **overrides,
    )
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle_run(
        "evaluating",
        config_file=[str(configs / "train.json"), str(configs / "inference.json"), str(configs / "evaluate.json")],
        logging_file=str(configs / "logging.conf"),
        dataset_dir=str(data),
        network_size="small",
        ckpt_path=str(out_dir / "models" / "model.pt"),
        output_dir=str(out_dir / "eval"),
        back_interpolator=back_interpolator,
        num_samples=num_samples,
    )
    t_eval = time.perf_counter() - t0
    from scripts.benchmarks.common import write_record

    rec = write_record(
        EVAL_RECORD,
        out_dir / "eval" / "summary.json",
        command=(
            f"python -m scripts.benchmarks.ressrdiff record --iterations {iterations} --batch_size {batch_size} "
            f"--patch {patch} --lr {lr} --warmup {warmup} --back_interpolator {back_interpolator} "
            f"--num_samples {num_samples}"
        ),
        overrides=overrides,
        iterations=iterations,
        factors=[3, 3, 2],
        num_samples=num_samples,
        train_s=round(t_train, 1),
        eval_s=round(t_eval, 1),
        device="cuda" if torch.cuda.is_available() else "cpu",
        note=f"small net, {iterations} iterations of {batch_size} {patch}x{patch} patches, LR brought onto the HR "
        f"grid with {back_interpolator}, 4 sampling steps, mean of {num_samples} sample(s); "
        f"training {t_train / 60:.1f} min, evaluation {t_eval:.0f} s",
    )
    print(json.dumps(rec, indent=2))
    return rec


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import per_device

    return per_device(_rows) + phantom_run_row()


def cost_case(preset: str, device_name: str, quick: bool = False):
    """The cost table's case (``scripts.benchmarks.cost``): one 320x320x20 volume at the bundle's 4 steps
    (on a CPU 4 slices of the small network, 1 of the paper-sized one, scaled)."""
    from scripts.benchmarks.common import bundle_parser, volume_cost_case

    p = bundle_parser("ressrdiff")
    c = int(p.get_parsed_content("network_def#in_channels")) - int(p.get_parsed_content("inferer#out_channels"))
    steps = int(p.get_parsed_content("num_inference_steps"))
    return volume_cost_case(
        "ressrdiff", (*SLICE, DEPTH), c, steps, preset, device_name, quick, {"small": 4, "paper": 1}
    )


if __name__ == "__main__":
    import fire

    fire.Fire({"record": record, "rows": lambda: print(rows(Path("/tmp")))})
