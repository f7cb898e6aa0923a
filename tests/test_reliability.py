"""Reliability, second round (issue 25): non-finite losses stop training, DCE times are checked,
iterunet's ``--case_dir`` sees every volume of the folder, and a user error is one line even when it
is raised inside an ignite engine (which logs it before re-raising)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ITERUNET = ROOT / "bundles" / "iterunet" / "configs"
HINT = "(set GADOFREE_DEBUG=1 for the full traceback)"


def _run(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run *args`` as a user types it (not asserting success)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("GADOFREE_DEBUG", None)
    if debug:
        env["GADOFREE_DEBUG"] = "1"
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """Exit status 1, exactly one ``error:`` line followed by the debug hint on stderr, and no
    traceback anywhere (stdout holds the bundle's log); returns the message."""
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    both = res.stdout + res.stderr
    assert "Traceback" not in both, both[-6000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-2] == errors[0] and lines[-1] == HINT, res.stderr
    assert " - ERROR - " not in res.stdout, res.stdout[-3000:]  # ignite's / StatsHandler's exception logs
    return errors[0][len("error: ") :]


@pytest.fixture(scope="module")
def breast(tmp_path_factory) -> Path:
    return h.tiny_phantoms(tmp_path_factory.mktemp("phantoms"), "breast", 3)


@pytest.fixture(scope="module")
def weights(breast, tmp_path_factory) -> Path:
    """A one-iteration iterunet model (small network) of the breast phantoms."""
    out = tmp_path_factory.mktemp("iterunet_model")
    h.train(ITERUNET, out, "--dataset_dir", str(breast), *h.SMALL, "--val_interval", "0", iterations=1)
    return out / "model.pt"


def _copy(breast: Path, dst: Path) -> Path:
    shutil.copytree(breast, dst)
    return dst


def _infer(case_or_data: list[str], ckpt: Path, out: Path, *extra: str, debug: bool = False):
    cfg = str([str(ITERUNET / "train.json"), str(ITERUNET / "inference.json")])
    return _run(
        "--config_file", cfg, *case_or_data, "--ckpt_path", str(ckpt), "--output_dir", str(out), *extra, debug=debug
    )


# --- non-finite loss ----------------------------------------------------------------------------


def test_nonfinite_loss_stops_before_the_step_and_keeps_finite_weights():
    """Unit: the handler raises at LOSS_COMPLETED of iteration 2 (a NaN input), before backward and
    the optimizer step: the weights are those after iteration 1, all finite."""
    from monai.engines import SupervisedTrainer

    from common.errors import user_message
    from common.handlers import NonFiniteLossError, StopOnNonFiniteLoss

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    x = torch.ones(2, 3)
    batches = [
        {"image": x, "label": torch.zeros(2, 1), "id": ["a", "b"]},
        {"image": x * float("nan"), "label": torch.zeros(2, 1), "id": ["c", "d"]},
    ]
    after_first = {}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[StopOnNonFiniteLoss()],
        epoch_length=2,
    )
    from ignite.engine import Events

    @trainer.on(Events.ITERATION_COMPLETED(once=1))
    def _keep(engine):
        after_first.update({k: v.detach().clone() for k, v in net.state_dict().items()})

    with pytest.raises(NonFiniteLossError) as e:
        trainer.run()
    assert str(e.value).startswith(
        "training stopped: the loss is nan at iteration 2 (epoch 1), batch of case(s) ['c', 'd']"
    )
    assert user_message(e.value) == str(e.value)
    for k, v in net.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, after_first[k]), k


def test_nonfinite_loss_through_the_command_line(breast, tmp_path):
    """NaN voxels in one training case: training stops at iteration 1 naming the case, one line,
    no model.pt; GADOFREE_DEBUG=1 keeps the traceback."""
    data = _copy(breast, tmp_path / "data")
    train_case = json.loads((data / "datalist.json").read_text())["training"][0]["id"]
    f = data / train_case / "dce.nii.gz"
    img = nib.load(f)
    arr = img.get_fdata(dtype=np.float32)
    arr[..., 2] = np.nan  # one phase (every random patch holds it)
    nib.save(nib.Nifti1Image(arr, img.affine), f)
    args = ["training", "--config_file", str(ITERUNET / "train.json"), "--dataset_dir", str(data), *h.SMALL]
    args += ["--val_interval", "0", "--num_iterations", "2", "--epoch_length", "1"]
    msg = one_error_line(_run(*args, "--output_dir", str(tmp_path / "out")))
    assert msg.startswith(
        f"training stopped: the loss is nan at iteration 1 (epoch 1), batch of case(s) ['{train_case}']"
    )
    assert not (tmp_path / "out" / "model.pt").exists()
    debug = _run(*args, "--output_dir", str(tmp_path / "out2"), debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stdout + debug.stderr


def test_every_train_config_attaches_the_nonfinite_check():
    for cfg in sorted((ROOT / "bundles").glob("*/configs/train.json")):
        handlers = json.loads(cfg.read_text())["train"]["handlers"]
        assert any(x.get("_target_") == "common.handlers.StopOnNonFiniteLoss" for x in handlers), cfg


# --- DCE times ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "times, message",
    [
        ([0, 85, float("nan"), 225], "DCE times must be finite seconds; time 2 is nan"),
        ([0, 85, 225, 155], r"DCE times must be strictly increasing; time 3 \(155 s\) is not after time 2 \(225 s\)"),
        ([0, 155, 155, 225], r"DCE times must be strictly increasing; time 2 \(155 s\) is not after time 1 \(155 s\)"),
    ],
)
def test_dce_times_must_be_finite_and_increasing(tmp_path, times, message):
    from common.transforms.phases import check_times, read_dce_times

    path = tmp_path / "dce_times.json"
    path.write_text(json.dumps({"times_s": times}))  # json writes NaN as NaN, as a careless script would
    with pytest.raises(ValueError, match=rf"^{path}: {message}$"):
        read_dce_times(path)
    with pytest.raises(ValueError, match=rf"^where: {message}$"):
        check_times(times, "where")
    np.testing.assert_array_equal(check_times([0, 85.5, 155], "x"), [0.0, 85.5, 155.0])


def test_nan_time_at_inference_is_one_line(breast, weights, tmp_path):
    """Raised inside the evaluator's run (ignite logs it twice with tracebacks before re-raising):
    one line naming dce_times.json; nothing written."""
    case = _copy(breast, tmp_path / "data") / "breast-001"
    (case / "dce_times.json").write_text('{"times_s": [0, 85, NaN, 225, 295, 365]}')
    msg = one_error_line(_infer(["--case_dir", str(case)], weights, tmp_path / "out"))
    assert msg == f"{case / 'dce_times.json'}: DCE times must be finite seconds; time 2 is nan"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


# --- iterunet --case_dir and settings -----------------------------------------------------------


def test_case_dir_reads_pre_and_breast_mask(breast, tmp_path):
    """``--case_dir`` entries hold pre / breast_mask / lesion_mask (the datalist's keys), so the
    grid check sees a shifted pre.nii.gz."""
    from common.data import case_or_datalist

    case = _copy(breast, tmp_path / "data") / "breast-001"
    (entry,) = case_or_datalist(str(case), "", "test", ["dce"])
    for key in ("pre", "dce", "breast_mask", "lesion_mask"):
        assert entry[key] == str(case / f"{key}.nii.gz"), key
    img = nib.load(case / "pre.nii.gz")
    aff = img.affine.copy()
    aff[:3, 3] += 4.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), case / "pre.nii.gz")
    p = h.parser(ITERUNET, "train.json", "inference.json", case_dir=str(case), network_size="small")
    pre = p.get_parsed_content("preprocessing")
    with pytest.raises(Exception) as e:
        pre(p.get_parsed_content("datalist")[0])
    from common.errors import user_message

    msg = user_message(e.value)
    assert msg is not None and str(case / "pre.nii.gz") in msg and "not on the grid of" in msg, msg


def test_case_dir_that_is_a_file_and_start_phase_below_one(breast, weights, tmp_path):
    f = breast / "breast-001" / "dce.nii.gz"
    assert one_error_line(_infer(["--case_dir", str(f)], weights, tmp_path / "o1")) == (
        f"--case_dir {f} is a file, not a case folder (give the folder that holds it)"
    )
    msg = one_error_line(_infer(["--dataset_dir", str(breast)], weights, tmp_path / "o2", "--start_phase", "0"))
    assert msg.startswith("--start_phase: expected a whole number >= 1") and msg.endswith("got 0"), msg
    from common.inferers.iterunet import IterUNetVolumeInferer

    with pytest.raises(ValueError, match=r"^--start_phase: .* got -1$"):
        IterUNetVolumeInferer(roi_size=[8, 8, 8], start=-1)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_weights_of_another_bundle_are_named(breast, tmp_path):
    """d3m weights given to iterunet (they share only network_size): one line naming the
    checkpoint and the settings iterunet does not have, not a 122-line state-dict traceback."""
    record = {
        "network_size": "small",
        "dual_decoder": True,
        "deformation": True,
        "num_train_timesteps": 1000,
        "input_keys": ["t1n", "t2w", "t2f"],
        "target_key": "t1c",
        "percentiles": [0.5, 99.5],
    }
    ckpt = tmp_path / "d3m_model.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": record}, ckpt)
    msg = one_error_line(_infer(["--dataset_dir", str(breast)], ckpt, tmp_path / "out"))
    assert msg.startswith(
        f"checkpoint {ckpt}: not weights of this bundle: it records settings this bundle does not have"
    )
    assert "deformation, dual_decoder, input_keys, num_train_timesteps, percentiles, target_key" in msg
    assert not (tmp_path / "out").exists()
    # a record that is a subset of this bundle's (weights saved before a setting was recorded) still loads
    from common.bundle import ConfigRecord

    ConfigRecord(network_size="small", temporal=True).load_state_dict({"network_size": "small"})
    with pytest.raises(ValueError, match="not weights of this bundle"):
        ConfigRecord(network_size="small", temporal=True).load_state_dict({"network_size": "small", "kappa": 2.0})


def test_export_refuses_weights_of_another_bundle(tmp_path):
    """``scripts/export_bundle.py iterunet --weights <d3m checkpoint>``: exit 1 with one line naming the
    weights and the settings iterunet does not have; nothing exported (was: rc 0, then a traceback)."""
    record = {"network_size": "small", "dual_decoder": True, "deformation": True, "target_key": "t1c"}
    ckpt = tmp_path / "d3m_model.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": record}, ckpt)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GADOFREE_DEBUG", None)
    cmd = [
        sys.executable,
        "scripts/export_bundle.py",
        "iterunet",
        "--out",
        str(tmp_path / "dist"),
        "--weights",
        str(ckpt),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"--weights {ckpt}: ") and "not weights of this bundle" in line
    assert "deformation, dual_decoder, target_key" in line
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_empty_lesion_mask_warns_once(breast, weights, tmp_path):
    case = _copy(breast, tmp_path / "data") / "breast-001"
    img = nib.load(case / "lesion_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), case / "lesion_mask.nii.gz")
    res = _infer(["--case_dir", str(case)], weights, tmp_path / "out")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    warned = [line for line in res.stdout.splitlines() if "the lesion mask has no voxel > 0" in line]
    assert len(warned) == 1 and str(case / "lesion_mask.nii.gz") in warned[0], res.stdout[-3000:]
    kinetics = json.loads((tmp_path / "out" / "breast-001" / "kinetics.json").read_text())
    assert kinetics["curve_region"] == "breast_mask"  # the curves fall back to the breast, not to nothing


def test_d3m_without_data_points_at_the_brain_tools(tmp_path):
    from common.data.brats import brats_case_or_datalist

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        brats_case_or_datalist("", tmp_path / "empty", "test")
    assert "prepare_brain.py" in str(e.value) and "prepare_prostatex" not in str(e.value)


# --- a user error raised in a DataLoader worker process -------------------------------------------


class _Times(torch.utils.data.Dataset):
    def __init__(self, times):
        self.times = times

    def __len__(self):
        return 1

    def __getitem__(self, i):
        from common.transforms.phases import check_times

        return torch.as_tensor(check_times(self.times, "/data/case-7/dce_times.json"))


class _Bug(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {}["missing"]


def test_user_error_in_a_dataloader_worker_is_one_line():
    """torch re-raises a worker's exception as text ("Caught ValueError in DataLoader worker process 0.
    Original Traceback ..."): the message is read back when the innermost frame is ours; a bug in a
    worker keeps its traceback."""
    from common.errors import user_message

    with pytest.raises(ValueError) as e:
        list(torch.utils.data.DataLoader(_Times([0.0, 85.0, 85.0]), num_workers=1))
    assert str(e.value).startswith("Caught ValueError in DataLoader worker process 0")
    assert user_message(e.value) == (
        "/data/case-7/dce_times.json: DCE times must be strictly increasing; time 2 (85 s) is not after time 1 (85 s)"
    )
    with pytest.raises(KeyError) as e:
        list(torch.utils.data.DataLoader(_Bug(), num_workers=1))
    assert user_message(e.value) is None
    assert len(list(torch.utils.data.DataLoader(_Times([0.0, 85.0]), num_workers=1))) == 1
