"""MONAI dictionary transforms that MONAI lacks: invertible percentile scaling and TI-norm, crops
around a mask. Input checks live in ``common.transforms.checks``."""

from .checks import CheckImaged, CheckPatchSized, CheckSameGridd, ReadImaged
from .crop import CropAroundMaskd, RandCropSamplesNearLabeld, box_start, crop_or_pad, mask_centroid
from .degrade import ResampleToReferenced, SimulateLowResolutiond, simulate_low_resolution
from .intensity import (
    InverseScalePercentilesd,
    InverseTINormd,
    ScalePercentilesd,
    TINormd,
    invert_scaling,
    invert_tinorm,
)
from .phases import SelectPhasesd
from .post import CopyChannelsd, InvertScalingd, SplitSamplesd
from .reference import ScaleLikeReferenced

__all__ = [
    "CopyChannelsd",
    "InvertScalingd",
    "SplitSamplesd",
    "CheckImaged",
    "CheckPatchSized",
    "CheckSameGridd",
    "ReadImaged",
    "ScaleLikeReferenced",
    "SelectPhasesd",
    "SimulateLowResolutiond",
    "ResampleToReferenced",
    "simulate_low_resolution",
    "ScalePercentilesd",
    "InverseScalePercentilesd",
    "invert_scaling",
    "TINormd",
    "InverseTINormd",
    "invert_tinorm",
    "crop_or_pad",
    "mask_centroid",
    "box_start",
    "CropAroundMaskd",
    "RandCropSamplesNearLabeld",
]
