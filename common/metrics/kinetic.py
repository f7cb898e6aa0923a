"""Lesion enhancement and kinetic-curve metrics for synthesised DCE-MRI.

* :func:`enhancement_error` -- iterU-Net's lesion enhancement error: the squared difference between the
  mean intensity inside a lesion mask in the prediction and in the target (image units squared).
* :func:`tinorm_stats`, :func:`tinorm`, :func:`tinorm_enhancement_error` -- the same error on
  TI-normalised intensities (iterU-Net's units: the case's series centred and scaled by the mean and
  standard deviation of its first post-contrast frame), the units of the paper's figures.
* :func:`kinetic_curve` -- the mean intensity inside a mask at every time point of a DCE series.
* :func:`curve_spearman` -- Spearman rank correlation between a predicted and a true kinetic curve.
* :func:`dtw_distance` -- classic dynamic time warping distance between two curves.
* :func:`relative_change`, :func:`kinetic_type` -- the kinetic curve type (I persistent, II plateau,
  III washout) from the change between the first post-contrast phase and the last.

Inputs may be numpy arrays or torch tensors; everything is computed in float64 numpy.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import spearmanr

__all__ = [
    "KINETIC_THRESHOLD",
    "relative_change",
    "kinetic_type",
    "mean_in_mask",
    "enhancement_error",
    "enhancement_errors",
    "tinorm_stats",
    "tinorm",
    "tinorm_enhancement_error",
    "kinetic_curve",
    "curve_spearman",
    "dtw_distance",
]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def mean_in_mask(image: Any, mask: Any) -> float:
    """Mean of ``image`` over the voxels where ``mask`` is non-zero (same shape); ``nan`` if the mask is empty."""
    img, m = _np(image), _np(mask) != 0
    if img.shape != m.shape:
        raise ValueError(f"image shape {img.shape} and mask shape {m.shape} differ")
    return float(img[m].mean()) if m.any() else float("nan")


def enhancement_error(pred: Any, target: Any, mask: Any) -> float:
    """Squared error of the mean lesion intensity: ``(mean(pred[mask]) - mean(target[mask]))**2``.

    Args:
        pred, target: one (post-contrast) image each, same shape, e.g. (H, W, D); same intensity scale.
        mask: binary lesion mask of the same shape.

    Returns:
        The error in image units squared (``nan`` for an empty mask).
    """
    return (mean_in_mask(pred, mask) - mean_in_mask(target, mask)) ** 2


def tinorm_stats(series: Any, ref_index: int = 1, mask: Any = None) -> tuple[float, float]:
    """``(mean, std)`` of TI-norm (iterU-Net eq. 1, :class:`common.transforms.TINormd`, same rule):
    the mean and population standard deviation (ddof=0) of time point ``ref_index`` (default 1, the
    first post-contrast frame) of ``series`` (T, *spatial), over the whole frame or inside ``mask``
    (*spatial). Raises ``ValueError`` for a constant reference frame."""
    s = _np(series)
    if not -s.shape[0] <= ref_index < s.shape[0]:
        raise ValueError(f"tinorm_stats: ref_index {ref_index} out of range for {s.shape[0]} time points")
    ref = s[ref_index]
    if mask is not None:
        ref = ref[_np(mask).reshape(ref.shape) != 0]
    mean, std = float(ref.mean()), float(ref.std())
    if not std > 0:
        raise ValueError(f"tinorm_stats: reference time point {ref_index} has zero standard deviation")
    return mean, std


def tinorm(x: Any, mean: float, std: float) -> np.ndarray:
    """TI-normalised intensities ``(x - mean) / std`` (float64), with :func:`tinorm_stats`' ``mean, std``."""
    return (_np(x) - float(mean)) / float(std)


def tinorm_enhancement_error(pred: Any, target: Any, mask: Any, mean: float, std: float) -> float:
    """iterU-Net's lesion enhancement error in the paper's units (TI-normalised intensities):

    .. math::

        e = \\Big(\\overline{\\tilde x}_{pred} - \\overline{\\tilde x}_{true}\\Big)^2
          = \\frac{(\\bar x_{pred} - \\bar x_{true})^2}{\\sigma^2},
        \\qquad \\tilde x = (x - \\mu) / \\sigma,

    where the bars are means over the lesion mask of one predicted phase and (mu, sigma) the case's
    TI-norm statistics (:func:`tinorm_stats`: mean and std of the first post-contrast frame). The
    offset mu cancels; the error is :func:`enhancement_error` divided by sigma^2, dimensionless
    (squared units of the reference frame's standard deviation).

    Args:
        pred, target: one phase each, same shape, in the input's (raw) units.
        mask: binary lesion mask of that shape.
        mean, std: TI-norm statistics of the case.
    """
    return enhancement_error(tinorm(pred, mean, std), tinorm(target, mean, std), mask)


def enhancement_errors(pred: Any, target: Any, lesions: Any) -> dict[int, float]:
    """:func:`enhancement_error` for every lesion.

    Args:
        pred, target: images of the same shape.
        lesions: either an integer label map of that shape (each label > 0 is one lesion; use
            ``scipy.ndimage.label`` on a binary mask to split connected components) or a sequence of
            binary masks (lesion ``k`` is the ``k``-th mask, numbered from 1).

    Returns:
        ``{label: squared error}``, labels in increasing order.
    """
    if isinstance(lesions, (list, tuple)):
        return {k + 1: enhancement_error(pred, target, m) for k, m in enumerate(lesions)}
    lab = _np(lesions)
    labels = [int(v) for v in np.unique(lab) if v > 0]
    return {k: enhancement_error(pred, target, lab == k) for k in labels}


def kinetic_curve(series: Any, mask: Any, time_axis: int = 0) -> np.ndarray:
    """Mean intensity inside ``mask`` at each time point.

    Args:
        series: DCE series with time along ``time_axis``, e.g. (T, H, W, D).
        mask: region with the shape of one time point, e.g. (H, W, D).
        time_axis: the time axis of ``series``.

    Returns:
        (T,) float64 curve.
    """
    s = np.moveaxis(_np(series), time_axis, 0)
    m = _np(mask) != 0
    if s.shape[1:] != m.shape:
        raise ValueError(f"mask shape {m.shape} does not match one time point {s.shape[1:]}")
    if not m.any():
        raise ValueError("kinetic_curve: the mask is empty")
    return s[:, m].mean(axis=1)


def curve_spearman(pred_curve: Sequence[float], true_curve: Sequence[float]) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``) between two curves of equal length.

    Returns ``nan`` when either curve is constant (the rank correlation is undefined).
    """
    a, b = _np(pred_curve).ravel(), _np(true_curve).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"curves must have the same length >= 2, got {a.size} and {b.size}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def dtw_distance(x: Sequence[float], y: Sequence[float]) -> float:
    """Dynamic time warping distance, O(n m), absolute-difference cost, steps (1,0), (0,1), (1,1).

    ``D[i, j] = |x_i - y_j| + min(D[i-1, j], D[i, j-1], D[i-1, j-1])`` with ``D[0, 0] = |x_0 - y_0|``;
    the result is ``D[n-1, m-1]`` (no normalisation, no window), in the curves' intensity units.
    """
    a, b = _np(x).ravel(), _np(y).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("dtw_distance: empty curve")
    cost = np.abs(a[:, None] - b[None, :])
    n, m = cost.shape
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = cost[i - 1, j - 1] + min(d[i - 1, j], d[i, j - 1], d[i - 1, j - 1])
    return float(d[n, m])


KINETIC_THRESHOLD = 0.10  # +-10 % change from the first post-contrast phase to the last


def relative_change(curve: Sequence[float], times: Sequence[float], relative_to: str = "signal") -> float:
    """Delayed-phase change of a signal-time curve (pre-contrast first).

    ``(S_last - S_early) / S_early`` (``relative_to="signal"``, the phantoms' ground-truth rule) or
    ``(S_last - S_early) / (S_early - S_pre)`` (``relative_to="enhancement"``, relative to the early
    enhancement); S_pre is ``curve[0]``, S_early the first post-contrast phase (the first time point
    after ``times[0]``), S_last the last phase.
    """
    curve, times = np.asarray(curve, float), np.asarray(times, float)
    if curve.shape != times.shape or curve.ndim != 1 or len(curve) < 3:
        raise ValueError(f"need a 1D curve of at least 3 points matching times, got {curve.shape} and {times.shape}")
    if relative_to not in ("signal", "enhancement"):
        raise ValueError(f"relative_to must be 'signal' or 'enhancement', got {relative_to!r}")
    early = int(np.nonzero(times > times[0])[0][0])
    denom = curve[early] if relative_to == "signal" else curve[early] - curve[0]
    return float((curve[-1] - curve[early]) / denom)


def kinetic_type(
    curve: Sequence[float], times: Sequence[float], threshold: float = KINETIC_THRESHOLD, relative_to: str = "signal"
) -> str:
    """Kinetic curve type of a signal-time curve (pre-contrast first): ``"I"`` persistent
    (:func:`relative_change` > +``threshold``), ``"II"`` plateau (within +-``threshold``) or ``"III"``
    washout (< -``threshold``)."""
    r = relative_change(curve, times, relative_to)
    return "I" if r > threshold else ("III" if r < -threshold else "II")
