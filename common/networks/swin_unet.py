"""Time-conditioned U-Net with Swin-Transformer blocks in place of self-attention.

The denoiser of ResDCE-diff ("U-Net with Swin-Transformer blocks replacing self-attention") and
Res-SRDiff, after ResShift's ``UNetModelSwin`` (Yue et al., NeurIPS 2023). Built entirely from MONAI
parts: :class:`monai.networks.nets.DiffusionModelUNet` supplies the timestep embedding
(:func:`~monai.networks.nets.diffusion_model_unet.get_timestep_embedding` + MLP), the residual blocks
with timestep conditioning (``DiffusionUNetResnetBlock``), the down/up-sampling blocks, the skip
connections and the forward pass; every ``SpatialAttentionBlock`` it would place (the levels in
``swin_levels`` and the middle block) is replaced by a :class:`SwinStage`, i.e. MONAI's
:class:`~monai.networks.nets.swin_unetr.BasicLayer` with two
:class:`~monai.networks.nets.swin_unetr.SwinTransformerBlock` (regular + shifted windows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.swin_unetr import BasicLayer
from monai.utils import ensure_tuple_rep

__all__ = ["PRESETS", "SwinDiffusionUNet", "SwinStage"]

#: Named configurations; spread into :class:`SwinDiffusionUNet` or pick with ``preset=``.
#: ``paper``: ~58 M parameters, the GPU default and the constructor's defaults (59.5 M for in=6, out=3).
#: ``small``: < 1 M parameters for CPU runs and tests (0.66 M for in=6, out=3).
PRESETS: dict[str, dict] = {
    "paper": {
        "channels": [128, 256, 256, 256],
        "num_res_blocks": 2,
        "swin_levels": [False, True, True, True],
        "num_heads": [4, 8, 8, 8],
        "window_size": 8,
        "mlp_ratio": 4.0,
        "norm_num_groups": 32,
    },
    "small": {
        "channels": [32, 32, 32, 32],
        "num_res_blocks": 1,
        "swin_levels": [False, True, True, True],
        "num_heads": [1, 1, 1, 1],
        "window_size": 8,
        "mlp_ratio": 2.0,
        "norm_num_groups": 8,
    },
}

# values for arguments left as None and not set by the preset: the "paper" configuration
_DEFAULTS: dict = dict(PRESETS["paper"])


def _heads_for(channels: int, head_dim: int = 32) -> int:
    """Largest head count <= channels // head_dim that divides channels (at least 1)."""
    h = max(1, channels // head_dim)
    while channels % h:
        h -= 1
    return h


class SwinStage(nn.Module):
    """Two Swin-Transformer blocks (regular, then shifted windows) on a channels-first feature map.

    Wraps MONAI's :class:`~monai.networks.nets.swin_unetr.BasicLayer` (depth 2, no downsampling),
    which permutes (B, C, *spatial) to channels-last, zero-pads to a multiple of the window,
    builds the shifted-window mask, and permutes back. Each block is pre-norm residual,
    x + W-MSA(LN(x)), then x + MLP(LN(x)), so the stage is a residual map like the
    ``SpatialAttentionBlock`` it replaces.

    MONAI's ``get_window_size`` turns the shift OFF along an axis whose feature map is no larger than
    the window (e.g. the 8 x 8 lowest level of a 64 x 64 training crop with 8 x 8 windows), while
    the same network on 160 x 160 slices (20 x 20 there) shifts: training and inference would run
    different attention patterns. So a map no larger than the window is zero-padded (at the end) to
    ``window + 1``, which MONAI pads on to two windows, and cropped back: the second block always
    attends over shifted windows, at every input size.

    Args:
        spatial_dims: 2 or 3.
        channels: C, channels of the feature map (divisible by ``num_heads``).
        num_heads: attention heads.
        window_size: window edge in pixels (int, or one per spatial dim).
        mlp_ratio: hidden width of the MLP relative to C.
        dropout: dropout rate in the attention projection and MLP.
        use_checkpoint: gradient checkpointing inside the blocks (saves memory when training).
        use_flash_attention: use ``scaled_dot_product_attention`` when autograd is off.

    Input and output: (B, C, *spatial), same shape.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_heads: int,
        window_size: int | Sequence[int] = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.window_size = ensure_tuple_rep(window_size, spatial_dims)
        self.layer = BasicLayer(
            dim=channels,
            depth=2,
            num_heads=num_heads,
            window_size=ensure_tuple_rep(window_size, spatial_dims),
            drop_path=[0.0, 0.0],
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop=dropout,
            attn_drop=dropout,
            downsample=None,
            use_checkpoint=use_checkpoint,
            use_flash_attention=use_flash_attention,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad = [max(0, w + 1 - s) for s, w in zip(size, self.window_size)]
        if not any(pad):
            return self.layer(x)
        flat = [p for axis in reversed(pad) for p in (0, axis)]  # F.pad order: last axis first
        y = self.layer(nn.functional.pad(x, flat))
        return y[(slice(None), slice(None), *(slice(0, s) for s in size))]


class SwinDiffusionUNet(DiffusionModelUNet):
    """Time-conditioned U-Net with Swin-Transformer stages where DiffusionModelUNet puts attention.

    Level i (resolution H / 2**i) has ``num_res_blocks`` DiffusionUNetResnetBlocks (timestep
    embedding added after the first conv); on levels with ``swin_levels[i]`` each res block is
    followed by a :class:`SwinStage` (2 Swin blocks). The middle block (lowest resolution) is
    res block, SwinStage, res block. The decoder mirrors the encoder with ``num_res_blocks + 1``
    res blocks per level. As in MONAI, the second conv of every res block and the output conv start
    at zero (the untrained network outputs 0).

    Args:
        spatial_dims: 2 (3 also works: 3D convs and 3D windows).
        in_channels: channels of the input, e.g. x_t concatenated with the condition.
        out_channels: channels of the output (the x0 prediction).
        channels: feature channels per level (multiples of ``norm_num_groups``).
        num_res_blocks: res blocks per encoder level (int or one per level).
        swin_levels: per level, whether Swin stages follow the res blocks; when None and the
            preset's does not fit ``channels``, all levels but the first.
        num_heads: attention heads per level (int or one per level); when None and ``channels`` is
            given, about 32 channels per head.
        window_size: Swin window edge in pixels. Feature maps that are not multiples of it are
            zero-padded inside the Swin stage (e.g. 160 x 160 -> 20 x 20 at level 3 is padded to 24);
            maps no larger than one window (a 64 x 64 crop -> 8 x 8) are padded to two windows
            (:class:`SwinStage`), so every input size runs full windows and shifted windows: the
            attention pattern of 64 x 64 training crops is that of 160 x 160 inference.
        mlp_ratio: Swin MLP hidden width relative to the channels.
        dropout: dropout in the Swin stages.
        norm_num_groups: groups of the GroupNorms.
        norm_eps: epsilon of the GroupNorms.
        resblock_updown: res blocks (instead of strided conv / nearest + conv) for down/upsampling.
        use_checkpoint: gradient checkpointing inside the Swin stages.
        use_flash_attention: ``scaled_dot_product_attention`` in the Swin stages at inference.
        preset: name in :data:`PRESETS` ("paper", "small"); arguments given explicitly (not None)
            override the preset's values. Arguments left None take the preset's value, else the
            "paper" value (so ``SwinDiffusionUNet()`` is the paper configuration).

    Spatial sizes must be divisible by 2 ** (len(channels) - 1) (8 with four levels).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 6,
        out_channels: int = 3,
        channels: Sequence[int] | None = None,
        num_res_blocks: int | Sequence[int] | None = None,
        swin_levels: Sequence[bool] | None = None,
        num_heads: int | Sequence[int] | None = None,
        window_size: int | Sequence[int] | None = None,
        mlp_ratio: float | None = None,
        dropout: float = 0.0,
        norm_num_groups: int | None = None,
        norm_eps: float = 1e-6,
        resblock_updown: bool = False,
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
        preset: str | None = None,
    ) -> None:
        given = {
            "channels": channels,
            "num_res_blocks": num_res_blocks,
            "swin_levels": swin_levels,
            "num_heads": num_heads,
            "window_size": window_size,
            "mlp_ratio": mlp_ratio,
            "norm_num_groups": norm_num_groups,
        }
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg = {**_DEFAULTS, **(PRESETS[preset] if preset else {})}
        cfg.update({k: v for k, v in given.items() if v is not None})
        channels_given = channels is not None

        channels = [int(c) for c in cfg["channels"]]
        n_levels = len(channels)
        if swin_levels is None and len(cfg["swin_levels"]) != n_levels:
            cfg["swin_levels"] = [False] + [True] * (n_levels - 1)
        if num_heads is None and channels_given:
            cfg["num_heads"] = [_heads_for(c) for c in channels]
        swin_levels = [bool(s) for s in cfg["swin_levels"]]
        if len(swin_levels) != n_levels:
            raise ValueError(f"swin_levels {swin_levels} must have one entry per level of channels {channels}")
        heads = [int(h) for h in ensure_tuple_rep(cfg["num_heads"], n_levels)]
        for c, h in zip(channels, heads):
            if c % h != 0:
                raise ValueError(f"channels {channels} must be divisible by num_heads {heads} per level")

        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=cfg["num_res_blocks"],
            channels=channels,
            attention_levels=swin_levels,
            norm_num_groups=int(cfg["norm_num_groups"]),
            norm_eps=norm_eps,
            resblock_updown=resblock_updown,
            num_head_channels=channels,  # placeholder attention (1 head), replaced below
        )
        self.spatial_dims = spatial_dims
        self.swin_levels = swin_levels
        self.num_heads = heads
        self.window_size = cfg["window_size"]
        self.preset = preset

        def stage(level: int) -> SwinStage:
            return SwinStage(
                spatial_dims,
                channels[level],
                heads[level],
                window_size=cfg["window_size"],
                mlp_ratio=float(cfg["mlp_ratio"]),
                dropout=dropout,
                use_checkpoint=use_checkpoint,
                use_flash_attention=use_flash_attention,
            )

        for i, block in enumerate(self.down_blocks):
            if hasattr(block, "attentions"):
                block.attentions = nn.ModuleList([stage(i) for _ in block.attentions])
        self.middle_block.attention = stage(n_levels - 1)
        for i, block in enumerate(self.up_blocks):
            if hasattr(block, "attentions"):
                block.attentions = nn.ModuleList([stage(n_levels - 1 - i) for _ in block.attentions])
        if any(isinstance(m, SpatialAttentionBlock) for m in self.modules()):
            raise RuntimeError("a SpatialAttentionBlock was not replaced (MONAI block layout changed?)")

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> SwinDiffusionUNet:
        """``SwinDiffusionUNet(preset=name, **kwargs)``; kwargs override the preset."""
        return cls(preset=name, **kwargs)

    @property
    def spatial_divisor(self) -> int:
        """Spatial sizes must be multiples of this, 2 ** (levels - 1); pad to it (``DivisiblePadd``)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int | float, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            x: (B, C_in, H, W) (or (B, C_in, D, H, W) in 3D), spatial sizes divisible by
                2 ** (levels - 1).
            timesteps: 0-based diffusion step index per sample, (B,) int or float tensor, or one
                scalar for the whole batch (sinusoidal embedding of the raw value, MONAI's
                ``get_timestep_embedding``).
            kwargs: passed on to :meth:`DiffusionModelUNet.forward`.

        Returns:
            (B, C_out, H, W) (or (B, C_out, D, H, W)).
        """
        div = self.spatial_divisor
        if any(s % div for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {div}")
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return super().forward(x, t, **kwargs)
