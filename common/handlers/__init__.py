"""Ignite handlers that write and score what a bundle produces (NIfTI with exact geometry, PNG
panels, metrics next to their trivial baselines, FID)."""

from common.handlers.checkpoint import AtomicCheckpointSaver, ResumeLog, StopAtIteration
from common.handlers.metrics import SynthesisMetrics, score_case
from common.handlers.training import EMAWeights, GradientClipping, NonFiniteLossError, StopOnNonFiniteLoss
from common.handlers.writer import SynthesisWriter

__all__ = [
    "AtomicCheckpointSaver",
    "EMAWeights",
    "GradientClipping",
    "NonFiniteLossError",
    "ResumeLog",
    "SynthesisMetrics",
    "StopAtIteration",
    "StopOnNonFiniteLoss",
    "SynthesisWriter",
    "score_case",
]
