"""Residual-shift diffusion inferer (ResShift, ResDCE-diff, Res-SRDiff): MONAI's
:class:`~monai.inferers.DiffusionInferer` for a process that noises the target toward the paired
conditioning channels; the network predicts x0 and sampling starts from the prior around the
conditioning image instead of pure noise."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.inferers import DiffusionInferer
from tqdm.auto import tqdm

__all__ = ["ResidualShiftInferer"]


def _call_network(network: Callable, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return network(x, timesteps)


class ResidualShiftInferer(DiffusionInferer):
    """Training forward pass and sampling for residual-shift diffusion with a concatenated condition.

    The conditioning image ``y`` has C_cond channels (e.g. T2w, ADC, pre-contrast); the target ``x0``
    has C_out channels. Target channel ``i`` is shifted toward condition channel
    ``residual_channels[i]`` (the paper's residual pairing, e0 = y0 - x0 channel by channel), so
    ``y0 = y[:, residual_channels]``. The network sees ``cat([x_t, y], dim=1)`` (C_out + C_cond
    channels) and predicts x0.

    Args:
        scheduler: a :class:`common.schedulers.ResidualShiftScheduler`.
        residual_channels: condition channel index per target channel; default ``range(C_out)``.
    """

    def __init__(self, scheduler, residual_channels: Sequence[int] | None = None) -> None:
        super().__init__(scheduler=scheduler)
        self.residual_channels = None if residual_channels is None else [int(c) for c in residual_channels]

    def paired_condition(self, condition: torch.Tensor, out_channels: int) -> torch.Tensor:
        """y0: the condition channels each target channel is shifted toward, shape (B, C_out, ...)."""
        idx = self.residual_channels if self.residual_channels is not None else list(range(out_channels))
        if len(idx) != out_channels:
            raise ValueError(f"residual_channels {idx} has {len(idx)} entries for {out_channels} target channels")
        if max(idx) >= condition.shape[1]:
            raise ValueError(f"residual_channels {idx} refers past the {condition.shape[1]} condition channels")
        return condition[:, idx]

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: Callable,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "concat",
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0 prediction for a training batch: ``inputs`` is x0 (B, C_out, H, W), ``condition`` y (B, C_cond, H, W)."""
        if condition is None:
            raise ValueError("residual shifting needs the conditioning image (the batch's 'image')")
        y0 = self.paired_condition(condition, inputs.shape[1])
        x_t = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps, residual_target=y0)
        return _call_network(diffusion_model, torch.cat([x_t, condition], dim=1), timesteps)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: Callable,
        scheduler=None,
        save_intermediates: bool | None = False,
        intermediate_steps: int | None = 1,
        conditioning: torch.Tensor | None = None,
        mode: str = "concat",
        verbose: bool = True,
        seg: torch.Tensor | None = None,
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Reverse chain from x_T = y0 + kappa sqrt(eta_T) eps to x0, over ``scheduler.timesteps``.

        Args:
            input_noise: eps, shape of the target (N, C_out, H, W).
            conditioning: y, shape (N, C_cond, H, W).
        """
        if conditioning is None:
            raise ValueError("residual-shift sampling needs the conditioning image")
        scheduler = scheduler or self.scheduler
        y0 = self.paired_condition(conditioning, input_noise.shape[1])
        image = scheduler.prior_sample(y0, input_noise)
        steps = scheduler.timesteps
        intermediates = []
        for t in tqdm(steps, desc="sampling", leave=False, disable=not verbose):
            t_batch = torch.full((image.shape[0],), int(t), device=image.device, dtype=torch.long)
            x0_hat = _call_network(diffusion_model, torch.cat([image, conditioning], dim=1), t_batch)
            image, _ = scheduler.step(x0_hat, int(t), image)
            if save_intermediates and intermediate_steps and int(t) % intermediate_steps == 0:
                intermediates.append(image)
        return (image, intermediates) if save_intermediates else image
