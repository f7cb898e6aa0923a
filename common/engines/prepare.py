"""Batch preparation for conditional (image-to-image) diffusion training.

Key convention of every bundle in this project: in a data dictionary, ``"image"`` is what the
network is given (the stacked non-contrast inputs, or the low-resolution image) and ``"label"`` is
what it must produce (the stacked DCE phases, or the high-resolution image), both channel-first.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.utils import CommonKeys


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


class ConditionPrepareBatch:
    """Evaluation-time batch preparation: returns ``(condition, target or None)``.

    The evaluator then calls ``inferer(condition, network)``; the target (if the case has one) is
    kept for validation metrics.
    """

    def __init__(self, condition_name: str = CommonKeys.IMAGE, target_name: str = CommonKeys.LABEL) -> None:
        self.condition_name = condition_name
        self.target_name = target_name

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.condition_name not in batchdata:
            raise KeyError(f"batch has no {self.condition_name!r}; keys are {sorted(batchdata)}")
        cond = batchdata[self.condition_name].to(device=device, non_blocking=non_blocking, **kwargs)
        target = batchdata.get(self.target_name)
        if isinstance(target, torch.Tensor):
            target = target.to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            target = None
        return cond, target
