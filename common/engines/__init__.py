"""Bundle plumbing shared by every bundle: batch preparation, volume inferers, writers, evaluation."""

from common.engines.data import (
    HOW_TO_MAKE_DATA,
    bundle_root,
    case_or_datalist,
    check_checkpoint,
    flag,
    latest_checkpoint,
    load_datalist,
)
from common.engines.evaluate import SynthesisMetrics, score_case
from common.engines.inferers import DiffusionVolumeInferer, ResidualShiftInferer
from common.engines.prepare import ConditionalDiffusionPrepareBatch, ConditionPrepareBatch
from common.engines.noise_level import NoiseLevelInferer, NoiseLevelPrepareBatch
from common.engines.post import CopyChannelsd, InvertScalingd, SplitSamplesd
from common.engines.writer import SynthesisWriter

__all__ = [
    "flag",
    "HOW_TO_MAKE_DATA",
    "ConditionPrepareBatch",
    "CopyChannelsd",
    "InvertScalingd",
    "NoiseLevelInferer",
    "NoiseLevelPrepareBatch",
    "SplitSamplesd",
    "SynthesisMetrics",
    "case_or_datalist",
    "check_checkpoint",
    "score_case",
    "ConditionalDiffusionPrepareBatch",
    "DiffusionVolumeInferer",
    "ResidualShiftInferer",
    "SynthesisWriter",
    "bundle_root",
    "latest_checkpoint",
    "load_datalist",
]
