"""Batch preparation for conditional (image-to-image) diffusion training (evaluation uses MONAI's
``default_prepare_batch``, which returns ``(image, label or None)``).

- :class:`ConditionalDiffusionPrepareBatch`: noise the target, condition on the image.
- :class:`NoiseLevelPrepareBatch`: also draws Palette's continuous noise level (DCE-diff).
- :class:`D3MPrepareBatch`: noises [T1c, ET mask] independently, the target is v (D3M).
- :class:`IterUNetPrepareBatch`: the series and its later time points (iterU-Net, no diffusion).

Key convention of every bundle in this project: in a data dictionary, ``"image"`` is what the
network is given (the stacked non-contrast inputs, or the low-resolution image) and ``"label"`` is
what it must produce (the stacked DCE phases, or the high-resolution image), both channel-first.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys

from common.schedulers.noise_level import NoiseLevelSchedule


class ConditionalDiffusionPrepareBatch(DiffusionPrepareBatch):
    """MONAI's :class:`~monai.engines.utils.DiffusionPrepareBatch` for image-to-image diffusion.

    MONAI's class noises ``batch["image"]``; here the sample that is noised is the target
    ``batch[target_name]`` (default ``"label"``) and the network is conditioned on
    ``batch[condition_name]`` (default ``"image"``), passed to the inferer as ``condition``.

    Args:
        num_train_timesteps: number of training timesteps T; timesteps are drawn uniformly from 0..T-1.
        condition_name: key of the conditioning image, shape (B, C_cond, H, W).
        target_name: key of the clean target x0, shape (B, C_out, H, W).
        predict: ``"noise"`` (epsilon prediction, DDPM/Palette) or ``"x0"`` (the clean target,
            residual shifting); this is the loss target the trainer compares the prediction with.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        condition_name: str = CommonKeys.IMAGE,
        target_name: str = CommonKeys.LABEL,
        predict: str = "noise",
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        if predict not in ("noise", "x0"):
            raise ValueError(f"predict must be 'noise' or 'x0', got {predict!r}")
        self.target_name = target_name
        self.predict = predict

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images if self.predict == "x0" else noise

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        for key in (self.target_name, self.condition_name):
            if key not in batchdata:
                raise KeyError(f"batch has no {key!r}; keys are {sorted(batchdata)}")
        images = batchdata[self.target_name].to(device=device, non_blocking=non_blocking, **kwargs)
        condition = batchdata[self.condition_name].to(device=device, non_blocking=non_blocking, **kwargs)
        noise = self.get_noise(images)
        timesteps = self.get_timesteps(images)
        target = self.get_target(images, noise, timesteps)
        return images, target, (), {"noise": noise, "timesteps": timesteps, "condition": condition}


class NoiseLevelPrepareBatch(ConditionalDiffusionPrepareBatch):
    """:class:`ConditionalDiffusionPrepareBatch` that also draws Palette's continuous noise level.

    Returns ``(x0, noise, (), {"noise", "timesteps", "gamma", "condition"})``: ``timesteps`` (B,) are
    the step indices drawn uniformly from 0..T-1 of the training schedule (kept for logging and
    MONAI compatibility; the inferer does not use them), ``gamma`` (B,) the continuous levels
    (float64; float32 on MPS) that :class:`NoiseLevelInferer` noises with and conditions on. The
    loss target is the noise (epsilon prediction, L2 loss in the bundle).

    Args:
        scheduler: the TRAINING schedule: a MONAI scheduler (e.g.
            the bundle's ``training_schedule`` (a MONAI ``DDPMScheduler``)) or a
            :class:`~common.schedulers.noise_level.NoiseLevelSchedule`.
        condition_name: key of the conditioning image (B, C_cond, H, W).
        target_name: key of the clean target x0 (B, C_out, H, W).
    """

    def __init__(
        self,
        scheduler: Scheduler | NoiseLevelSchedule,
        condition_name: str = CommonKeys.IMAGE,
        target_name: str = CommonKeys.LABEL,
    ) -> None:
        schedule = scheduler if isinstance(scheduler, NoiseLevelSchedule) else NoiseLevelSchedule(scheduler)
        super().__init__(
            num_train_timesteps=schedule.num_train_timesteps,
            condition_name=condition_name,
            target_name=target_name,
            predict="noise",
        )
        self.schedule = schedule

    def get_noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """gamma ~ U(gamma_t, gamma_{t-1}) per index, on the indices' device."""
        return self.schedule.sample_gamma(timesteps)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        infer_kwargs["gamma"] = self.get_noise_level(infer_kwargs["timesteps"])
        return images, target, args, infer_kwargs


class D3MPrepareBatch(ConditionalDiffusionPrepareBatch):
    """Noise ``label`` = [T1c, ET mask] (B, 2, H, W) with independent noise per channel and one t per
    sample (uniform 0..T-1); condition on ``image`` (B, 3, H, W); the loss target is v."""

    def __init__(self, scheduler, condition_name: str = "image", target_name: str = "label") -> None:
        super().__init__(
            num_train_timesteps=scheduler.num_train_timesteps,
            condition_name=condition_name,
            target_name=target_name,
            predict="noise",
        )
        self.scheduler = scheduler

    def get_target(self, images, noise, timesteps):
        return self.scheduler.get_velocity(images, noise, timesteps)


class IterUNetPrepareBatch:
    """``SupervisedTrainer``/``Evaluator`` batch: inputs = the series (B, T, *sp), targets = its time
    points after ``start`` (B, T - 1 - start, *sp) when present (else ``None``), kwargs ``times``."""

    def __init__(self, series_key: str = "dce", times_key: str = "dce_times_s", start: int = 1) -> None:
        self.series_key, self.times_key, self.start = series_key, times_key, int(start)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        x = batchdata[self.series_key]
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        x = x.to(device=device, non_blocking=non_blocking)
        times = torch.as_tensor(batchdata[self.times_key]).to(device=device, dtype=torch.float32)
        target = x[:, self.start + 1 :] if x.shape[1] == times.shape[-1] else None
        return x, target, (), {"times": times}
