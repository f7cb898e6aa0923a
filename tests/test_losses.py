"""Res-SRDiff loss (common.losses): lambda * L2 (+ LPIPS from a local weights file)."""

from __future__ import annotations

import logging

import pytest
import torch

from common.losses import LPIPS_DISABLED_MESSAGE, WeightedL2PerceptualLoss


def test_l2_only_is_ten_times_mse_hand_computed(caplog):
    with caplog.at_level(logging.INFO, logger="common.losses"):
        loss_fn = WeightedL2PerceptualLoss()
    ours = [r for r in caplog.records if r.name.startswith("common.losses")]
    assert [r.getMessage() for r in ours] == [LPIPS_DISABLED_MESSAGE]  # exactly one line
    assert ours[0].levelno == logging.WARNING
    assert (
        LPIPS_DISABLED_MESSAGE == "LPIPS disabled: no local weights file given (lpips_weights); training with L2 only"
    )
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    target = torch.tensor([[[[0.0, 2.0], [1.0, 0.5]]]])
    # squared errors 1, 0, 4, 12.25 -> MSE 17.25 / 4 = 4.3125 -> loss 43.125
    assert loss_fn(pred, target).item() == 43.125
    assert loss_fn.last_terms["l2"].item() == 4.3125 and "lpips" not in loss_fn.last_terms
    assert WeightedL2PerceptualLoss(l2_weight=2.5, lpips_weights="")(pred, target).item() == 2.5 * 4.3125
    # volumes too: (B, C, H, W, D)
    p5, t5 = torch.ones(2, 1, 3, 3, 2), torch.zeros(2, 1, 3, 3, 2)
    assert loss_fn(p5, t5).item() == 10.0


def test_gradient_flows_to_pred():
    pred = torch.zeros(1, 1, 2, 2, requires_grad=True)
    WeightedL2PerceptualLoss()(pred, torch.ones(1, 1, 2, 2)).backward()
    # d/dp 10 * mean((p - 1)^2) = 10 * 2 (p - 1) / 4 = -5
    assert torch.equal(pred.grad, torch.full((1, 1, 2, 2), -5.0))


def test_missing_weights_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_lpips_vgg16.pth"
    with pytest.raises(FileNotFoundError, match="no_such_lpips_vgg16.pth"):
        WeightedL2PerceptualLoss(lpips_weights=str(missing))
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        WeightedL2PerceptualLoss(lpips_weights=tmp_path)  # a folder is not a weights file
    with pytest.raises(ValueError, match="shape"):
        WeightedL2PerceptualLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="input_range"):
        WeightedL2PerceptualLoss(input_range=(1.0, 0.0))


# ------------------------------------------------------------------------- with LPIPS weights
def _random_lpips_file(path) -> str:
    """A random-initialised LPIPS VGG16 state dict in the format common.metrics.perceptual reads."""
    perceptual = pytest.importorskip("common.metrics.perceptual")
    g = torch.Generator().manual_seed(0)
    chans = [
        (64, 3),
        (64, 64),
        (128, 64),
        (128, 128),
        (256, 128),
        (256, 256),
        (256, 256),
        (512, 256),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
    ]  # (out, in)
    sd = {}
    for i, (co, ci) in zip(perceptual.VGG16_CONV_INDICES, chans):
        sd[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(co)
    for k, c in enumerate(perceptual.LPIPS_CHANNELS):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)  # non-negative, as in LPIPS
    assert sorted(sd) == sorted(perceptual.lpips_state_dict_keys())
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    return _random_lpips_file(tmp_path_factory.mktemp("lpips") / "lpips_random.pth")


def test_with_lpips_weights(lpips_file, caplog):
    from common.metrics.perceptual import LPIPS

    with caplog.at_level(logging.INFO, logger="common.losses"):
        loss_fn = WeightedL2PerceptualLoss(lpips_weights=lpips_file)
    assert LPIPS_DISABLED_MESSAGE not in caplog.text
    assert "LPIPS enabled" in caplog.text
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    assert loss_fn(x, x).item() == 0.0
    ref = LPIPS(lpips_file)
    expected = 10.0 * torch.mean((x - y) ** 2) + ref(x, y).mean()
    got = loss_fn(x, y)
    assert ref(x, y).mean().item() > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss_fn.last_terms["lpips"], ref(x, y).mean())
    # frozen network, gradients to pred
    assert not any(p.requires_grad for p in loss_fn.parameters())
    loss_fn.train()
    assert not loss_fn.lpips.training
    xp = x.clone().requires_grad_(True)
    loss_fn(xp, y).backward()
    assert xp.grad is not None and torch.isfinite(xp.grad).all() and xp.grad.abs().sum() > 0


def test_lpips_volumes_and_input_range(lpips_file):
    from common.metrics.perceptual import LPIPS

    ref = LPIPS(lpips_file)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 32, 32, 3, generator=g)  # a volume in [0, 1], 3 slices
    y = torch.rand(1, 1, 32, 32, 3, generator=g)
    loss_fn = WeightedL2PerceptualLoss(l2_weight=0.0, lpips_weights=lpips_file, input_range=(0.0, 1.0))
    # each slice scored in [-1, 1], mean over slices
    per_slice = torch.stack([ref(x[..., z] * 2 - 1, y[..., z] * 2 - 1) for z in range(3)]).mean()
    torch.testing.assert_close(loss_fn(x, y), per_slice, rtol=1e-5, atol=1e-6)
