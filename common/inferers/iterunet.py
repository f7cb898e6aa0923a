"""iterU-Net's chain: the network applied time point after time point, for training (the
``SupervisedTrainer`` inferer) and for whole-volume inference (``SlidingWindowInferer``), and the
trivial baselines (the batch preparation is :class:`common.engines.IterUNetPrepareBatch`, the DCE
frame selection :class:`common.transforms.phases.DCEFramesd`).

Shapes: a DCE series is channel-first, (B, T, X, Y, Z), time point 0 the pre-contrast frame P,
TI-normed (``common.transforms.TINormd``). Times (B, T) in seconds after the pre-contrast frame (or
after contrast arrival, for real series).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowInferer

from common.device import AUTO_PRECISIONS, check_precision, precision_name, precision_network

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "run_chain",
    "IterUNetChainInferer",
    "IterUNetVolumeInferer",
    "copy_forward",
    "linear_extrapolation",
    "STAGES",
    "train_mode",
    "check_init_ckpt",
]

#: ``teacher``: warm-up, the real frame k is the input of step k -> k+1; ``recursive``: the chain feeds
#: its own outputs forward from the start phase; ``direct``: the single-time-point baseline, every
#: target predicted from [P, x_start] with its own target time, no recursion, fresh ConvLSTM state.
MODES = ("teacher", "recursive", "direct")


def _times_at(times: torch.Tensor, k: int, batch: int, time_input: str) -> torch.Tensor | float:
    if time_input == "index":
        return float(k)
    t = times[:, k] if times.ndim == 2 else times[k].reshape(1)
    return t.expand(batch) if t.numel() == 1 else t


def run_chain(
    network,
    series: torch.Tensor,
    times: torch.Tensor,
    start: int = 1,
    mode: str = "recursive",
    time_input: str = "seconds",
    n_out: int | None = None,
) -> torch.Tensor:
    """Predict time points ``start+1 .. start+n_out`` from ``series`` (B, T', *spatial).

    Args:
        network: ``network(x (B, 2, *sp), time (B,), state) -> (y (B, 1, *sp), state)`` (``IterUNet``).
        series: TI-normed frames; ``[:, 0]`` is P, ``[:, start]`` the acquired start phase. ``teacher``
            needs the real frames up to the second-to-last predicted one.
        times: (B, T) or (T,) seconds of every time point (T >= start + 1 + n_out).
        start: index of the acquired phase the chain starts from (1: the first post-contrast).
        mode: one of :data:`MODES`.
        time_input: ``"seconds"`` (the target's time) or ``"index"`` (the target's index k+1).
        n_out: steps; default ``T - 1 - start``.

    The ConvLSTM state starts at zero at the start of the chain (a new case) and persists over its
    steps (``direct`` resets it every step). Returns (B, n_out, *spatial), channel s = time point start+1+s.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if time_input not in ("seconds", "index"):
        raise ValueError(f"time_input must be 'seconds' or 'index', got {time_input!r}")
    times = torch.as_tensor(times, device=series.device, dtype=torch.float32)
    n_times = times.shape[-1]
    n_out = n_times - 1 - start if n_out is None else int(n_out)
    if start < 1 or n_out < 1 or start + n_out >= n_times:
        raise ValueError(f"start phase {start} with {n_out} steps needs more than {n_times} time points")
    if series.shape[1] <= start:
        raise ValueError(f"start phase {start} needs {start + 1} frames, the series has {series.shape[1]}")
    b = series.shape[0]
    pre, x = series[:, :1], series[:, start : start + 1]
    state, outs = None, []
    for k in range(start, start + n_out):
        if mode == "teacher":
            x = series[:, k : k + 1]
        elif mode == "direct":
            x, state = series[:, start : start + 1], None
        y, state = network(torch.cat([pre, x.to(pre.dtype)], dim=1), _times_at(times, k + 1, b, time_input), state)
        outs.append(y)
        x = y
    return torch.cat(outs, dim=1)


class IterUNetChainInferer(Inferer):
    """The training forward: :func:`run_chain` on a batch of patches (gradients flow through the chain)."""

    def __init__(self, start: int = 1, mode: str = "recursive", time_input: str = "seconds") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        try:
            whole = not isinstance(start, bool) and int(start) == start
        except (TypeError, ValueError):
            whole = False
        if not whole or int(start) < 1:
            raise ValueError(
                f"--start_phase: expected a whole number >= 1 (the index of the last acquired phase the chain "
                f"starts from; 0 is the pre-contrast frame, which every step needs as its reference), got {start!r}"
            )
        self.start, self.mode, self.time_input = int(start), mode, time_input

    def __call__(self, inputs: torch.Tensor, network, times: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return run_chain(network, inputs, times, self.start, self.mode, self.time_input)


class IterUNetVolumeInferer(Inferer):
    """Whole-volume inference: MONAI's ``SlidingWindowInferer`` over the series, the full chain run in
    every window (each window starts with a fresh ConvLSTM state, as the training patches do).

    Args:
        roi_size: window (X, Y, Z); a dimension larger than the volume is cropped to it.
        start, mode, time_input: as :func:`run_chain` (inference: ``recursive`` or ``direct``).
        sw_batch_size, overlap, blend_mode: ``SlidingWindowInferer``'s.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:func:`common.device.resolve_precision`);
            the network forward of every chain step runs in it, its output and ConvLSTM state cast back
            to float32; the layout stays contiguous (3D volumes: no channels-last). The label used
            is logged once and kept in :attr:`precision_used`.
        auto_precisions: the reduced precisions ``"auto"`` may choose (the bundle's setting; ``[]``: fp32).
        amp: deprecated: ``False`` means ``precision="fp32"``, ``True`` ``"auto"``; ``None`` keeps ``precision``.
        progress: tqdm bar over the windows.

    ``__call__(inputs (1, T', *sp), network, times (1, T))`` under ``torch.inference_mode`` returns
    (1, T - 1 - start, *sp).
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        start: int = 1,
        mode: str = "recursive",
        time_input: str = "seconds",
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        blend_mode: str = "gaussian",
        precision: str = "auto",
        auto_precisions: Sequence[str] = AUTO_PRECISIONS,
        amp: bool | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if mode == "teacher":
            raise ValueError("inference cannot use teacher forcing (it needs the frames it predicts)")
        self.chain = IterUNetChainInferer(start, mode, time_input)
        self.roi_size = [int(r) for r in roi_size]
        if amp is not None:
            precision = "auto" if amp else "fp32"
        self.precision, self.auto_precisions = check_precision(precision, auto_precisions)
        self.precision_used = precision_name(None)
        self.sw = dict(
            sw_batch_size=int(sw_batch_size), overlap=float(overlap), mode=blend_mode, progress=bool(progress)
        )

    def __call__(self, inputs: torch.Tensor, network, times: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        roi = [min(r, s) if r > 0 else s for r, s in zip(self.roi_size, inputs.shape[2:])]
        sw = SlidingWindowInferer(roi_size=roi, **self.sw)
        times = torch.as_tensor(times)
        if times.ndim == 2:
            times = times[0]  # one case per batch: every window shares the case's times
        frames = inputs[:, : self.chain.start + 1]  # only the acquired frames enter the chain
        net = precision_network(network, self.precision, inputs.device, self.auto_precisions, logger, False)
        self.precision_used = net.label
        with torch.inference_mode():
            out = sw(frames, lambda patch: self.chain(patch, net, times))
        return out.float()


def copy_forward(series: np.ndarray, start: int, n_times: int) -> np.ndarray:
    """Baseline: the acquired start phase copied to every later time point, (n_times - 1 - start, *sp)."""
    return np.repeat(np.asarray(series[start : start + 1]), n_times - 1 - start, axis=0)


def linear_extrapolation(series: np.ndarray, times: Sequence[float], start: int) -> np.ndarray:
    """Baseline: the pre -> start-phase enhancement continued linearly in time,
    ``x_start + (x_start - P) (t_k - t_start) / (t_start - t_0)`` for k > start."""
    s, t = np.asarray(series, dtype=np.float64), np.asarray(times, dtype=np.float64)
    slope = (s[start] - s[0]) / (t[start] - t[0])
    return np.stack([s[start] + slope * (t[k] - t[start]) for k in range(start + 1, len(t))]).astype(np.float32)


STAGES = ("warmup", "recursive")


def train_mode(stage: str, chain_mode: str = "recursive") -> str:
    """The chain mode a training stage uses: ``warmup`` -> ``teacher``; ``recursive`` -> ``chain_mode``
    (``recursive``, or ``direct`` for the single-time-point baseline)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if chain_mode not in ("recursive", "direct"):
        raise ValueError(f"chain_mode must be 'recursive' or 'direct', got {chain_mode!r}")
    return "teacher" if stage == "warmup" else chain_mode


def check_init_ckpt(path: str, resume_path: str = "") -> str:
    """The warm-up weights the recursive stage starts from: ``""`` (none: the no-warm-up ablation, or a
    resumed run) or an existing file; a missing file says how to make it."""
    if not path or resume_path:
        return ""
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no warm-up weights at {path}: run the warm-up stage first (--stage warmup), pass --init_ckpt <model.pt>, "
            f"or --init_ckpt '' to train the recursive stage from scratch (the no-warm-up ablation)"
        )
    return str(path)
