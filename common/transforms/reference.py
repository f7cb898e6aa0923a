"""Scale images with another image's recorded intensity scaling.

A synthesis target (DCE phases, a high-resolution image) must be mapped to network space and back.
At inference there is no target, so its scaling cannot come from its own percentiles: it comes from
an input that is always present (the pre-contrast frame, the low-resolution image). Scaling every
target phase with the pre-contrast's record also keeps the relative enhancement between phases and
against the pre-contrast (one scale for all).
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange
from monai.utils import convert_to_dst_type

from common.transforms.intensity import ScalePercentilesd


class ScaleLikeReferenced(MapTransform):
    """Apply the scaling :class:`ScalePercentilesd` recorded for ``reference_key`` to ``keys``.

    ``data[reference_key + "_scaling"]`` must exist (scale the reference first). Each key gets the
    same affine map ``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min`` (no clipping: an
    enhancing voxel may exceed ``b_max``) and a copy of the record under ``key + "_scaling"``, so
    :class:`InverseScalePercentilesd` maps a prediction back to the reference's units.

    Args:
        keys: channel-first images to scale.
        reference_key: the key whose scaling record to use (e.g. ``"dce_pre"``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        scaling_suffix: str = "_scaling",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.scaling_suffix = scaling_suffix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        rkey = f"{self.reference_key}{self.scaling_suffix}"
        if rkey not in d:
            raise KeyError(
                f"ScaleLikeReferenced: no scaling record {rkey!r}; scale {self.reference_key!r} with "
                f"{ScalePercentilesd.__name__} first"
            )
        rec = d[rkey]
        if rec["a_min"].numel() != 1:
            raise ValueError(f"{rkey}: a channel-wise scaling cannot be applied to other images")
        scaler = ScaleIntensityRange(
            float(rec["a_min"]), float(rec["a_max"]), float(rec["b_min"]), float(rec["b_max"]), clip=False
        )
        for key in self.key_iterator(d):
            out = scaler(d[key])
            d[key] = convert_to_dst_type(out, dst=d[key], dtype=torch.float32)[0]
            d[f"{key}{self.scaling_suffix}"] = {k: v.clone() for k, v in rec.items()}
        return d
