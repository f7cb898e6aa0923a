"""The ressrdiff (Res-SRDiff) bundle end to end on tiny phantoms, through the command line a user types,
and the datalist maker for a folder of volumes."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "ressrdiff" / "configs"
INFER = "inference.json"  # stacked on train.json (files=[*TRAIN_FIRST, ...])
TINY = [*h.SMALL, "--batch_size", "4", "--warmup_iterations", "1"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """Three tiny oblique prostate phantoms; the HR T2w volumes are ``nifti/<sid>/t2w.nii.gz`` (64x64x18)."""
    shape = dict(prostate_t2w_shape=(64, 64, 18), prostate_t2w_spacing=(4.0, 4.6, 3.6))
    return h.tiny_phantoms(tmp_path_factory.mktemp("sr_phantoms"), "prostate", 3, "nifti", **shape)


def test_configs_parse_with_the_documented_ids():
    h.check_bundle_configs(
        CONFIGS,
        train=["train#lr_scheduler", "train#loss", "scheduler", "preprocessing"],
        evaluate=["datalist", "postprocessing"],
    )
    p = h.parser(CONFIGS, "train.json", network_size="small")
    # the paper's schedule: kappa = 2, p = 0.3, kappa * sqrt(eta_1) = 0.04, beta_T = eta_T = 0.9999, T = 15
    sched = p.get_parsed_content("scheduler")
    assert sched.num_train_timesteps == 15 and sched.kappa == 2.0
    assert float(sched.sqrt_etas[0]) * sched.kappa == pytest.approx(0.04)
    assert float(sched.sqrt_etas[-1]) == pytest.approx(0.9999**0.5, rel=1e-12)
    net = p.get_parsed_content("network_def")
    assert net.in_channels == 2 and net.out_channels == 1
    p = h.parser(CONFIGS, "train.json", "inference.json", "evaluate.json", network_size="small")
    assert p["num_inference_steps"] == 4 and p["baseline_interpolators"] == ["bicubic", "nearest"]
    sampler = p.get_parsed_content("slice_inferer")
    sampler.scheduler.set_timesteps(4)
    assert sampler.scheduler.timesteps.tolist() == [14, 9, 5, 0]


def test_volume_datalist_is_a_deterministic_split(tmp_path):
    from common.data.volumes import find_volumes, volume_datalist, volume_or_datalist

    for i in range(10):
        (tmp_path / f"case{i:02d}").mkdir()
        (tmp_path / f"case{i:02d}" / "t2w.nii.gz").write_bytes(b"")
    (tmp_path / "case03" / "adc.nii.gz").write_bytes(b"")  # not matched by the pattern
    sections = {s: volume_datalist(tmp_path, s, key="t2w") for s in ("training", "validation", "test")}
    ids = [e["id"] for s in sections.values() for e in s]
    assert sorted(ids) == [f"case{i:02d}" for i in range(10)]  # every volume once, ids = folder names
    assert [len(v) for v in sections.values()] == [8, 1, 1]
    assert all(
        Path(e["t2w"]).is_absolute() and e["t2w"].endswith(f"{e['id']}/t2w.nii.gz") for e in sections["training"]
    )
    # same split whatever order the files come in, and another seed gives another split
    assert volume_datalist(tmp_path, "test", key="t2w") == sections["test"]
    other = [volume_datalist(tmp_path, "test", key="t2w", seed=s)[0]["id"] for s in range(1, 6)]
    assert any(i != sections["test"][0]["id"] for i in other)
    # a flat folder: ids are the file names; a datalist.json in the folder wins over the glob
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in ("a", "b", "c"):
        (flat / f"{n}.nii.gz").write_bytes(b"")
    assert sorted(find_volumes(flat, "*.nii.gz")) == ["a", "b", "c"]
    (tmp_path / "datalist.json").write_text(
        json.dumps({"training": [{"id": "x", "t2w": "case00/t2w.nii.gz"}], "validation": [], "test": []})
    )
    assert volume_datalist(tmp_path, "training", key="t2w") == [
        {"id": "x", "t2w": str(tmp_path / "case00" / "t2w.nii.gz")}
    ]
    assert len(volume_datalist(tmp_path, "training", key="t2w", datalist_file="")) == 8
    with pytest.raises(ValueError, match="--datalist_section training"):
        volume_datalist(tmp_path, "test", key="t2w")
    with pytest.raises(KeyError, match="--volume_key"):
        volume_datalist(tmp_path, "training", key="t1n")
    with pytest.raises(FileNotFoundError, match="make_phantoms"):
        volume_datalist(tmp_path / "missing", "training")
    one = volume_or_datalist(tmp_path / "case05" / "t2w.nii.gz", tmp_path, "test", key="t2w")
    assert one == [{"id": "case05", "t2w": str(tmp_path / "case05" / "t2w.nii.gz")}]


def test_train_infer_evaluate_with_baselines(volumes, tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    data = ("--dataset_dir", str(volumes))
    h.train(CONFIGS, models, *data, "--val_interval", "2", *h.TINY_VAL, *TINY)
    assert "lr_scheduler" in h.final_checkpoint(models, 2)
    # the same command with more iterations resumes where it stopped (from another working directory)
    h.assert_restored(
        h.train(CONFIGS, models, *data, "--val_interval", "0", *TINY, iterations=3, cwd=tmp_path, runner=h.bundle_here)
    )
    assert h.final_checkpoint(models, 3)["lr_scheduler"]["last_epoch"] == 3
    ckpt = models / "model.pt"
    res = h.evaluate(CONFIGS, ckpt, out, *data, "--network_size", "small", cwd=tmp_path, runner=h.bundle_here)
    assert "bicubic" in res.stdout and "ressrdiff" in res.stdout  # the table is printed with the baselines
    (cid,) = [p.name for p in out.iterdir() if p.is_dir()]
    hr = nib.load(volumes / cid / "t2w.nii.gz")
    h.assert_same_grid(out / cid / "sr.nii.gz", hr)
    assert (out / cid / "panel.png").exists()
    rows = h.read_csv(out / "metrics.csv")
    assert {r["method"] for r in rows} == {"ressrdiff", "bicubic", "nearest"}
    assert all(r["case"] == cid for r in rows) and {"psnr", "ssim", "gmsd"} <= set(rows[0])
    by = {r["method"]: float(r["psnr"]) for r in rows}
    assert 10 < by["nearest"] < by["bicubic"] < 60  # cubic interpolation beats nearest on the same LR volume

    # a real low-resolution acquisition: no HR, brought onto the finer grid by the factors
    from common.transforms.degrade import high_resolution_grid, simulate_low_resolution

    res_lr = simulate_low_resolution(hr.get_fdata(dtype=np.float32), hr.affine, factors=(3, 3, 2))
    lr_file = tmp_path / "lr" / "t2w_lr.nii.gz"
    lr_file.parent.mkdir()
    nib.save(nib.Nifti1Image(res_lr.lr, res_lr.lr_affine), lr_file)
    real = (
        "--input_file",
        str(lr_file),
        "--simulate_lr",
        "false",
        "--network_size",
        "small",
        "--num_inference_steps",
        "1",
    )
    h.evaluate(CONFIGS, ckpt, tmp_path / "real", *real, files=["train.json", INFER], runner=h.bundle_here)
    up = nib.load(tmp_path / "real" / "t2w_lr" / "sr.nii.gz")
    affine, shape = high_resolution_grid(nib.load(lr_file).affine, res_lr.lr.shape, (3, 3, 2))
    assert up.shape == shape == (66, 66, 18)
    np.testing.assert_allclose(up.affine, affine, atol=1e-4)
    np.testing.assert_allclose(up.affine[:3, :3], hr.affine[:3, :3], atol=1e-4)  # the HR voxel size and direction

    # the same real LR volume listed with an HR reference whose grid it is brought onto (--lr_reference_key)
    paired = tmp_path / "paired"
    paired.mkdir()
    (paired / "datalist.json").write_text(
        json.dumps(
            {
                "training": [],
                "validation": [],
                "test": [{"id": "pair", "t2w": str(lr_file), "hr": str(volumes / cid / "t2w.nii.gz")}],
            }
        )
    )
    on_hr = ("--dataset_dir", str(paired), "--simulate_lr", "false", "--lr_reference_key", "hr")
    steps = ("--network_size", "small", "--num_inference_steps", "1")
    h.evaluate(
        CONFIGS, ckpt, tmp_path / "paired_out", *on_hr, *steps, files=["train.json", INFER], runner=h.bundle_here
    )
    on_ref = nib.load(tmp_path / "paired_out" / "pair" / "sr.nii.gz")
    assert on_ref.shape == hr.shape
    np.testing.assert_array_equal(on_ref.affine, hr.affine)


def test_multi_gpu_config_trains_with_two_processes_on_cpu(volumes, tmp_path):
    h.train_two_processes(
        CONFIGS, tmp_path / "ddp", "--dataset_dir", str(volumes), "--val_interval", "2", *h.TINY_VAL, *TINY
    )


def test_brain_t1_phantoms_with_fourfold_degradation(tmp_path):
    """The paper's second data set: brain T1 down-sampled 4-fold in each direction, read through the
    BraTS-named phantoms' ``datalist.json`` (``--volume_key t1n``); SR written on the T1 grid."""
    from common.transforms.degrade import simulate_low_resolution

    brain = h.tiny_phantoms(tmp_path / "phantoms", "brain", 3)
    data = ["--dataset_dir", str(brain), "--volume_key", "t1n", "--factors", "[4,4,4]"]
    models, out = tmp_path / "models", tmp_path / "eval"
    once = ("--val_interval", "0", "--batch_size", "2", "--warmup_iterations", "1")
    h.train(CONFIGS, models, *data, *h.SMALL, *once, iterations=1, runner=h.bundle_here)
    settings = ("--network_size", "small", "--num_inference_steps", "1")
    res = h.evaluate(CONFIGS, models / "model.pt", out, *data, *settings, runner=h.bundle_here)
    assert "bicubic" in res.stdout
    test_case = h.held_out(brain)[0]
    hr = nib.load(brain / test_case["t1n"])
    sr = nib.load(out / test_case["id"] / "sr.nii.gz")
    assert sr.shape == hr.shape == (48, 56, 44)
    np.testing.assert_array_equal(sr.affine, hr.affine)
    rows = h.read_csv(out / "metrics.csv")
    assert {(r["case"], r["method"]) for r in rows} == {
        (test_case["id"], m) for m in ("ressrdiff", "bicubic", "nearest")
    }
    # the nearest baseline is exactly the 4x4x4 LR volume brought back to the T1 grid: recompute its PSNR
    vol = hr.get_fdata(dtype=np.float32)
    lr = simulate_low_resolution(vol, hr.affine, factors=(4, 4, 4))
    assert lr.lr.shape == (12, 14, 11)
    assert lr.upsampled.shape == vol.shape
    from skimage.metrics import peak_signal_noise_ratio

    from common.handlers.metrics import target_range

    lo, scale = target_range(vol)
    expected = peak_signal_noise_ratio((vol - lo) / scale, (lr.upsampled - lo) / scale, data_range=1.0)
    by = {r["method"]: float(r["psnr"]) for r in rows}
    assert by["nearest"] == pytest.approx(expected, abs=0.01)
    assert by["nearest"] < by["bicubic"]
