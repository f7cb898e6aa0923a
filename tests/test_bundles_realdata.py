"""Every bundle end to end on the real study ProstateX-0218 as the ingest prepares it.

Quality is not expected from one training iteration; what is asserted is that the user's commands
run on real data (train -> inference -> evaluation) and that every output carries the exact
geometry of the input it came from (oblique; the native 320 x 320 x 20 T2w grid for super-resolution). Skipped with a
reason when ``../shared`` is absent (see ``conftest.prepared_prostatex``).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT, SMALL, assert_same_grid, bundle_here, evaluate, final_checkpoint, read_csv, train

pytestmark = pytest.mark.realdata

BUNDLES = ROOT / "bundles"
TINY = [*SMALL, "--val_interval", "0", "--batch_size", "2"]


def _assert_same_grid(out_file, ref_file):
    ref = nib.load(ref_file)
    assert_same_grid(out_file, ref, shape=ref.shape[:3])
    rot = ref.affine[:3, :3]
    assert np.abs(rot - np.diag(np.diag(rot))).sum() > 1e-3  # ProstateX-0218 is oblique, and so are the outputs


@pytest.mark.parametrize(
    "name, phases, extra",
    [
        ("resdce", ["dce_onset", "dce_early", "dce_late"], ["--num_inference_steps", "1"]),
        ("dcediff", ["dce_early", "dce_late"], ["--sampler", "ddim", "--num_inference_steps", "1"]),
    ],
)
def test_dce_bundle_on_prostatex(prepared_prostatex, tmp_path, name, phases, extra):
    data, case = prepared_prostatex["out"], prepared_prostatex["case"]
    models, out, configs = tmp_path / "models", tmp_path / "eval", BUNDLES / name / "configs"
    crops = ("--dataset_dir", str(data), "--patch_size", "[96,96]")
    train(configs, models, *crops, *TINY, iterations=1, runner=bundle_here)
    final_checkpoint(models, 1)
    # the single prepared case is in the training section: evaluate it there
    where = ("--dataset_dir", str(data), "--datalist_section", "training", "--network_size", "small")
    res = evaluate(configs, models / "model.pt", out, *where, *extra, runner=bundle_here)
    assert "copy_pre" in res.stdout
    for phase in phases:
        _assert_same_grid(out / case.name / f"{phase}.nii.gz", case / "dce_pre.nii.gz")
    assert (out / case.name / "panel.png").stat().st_size > 10_000
    rows = read_csv(out / "metrics.csv")
    assert {r["method"] for r in rows} >= {name, "copy_pre"}
    assert {r["phase"] for r in rows} == set(phases)


def test_ressrdiff_on_the_native_prostatex_t2w(prepared_prostatex, tmp_path):
    data, case = prepared_prostatex["out"], prepared_prostatex["case"]
    t2w = case / "native" / "t2w.nii.gz"
    assert nib.load(t2w).shape == (320, 320, 20)
    models, out, configs = tmp_path / "models", tmp_path / "eval", BUNDLES / "ressrdiff" / "configs"
    # the HR volumes of a folder of studies: glob the native T2w (not the datalist's cropped DCE-grid T2w)
    native = ("--dataset_dir", str(data), "--datalist_file", "", "--volume_pattern", "*/native/t2w.nii.gz")
    patches = ("--patch_size", "[96,96]", "--slices_per_volume", "2", "--warmup_iterations", "1")
    train(configs, models, *native, *patches, *TINY, iterations=1, runner=bundle_here)
    one = ("--input_file", str(t2w), "--input_id", case.name, "--network_size", "small", "--num_inference_steps", "1")
    res = evaluate(configs, models / "model.pt", out, *one, runner=bundle_here)
    assert "bicubic" in res.stdout
    _assert_same_grid(out / case.name / "sr.nii.gz", t2w)
    rows = read_csv(out / "metrics.csv")
    by = {r["method"]: float(r["psnr"]) for r in rows}
    assert set(by) == {"ressrdiff", "bicubic", "nearest"}
    assert by["nearest"] < by["bicubic"]  # the baselines on the real T2w, 3x3x2 down-sampling
