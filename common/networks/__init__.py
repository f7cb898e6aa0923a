"""Networks that MONAI lacks, assembled from MONAI blocks."""

from .swin_unet import PRESETS, SwinDiffusionUNet, SwinStage

__all__ = ["PRESETS", "SwinDiffusionUNet", "SwinStage"]
