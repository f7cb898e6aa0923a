"""Input checks as MONAI dictionary transforms: bad input stops with the file and the problem named."""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform


def _name(data: Mapping, key: Hashable) -> str:
    meta = getattr(data[key], "meta", None) or {}
    return str(meta.get("filename_or_obj", key))


class CheckImaged(MapTransform):
    """Raise ``ValueError`` naming the file when an image has NaN/inf values, is constant, or has
    the wrong number of channels or spatial dims.

    Args:
        keys: keys to check (channel-first arrays, (C, H, W[, D])).
        spatial_dims: expected number of spatial dims (e.g. 3); ``None`` skips the check.
        channels: expected number of channels; ``None`` skips the check.
        allow_constant: accept constant images (masks may be empty).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = None,
        channels: int | None = None,
        allow_constant: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.allow_constant = allow_constant

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            arr = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            where = f"{_name(d, key)} ({key})"
            if self.spatial_dims is not None and arr.ndim != self.spatial_dims + 1:
                raise ValueError(
                    f"{where}: expected {self.spatial_dims} spatial dims plus channel, got shape {tuple(arr.shape)}"
                )
            if self.channels is not None and arr.shape[0] != self.channels:
                raise ValueError(
                    f"{where}: expected {self.channels} channel(s), got {arr.shape[0]} (shape {tuple(arr.shape)})"
                )
            if arr.is_floating_point() and not torch.isfinite(arr).all():
                n = int((~torch.isfinite(arr)).sum())
                raise ValueError(f"{where}: {n} NaN or infinite voxel(s)")
            if not self.allow_constant and arr.numel() and float(arr.max()) == float(arr.min()):
                raise ValueError(f"{where}: image is constant ({float(arr.min())}); is it empty or corrupt?")
        return d


class CheckSameGridd(MapTransform):
    """Raise ``ValueError`` naming both files when the images of a case are not on one grid.

    The bundles stack a case's volumes channel by channel, so a volume that is shifted, flipped or
    resampled differently would silently be paired with the wrong anatomy. Every key is compared
    with ``reference_key``: spatial shape, and the affine (voxel -> mm: spacing, direction, origin)
    within ``atol_mm`` per entry (direction and spacing entries are scaled by the extent of the grid,
    so the tolerance is in millimetres at the far corner of the volume).

    Args:
        keys: keys of the loaded images (MetaTensors with an ``affine``), channel first.
        reference_key: the image whose grid the others must share (e.g. the DCE pre-contrast).
        atol_mm: largest allowed position difference in mm anywhere in the volume.
        hint: what to do, appended to the message (the script that puts a case on one grid).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        atol_mm: float = 0.1,
        hint: str = "re-run the ingest",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.atol_mm = float(atol_mm)
        self.hint = hint

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.reference_key not in d:
            return d
        ref = d[self.reference_key]
        ref_shape = tuple(ref.shape[1:])
        ref_aff = np.asarray(getattr(ref, "affine", np.eye(4)), dtype=np.float64)
        ref_name = _name(d, self.reference_key)
        for key in self.key_iterator(d):
            if key == self.reference_key:
                continue
            x = d[key]
            name = _name(d, key)
            if tuple(x.shape[1:]) != ref_shape:
                raise ValueError(
                    f"{name} ({key}): grid {tuple(x.shape[1:])} differs from {ref_name} ({self.reference_key}) "
                    f"{ref_shape}; every volume of a case must be on one grid ({self.hint})"
                )
            aff = np.asarray(getattr(x, "affine", np.eye(4)), dtype=np.float64)
            extent = np.asarray(ref_shape, dtype=np.float64)
            # position difference at the far corner: |dA[:3,:3]| @ extent + |d origin|
            diff = np.abs(aff[:3, :3] - ref_aff[:3, :3]) @ extent + np.abs(aff[:3, 3] - ref_aff[:3, 3])
            if float(diff.max()) > self.atol_mm:
                raise ValueError(
                    f"{name} ({key}): not on the grid of {ref_name} ({self.reference_key}): voxel positions differ "
                    f"by up to {float(diff.max()):.2f} mm (origin {np.round(aff[:3, 3], 2).tolist()} vs "
                    f"{np.round(ref_aff[:3, 3], 2).tolist()}); every volume of a case must be on one grid ({self.hint})"
                )
        return d


class CheckPatchSized(MapTransform):
    """Raise ``ValueError`` naming the setting and the file when a training patch is larger than
    the image it is cut from.

    MONAI's random crops shrink a too-large ``roi_size`` to the image without a word, so
    ``--patch_size [256, 256]`` on 160 x 160 slices would silently train on whole slices.

    Args:
        keys: keys of channel-first images (C, H, W[, D]).
        patch_size: the requested patch, one entry per leading spatial dim; ``-1`` (or any value
            <= 0) means the whole extent along that dim. Trailing spatial dims not listed are not
            checked (e.g. the slice axis of a 2D patch cut from a 3D volume).
        name: the setting named in the message.
    """

    def __init__(
        self, keys: KeysCollection, patch_size, name: str = "patch_size", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.patch_size = [int(p) for p in patch_size]
        self.name = name

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[1:])
            too_big = [(p, s) for p, s in zip(self.patch_size, shape) if p > s]
            if too_big:
                wanted = [p if p > 0 else s for p, s in zip(self.patch_size, shape)]
                raise ValueError(
                    f"--{self.name} {self.patch_size}: larger than the image {_name(d, key)} ({key}), "
                    f"spatial shape {shape}; the patch {wanted} does not fit (use at most "
                    f"{list(shape[: len(self.patch_size)])}, or -1 for the whole extent)"
                )
        return d


class ReadImaged(LoadImaged):
    """MONAI's ``LoadImaged`` that names the file it could not read.

    A truncated ``.nii.gz`` otherwise ends in nibabel's ``EOFError: Compressed file ended before the
    end-of-stream marker was reached`` under "applying transform LoadImaged", with no file named.
    Arguments are ``LoadImaged``'s; the output is the same.

    Raises:
        ValueError: ``"<file> (<key>): cannot be read (<reason>); is it truncated, or not an image?"``.
    """

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:
            culprit, cause = None, e
            for key in self.key_iterator(dict(data)):  # the failure path only: find the file that fails alone
                try:
                    self._loader(data[key], reader)
                except Exception as one:
                    culprit, cause = key, one
                    break
            while cause.__cause__ is not None:
                cause = cause.__cause__
            what = (
                f"{data[culprit]} ({culprit})"
                if culprit is not None
                else ", ".join(f"{data[k]} ({k})" for k in self.key_iterator(dict(data)))
            )
            first = str(cause).splitlines()[0] if str(cause) else ""
            reason = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
            raise ValueError(f"{what}: cannot be read ({reason}); is it truncated, or not an image?") from None
