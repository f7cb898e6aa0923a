"""Fixed-size crops around a mask (or the image centre), padding where the box leaves the image.

Box convention (shared by :func:`crop_or_pad` and :class:`CropAroundMaskd`, and the same as MONAI's
``SpatialCrop(roi_center=..., roi_size=...)``): the centre ``c`` (float voxel coordinates) is rounded to
the voxel ``ci = floor(c + 0.5)``; the box of size ``s`` starts at ``ci - s // 2``. An odd box is centred
exactly on ``ci``; an even box has ``ci`` as its ``s // 2``-th voxel. The default centre
``(n - 1) / 2`` rounds to ``n // 2``, i.e. MONAI's ``CenterSpatialCrop``.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import BorderPad, InvertibleTransform, MapTransform, Randomizable, SpatialCrop
from monai.utils import TraceKeys

__all__ = ["crop_or_pad", "mask_centroid", "box_start", "CropAroundMaskd", "RandCropSamplesNearLabeld"]


def mask_centroid(mask: Any) -> np.ndarray:
    """Centroid, in float voxel coordinates (one per array axis), of the non-zero voxels of ``mask``.

    Raises ``ValueError`` for an empty mask.
    """
    m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask) != 0
    idx = np.nonzero(m)
    if idx[0].size == 0:
        raise ValueError("mask_centroid: the mask is empty")
    return np.array([i.mean() for i in idx], dtype=np.float64)


def box_start(center_vox: Sequence[float], size: Sequence[int]) -> np.ndarray:
    """First voxel (int, may be negative) of a box of ``size`` around ``center_vox`` (module convention)."""
    c = np.asarray(center_vox, dtype=np.float64)
    s = np.asarray(size, dtype=np.int64)
    return np.floor(c + 0.5).astype(np.int64) - s // 2


def crop_or_pad(
    array: np.ndarray,
    affine: np.ndarray,
    size: Sequence[int],
    center_vox: Sequence[float] | None = None,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a box of ``size`` voxels centred on ``center_vox``, padding with ``pad_value`` outside the image.

    Args:
        array: (x, y, z[, ...extra dims]); the first ``len(size)`` (<= 3) axes are spatial, extra axes
            (e.g. time) are kept whole.
        affine: 4x4 voxel-to-world matrix of ``array`` (mm).
        size: box size per spatial axis (voxels).
        center_vox: box centre in float voxel coordinates; default the image centre ``(n - 1) / 2``.
        pad_value: value of voxels outside the input image.

    Returns:
        ``(cropped, new_affine)``: ``cropped`` has shape ``(*size, *extra)`` and ``array``'s dtype;
        ``new_affine`` is ``affine`` with the origin moved to the box's first voxel
        (``new_affine @ [i, j, k, 1] == affine @ [i + s0, j + s1, k + s2, 1]``), so every voxel keeps its
        world position.
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    size = [int(s) for s in size]
    n = len(size)
    if not 1 <= n <= 3 or array.ndim < n:
        raise ValueError(
            f"size {size} needs 1-3 spatial axes and an array with at least that many dims, got shape {array.shape}"
        )
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if any(s <= 0 for s in size):
        raise ValueError(f"size must be positive, got {size}")
    shape = np.array(array.shape[:n])
    center = (shape - 1) / 2.0 if center_vox is None else np.asarray(center_vox, dtype=np.float64)[:n]
    start = box_start(center, size)
    out = np.full(tuple(size) + array.shape[n:], pad_value, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[
            tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        ]
    shift = np.zeros(3)
    shift[:n] = start
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ shift + affine[:3, 3]
    return out, new_affine


def _crop_pad(img: Any, start: np.ndarray, size: Sequence[int], pad_value: float) -> Any:
    """Box [start, start + size) of a channel-first image via MONAI SpatialCrop + BorderPad (affine updated)."""
    shape = np.array(img.shape[1:])
    lo = np.clip(start, 0, shape)
    hi = np.clip(start + np.asarray(size), 0, shape)
    hi = np.maximum(hi, lo)
    cropper = SpatialCrop(roi_start=lo.tolist(), roi_end=hi.tolist())
    with cropper.trace_transform(False):
        out = cropper(img)
    before = np.maximum(-start, 0)
    after = np.asarray(size) - (hi - lo) - before
    if np.any(before > 0) or np.any(after > 0):
        border = [int(v) for pair in zip(before, after) for v in pair]
        padder = BorderPad(spatial_border=border, mode="constant", value=pad_value)
        with padder.trace_transform(False):
            out = padder(out)
    return out


class CropAroundMaskd(MapTransform, InvertibleTransform):
    """Crop every key to ``roi_size`` around the centroid of ``mask_key`` (or the image centre without a
    mask), padding with ``pad_value`` where the box leaves the image.

    Built on MONAI's :class:`~monai.transforms.SpatialCrop` and :class:`~monai.transforms.BorderPad`, so a
    MetaTensor's affine is updated by MONAI (voxel (0, 0, 0) of the output is the box corner in world
    space). Box rounding: see the module docstring; the same box as :func:`crop_or_pad`.

    Args:
        keys: channel-first images (C, *spatial), all with the same spatial shape.
        roi_size: box size per spatial dim; a value <= 0 keeps that dim whole.
        mask_key: mask (C, *spatial) whose non-zero voxels (any channel) give the centre. May also be
            one of ``keys`` (it is cropped too). ``None``: image centre.
        pad_value: value of padded voxels.

    Invertible: ``inverse`` puts each key back on its original grid (voxels outside the box become
    ``pad_value``), e.g. to paste a prediction made on the crop back into the full image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        mask_key: Hashable | None = None,
        allow_missing_keys: bool = False,
        pad_value: float = 0.0,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.roi_size = [int(s) for s in roi_size]
        self.mask_key = mask_key
        self.pad_value = float(pad_value)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shape = np.array(d[keys[0]].shape[1:])
        if len(self.roi_size) != len(shape):
            raise ValueError(
                f"roi_size {self.roi_size} has {len(self.roi_size)} dims, images have {len(shape)} spatial dims"
            )
        size = np.where(np.array(self.roi_size) > 0, self.roi_size, shape)
        if self.mask_key is not None:
            m = d[self.mask_key]
            m = m.detach().cpu().numpy() if hasattr(m, "detach") else np.asarray(m)
            if m.shape[1:] != tuple(shape):
                raise ValueError(
                    f"CropAroundMaskd: mask {self.mask_key!r} shape {m.shape} does not match images {tuple(shape)}"
                )
            center = mask_centroid(np.any(m != 0, axis=0))
        else:
            center = (shape - 1) / 2.0
        start = box_start(center, size)
        for key in keys:
            if tuple(d[key].shape[1:]) != tuple(shape):
                raise ValueError(
                    f"CropAroundMaskd: {key!r} spatial shape {tuple(d[key].shape[1:])} differs from {tuple(shape)}"
                )
            out = _crop_pad(d[key], start, size, self.pad_value)
            d[key] = self.push_transform(out, extra_info={"start": start.tolist(), "orig_shape": shape.tolist()})
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d[key])[TraceKeys.EXTRA_INFO]
            start, orig = np.array(info["start"]), np.array(info["orig_shape"])
            # the original grid seen from the box starts at -start and has the original size
            d[key] = _crop_pad(d[key], -start, orig, self.pad_value)
        return d


class RandCropSamplesNearLabeld(Randomizable, MapTransform):
    """``num_samples`` random crops of ``roi_size``, a share of them centred on the non-zero voxels of
    ``label_key`` (MONAI's ``RandCropByPosNegLabeld``: centres drawn from the label's voxels with
    probability ``pos / (pos + neg)``, else from its zero voxels); uniform random crops (MONAI's
    ``RandSpatialCropSamplesd``) when ``label_key`` is ``None``, absent from the data or empty.

    Used by training on patches so that small structures (a lesion mask) are in more of the crops;
    ``label_key`` is cropped with ``keys`` and removed from the output dicts (only ``keys`` and the
    other entries remain). ``roi_size`` entries of -1 take the whole axis. The label's voxel indices
    are found on every call unless MONAI's ``FgBgToIndicesd(label_key)`` ran before (in the cached,
    deterministic part of a pipeline): then its ``<label_key>_fg_indices`` / ``_bg_indices`` are used
    (the same crops, without the search) and removed from the outputs too.

    Returns:
        a list of ``num_samples`` dicts, each ``keys`` cropped to ``roi_size``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        num_samples: int,
        label_key: str | None = None,
        pos: float = 1.0,
        neg: float = 1.0,
    ) -> None:
        from monai.transforms import RandCropByPosNegLabeld, RandSpatialCropSamplesd

        MapTransform.__init__(self, keys)
        self.label_key = label_key or None
        self.uniform = RandSpatialCropSamplesd(self.keys, roi_size, num_samples=num_samples, random_size=False)
        self.near = None
        if self.label_key is not None:
            if pos < 0 or neg < 0 or pos + neg <= 0:
                raise ValueError(f"crop_pos/crop_neg must be >= 0 and not both 0, got {pos} and {neg}")
            self.indices = (f"{self.label_key}_fg_indices", f"{self.label_key}_bg_indices")
            self.near = RandCropByPosNegLabeld(
                [*self.keys, self.label_key],
                self.label_key,
                roi_size,
                pos=pos,
                neg=neg,
                num_samples=num_samples,
                fg_indices_key=self.indices[0],
                bg_indices_key=self.indices[1],
            )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.uniform.set_random_state(seed, state)
        if self.near is not None:
            self.near.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:
        label = None if self.label_key is None else data.get(self.label_key)
        if label is None or not bool((label != 0).any()):
            out = self.uniform(data)
        else:
            out = self.near(data)
        if self.label_key is not None:
            for d in out:
                for k in (self.label_key, *self.indices):
                    d.pop(k, None)
        return out
