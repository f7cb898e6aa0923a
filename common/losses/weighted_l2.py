"""Training losses.

:class:`WeightedL2PerceptualLoss` is the Res-SRDiff objective ``lambda * L2 + LPIPS`` (lambda = 10,
Safari et al.). LPIPS needs pretrained network weights; this project never downloads anything, so
LPIPS is used only when a LOCAL weights file is given (``lpips_weights``). Without one the loss is
``lambda * L2`` alone and the module says so once, at construction, in the log. A weights path that
does not exist is an error (no silent fall-back to L2).

The LPIPS network itself is :class:`common.metrics.perceptual.LPIPS` (AlexNet or VGG16 trunk + LPIPS v0.1
heads from one local state-dict file; the file's trunk is used and named in the log, per-image distances for ``(N, 1, H, W)`` images); it is imported only when
weights are given. (``common.metrics.perceptual.LPIPSLoss`` already adds an L2 term of its own, so the
bare ``LPIPS`` distance is used here to count L2 once.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WeightedL2PerceptualLoss", "LPIPS_DISABLED_MESSAGE"]

logger = logging.getLogger(__name__)

LPIPS_DISABLED_MESSAGE = "LPIPS disabled: no local weights file given (lpips_weights); training with L2 only"


class WeightedL2PerceptualLoss(nn.Module):
    """``loss(pred, target) = l2_weight * MSE(pred, target) + lpips_weight * LPIPS(pred, target)``.

    Args:
        l2_weight: weight of the mean squared error (``lambda``; 10 in Res-SRDiff).
        lpips_weights: path of a local LPIPS weights file, or ``None`` / ``""`` for L2 only (one
            WARNING log line at construction: :data:`LPIPS_DISABLED_MESSAGE`). A path that does not
            exist raises ``FileNotFoundError`` naming it.
        lpips_weight: weight of the LPIPS term (1 in Res-SRDiff).
        input_range: ``(low, high)`` intensity range of ``pred`` / ``target``; LPIPS maps it
            linearly to ``[-1, 1]`` (its ``data_range``; no clipping). The L2 term uses the values as
            given. The default ``(-1, 1)`` is the identity.

    Shapes:
        ``pred`` and ``target``: ``(B, C, H, W)`` or ``(B, C, H, W, D)``, same shape. The L2 term is
        the mean over all elements. For LPIPS, channels and the slices of a volume (last axis) are
        folded into the batch, so the LPIPS network sees ``(B * C [* D], 1, H, W)`` and its output is
        averaged. Returns a scalar tensor; the two terms of the last call are kept (detached) in
        ``last_terms`` (``{"l2": ..., "lpips": ...}``) for logging.

    The LPIPS network is frozen (no parameter gradients, always in eval mode); gradients flow to
    ``pred``. It is a sub-module, so ``.to(device)`` moves it with the loss.
    """

    def __init__(
        self,
        l2_weight: float = 10.0,
        lpips_weights: str | os.PathLike | None = None,
        lpips_weight: float = 1.0,
        input_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        self.l2_weight = float(l2_weight)
        self.lpips_weight = float(lpips_weight)
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (low, high) with high > low, got {tuple(input_range)}")
        self.input_range = (lo, hi)
        self.lpips: nn.Module | None = None
        self.lpips_weights = None
        self.last_terms: dict[str, torch.Tensor] = {}
        if lpips_weights is None or str(lpips_weights) == "":
            logger.warning(LPIPS_DISABLED_MESSAGE)
            return
        path = Path(lpips_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path} (lpips_weights)")
        try:
            from common.metrics.perceptual import LPIPS
        except ImportError as e:
            raise ImportError(
                f"LPIPS weights {path} given but common.metrics.perceptual.LPIPS cannot be imported ({e})"
            ) from e
        self.lpips_weights = str(path)
        self.lpips = LPIPS(str(path), data_range=None if self.input_range == (-1.0, 1.0) else self.input_range)
        self.lpips.requires_grad_(False)
        self.lpips.eval()
        logger.info(
            "LPIPS enabled with weights %s (%s trunk); loss = %g * L2 + %g * LPIPS",
            path,
            {"alex": "AlexNet", "vgg": "VGG16"}[self.lpips.trunk],
            self.l2_weight,
            self.lpips_weight,
        )

    def train(self, mode: bool = True) -> "WeightedL2PerceptualLoss":
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # frozen feature network: never in train mode (dropout, norm statistics)
        return self

    @staticmethod
    def _to_slices(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W[, D]) -> (B*C[*D], 1, H, W)."""
        if x.ndim == 5:
            x = x.movedim(-1, 1)  # (B, D, C, H, W)
        return x.reshape(-1, 1, *x.shape[-2:])

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        l2 = F.mse_loss(pred, target)
        loss = self.l2_weight * l2
        terms = {"l2": l2.detach()}
        if self.lpips is not None:
            if pred.ndim not in (4, 5):
                raise ValueError(f"LPIPS needs (B, C, H, W) or (B, C, H, W, D) tensors, got {tuple(pred.shape)}")
            lp = self.lpips(self._to_slices(pred), self._to_slices(target)).mean()
            loss = loss + self.lpips_weight * lp
            terms["lpips"] = lp.detach()
        self.last_terms = terms
        return loss

    def extra_repr(self) -> str:
        return f"l2_weight={self.l2_weight}, lpips={'off' if self.lpips is None else self.lpips_weights}, lpips_weight={self.lpips_weight}"
