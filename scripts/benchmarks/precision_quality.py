"""Quality at reduced precision, measured: one bundle's evaluation (its ``evaluate.json`` on the
held-out cases, trained weights) run twice, with ``--precision fp32`` and with another precision
(``bf16`` forced by default), and the scores compared per target phase: PSNR and SSIM of the
model's synthesis against the target (mean over the cases, whole image), their difference, and
the relative L2 distance of the two syntheses themselves. Next to it, the yardstick: the same
differences between two fp32 runs that differ only in the sampling seed (the bundle's seed, 0 unless
the overrides set one, and the next; ``--seed_spread false`` skips that third run), i.e. how much the
score moves by chance alone.

    python -m scripts.benchmarks.precision_quality run --bundle <name> --ckpt_path <model.pt> --out <dir> \
        [--precision bf16] [--overrides="--num_inference_steps 20 --sampler ddim"] [--note "..."]

writes ``<dir>/<precision>/`` (the evaluation outputs; ``<dir>/fp32_next_seed/``) and records the comparison in
``bundles/<name>/docs/precision_cpu_run.json`` (bf16; ``precision_cpu_run_fp16.json`` for fp16); ``rows``
reports every bundle's records in the benchmark table (not re-run by ``make bench``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORD = "precision_cpu_run.json"


def record_name(precision: str) -> str:
    """The record's file name in ``docs/``: :data:`RECORD` for bf16 (what ``auto`` runs on bf16 hardware),
    ``precision_cpu_run_<precision>.json`` for another."""
    return RECORD if precision == "bf16" else RECORD.replace(".json", f"_{precision}.json")


def _evaluate(bundle: str, ckpt_path: str, out: Path, precision: str, overrides: str) -> float:
    cfg = [str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json", "evaluate.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", repr(cfg)]
    cmd += ["--ckpt_path", str(ckpt_path), "--output_dir", str(out), "--precision", precision, *shlex.split(overrides)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _next_seed(overrides: str) -> str:
    """``overrides`` with ``--seed`` one higher (the bundles' default seed is 0)."""
    words = shlex.split(overrides)
    if "--seed" in words:
        i = words.index("--seed") + 1
        words[i] = str(int(words[i]) + 1)
        return shlex.join(words)
    return shlex.join([*words, "--seed", "1"])


def _volumes(folder: Path, names: set[str]) -> dict[str, Path]:
    """``{case/file: path}`` of the synthesised volumes (file names from the summary's targets)."""
    return {str(p.relative_to(folder)): p for p in sorted(folder.glob("*/*.nii.gz")) if p.name.split(".")[0] in names}


def compare(ref_dir: str | Path, low_dir: str | Path, method: str) -> dict:
    """Per target phase (whole image): PSNR / SSIM means in each run, their differences, and the relative
    L2 of the low-precision synthesis against the fp32 one (over all cases' voxels)."""
    import nibabel as nib
    import numpy as np

    ref_dir, low_dir = Path(ref_dir), Path(low_dir)
    a = json.loads((ref_dir / "summary.json").read_text())["summary"]
    b = json.loads((low_dir / "summary.json").read_text())["summary"]
    out = {}
    for key, stats in a.items():
        m, *phase, region = key.split("/")
        if m != method or region != "whole" or key not in b:
            continue
        phase = "/".join(phase)
        row = {}
        for metric in ("psnr", "ssim"):
            row[f"{metric}_fp32"], row[f"{metric}_low"] = stats[metric]["mean"], b[key][metric]["mean"]
            row[f"{metric}_diff"] = row[f"{metric}_low"] - row[f"{metric}_fp32"]
        row["n"] = stats["psnr"]["n"]
        vols = _volumes(ref_dir, {phase})
        num = den = 0.0
        for rel, p in vols.items():
            x = np.asarray(nib.load(p).dataobj, dtype=np.float64)
            y = np.asarray(nib.load(low_dir / rel).dataobj, dtype=np.float64)
            num, den = num + float(((y - x) ** 2).sum()), den + float((x**2).sum())
        row["rel_l2"] = (num / den) ** 0.5 if den else None
        out[phase] = row
    return out


def run(
    bundle: str,
    ckpt_path: str,
    out: str,
    precision: str = "bf16",
    overrides: str = "",
    note: str = "",
    method: str = "",
    seed_spread: bool = True,
) -> dict:
    """Evaluate ``bundle`` with ``ckpt_path`` in fp32 and in ``precision``, compare, record (see the module doc)."""
    from common.io import save_json
    from scripts.benchmarks.common import cpu_model

    if not isinstance(overrides, str):  # fire reads `--overrides --id v` as a flag followed by other options
        raise SystemExit('error: --overrides needs its value after "=": --overrides="--id value ..."')
    out_dir = Path(out).resolve()
    secs = {p: _evaluate(bundle, ckpt_path, out_dir / p, p, overrides) for p in ("fp32", precision)}
    spread_dir = out_dir / "fp32_next_seed"
    if seed_spread:
        secs["fp32, next seed"] = _evaluate(bundle, ckpt_path, spread_dir, "fp32", _next_seed(overrides))
    summary = json.loads((out_dir / precision / "summary.json").read_text())
    rec = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu_model(),
        "precision": precision,
        "precision_recorded": summary.get("precision"),
        "overrides": overrides,
        "note": note,
        "seconds": secs,
        "phases": compare(out_dir / "fp32", out_dir / precision, method or bundle),
    }
    if seed_spread:  # the same differences between two fp32 runs with other seeds: chance alone
        rec["seed_spread"] = compare(out_dir / "fp32", spread_dir, method or bundle)
    save_json(rec, ROOT / "bundles" / bundle / "docs" / record_name(precision))
    print(json.dumps(rec, indent=1))
    return rec


def _cases(n: int) -> str:
    return f"{n} held-out phantom case" + ("s" if n != 1 else "")


def _differences(phases: dict) -> str:
    """Per phase: PSNR and SSIM differences and the relative L2 (where computed), as the table prints them."""
    return "; ".join(
        f"{p}: {v['psnr_diff']:+.3f} dB, SSIM {v['ssim_diff']:+.4f}"
        + (f", rel. L2 {v['rel_l2']:.1e}" if v.get("rel_l2") is not None else "")
        for p, v in phases.items()
    )


def rows(tmp: Path) -> list[dict]:
    """Every bundle's recorded comparisons (``bundles/*/docs/precision_cpu_run*.json``), not re-run."""
    from scripts.benchmarks.common import row

    out = []
    for rec_path in sorted((ROOT / "bundles").glob(f"*/docs/{RECORD.replace('.json', '*.json')}")):
        rec = json.loads(rec_path.read_text())
        ph = rec["phases"]
        value = _differences(ph)
        if rec.get("seed_spread"):
            value += f" (fp32 with another seed: {_differences(rec['seed_spread'])})"
        out.append(
            row(
                f"{rec_path.parts[-3]} {rec['precision']} vs fp32 synthesis, per phase (whole image, "
                f"{_cases(next(iter(ph.values()))['n'])})",
                value,
                "cpu",
                f"{rec['note']}; {rec['cpu']}, {rec['date']} (recorded in {rec_path.relative_to(ROOT)}, not re-run here)",
            )
        )
    return out


if __name__ == "__main__":
    import fire

    fire.Fire({"run": run, "compare": compare})
