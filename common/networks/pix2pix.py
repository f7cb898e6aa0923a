"""Pix2Pix's networks (Isola et al. 2017) from stock MONAI: a 2D U-Net generator
(:class:`monai.networks.nets.UNet`) and the 70x70 PatchGAN discriminator
(:class:`monai.networks.nets.PatchDiscriminator`), each at a named size (:data:`PIX2PIX_PRESETS`).

Shapes: the generator maps (B, C_in, H, W) -> (B, C_out, H, W) for H and W multiples of
:func:`spatial_divisor` (the inferer pads whole slices to it and crops back); the discriminator maps
the pair (B, C_in + C_out, H, W) to a list of feature maps whose last is the patch logits
(B, 1, H/8 - 2, W/8 - 2) for the three-layer (70x70 receptive field) discriminator.
"""

from __future__ import annotations

from monai.networks.nets import PatchDiscriminator, UNet

__all__ = ["PIX2PIX_PRESETS", "pix2pix_discriminator", "pix2pix_generator", "spatial_divisor"]

#: ``channels``: the U-Net's feature maps per level (one stride-2 down-sampling between levels);
#: ``disc_channels`` / ``disc_layers``: the PatchGAN's first width and its stride-2 layers + 1 (3: 70x70 patches)
PIX2PIX_PRESETS = {
    # the paper's U-Net-256 widths (C64-C128-C256-C512-C512-C512-C512-C512), 7 down-samplings (its 8th
    # reaches 1 x 1, where a batch-normalised 3x3 bottleneck would see a single pixel); 70x70 PatchGAN C64-C512
    "paper": {"channels": (64, 128, 256, 512, 512, 512, 512, 512), "disc_channels": 64, "disc_layers": 3},
    # the CPU preset: 3 down-samplings, the same 70x70 discriminator at a quarter of the width
    "small": {"channels": (16, 32, 64, 128), "disc_channels": 16, "disc_layers": 3},
}


def _preset(preset: str) -> dict:
    if preset not in PIX2PIX_PRESETS:
        raise ValueError(f"--network_size {preset!r}: expected one of {sorted(PIX2PIX_PRESETS)}")
    return PIX2PIX_PRESETS[preset]


def spatial_divisor(preset: str) -> int:
    """The multiple H and W must be for the generator: 2 ** (number of down-samplings)."""
    return 2 ** (len(_preset(preset)["channels"]) - 1)


def pix2pix_generator(preset: str, in_channels: int, out_channels: int, dropout: float = 0.0) -> UNet:
    """The U-Net generator: MONAI's :class:`~monai.networks.nets.UNet`, 3x3 convolutions, stride-2
    down-sampling, transposed-convolution up-sampling, batch norm, LeakyReLU(0.2), no residual units,
    a linear output (targets are on the reference's network scale, not bounded to [-1, 1])."""
    p = _preset(preset)
    return UNet(
        spatial_dims=2,
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        channels=p["channels"],
        strides=(2,) * (len(p["channels"]) - 1),
        num_res_units=0,
        act=("LEAKYRELU", {"negative_slope": 0.2}),
        norm="BATCH",
        dropout=float(dropout),
    )


def pix2pix_discriminator(preset: str, in_channels: int) -> PatchDiscriminator:
    """The conditional PatchGAN: MONAI's :class:`~monai.networks.nets.PatchDiscriminator` on the
    (input, output) pair, ``in_channels = C_in + C_out``, 4x4 kernels, batch norm, LeakyReLU(0.2)."""
    p = _preset(preset)
    return PatchDiscriminator(
        spatial_dims=2,
        channels=p["disc_channels"],
        in_channels=int(in_channels),
        out_channels=1,
        num_layers_d=p["disc_layers"],
        norm="BATCH",
    )
