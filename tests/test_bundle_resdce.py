"""The resdce bundle end to end on tiny phantoms, through the command line a user types."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import bundle, bundle_here, check_bundle_configs, train_two_processes
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "resdce" / "configs"
TINY = ["--network_size", "small", "--num_workers", "0", "--val_num_inference_steps", "2", "--val_max_cases", "1"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from common.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, kinds=("prostate",), n_prostate=4, dicom=False, small=True, progress=False)
    return out / "prostate" / "prepared"


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
                    "validate#evaluator",
                    "scheduler",
                    "network_def",
                    "train_section",
                    "val_section",
                ],
            ),
            (["train.json", "multi_gpu_train.json"], ["training", "network", "train#data_sampler"]),
            (["inference.json", "evaluate.json"], ["evaluating", "run", "evaluator", "inferer"]),
        ),
    )
    p = ConfigParser()
    p.read_config(str(CONFIGS / "train.json"))
    p["network_size"] = "small"
    assert p.get_parsed_content("residual_channels") == [0, 1, 2]  # onset<-T2w, early<-ADC, late<-pre
    assert p.get_parsed_content("bundle_root") == str(ROOT / "bundles" / "resdce")


def test_train_resume_infer_evaluate(phantoms, tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    common = ["--dataset_dir", str(phantoms), "--output_dir", str(models)] + TINY
    # `--tracking mlflow` as MONAI provides it (the dev extra installs mlflow-skinny; users `pip install mlflow`)
    tracking = (
        ["--tracking", "mlflow", "--experiment_name", "resdce_test"] if importlib.util.find_spec("mlflow") else []
    )
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
        *common,
        *tracking,
    )
    assert (models / "model.pt").exists() and (models / "checkpoints" / "checkpoint_final.pt").exists()
    state = torch.load(models / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2
    if tracking:  # the run's loss per iteration and the validation metrics are in the local SQLite store
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{models / 'mlruns.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("resdce_test").experiment_id])
        assert run.info.status == "FINISHED" and "val_psnr" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    # resume: same folder, more iterations -> continues from iteration 2, not from 0; run from another folder
    res = bundle(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--num_iterations",
        "3",
        "--epoch_length",
        "1",
        "--val_interval",
        "5",
        *common,
        cwd=tmp_path,
    )
    assert "Restored all variables" in res.stdout + res.stderr
    state = torch.load(models / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3
    configs = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']"
    # the network preset travels with the weights: no --network_size needed, a wrong one is named
    assert torch.load(models / "model.pt", weights_only=True)["config"]["network_size"] == "small"
    with pytest.raises(Exception) as e:
        bundle_here(
            "run",
            "evaluating",
            "--config_file",
            configs,
            "--dataset_dir",
            str(phantoms),
            "--ckpt_path",
            str(models / "model.pt"),
            "--output_dir",
            str(tmp_path / "wrong"),
            "--network_size",
            "paper",
        )
    chain = [str(e.value)] + [str(x) for x in (e.value.__cause__, getattr(e.value.__cause__, "__cause__", None)) if x]
    assert any(
        "network_size: the checkpoint has 'small', this run 'paper'" in m and "--network_size small" in m for m in chain
    ), chain
    assert not (tmp_path / "wrong").exists()
    bundle(
        "run",
        "evaluating",
        "--config_file",
        configs,
        "--dataset_dir",
        str(phantoms),
        "--ckpt_path",
        str(models / "model.pt"),
        "--output_dir",
        str(out),
        "--num_inference_steps",
        "4",
    )
    test_ids = [e["id"] for e in json.loads((phantoms / "datalist.json").read_text())["test"]]
    for cid in test_ids:
        src = nib.load(phantoms / cid / "dce_pre.nii.gz")
        for name in ("dce_onset", "dce_early", "dce_late"):
            img = nib.load(out / cid / f"{name}.nii.gz")
            assert img.shape == src.shape and np.array_equal(img.affine, src.affine)
            assert np.isfinite(img.get_fdata()).all()
        assert (out / cid / "panel.png").exists()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["method"] for r in rows} == {"resdce", "copy_pre", "paired_input"}
    assert {r["region"] for r in rows} >= {"whole", "organ_mask"}
    copy_pre = [r for r in rows if r["method"] == "copy_pre" and r["region"] == "organ_mask"]
    assert all(float(r["enh_rel_err"]) == pytest.approx(1.0) for r in copy_pre)  # copying pre misses all uptake
    # the inputs were not touched
    assert not (phantoms / test_ids[0] / "panel.png").exists()


def test_inference_without_weights_or_data_says_what_to_do(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "evaluating",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--dataset_dir",
        str(tmp_path),
        "--ckpt_path",
        str(tmp_path / "none.pt"),
        "--network_size",
        "small",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "no trained weights" in res.stderr
    (tmp_path / "none.pt").write_bytes(b"")  # an empty (truncated) checkpoint is named as such
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and f"cannot read the checkpoint {tmp_path / 'none.pt'}" in res.stderr
    torch.save({}, tmp_path / "none.pt")  # readable weights, no data: says how to make data
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "make_phantoms.py" in res.stderr


def test_multi_gpu_config_trains_with_two_processes_on_cpu(phantoms, tmp_path):
    train_two_processes(CONFIGS, tmp_path / "ddp", "--dataset_dir", str(phantoms), "--val_interval", "2", *TINY)
