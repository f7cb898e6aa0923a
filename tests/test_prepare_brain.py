"""scripts/prepare_brain.py: raw brain contrasts on their own grids -> one BraTS-layout case on the T1 grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.ingest.register import RegistrationSettings

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT.parent / "shared" / "data" / "brain" / "TCGA-FG-6692"
CONFIGS = ROOT / "bundles" / "d3m" / "configs"
FAST = dict(
    shrink_factors=(4, 2), smoothing_sigmas=(2.0, 1.0), iterations=60, max_translation_mm=25.0, max_rotation_deg=20.0
)


def test_a_shifted_contrast_is_registered_back_onto_the_t1_grid(tmp_path):
    from common.ingest.brain import check_same_grid, prepare_brain_case
    from common.phantoms.brain import make_brain_phantom

    ph = make_brain_phantom(seed=[0, 1, 0], shape=(48, 56, 44))
    raw = tmp_path / "raw"
    raw.mkdir()
    shift = np.eye(4)
    shift[:3, 3] = [4.0, -3.0, 2.0]  # T2 "acquired" with the head 4, -3, 2 mm away
    for name, key, aff in (
        ("t1", "t1n", ph.affine),
        ("t2", "t2w", shift @ ph.affine),
        ("flair", "t2f", ph.affine),
        ("t1c", "t1c", ph.affine),
    ):
        nib.save(nib.Nifti1Image(ph.images[key].astype(np.float32), aff), str(raw / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(ph.seg, ph.affine), str(raw / "seg.nii.gz"))
    res = prepare_brain_case(
        raw / "t1.nii.gz",
        raw / "t2.nii.gz",
        raw / "flair.nii.gz",
        tmp_path / "out",
        "case0",
        t1c=raw / "t1c.nii.gz",
        seg=raw / "seg.nii.gz",
        settings=RegistrationSettings(**FAST),
    )
    check_same_grid(res["files"])
    for k in ("t1n", "t2w", "t2f", "t1c", "seg"):
        assert np.array_equal(nib.load(res["files"][k]).affine, nib.load(raw / "t1.nii.gz").affine)
    # ITK (LPS) translation of a RAS shift (4, -3, 2) mm is (-4, 3, 2) mm, fixed -> moving
    assert np.allclose(res["registration"]["t2w"]["translation_mm"], [-4.0, 3.0, 2.0], atol=0.5)
    t2 = nib.load(res["files"]["t2w"]).get_fdata()
    inner = (slice(6, -6),) * 3
    assert np.corrcoef(t2[inner].ravel(), ph.images["t2w"][inner].ravel())[0, 1] > 0.97
    assert np.array_equal(nib.load(res["files"]["seg"]).get_fdata(), ph.seg)
    with pytest.raises(FileNotFoundError, match="flair file"):
        prepare_brain_case(raw / "t1.nii.gz", raw / "t2.nii.gz", raw / "none.nii.gz", tmp_path / "o2", "c")


@pytest.mark.realdata
@pytest.mark.slow
def test_real_study_prepared_then_sampled_on_the_t1_grid(tmp_path):
    if not STUDY.exists():
        pytest.skip(f"real brain study not found at {STUDY} (../shared is not beside the repo)")
    from helpers import assert_same_grid, bundle_here, evaluate, parser

    from common.ingest.brain import check_same_grid, prepare_brain_case

    res = prepare_brain_case(
        STUDY / "t1.nii.gz",
        STUDY / "t2.nii.gz",
        STUDY / "flair.nii.gz",
        tmp_path / "brain",
        "TCGA-FG-6692",
        t1c=STUDY / "t1c.nii.gz",
        settings=RegistrationSettings(**{**FAST, "iterations": 30, "sampling_percentage": 0.05}),
    )
    check_same_grid(res["files"])
    src = nib.load(STUDY / "t1.nii.gz")
    # untrained small network from the bundle's own config: geometry and plumbing, not quality
    p = parser(CONFIGS, "train.json", "inference.json", network_size="small")
    ckpt = tmp_path / "model.pt"
    torch.save(p.get_parsed_content("network_def").state_dict(), ckpt)
    out = tmp_path / "out"
    case = ("--case_dir", str(tmp_path / "brain" / "TCGA-FG-6692"), "--network_size", "small")
    # one step (26 slices of 256 x 224: ~25 s a step on one loaded core), cropped to the brain's box: the crop
    # path on a real grid (test_synthesize_brain runs the default, uncropped one on this study)
    settings = ("--num_inference_steps", "1", "--crop_to_brain", "true", "--device", "cpu")
    evaluate(CONFIGS, ckpt, out, *case, *settings, files=["train.json", "inference.json"], runner=bundle_here)
    assert_same_grid(out / "TCGA-FG-6692" / "t1c.nii.gz", src)
    assert np.array_equal(nib.load(out / "TCGA-FG-6692" / "et_mask.nii.gz").affine, src.affine)
