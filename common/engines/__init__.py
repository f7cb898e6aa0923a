"""Batch preparation for the stock MONAI engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

The rest of the bundle plumbing lives where MONAI keeps the same concepts: ``common.inferers``,
``common.handlers``, ``common.transforms`` (post-processing too), ``common.data`` (datalists) and
``common.bundle`` (config and command-line helpers).
"""

from common.engines.prepare_batch import (
    ConditionalDiffusionPrepareBatch,
    D3MPrepareBatch,
    IterUNetPrepareBatch,
    NoiseLevelPrepareBatch,
)

__all__ = ["ConditionalDiffusionPrepareBatch", "D3MPrepareBatch", "IterUNetPrepareBatch", "NoiseLevelPrepareBatch"]
