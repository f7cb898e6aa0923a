"""Invertible intensity normalisation as MONAI dictionary transforms.

Images are channel-first, (C, *spatial) per sample; a batch adds a leading B.

Both transforms store what they used in the data dictionary (``f"{key}_scaling"`` /
``f"{key}_tinorm"``): a dict of float64 tensors that survives MONAI collation (shapes (C',) per
sample become (B, C') in a batch) so a network OUTPUT, which has no transform trace, can be mapped back
to the input's intensity units with :class:`InverseScalePercentilesd` / :class:`InverseTINormd`. On a
``MetaTensor`` they also record a trace, so ``transform.inverse(data)`` and MONAI's ``Invertd`` work.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, MapTransform, ScaleIntensityRange
from monai.utils import TraceKeys, convert_to_dst_type, convert_to_tensor

__all__ = [
    "ScalePercentilesd",
    "InverseScalePercentilesd",
    "invert_scaling",
    "TINormd",
    "InverseTINormd",
    "invert_tinorm",
]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _mask_for(mask: Any, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    """Bool mask broadcast to ``shape`` (C, *spatial); accepts (1|C, *spatial) or (*spatial)."""
    if mask is None:
        return None
    m = _np(mask) != 0
    if m.shape == tuple(shape[1:]):
        m = m[None]
    try:
        m = np.broadcast_to(m, shape)
    except ValueError as e:
        raise ValueError(f"{what}: mask shape {m.shape} does not fit image shape {tuple(shape)}") from e
    if not m.any():
        raise ValueError(f"{what}: the mask is empty")
    return m


def _reshape_stat(v: Any, x: Any) -> Any:
    """Stored statistic (C',) or (B, C') -> broadcastable against ``x`` (C, *sp) / (B, C, *sp)."""
    if isinstance(x, torch.Tensor):
        v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
        if isinstance(v, MetaTensor):
            v = v.as_tensor()
    else:
        v = np.asarray(_np(v), dtype=np.float64)
    if v.ndim == 0:
        return v
    return v.reshape(tuple(v.shape) + (1,) * (x.ndim - v.ndim))


def _cast_like(out: Any, x: Any) -> Any:
    return out.to(x.dtype) if isinstance(x, torch.Tensor) else out.astype(np.asarray(x).dtype, copy=False)


def invert_scaling(x: Any, a_min: Any, a_max: Any, b_min: Any, b_max: Any) -> Any:
    """Exact inverse of ``ScaleIntensityRange(a_min, a_max, b_min, b_max)`` (without clipping):
    ``(x - b_min) / (b_max - b_min) * (a_max - a_min) + a_min``; for ``a_max == a_min`` MONAI's forward
    is ``x - a_min + b_min``, inverted as ``x - b_min + a_min``.

    Computed in float64, returned in ``x``'s type and dtype. The parameters are scalars or arrays
    broadcastable against ``x`` (numpy or torch).
    """
    if np.any(_np(b_max) == _np(b_min)):
        raise ValueError("invert_scaling: b_min == b_max, the forward scaling is not invertible")
    xt = x
    if isinstance(x, torch.Tensor):
        args = [
            torch.as_tensor(_np(v) if not isinstance(v, torch.Tensor) else v, dtype=torch.float64, device=x.device)
            for v in (a_min, a_max, b_min, b_max)
        ]
        a0, a1, b0, b1 = args
        xd = x.to(torch.float64)
        scaled = (xd - b0) / (b1 - b0) * (a1 - a0) + a0
        out = torch.where(a1 == a0, xd - b0 + a0, scaled)
    else:
        a0, a1, b0, b1 = (np.asarray(_np(v), dtype=np.float64) for v in (a_min, a_max, b_min, b_max))
        xd = np.asarray(x, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = (xd - b0) / (b1 - b0) * (a1 - a0) + a0
        out = np.where(a1 == a0, xd - b0 + a0, scaled)
    return _cast_like(out, xt)


def _trace_info(tr: InvertibleTransform, x: Any) -> dict | None:
    """Pop and return this transform's extra_info from a MetaTensor's trace, if the last op is ours."""
    if isinstance(x, MetaTensor) and x.applied_operations:
        last = x.applied_operations[-1]
        if last.get(TraceKeys.CLASS_NAME) == tr.__class__.__name__:
            return tr.pop_transform(x)[TraceKeys.EXTRA_INFO]
    return None


class ScalePercentilesd(MapTransform, InvertibleTransform):
    """Map the [``lower``, ``upper``] percentiles of each image to [``b_min``, ``b_max``], invertibly.

    The arithmetic is MONAI's :class:`~monai.transforms.ScaleIntensityRange` (what
    ``ScaleIntensityRangePercentiles`` uses); this wrapper exists because MONAI's percentile transform
    neither records the (a_min, a_max) it used (so a prediction cannot be mapped back to input units),
    nor scales several keys jointly, nor takes the percentiles inside a mask.

    Args:
        keys: channel-first images (C, *spatial).
        lower, upper: percentiles in [0, 100] (numpy linear interpolation).
        b_min, b_max: target values of the two percentiles.
        clip: clip the output to [b_min, b_max] (then the inverse is exact only inside that range).
        joint: ONE pair of percentiles over all ``keys`` together (and all channels), e.g. DCE phases as
            separate keys, so relative enhancement between phases survives; else one pair per key.
        mask_key: percentiles over the voxels where this (1|C, *spatial) mask is non-zero only; the
            scaling is still applied to the whole image.
        channel_wise: one pair per channel (not with ``joint``).
        scaling_suffix: the pair is stored as ``d[key + scaling_suffix] = {"a_min", "a_max", "b_min",
            "b_max"}``, float64 tensors of shape (C',) (C' = C if channel-wise, else 1).
        dtype: output dtype.

    Output: same keys, scaled, as tensors (MetaTensor when meta tracking is on, like MONAI).
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        b_min: float = -1.0,
        b_max: float = 1.0,
        clip: bool = False,
        joint: bool = False,
        mask_key: Hashable | None = None,
        channel_wise: bool = False,
        scaling_suffix: str = "_scaling",
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        if b_min == b_max:
            raise ValueError("b_min == b_max is not invertible")
        if joint and channel_wise:
            raise ValueError("joint and channel_wise cannot both be set")
        self.lower, self.upper = float(lower), float(upper)
        self.b_min, self.b_max = float(b_min), float(b_max)
        self.clip, self.joint, self.channel_wise = clip, joint, channel_wise
        self.mask_key, self.scaling_suffix, self.dtype = mask_key, scaling_suffix, dtype

    def _percentiles(self, vals: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(vals.astype(np.float64, copy=False), [self.lower, self.upper])
        return float(lo), float(hi)

    def _values(self, d: Mapping, key: Hashable) -> list[np.ndarray]:
        """Voxel values used for the percentiles: one array per channel (channel-wise) or one in all."""
        x = _np(d[key])
        m = _mask_for(d[self.mask_key], x.shape, f"ScalePercentilesd({key})") if self.mask_key is not None else None
        if self.channel_wise:
            return [x[c][m[c]] if m is not None else x[c].ravel() for c in range(x.shape[0])]
        return [x[m] if m is not None else x.ravel()]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if self.joint and keys:
            pair = self._percentiles(np.concatenate([self._values(d, k)[0] for k in keys]))
            ranges = {k: [pair] for k in keys}
        else:
            ranges = {k: [self._percentiles(v) for v in self._values(d, k)] for k in keys}
        for key in keys:
            img = convert_to_tensor(d[key], track_meta=get_track_meta())
            img_t = convert_to_tensor(img, track_meta=False)
            scalers = [
                ScaleIntensityRange(lo, hi, self.b_min, self.b_max, self.clip, dtype=self.dtype)
                for lo, hi in ranges[key]
            ]
            if self.channel_wise:
                out = torch.stack([convert_to_tensor(s(img_t[c]), track_meta=False) for c, s in enumerate(scalers)])
            else:
                out = convert_to_tensor(scalers[0](img_t), track_meta=False)
            out = convert_to_dst_type(out, dst=img, dtype=self.dtype)[0]
            a_min = [r[0] for r in ranges[key]]
            a_max = [r[1] for r in ranges[key]]
            info = {"a_min": a_min, "a_max": a_max, "b_min": self.b_min, "b_max": self.b_max}
            d[key] = self.push_transform(out, extra_info=info)
            d[f"{key}{self.scaling_suffix}"] = {
                "a_min": torch.tensor(a_min, dtype=torch.float64),
                "a_max": torch.tensor(a_max, dtype=torch.float64),
                "b_min": torch.tensor([self.b_min], dtype=torch.float64),
                "b_max": torch.tensor([self.b_max], dtype=torch.float64),
            }
        return d

    def inverse(self, data: Mapping) -> dict:
        """Undo the scaling of each key, from its MetaTensor trace or else from ``d[key + scaling_suffix]``."""
        d = dict(data)
        for key in self.key_iterator(d):
            info = _trace_info(self, d[key])
            if info is None:
                skey = f"{key}{self.scaling_suffix}"
                if skey not in d:
                    raise KeyError(f"ScalePercentilesd.inverse: {key!r} has no trace and there is no {skey!r} entry")
                info = d[skey]
            d[key] = _invert_from(d[key], info)
        return d


def _invert_from(x: Any, s: Mapping) -> Any:
    return invert_scaling(x, *(_reshape_stat(s[k], x) for k in ("a_min", "a_max", "b_min", "b_max")))


class InverseScalePercentilesd(MapTransform):
    """Map ``keys`` (e.g. a network prediction) back to input units with the scaling stored by
    :class:`ScalePercentilesd` under ``scaling_key`` (e.g. ``"image_scaling"``).

    Works per sample ((C, *spatial), stored tensors (C',)) and on a collated batch ((B, C, *spatial),
    stored tensors (B, C')). With channel-wise scaling the prediction must have the same channels.
    """

    def __init__(self, keys: KeysCollection, scaling_key: Hashable, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaling_key = scaling_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.scaling_key not in d:
            raise KeyError(f"InverseScalePercentilesd: no {self.scaling_key!r} in the data (keys: {list(d)})")
        for key in self.key_iterator(d):
            d[key] = _invert_from(d[key], d[self.scaling_key])
        return d


def invert_tinorm(x: Any, mean: Any, std: Any) -> Any:
    """Inverse TI-norm: ``x * std + mean`` in float64, returned in ``x``'s type and dtype."""
    if isinstance(x, torch.Tensor):
        out = x.to(torch.float64) * torch.as_tensor(
            _np(std) if not isinstance(std, torch.Tensor) else std, dtype=torch.float64, device=x.device
        )
        out = out + torch.as_tensor(
            _np(mean) if not isinstance(mean, torch.Tensor) else mean, dtype=torch.float64, device=x.device
        )
    else:
        out = np.asarray(x, dtype=np.float64) * np.asarray(_np(std), dtype=np.float64) + np.asarray(
            _np(mean), dtype=np.float64
        )
    return _cast_like(out, x)


class TINormd(MapTransform, InvertibleTransform):
    """TI-norm (iterU-Net): normalise a DCE series by the statistics of ONE reference time point.

    For an array with time as the channel dim, (T, *spatial), every time point is centred and divided by
    the mean and the population standard deviation (ddof=0) of time point ``ref_index`` (default 1, the
    first post-contrast), over the whole image or inside ``mask_key``. Enhancement relative to that
    reference is preserved across time points, unlike per-time-point z-scoring.

    Args:
        keys: series (T, *spatial).
        ref_index: index of the reference time point (negative counts from the end).
        mask_key: optional mask (1, *spatial) or (*spatial).
        inverse_key_suffix: ``d[key + suffix] = {"mean": (1,), "std": (1,)}`` float64 tensors.

    Raises ``ValueError`` when the reference has zero standard deviation.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_index: int = 1,
        mask_key: Hashable | None = None,
        inverse_key_suffix: str = "_tinorm",
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_index, self.mask_key, self.suffix, self.dtype = int(ref_index), mask_key, inverse_key_suffix, dtype

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=get_track_meta())
            x = _np(img)
            if not -x.shape[0] <= self.ref_index < x.shape[0]:
                raise ValueError(
                    f"TINormd({key}): ref_index {self.ref_index} out of range for {x.shape[0]} time points"
                )
            ref = x[self.ref_index].astype(np.float64)
            if self.mask_key is not None:
                ref = ref[_mask_for(d[self.mask_key], (1, *ref.shape), f"TINormd({key})")[0]]
            mean, std = float(ref.mean()), float(ref.std())
            if not std > 0:
                raise ValueError(f"TINormd({key}): reference time point {self.ref_index} has zero standard deviation")
            out = (img.to(torch.float64) - mean) / std
            out = convert_to_dst_type(out, dst=img, dtype=self.dtype)[0]
            d[key] = self.push_transform(out, extra_info={"mean": mean, "std": std})
            d[f"{key}{self.suffix}"] = {
                "mean": torch.tensor([mean], dtype=torch.float64),
                "std": torch.tensor([std], dtype=torch.float64),
            }
        return d

    def inverse(self, data: Mapping) -> dict:
        """``x * std + mean`` per key, from the MetaTensor trace or else from ``d[key + suffix]``."""
        d = dict(data)
        for key in self.key_iterator(d):
            info = _trace_info(self, d[key])
            if info is None:
                skey = f"{key}{self.suffix}"
                if skey not in d:
                    raise KeyError(f"TINormd.inverse: {key!r} has no trace and there is no {skey!r} entry")
                info = d[skey]
            d[key] = invert_tinorm(d[key], _reshape_stat(info["mean"], d[key]), _reshape_stat(info["std"], d[key]))
        return d


class InverseTINormd(MapTransform):
    """Undo TI-norm on ``keys`` (e.g. a prediction) with the statistics stored by :class:`TINormd` under
    ``stats_key`` (e.g. ``"image_tinorm"``); per sample or on a collated batch."""

    def __init__(self, keys: KeysCollection, stats_key: Hashable, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.stats_key = stats_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.stats_key not in d:
            raise KeyError(f"InverseTINormd: no {self.stats_key!r} in the data (keys: {list(d)})")
        s = d[self.stats_key]
        for key in self.key_iterator(d):
            d[key] = invert_tinorm(d[key], _reshape_stat(s["mean"], d[key]), _reshape_stat(s["std"], d[key]))
        return d
