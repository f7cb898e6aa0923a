"""The resdce bundle end to end on tiny phantoms, through the command line a user types."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import helpers as h
import pytest
import torch

from common.errors import _innermost

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "resdce" / "configs"
TINY = [*h.SMALL, *h.TINY_VAL]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return h.tiny_phantoms(tmp_path_factory.mktemp("phantoms"), "prostate", 4, "prepared")


def test_configs_parse_with_the_documented_ids():
    h.check_bundle_configs(CONFIGS, train=["scheduler", "train_section", "val_section"])
    p = h.parser(CONFIGS, "train.json", network_size="small")
    assert p.get_parsed_content("residual_channels") == [0, 1, 2]  # onset<-T2w, early<-ADC, late<-pre


def test_train_resume_infer_evaluate(phantoms, tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    common = ["--dataset_dir", str(phantoms), *TINY]
    # `--tracking mlflow` as MONAI provides it (the dev extra installs mlflow-skinny; users `pip install mlflow`)
    tracking = (
        ["--tracking", "mlflow", "--experiment_name", "resdce_test"] if importlib.util.find_spec("mlflow") else []
    )
    h.train(CONFIGS, models, "--val_interval", "2", *common, *tracking)
    h.final_checkpoint(models, 2)
    if tracking:  # the run's loss per iteration and the validation metrics are in the local SQLite store
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{models / 'mlruns.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("resdce_test").experiment_id])
        assert run.info.status == "FINISHED" and "val_psnr" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    # resume: same folder, more iterations -> continues from iteration 2, not from 0; run from another folder
    h.assert_restored(
        h.train(CONFIGS, models, "--val_interval", "5", *common, iterations=3, cwd=tmp_path, runner=h.bundle_here)
    )
    h.final_checkpoint(models, 3)
    # the network preset travels with the weights: no --network_size needed, a wrong one is named
    assert torch.load(models / "model.pt", weights_only=True)["config"]["network_size"] == "small"
    data = ("--dataset_dir", str(phantoms))
    with pytest.raises(Exception) as e:
        h.evaluate(
            CONFIGS, models / "model.pt", tmp_path / "wrong", *data, "--network_size", "paper", runner=h.bundle_here
        )
    chain = [str(e.value)] + [str(x) for x in (e.value.__cause__, getattr(e.value.__cause__, "__cause__", None)) if x]
    assert any(
        "network_size: the checkpoint has 'small', this run 'paper'" in m and "--network_size small" in m for m in chain
    ), chain
    assert not (tmp_path / "wrong").exists()
    h.evaluate(CONFIGS, models / "model.pt", out, *data, "--num_inference_steps", "4", runner=h.bundle_here)
    phases = ("dce_onset", "dce_early", "dce_late")
    h.check_dce_evaluation(out, phantoms, "dce_pre.nii.gz", phases, {"resdce", "copy_pre", "paired_input"})


def test_inference_without_weights_or_data_says_what_to_do(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "evaluating",
        "--config_file",
        str([str(CONFIGS / "train.json"), str(CONFIGS / "inference.json")]),
        "--dataset_dir",
        str(tmp_path),
        "--ckpt_path",
        str(tmp_path / "none.pt"),
        "--network_size",
        "small",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "no trained weights" in res.stderr
    # the others in this process (the same command-line parsing, no start-up per run)
    (tmp_path / "none.pt").write_bytes(b"")  # an empty (truncated) checkpoint is named as such
    with pytest.raises(Exception) as e:
        h.bundle_here(*cmd[3:])
    assert f"cannot read the checkpoint {tmp_path / 'none.pt'}" in str(_innermost(e.value))  # what the CLI prints
    torch.save({}, tmp_path / "none.pt")  # readable weights, no data: says how to make data
    with pytest.raises(Exception) as e:
        h.bundle_here(*cmd[3:])
    assert "make_phantoms.py" in str(_innermost(e.value))


def test_multi_gpu_config_trains_with_two_processes_on_cpu(phantoms, tmp_path):
    h.train_two_processes(CONFIGS, tmp_path / "ddp", "--dataset_dir", str(phantoms), "--val_interval", "2", *TINY)
