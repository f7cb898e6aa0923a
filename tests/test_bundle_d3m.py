"""The d3m bundle end to end on tiny brain phantoms, through the command line a user types."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "d3m" / "configs"
TINY = [*h.SMALL, *h.TINY_VAL, "--spatial_size", "[64,64]", "--batch_size", "4", "--slices_per_volume", "2"]
# blocks defined once, in train.json (inference.json stacks on it)
SHARED_BLOCKS = (
    "input_keys target_key seg_key label_set et_labels tumour_labels percentiles dual_decoder "
    "deformation network_def checkpoint_record scheduler num_train_timesteps preprocessing"
).split()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return h.tiny_phantoms(tmp_path_factory.mktemp("phantoms"), "brain", 4)


def test_configs_parse_and_share_their_blocks():
    h.check_bundle_configs(
        CONFIGS,
        train=["train#inferer", "validate#inferer", "scheduler", "preprocessing", "train#preprocessing", "et_labels"],
        evaluate=["postprocessing"],
        shared=SHARED_BLOCKS,
    )
    train_cfg = json.loads((CONFIGS / "train.json").read_text())
    assert (
        train_cfg["label_set"] == "brats_gli"
        and train_cfg["et_labels"] is None  # from the label set unless overridden
        and train_cfg["lr"] == 8e-5
        and h.parser(CONFIGS, "train.json", "inference.json")["num_inference_steps"] == 250
        and h.parser(CONFIGS, "train.json", "inference.json")["eta"] == 0
    )
    s = h.parser(CONFIGS, "train.json").get_parsed_content("scheduler")
    assert s.alphas_cumprod.dtype == torch.float64 and s.prediction_type == "v_prediction"


def test_train_infer_evaluate(phantoms, tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    data = ("--dataset_dir", str(phantoms))
    steps = ("--network_size", "small", "--num_inference_steps", "2")
    h.train(CONFIGS, models, "--val_interval", "2", *data, *TINY)
    state = h.final_checkpoint(models, 2)
    assert any(k.startswith("displacement.") for k in state["model"]) and any(
        "mask_up_blocks" in k for k in state["model"]
    )
    h.evaluate(CONFIGS, models / "model.pt", out, *data, *steps, runner=h.bundle_here)
    (case,) = h.held_out(phantoms)
    cid = case["id"]
    src = nib.load(phantoms / case["t1n"])
    h.assert_same_grid(out / cid / "t1c.nii.gz", src)
    et = nib.load(out / cid / "et_mask.nii.gz")
    assert (
        et.get_data_dtype() == np.uint8
        and np.array_equal(et.affine, src.affine)
        and set(np.unique(et.get_fdata())) <= {0, 1}
    )
    u = nib.load(out / cid / "deformation.nii.gz")
    assert u.shape == (*src.shape, 2) and np.array_equal(u.affine, src.affine)
    assert (out / cid / "panel.png").stat().st_size > 0
    rows = h.read_csv(out / "metrics.csv")
    assert {r["method"] for r in rows} == {"d3m", "copy_t1n"} and {r["region"] for r in rows} == {
        "whole",
        "brain",
        "tumour",
    }
    (mask_row,) = h.read_csv(out / "mask_metrics.csv")
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
        h.train(CONFIGS, m, "--val_interval", "0", *data, flag, "false", *TINY, iterations=1, runner=h.bundle_here)
        sampling = (flag, "false", "--num_samples", "2", "--write_deformation", "false")
        h.evaluate(CONFIGS, m / "model.pt", m / "eval", *data, *steps, *sampling, runner=h.bundle_here)
        # num_samples 2: the mean of the draws, and the first draw alone (comparable with single-sample papers)
        assert {r["method"] for r in h.read_csv(m / "eval" / "metrics.csv")} == {name, f"{name}_first_draw", "copy_t1n"}
        assert (m / "eval" / cid / "t1c_std.nii.gz").exists() and not (m / "eval" / cid / "deformation.nii.gz").exists()
    # resumed to 2 iterations: the EMA (decay 0.995, released code) is restored and model.pt holds the average
    m = tmp_path / "d3m_no_mssdm"
    h.train(
        CONFIGS, m, "--val_interval", "0", *data, "--deformation", "false", *TINY, iterations=2, runner=h.bundle_here
    )
    state = h.final_checkpoint(m, 2)
    assert int(state["ema"]["n_averaged"]) == 2
    saved = torch.load(m / "model.pt", weights_only=True)
    for k, v in saved["model"].items():
        torch.testing.assert_close(v, state["ema"][f"module.{k}"])
    assert any(not torch.equal(v, state["model"][k]) for k, v in saved["model"].items())  # not the raw weights
    assert saved["config"]["deformation"] is False and saved["config"]["network_size"] == "small"
    assert len(saved["model"]) > 10 and not any(k.startswith("displacement.") for k in saved["model"])


def test_bad_inputs_are_named(phantoms, tmp_path):
    case = tmp_path / "BraTS-GLI-99999-000"
    case.mkdir()
    src = next(phantoms.glob("*/*-t1n.nii.gz"))
    (case / f"{case.name}-t1n.nii.gz").write_bytes(src.read_bytes())
    (case / f"{case.name}-t2w.nii.gz").write_bytes(src.read_bytes())
    torch.save({"model": {}}, tmp_path / "none.pt")  # a readable checkpoint: the missing contrast is found first
    data = ("--case_dir", str(case), "--network_size", "small")
    with pytest.raises(Exception) as e:
        h.evaluate(
            CONFIGS,
            tmp_path / "none.pt",
            tmp_path / "o",
            *data,
            files=["train.json", "inference.json"],
            runner=h.bundle_here,
        )
    assert f"{case.name}-t2f.nii.gz" in str(e.value) + repr(e.value.__cause__)


def test_multi_gpu_config_trains_with_two_processes_on_cpu(phantoms, tmp_path):
    state = h.train_two_processes(
        CONFIGS, tmp_path / "ddp", "--dataset_dir", str(phantoms), "--val_interval", "0", *TINY
    )
    assert any(k.startswith("displacement.") for k in state["model"])
