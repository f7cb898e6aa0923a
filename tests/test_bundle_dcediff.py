"""The dcediff bundle: phase selection numbers, config ids, and train -> resume -> infer -> evaluate
on tiny phantoms through the command line a user types."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged

from common.transforms import SelectPhasesd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "dcediff" / "configs"
TINY = [*h.SMALL, *h.TINY_VAL, "--patch_size", "[32,32]", "--batch_size", "4"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return h.tiny_phantoms(tmp_path_factory.mktemp("dcediff_phantoms"), "prostate", 4, "prepared")


# ---------------------------------------------------------------------------------------- SelectPhasesd
def _series(tmp_path: Path, n: int, times: list[float] | None) -> dict:
    """A 4D NIfTI whose frame i has value 10 * i + (x index), loaded as the bundle loads it."""
    grid = np.arange(5, dtype=np.float32)[:, None, None] + np.zeros((5, 4, 3), np.float32)
    dce = np.stack([10.0 * i + grid for i in range(n)], axis=-1)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(dce, affine), tmp_path / "dce.nii.gz")
    if times is not None:
        (tmp_path / "dce_times.json").write_text(json.dumps({"times_s": times}))
    load = LoadImaged("dce", reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)
    return load({"dce": str(tmp_path / "dce.nii.gz")})


@pytest.mark.parametrize("n, early, late", [(20, 10, 19), (21, 10, 20), (70, 34, 69), (3, 1, 2)])
def test_select_phases_middle_and_last(tmp_path, n, early, late):
    d = SelectPhasesd("dce")(_series(tmp_path, n, [8.0 + 4.2 * i for i in range(n)]))
    assert "dce" not in d  # the 4D series is dropped once the phases are out
    assert d["dce_phases"] == {
        "early": {"index": early, "time_s": pytest.approx(8.0 + 4.2 * early)},
        "late": {"index": late, "time_s": pytest.approx(8.0 + 4.2 * late)},
    }
    for key, i in (("dce_early", early), ("dce_late", late)):
        assert tuple(d[key].shape) == (1, 5, 4, 3)
        np.testing.assert_array_equal(d[key][0, :, 0, 0].numpy(), 10.0 * i + np.arange(5))
        np.testing.assert_array_equal(d[key].affine.numpy(), np.diag([1.5, 2.0, 3.0, 1.0]))


def test_select_phases_by_time_index_and_errors(tmp_path):
    times = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    spec = {"early": {"time_s": 26.0}, "late": {"index": 4}}
    d = SelectPhasesd("dce", spec=spec, output_prefix="x_", remove_source=False)(_series(tmp_path, 6, times))
    assert d["dce_phases"] == {"early": {"index": 3, "time_s": 30.0}, "late": {"index": 4, "time_s": 40.0}}
    assert float(d["x_early"][0, 0, 0, 0]) == 30.0 and float(d["x_late"][0, 0, 0, 0]) == 40.0 and "dce" in d
    # times given in the data win over the file
    d = SelectPhasesd("dce", spec={"early": {"time_s": 26.0}}, times_key="t")(
        {**_series(tmp_path, 6, times), "t": [0, 1, 2, 3, 26, 40]}
    )
    assert d["dce_phases"]["early"]["index"] == 4
    with pytest.raises(ValueError, match="6 time points in the series but 5 times"):
        SelectPhasesd("dce")(_series(tmp_path, 6, times[:5]))
    (tmp_path / "dce_times.json").unlink()
    d = SelectPhasesd("dce")(_series(tmp_path, 6, None))  # index/fraction rules need no times
    assert d["dce_phases"]["early"]["index"] == 2 and d["dce_phases"]["late"]["index"] == 5
    assert np.isnan(d["dce_phases"]["late"]["time_s"])
    with pytest.raises(FileNotFoundError, match="no DCE times"):
        SelectPhasesd("dce", spec=spec)(_series(tmp_path, 6, None))
    assert SelectPhasesd("dce", allow_missing_keys=True)({"t2w": 1}) == {"t2w": 1}


def test_select_phases_default_rules_match_the_phantom_ground_truth(phantoms):
    case = json.loads((phantoms / "datalist.json").read_text())["training"][0]
    manifest = json.loads((phantoms / case["id"] / "manifest.json").read_text())
    load = LoadImaged("dce", reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)
    d = load({"dce": str(phantoms / case["dce"])})
    raw = d["dce"].clone()
    out = SelectPhasesd("dce", phases=["pre", "onset", "early", "late"], spec={})(d)
    assert {k: v["index"] for k, v in out["dce_phases"].items()} == {
        k: v["index"] for k, v in manifest["phases"].items()
    }
    prepared = nib.load(phantoms / case["dce_early"]).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(out["dce_early"][0].numpy(), prepared)
    np.testing.assert_array_equal(out["dce_late"][0].numpy(), raw[-1].numpy())


# ---------------------------------------------------------------------------------------- configs
def test_configs_parse_with_the_documented_ids(phantoms):
    h.check_bundle_configs(
        CONFIGS,
        train=[
            "training_schedule",
            "trained_noise_levels",
            "scheduler",
            "ddim_scheduler",
            "validate#inferer",
            "train#lr_scheduler",
            "num_parameters",
        ],
        more=[
            (
                ["train.json", "inference.json"],
                [
                    "evaluating",
                    "run",
                    "evaluator",
                    "inferer",
                    "scheduler",
                    "ddim_scheduler",
                    "slice_inferer#scheduler",
                    "trained_noise_levels",
                ],
            )
        ],
    )
    p = h.parser(CONFIGS, "train.json")
    for size, lo, hi in (("small", 1e5, 1e6), ("paper", 115e6, 135e6)):
        p["network_size"] = size
        with torch.device("meta"):  # count without allocating 125M parameters
            n = p.get_parsed_content("num_parameters", lazy=False)
        assert lo < n < hi, (size, n)
    p["network_size"] = "small"
    net = p.get_parsed_content("network_def", lazy=False)
    assert (net.conv_in.conv.in_channels, net.out[-1].conv.out_channels) == (6, 2)  # [noisy early/late, 4 conditions]
    # the published schedules
    validate = p.get_parsed_content("validate#inferer")  # a copy of the inference inferer with its own steps
    validate.set_timesteps()
    train_sched, infer = p.get_parsed_content("training_schedule"), validate.sampler.scheduler
    assert (
        train_sched.num_train_timesteps == 2000
        and float(train_sched.betas[0]) == pytest.approx(1e-6)
        and float(train_sched.betas[-1]) == pytest.approx(0.01)
    )
    assert (
        infer.num_train_timesteps == 1000
        and float(infer.betas[0]) == pytest.approx(1e-4)
        and float(infer.betas[-1]) == pytest.approx(0.09)
    )
    # stock MONAI schedulers; validation samples by DDIM (train.json's sampler) on float64 tables, consistent chain
    assert type(train_sched).__name__ == "DDPMScheduler" and type(infer).__name__ == "DDIMScheduler"
    assert infer.alphas_cumprod.dtype == torch.float64 and infer.timesteps.tolist() == list(range(999, -1, -100))
    assert p.get_parsed_content("train#prepare_batch").schedule.num_train_timesteps == 2000
    # the network is only ever told trained levels: (gamma_T of the training schedule, 1], in training and validation
    lo, hi = p.get_parsed_content("trained_noise_levels")
    assert lo == pytest.approx(float(torch.cumprod(1 - train_sched.betas.double(), 0)[-1]), rel=1e-12) and hi == 1.0
    assert p.get_parsed_content("train#inferer").noise_level_range == (lo, hi)
    assert validate.sampler.noise_level_range == (lo, hi)
    # the inference inferer itself (not the validation copy) keeps its own steps: 1000 DDIM levels here
    inference = p.get_parsed_content("inferer")
    inference.set_timesteps()
    assert inference.sampler.scheduler.timesteps.tolist() == list(range(999, -1, -1))
    assert validate.sampler.scheduler is not inference.sampler.scheduler
    # the ADC ablation: in_channels follow input_keys
    p["input_keys"] = ["t2w", "pd", "t1_pre"]
    assert p.get_parsed_content("network_def", lazy=False).conv_in.conv.in_channels == 5
    # phase_source "prepared" reads dce_early/dce_late files instead of selecting from the 4D series
    # (+ the same-grid check, the copy_pre baseline copied and repeated, the DCE pre-contrast scaled)
    for source, n_transforms, selected in (("dce", 12, True), ("prepared", 11, False)):
        p = h.parser(CONFIGS, "train.json", "inference.json", phase_source=source, dataset_dir=str(phantoms))
        pre = p.get_parsed_content("preprocessing")
        assert (
            len(pre.transforms) == n_transforms
            and any(isinstance(t, SelectPhasesd) for t in pre.transforms) == selected
        )
        item = pre(p.get_parsed_content("datalist")[0])
        assert tuple(item["image"].shape[:1]) == (4,) and tuple(item["label"].shape[:1]) == (2,)
    p = h.parser(CONFIGS, "train.json", "inference.json", sampler="ddim", num_inference_steps=50)
    assert [int(t) for t in p.get_parsed_content("slice_inferer#scheduler").timesteps[:3]] == [999, 979, 959]
    assert p.get_parsed_content("slice_inferer").noise_level_range[1] == 1.0


def test_fid_with_a_missing_extractor_says_so(tmp_path):
    from common.handlers.fid import SynthesisFID

    with pytest.raises(FileNotFoundError, match="feature extractor"):
        SynthesisFID(tmp_path / "missing.pt", tmp_path, ["dce_early"])


# ---------------------------------------------------------------------------------------- end to end
class _TinyExtractor(torch.nn.Module):
    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x.amax((1, 2, 3)), x.amin((1, 2, 3))], 1)


def test_train_resume_infer_evaluate(phantoms, tmp_path):
    models, out = tmp_path / "models", tmp_path / "eval"
    common = ["--dataset_dir", str(phantoms), "--warmup_steps", "4", *TINY]
    res = h.train(CONFIGS, models, "--val_interval", "2", *common)
    assert "DCE-diff network (small): 0.88M parameters" in res.stdout
    state = h.final_checkpoint(models, 2)
    assert state["lr_scheduler"]["last_epoch"] == 2  # warm-up stepped per iteration
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        1e-4 * (0.25 + 0.75 * 2 / 4)
    )  # 1/4 -> 1 over 4 iterations
    assert "training precision: fp32 on cpu" in res.stdout + res.stderr  # auto on this CPU
    # resume from another working directory: continues at iteration 2 with the warm-up where it was; in
    # bf16 forced (a CPU: the training inferer autocasts, MONAI's amp is CUDA only)
    res = h.train(CONFIGS, models, "--val_interval", "5", *common, "--precision", "bf16", iterations=3, cwd=tmp_path)
    h.assert_restored(res)
    assert "training precision: bf16 on cpu" in res.stdout + res.stderr
    state = h.final_checkpoint(models, 3)
    assert state["lr_scheduler"]["last_epoch"] == 3
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())

    extractor = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.trace(_TinyExtractor(), torch.rand(2, 3, 16, 16)), str(extractor))
    sampling = ("--sampler", "ddim", "--num_inference_steps", "2", "--fid_extractor_path", str(extractor))
    h.evaluate(
        CONFIGS, models / "model.pt", out, "--dataset_dir", str(phantoms), "--network_size", "small", *sampling,
        runner=h.bundle_here,
    )  # fmt: skip
    phases = ("dce_early", "dce_late")
    rows = h.check_dce_evaluation(out, phantoms, "dce_pre.nii.gz", phases, {"dcediff", "copy_pre"})
    assert {r["phase"] for r in rows} == set(phases)
    fid = h.read_csv(out / "fid.csv")
    assert {(r["method"], r["phase"]) for r in fid} == {(m, p) for m in ("dcediff", "copy_pre") for p in phases}
    assert all(np.isfinite(float(r["fid"])) for r in fid)


def test_multi_gpu_config_trains_with_two_processes_on_cpu(phantoms, tmp_path):
    state = h.train_two_processes(
        CONFIGS, tmp_path / "ddp", "--dataset_dir", str(phantoms), "--val_interval", "2", "--warmup_steps", "4", *TINY
    )
    assert state["lr_scheduler"]["last_epoch"] == 2
