"""Diffusion schedulers that MONAI lacks, in the style of :mod:`monai.networks.schedulers`."""

from .residual_shift import ResidualShiftScheduler, shifting_sqrt_etas

__all__ = ["ResidualShiftScheduler", "shifting_sqrt_etas"]
