"""iterU-Net pieces against closed forms and hand computations: TI-norm, the ConvLSTM step, the
residual output, the chain (state reset, recursive unrolling), the kinetic-type rule, SCC/DTW, the loss,
the frame selection and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.stats import spearmanr

from common.inferers.iterunet import (
    IterUNetVolumeInferer,
    check_init_ckpt,
    copy_forward,
    linear_extrapolation,
    run_chain,
    train_mode,
)
from common.losses import GradientDifferenceLoss, IterUNetLoss
from common.metrics.kinetic import curve_spearman, dtw_distance, kinetic_type, relative_change
from common.networks.iterunet import ConvLSTMCell, IterUNet
from common.transforms import CheckSameGridd, TINormd
from common.transforms.phases import DCEFramesd

TIMES = torch.tensor([0.0, 85.0, 155.0, 225.0, 295.0, 365.0])


def tiny_net(**kw) -> IterUNet:
    torch.manual_seed(0)
    return IterUNet("small", features=(4, 4, 4, 4, 4, 4), time_dim=8, **kw)


def test_tinorm_against_a_hand_computed_array():
    # 3 time points of 4 voxels; reference = time point 1 = [2, 4, 4, 6]: mean 4, population std sqrt(2)
    x = np.array([[1, 1, 1, 1], [2, 4, 4, 6], [4, 8, 8, 12]], np.float32).reshape(3, 2, 2, 1)
    out = TINormd("dce", ref_index=1)({"dce": x})
    s = math.sqrt(2.0)
    expected = np.array([[-3, -3, -3, -3], [-2, 0, 0, 2], [0, 4, 4, 8]], np.float64).reshape(3, 2, 2, 1) / s
    np.testing.assert_allclose(np.asarray(out["dce"]), expected, rtol=1e-6)
    assert float(out["dce_tinorm"]["mean"][0]) == 4.0 and float(out["dce_tinorm"]["std"][0]) == pytest.approx(s)
    # statistics inside a mask (the breast): voxels 1 and 2 of the reference = [4, 4]... plus voxel 3 -> [4, 4, 6]
    mask = np.array([0, 1, 1, 1], np.uint8).reshape(1, 2, 2, 1)
    out = TINormd("dce", ref_index=1, mask_key="m")({"dce": x, "m": mask})
    mean, std = 14 / 3, math.sqrt(((4 - 14 / 3) ** 2 * 2 + (6 - 14 / 3) ** 2) / 3)
    np.testing.assert_allclose(np.asarray(out["dce"])[2].ravel(), (np.array([4, 8, 8, 12]) - mean) / std, rtol=1e-6)


def test_convlstm_cell_against_a_hand_written_step():
    cell = ConvLSTMCell(3, in_channels=1, hidden_channels=1, kernel_size=1)
    w = torch.tensor([[0.5, -1.0], [1.0, 0.5], [2.0, 1.0], [-0.5, 1.5]])  # rows i, f, g, o; columns x, h
    b = torch.tensor([0.1, -0.2, 0.0, 0.3])
    with torch.no_grad():
        cell.conv.weight.copy_(w.reshape(4, 2, 1, 1, 1))
        cell.conv.bias.copy_(b)
    x, h0, c0 = 0.8, -0.4, 1.2
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    pre = [float(w[k, 0]) * x + float(w[k, 1]) * h0 + float(b[k]) for k in range(4)]
    c1 = sig(pre[1]) * c0 + sig(pre[0]) * math.tanh(pre[2])
    h1 = sig(pre[3]) * math.tanh(c1)
    full = lambda v: torch.full((1, 1, 2, 2, 2), v)  # noqa: E731
    h, (hs, cs) = cell(full(x), (full(h0), full(c0)))
    assert torch.allclose(h, full(h1), atol=1e-6) and torch.allclose(cs, full(c1), atol=1e-6) and torch.equal(h, hs)
    # no state: zeros (a new case)
    h, (_, cs) = cell(full(x))
    c_zero = sig(w[0, 0].item() * x + b[0].item()) * math.tanh(w[2, 0].item() * x + b[2].item())
    assert torch.allclose(cs, full(c_zero), atol=1e-6)


def test_zeroed_last_conv_returns_the_input_frame_exactly():
    net = tiny_net().eval()
    with torch.no_grad():
        net.final_conv.weight.zero_()
        net.final_conv.bias.zero_()
    x = torch.randn(2, 2, 16, 16, 8)
    y, state = net(x, torch.tensor([155.0, 225.0]))
    assert torch.equal(y, x[:, 1:2]) and state is not None
    y, state = IterUNet("small", temporal=False).eval()(x)
    assert y.shape == (2, 1, 16, 16, 8) and state is None


def test_time_embedding_in_seconds_changes_the_output_and_is_off_without_temporal_information():
    x = torch.randn(1, 2, 16, 16, 8)
    net = tiny_net().eval()
    with torch.no_grad():
        assert not torch.allclose(net(x, 155.0)[0], net(x, 365.0)[0])
        flat = IterUNet("small", temporal=False).eval()
        assert torch.equal(flat(x, 155.0)[0], flat(x, 365.0)[0])
        assert not hasattr(flat, "lstm") and not hasattr(flat, "time_mlp")
    assert sum(p.numel() for p in IterUNet("paper").parameters()) == pytest.approx(
        6.0e6, rel=0.02
    )  # notebooks: about 6M


def test_state_starts_fresh_for_each_case_and_persists_within_a_chain():
    net = tiny_net().eval()
    a, b = torch.randn(1, 6, 16, 16, 8), torch.randn(1, 6, 16, 16, 8)
    with torch.no_grad():
        ya = run_chain(net, a, TIMES, 1, "recursive")
        run_chain(net, b, TIMES, 1, "recursive")  # another case in between
        assert torch.equal(run_chain(net, a, TIMES, 1, "recursive"), ya)  # nothing carried over
        # within the chain the state is carried: step 2 by hand with a reset state differs
        y1, st = net(torch.cat([a[:, :1], a[:, 1:2]], 1), 155.0, None)
        y2, _ = net(torch.cat([a[:, :1], y1], 1), 225.0, st)
        y2_reset, _ = net(torch.cat([a[:, :1], y1], 1), 225.0, None)
        assert torch.allclose(ya[:, 0:1], y1) and torch.allclose(ya[:, 1:2], y2, atol=1e-6)
        assert not torch.allclose(y2, y2_reset)


def test_recursive_unrolling_uses_its_own_outputs_not_the_real_frames():
    net = tiny_net().eval()
    s = torch.randn(1, 6, 16, 16, 8)
    with torch.no_grad():
        y = run_chain(net, s, TIMES, 1, "recursive")
        p = s.clone()
        p[:, 2:] += 5.0  # perturb the real later frames: the recursive chain never sees them
        assert torch.equal(run_chain(net, p, TIMES, 1, "recursive"), y)
        assert not torch.allclose(run_chain(net, p, TIMES, 1, "teacher"), run_chain(net, s, TIMES, 1, "teacher"))
    # by gradient: output k depends on output k-1 (it is the input), not on the real frame k
    s = s.requires_grad_(True)
    seen = []
    orig = net.forward
    net.forward = lambda x, t, st=None: (seen.append(x), orig(x, t, st))[1]
    y = run_chain(net, s, TIMES, 1, "recursive")
    assert torch.equal(seen[1][:, 1:2], y[:, 0:1])  # step 2's input frame IS step 1's output
    (g,) = torch.autograd.grad(y[:, 1].sum(), s)
    assert g[:, 2].abs().sum() == 0 and g[:, 1].abs().sum() > 0  # real frame 2 unused; the acquired frame 1 used
    # direct (single-time-point baseline): every target from the acquired frame
    seen.clear()
    run_chain(net, s.detach(), TIMES, 1, "direct")
    assert all(torch.equal(x[:, 1:2], s.detach()[:, 1:2]) for x in seen) and len(seen) == 4


def test_sliding_window_inference_covers_the_volume_with_one_chain_per_window():
    net = tiny_net().eval()
    with torch.no_grad():
        net.final_conv.weight.zero_()
        net.final_conv.bias.zero_()
    s = torch.randn(1, 6, 24, 16, 12)
    out = IterUNetVolumeInferer([16, 16, 16], start=1)(s, net, TIMES[None])  # 2 windows; z cropped to the volume
    # zero residual: every predicted phase is the acquired start phase, blended windows included
    assert out.shape == (1, 4, 24, 16, 12) and torch.allclose(out, s[:, 1:2].expand(-1, 4, -1, -1, -1), atol=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        IterUNetVolumeInferer([16, 16, 8], mode="teacher")


def test_kinetic_type_rule_on_constructed_curves():
    t = [0, 85, 155, 225, 295, 365]
    assert kinetic_type([100, 200, 215, 225, 235, 240], t) == "I"  # +20 % of the early signal
    assert kinetic_type([100, 200, 205, 200, 195, 190], t) == "II"  # -5 %
    assert kinetic_type([100, 200, 190, 180, 170, 150], t) == "III"  # -25 %
    assert kinetic_type([100, 200, 0, 0, 0, 219], t, threshold=0.1) == "II"  # +9.5 %: inside +-10 %
    # relative to the early ENHANCEMENT (200 - 100 = 100): +15 / 100 = +15 % -> I; relative to signal +7.5 % -> II
    assert relative_change([100, 200, 0, 0, 0, 215], t, "enhancement") == pytest.approx(0.15)
    assert kinetic_type([100, 200, 0, 0, 0, 215], t, relative_to="enhancement") == "I"
    assert kinetic_type([100, 200, 0, 0, 0, 215], t) == "II"
    from common.phantoms import breast

    assert breast.kinetic_type is kinetic_type and breast.relative_change is relative_change  # one source


def test_scc_against_scipy_and_dtw_against_a_hand_computed_table():
    a, b = [1.0, 3.0, 2.0, 5.0, 4.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    assert (
        curve_spearman(a, b) == pytest.approx(spearmanr(a, b).statistic) == pytest.approx(0.3)
    )  # 1 - 6 * 14 / (5 * 24)
    # x = [0, 1, 2], y = [0, 2]: cost [[0, 2], [1, 1], [2, 0]] -> D = [[0, 2], [1, 1], [3, 1]]
    assert dtw_distance([0, 1, 2], [0, 2]) == 1.0
    assert dtw_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert dtw_distance([0, 0], [1, 1, 1]) == 3.0


def test_loss_terms_closed_forms_and_the_perceptual_term_needs_local_weights(tmp_path):
    gdl = GradientDifferenceLoss()
    ramp = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8).contiguous()
    # |d ramp| = 1 along x, 0 along y and z; target flat -> mean over axes of (1, 0, 0) = 1/3
    assert float(gdl(ramp, torch.zeros_like(ramp))) == pytest.approx(1 / 3)
    loss = IterUNetLoss()
    x = torch.randn(2, 4, 16, 16, 8)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    l1_only = IterUNetLoss(l1_weight=1.0, ssim_weight=0.0, gdl_weight=0.0)
    assert float(l1_only(x, x + 0.5)) == pytest.approx(4 * 0.5)  # summed over the 4 steps
    with pytest.raises(FileNotFoundError, match="MedicalNet"):
        IterUNetLoss(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        IterUNetLoss(perceptual_weight=1.0, perceptual_weights_path=str(tmp_path))


def test_baselines_closed_forms():
    s = np.stack([np.full((2, 2, 1), v, np.float32) for v in (100, 160, 0, 0)])  # pre 100, acquired 160 at 85 s
    t = [0.0, 85.0, 170.0, 255.0]
    assert np.array_equal(copy_forward(s, 1, 4), np.full((2, 2, 2, 1), 160.0))
    np.testing.assert_allclose(linear_extrapolation(s, t, 1)[:, 0, 0, 0], [220.0, 280.0])


def test_frame_selection_stages_and_bad_input_name_the_file(tmp_path):
    import json

    (tmp_path / "dce_times.json").write_text(json.dumps({"times_s": [0, 10, 20, 30, 95, 165, 230]}))
    meta = {"filename_or_obj": str(tmp_path / "dce.nii.gz")}
    curve = np.array([10, 10, 10, 50, 60, 55, 50], np.float32)  # arrival at 30 s
    x = MetaTensor(torch.as_tensor(curve[:, None, None, None] * np.ones((7, 4, 4, 2), np.float32)), meta=meta)
    d = DCEFramesd("dce", frame_offsets_s=[65, 135, 200], min_frames=3)({"dce": x})
    assert d["dce_frames"].tolist() == [2, 4, 5, 6] and d["dce_times_s"].tolist() == [-10.0, 65.0, 135.0, 200.0]
    d = DCEFramesd("dce", frame_offsets_s=[65, 135, 200, 300])({"dce": x})  # 300 s after arrival: past the end, dropped
    assert d["dce_frames"].tolist() == [2, 4, 5, 6]
    d = DCEFramesd("dce")({"dce": x})  # the phantoms: every frame, dce_times.json beside the series
    assert d["dce_times_s"].tolist() == [0, 10, 20, 30, 95, 165, 230] and d["dce"].shape[0] == 7
    (tmp_path / "dce_times.json").write_text(json.dumps({"times_s": [0, 85]}))
    with pytest.raises(ValueError, match=r"dce.nii.gz: 2 frame\(s\), the chain needs at least 3"):
        DCEFramesd("dce", min_frames=3)({"dce": x[:2]})
    other = MetaTensor(
        torch.ones(1, 4, 4, 2),
        affine=torch.diag(torch.tensor([2.0, 2, 2, 1])),
        meta={"filename_or_obj": str(tmp_path / "lesion_mask.nii.gz")},
    )
    with pytest.raises(ValueError, match=r"lesion_mask.nii.gz \(lesion_mask\): not on the grid of .*dce.nii.gz"):
        CheckSameGridd(["lesion_mask"], "dce")({"dce": x, "lesion_mask": other})
    assert train_mode("warmup") == "teacher" and train_mode("recursive") == "recursive"
    assert train_mode("recursive", "direct") == "direct"
    with pytest.raises(ValueError, match="stage"):
        train_mode("finetune")
    with pytest.raises(FileNotFoundError, match="--stage warmup"):
        check_init_ckpt(str(tmp_path / "none.pt"))
    assert check_init_ckpt("") == "" and check_init_ckpt(str(tmp_path / "none.pt"), "resume.pt") == ""
