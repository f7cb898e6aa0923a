"""D3M networks: a conditional 2D diffusion U-Net with a dual-stream decoder (DSIMD) and the
small displacement U-Net of the multi-scale spatial deformation module (MSSDM).

- :class:`DualDecoderDiffusionUNet`: MONAI's :class:`~monai.networks.nets.DiffusionModelUNet`
  (time embedding, encoder, bottleneck) with a second decoder and output head. Input
  ``[x_t, m_t, c]`` (B, 2 + C_cond, H, W); output ``[v_image, v_mask]`` (B, 2, H, W). Both decoders
  read the same skip connections; their parameters are separate (the mask decoder is a deep copy
  made at construction). ``dual_decoder=False`` is the paper's "without DSIMD" ablation: one
  decoder whose head has 2 channels.
- :class:`DisplacementUNet`: MONAI :class:`~monai.networks.nets.UNet` mapping the intermediate mask
  estimate m0_hat (B, 1, H, W) to a displacement field u (B, 2, H, W) in pixels (channel 0 along H,
  channel 1 along W); a zero-initialised 1x1 head makes the initial field exactly zero.
- :class:`D3MNetwork`: both, as one module (one optimizer, one checkpoint, one DDP wrapper).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet, UNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

__all__ = ["PRESETS", "D3MNetwork", "DisplacementUNet", "DualDecoderDiffusionUNet"]

PRESETS = {
    # released code's widths: base 64, multipliers (1, 2, 4, 8), attention at the innermost level; 98.3M here
    # (MONAI's block layout), 55.7M in the released code's layout (bundles/d3m/docs/README.md)
    "paper": dict(
        channels=(64, 128, 256, 512),
        attention_levels=(False, False, False, True),
        num_res_blocks=2,
        norm_num_groups=32,
        num_head_channels=64,
        flow_channels=(16, 32, 64),
    ),
    # CPU preset for tests and demos (attention only at 1/8 resolution: a 256 x 224 slice is 896 tokens)
    "small": dict(
        channels=(16, 32, 32, 64),
        attention_levels=(False, False, False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=16,
        flow_channels=(8, 16),
    ),
}


class DualDecoderDiffusionUNet(DiffusionModelUNet):
    """DiffusionModelUNet with a shared encoder/bottleneck and two decoders (image v, mask v).

    Args:
        spatial_dims: 2.
        in_channels: 2 + number of conditioning contrasts (5 for T1, T2, FLAIR).
        dual_decoder: two decoders (D3M) or one 2-channel decoder (ablation).
        kwargs: passed to DiffusionModelUNet (channels, attention_levels, ...).
    Forward: ``x`` (B, in_channels, H, W), ``timesteps`` (B,) -> (B, 2, H, W); H, W multiples of
    ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 5, dual_decoder: bool = True, **kwargs) -> None:
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1 if dual_decoder else 2, **kwargs
        )
        self.dual_decoder = bool(dual_decoder)
        if self.dual_decoder:
            self.mask_up_blocks = copy.deepcopy(self.up_blocks)
            self.mask_out = copy.deepcopy(self.out)

    def _decode(self, h, skips, emb, up_blocks, out):
        for block in up_blocks:
            idx = -len(block.resnets)
            res, skips = skips[idx:], skips[:idx]
            h = block(hidden_states=h, res_hidden_states_list=res, temb=emb, context=None)
        return out(h)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context=None, class_labels=None, **kwargs
    ) -> torch.Tensor:  # type: ignore[override]
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        h = self.conv_in(x)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        v = self._decode(h, list(skips), emb, self.up_blocks, self.out)
        if self.dual_decoder:
            v = torch.cat([v, self._decode(h, list(skips), emb, self.mask_up_blocks, self.mask_out)], dim=1)
        return v


class DisplacementUNet(nn.Module):
    """U(.): m0_hat (B, 1, H, W) in [-1, 1] -> displacement (B, 2, H, W) in pixels; zero at initialisation."""

    def __init__(self, channels=(8, 16), in_channels: int = 1, spatial_dims: int = 2) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=channels[0],
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
        )
        self.head = nn.Conv2d(channels[0], spatial_dims, kernel_size=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, m0: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.unet(m0)))


class D3MNetwork(nn.Module):
    """The denoiser and (optionally) the displacement U-Net.

    Args:
        preset: ``"paper"`` or ``"small"`` (see :data:`PRESETS`).
        in_channels: 2 + number of conditioning contrasts.
        dual_decoder: DSIMD (``False``: "without DSIMD" ablation).
        deformation: MSSDM (``False``: "without MSSDM" ablation; the flow is identically zero).

    ``forward(x, timesteps)`` -> v prediction (B, 2, H, W) (image, mask);
    ``forward(x, timesteps, alpha_bar)`` with abar_t (B, 1, 1, 1) -> (B, 4, H, W): v (2 channels) and the
    displacement u_t = U(m0_hat) (2 channels, pixels), ``m0_hat = sqrt(abar) m_t - sqrt(1 - abar) v_mask``.
    Everything runs inside ``forward`` so a DDP wrapper sees every parameter.
    """

    def __init__(
        self,
        preset: str = "small",
        in_channels: int = 5,
        dual_decoder: bool = True,
        deformation: bool = True,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown network preset {preset!r}; choose from {sorted(PRESETS)}")
        p = dict(PRESETS[preset])
        flow_channels = p.pop("flow_channels")
        self.preset = preset
        self.spatial_divisor = 2 ** (len(p["channels"]) - 1)
        self.denoiser = DualDecoderDiffusionUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, dual_decoder=dual_decoder, **p
        )
        self.displacement = DisplacementUNet(flow_channels, spatial_dims=spatial_dims) if deformation else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
        v = self.denoiser(x, timesteps)
        if alpha_bar is None:
            return v
        a = alpha_bar.to(v.dtype)
        m0 = a.sqrt() * x[:, 1:2] - (1 - a).sqrt() * v[:, 1:2]
        flow = self.displacement(m0) if self.displacement is not None else torch.zeros_like(v)
        return torch.cat([v, flow], dim=1)
