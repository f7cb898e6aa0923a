"""Pick named 3D phases out of a loaded 4D DCE series, as a MONAI dictionary transform.

The prepared layout (:mod:`common.layout`) keeps the whole dynamic series (``dce.nii.gz``, 4D
``(x, y, z, t)``) and its time vector (``dce_times.json``, ``{"times_s": [...]}``) next to the
phases the ingest picked. A method that defines its targets differently (DCE-diff: the middle and
the last time point) selects them here at load time, with the rules of
:func:`common.dce.select_phases` (index, fraction of the series, time in seconds, or the default
arrival-based ``pre``/``onset``/``early``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.dce import detect_arrival, mean_curve, select_phases
from common.layout import DCE_TIMES

__all__ = ["DCEFramesd", "SelectPhasesd", "check_times", "read_dce_times"]

logger = logging.getLogger(__name__)

#: DCE-diff's targets: the middle and the last time point of the series
MIDDLE_AND_LAST = {"early": {"fraction": 0.5}, "late": {"index": -1}}


def check_times(times: Sequence[float] | np.ndarray, where: str) -> np.ndarray:
    """``times`` (seconds) as a float64 array, checked: every time finite and each strictly after the
    one before (one NaN trains a network to NaN weights; times out of order or repeated name phases
    wrongly). Raises ``ValueError`` naming ``where`` (the file) and the first bad time."""
    t = np.asarray(times, dtype=np.float64).ravel()
    bad = np.flatnonzero(~np.isfinite(t))
    if bad.size:
        raise ValueError(f"{where}: DCE times must be finite seconds; time {int(bad[0])} is {t[bad[0]]}")
    step = np.flatnonzero(np.diff(t) <= 0)
    if step.size:
        i = int(step[0]) + 1
        raise ValueError(
            f"{where}: DCE times must be strictly increasing; time {i} ({t[i]:g} s) is not after "
            f"time {i - 1} ({t[i - 1]:g} s)"
        )
    return t


def read_dce_times(path: str | os.PathLike) -> list[float]:
    """Time vector (seconds) from a ``dce_times.json`` (``{"times_s": [...]}``) or a bare JSON list;
    finite and strictly increasing (:func:`check_times`), else ``ValueError`` naming the file."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    times = raw.get("times_s") if isinstance(raw, dict) else raw
    if not isinstance(times, list) or not times:
        raise ValueError(f"{path}: expected {{'times_s': [seconds, ...]}} or a list of seconds")
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: DCE times must be numbers (seconds), got {times}") from None
    return check_times(values, str(path)).tolist()


def _source_file(x: Any) -> str | None:
    meta = getattr(x, "meta", None)
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if name else None


class SelectPhasesd(MapTransform):
    """Replace a 4D DCE series by named 3D phases: ``d["dce"]`` (T, H, W, D) -> ``d["dce_early"]``,
    ``d["dce_late"]`` (1, H, W, D) each.

    The series is the channel-first array ``LoadImaged(..., ensure_channel_first=True)`` makes of a
    4D NIfTI (time as channels). The indices come from :func:`common.dce.select_phases` with
    ``spec``; phases without a rule use its defaults (``late``: last time point; ``pre``/``onset``/
    ``early``: from contrast arrival on the mean curve inside ``mask_key``, else over the most
    enhancing voxels). Each output is a slice of the input (MetaTensor: same affine and metadata),
    and ``d[f"{key}_phases"] = {name: {"index": i, "time_s": t}}`` records what was chosen.

    Times: ``d[times_key]`` (a list of seconds or the path of a JSON) if given and present, else
    ``times_file`` beside the file the series was loaded from (``dce_times.json`` of the prepared
    layout). If there is none and every phase is fixed by ``index`` or ``fraction``, only the number
    of time points is used (the recorded ``time_s`` are NaN); otherwise it is an error.

    Args:
        keys: the 4D series key(s), typically ``"dce"``.
        phases: phase names, in output order; default the names in ``spec``.
        spec: per-phase rules, ``{"early": {"fraction": 0.5}, "late": {"index": -1}}`` (default,
            DCE-diff's middle and last time points), ``{"early": {"time_s": 90}}`` (nearest time
            point) or ``{"early": {"index": 10}}``; see :func:`common.dce.select_phases`.
        output_prefix: output key of phase ``p`` is ``output_prefix + p`` (e.g. ``dce_early``).
        times_key: optional data key holding the times (list) or a path to the times JSON.
        times_file: file name of the times JSON beside the series file.
        mask_key: optional (1, H, W, D) mask for the mean curve of arrival-based rules.
        early_delay_s: ``select_phases``' default delay of ``early`` after arrival.
        remove_source: drop the 4D series from the dictionary afterwards (it is large; caching
            datasets then keep only the phases).
        allow_missing_keys: cases without a series pass unchanged (inference on inputs only).
    """

    def __init__(
        self,
        keys: KeysCollection = "dce",
        phases: Sequence[str] | None = None,
        spec: Mapping[str, Mapping[str, float]] | None = None,
        output_prefix: str = "dce_",
        times_key: Hashable | None = None,
        times_file: str = DCE_TIMES,
        mask_key: Hashable | None = None,
        early_delay_s: float = 60.0,
        remove_source: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spec = {str(k): dict(v) for k, v in (MIDDLE_AND_LAST if spec is None else spec).items()}
        self.phases = [str(p) for p in (phases if phases is not None else self.spec)]
        if not self.phases:
            raise ValueError("SelectPhasesd: no phases to select (give `phases` or `spec`)")
        self.output_prefix = output_prefix
        self.times_key = times_key
        self.times_file = times_file
        self.mask_key = mask_key
        self.early_delay_s = float(early_delay_s)
        self.remove_source = remove_source

    def _arrival_phases(self) -> list[str]:
        """Phases chosen from contrast arrival (no rule of their own): they need the times and the curve."""
        return [p for p in self.phases if not self.spec.get(p) and p != "late"]

    def _needs_times(self) -> bool:
        return bool(self._arrival_phases()) or any("time_s" in self.spec.get(p, {}) for p in self.phases)

    def times_for(self, d: Mapping, key: Hashable, n: int) -> np.ndarray:
        where = _source_file(d[key]) or str(key)
        times: Any = None
        origin = ""
        if self.times_key is not None and d.get(self.times_key) is not None:
            times, origin = d[self.times_key], f"data key {self.times_key!r}"
            if isinstance(times, (str, os.PathLike)):
                times, origin = read_dce_times(times), str(times)
            else:
                times = check_times(times, f"{where} ({origin})")
        else:
            src = _source_file(d[key])
            path = Path(src).parent / self.times_file if src else None
            if path is not None and path.is_file():
                times, origin = read_dce_times(path), str(path)
        if times is None:
            if self._needs_times():
                raise FileNotFoundError(
                    f"{where}: no DCE times ({self.times_file} beside it, or data key {self.times_key!r}); phases "
                    f"{self.phases} with rules {self.spec} need them (fix each phase by 'index' or 'fraction' to do without)"
                )
            return np.full(n, np.nan)  # unknown: only the count is used
        times = np.asarray(times, dtype=np.float64).ravel()
        if times.size != n:
            raise ValueError(f"{where}: {n} time points in the series but {times.size} times in {origin}")
        return times

    def indices(self, d: Mapping, key: Hashable) -> tuple[dict[str, int], np.ndarray]:
        """``({phase: index}, times)`` for the series ``d[key]`` (T, H, W, D)."""
        x = d[key]
        if x.ndim != 4:
            raise ValueError(
                f"{_source_file(x) or key}: expected a channel-first DCE series (T, H, W, D), got shape {tuple(x.shape)}"
            )
        n = int(x.shape[0])
        times = self.times_for(d, key, n)
        curve = None
        if self._arrival_phases():
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            mask = None
            if self.mask_key is not None and d.get(self.mask_key) is not None:
                m = d[self.mask_key]
                mask = (m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m))[0] > 0.5
            curve = mean_curve(np.moveaxis(arr, 0, -1), mask)
        positions = times if np.isfinite(times).all() else np.arange(n, dtype=np.float64)
        idx = select_phases(positions, curve, spec=self.spec, names=self.phases, early_delay_s=self.early_delay_s)
        return idx, times

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            idx, times = self.indices(d, key)
            x = d[key]
            for name in self.phases:
                i = idx[name]
                d[f"{self.output_prefix}{name}"] = (
                    x[i : i + 1].clone() if isinstance(x, torch.Tensor) else np.array(x[i : i + 1])
                )
            d[f"{key}_phases"] = {
                name: {"index": int(idx[name]), "time_s": float(times[idx[name]])} for name in self.phases
            }
            if self.remove_source:
                del d[key]
        return d


class DCEFramesd(MapTransform):
    """Pick the frames of a 4D series (T, *sp) the chain uses and store their times.

    * ``frame_offsets_s=None`` (the breast phantoms, any series acquired at the protocol's times):
      every frame, with the times of ``dce_times.json``.
    * ``frame_offsets_s=[85, 155, ...]`` (a real series with many time points, e.g. ProstateX): the
      pre-contrast frame (the last before contrast arrival, found on the mean curve by
      ``common.dce.detect_arrival``) and the frames nearest arrival + each offset; the stored times
      are seconds after arrival (the pre frame negative or zero). Offsets past the end of the series
      (by more than half a frame interval) are dropped with a warning.

    Times: ``d[times_key]`` (path of a times JSON, or a list) if present, else ``dce_times.json``
    beside the series file. ``d[output_times_key]`` = float32 tensor (T,), ``d[key + "_frames"]`` = the
    indices chosen. Raises ``ValueError`` naming the file when the series has fewer than
    ``min_frames`` frames.
    """

    def __init__(
        self,
        keys: KeysCollection = "dce",
        times_key: Hashable = "dce_times",
        output_times_key: str = "dce_times_s",
        frame_offsets_s: Sequence[float] | None = None,
        min_frames: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.times_key, self.output_times_key = times_key, output_times_key
        self.offsets = None if frame_offsets_s in (None, "", []) else [float(o) for o in frame_offsets_s]
        self.min_frames = int(min_frames)

    def _times(self, d: Mapping, key: Hashable, n: int) -> np.ndarray:
        where = _source_file(d[key]) or str(key)
        raw = d.get(self.times_key)
        if isinstance(raw, (list, tuple, np.ndarray, torch.Tensor)):
            times = check_times(raw, f"{where} ({self.times_key})")
        else:
            from pathlib import Path

            path = Path(raw) if raw else (Path(where).parent / DCE_TIMES)
            if not path.is_file():
                raise FileNotFoundError(f"{where}: no DCE times ({path} missing)")
            times = np.asarray(read_dce_times(path), dtype=np.float64)
        if times.size != n:
            raise ValueError(f"{where}: {n} frames but {times.size} times")
        return times

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            where = _source_file(x) or str(key)
            if x.ndim != 4:
                raise ValueError(
                    f"{where}: expected a 4D DCE series (x, y, z, t), got shape {tuple(x.shape)} channel-first"
                )
            n = int(x.shape[0])
            times = self._times(d, key, n)
            idx = list(range(n))
            if self.offsets is not None:
                arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                arrival = detect_arrival(times, mean_curve(np.moveaxis(arr, 0, -1)))
                pre = max(arrival.index - 1, 0)
                half = float(np.median(np.diff(times))) / 2 if n > 1 else 0.0
                offsets = [o for o in self.offsets if arrival.time_s + o <= times[-1] + half]
                if len(offsets) < len(self.offsets):
                    logger.warning(
                        "%s: the series ends at %.1f s, %.1f s after arrival: offsets %s s dropped",
                        where,
                        times[-1],
                        times[-1] - arrival.time_s,
                        [o for o in self.offsets if o not in offsets],
                    )
                idx = [pre] + [int(np.argmin(np.abs(times - (arrival.time_s + o)))) for o in offsets]
                if len(set(idx)) != len(idx) or idx != sorted(idx):
                    raise ValueError(
                        f"{where}: frames {idx} for offsets {self.offsets} s after arrival "
                        f"{arrival.time_s:.1f} s are not distinct and increasing (times {times.tolist()})"
                    )
                times = times[idx] - arrival.time_s
            if len(idx) < self.min_frames:
                raise ValueError(
                    f"{where}: {len(idx)} frame(s), the chain needs at least {self.min_frames} "
                    f"(pre-contrast, the start phase and a later one)"
                )
            d[key] = x[idx]
            d[self.output_times_key] = torch.as_tensor(times, dtype=torch.float32)
            d[f"{key}_frames"] = torch.as_tensor(idx)
        return d
