"""Image <-> (array, affine) conversions between SimpleITK and the NIfTI/MONAI convention, in one place.

Conventions:

- arrays are indexed by voxel axis, ``(i, j, k)`` = (x, y, z) (SimpleITK's numpy view is reversed,
  (z, y, x); every conversion here transposes);
- an affine is ``(n+1, n+1)``, voxel index -> mm, its columns the voxel axes scaled by the spacing;
- ``frame="ras"`` (default): the affine is NIfTI's RAS+ and the SimpleITK image is in ITK's LPS
  (x and y negated, the ``LPS_TO_RAS`` flip); ``frame="itk"``: the affine is taken in the image's own
  physical frame with no flip, which is exact for resampling between grids of one frame and works in
  any dimension.

Spacing is the column norm of the affine, direction the normalised columns, origin the last
column: oblique and non-orthogonal grids keep their exact geometry both ways.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["LPS_TO_RAS", "array_to_sitk", "bspline_ready", "sitk_affine", "sitk_to_array", "split_affine"]

#: RAS+ <-> LPS for 4x4 homogeneous affines (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _check_frame(frame: str, n: int) -> None:
    if frame not in ("ras", "itk"):
        raise ValueError(f"frame must be 'ras' or 'itk', got {frame!r}")
    if frame == "ras" and n != 3:
        raise ValueError(f"frame='ras' is for 3D images, got {n}D (use frame='itk')")


def split_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(spacing, origin, direction)`` in SimpleITK's order from an (n+1)x(n+1) affine in its own frame.

    ``spacing[i] = |column i|`` (mm), ``direction`` the row-major n x n matrix of unit columns, ``origin``
    the last column (mm)."""
    a = np.asarray(affine, dtype=np.float64)
    n = a.shape[0] - 1
    m = a[:n, :n]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    return (
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in a[:n, n]),
        tuple(float(v) for v in direction.ravel()),
    )


def sitk_affine(img: sitk.Image, frame: str = "ras") -> np.ndarray:
    """(n+1)x(n+1) affine of a SimpleITK image: direction x spacing and origin (RAS+ for ``frame="ras"``)."""
    n = img.GetDimension()
    _check_frame(frame, n)
    a = np.eye(n + 1)
    a[:n, :n] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(n, n) * np.asarray(
        img.GetSpacing(), dtype=np.float64
    )
    a[:n, n] = img.GetOrigin()
    return LPS_TO_RAS @ a if frame == "ras" else a


def sitk_to_array(img: sitk.Image) -> np.ndarray:
    """Scalar SimpleITK image -> numpy array indexed by voxel axis (x, y, z): a contiguous copy."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("sitk_to_array needs a scalar image")
    a = sitk.GetArrayFromImage(img)
    return np.ascontiguousarray(a.transpose(tuple(range(a.ndim - 1, -1, -1))))


def array_to_sitk(
    array: np.ndarray, affine: np.ndarray, frame: str = "ras", pixel: type | Sequence | None = np.float32
) -> sitk.Image:
    """numpy array (voxel-axis order) + affine -> SimpleITK image with that exact grid.

    Args:
        array: n-D array indexed (x, y[, z]).
        affine: (n+1)x(n+1), RAS+ for ``frame="ras"`` (3D only), the image's own frame for ``"itk"``.
        pixel: numpy dtype the voxels are cast to (``None`` keeps the array's).
    """
    array = np.asarray(array)
    a = np.asarray(affine, dtype=np.float64)
    n = array.ndim
    _check_frame(frame, n)
    if a.shape != (n + 1, n + 1):
        raise ValueError(f"affine must be {n + 1}x{n + 1} for a {n}D array, got {a.shape}")
    if frame == "ras":
        a = LPS_TO_RAS @ a
    data = array if pixel is None else array.astype(pixel, copy=False)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(tuple(range(n - 1, -1, -1)))))
    spacing, origin, direction = split_affine(a)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def bspline_ready(img: sitk.Image) -> sitk.Image:
    """``img`` with every axis of exactly 2 voxels grown to 4 by repeating its edge voxels (ITK's
    ``ZeroFluxNeumannPad``; the origin moves one voxel back along such an axis, so the original
    voxels keep their physical positions), so that a cubic B-spline interpolator can be evaluated on it.

    ITK's ``BSplineInterpolateImageFunction`` mirrors the support of a point about the axis ends
    (index ``2 (N - 1) - i`` past the end). The support of a cubic spline reaches 2 voxels beyond the
    point, so for ``N = 2`` the mirrored index is -1: it reads outside the image and returns whatever
    memory holds there (NaN or garbage, varying between runs). Axes of 1 voxel (ITK treats them as
    constant) and of 3 or more are left alone, as is an image without such an axis (returned as is).
    With the 2 voxels ``a, b`` the padded axis is ``a, a, b, b``: the interpolant still passes through
    ``a`` and ``b`` at their centres.
    """
    short = [1 if n == 2 else 0 for n in img.GetSize()]
    if not any(short):
        return img
    return sitk.ZeroFluxNeumannPad(img, short, short)
