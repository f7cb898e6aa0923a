"""SwinDiffusionUNet: shapes, presets, timestep conditioning, gradients, autocast, Swin placement."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformerBlock

from common.networks import PRESETS, SwinDiffusionUNet, SwinStage


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """MONAI zero-initialises the last conv of each res block and the output conv; give them weights
    so that every path carries signal (an untrained network would otherwise output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return randomize_zero_init(SwinDiffusionUNet.from_preset("small", in_channels=6, out_channels=3)).eval()


@pytest.mark.parametrize("hw", [(160, 160), (96, 96), (128, 128), (48, 80)])
def test_output_shapes(small, hw):
    with torch.no_grad():
        y = small(torch.randn(1, 6, *hw), torch.tensor([3]))
    assert y.shape == (1, 3, *hw) and torch.isfinite(y).all()


def test_sr_channels_and_scalar_timestep():
    net = SwinDiffusionUNet(preset="small", in_channels=2, out_channels=1)
    with torch.no_grad():
        y = net(torch.randn(2, 2, 128, 128), 7)
    assert y.shape == (2, 1, 128, 128)
    assert not y.any()  # zero-initialised output conv (MONAI convention)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 2, 100, 100), 0)


def test_parameter_counts():
    paper = SwinDiffusionUNet.from_preset("paper", in_channels=6, out_channels=3)
    n = n_params(paper)
    print(f"paper: {n / 1e6:.2f} M parameters")
    assert abs(n - 58e6) <= 0.1 * 58e6
    assert n_params(SwinDiffusionUNet()) == n  # constructor defaults are the paper configuration
    n_small = n_params(SwinDiffusionUNet(preset="small", in_channels=6, out_channels=3))
    print(f"small: {n_small / 1e6:.3f} M parameters")
    assert n_small < 1e6


def test_presets_and_overrides():
    net = SwinDiffusionUNet(preset="small", in_channels=6, out_channels=3, window_size=4, num_res_blocks=2)
    assert list(net.block_out_channels) == PRESETS["small"]["channels"]
    assert list(net.num_res_blocks) == [2, 2, 2, 2]
    assert all(b.window_size == (4, 4) for b in net.modules() if isinstance(b, SwinTransformerBlock))
    with pytest.raises(ValueError, match="unknown preset"):
        SwinDiffusionUNet(preset="huge")
    # a bundle config instantiates it with plain kwargs
    from monai.bundle import ConfigParser

    cfg = {
        "net": {"_target_": "common.networks.SwinDiffusionUNet", "preset": "small", "in_channels": 4, "out_channels": 1}
    }
    parsed = ConfigParser(cfg).get_parsed_content("net")
    assert isinstance(parsed, SwinDiffusionUNet) and parsed.out_channels == 1


def test_timestep_changes_output(small):
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        a = small(x, torch.tensor([0, 0]))
        b = small(x, torch.tensor([10, 10]))
        c = small(x, torch.tensor([0.0, 0.0]))  # float timesteps give the same embedding
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    torch.testing.assert_close(a, c)


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    net = SwinDiffusionUNet(preset="small", in_channels=6, out_channels=3)
    # default init: every parameter takes part in the graph
    net(torch.randn(1, 6, 64, 64), torch.tensor([2])).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=True)
    randomize_zero_init(net)
    x = torch.randn(2, 6, 64, 64)
    net(x, torch.tensor([1, 12])).square().mean().backward()
    dead = [k for k, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_autocast_bf16_cpu(small):
    x = torch.randn(2, 6, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = small(x, torch.tensor([4, 9]))
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y.float()).all()
    y.float().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_swin_sits_at_the_listed_levels(small):
    # paper: swin_levels (F, T, T, T), 2 res blocks: encoder 3 levels x 2 stages, middle 1,
    # decoder 3 levels x 3 stages = 16 stages x 2 blocks (regular + shifted window)
    paper = SwinDiffusionUNet(preset="paper", channels=[32, 32, 32, 32], num_heads=1, norm_num_groups=8)
    blocks = [m for m in paper.modules() if isinstance(m, SwinTransformerBlock)]
    assert len(blocks) == 32
    assert sum(any(s > 0 for s in b.shift_size) for b in blocks) == 16
    assert not any(type(m).__name__ == "SpatialAttentionBlock" for m in paper.modules())
    # the Swin stages of the small preset see 80, 40, 20 (never 160) on a 160 x 160 input
    seen = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.add(tuple(i[0].shape[1:])))
        for m in small.modules()
        if isinstance(m, SwinStage)
    ]
    with torch.no_grad():
        small(torch.randn(1, 6, 160, 160), torch.tensor([0]))
    for h in hooks:
        h.remove()
    assert {s[1:] for s in seen} == {(80, 80), (40, 40), (20, 20)}
    assert {s[0] for s in seen} == set(PRESETS["small"]["channels"][1:])


def test_training_crops_and_inference_slices_run_the_same_attention_pattern(monkeypatch):
    """64 x 64 crops (8 x 8 at the lowest level = the window) once ran unshifted windows there,
    160 x 160 slices shifted ones; now every Swin block of the second kind shifts at both sizes,
    and the window is never shrunk."""
    import monai.networks.nets.swin_unetr as su

    from common.networks import SwinDiffusionUNet

    seen = []
    real = su.get_window_size

    def spy(x_size, window_size, shift_size=None):
        out = real(x_size, window_size, shift_size)
        if shift_size is not None:
            seen.append((tuple(x_size), tuple(out[0]), tuple(out[1]), tuple(shift_size)))
        return out

    monkeypatch.setattr(su, "get_window_size", spy)
    net = SwinDiffusionUNet(preset="small", spatial_dims=2, in_channels=6, out_channels=3).eval()
    patterns = {}
    for hw in (64, 160):
        seen.clear()
        with torch.no_grad():
            y = net(torch.randn(1, 6, hw, hw), timesteps=torch.tensor([3]))
        assert y.shape == (1, 3, hw, hw)
        patterns[hw] = [(win, shift, asked) for _, win, shift, asked in seen]
        assert all(win == (8, 8) for win, _, _ in patterns[hw]), patterns[hw]
        shifted = [shift for _, shift, asked in patterns[hw] if asked != (0, 0)]
        assert shifted and all(s == (4, 4) for s in shifted), (hw, patterns[hw])
    assert patterns[64] == patterns[160]


def test_padding_a_small_map_leaves_the_rest_of_the_stage_alone():
    """A map larger than the window goes through MONAI's layer unchanged; a smaller one is padded at
    the end and cropped back (same shape out)."""
    from common.networks.swin_unet import SwinStage

    torch.manual_seed(0)
    stage = SwinStage(2, channels=8, num_heads=1, window_size=4).eval()
    big = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        assert torch.equal(stage(big), stage.layer(big))
        small = torch.randn(1, 8, 4, 4)
        out = stage(small)
        padded = stage.layer(torch.nn.functional.pad(small, (0, 1, 0, 1)))
    assert out.shape == small.shape and torch.equal(out, padded[..., :4, :4])
