"""The ressrdiff (Res-SRDiff) bundle end to end on tiny phantoms, through the command line a user types,
and the datalist maker for a folder of volumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import bundle, bundle_here, check_bundle_configs, train_two_processes
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "ressrdiff" / "configs"
EVAL = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """Three tiny oblique prostate phantoms; the HR T2w volumes are ``nifti/<sid>/t2w.nii.gz`` (64x64x18)."""
    from common.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("sr_phantoms")
    write_phantoms(
        out,
        kinds=("prostate",),
        n_prostate=3,
        dicom=False,
        small=True,
        progress=False,
        prostate_t2w_shape=(64, 64, 18),
        prostate_t2w_spacing=(4.0, 4.6, 3.6),
    )
    return out / "prostate" / "nifti"


def test_configs_parse_with_the_documented_ids():
    check_bundle_configs(
        CONFIGS,
        (
            (
                ["train.json"],
                [
                    "training",
                    "run",
                    "train#trainer",
                    "train#lr_scheduler",
                    "train#loss",
                    "validate#evaluator",
                    "scheduler",
                    "network_def",
                    "preprocessing",
                ],
            ),
            (["train.json", "multi_gpu_train.json"], ["training", "network", "train#data_sampler"]),
            (
                ["inference.json", "evaluate.json"],
                ["evaluating", "run", "evaluator", "inferer", "datalist", "postprocessing"],
            ),
        ),
    )
    p = ConfigParser()
    p.read_config(str(CONFIGS / "train.json"))
    p["network_size"] = "small"
    assert p.get_parsed_content("bundle_root") == str(ROOT / "bundles" / "ressrdiff")
    # the paper's schedule: kappa = 2, p = 0.3, kappa * sqrt(eta_1) = 0.04, sqrt(eta_T) = 0.99, T = 15
    sched = p.get_parsed_content("scheduler")
    assert sched.num_train_timesteps == 15 and sched.kappa == 2.0
    assert float(sched.sqrt_etas[0]) * sched.kappa == pytest.approx(0.04)
    assert float(sched.sqrt_etas[-1]) == pytest.approx(0.99)
    net = p.get_parsed_content("network_def")
    assert net.in_channels == 2 and net.out_channels == 1
    p = ConfigParser()
    p.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json")])
    p["network_size"] = "small"
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
    bundle(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(volumes),
        "--output_dir",
        str(models),
        "--network_size",
        "small",
        "--num_workers",
        "0",
        "--num_iterations",
        "2",
        "--epoch_length",
        "1",
        "--val_interval",
        "2",
        "--val_num_inference_steps",
        "2",
        "--val_max_cases",
        "1",
        "--batch_size",
        "4",
        "--warmup_iterations",
        "1",
    )
    assert (models / "model.pt").exists() and (models / "checkpoints" / "checkpoint_final.pt").exists()
    state = torch.load(models / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and "lr_scheduler" in state
    # the same command with more iterations resumes where it stopped (from another working directory)
    res = bundle(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(volumes),
        "--output_dir",
        str(models),
        "--network_size",
        "small",
        "--num_workers",
        "0",
        "--num_iterations",
        "3",
        "--epoch_length",
        "1",
        "--val_interval",
        "0",
        "--batch_size",
        "4",
        "--warmup_iterations",
        "1",
        cwd=tmp_path,
    )
    assert "Restored all variables" in res.stdout + res.stderr
    state = torch.load(models / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 and state["lr_scheduler"]["last_epoch"] == 3
    res = bundle(
        "run",
        "evaluating",
        "--config_file",
        EVAL,
        "--dataset_dir",
        str(volumes),
        "--ckpt_path",
        str(models / "model.pt"),
        "--output_dir",
        str(out),
        "--network_size",
        "small",
        cwd=tmp_path,
    )
    assert "bicubic" in res.stdout and "ressrdiff" in res.stdout  # the table is printed with the baselines
    (cid,) = [p.name for p in out.iterdir() if p.is_dir()]
    hr = nib.load(volumes / cid / "t2w.nii.gz")
    sr = nib.load(out / cid / "sr.nii.gz")
    assert sr.shape == hr.shape and np.array_equal(sr.affine, hr.affine)
    assert np.isfinite(sr.get_fdata()).all() and (out / cid / "panel.png").exists()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
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
    bundle(
        "run",
        "evaluating",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--input_file",
        str(lr_file),
        "--simulate_lr",
        "false",
        "--ckpt_path",
        str(models / "model.pt"),
        "--output_dir",
        str(tmp_path / "real"),
        "--network_size",
        "small",
    )
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
    bundle_here(
        "run",
        "evaluating",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--dataset_dir",
        str(paired),
        "--simulate_lr",
        "false",
        "--lr_reference_key",
        "hr",
        "--ckpt_path",
        str(models / "model.pt"),
        "--output_dir",
        str(tmp_path / "paired_out"),
        "--network_size",
        "small",
        "--num_inference_steps",
        "1",
    )
    on_ref = nib.load(tmp_path / "paired_out" / "pair" / "sr.nii.gz")
    assert on_ref.shape == hr.shape
    np.testing.assert_array_equal(on_ref.affine, hr.affine)


def test_multi_gpu_config_trains_with_two_processes_on_cpu(volumes, tmp_path):
    train_two_processes(
        CONFIGS,
        tmp_path / "ddp",
        "--dataset_dir",
        str(volumes),
        "--network_size",
        "small",
        "--num_workers",
        "0",
        "--val_interval",
        "2",
        "--val_num_inference_steps",
        "2",
        "--val_max_cases",
        "1",
        "--batch_size",
        "4",
        "--warmup_iterations",
        "1",
    )


def test_brain_t1_phantoms_with_fourfold_degradation(tmp_path):
    """The paper's second data set: brain T1 down-sampled 4-fold in each direction, read through the
    BraTS-named phantoms' ``datalist.json`` (``--volume_key t1n``); SR written on the T1 grid."""
    from common.phantoms import write_phantoms
    from common.transforms.degrade import simulate_low_resolution

    brain = tmp_path / "phantoms" / "brain"
    write_phantoms(tmp_path / "phantoms", kinds=("brain",), n_brain=3, small=True, progress=False)
    data = ["--dataset_dir", str(brain), "--volume_key", "t1n", "--factors", "[4,4,4]"]
    models, out = tmp_path / "models", tmp_path / "eval"
    bundle_here(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        *data,
        "--output_dir",
        str(models),
        "--network_size",
        "small",
        "--num_workers",
        "0",
        "--num_iterations",
        "1",
        "--epoch_length",
        "1",
        "--val_interval",
        "0",
        "--batch_size",
        "2",
        "--warmup_iterations",
        "1",
    )
    res = bundle_here(
        "run",
        "evaluating",
        "--config_file",
        EVAL,
        *data,
        "--ckpt_path",
        str(models / "model.pt"),
        "--output_dir",
        str(out),
        "--network_size",
        "small",
        "--num_inference_steps",
        "1",
    )
    assert "bicubic" in res.stdout
    test_case = json.loads((brain / "datalist.json").read_text())["test"][0]
    hr = nib.load(brain / test_case["t1n"])
    sr = nib.load(out / test_case["id"] / "sr.nii.gz")
    assert sr.shape == hr.shape == (48, 56, 44)
    np.testing.assert_array_equal(sr.affine, hr.affine)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
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
