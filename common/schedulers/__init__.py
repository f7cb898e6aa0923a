"""Diffusion schedulers that MONAI lacks, in the style of :mod:`monai.networks.schedulers`.

DCE-diff's schedules are MONAI's own ``DDPMScheduler`` / ``DDIMScheduler``, declared in
``bundles/dcediff/configs/*.json``; the MONAI workarounds they need are in :mod:`common.monai_compat`.
"""

from .noise_level import (
    NoiseLevelSchedule,
    add_noise_at_level,
    noise_level_to_embedding_input,
)
from .residual_shift import ResidualShiftScheduler, shifting_sqrt_etas

__all__ = [
    "NoiseLevelSchedule",
    "ResidualShiftScheduler",
    "add_noise_at_level",
    "noise_level_to_embedding_input",
    "shifting_sqrt_etas",
]
