"""D3M unit math: sigmoid schedule, v-prediction algebra, oracle DDIM chain with the warp, warp
geometry, smoothness and weighted losses, dual decoder independence, BraTS reader errors."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from common.engines import D3MPrepareBatch
from common.inferers.d3m import D3MInferer, warp, x0_eps_from_v
from common.losses import D3MLoss
from common.networks.d3m import D3MNetwork, DualDecoderDiffusionUNet
from common.schedulers.sigmoid import SigmoidDDIMScheduler

SMALL = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, norm_num_groups=4, num_head_channels=8)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_sigmoid_schedule_matches_the_closed_form():
    s = SigmoidDDIMScheduler(num_train_timesteps=1000)
    a = s.alphas_cumprod
    assert a.dtype == torch.float64 and a.shape == (1000,)
    f = lambda tau: (sig(3) - sig(6 * tau - 3)) / (sig(3) - sig(-3))  # noqa: E731  (f(0) = 1)
    for t in (0, 1, 249, 500, 750, 998):
        assert a[t].item() == pytest.approx(f((t + 1) / 1000), rel=1e-12, abs=1e-15)
    assert a[499].item() == pytest.approx(0.5, abs=1e-12)  # sigmoid(0) at mid-chain, by symmetry
    # the last beta would be 1 (f(1) = 0): clipped at 0.999
    assert s.betas[-1].item() == pytest.approx(0.999) and a[999].item() == pytest.approx(a[998].item() * 1e-3, rel=1e-9)
    # training calls do not turn it into float32 (MONAI's base class casts in place)
    x = torch.zeros(2, 1, 4, 4)
    s.add_noise(x, x, torch.tensor([3, 4]))
    s.get_velocity(x, x, torch.tensor([3, 4]))
    assert s.alphas_cumprod.dtype == torch.float64


def test_x0_and_eps_from_v_closed_forms_and_ddim_step():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    s = SigmoidDDIMScheduler()
    t = torch.tensor([10, 500, 900])
    a = s.alpha_bar(t, x0)
    x_t = s.add_noise(x0, eps, t)
    v = s.get_velocity(x0, eps, t)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    x0_hat, eps_hat = x0_eps_from_v(x_t, v, a)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    # MONAI's DDIM step (eta 0) is the paper's update sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat
    s.set_timesteps(4)  # 999, 666, 333, 0
    ap = s.alphas_cumprod[333].item()  # the next grid point (MONAI's base class would go to 666 - 250 = 416)
    x666 = s.add_noise(x0[1:2], eps[1:2], torch.tensor([666]))
    v666 = s.get_velocity(x0[1:2], eps[1:2], torch.tensor([666]))
    prev, x0_step = s.step(v666, 666, x666)
    assert torch.allclose(x0_step, x0[1:2], atol=1e-5)
    assert torch.allclose(prev, math.sqrt(ap) * x0[1:2] + math.sqrt(1 - ap) * eps[1:2], atol=1e-5)


class Oracle(torch.nn.Module):
    """Returns the true v for a fixed x0, v = (sqrt(abar) x_t - x0) / sqrt(1 - abar), and zero flow."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, alpha_bar):
        xt = x[:, :2]
        v = (alpha_bar.sqrt() * xt - self.x0) / (1 - alpha_bar).sqrt()
        return torch.cat([v, torch.zeros_like(v)], 1)


def test_oracle_chain_with_zero_flow_ends_at_x0():
    g = torch.Generator().manual_seed(1)
    x0 = (
        torch.rand(2, 2, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    )  # float64: v = (.)/sqrt(1 - abar) amplifies rounding
    inf = D3MInferer(SigmoidDDIMScheduler())
    for steps in (2, 10, 50):
        inf.scheduler.set_timesteps(steps)
        noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        out = inf.sample(noise, Oracle(x0), conditioning=torch.zeros(2, 3, 8, 8), verbose=False)
        assert out.shape == (2, 4, 8, 8)
        assert torch.allclose(out[:, :2], x0, atol=1e-9), steps
        assert torch.equal(out[:, 2:], torch.zeros_like(x0))


def test_zero_flow_is_the_exact_identity_and_a_constant_shift_moves_by_that_many_pixels():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 12, 10, generator=g)
    assert torch.equal(warp(x, torch.zeros(2, 2, 12, 10)), x)  # bit for bit, no half-pixel shift
    flow = torch.zeros(2, 2, 12, 10)
    flow[:, 0], flow[:, 1] = 2.0, -3.0
    y = warp(x, flow)
    assert torch.allclose(y[..., :10, 3:], x[..., 2:, :7], atol=1e-6)  # out[i, j] = x[i + 2, j - 3]
    assert torch.allclose(y[..., 10:, 3:], x[..., 11:12, :7].expand(-1, -1, 2, -1), atol=1e-6)  # border padding
    half = torch.zeros(2, 2, 12, 10)
    half[:, 1] = 0.5
    assert torch.allclose(warp(x, half)[..., :-1], (x[..., :-1] + x[..., 1:]) / 2, atol=1e-6)


def test_smoothness_loss_of_a_hand_made_field_and_the_alpha_bar_weighting():
    h, w = 9, 7
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    field = torch.stack([0.3 * ii, 0.2 * jj])[None]  # du_H/dH = 0.3, du_W/dW = 0.2, cross terms 0
    pred = torch.zeros(1, 5, h, w)
    pred[:, 2:4] = field
    loss = D3MLoss(image_weight=0.0, mask_weight=0.0, smooth_weight=1.0)(pred, torch.zeros(1, 2, h, w))
    assert loss.item() == pytest.approx((0.3**2 + 0.2**2) / 2, rel=1e-5)  # mean over the 2 components
    # abar-weighted MSE: sample 0 error 1 with abar 0.5, sample 1 error 2 with abar 0.25 (image only)
    pred = torch.zeros(2, 5, 4, 4)
    pred[0, 0], pred[1, 0], pred[1, 1] = 1.0, 2.0, 1.0
    pred[0, 4], pred[1, 4] = 0.5, 0.25
    lossf = D3MLoss(image_weight=1.0, mask_weight=10.0, smooth_weight=1.0)
    assert lossf(pred, torch.zeros(2, 2, 4, 4)).item() == pytest.approx((0.5 * 1 + 0.25 * 4) / 2 + 10 * (0.25 * 1) / 2)


def test_dual_decoder_outputs_have_independent_parameters():
    net = DualDecoderDiffusionUNet(in_channels=5, **SMALL)
    img_dec = {p.data_ptr() for m in (net.up_blocks, net.out) for p in m.parameters()}
    mask_dec = {p.data_ptr() for m in (net.mask_up_blocks, net.mask_out) for p in m.parameters()}
    assert img_dec and mask_dec and not img_dec & mask_dec
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([1, 700])
    out = net(x, t)
    assert out.shape == (2, 2, 8, 8)
    out[:, 0].sum().backward()  # the image output never reaches the mask decoder
    assert all(p.grad is None or not p.grad.any() for m in (net.mask_up_blocks, net.mask_out) for p in m.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.out.parameters())
    single = DualDecoderDiffusionUNet(in_channels=5, dual_decoder=False, **SMALL)  # the "without DSIMD" ablation
    assert single(x, t).shape == (2, 2, 8, 8) and not hasattr(single, "mask_up_blocks")


def test_training_forward_puts_the_deformation_in_the_graph():
    torch.manual_seed(0)
    net = D3MNetwork("small")
    for m in (net.denoiser.out, net.denoiser.mask_out):  # MONAI zero-initialises the heads: v = 0 would not depend on u
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.1)
    s = SigmoidDDIMScheduler()
    batch = {"image": torch.rand(2, 3, 16, 16), "label": torch.rand(2, 2, 16, 16) * 2 - 1}
    x0, target, _, kw = D3MPrepareBatch(s)(batch)
    assert torch.allclose(target, s.get_velocity(x0, kw["noise"], kw["timesteps"]))
    out = D3MInferer(s)(x0, net, **kw)
    assert out.shape == (2, 5, 16, 16)
    assert torch.allclose(out[:, 4, 0, 0], s.alphas_cumprod[kw["timesteps"]].float())
    assert torch.equal(out[:, 2:4], torch.zeros(2, 2, 16, 16))  # zero-initialised displacement head
    D3MLoss()(out, target).backward()
    assert net.displacement.head.weight.grad.abs().sum() > 0  # U is trained jointly through the warp
    ablation = D3MNetwork("small", deformation=False)
    assert ablation.displacement is None
    assert torch.equal(
        ablation(torch.rand(1, 5, 16, 16), torch.tensor([5]), torch.full((1, 1, 1, 1), 0.5))[:, 2:],
        torch.zeros(1, 2, 16, 16),
    )


def _write(path, data, affine=None):
    affine = np.eye(4) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))


def test_brats_reader_split_and_bad_inputs(tmp_path):
    from monai.transforms import LoadImaged

    from common.data.brats import BratsMasksd, brats_datalist, split_cases
    from common.transforms import CheckSameGridd

    split = split_cases([f"c{i}" for i in range(10)], seed=0)
    assert [len(split[k]) for k in ("training", "validation", "test")] == [8, 1, 1]
    assert split == split_cases([f"c{i}" for i in reversed(range(10))], seed=0)  # order-independent, seeded
    root = tmp_path / "brats"
    rng = np.random.default_rng(0)
    for i in range(3):
        c = f"BraTS-GLI-{i:05d}-000"
        for k in ("t1n", "t1c", "t2w", "t2f"):
            _write(root / c / f"{c}-{k}.nii.gz", rng.random((6, 6, 4)))
        seg = np.zeros((6, 6, 4))
        seg[2:4, 2:4, 1:3] = 3
        seg[1, 1, 1] = 2
        _write(root / c / f"{c}-seg.nii.gz", seg)
    listed = tmp_path / "out" / "datalist.json"
    train = brats_datalist(root, "training", ("t1n", "t2w", "t2f", "t1c", "seg"), datalist_file=listed)
    assert len(train) == 1 and not (root / "datalist.json").exists()  # never written into the data folder
    assert sorted(json.loads(listed.read_text())) == ["split", "test", "training", "validation"]
    c = train[0]["id"]
    d = LoadImaged(["t1n", "t2w", "seg"], ensure_channel_first=True, image_only=True)(train[0])
    m = BratsMasksd()(d)
    assert set(torch.unique(m["et"]).tolist()) == {-1.0, 1.0} and m["et"].eq(1).sum() == 8
    assert m["tumour"].sum() == 9 and m["brain"].sum() == (d["t1n"] > 0).sum()
    with pytest.raises(ValueError, match=f"{c}-seg.nii.gz.*no enhancing"):
        BratsMasksd(et_labels=[4], require_et=True)(d)
    assert BratsMasksd(et_labels=[4])(d)["et"].eq(-1).all()  # ET-free is allowed by default: all -1
    # contrasts on different grids
    _write(root / c / f"{c}-t2w.nii.gz", rng.random((6, 6, 4)), np.diag([2.0, 1, 1, 1]))
    d = LoadImaged(["t1n", "t2w"], ensure_channel_first=True, image_only=True)(train[0])
    with pytest.raises(ValueError, match=f"{c}-t2w.nii.gz.*not on the grid of.*{c}-t1n.nii.gz.*prepare_brain.py"):
        CheckSameGridd(["t2w"], "t1n", hint="scripts/prepare_brain.py")(d)
    # a missing contrast names the expected file
    (root / c / f"{c}-t2f.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing input t2f.*{c}-t2f.nii.gz"):
        brats_datalist(root, "training")


def test_panel_outlines_the_predicted_and_true_et_mask(tmp_path):
    """The writer's panel draws the predicted ET (red) and the true ET (green) outlines on the T1c."""
    import matplotlib.image as mpimg

    from common.handlers.d3m import D3MWriter
    from common.visualize import CONTOUR_COLOURS, synthesis_panel

    pred, true = torch.zeros(1, 32, 32, 3), torch.zeros(1, 32, 32, 3)
    pred[0, 8:16, 8:16, 1], true[0, 18:26, 18:26, 1] = 1, 1
    w = D3MWriter(output_dir=str(tmp_path), output_names=["t1c"], geometry_key="t1n", input_keys=["t1n"])
    got = w.panel_contours({}, {"et_mask": pred, "label_mask": true}, z=1)
    assert list(got) == ["t1c"] and list(got["t1c"]) == ["predicted ET", "true ET"]
    assert got["t1c"]["predicted ET"].sum() == 64 and got["t1c"]["true ET"][18:26, 18:26].all()
    assert w.panel_contours({}, {"et_mask": None}, z=1) is None
    img = np.full((32, 32), 0.5, np.float32)
    path = synthesis_panel(tmp_path / "p.png", {"t1n": img}, {"t1c": img}, {"t1c": img}, contours=got)
    rgb = mpimg.imread(path)[..., :3]

    def n_pixels(image: np.ndarray, hex_colour: str) -> int:
        c = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(image - c).max(-1) < 0.08).sum())

    assert n_pixels(rgb, CONTOUR_COLOURS[0]) > 40 and n_pixels(rgb, CONTOUR_COLOURS[1]) > 40  # both outlines drawn
    plain = mpimg.imread(synthesis_panel(tmp_path / "q.png", {"t1n": img}, {"t1c": img}, {"t1c": img}))[..., :3]
    assert n_pixels(plain, CONTOUR_COLOURS[0]) == 0
