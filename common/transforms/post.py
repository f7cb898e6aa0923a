"""Post-processing dictionary transforms for synthesis outputs (applied per decollated case)."""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.transforms import InverseScalePercentilesd


class SplitSamplesd(MapTransform):
    """Split a prediction of 3 * C channels (mean, pixel-wise std and first draw, from repeated
    sampling: :class:`common.inferers.DiffusionVolumeInferer` with ``num_samples > 1``) into ``key``
    (the mean, C channels), ``f"{key}_std"`` and ``f"{key}_first"``; 2 * C channels (mean, std)
    give the first two; a prediction of C channels is left alone."""

    def __init__(self, keys: KeysCollection, out_channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.out_channels = int(out_channels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            c = self.out_channels
            if x.shape[0] in (2 * c, 3 * c):
                d[key], d[f"{key}_std"] = x[:c], x[c : 2 * c]
                if x.shape[0] == 3 * c:
                    d[f"{key}_first"] = x[2 * c :]
            elif x.shape[0] != c:
                raise ValueError(f"{key}: {x.shape[0]} channels, expected {c}, {2 * c} or {3 * c}")
        return d


class CopyChannelsd(MapTransform):
    """Trivial baselines: copy named channels of a stacked input into new keys.

    Args:
        source_key: the stacked input, (C_in, ...).
        channel_names: the name of each of its channels, e.g. ``["t2w", "adc", "dce_pre"]``.
        outputs: new key -> list of channel names to stack, e.g.
            ``{"baseline_copy_pre": ["dce_pre", "dce_pre", "dce_pre"]}``.
    """

    def __init__(self, source_key: str, channel_names: Sequence[str], outputs: Mapping[str, Sequence[str]]) -> None:
        super().__init__([source_key])
        self.source_key = source_key
        self.channel_names = list(channel_names)
        for out, names in outputs.items():
            missing = [n for n in names if n not in self.channel_names]
            if missing:
                raise ValueError(f"{out}: channels {missing} are not among the inputs {self.channel_names}")
        self.outputs = {k: [self.channel_names.index(n) for n in v] for k, v in outputs.items()}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        src = d[self.source_key]
        for out, idx in self.outputs.items():
            d[out] = src[idx].clone()
        return d


class InvertScalingd(MapTransform):
    """Map network-space values back to the original intensity units of ``data[scaling_key]``.

    ``keys`` get the full inverse of the affine intensity map (MONAI-style
    :class:`common.transforms.InverseScalePercentilesd`); ``std_keys`` (pixel-wise standard
    deviations of repeated samples) get only its slope, ``(a_max - a_min) / (b_max - b_min)``.
    The scaling record is the one :class:`common.transforms.ScalePercentilesd` stored.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scaling_key: str,
        std_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaling_key = scaling_key
        self.std_keys = [std_keys] if isinstance(std_keys, str) else list(std_keys)
        self.inverse = InverseScalePercentilesd(keys, scaling_key, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = self.inverse({k: v for k, v in data.items() if v is not None or k not in self.keys})
        record = d[self.scaling_key]
        slope = (record["a_max"] - record["a_min"]) / (record["b_max"] - record["b_min"])
        if slope.numel() != 1:
            raise ValueError(f"{self.scaling_key}: channel-wise scaling cannot be applied to a standard deviation")
        for key in self.std_keys:
            if d.get(key) is not None:
                d[key] = d[key] * float(slope)
        return d


class SplitD3MOutputsd(MapTransform):
    """Post-processing: ``pred`` (4 ch: T1c, mask, u_H, u_W) -> ``pred`` (T1c, 1 ch), ``et_mask``
    (1 ch, 1.0 where the mask estimate > 0), ``deformation`` (2 ch); ``pred_std`` -> its T1c
    channel; ``label`` (T1c[, mask]) -> ``label`` (T1c) and ``label_mask`` (1.0 inside the true ET)."""

    def __init__(self) -> None:
        super().__init__(["pred"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        p = d["pred"]
        d["pred"], d["et_mask"], d["deformation"] = p[:1], (p[1:2] > 0).float(), p[2:4]
        for k in ("pred_std", "pred_first"):
            if d.get(k) is not None:
                d[k] = d[k][:1]
        lab = d.get("label")
        if lab is not None:
            d["label"] = lab[:1]
            d["label_mask"] = (lab[1:2] > 0).float() if lab.shape[0] > 1 else None
        return d
