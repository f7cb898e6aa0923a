"""Bundle plumbing: batch preparation, volume inferer, writers, data lists, checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.engines.utils import default_prepare_batch

from common.bundle import bundle_root, latest_checkpoint
from common.data import case_or_datalist, load_datalist
from common.engines import ConditionalDiffusionPrepareBatch
from common.handlers import SynthesisWriter, score_case
from common.handlers.metrics import enhancement_scores
from common.inferers import DiffusionVolumeInferer
from common.io import save_nifti
from common.transforms import CopyChannelsd, SplitSamplesd


class EchoSampler:
    """A stand-in 2D sampler: output = 2 * first condition channels + noise_scale * noise."""

    def __init__(self, noise_scale=0.0):
        self.noise_scale = noise_scale
        self.batch_sizes = []

    def sample(self, input_noise, diffusion_model, conditioning, mode, verbose):
        self.batch_sizes.append(conditioning.shape[0])
        return 2 * conditioning[:, : input_noise.shape[1]] + self.noise_scale * input_noise


def oblique_affine():
    a = np.eye(4)
    th = np.deg2rad(10)
    rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    a[:3, :3] = rot @ np.diag([1.6, 1.6, 3.6])
    a[:3, 3] = [-120.5, -80.25, 30.0]
    return a


def test_prepare_batch_targets():
    batch = {"image": torch.randn(2, 3, 8, 8), "label": torch.randn(2, 2, 8, 8)}
    torch.manual_seed(0)
    x0, target, args, kw = ConditionalDiffusionPrepareBatch(15, predict="x0")(batch)
    assert torch.equal(x0, batch["label"]) and torch.equal(target, batch["label"])
    assert torch.equal(kw["condition"], batch["image"]) and kw["noise"].shape == (2, 2, 8, 8)
    assert kw["timesteps"].min() >= 0 and kw["timesteps"].max() < 15
    _, target, _, kw = ConditionalDiffusionPrepareBatch(1000, predict="noise")(batch)
    assert torch.equal(target, kw["noise"])
    # evaluation uses MONAI's default_prepare_batch: (condition, None) for a case without a target
    cond, tgt = default_prepare_batch({"image": batch["image"]})
    assert tgt is None and torch.equal(cond, batch["image"])
    with pytest.raises(KeyError, match="label"):
        ConditionalDiffusionPrepareBatch(15)({"image": batch["image"]})


def test_volume_inferer_slices_padding_and_geometry():
    vol = torch.arange(2 * 3 * 20 * 18 * 5, dtype=torch.float32).reshape(2, 3, 20, 18, 5)
    aff = torch.as_tensor(oblique_affine())
    inputs = MetaTensor(vol, affine=aff)
    sampler = EchoSampler()
    inf = DiffusionVolumeInferer(sampler, out_channels=2, spatial_divisor=16, progress=False)
    out = inf(inputs, network=None)
    assert out.shape == (2, 2, 20, 18, 5)
    assert torch.allclose(out, 2 * vol[:, :2])  # each slice mapped to itself, padding cropped back
    assert torch.allclose(out.affine, aff.to(out.affine.dtype))
    assert sampler.batch_sizes == [10]  # all slices of both volumes in one batch per step
    sampler2 = EchoSampler()
    out2 = DiffusionVolumeInferer(sampler2, out_channels=2, slice_batch_size=4, progress=False)(inputs, None)
    assert torch.equal(out, out2) and sampler2.batch_sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="NaN"):
        inf(torch.full((1, 3, 8, 8, 2), float("nan")), None)


def test_volume_inferer_repeated_sampling_mean_std():
    vol = torch.zeros(1, 1, 16, 16, 4)
    inf = DiffusionVolumeInferer(EchoSampler(noise_scale=1.0), out_channels=1, num_samples=64, seed=3, progress=False)
    out = inf(vol, None)
    assert out.shape == (1, 3, 16, 16, 4)  # mean, std, first draw
    mean, std = out[:, 0], out[:, 1]
    assert abs(float(mean.mean())) < 0.05 and abs(float(std.mean()) - 1.0) < 0.05
    assert torch.equal(
        out, DiffusionVolumeInferer(EchoSampler(1.0), 1, num_samples=64, seed=3, progress=False)(vol, None)
    )
    # the first draw is what a single-sample run with the same seed gives (unit-variance noise here)
    single = DiffusionVolumeInferer(EchoSampler(1.0), 1, num_samples=1, seed=3, progress=False)(vol, None)
    assert single.shape == (1, 1, 16, 16, 4) and torch.equal(out[:, 2:], single)
    assert abs(float(out[:, 2].std()) - 1.0) < 0.05 and float(out[:, 2].std()) > 5 * float(mean.std())
    d = SplitSamplesd("pred", out_channels=1)({"pred": out[0]})
    assert torch.equal(d["pred"], out[0, :1]) and torch.equal(d["pred_std"], out[0, 1:2])
    assert torch.equal(d["pred_first"], out[0, 2:])
    with pytest.raises(ValueError, match="pred: 4 channels, expected 1, 2 or 3"):
        SplitSamplesd("pred", out_channels=1)({"pred": torch.zeros(4, 2, 2, 1)})


def test_copy_channels_baseline():
    img = torch.stack([torch.full((2, 2, 1), float(i)) for i in range(3)])
    d = CopyChannelsd("image", ["t2w", "adc", "dce_pre"], {"baseline_copy_pre": ["dce_pre"] * 3})({"image": img})
    assert torch.equal(d["baseline_copy_pre"], torch.full((3, 2, 2, 1), 2.0))
    with pytest.raises(ValueError, match="pd"):
        CopyChannelsd("image", ["t2w"], {"b": ["pd"]})


def test_writer_exact_geometry_and_no_overwrite(tmp_path):
    aff = oblique_affine()
    src = save_nifti(np.random.rand(12, 10, 4), aff, tmp_path / "in" / "c1" / "dce_pre.nii.gz")
    item = {"id": "c1", "dce_pre": MetaTensor(torch.rand(1, 12, 10, 4), meta={"filename_or_obj": str(src)})}
    pred = torch.rand(2, 12, 10, 4)
    writer = SynthesisWriter(
        tmp_path / "out", ["dce_early", "dce_late"], geometry_key="dce_pre", input_keys=["dce_pre"]
    )
    written = writer.write_case(item, {"pred": pred, "label": pred + 0.1})
    img = nib.load(written["dce_late"])
    assert np.array_equal(img.affine, nib.load(src).affine)
    assert np.allclose(img.get_fdata(), pred[1].numpy(), atol=1e-6)
    assert (tmp_path / "out" / "c1" / "panel.png").stat().st_size > 1000
    assert not list((tmp_path / "out").rglob("*.tmp*"))
    bad = SynthesisWriter(tmp_path / "in", ["dce_pre"], geometry_key="dce_pre", input_keys=["dce_pre"], panel=False)
    with pytest.raises(FileExistsError):
        bad.write_case(item, {"pred": pred[:1]})
    # a target file loaded with the case is protected too, and an id that is a path stays a name
    tgt = save_nifti(np.zeros((12, 10, 4)), aff, tmp_path / "in" / "c1" / "dce_late.nii.gz")
    item2 = dict(
        item,
        id=str(tmp_path / "in" / "c1"),
        dce_late=MetaTensor(torch.zeros(1, 12, 10, 4), meta={"filename_or_obj": str(tgt)}),
    )
    with pytest.raises(FileExistsError):
        SynthesisWriter(tmp_path / "in", ["dce_late"], geometry_key="dce_pre", panel=False).write_case(
            item2, {"pred": pred[:1]}
        )
    assert np.all(nib.load(tgt).get_fdata() == 0)
    w = SynthesisWriter(tmp_path / "elsewhere", ["dce_late"], geometry_key="dce_pre", panel=False).write_case(
        item2, {"pred": pred[:1]}
    )
    assert w["dce_late"] == str(tmp_path / "elsewhere" / "c1" / "dce_late.nii.gz")


def test_score_case_known_values():
    target = np.zeros((1, 16, 12, 2), np.float32)
    target[0, 2:14, 2:6] = 1.0
    pred = target.copy()
    pred[0, 0, 0, 0] = 0.5  # one voxel off by 0.5 of the range, outside the mask
    mask = {"organ_mask": target[0] > 0}
    rows = {r["region"]: r for r in score_case(pred, target, mask, ["late"], reference=np.zeros_like(target))}
    mse = 0.25 / 384
    assert rows["whole"]["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    assert rows["whole"]["mae"] == pytest.approx(0.5 / 384, rel=1e-5)
    assert rows["organ_mask"]["mae"] == 0.0 and rows["organ_mask"]["enh_rel_err"] == 0.0


def test_a_phase_scores_the_same_whatever_other_phases_are_scored():
    """Each phase is normalised by its own target's percentiles: scoring early alone and early next to
    a brighter late phase give the same figures (a method with two phases compares with one with three)."""
    from common.handlers.metrics import channel_ranges, target_range

    rng = np.random.default_rng(3)
    target = np.stack([rng.random((12, 12, 3)) * 100, rng.random((12, 12, 3)) * 400 + 50]).astype(np.float32)
    pred = target + rng.standard_normal(target.shape).astype(np.float32) * 5
    ref = np.repeat(target[:1] * 0.5, 2, axis=0)
    both = [r for r in score_case(pred, target, {}, ["early", "late"], reference=ref) if r["phase"] == "early"]
    alone = score_case(pred[:1], target[:1], {}, ["early"], reference=ref[:1])
    assert both == alone
    lo, scale = channel_ranges(target)
    assert lo.shape == scale.shape == (2, 1, 1, 1)
    for c in range(2):
        assert (lo[c].item(), scale[c].item()) == pytest.approx(target_range(target[c]))
    # closed form: PSNR of the early phase with data range = its 0.5-99.5 percentile span
    span = np.subtract(*np.percentile(target[0], (99.5, 0.5)))
    mse = np.mean(((pred[0] - target[0]) / span) ** 2)
    assert alone[0]["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)


def test_enhancement_scores_baseline_and_perfect():
    rng = np.random.default_rng(0)
    pre = rng.random((8, 8, 2))
    post = pre + rng.random((8, 8, 2))  # some enhancement everywhere
    copy_pre = enhancement_scores(pre - pre, post - pre)
    assert copy_pre["enh_rel_err"] == 1.0 and np.isnan(copy_pre["enh_corr"])
    perfect = enhancement_scores(post - pre, post - pre)
    assert perfect["enh_rel_err"] == 0.0 and perfect["enh_corr"] == pytest.approx(1.0)
    half = enhancement_scores(0.5 * (post - pre), post - pre)
    assert half["enh_rel_err"] == pytest.approx(0.5) and half["enh_corr"] == pytest.approx(1.0)


def test_datalist_errors_and_case_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_phantoms"):
        load_datalist(tmp_path, "training")
    case = tmp_path / "p1"
    save_nifti(np.ones((4, 4, 2)), np.eye(4), case / "t2w.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"id": "p1", "t2w": "p1/t2w.nii.gz"}]}))
    items = load_datalist(tmp_path, "training", ["t2w"])
    assert items[0]["t2w"] == str(case / "t2w.nii.gz") and items[0]["id"] == "p1"  # the id stays an id
    with pytest.raises(KeyError, match="p1 has no 'adc'"):
        load_datalist(tmp_path, "training", ["t2w", "adc"])
    with pytest.raises(FileNotFoundError, match="adc.nii.gz"):
        case_or_datalist(case, tmp_path, "test", ["t2w", "adc"])
    assert case_or_datalist(case, tmp_path, "test", ["t2w"])[0]["t2w"] == str(case / "t2w.nii.gz")


def test_bundle_root_and_latest_checkpoint(tmp_path, monkeypatch):
    from monai.bundle import create_workflow

    b = tmp_path / "copied_bundle"
    (b / "configs").mkdir(parents=True)
    (b / "configs" / "metadata.json").write_text("{}")
    (b / "configs" / "x.json").write_text(
        '{"root": "$common.bundle.bundle_root()", "run": ["$@root"], "imports": ["$import common"]}'
    )
    wf = create_workflow(config_file=str(b / "configs" / "x.json"), logging_file=False)  # the config file's folder
    assert wf.run() == [str(b)]
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file", f"{b}/configs/x.json"])
    assert bundle_root("resdce").endswith("bundles/resdce")  # a bare parse: the default, never a regex over argv
    with pytest.raises(ValueError, match="pass --bundle_root"):
        bundle_root()
    assert latest_checkpoint(tmp_path / "none") == ""
    for n in (2, 10, 3):
        torch.save({"trainer": {"iteration": n}}, tmp_path / f"checkpoint_epoch={n}.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


def test_flag_reads_command_line_booleans():
    from common.bundle import flag

    for v in (True, "true", "True", " yes", "1", 1, "on"):
        assert flag(v) is True
    for v in (False, "false", "False", "no", "0", 0, "", None, "off"):
        assert flag(v) is False
    with pytest.raises(ValueError, match="resume: expected true or false, got 'maybe'"):
        flag("maybe", "resume")


def test_checkpoint_record_travels_with_the_weights(tmp_path):
    """The network preset and schedule are saved beside the weights; inference takes the preset from
    the checkpoint and stops, naming each setting and the override, on a mismatch."""
    from common.bundle import ConfigRecord, check_checkpoint, recorded_setting

    net = torch.nn.Linear(2, 3)
    rec = ConfigRecord(network_size="paper", kappa=2.0, target_keys=("dce_early", "dce_late"))
    assert rec.state_dict() == {"network_size": "paper", "kappa": 2.0, "target_keys": ["dce_early", "dce_late"]}
    path = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "config": rec.state_dict()}, path)  # as CheckpointSaver writes it
    assert recorded_setting(path, "network_size", "small") == "paper"
    assert recorded_setting(tmp_path / "absent.pt", "network_size", "small") == "small"
    assert check_checkpoint(path, ConfigRecord(network_size="paper", kappa=2.0)) == str(path)
    with pytest.raises(ValueError) as e:
        check_checkpoint(path, ConfigRecord(network_size="small", kappa=1.0))
    msg = str(e.value)
    assert str(path) in msg and "network_size: the checkpoint has 'paper', this run 'small'" in msg
    assert "--network_size paper" in msg and "--kappa 2.0" in msg
    # a checkpoint without a record (older weights) is accepted; a truncated file is named
    torch.save(net.state_dict(), tmp_path / "old.pt")
    assert check_checkpoint(tmp_path / "old.pt", rec)
    (tmp_path / "broken.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the checkpoint .*broken.pt"):
        check_checkpoint(tmp_path / "broken.pt", rec)


def test_batch_size_is_slices_per_step_and_iterations_are_exact():
    from ignite.engine import Engine, Events

    from common.bundle import positive_int, slice_batching, training_epochs
    from common.handlers import StopAtIteration

    assert slice_batching(8, 4) == (2, 4) and slice_batching(6, 4) == (2, 3) and slice_batching(2, 4) == (1, 2)
    assert slice_batching(7, 4) == (7, 1) and slice_batching(16, 4) == (4, 4)
    for b, s in ((8, 4), (6, 4), (2, 4), (5, 2), (12, 5)):
        v, k = slice_batching(b, s)
        assert v * k == b and k <= s
    assert (
        training_epochs(5, 2) == (3, 2) and training_epochs(3, 500) == (1, 3) and training_epochs(1000, 500) == (2, 500)
    )
    for bad, name in ((0, "batch_size"), (-4, "batch_size"), ("x", "batch_size"), (2.5, "batch_size")):
        with pytest.raises(ValueError, match=f"--{name}: expected a whole number >= 1, got"):
            positive_int(bad, name)
    with pytest.raises(ValueError, match="--num_iterations"):
        training_epochs(0, 10)
    with pytest.raises(ValueError, match="--epoch_length"):
        training_epochs(10, 0)
    # 5 iterations with epochs of 2: exactly 5, and COMPLETED still fires (final checkpoint)
    epochs, length = training_epochs(5, 2)
    engine = Engine(lambda e, b: None)
    StopAtIteration(5).attach(engine)
    done, epochs_done = [], []
    engine.add_event_handler(Events.COMPLETED, lambda e: done.append(e.state.iteration))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_done.append(e.state.iteration))
    engine.run(range(length), max_epochs=epochs, epoch_length=length)
    assert engine.state.iteration == 5 and done == [5] and epochs_done == [2, 4, 5]  # validation runs on the last
    # a multiple of the epoch length is left alone
    engine = Engine(lambda e, b: None)
    StopAtIteration(4).attach(engine)
    engine.run(range(2), max_epochs=2, epoch_length=2)
    assert engine.state.iteration == 4 and engine.state.epoch == 2


def test_a_warm_up_longer_than_a_quarter_of_the_run_is_named(caplog):
    """DCE-diff's paper warm-up (10,000 iterations) in a 300-iteration run leaves the learning rate at
    3 % of --lr at the end: the config's ``train#warmup`` warns once, naming the setting, and keeps it."""
    import logging

    from monai.bundle import ConfigParser

    from common.bundle import warmup_length

    with caplog.at_level(logging.WARNING, logger="common.bundle"):
        assert warmup_length(10000, 300) == 10000
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "--warmup_steps 10000" in msg and "300 of the run's 300 iterations" in msg and "3 % of" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.bundle"):
        assert warmup_length(50, 300) == 50 and warmup_length(0, 300) == 1
    assert not caplog.records
    p = ConfigParser()
    p.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / "dcediff" / "configs" / "train.json"))
    p.update({"num_iterations": 300, "warmup_steps": 100, "network_size": "small", "device": "cpu"})
    sched = p.get_parsed_content("train#lr_scheduler")
    assert sched.total_iters == 100 and sched.start_factor == pytest.approx(0.01)
