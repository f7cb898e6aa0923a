"""D3M networks: a conditional 2D diffusion U-Net with a dual-stream decoder (DSIMD) and the
small displacement U-Net of the multi-scale spatial deformation module (MSSDM).

- :class:`D3MDualDecoderUNet` (the ``paper`` preset): the released D3M code's U-Net layout
  (``Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=5)`` with its image and mask decoders), written
  with MONAI blocks where MONAI has them. Input ``[x_t, m_t, c]`` (B, 2 + C_cond, H, W); output
  ``[v_image, v_mask]`` (B, 2, H, W). Per level the encoder runs ``num_res_blocks`` time-conditioned
  res blocks at the level's *input* width, an attention block and a downsampling to the next width;
  the middle is res block, full attention, res block; each decoder level runs ``num_res_blocks`` res
  blocks on ``concat(h, skip)``, attention and an upsampling; a last res block on
  ``concat(h, stem output)`` and a 1x1 head close each decoder. 55,698,370 parameters with both
  decoders (the released network: 55,702,466; see the class docstring for the difference).
- :class:`DualDecoderDiffusionUNet` (the ``small`` preset): MONAI's
  :class:`~monai.networks.nets.DiffusionModelUNet` (time embedding, encoder, bottleneck) with a
  second decoder and output head. MONAI's block layout (encoder res blocks at the level's output
  width, ``num_res_blocks + 1`` res blocks per decoder level) is not the released one: with the
  paper's widths it would count 98.3M parameters.

In both, the two decoders read the same skip connections with separate parameters, and
``dual_decoder=False`` is the paper's "without DSIMD" ablation: one decoder whose head has 2 channels.

- :class:`DisplacementUNet`: MONAI :class:`~monai.networks.nets.UNet` mapping the intermediate mask
  estimate m0_hat (B, 1, H, W) to a displacement field u (B, 2, H, W) in pixels (channel 0 along H,
  channel 1 along W); a zero-initialised 1x1 head makes the initial field exactly zero.
- :class:`D3MNetwork`: both, as one module (one optimizer, one checkpoint, one DDP wrapper).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import SABlock, SubpixelDownsample, UpSample
from monai.networks.layers.factories import Conv
from monai.networks.nets import DiffusionModelUNet, UNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

__all__ = [
    "PRESETS",
    "ChannelRMSNorm",
    "D3MDualDecoderUNet",
    "D3MNetwork",
    "DisplacementUNet",
    "DualDecoderDiffusionUNet",
    "FullSpatialAttention",
    "LinearSpatialAttention",
    "ScaleShiftResBlock",
]

PRESETS = {
    # the released code's network: base 64, multipliers (1, 2, 4, 8), full attention at the innermost
    # level (linear attention elsewhere), 2 res blocks per level, 4 heads of 32 channels.
    # 55,698,370 parameters with both decoders (35,714,626 with one), 53,352 for the MSSDM U-Net:
    # 55,751,722 in all. The released code: 55,702,466 + 117,992 (its U_Network).
    "paper": dict(
        layout="released",
        channels=(64, 128, 256, 512),
        attention_levels=(False, False, False, True),
        num_res_blocks=2,
        attn_heads=4,
        attn_dim_head=32,
        flow_channels=(16, 32, 64),
    ),
    # CPU preset for tests and demos, MONAI's DiffusionModelUNet layout (attention only at 1/8
    # resolution: a 256 x 224 slice is 896 tokens); 1,263,335 parameters with MSSDM
    "small": dict(
        channels=(16, 32, 32, 64),
        attention_levels=(False, False, False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=16,
        flow_channels=(8, 16),
    ),
}


class ChannelRMSNorm(nn.Module):
    """RMS normalisation over the channel axis with a learned per-channel gain (no bias).

    ``x / rms_c(x) * g`` with ``rms_c`` the root mean square over channels at each position
    (computed as ``F.normalize(x, dim=1) * sqrt(C)``); ``g`` starts at 1. MONAI has no channel-wise
    RMS norm (``torch.nn.RMSNorm`` normalises the last axes). Shape: (B, C, *spatial) -> same.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.scale = math.sqrt(num_channels)
        self.gain = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gain.view(1, -1, *([1] * (x.ndim - 2)))
        return F.normalize(x, dim=1) * g * self.scale


class ScaleShiftResBlock(nn.Module):
    """Residual block conditioned on the time embedding through a scale and a shift.

    ``h = SiLU((1 + scale) * norm(conv3(x)) + shift)``, ``h = SiLU(norm(conv3(h)))``, output
    ``h + skip(x)``, where ``(scale, shift) = Linear(SiLU(temb))`` (2 * out_channels), ``norm`` is
    :class:`ChannelRMSNorm` and ``skip`` a 1x1 conv when the widths differ (else identity). MONAI's
    :class:`~monai.networks.nets.diffusion_model_unet.DiffusionUNetResnetBlock` adds the embedding
    (no scale) and normalises before each conv, hence this block.

    Shapes: ``x`` (B, in_channels, *spatial), ``temb`` (B, temb_channels) -> (B, out_channels, *spatial).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(temb_channels, 2 * out_channels))
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm1 = ChannelRMSNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.skip = conv(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        ss = self.time_mlp(temb).view(*temb.shape[:1], -1, *([1] * (x.ndim - 2)))
        scale, shift = ss.chunk(2, dim=1)
        h = self.norm1(self.conv1(x))
        h = self.dropout(F.silu(h * (scale + 1) + shift))
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class LinearSpatialAttention(nn.Module):
    """Linear (softmax-kernel) attention over all positions, with its residual connection.

    Per head: queries softmax-normalised over the head's channels, keys over the positions,
    ``out = (softmax_n(k) v^T)^T softmax_d(q) / sqrt(dim_head)``, with ``num_mem_kv`` learned
    key/value tokens appended to the positions; then a 1x1 conv back to ``num_channels`` and a
    :class:`ChannelRMSNorm`. The input is normalised (:class:`ChannelRMSNorm`) first. Cost is linear
    in the number of positions, so it runs at every resolution. MONAI has no linear attention block.

    Shapes: (B, num_channels, *spatial) -> (B, num_channels, *spatial) (input added back).
    """

    def __init__(
        self, spatial_dims: int, num_channels: int, num_heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        hidden = num_heads * dim_head
        self.num_heads, self.scale = num_heads, dim_head**-0.5
        self.norm = ChannelRMSNorm(num_channels)
        self.mem_kv = nn.Parameter(torch.randn(2, num_heads, dim_head, num_mem_kv))
        self.to_qkv = conv(num_channels, 3 * hidden, kernel_size=1, bias=False)
        self.to_out = nn.Sequential(conv(hidden, num_channels, kernel_size=1), ChannelRMSNorm(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, shape = x.shape[0], x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, self.num_heads, -1, math.prod(shape[2:]))
        q, k, v = qkv.unbind(dim=1)  # (B, heads, dim_head, N)
        mk, mv = (t.unsqueeze(0).expand(b, -1, -1, -1) for t in self.mem_kv)
        k, v = torch.cat([mk, k], dim=-1), torch.cat([mv, v], dim=-1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, *shape[2:])
        return self.to_out(out) + x


class FullSpatialAttention(nn.Module):
    """Multi-head softmax self-attention over all positions (MONAI :class:`~monai.networks.blocks.SABlock`),
    with its residual connection.

    :class:`ChannelRMSNorm`, then the positions as a sequence through ``SABlock`` with
    ``num_heads * dim_head`` inner channels (no qkv bias; the output projection back to
    ``num_channels`` has one). MONAI's ``SpatialAttentionBlock`` fixes the inner width to
    ``num_channels`` and uses GroupNorm, hence this wrapper.

    Shapes: (B, num_channels, *spatial) -> (B, num_channels, *spatial) (input added back).
    """

    def __init__(
        self, num_channels: int, num_heads: int = 4, dim_head: int = 32, use_flash_attention: bool = False
    ) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(num_channels)
        self.attn = SABlock(
            hidden_size=num_heads * dim_head,
            num_heads=num_heads,
            dim_head=dim_head,
            hidden_input_size=num_channels,
            qkv_bias=False,
            use_flash_attention=use_flash_attention,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self.norm(x).reshape(*shape[:2], -1).transpose(1, 2)  # (B, N, C)
        return self.attn(h).transpose(1, 2).reshape(shape) + x


class _EncoderLevel(nn.Module):
    """``num_res_blocks`` res blocks at ``in_channels`` (each output is a skip; the attention acts on
    the last one before it is stored), then a 2x downsampling to ``out_channels`` (MONAI ``SubpixelDownsample`` + 1x1 conv), or a 3x3 conv
    at the same resolution at the last level. (B, in, *S) -> (B, out, *S/2 or *S) and the skips."""

    def __init__(
        self, spatial_dims, in_channels, out_channels, temb_channels, attention, num_res_blocks, last, dropout
    ):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.resnets = nn.ModuleList(
            ScaleShiftResBlock(spatial_dims, in_channels, in_channels, temb_channels, dropout)
            for _ in range(num_res_blocks)
        )
        self.attention = attention
        if last:
            self.downsample = conv(in_channels, out_channels, kernel_size=3, padding=1)
        else:
            self.downsample = nn.Sequential(
                SubpixelDownsample(spatial_dims, in_channels, scale_factor=2, conv_block=None),
                conv(in_channels * 2**spatial_dims, out_channels, kernel_size=1),
            )

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, block in enumerate(self.resnets):
            h = block(h, temb)
            if i == len(self.resnets) - 1:
                h = self.attention(h)
            skips.append(h)
        return self.downsample(h), skips


class _DecoderLevel(nn.Module):
    """``num_res_blocks`` res blocks, each on ``concat(h, skip)`` (skips taken innermost first), to
    ``out_channels``; attention; then nearest 2x upsampling + 3x3 conv to ``next_channels`` (MONAI
    ``UpSample``), or a 3x3 conv at the same resolution at the outermost level."""

    def __init__(
        self,
        spatial_dims,
        in_channels,
        skip_channels,
        out_channels,
        next_channels,
        temb_channels,
        attention,
        num_res_blocks,
        last,
        dropout,
    ):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.resnets = nn.ModuleList(
            ScaleShiftResBlock(
                spatial_dims,
                (in_channels if i == 0 else out_channels) + skip_channels,
                out_channels,
                temb_channels,
                dropout,
            )
            for i in range(num_res_blocks)
        )
        self.attention = attention
        post = conv(out_channels, next_channels, kernel_size=3, padding=1)
        if last:
            self.upsample = post
        else:
            self.upsample = UpSample(
                spatial_dims,
                out_channels,
                out_channels,
                scale_factor=2,
                mode="nontrainable",
                pre_conv=None,
                post_conv=post,
                interp_mode="nearest",
                align_corners=None,
            )

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        return self.upsample(self.attention(h))


class _MiddleBlock(nn.Module):
    """Res block, full attention, res block at the widest width: (B, C, *S) -> (B, C, *S)."""

    def __init__(self, spatial_dims, channels, temb_channels, heads, dim_head, use_flash_attention, dropout):
        super().__init__()
        self.resnet1 = ScaleShiftResBlock(spatial_dims, channels, channels, temb_channels, dropout)
        self.attention = FullSpatialAttention(channels, heads, dim_head, use_flash_attention)
        self.resnet2 = ScaleShiftResBlock(spatial_dims, channels, channels, temb_channels, dropout)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.resnet2(self.attention(self.resnet1(h, temb)), temb)


class _OutputHead(nn.Module):
    """Res block on ``concat(h, stem output)`` (2 * C -> C) and a 1x1 conv to ``out_channels``."""

    def __init__(self, spatial_dims, channels, out_channels, temb_channels, dropout):
        super().__init__()
        self.resnet = ScaleShiftResBlock(spatial_dims, 2 * channels, channels, temb_channels, dropout)
        self.conv = Conv[Conv.CONV, spatial_dims](channels, out_channels, kernel_size=1)

    def forward(self, h: torch.Tensor, stem: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(self.resnet(torch.cat([h, stem], dim=1), temb))


class D3MDualDecoderUNet(nn.Module):
    """The released D3M U-Net layout: one encoder and middle block, two decoders (image v, mask v).

    With ``c = channels`` (the paper: 64, 128, 256, 512) and the stem width ``c[0]``, encoder level
    ``i`` runs at width ``w_i = (c[0], *c)[i]`` (64, 64, 128, 256) and maps to ``c[i]``:

    - stem: 7x7 conv ``in_channels -> c[0]``; time embedding ``get_timestep_embedding(t, c[0])``
      (MONAI) -> Linear(c[0], 4 c[0]) -> GELU -> Linear(4 c[0], 4 c[0]);
    - encoder level: ``num_res_blocks`` :class:`ScaleShiftResBlock` (w_i -> w_i, each output a skip;
      the attention acts on the last one before it is stored), attention (:class:`FullSpatialAttention`
      where ``attention_levels[i]``, else :class:`LinearSpatialAttention`), then pixel-unshuffle + 1x1
      conv to ``c[i]`` at half resolution (a 3x3 conv at the last level: 3 downsamplings for 4 levels);
    - middle: res block, full attention, res block at ``c[-1]``;
    - decoder level (innermost first): ``num_res_blocks`` res blocks on ``concat(h, skip)`` to
      ``c[i]``, the level's attention at ``c[i]``, nearest 2x upsampling + 3x3 conv to ``w_i`` (a 3x3
      conv at the outermost level); then a res block on ``concat(h, stem output)`` (2 c[0] -> c[0])
      and a 1x1 conv head.

    Attention: ``attn_heads`` heads of ``attn_dim_head`` channels at every level. Normalisation:
    :class:`ChannelRMSNorm` throughout. The two decoders (``up_blocks``/``out`` and
    ``mask_up_blocks``/``mask_out``) read the same skips with separate parameters; the heads keep
    PyTorch's default initialisation (as the released code; MONAI's DiffusionModelUNet zeroes its head).

    Known differences from the released code (``denoising_diffusion_pytorch/D3M.py``):

    - full attention (MONAI ``SABlock``) has no learned memory key/value tokens (the released
      ``Attention`` appends 4 per head): 1,024 parameters fewer per full-attention block, 4,096 with
      both decoders (55,698,370 vs 55,702,466), 3,072 with one;
    - the sinusoidal embedding is MONAI's (cos then sin, frequencies ``10000^(-k/half)``; the released
      code: sin then cos, ``10000^(-k/(half-1))``): no parameters involved;
    - ``dual_decoder=False`` gives one decoder with a 2-channel head (the released code has no
      single-decoder variant; its 1-channel heads are one per decoder);
    - self-conditioning is not used: the released ``Unet(self_condition=True)`` stores the flag but
      neither doubles its input channels nor passes a previous estimate to the network, so it
      accounts for 0 parameters; the input here is the same 5 channels [x_t, m_t, T1, T2, FLAIR].

    With the first two neutralised in the released code (no memory tokens, MONAI's sinusoid) and its
    weights copied tensor for tensor (364 tensors, same order per block), both networks give the same
    output to float32 rounding (checked once against the released source, not in the test suite).

    Args:
        spatial_dims: 2 (the blocks are written for any, the bundle uses 2).
        in_channels: 2 + number of conditioning contrasts (5).
        dual_decoder: two decoders (D3M) or one with a 2-channel head ("without DSIMD").
        channels: output width of each level; ``channels[0]`` is also the stem width.
        attention_levels: per level, full attention (True) or linear attention (False).
        num_res_blocks: res blocks per encoder and per decoder level (the released code: 2).
        attn_heads, attn_dim_head: heads and channels per head of every attention block.
        dropout: after the first conv of each res block (the released default 0).
        use_flash_attention: ``SABlock`` through ``F.scaled_dot_product_attention`` (same result,
            less memory; the released training script sets ``flash_attn=True``).

    Forward: ``x`` (B, in_channels, H, W), ``timesteps`` (B,) -> (B, 2, H, W); H, W multiples of
    ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 5,
        dual_decoder: bool = True,
        channels: Sequence[int] = (64, 128, 256, 512),
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_res_blocks: int = 2,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        dropout: float = 0.0,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        channels, attention_levels = tuple(int(c) for c in channels), tuple(bool(a) for a in attention_levels)
        if len(attention_levels) != len(channels):
            raise ValueError("attention_levels needs one entry per level of channels")
        self.spatial_dims, self.block_out_channels = spatial_dims, channels
        self.dual_decoder = bool(dual_decoder)
        widths = (channels[0], *channels)  # widths[i] -> widths[i + 1] at level i
        temb = 4 * channels[0]
        n = len(channels)

        def attention(width: int, full: bool) -> nn.Module:
            if full:
                return FullSpatialAttention(width, attn_heads, attn_dim_head, use_flash_attention)
            return LinearSpatialAttention(spatial_dims, width, attn_heads, attn_dim_head)

        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.GELU(), nn.Linear(temb, temb))
        self.conv_in = Conv[Conv.CONV, spatial_dims](in_channels, channels[0], kernel_size=7, padding=3)
        self.down_blocks = nn.ModuleList(
            _EncoderLevel(
                spatial_dims,
                widths[i],
                widths[i + 1],
                temb,
                attention(widths[i], attention_levels[i]),
                num_res_blocks,
                i == n - 1,
                dropout,
            )
            for i in range(n)
        )
        self.middle_block = _MiddleBlock(
            spatial_dims, channels[-1], temb, attn_heads, attn_dim_head, use_flash_attention, dropout
        )

        def decoder(out_channels: int) -> tuple[nn.ModuleList, nn.Module]:
            levels = nn.ModuleList(
                _DecoderLevel(
                    spatial_dims,
                    widths[i + 1],
                    widths[i],
                    widths[i + 1],
                    widths[i],
                    temb,
                    attention(widths[i + 1], attention_levels[i]),
                    num_res_blocks,
                    i == 0,
                    dropout,
                )
                for i in reversed(range(n))
            )
            return levels, _OutputHead(spatial_dims, channels[0], out_channels, temb, dropout)

        self.up_blocks, self.out = decoder(1 if self.dual_decoder else 2)
        if self.dual_decoder:
            self.mask_up_blocks, self.mask_out = decoder(1)

    def _decode(self, h, skips, stem, temb, up_blocks, out) -> torch.Tensor:
        for level in up_blocks:
            h = level(h, skips, temb)
        return out(h, stem, temb)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        temb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        stem = h = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for level in self.down_blocks:
            h, s = level(h, temb)
            skips.extend(s)
        h = self.middle_block(h, temb)
        v = self._decode(h, list(skips), stem, temb, self.up_blocks, self.out)
        if self.dual_decoder:
            v = torch.cat([v, self._decode(h, list(skips), stem, temb, self.mask_up_blocks, self.mask_out)], dim=1)
        return v


class DualDecoderDiffusionUNet(DiffusionModelUNet):
    """DiffusionModelUNet with a shared encoder/bottleneck and two decoders (image v, mask v).

    MONAI's block layout (the ``small`` preset); :class:`D3MDualDecoderUNet` is the released one.

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
        preset: ``"paper"`` (:class:`D3MDualDecoderUNet`, the released layout) or ``"small"``
            (:class:`DualDecoderDiffusionUNet`, MONAI's layout); see :data:`PRESETS`.
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
        unet = D3MDualDecoderUNet if p.pop("layout", "monai") == "released" else DualDecoderDiffusionUNet
        self.preset = preset
        self.spatial_divisor = 2 ** (len(p["channels"]) - 1)
        self.denoiser = unet(spatial_dims=spatial_dims, in_channels=in_channels, dual_decoder=dual_decoder, **p)
        self.displacement = DisplacementUNet(flow_channels, spatial_dims=spatial_dims) if deformation else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
        v = self.denoiser(x, timesteps)
        if alpha_bar is None:
            return v
        a = alpha_bar.to(v.dtype)
        m0 = a.sqrt() * x[:, 1:2] - (1 - a).sqrt() * v[:, 1:2]
        flow = self.displacement(m0) if self.displacement is not None else torch.zeros_like(v)
        return torch.cat([v, flow], dim=1)
