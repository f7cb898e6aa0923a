"""Low-resolution simulation (image-space degradation) for MRI super-resolution, after Res-SRDiff.

Safari et al. (Res-SRDiff) make each low-resolution (LR) training input from its high-resolution
(HR) target in image space with SimpleITK resampling: the HR volume is resampled onto a coarser grid
(prostate T2w: 3x along each in-plane axis, i.e. 9-fold fewer in-plane voxels, and 2x through plane;
brain T1 maps: 4x along every axis), then resampled back onto the HR grid (nearest neighbour in the
paper, B-spline as an option) so that network input and output share one grid. The evaluation tables
add baseline rows: the same LR volume brought back by bicubic and by nearest-neighbour interpolation.

Geometry (all exact, oblique directions included)
-------------------------------------------------
Voxel ``i`` of the HR volume (shape ``N``, spacing ``s`` mm, direction ``R``, first-voxel centre
``o``) sits at ``o + R diag(s) i``. For integer or real factors ``f >= 1`` (one per voxel axis) the LR
grid

* has spacing ``s * f`` mm and the HR direction;
* shares the HR field-of-view CORNER (the outer face of the first voxel), so LR voxel ``k`` covers HR
  voxels ``k f ... k f + f - 1`` and its centre lies at HR continuous index ``k f + (f - 1) / 2``;
  its affine is ``A_lr = A_hr @ [[diag(f), (f - 1) / 2], [0, 1]]``;
* has ``ceil(N / f)`` voxels along each axis, so the LR field of view covers the whole HR one (a
  partial last block is kept, e.g. 320 -> 107 for f = 3, 20 -> 10 for f = 2).

Bringing the LR volume back uses the HR volume itself as the reference grid, so the result has
exactly the HR shape, spacing, origin and direction (the numpy path returns the HR affine unchanged).
HR points beyond the last LR voxel centre (half an LR voxel at most) take the value of the nearest LR
voxel (``UseNearestNeighborExtrapolator``), never zero.

Interpolators
-------------
``"nearest"``, ``"linear"``, ``"bspline"`` / ``"bicubic"`` / ``"cubic"`` and ``"lanczos"``.
``"bicubic"`` maps to SimpleITK's ``sitkBSpline`` (cubic B-spline, order 3, with the usual
prefilter, so the interpolant passes through the samples). In 3D this is tricubic. It is the same
family as ``scipy.ndimage.zoom(order=3)``; it is *not* the Keys cubic-convolution kernel (a = -0.5) of
MATLAB ``imresize`` / PIL "bicubic", which gives slightly different numbers. We keep one resampling
engine (ITK, multithreaded, as in the paper) for every row of the table; cubic B-spline reproduces
polynomials up to degree 3 in the interior (ITK mirrors at the borders, so a ramp is only exact away
from them) and, like any interpolating cubic, can overshoot at edges (no clipping is applied). An
LR axis of exactly 2 voxels (e.g. 4 slices degraded by 2) is first padded by repeating its edge
voxels (:func:`common.geometry.bspline_ready`): ITK's mirror boundary would read outside the image.

Anti-aliasing
-------------
The paper just resamples (no pre-filter): ``antialias=False`` (default) samples the HR volume at the
LR voxel centres with ``lr_interpolator`` (``"linear"`` by default: for an odd factor the LR centre is
an HR voxel centre, so it is plain decimation; for an even factor it averages the two middle voxels of
the block). ``antialias=True`` first blurs the HR volume with a Gaussian of standard deviation
``antialias_sigma * f`` HR voxels along each axis with ``f > 1`` (no blur along axes with ``f == 1``;
``scipy.ndimage.gaussian_filter``, ``mode="nearest"``), which suppresses aliasing of fine texture.

2D
--
Everything works on N-dimensional images, but the bundles degrade the 3D volume BEFORE slicing: the
through-plane factor needs the neighbouring slices.
"""

from __future__ import annotations

import copy
import math
from typing import Hashable, Mapping, NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.geometry import array_to_sitk, bspline_ready, sitk_affine, sitk_to_array, split_affine

__all__ = [
    "INTERPOLATORS",
    "LowResolutionResult",
    "low_resolution_grid",
    "high_resolution_grid",
    "resample_to_grid",
    "simulate_low_resolution",
    "SimulateLowResolutiond",
    "ResampleToReferenced",
]

INTERPOLATORS: dict[str, int] = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,  # cubic B-spline (order 3)
    "bicubic": sitk.sitkBSpline,  # see module docstring: bicubic == cubic B-spline here
    "cubic": sitk.sitkBSpline,
    "lanczos": sitk.sitkLanczosWindowedSinc,
}


def _interpolator(name: str) -> int:
    key = str(name).lower()
    if key not in INTERPOLATORS:
        raise ValueError(f"unknown interpolator {name!r}; choose one of {sorted(INTERPOLATORS)}")
    return INTERPOLATORS[key]


def _factors(factors: float | Sequence[float], ndim: int, allow_below_one: bool = False) -> np.ndarray:
    f = np.atleast_1d(np.asarray(factors, dtype=np.float64))
    if f.size == 1:
        f = np.repeat(f, ndim)
    if f.size != ndim:
        raise ValueError(f"factors {list(f)} has {f.size} values but the image has {ndim} spatial dims")
    if not np.all(np.isfinite(f)) or np.any(f <= 0) or (not allow_below_one and np.any(f < 1)):
        limit = "> 0" if allow_below_one else ">= 1"
        raise ValueError(f"factors must be finite and {limit}, got {list(f)}")
    return f


# ----------------------------------------------------------------------------------- geometry helpers
def _check_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"affine must be {ndim + 1}x{ndim + 1} for a {ndim}D array, got {a.shape}")
    if abs(np.linalg.det(a[:ndim, :ndim])) < 1e-12:
        raise ValueError(f"affine is singular:\n{a}")
    return a


def low_resolution_grid(
    affine: np.ndarray, shape: Sequence[int], factors: float | Sequence[float]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """LR grid of an HR grid: ``(lr_affine, lr_shape)``.

    Args:
        affine: (n+1, n+1) HR affine (voxel index -> mm); any frame (RAS for NIfTI, LPS for ITK).
        shape: HR spatial shape (n values, voxels).
        factors: per-axis factors ``f >= 1`` (a scalar applies to every axis); trailing affine axes
            beyond ``len(shape)`` (a 4x4 affine of a 2D image) get factor 1.

    Returns:
        ``A_hr @ [[diag(f), (f - 1) / 2], [0, 1]]`` (spacing ``s f``, same direction, same FOV corner)
        and ``ceil(N / f)`` voxels per axis.
    """
    a = np.asarray(affine, dtype=np.float64)
    r = a.shape[0] - 1
    f = _factors(factors, len(shape))
    shape_lr = tuple(int(math.ceil(n / fi - 1e-9)) for n, fi in zip(shape, f))
    f = np.concatenate([f, np.ones(r - len(shape))])
    m = np.eye(r + 1)
    m[:r, :r] = np.diag(f)
    m[:r, r] = (f - 1.0) / 2.0
    return a @ m, shape_lr


def high_resolution_grid(
    affine: np.ndarray, shape: Sequence[int], factors: float | Sequence[float]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """HR grid of an LR grid with the same FOV corner and spacing divided by ``factors``:
    ``(A_lr @ inv([[diag(f), (f - 1) / 2], [0, 1]]), round(N * f))``.

    This is the exact inverse of :func:`low_resolution_grid` for the affine; the shape is
    ``round(N_lr * f)``, which is the original HR shape only when ``f`` divides it (a 320-voxel axis
    degraded by 3 gives 107 LR voxels and 321 here; use the HR reference grid when you have one).
    Factors may be below 1 (``> 0``).
    """
    a = np.asarray(affine, dtype=np.float64)
    r = a.shape[0] - 1
    f = _factors(factors, len(shape), allow_below_one=True)
    shape_hr = tuple(max(1, int(round(n * fi))) for n, fi in zip(shape, f))
    f = np.concatenate([f, np.ones(r - len(shape))])
    m = np.eye(r + 1)
    m[:r, :r] = np.diag(f)
    m[:r, r] = (f - 1.0) / 2.0
    return a @ np.linalg.inv(m), shape_hr


def _resample(img: sitk.Image, size, spacing, origin, direction, interpolator: str) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in size])
    f.SetOutputSpacing([float(v) for v in spacing])
    f.SetOutputOrigin([float(v) for v in origin])
    f.SetOutputDirection([float(v) for v in direction])
    f.SetTransform(sitk.Transform(img.GetDimension(), sitk.sitkIdentity))
    f.SetInterpolator(_interpolator(interpolator))
    f.SetDefaultPixelValue(0.0)
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetOutputPixelType(sitk.sitkFloat32)
    return f.Execute(bspline_ready(img) if _interpolator(interpolator) == sitk.sitkBSpline else img)


def resample_to_grid(
    image: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
    interpolator: str = "bicubic",
) -> np.ndarray:
    """Resample ``image`` (spatial array, voxel axes as in ``affine``) onto the grid ``(ref_affine,
    ref_shape)`` of the same physical frame; returns a float32 array of shape ``ref_shape``.

    Points outside the input take the nearest input voxel's value (nearest-neighbour extrapolation).
    """
    image = np.asarray(image)
    n = image.ndim
    affine = _check_affine(affine, n)
    ref_affine = _check_affine(ref_affine, n)
    spacing, origin, direction = split_affine(ref_affine)
    out = _resample(array_to_sitk(image, affine, frame="itk"), ref_shape, spacing, origin, direction, interpolator)
    return sitk_to_array(out)


# ------------------------------------------------------------------------------------ simulation
class LowResolutionResult(NamedTuple):
    """Result of :func:`simulate_low_resolution`.

    Attributes:
        lr: LR volume on its own grid (``ceil(N / f)`` voxels; float32 array or ``sitk.Image``, as given).
        lr_affine: (n+1, n+1) LR affine in the input's physical frame (mm).
        upsampled: LR volume brought back onto exactly the HR grid (HR shape; float32 array or image).
        upsampled_affine: the HR affine (for the numpy path, an exact copy of the given one).
    """

    lr: np.ndarray | sitk.Image
    lr_affine: np.ndarray
    upsampled: np.ndarray | sitk.Image
    upsampled_affine: np.ndarray


def _blur(img: sitk.Image, factors: np.ndarray, antialias_sigma: float) -> sitk.Image:
    from scipy.ndimage import gaussian_filter

    sigma = np.where(factors > 1, antialias_sigma * factors, 0.0)  # HR voxels, voxel-axis order
    arr = sitk.GetArrayFromImage(img)  # (k, j, i)
    out = sitk.GetImageFromArray(gaussian_filter(arr, sigma=sigma[::-1].tolist(), mode="nearest"))
    out.CopyInformation(img)
    return out


def _downsample(
    hr: sitk.Image, factors: np.ndarray, lr_interpolator: str, antialias: bool, antialias_sigma: float
) -> sitk.Image:
    n = hr.GetDimension()
    size = hr.GetSize()
    spacing = np.asarray(hr.GetSpacing())
    direction = np.asarray(hr.GetDirection()).reshape(n, n)
    origin = np.asarray(hr.GetOrigin()) + direction @ (spacing * (factors - 1.0) / 2.0)
    size_lr = [int(math.ceil(s / f - 1e-9)) for s, f in zip(size, factors)]
    src = _blur(hr, factors, antialias_sigma) if antialias else hr
    return _resample(src, size_lr, spacing * factors, origin, direction.ravel(), lr_interpolator)


def _upsample(lr: sitk.Image, hr: sitk.Image, interpolator: str) -> sitk.Image:
    return _resample(lr, hr.GetSize(), hr.GetSpacing(), hr.GetOrigin(), hr.GetDirection(), interpolator)


def simulate_low_resolution(
    image: sitk.Image | np.ndarray,
    affine: np.ndarray | None = None,
    factors: float | Sequence[float] = (3, 3, 2),
    lr_interpolator: str = "linear",
    back_interpolator: str = "nearest",
    antialias: bool = False,
    antialias_sigma: float = 0.5,
) -> LowResolutionResult:
    """Simulate an LR acquisition of an HR volume and bring it back onto the HR grid.

    Args:
        image: HR volume, either a ``SimpleITK.Image`` (geometry from the image, LPS mm) or a spatial
            numpy array (e.g. (H, W, D), any intensity unit) together with ``affine``.
        affine: (n+1, n+1) voxel-to-mm affine of a numpy ``image`` (RAS for NIfTI); ignored for images.
        factors: per voxel axis, LR spacing / HR spacing (``>= 1``), e.g. ``(3, 3, 2)`` prostate T2w
            (9-fold fewer in-plane voxels, 2-fold through plane), ``(4, 4, 4)`` brain.
        lr_interpolator: how the HR volume is sampled at the LR voxel centres (default ``"linear"``).
        back_interpolator: how the LR volume is brought back to the HR grid (``"nearest"`` as in the
            paper, or ``"bicubic"``/``"bspline"``, ``"linear"``, ``"lanczos"``).
        antialias: Gaussian pre-blur before sampling (sigma ``antialias_sigma * f`` HR voxels).
        antialias_sigma: see ``antialias``.

    Returns:
        :class:`LowResolutionResult` ``(lr, lr_affine, upsampled, upsampled_affine)``, float32; the
        same kind (array or image) as ``image``. See the module docstring for the exact grid.
    """
    if isinstance(image, sitk.Image):
        hr = sitk.Cast(image, sitk.sitkFloat32)
        hr_affine = sitk_affine(hr, frame="itk")
        as_numpy = False
    else:
        arr = np.asarray(image)
        if affine is None:
            raise ValueError("a numpy image needs its affine (voxel index -> mm)")
        hr_affine = _check_affine(affine, arr.ndim)
        hr = array_to_sitk(arr, hr_affine, frame="itk")
        as_numpy = True
    f = _factors(factors, hr.GetDimension())
    lr = _downsample(hr, f, lr_interpolator, antialias, antialias_sigma)
    up = _upsample(lr, hr, back_interpolator)
    lr_affine, _ = low_resolution_grid(hr_affine, hr.GetSize(), f)
    if as_numpy:
        return LowResolutionResult(sitk_to_array(lr), lr_affine, sitk_to_array(up), hr_affine.copy())
    return LowResolutionResult(lr, lr_affine, up, hr_affine)


# ------------------------------------------------------------------------------ MONAI transforms
def _reduce_affine(full: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """The spatial_ndim-D affine used for resampling (a 2D image may carry MONAI's 4x4 affine: keep
    its first axes)."""
    r = full.shape[0] - 1
    if r == spatial_ndim:
        return full
    if r > spatial_ndim:
        sub = np.eye(spatial_ndim + 1)
        sub[:spatial_ndim, :spatial_ndim] = full[:spatial_ndim, :spatial_ndim]
        sub[:spatial_ndim, spatial_ndim] = full[:spatial_ndim, r]
        return sub
    raise ValueError(f"affine {full.shape} has fewer dims than the {spatial_ndim} spatial dims of the image")


def _spatial_affine(x, spatial_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(full affine as given, spatial_ndim-D affine used for resampling) of a channel-first array;
    an array without an affine gets the identity (1 mm voxels)."""
    if isinstance(x, MetaTensor):
        full = np.asarray(x.affine.detach().cpu().numpy(), dtype=np.float64)
    else:
        full = np.eye(spatial_ndim + 1)
    return full, _reduce_affine(full, spatial_ndim)


def _channels(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().as_subclass(torch.Tensor)
        return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
    return np.asarray(x)


def _like(x, array: np.ndarray, affine: np.ndarray):
    """MetaTensor with ``x``'s meta (deep copy) and ``affine``; ``x`` without meta gives a plain tensor."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if isinstance(x, MetaTensor):
        meta = copy.deepcopy(dict(x.meta))
        meta.pop("affine", None)
        return MetaTensor(t, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
    return t


class SimulateLowResolutiond(MapTransform):
    """Make the network input and the baseline images from an HR volume (the training target).

    For each key (channel-first ``(C, H, W, D)`` MetaTensor from ``LoadImaged``; ``.affine`` is the
    RAS NIfTI affine, spacing and direction come from it) the volume is degraded with
    :func:`simulate_low_resolution` once per channel, then the LR volume is brought back onto the HR
    grid with ``back_interpolator`` into ``output_key`` and with each baseline interpolator into
    ``f"{baseline_prefix}{name}"``. All outputs are float32 ``(C, H, W, D)`` MetaTensors with a copy
    of the HR meta and exactly the HR affine. The HR key itself is left unchanged.

    Apply it to the 3D volume before any slicing or cropping (the through-plane factor needs the
    neighbouring slices, and cropping first would move the LR block boundaries).

    Args:
        keys: HR key(s), e.g. ``"label"``. With several keys, each key's outputs go to
            ``f"{output_key}_{key}"`` / ``f"{baseline_prefix}{name}_{key}"`` to avoid collisions.
        factors: per voxel axis factors, e.g. ``[3, 3, 2]`` (prostate) or ``[4, 4, 4]`` (brain).
        lr_spacing: the LR voxel size in mm per voxel axis (e.g. the paper's ``[2, 2, 3]``) instead of
            ``factors``: each volume's factors are ``lr_spacing / its HR spacing`` (must be >= 1).
        back_interpolator: interpolator of the network input (the bundle's default ``"bspline"``,
            as the released code; ``"nearest"`` as the paper's text).
        baseline_interpolators: baselines to write (``()`` for none, e.g. during training).
        output_key: key of the network input.
        baseline_prefix: prefix of the baseline keys.
        lr_key: if given, also store the LR volume on its own LR grid (its own affine) there.
        lr_interpolator, antialias, antialias_sigma: see :func:`simulate_low_resolution`.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        factors: float | Sequence[float],
        back_interpolator: str = "nearest",
        baseline_interpolators: Sequence[str] = ("bicubic", "nearest"),
        output_key: str = "image",
        baseline_prefix: str = "baseline_",
        antialias: bool = False,
        allow_missing_keys: bool = False,
        lr_key: str | None = None,
        lr_interpolator: str = "linear",
        antialias_sigma: float = 0.5,
        lr_spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if factors is None and lr_spacing is None:
            raise ValueError("SimulateLowResolutiond: give factors or lr_spacing (mm)")
        self.factors = factors
        self.lr_spacing = None if lr_spacing is None else [float(v) for v in lr_spacing]
        if isinstance(baseline_interpolators, str):
            baseline_interpolators = (baseline_interpolators,)
        for name in (back_interpolator, lr_interpolator, *baseline_interpolators):
            _interpolator(name)  # fail at construction on a typo
        if factors is not None:
            _factors(factors, len(np.atleast_1d(factors)))  # positive, finite, >= 1
        self.back_interpolator = back_interpolator
        self.baseline_interpolators = tuple(baseline_interpolators)
        self.output_key = output_key
        self.baseline_prefix = baseline_prefix
        self.antialias = antialias
        self.antialias_sigma = antialias_sigma
        self.lr_key = lr_key
        self.lr_interpolator = lr_interpolator

    def _factors_of(self, affine: np.ndarray, n: int, key) -> np.ndarray:
        """The degradation factors of one volume: ``factors``, or ``lr_spacing`` / its HR spacing."""
        if self.lr_spacing is None:
            return _factors(self.factors, n)
        spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:n, :n], axis=0)
        lr = np.atleast_1d(np.asarray(self.lr_spacing, dtype=np.float64))
        if lr.size != n:
            raise ValueError(f"--lr_spacing_mm {self.lr_spacing}: {lr.size} values for {n} spatial dims")
        f = lr / spacing
        if np.any(f < 1 - 1e-6):
            raise ValueError(
                f"--lr_spacing_mm {self.lr_spacing}: finer than the HR spacing {np.round(spacing, 4).tolist()} mm "
                f"of {key} along some axis (a factor below 1)"
            )
        return _factors(np.maximum(f, 1.0), n)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        multi = len(self.keys) > 1
        for key in self.key_iterator(d):
            x = d[key]
            arr = _channels(x)
            if arr.ndim < 2:
                raise ValueError(f"{key}: expected a channel-first array (C, H, W[, D]), got shape {arr.shape}")
            n = arr.ndim - 1
            full_affine, affine = _spatial_affine(x, n)
            f = self._factors_of(affine, n, key)
            names = dict.fromkeys([self.back_interpolator, *self.baseline_interpolators])  # ordered, unique
            ups: dict[str, list[np.ndarray]] = {name: [] for name in names}
            lrs = []
            for c in range(arr.shape[0]):
                hr = array_to_sitk(arr[c], affine, frame="itk")
                lr = _downsample(hr, f, self.lr_interpolator, self.antialias, self.antialias_sigma)
                lrs.append(sitk_to_array(lr))
                for name in names:
                    ups[name].append(sitk_to_array(_upsample(lr, hr, name)))
            sfx = f"_{key}" if multi else ""
            d[f"{self.output_key}{sfx}"] = _like(x, np.stack(ups[self.back_interpolator]), full_affine)
            for name in self.baseline_interpolators:
                d[f"{self.baseline_prefix}{name}{sfx}"] = _like(x, np.stack(ups[name]), full_affine)
            if self.lr_key is not None:
                lr_affine, _ = low_resolution_grid(full_affine, arr.shape[1:], f)
                d[f"{self.lr_key}{sfx}"] = _like(x, np.stack(lrs), lr_affine)
        return d


class ResampleToReferenced(MapTransform):
    """Bring (real or simulated) LR volumes onto an HR grid, e.g. at inference on an LR acquisition.

    Exactly one way of choosing the target grid:

    * ``reference_key``: the grid (affine and spatial shape) of ``data[reference_key]``, e.g. an HR
      reference series; any orientation, resampled in physical (mm) space;
    * ``factors``: same FOV corner and direction, spacing divided by ``factors`` and ``round(N * f)``
      voxels (:func:`high_resolution_grid`), e.g. ``[3, 3, 2]``;
    * ``spacing``: same FOV corner and direction, the given spacing in mm (factors = current spacing /
      ``spacing``; ``round(N * f)`` voxels).

    Inputs are channel-first ``(C, H, W[, D])`` MetaTensors (``.affine`` in mm, any frame as long as
    the reference uses the same one, e.g. RAS from ``LoadImaged``); outputs are float32 MetaTensors
    with the input meta (deep copy) and the target affine. ``meta["spatial_shape"]`` and the inverse
    stack are left untouched (this transform is not invertible).

    Args:
        keys: keys to resample in place.
        reference_key: key of the reference image.
        factors: per-axis factors (scalar for all axes).
        spacing: target spacing in mm (scalar for all axes).
        interpolator: ``"bicubic"`` (default, cubic B-spline), ``"nearest"``, ``"linear"``, ...
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str | None = None,
        factors: float | Sequence[float] | None = None,
        spacing: float | Sequence[float] | None = None,
        interpolator: str = "bicubic",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if sum(v is not None for v in (reference_key, factors, spacing)) != 1:
            raise ValueError("give exactly one of reference_key, factors or spacing")
        _interpolator(interpolator)
        self.reference_key = reference_key
        self.factors = factors
        self.spacing = spacing
        self.interpolator = interpolator

    def _target(self, d: Mapping, x, n: int) -> tuple[np.ndarray, tuple[int, ...]]:
        full, affine = _spatial_affine(x, n)
        shape = _channels(x).shape[1:]
        if self.reference_key is not None:
            if self.reference_key not in d:
                raise KeyError(f"reference key {self.reference_key!r} is not in the data (keys: {list(d)})")
            ref = d[self.reference_key]
            ref_full, _ = _spatial_affine(ref, n)
            return ref_full, tuple(_channels(ref).shape[1:])
        if self.factors is not None:
            f = self.factors
        else:
            sp = np.atleast_1d(np.asarray(self.spacing, dtype=np.float64))
            sp = np.repeat(sp, n) if sp.size == 1 else sp
            if sp.size != n or np.any(sp <= 0):
                raise ValueError(f"spacing {list(sp)} must be {n} positive values (mm)")
            f = np.linalg.norm(affine[:n, :n], axis=0) / sp
        return high_resolution_grid(full, shape, f)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            arr = _channels(x)
            n = arr.ndim - 1
            _, affine = _spatial_affine(x, n)
            tgt_full, tgt_shape = self._target(d, x, n)
            tgt = _reduce_affine(tgt_full, n)
            out = np.stack(
                [resample_to_grid(arr[c], affine, tgt, tgt_shape, self.interpolator) for c in range(arr.shape[0])]
            )
            d[key] = _like(x, out, tgt_full)
        return d
