"""The d3m bundle end to end on tiny brain phantoms, through the command line a user types."""

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
CONFIGS = ROOT / "bundles" / "d3m" / "configs"
TINY = [
    "--network_size",
    "small",
    "--num_workers",
    "0",
    "--val_num_inference_steps",
    "2",
    "--val_max_cases",
    "1",
    "--spatial_size",
    "[64,64]",
    "--batch_size",
    "4",
    "--slices_per_volume",
    "2",
]
EVAL = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from common.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, kinds=("brain",), n_brain=4, small=True, progress=False)
    return out / "brain"


def test_configs_parse_and_share_their_blocks():
    check_bundle_configs(
        CONFIGS,
        (
            (
                ["train.json"],
                [
                    "training",
                    "run",
                    "train#trainer",
                    "train#inferer",
                    "validate#inferer",
                    "validate#evaluator",
                    "scheduler",
                    "network_def",
                    "preprocessing",
                    "train#preprocessing",
                    "et_labels",
                ],
            ),
            (["train.json", "multi_gpu_train.json"], ["training", "network", "train#data_sampler"]),
            (["inference.json", "evaluate.json"], ["evaluating", "run", "evaluator", "inferer", "postprocessing"]),
        ),
    )
    train, infer = (json.loads((CONFIGS / f).read_text()) for f in ("train.json", "inference.json"))
    for key in (
        "input_keys",
        "target_key",
        "seg_key",
        "et_labels",
        "tumour_labels",
        "percentiles",
        "network_size",
        "dual_decoder",
        "deformation",
        "network_def",
        "scheduler",
        "num_train_timesteps",
        "preprocessing",
    ):
        assert json.dumps(train[key]) == json.dumps(infer[key]), key
    assert (
        train["et_labels"] == [3] and train["lr"] == 8e-5 and infer["num_inference_steps"] == 250 and infer["eta"] == 0
    )
    p = ConfigParser()
    p.read_config(str(CONFIGS / "train.json"))
    assert p.get_parsed_content("bundle_root") == str(ROOT / "bundles" / "d3m")
    s = p.get_parsed_content("scheduler")
    assert s.alphas_cumprod.dtype == torch.float64 and s.prediction_type == "v_prediction"


def test_train_infer_evaluate(phantoms, tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    bundle(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--num_iterations",
        "2",
        "--epoch_length",
        "1",
        "--val_interval",
        "2",
        "--dataset_dir",
        str(phantoms),
        "--output_dir",
        str(models),
        *TINY,
    )
    state = torch.load(models / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and (models / "model.pt").exists()
    assert any(k.startswith("displacement.") for k in state["model"]) and any(
        "mask_up_blocks" in k for k in state["model"]
    )
    bundle(
        "run",
        "evaluating",
        "--config_file",
        EVAL,
        "--dataset_dir",
        str(phantoms),
        "--ckpt_path",
        str(models / "model.pt"),
        "--output_dir",
        str(out),
        "--network_size",
        "small",
        "--num_inference_steps",
        "2",
    )
    (case,) = json.loads((phantoms / "datalist.json").read_text())["test"]
    cid = case["id"]
    src = nib.load(phantoms / case["t1n"])
    t1c = nib.load(out / cid / "t1c.nii.gz")
    assert t1c.shape == src.shape and np.array_equal(t1c.affine, src.affine) and np.isfinite(t1c.get_fdata()).all()
    et = nib.load(out / cid / "et_mask.nii.gz")
    assert (
        et.get_data_dtype() == np.uint8
        and np.array_equal(et.affine, src.affine)
        and set(np.unique(et.get_fdata())) <= {0, 1}
    )
    u = nib.load(out / cid / "deformation.nii.gz")
    assert u.shape == (*src.shape, 2) and np.array_equal(u.affine, src.affine)
    assert (out / cid / "panel.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["method"] for r in rows} == {"d3m", "copy_t1n"} and {r["region"] for r in rows} == {
        "whole",
        "brain",
        "tumour",
    }
    (mask_row,) = list(csv.DictReader(open(out / "mask_metrics.csv")))
    assert 0.0 <= float(mask_row["dice_et"]) <= 1.0
    seg = nib.load(phantoms / case["seg"]).get_fdata()
    assert float(mask_row["true_ml"]) == pytest.approx(
        (seg == 3).sum() * abs(np.linalg.det(src.affine[:3, :3])) / 1000, rel=1e-5
    )
    assert "wilcoxon" in json.loads((out / "summary.json").read_text())
    assert "dice_et" in (out / "summary.md").read_text()
    assert not any(p.name == "t1c.nii.gz" for p in phantoms.rglob("*"))  # nothing written into the data

    # the paper's ablations as overrides (each trained for one iteration, then sampled and scored)
    for flag, name in (("--deformation", "d3m_no_mssdm"), ("--dual_decoder", "d3m_no_dsimd")):
        m = tmp_path / name
        bundle_here(
            "run",
            "training",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--num_iterations",
            "1",
            "--epoch_length",
            "1",
            "--val_interval",
            "0",
            "--dataset_dir",
            str(phantoms),
            "--output_dir",
            str(m),
            flag,
            "false",
            *TINY,
        )
        bundle_here(
            "run",
            "evaluating",
            "--config_file",
            EVAL,
            "--dataset_dir",
            str(phantoms),
            "--ckpt_path",
            str(m / "model.pt"),
            "--output_dir",
            str(m / "eval"),
            "--network_size",
            "small",
            "--num_inference_steps",
            "2",
            flag,
            "false",
            "--num_samples",
            "2",
            "--write_deformation",
            "false",
        )
        assert {r["method"] for r in csv.DictReader(open(m / "eval" / "metrics.csv"))} == {name, "copy_t1n"}
        assert (m / "eval" / cid / "t1c_std.nii.gz").exists() and not (m / "eval" / cid / "deformation.nii.gz").exists()
    st = torch.load(tmp_path / "d3m_no_mssdm" / "model.pt", weights_only=True)
    assert not any(k.startswith("displacement.") for k in st)


def test_bad_inputs_are_named(phantoms, tmp_path):
    case = tmp_path / "BraTS-GLI-99999-000"
    case.mkdir()
    src = next(phantoms.glob("*/*-t1n.nii.gz"))
    (case / f"{case.name}-t1n.nii.gz").write_bytes(src.read_bytes())
    (case / f"{case.name}-t2w.nii.gz").write_bytes(src.read_bytes())
    torch.save({"model": {}}, tmp_path / "none.pt")  # a readable checkpoint: the missing contrast is found first
    with pytest.raises(Exception) as e:
        bundle_here(
            "run",
            "evaluating",
            "--config_file",
            str(CONFIGS / "inference.json"),
            "--case_dir",
            str(case),
            "--ckpt_path",
            str(tmp_path / "none.pt"),
            "--network_size",
            "small",
            "--output_dir",
            str(tmp_path / "o"),
        )
    assert f"{case.name}-t2f.nii.gz" in str(e.value) + repr(e.value.__cause__)


def test_multi_gpu_config_trains_with_two_processes_on_cpu(phantoms, tmp_path):
    state = train_two_processes(CONFIGS, tmp_path / "ddp", "--dataset_dir", str(phantoms), "--val_interval", "0", *TINY)
    assert any(k.startswith("displacement.") for k in state["model"])
