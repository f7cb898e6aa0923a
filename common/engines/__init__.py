"""Batch preparation for the stock MONAI engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

The rest of the bundle plumbing lives where MONAI keeps the same concepts: ``common.inferers``,
``common.handlers``, ``common.transforms`` (post-processing too), ``common.data`` (datalists) and
``common.bundle`` (config and command-line helpers).
"""

from common.engines.prepare_batch import ConditionalDiffusionPrepareBatch, NoiseLevelPrepareBatch

__all__ = ["ConditionalDiffusionPrepareBatch", "NoiseLevelPrepareBatch"]

# Transitional: names that lived here before the split, resolved lazily to their new modules.
_MOVED = {
    "ResidualShiftInferer": "common.inferers",
    "DiffusionVolumeInferer": "common.inferers",
    "NoiseLevelInferer": "common.inferers",
    "SynthesisWriter": "common.handlers",
    "SynthesisMetrics": "common.handlers",
    "score_case": "common.handlers",
    "SplitSamplesd": "common.transforms",
    "CopyChannelsd": "common.transforms",
    "InvertScalingd": "common.transforms",
    "load_datalist": "common.data",
    "case_or_datalist": "common.data",
    "HOW_TO_MAKE_DATA": "common.data",
    "bundle_root": "common.bundle",
    "flag": "common.bundle",
    "latest_checkpoint": "common.bundle",
    "check_checkpoint": "common.bundle",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
