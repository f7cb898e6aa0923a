"""The iterunet bundle end to end on tiny breast phantoms, through the command line a user types."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "iterunet" / "configs"
# blocks defined once, in train.json (inference.json stacks on it)
SHARED_BLOCKS = (
    "series_key mask_keys grid_keys start_phase frame_offsets_s tinorm_ref_index tinorm_mask_key "
    "time_input temporal chain_mode patch_size roi_size network_def network checkpoint_record preprocessing "
    "prepare_batch"
).split()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return h.tiny_phantoms(tmp_path_factory.mktemp("phantoms"), "breast", 4)


def test_configs_parse_and_share_their_blocks():
    h.check_bundle_configs(
        CONFIGS,
        train=[
            "train#inferer",
            "validate#inferer",
            "preprocessing",
            "stage",
            "init_ckpt",
            "train_section",
            "val_section",
        ],
        evaluate=["postprocessing"],
        shared=SHARED_BLOCKS,
    )
    p = h.parser(CONFIGS, "train.json", network_size="small")
    assert p.get_parsed_content("train_mode") == "teacher" and p.get_parsed_content("init_ckpt") == ""
    p["stage"] = "recursive"
    assert p.get_parsed_content("train_mode") == "recursive"
    assert p.get_parsed_content("init_ckpt") == str(ROOT / "bundles" / "iterunet" / "models" / "warmup" / "model.pt")
    assert p.get_parsed_content("train#optimizer").defaults["weight_decay"] == 1e-3
    assert p.get_parsed_content("train#optimizer").defaults["lr"] == 1e-4


def test_train_both_stages_infer_evaluate(phantoms, tmp_path):
    warm, rec, out = tmp_path / "warmup", tmp_path / "recursive", tmp_path / "eval"
    data = ("--dataset_dir", str(phantoms))
    common = [*data, *h.SMALL]
    h.train(CONFIGS, warm, "--val_interval", "2", "--val_max_cases", "1", *common)
    h.final_checkpoint(warm, 2)
    recursive = ("--stage", "recursive", "--init_ckpt", str(warm / "model.pt"), "--val_interval", "0")
    h.assert_restored(h.train(CONFIGS, rec, *recursive, *common, cwd=tmp_path, runner=h.bundle_here), warm / "model.pt")
    h.evaluate(
        CONFIGS, rec / "model.pt", out, *data, "--network_size", "small", "--progress", "false", runner=h.bundle_here
    )
    test_ids = [e["id"] for e in h.held_out(phantoms)]
    for cid in test_ids:
        src = nib.load(phantoms / cid / "dce.nii.gz")
        h.assert_same_grid(out / cid / "dce_synth.nii.gz", src, shape=src.shape[:3] + (4,))
        kin = json.loads((out / cid / "kinetics.json").read_text())
        assert kin["times_s"] == [0.0, 85.0, 155.0, 225.0, 295.0, 365.0] and kin["predicted_phases"] == [
            "t155s",
            "t225s",
            "t295s",
            "t365s",
        ]
        dce = src.get_fdata()
        lesions = nib.load(phantoms / cid / "lesion_mask.nii.gz").get_fdata()
        for lab, entry in kin["lesions"].items():
            real = dce[lesions == int(lab)].mean(0)  # the acquired series' mean lesion curve, from the files
            np.testing.assert_allclose(entry["real"]["curve"], real, rtol=1e-5)
            np.testing.assert_allclose(entry["copy_forward"]["curve"], list(real[:2]) + [real[1]] * 4, rtol=1e-5)
        assert (out / cid / "panel.png").stat().st_size > 0 and (out / cid / "kinetics.png").stat().st_size > 0
    rows = h.read_csv(out / "metrics.csv")
    assert {r["method"] for r in rows} == {"iterunet", "copy_forward", "linear"}
    assert {r["region"] for r in rows} == {"whole", "breast_mask", "lesion_mask"}
    assert {r["phase"] for r in rows} == {"t155s", "t225s", "t295s", "t365s"}
    kin_rows = h.read_csv(out / "kinetics.csv")
    cid = test_ids[0]
    dce = nib.load(phantoms / cid / "dce.nii.gz").get_fdata()
    lesions = nib.load(phantoms / cid / "lesion_mask.nii.gz").get_fdata()
    copy1 = next(r for r in kin_rows if r["method"] == "copy_forward" and r["case"] == f"{cid}/lesion1")
    m = dce[lesions == 1].mean(0)
    sigma = dce[..., 1].std()  # TI-norm: the first post-contrast frame's std over the whole volume
    assert float(copy1["enh_err_t365s"]) == pytest.approx(
        ((m[1] - m[5]) / sigma) ** 2, rel=1e-4
    )  # squared error of the mean lesion intensity, in TI-norm units (the paper's)
    assert float(copy1["enh_err_raw"]) == pytest.approx(np.mean([(m[1] - m[k]) ** 2 for k in (2, 3, 4, 5)]), rel=1e-4)
    summary = json.loads((out / "kinetics_summary.json").read_text())
    assert set(summary["wilcoxon"]) == {"iterunet vs copy_forward", "iterunet vs linear"}
    assert sum(map(sum, summary["confusion"]["copy_forward"])) == len({r["case"] for r in kin_rows})
    assert (out / "summary.md").exists() and not (phantoms / cid / "panel.png").exists()  # inputs untouched
    # the network precision is recorded (auto: fp32 on a CPU without native bf16; 3D, so no channels-last)
    precision = json.loads((out / "summary.json").read_text())["precision"]
    assert precision in ("fp32", "bf16") and (out / "summary.md").read_text().endswith(f"precision: {precision}\n")


def test_ablations_run_as_overrides(phantoms, tmp_path):
    common = ["--dataset_dir", str(phantoms), "--val_interval", "0", *h.SMALL]
    runs = {
        "no_warmup": ["--stage", "recursive", "--init_ckpt", ""],
        "no_temporal": ["--temporal", "false"],
        "single_time_point": ["--stage", "recursive", "--chain_mode", "direct", "--init_ckpt", ""],
    }
    for name, extra in runs.items():
        h.train(CONFIGS, tmp_path / name, *common, *extra, iterations=1, runner=h.bundle_here)
        saved = torch.load(tmp_path / name / "model.pt", weights_only=True)
        state = saved["model"]  # beside the weights, the settings they were trained with
        assert saved["config"]["temporal"] == (name != "no_temporal"), name
        assert any(k.startswith("lstm.") for k in state) == (name != "no_temporal"), name
    # a missing --init_ckpt and a perceptual term without local weights stop with a message: tests/test_iterunet.py


def test_multi_gpu_config_trains_the_recursive_stage_with_two_processes(phantoms, tmp_path):
    h.train_two_processes(
        CONFIGS,
        tmp_path / "ddp",
        "--dataset_dir",
        str(phantoms),
        "--stage",
        "recursive",
        "--init_ckpt",
        "",
        "--val_interval",
        "0",
        *h.SMALL,
    )


def _raises(fn, exc_type, pattern: str):
    """``fn()`` raises ``exc_type`` matching ``pattern`` itself or as the cause MONAI wraps (``Compose`` re-raises
    a transform's error as a ``RuntimeError`` from it)."""
    import re

    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    while err is not None and not (isinstance(err, exc_type) and re.search(pattern, str(err))):
        err = err.__cause__
    assert err is not None, f"no {exc_type.__name__} matching {pattern!r} in {info.value!r}"


def _preprocessing():
    return h.parser(CONFIGS, "train.json", "inference.json", network_size="small").get_parsed_content("preprocessing")


def test_bad_inputs_name_the_file(phantoms, tmp_path):
    from common.handlers.iterunet import IterUNetMetrics
    from common.io import save_nifti

    src = phantoms / "breast-000"
    dce = nib.load(src / "dce.nii.gz")
    arr, affine = dce.get_fdata(dtype=np.float32), dce.affine
    pre = _preprocessing()
    # too few frames for the start phase and a target
    short = tmp_path / "short"
    save_nifti(arr[..., :2], affine, short / "dce.nii.gz")
    (short / "dce_times.json").write_text(json.dumps({"times_s": [0, 85]}))
    _raises(
        lambda: pre({"id": "short", "dce": str(short / "dce.nii.gz")}),
        ValueError,
        rf"{short / 'dce.nii.gz'}: 2 frame\(s\)",
    )
    # a mask on another grid
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    save_nifti(nib.load(src / "lesion_mask.nii.gz").get_fdata(), shifted, tmp_path / "other" / "lesion_mask.nii.gz")
    _raises(
        lambda: pre(
            {"id": "b", "dce": str(src / "dce.nii.gz"), "lesion_mask": str(tmp_path / "other" / "lesion_mask.nii.gz")}
        ),
        ValueError,
        r"lesion_mask.nii.gz \(lesion_mask\): not on the grid of .*breast-000/dce.nii.gz",
    )
    # lesion metrics asked for without a lesion mask
    item = pre({"id": "b", "dce": str(src / "dce.nii.gz"), "dce_times": str(src / "dce_times.json")})
    out = {"image": item["dce"], "pred": item["dce"][2:], "label": item["dce"][2:]}
    with pytest.raises(FileNotFoundError, match=rf"{src / 'dce.nii.gz'}: no lesion mask"):
        IterUNetMetrics(tmp_path / "eval").score(item, out)
    IterUNetMetrics(tmp_path / "eval", lesion_metrics=False).score(item, out)  # image metrics only: fine


def test_runs_on_the_real_prostatex_series(prepared_prostatex, tmp_path):
    """ProstateX-0218's 70 real DCE time points as prepared by the ingest: the pre frame and the frames
    nearest arrival + 85..365 s; untrained weights (geometry, times and finiteness are what is checked)."""
    from common.networks.iterunet import IterUNet

    case = prepared_prostatex["case"]
    torch.save(IterUNet("small").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    offsets = ("--frame_offsets_s", "[85,155,225,295,365]", "--mask_keys", "['organ_mask']", "--progress", "false")
    data = ("--case_dir", str(case), "--network_size", "small")
    h.evaluate(
        CONFIGS,
        tmp_path / "model.pt",
        out,
        *data,
        *offsets,
        files=["train.json", "inference.json"],
        runner=h.bundle_here,
    )
    src = nib.load(case / "dce.nii.gz")
    img = nib.load(out / case.name / "dce_synth.nii.gz")
    assert img.shape[:3] == src.shape[:3] and np.array_equal(img.affine, src.affine)
    assert np.isfinite(img.get_fdata()).all()
    all_times = np.array(json.loads((case / "dce_times.json").read_text())["times_s"])
    assert len(all_times) == src.shape[3] > 6
    kin = json.loads((out / case.name / "kinetics.json").read_text())
    t = np.array(kin["times_s"])
    spacing = float(np.max(np.diff(all_times)))
    # the series ends 299 s after its start: offsets past its end are dropped, at least 85/155/225 s remain
    assert len(t) >= 4 and t[0] <= 0 < t[1] and img.shape[3] == len(t) - 2  # pre before arrival; start phase = 85 s
    assert np.all(np.abs(t[1:] - [85, 155, 225, 295, 365][: len(t) - 1]) <= spacing / 2 + 1e-3)  # nearest frames
    assert kin["curve_region"] in (
        "organ_mask",
        "enhancing",
    )  # no lesion mask: the organ, else the most enhancing voxels
    (entry,) = kin["lesions"].values()
    assert len(entry["model"]["curve"]) == len(t) and np.isfinite(entry["model"]["curve"]).all()
    assert entry["model"]["kinetic_type"] in ("I", "II", "III") and (out / case.name / "kinetics.png").exists()
