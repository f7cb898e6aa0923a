"""D3M's ``paper`` network in the released code's layout: parameter counts (against the released
55.70M and a count by hand from the layout), separate decoders, output shapes, zero initial
displacement; the ``small`` preset (MONAI's layout) unchanged."""

from __future__ import annotations

import pytest
import torch

from common.networks.d3m import PRESETS, D3MDualDecoderUNet, D3MNetwork, DualDecoderDiffusionUNet

RELEASED_BOTH_DECODERS = 55_702_466  # released Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=5), instantiated
PAPER_BOTH, PAPER_ONE, PAPER_FLOW = 55_698_370, 35_714_626, 53_352  # regression values
SMALL_TOTAL, SMALL_DENOISER, SMALL_ONE = 1_263_335, 1_259_522, 790_818  # before the released layout was added


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def by_hand(preset: str, in_channels: int = 5, dual: bool = True) -> int:
    """Parameters of the released layout from its description (see D3MDualDecoderUNet)."""
    p = PRESETS[preset]
    c, full, n_res = p["channels"], p["attention_levels"], p["num_res_blocks"]
    hidden, mem = p["attn_heads"] * p["attn_dim_head"], 2 * p["attn_heads"] * p["attn_dim_head"] * 4
    w, t = (c[0], *c), 4 * c[0]

    def res(ci, co):  # time MLP, conv3 + norm, conv3 + norm, 1x1 skip when the widths differ
        return t * 2 * co + 2 * co + 9 * ci * co + 2 * co + 9 * co * co + 2 * co + (ci * co + co) * (ci != co)

    def attn(d, is_full):  # norm, qkv (no bias), out conv; linear: memory key/values and an output norm
        return d + 3 * d * hidden + hidden * d + d + (0 if is_full else mem + d)

    conv = lambda k, ci, co: k * ci * co + co  # noqa: E731  (k: kernel positions)
    total = conv(1, c[0], t) + conv(1, t, t) + conv(49, in_channels, c[0])  # time embedding, stem
    for i in range(len(c)):  # encoder: res blocks at the input width, attention, 2x2 pixel-unshuffle + 1x1
        last = i == len(c) - 1
        total += (
            n_res * res(w[i], w[i])
            + attn(w[i], full[i])
            + (conv(9, w[i], w[i + 1]) if last else conv(4, w[i], w[i + 1]))
        )
    total += 2 * res(c[-1], c[-1]) + attn(c[-1], True)  # middle
    decoder = res(2 * c[0], c[0])  # the res block on concat(h, stem)
    for i in range(len(c)):  # res blocks on concat(h, skip), attention, upsample + 3x3 (or 3x3)
        decoder += n_res * res(w[i + 1] + w[i], w[i + 1]) + attn(w[i + 1], full[i]) + conv(9, w[i + 1], w[i])
    return total + (2 * (decoder + conv(1, c[0], 1)) if dual else decoder + conv(1, c[0], 2))


@pytest.fixture(scope="module")
def paper() -> D3MNetwork:
    torch.manual_seed(0)
    return D3MNetwork("paper").eval()


def test_paper_preset_counts_as_the_released_network(paper):
    assert isinstance(paper.denoiser, D3MDualDecoderUNet) and paper.spatial_divisor == 8
    n = count(paper.denoiser)
    assert abs(n - RELEASED_BOTH_DECODERS) / RELEASED_BOTH_DECODERS < 0.01
    assert n == RELEASED_BOTH_DECODERS - 4 * 1024  # no memory key/values in the 4 full-attention blocks
    assert n == PAPER_BOTH == by_hand("paper")
    assert count(paper.displacement) == PAPER_FLOW and count(paper) == PAPER_BOTH + PAPER_FLOW
    # encoder + middle + one decoder with a 2-channel head: the "without DSIMD" ablation
    single = D3MNetwork("paper", dual_decoder=False)
    assert count(single.denoiser) == PAPER_ONE == by_hand("paper", dual=False)
    d = paper.denoiser
    shared = sum(count(m) for m in (d.time_embed, d.conv_in, d.down_blocks, d.middle_block))
    assert count(single.denoiser) == shared + count(d.up_blocks) + count(d.out) + 65  # + one more head channel
    assert not hasattr(single.denoiser, "mask_up_blocks")


def test_paper_decoders_have_disjoint_parameters(paper):
    d = paper.denoiser
    img = {p.data_ptr() for m in (d.up_blocks, d.out) for p in m.parameters()}
    mask = {p.data_ptr() for m in (d.mask_up_blocks, d.mask_out) for p in m.parameters()}
    shared = {p.data_ptr() for m in (d.time_embed, d.conv_in, d.down_blocks, d.middle_block) for p in m.parameters()}
    assert img and mask and not img & mask and not (img | mask) & shared
    assert len(img) + len(mask) + len(shared) == len(list(d.parameters()))


def test_image_output_does_not_reach_the_mask_decoder():
    torch.manual_seed(0)
    net = D3MDualDecoderUNet(channels=(8, 16, 16), attention_levels=(False, False, True), attn_heads=2, attn_dim_head=4)
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([1, 700])
    out = net(x, t)
    assert out.shape == (2, 2, 8, 8)
    out[:, 0].sum().backward()
    assert all(p.grad is None or not p.grad.any() for m in (net.mask_up_blocks, net.mask_out) for p in m.parameters())
    assert all(p.grad is not None and p.grad.any() for p in net.out.parameters())
    assert all(p.grad is not None for p in net.down_blocks.parameters())


def test_paper_output_shapes_and_zero_initial_displacement(paper):
    x, t = torch.randn(1, 5, 64, 64), torch.tensor([500])
    with torch.no_grad():
        v = paper(x, t)
        out = paper(x, t, torch.full((1, 1, 1, 1), 0.5))
    assert v.shape == (1, 2, 64, 64) and out.shape == (1, 4, 64, 64)
    assert torch.allclose(out[:, :2], v)
    assert torch.equal(out[:, 2:], torch.zeros(1, 2, 64, 64))  # zero-initialised MSSDM head: identity warp
    assert v[:, 0].abs().sum() > 0 and v[:, 1].abs().sum() > 0  # heads keep the default init (as released)


def test_small_preset_is_unchanged():
    net = D3MNetwork("small")
    assert type(net.denoiser) is DualDecoderDiffusionUNet
    assert count(net) == SMALL_TOTAL and count(net.denoiser) == SMALL_DENOISER
    assert count(D3MNetwork("small", dual_decoder=False).denoiser) == SMALL_ONE
    assert any("mask_up_blocks" in k for k in net.state_dict())
