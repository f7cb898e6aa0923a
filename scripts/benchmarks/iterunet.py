"""iterU-Net: whole-volume inference per case (one 128x128x32 breast volume, the default phantom grid,
4 predicted phases by sliding window) and training iterations per second (2 crops, recursive chain of 4
steps) for the small and paper-sized networks, built from the bundle's configs (untrained: timing only);
plus the recorded short CPU training vs. copying the early phase forward."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPE = (128, 128, 32)
TIMES = [0.0, 85.0, 155.0, 225.0, 295.0, 365.0]
DEMO_RECORD = Path(__file__).resolve().parents[2] / "bundles" / "iterunet" / "docs" / "cpu_run.json"


def measure_inference(preset: str, device_name: str) -> dict:
    from scripts.benchmarks.common import bundle_objects, n_params, timed, warmup_runs, with_peak_memory

    net, inferer, roi = bundle_objects(
        "iterunet",
        "network",
        "inferer",
        "roi_size",
        overrides={"network_size": preset, "device": device_name, "progress": False},
    )
    device = torch.device(device_name)
    net.eval()
    series = torch.randn(1, len(TIMES), *SHAPE, device=device)
    times = torch.tensor([TIMES], device=device)
    out = {"params_m": n_params(net) / 1e6, "roi": list(roi)}
    if preset == "paper" and device.type == "cpu":  # one window's chain, scaled by the window count (and said so)
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        win = [min(r, s) for r, s in zip(roi, SHAPE)]
        n_win = len(dense_patch_slices(SHAPE, win, _get_scan_interval(SHAPE, win, 3, (0.25,) * 3)))
        patch = series[(slice(None), slice(None), *(slice(0, w) for w in win))]
        t = timed(lambda: inferer(patch, net, times), device=device)
        out.update(case_s=t * n_win, scaled=f"1 window {t:.1f} s x {n_win} windows")
    else:
        out.update(
            case_s=timed(lambda: inferer(series, net, times), warmup=warmup_runs(device), device=device),
            scaled="",
        )
    return with_peak_memory(out, device)


def measure_training(preset: str, device_name: str, iters: int = 3) -> dict:
    """Training iterations per second of the recursive stage (``"ips"``; on CUDA also ``"peak_mib"``)."""
    from scripts.benchmarks.common import bundle_objects, training_rate, training_steps

    net, inferer, loss_fn, opt, roi = bundle_objects(
        "iterunet",
        "network",
        "train#inferer",
        "train#loss",
        "train#optimizer",
        "patch_size",
        config="train.json",
        overrides={"network_size": preset, "device": device_name, "stage": "recursive", "init_ckpt": ""},
    )
    device = torch.device(device_name)
    net.train()
    series = torch.randn(2, len(TIMES), *roi, device=device)
    times = torch.tensor([TIMES] * 2, device=device)
    n = training_steps(preset, device, iters)
    rate = training_rate(lambda: loss_fn(inferer(series, net, times), series[:, 2:]), opt, device, n)
    return {**rate, "roi": list(roi)}


def _rows(dev: str, preset: str) -> list[dict]:
    from scripts.benchmarks.common import measure_on, row, training_row

    res, mem = measure_on(dev, measure_inference, preset, dev)
    note = f"{res['params_m']:.1f}M params, windows {res['roi']}, 4 chained steps each; {mem}"
    if res["scaled"]:
        note += f"; {res['scaled']} (not run in full)"
    what = f"iterunet inference, one {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} breast volume -> 4 phases, {preset} net"
    train = training_row(
        dev,
        preset,
        measure_training,
        lambda train: f"iterunet training (recursive stage, 4 steps), 2 crops {train['roi']}, {preset} net",
        "AdamW, 0.1 L1 + SSIM + 0.1 GDL summed over steps",
    )
    return [row(what, f"{res['case_s']:.1f} s / case", dev, note), train]


def demo_row() -> list[dict]:
    """The recorded short CPU training (``bundles/iterunet/docs/cpu_run.json``), not re-run here."""
    from scripts.benchmarks.common import read_record, row

    rec = read_record(DEMO_RECORD)
    if rec is None:
        return []
    k = rec["kinetics"]
    fmt = lambda m: (  # noqa: E731
        f"enh_err {k[m]['enh_err']['mean']:.3g}, DTW {k[m]['dtw']['mean']:.0f}, "
        f"type agreement {k[m]['type_agree']['mean']:.2f}"
    )
    return [
        row(
            f"iterunet lesion kinetics on {rec['n_lesions']} lesions of {rec['n_cases']} held-out breast phantoms "
            f"({rec['iterations']})",
            f"model: {fmt('iterunet')}; copy_forward: {fmt('copy_forward')}",
            rec["device"],
            f"{rec['note']} (recorded in bundles/iterunet/docs/cpu_run.json, not re-run here)",
        )
    ]


def record(eval_dir: str, iterations: str, note: str = "", device: str = "cpu") -> dict:
    """Record a finished evaluation (its ``kinetics_summary.json`` and ``summary.json``) for the table:
    ``python -m scripts.benchmarks.iterunet record --eval_dir <dir> --iterations "..." --note "..."``."""
    import json

    from common.io import save_json

    eval_dir = Path(eval_dir)
    kin = json.loads((eval_dir / "kinetics_summary.json").read_text())
    image = json.loads((eval_dir / "summary.json").read_text())["summary"]
    cases = {r.split("/")[0] for r in (eval_dir / "kinetics.csv").read_text().splitlines()[1:]}
    rec = {
        "iterations": iterations,
        "device": device,
        "note": note,
        "n_cases": len(cases),
        "n_lesions": next(iter(kin["summary"].values()))["dtw"]["n"],
        "kinetics": kin["summary"],
        "confusion": kin["confusion"],
        "wilcoxon": kin["wilcoxon"],
        "lesion_psnr": {k: v["psnr"]["mean"] for k, v in image.items() if k.endswith("/lesion_mask")},
    }
    save_json(rec, DEMO_RECORD)
    return rec


def rows(tmp: Path) -> list[dict]:
    from scripts.benchmarks.common import per_device

    return per_device(_rows) + demo_row()


def cost_case(preset: str, device_name: str, quick: bool = False):
    """The cost table's case (``scripts.benchmarks.cost``): one 128x128x32 breast volume -> its predicted
    phases, one chain step per phase (a step = one forward per sliding window); on a CPU the paper-sized
    network on one window, scaled by the window count."""
    from scripts.benchmarks.common import CostCase, bundle_parser

    start = int(bundle_parser("iterunet").get_parsed_content("start_phase"))
    steps = len(TIMES) - start - 1
    what = f"one {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} volume, {steps} chained phases"
    shape, scale = SHAPE, 1.0
    if quick:
        shape = (32, 32, 16)
    elif preset == "paper" and device_name == "cpu":
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        roi = list(bundle_parser("iterunet", overrides={"network_size": preset}).get_parsed_content("roi_size"))
        shape = tuple(min(r, s) for r, s in zip(roi, SHAPE))
        scale = float(len(dense_patch_slices(SHAPE, shape, _get_scan_interval(SHAPE, shape, 3, (0.25,) * 3))))
    return CostCase("iterunet", what, ((1, len(TIMES), *shape), [TIMES]), steps, scale, respaced=False,
                    overrides={"progress": False})  # fmt: skip


if __name__ == "__main__":
    import fire

    fire.Fire({"record": record})
