"""Training-loop handlers for MONAI's :class:`~monai.engines.SupervisedTrainer` that MONAI does not ship.

* :class:`GradientClipping` -- clip the global gradient norm after ``backward`` and before the
  optimizer step (MONAI's trainer fires ``IterationEvents.BACKWARD_COMPLETED`` in between).
* :class:`EMAWeights` -- an exponential moving average of the network weights (``torch.optim.swa_utils``),
  updated after every iteration; validation and the saved ``model.pt`` can use the average.
* :class:`StopOnNonFiniteLoss` -- stop training at the first NaN/Inf loss, before its ``backward``
  (the weights stay finite), naming the iteration and the batch's cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.errors import UserError

__all__ = ["GradientClipping", "EMAWeights", "NonFiniteLossError", "StopOnNonFiniteLoss", "batch_cases"]


class GradientClipping:
    """Scale the gradients so that their global L2 norm (over all parameters) is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``); gradients below the bound are unchanged.

    With AMP the trainer's ``GradScaler`` first unscales the optimizer's gradients (``scaler.step``
    then does not unscale them again), so the bound applies to the true gradients.

    Args:
        max_norm: the bound, in gradient units; ``0`` / ``None`` switches clipping off.
    """

    def __init__(self, max_norm: float | None = 1.0) -> None:
        self.max_norm = float(max_norm or 0.0)
        if self.max_norm < 0:
            raise ValueError(f"grad_clip_norm must be >= 0 (0: no clipping), got {max_norm}")
        self.last_norm: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.max_norm:
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for p in engine.network.parameters() if p.grad is not None]
        self.last_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))


class EMAWeights:
    """Exponential moving average of a network's parameters and buffers:
    ``ema <- decay * ema + (1 - decay) * weights`` after every training iteration, the first update
    copying the weights (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``).

    ``averaged`` is a copy of the network holding the average (same ``state_dict`` keys, so a
    checkpoint of it loads into the plain network). ``state_dict`` / ``load_state_dict`` make it a
    resumable part of a checkpoint (``train#state``).

    Args:
        network: the network being trained (not a DDP wrapper).
        decay: the EMA decay; ``0`` makes the average the current weights (no averaging).
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.995) -> None:
        self.decay = float(decay)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no averaging), got {decay}")
        self.network = network
        self.model = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    @property
    def averaged(self) -> torch.nn.Module:
        return self.model.module

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._to_device)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def _to_device(self, engine: Engine | None = None) -> None:
        p = next(self.network.parameters(), None)
        if p is not None:
            self.model.to(p.device)

    def update(self, engine: Engine | None = None) -> None:
        if self.decay == 0.0:  # no averaging: the average is the current weights
            self.averaged.load_state_dict(self.network.state_dict())
            return
        self.model.update_parameters(self.network)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite (bad data, a bad setting, or divergence)."""


def batch_cases(batch, id_key: str = "id") -> list[str]:
    """The case ids of a collated batch: ``batch[id_key]`` when present, else the folder names of the
    files its images came from (``MetaTensor.meta["filename_or_obj"]``), in batch order, each once."""
    names: list[str] = []
    if isinstance(batch, Mapping):
        ids = batch.get(id_key)
        if isinstance(ids, (str, int)):
            ids = [ids]
        if isinstance(ids, Sequence) and not isinstance(ids, str):
            names = [str(i) for i in ids]
        else:
            for value in batch.values():
                meta = getattr(value, "meta", None)
                files = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
                if files:
                    files = [files] if isinstance(files, str) else files
                    from pathlib import Path

                    names = [Path(str(f)).parent.name or str(f) for f in files]
                    break
    return list(dict.fromkeys(names))


class StopOnNonFiniteLoss:
    """Stop a :class:`~monai.engines.SupervisedTrainer` at the first loss that is NaN or infinite.

    Checked at ``IterationEvents.LOSS_COMPLETED``, i.e. after the forward pass and before
    ``backward`` and the optimizer step, so the network keeps the finite weights of the iteration
    before (one NaN input otherwise turns every weight NaN and training "succeeds" with
    ``train_loss: nan``). Raises :class:`NonFiniteLossError` (a user error: one line, see
    :mod:`common.errors`) naming the loss value, the iteration, the epoch and the batch's cases
    (:func:`batch_cases`)::

        error: training stopped: the loss is nan at iteration 3 (epoch 1), batch of case(s) ['breast-000'];
        check these cases' images (NaN/Inf voxels, a constant volume), the learning rate and --amp

    Args:
        loss_key: the key of the loss in ``engine.state.output`` (MONAI's ``CommonKeys.LOSS``).
        id_key: the batch key holding the case ids.
    """

    def __init__(self, loss_key: str = CommonKeys.LOSS, id_key: str = "id") -> None:
        self.loss_key, self.id_key = loss_key, id_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get(self.loss_key) if isinstance(output, Mapping) else output
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach()
        if bool(torch.isfinite(loss).all()):
            return
        value = loss.float().flatten()[~torch.isfinite(loss.float().flatten())][0].item()
        cases = batch_cases(engine.state.batch, self.id_key)
        raise NonFiniteLossError(
            f"training stopped: the loss is {value} at iteration {engine.state.iteration} "
            f"(epoch {engine.state.epoch}), batch of case(s) {cases or '(ids unknown)'}; check these cases' "
            "images (NaN/Inf voxels, a constant volume), the learning rate and --amp"
        )
