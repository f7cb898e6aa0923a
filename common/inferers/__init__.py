"""Inferers for conditional 2D diffusion on 3D volumes (MONAI's ``DiffusionInferer`` family)."""

from common.inferers.noise_level import NoiseLevelInferer
from common.inferers.residual_shift import ResidualShiftInferer
from common.inferers.volume import DiffusionVolumeInferer

__all__ = ["DiffusionVolumeInferer", "NoiseLevelInferer", "ResidualShiftInferer"]
