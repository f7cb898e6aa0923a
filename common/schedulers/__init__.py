"""Diffusion schedulers that MONAI lacks, in the style of :mod:`monai.networks.schedulers`."""

from .noise_level import (
    NoiseLevelSchedule,
    add_noise_at_level,
    dcediff_inference_scheduler,
    dcediff_train_scheduler,
    ddim_steps_offset,
    float64_scheduler,
    noise_level_to_embedding_input,
)
from .residual_shift import ResidualShiftScheduler, shifting_sqrt_etas

__all__ = [
    "NoiseLevelSchedule",
    "ResidualShiftScheduler",
    "add_noise_at_level",
    "dcediff_inference_scheduler",
    "dcediff_train_scheduler",
    "ddim_steps_offset",
    "float64_scheduler",
    "noise_level_to_embedding_input",
    "shifting_sqrt_etas",
]
