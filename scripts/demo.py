"""The project's demo: phantoms -> short ResDCE-diff training -> inference -> metrics vs. baselines.

Runs end to end on a CPU-only machine in a few minutes (small network, few iterations) and on CUDA
when available. Usage (``make demo`` runs it with the defaults)::

    python scripts/demo.py --out demo_output --phantoms data/phantoms [--iterations 300] [--network_size small]
        [--workers 2]  # phantom subjects made in parallel (same data for any value)
        [--lesions learnable]  # prostate lesion settings of the phantoms it writes (and expects when reusing)
        [--crop_label_key lesion_mask] [--crop_pos 3]  # 3 of 4 training crops centred on a lesion voxel ('': uniform)

The phantoms are the project's data set (``make phantoms``): prostate lesions whose ADC, T2w and
kinetics go together (``common.phantoms.prostate.LESION_PRESETS["learnable"]``), so that where the
uptake happens inside a lesion can be learned from the inputs. Phantoms reused from ``--phantoms``
must have been made with the same lesion settings (recorded in each case's manifest).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fire
from monai.bundle import run as bundle_run

from common.errors import install as install_error_hook
from common.io import output_folder
from common.phantoms import DEFAULT_LESIONS, write_phantoms
from common.phantoms.prostate import lesion_preset

ROOT = Path(__file__).resolve().parents[1]

BUNDLE = ROOT / "bundles" / "resdce" / "configs"


def main(
    out: str = "demo_output",
    phantoms: str = "data/phantoms",
    iterations: int = 300,
    network_size: str = "small",
    patch_size: tuple[int, int] = (64, 64),
    crop_label_key: str | None = "lesion_mask",
    crop_pos: float = 3.0,
    lr: float = 5e-4,
    num_inference_steps: int = 15,
    n_prostate: int = 16,
    seed: int = 0,
    workers: int = min(4, os.cpu_count() or 1),
    lesions: str = DEFAULT_LESIONS,
) -> None:
    """Make (or reuse) the phantom data, train ResDCE-diff briefly, synthesise the test subjects and score them."""
    t0 = time.time()
    out_dir, data_dir = (ROOT / out).resolve(), (ROOT / phantoms).resolve()
    output_folder(out_dir, "out")  # a file or read-only folder is named before any work
    prepared = data_dir / "prostate" / "prepared"
    preset = lesion_preset(lesions, "--lesions")
    if not (prepared / "datalist.json").exists():
        print(f"[demo] writing phantoms (prostate with {lesions!r} lesions, brain, breast) to {data_dir}")
        kw = {f"prostate_{k}": v for k, v in preset.items()}
        write_phantoms(data_dir, seed=seed, n_prostate=n_prostate, workers=workers, **kw)
    else:
        check_lesion_settings(prepared, lesions)
        print(f"[demo] reusing phantoms in {data_dir}")
    models = out_dir / "resdce" / "models"
    common = dict(dataset_dir=str(prepared), network_size=network_size, seed=seed)
    print(f"[demo] training ResDCE-diff ({network_size} network, {iterations} iterations) -> {models}")
    bundle_run(
        "training",
        config_file=str(BUNDLE / "train.json"),
        logging_file=str(BUNDLE / "logging.conf"),
        output_dir=str(models),
        num_iterations=iterations,
        epoch_length=max(1, iterations // 4),
        val_interval=4,
        val_num_inference_steps=4,
        val_max_cases=1,
        patch_size=list(patch_size),
        crop_label_key=crop_label_key,
        crop_pos=crop_pos,
        lr=lr,
        num_workers=0,
        resume=False,
        **common,
    )
    eval_dir = out_dir / "resdce" / "eval"
    print(f"[demo] synthesising the held-out subjects ({num_inference_steps} steps) -> {eval_dir}")
    bundle_run(
        "evaluating",
        config_file=[str(BUNDLE / "train.json"), str(BUNDLE / "inference.json"), str(BUNDLE / "evaluate.json")],
        logging_file=str(BUNDLE / "logging.conf"),
        ckpt_path=str(models / "model.pt"),
        output_dir=str(eval_dir),
        num_inference_steps=num_inference_steps,
        **common,
    )
    print_lesion_first(eval_dir / "summary.json")
    print(f"\n[demo] done in {time.time() - t0:.0f} s")
    print(f"[demo] NIfTI outputs and PNG panels: {eval_dir}/<case>/(dce_onset|dce_early|dce_late).nii.gz, panel.png")
    for panel in sorted(eval_dir.glob("*/panel.png")):
        print(f"        {panel}")
    print(f"[demo] metrics: {eval_dir / 'metrics.csv'}, {eval_dir / 'summary.md'}")
    print("[demo] the table above compares the model with the trivial baselines (pre-contrast copied through,")
    print("       paired input copied through); enh_rel_err = 1 means no contrast uptake was learned.")


def check_lesion_settings(prepared: Path, lesions: str) -> None:
    """Refuse, in one line, prepared prostate phantoms whose lesions were not made with the preset
    ``lesions`` (each case's ``manifest.json`` records ``ground_truth.lesion_settings``; phantoms of
    versions before it have none and are the ``uncoupled`` ones). Cases that are not phantoms pass."""
    import json

    from common.layout import MANIFEST

    for case in sorted(p for p in Path(prepared).iterdir() if (p / MANIFEST).is_file()):
        manifest = json.loads((case / MANIFEST).read_text())
        if manifest.get("source") != "phantom":
            continue
        got = manifest.get("ground_truth", {}).get("lesion_settings", {}).get("preset", "uncoupled")
        if got != lesions:
            raise ValueError(
                f"--phantoms: {case} has {got!r} prostate lesions, the demo expects {lesions!r}; write the "
                f"demo's phantoms with `make phantoms` (or delete {Path(prepared).parents[1]} and rerun) or pass "
                f"--lesions {got}"
            )


def print_lesion_first(summary_json: Path, method: str = "resdce", baseline: str = "copy_pre") -> list[str]:
    """Print (and return) the figures that show whether uptake was learned where it happens: inside
    the lesion, then the organ, per phase, the model's PSNR and enhancement correlation next to the
    pre-contrast copy (whole-image PSNR flatters copying the input)."""
    import json

    summary = json.loads(Path(summary_json).read_text())["summary"]
    lines = []
    for region, label in (("lesion_mask", "inside the lesion"), ("organ_mask", "inside the prostate")):
        order = ("dce_onset", "dce_early", "dce_late")
        phases = sorted(
            {k.split("/")[1] for k in summary if k.startswith(f"{method}/") and k.endswith(f"/{region}")},
            key=lambda p: (order.index(p) if p in order else len(order), p),
        )
        for phase in phases:
            m, b = summary.get(f"{method}/{phase}/{region}", {}), summary.get(f"{baseline}/{phase}/{region}", {})
            if not m:
                continue
            corr = m.get("enh_corr", {}).get("mean", float("nan"))
            lines.append(
                f"{label:20s} {phase:6s} PSNR {m['psnr']['mean']:6.2f} dB (copy_pre {b.get('psnr', {}).get('mean', float('nan')):6.2f}), "
                f"enhancement error {m.get('enh_rel_err', {}).get('mean', float('nan')):.2f} (copy_pre 1.00), "
                f"enhancement correlation {corr:+.2f}"
            )
    if lines:
        print("\n[demo] where the contrast uptake is (lesion first):")
        for line in lines:
            print(f"        {line}")
    return lines


if __name__ == "__main__":
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    fire.Fire(main)
