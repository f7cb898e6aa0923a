"""Mask agreement for a predicted enhancing-tumour (ET) mask, with the BraTS convention for an
empty truth.

BraTS scoring (the BraTS 2023 "lesion-wise" evaluation and the earlier per-case one) defines the
Dice of a case whose reference segmentation has no ET voxel as 1 when the prediction is empty too
and 0 otherwise (any false positive). :func:`dice_et` follows it; :func:`mask_figures` adds the
volumes, so that an ET-free case is also described by its false-enhancement volume (mL of
predicted ET where the truth has none).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EMPTY_TRUTH_CONVENTION", "dice_et", "mask_figures", "voxel_ml"]

#: How :func:`dice_et` scores an empty truth (stated in reports).
EMPTY_TRUTH_CONVENTION = "empty true ET: Dice 1 if the predicted ET is empty too, else 0 (BraTS scoring)"


def dice_et(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice ``2 |P & T| / (|P| + |T|)`` of two boolean masks (any shape, same shape); an empty
    truth scores 1.0 with an empty prediction and 0.0 otherwise (:data:`EMPTY_TRUTH_CONVENTION`)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"dice_et: predicted mask {pred.shape} and true mask {true.shape} differ in shape")
    s = int(pred.sum()) + int(true.sum())
    return float(2.0 * np.logical_and(pred, true).sum() / s) if s else 1.0


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL of a 4x4 voxel-to-mm affine: ``|det A[:3, :3]| / 1000``."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3])) / 1000.0)


def mask_figures(pred: np.ndarray, true: np.ndarray, affine: np.ndarray | None = None) -> dict:
    """Per-case figures of a predicted ET mask against the true one.

    Returns:
        ``dice_et`` (:func:`dice_et`), ``false_ml`` (predicted outside the truth, mL; for an ET-free
        case this is the false-enhancement volume), ``missed_ml`` (true ET not predicted, mL),
        ``true_ml`` and ``pred_ml`` (mL), and ``et_free`` (1 when the truth has no ET voxel, else 0).
        Volumes use the voxel size of ``affine`` (identity: 0.001 mL per voxel).
    """
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    ml = voxel_ml(np.eye(4) if affine is None else affine)
    return {
        "dice_et": dice_et(pred, true),
        "false_ml": float(np.logical_and(pred, ~true).sum() * ml),
        "missed_ml": float(np.logical_and(~pred, true).sum() * ml),
        "true_ml": float(true.sum() * ml),
        "pred_ml": float(pred.sum() * ml),
        "et_free": int(not true.any()),
    }
