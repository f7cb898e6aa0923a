"""D3M's training forward and DDIM sampling with the deformation inside every denoising step (its
batch preparation is :class:`common.engines.D3MPrepareBatch`, its loss :class:`common.losses.D3MLoss`,
its output split :class:`common.transforms.post.SplitD3MOutputsd`, its writer and metrics
:mod:`common.handlers.d3m`).

Notation (per axial slice, network space): x0 the T1c slice, m0 the enhancing-tumour mask in
{-1, +1}, c = [T1, T2, FLAIR] (B, 3, H, W); x_t / m_t are noised with the same t and independent
noise; abar_t = ``scheduler.alphas_cumprod[t]``; the network predicts v = sqrt(abar) eps - sqrt(1 - abar) x0.
From v: ``x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v``, ``eps_hat = sqrt(1 - abar) x_t + sqrt(abar) v``.
The displacement u_t = U(m0_hat) (B, 2, H, W, pixels) warps with MONAI's :class:`~monai.networks.blocks.Warp`
(bilinear, border padding). Its grid is ``pixel index + u`` normalised with ``align_corners=True``,
so u = 0 samples every pixel centre exactly (no half-pixel shift).

Inference step (paper's master equation, DDIM eta = 0):
``x_{t-1} = phi_u( sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps_hat )``, for image and mask.
Training: the deformed v prediction phi_u(v_hat) is compared with the true v (abar_t-weighted MSE
per sample, image and mask), plus ``smooth_weight`` x MONAI's ``DiffusionLoss`` (mean squared
spatial gradients) of u_t; U is in the graph and trained jointly.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from monai.inferers import DiffusionInferer
from monai.networks.blocks import Warp
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["D3MInferer", "warp", "x0_eps_from_v"]

_WARP = {}


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """phi_u(image): (B, C, H, W) sampled at ``pixel + flow`` (flow (B, 2, H, W), channel 0 along H,
    1 along W, in pixels), bilinear, border padding (MONAI ``Warp``). ``out[i, j] = image[i + u0, j + u1]``.

    The sampling grid is built and interpolated in float64 and the result cast back, so a zero
    field returns the input bit for bit (float32 grid normalisation alone is off by ~1e-6).
    """
    w = _WARP.setdefault("w", Warp(mode="bilinear", padding_mode="border"))
    with torch.autocast(device_type=image.device.type, enabled=False):
        return w(image.double(), flow.double()).to(image.dtype)


def x0_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a v prediction; ``alpha_bar`` broadcastable to ``x_t``."""
    a = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    return a.sqrt() * x_t - (1 - a).sqrt() * v, (1 - a).sqrt() * x_t + a.sqrt() * v


class D3MInferer(DiffusionInferer):
    """Training forward (``__call__``) and DDIM sampling (``sample``) of D3M.

    Args:
        scheduler: :class:`common.schedulers.sigmoid.SigmoidDDIMScheduler` (v-prediction).
        eta: DDIM eta (0: deterministic, the paper's setting).
    """

    def __init__(self, scheduler, eta: float = 0.0) -> None:
        super().__init__(scheduler=scheduler)
        self.eta = float(eta)

    def __call__(
        self,
        inputs: torch.Tensor,
        diffusion_model: Callable,
        noise: torch.Tensor,
        timesteps: torch.Tensor,  # type: ignore[override]
        condition: torch.Tensor | None = None,
        mode: str = "concat",
        seg=None,
    ) -> torch.Tensor:
        """``inputs`` [x0, m0] (B, 2, H, W) -> (B, 5, H, W): [phi_u(v_hat) (2), u (2), abar_t (1, broadcast)]."""
        if condition is None:
            raise ValueError("D3M needs the conditioning contrasts (the batch's 'image')")
        x_t = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        abar = self.scheduler.alpha_bar(timesteps, inputs)
        out = diffusion_model(torch.cat([x_t, condition], dim=1), timesteps, abar)
        v, flow = out[:, :2], out[:, 2:4]
        return torch.cat([warp(v, flow), flow, abar.expand_as(v[:, :1])], dim=1)

    @torch.no_grad()
    def sample(
        self,
        input_noise: torch.Tensor,
        diffusion_model: Callable,
        scheduler=None,
        save_intermediates=False,  # type: ignore[override]
        intermediate_steps=1,
        conditioning: torch.Tensor | None = None,
        mode: str = "concat",
        verbose: bool = True,
        seg=None,
        cfg=None,
        cfg_fill_value: float = -1.0,
    ) -> torch.Tensor:
        """Reverse chain over ``scheduler.timesteps`` from ``input_noise[:, :2]`` (x_T, m_T) with the
        warp inside every step. Returns (N, 4, H, W): [x0, m0, last step's u (2)]. Channels of
        ``input_noise`` past the second are ignored (the volume inferer draws one per output channel)."""
        scheduler = scheduler or self.scheduler
        if conditioning is None:
            raise ValueError("D3M sampling needs the conditioning contrasts")
        x = input_noise[:, :2]
        flow = torch.zeros_like(x)
        steps = tqdm(scheduler.timesteps, desc="D3M DDIM") if verbose else scheduler.timesteps
        for t in steps:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            abar = scheduler.alpha_bar(tt, x)
            out = diffusion_model(torch.cat([x, conditioning.to(x.dtype)], dim=1), tt, abar)
            v, flow = out[:, :2].to(x.dtype), out[:, 2:4]
            x_prev, _ = scheduler.step(v, int(t), x, eta=self.eta)
            x = warp(x_prev.to(x.dtype), flow)
        return torch.cat([x, flow.to(x.dtype)], dim=1)
