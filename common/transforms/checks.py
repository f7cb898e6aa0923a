"""Input checks as MONAI dictionary transforms: bad input stops with the file and the problem named."""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


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
                raise ValueError(f"{where}: expected {self.spatial_dims} spatial dims plus channel, got shape {tuple(arr.shape)}")
            if self.channels is not None and arr.shape[0] != self.channels:
                raise ValueError(f"{where}: expected {self.channels} channel(s), got {arr.shape[0]} (shape {tuple(arr.shape)})")
            if arr.is_floating_point() and not torch.isfinite(arr).all():
                n = int((~torch.isfinite(arr)).sum())
                raise ValueError(f"{where}: {n} NaN or infinite voxel(s)")
            if not self.allow_constant and arr.numel() and float(arr.max()) == float(arr.min()):
                raise ValueError(f"{where}: image is constant ({float(arr.min())}); is it empty or corrupt?")
        return d
