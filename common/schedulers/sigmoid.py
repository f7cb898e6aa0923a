"""D3M's sigmoid noise schedule in MONAI's schedule registry, and a v-prediction DDIM scheduler on it.

The released D3M code (after ``denoising-diffusion-pytorch``) defines, for ``T`` steps and
``tau_k = k / T`` (k = 0..T), ``f(tau) = (s(end/tau_) - s((tau (end - start) + start) / tau_)) / (s(end/tau_) - s(start/tau_))``
with ``s`` the logistic sigmoid, ``abar(tau_k) = f(tau_k) / f(0)``, ``beta_k = 1 - abar(tau_{k+1}) / abar(tau_k)``
clipped to ``[0, 0.999]``. So, before clipping, ``alphas_cumprod[t] = f((t + 1) / T) / f(0)`` for
t = 0..T-1 (closed form; the clip only changes the last index, where f reaches 0).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler
from monai.networks.schedulers.scheduler import NoiseSchedules
from monai.utils import unsqueeze_right

__all__ = ["SigmoidDDIMScheduler", "sigmoid_alphas_cumprod_closed_form", "d3m_sigmoid_beta"]

SCHEDULE = "d3m_sigmoid_beta"


def sigmoid_alphas_cumprod_closed_form(
    tau: torch.Tensor, start: float = -3.0, end: float = 3.0, tau_: float = 1.0
) -> torch.Tensor:
    """``f(tau) / f(0)`` of the module docstring, float64; ``tau`` in [0, 1]."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    v_start = torch.tensor(start / tau_, dtype=torch.float64).sigmoid()
    v_end = torch.tensor(end / tau_, dtype=torch.float64).sigmoid()
    f = (v_end - ((tau * (end - start) + start) / tau_).sigmoid()) / (v_end - v_start)
    return f / ((v_end - torch.tensor(start / tau_, dtype=torch.float64).sigmoid()) / (v_end - v_start))


if SCHEDULE not in NoiseSchedules:  # idempotent on re-import

    @NoiseSchedules.add_def(SCHEDULE, "D3M sigmoid schedule (start -3, end 3, tau 1, betas clipped at 0.999), float64")
    def d3m_sigmoid_beta(
        num_train_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
    ):
        """(betas, alphas, alphas_cumprod), each (T,) float64."""
        t = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        abar = sigmoid_alphas_cumprod_closed_form(t, start, end, tau)
        betas = torch.clip(1 - abar[1:] / abar[:-1], 0.0, max_beta)
        alphas = 1.0 - betas
        return betas, alphas, torch.cumprod(alphas, dim=0)
else:
    d3m_sigmoid_beta = NoiseSchedules[SCHEDULE]


class SigmoidDDIMScheduler(DDIMScheduler):
    """MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` with D3M's defaults: the sigmoid
    schedule above, ``prediction_type="v_prediction"``, no clipping of x0_hat (images live in [0, 1]
    and T1c enhancement may exceed the T1 range), ``set_alpha_to_one`` (the last DDIM step returns x0_hat).

    Difference from MONAI's base class: ``add_noise`` / ``get_velocity`` do not cast
    ``alphas_cumprod`` to the sample's dtype in place, so it stays float64 (index t = 0..T-1) for
    the whole run; the results are cast to the sample's dtype.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = SCHEDULE,
        clip_sample: bool = False,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "v_prediction",
        **schedule_args,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            **schedule_args,
        )
        self.final_alpha_cumprod = self.final_alpha_cumprod.to(torch.float64)

    def alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t per sample, (B, 1, ..., 1) broadcastable to ``like``, in ``like``'s dtype and device."""
        a = self.alphas_cumprod[timesteps.to(self.alphas_cumprod.device).long()]
        return unsqueeze_right(a.to(device=like.device, dtype=like.dtype), like.ndim)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(timesteps, original_samples)
        return a.sqrt() * original_samples + (1 - a).sqrt() * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(timesteps, sample)
        return a.sqrt() * noise - (1 - a).sqrt() * sample

    def previous_timestep(self, timestep: int) -> int:
        """The next entry of ``self.timesteps`` after ``timestep`` (-1 after the last one)."""
        ts = [int(t) for t in self.timesteps]
        i = ts.index(int(timestep))
        return ts[i + 1] if i + 1 < len(ts) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM update (Song et al. eq. 12) from ``timestep`` to the NEXT ENTRY of ``self.timesteps``.

        MONAI's base class steps to ``timestep - T // num_inference_steps``, which is not the next
        timestep of its own rounded ``linspace`` grid (e.g. 250 steps of T = 1000 are 4.01 apart);
        the released D3M code steps between consecutive grid points, as here. Returns
        ``(x_prev, x0_hat)``; with eta = 0, ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat``.
        """
        prev = self.previous_timestep(timestep)
        a_t = self.alphas_cumprod[int(timestep)]
        a_p = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
            eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
        elif self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        else:  # "sample"
            x0 = model_output
            eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        if self.clip_sample:
            x0 = torch.clamp(x0, self.clip_sample_values[0], self.clip_sample_values[1])
        std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp(min=0).sqrt()
        x_prev = a_p.sqrt() * x0 + (1 - a_p - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            noise = torch.randn(
                model_output.shape, dtype=model_output.dtype, generator=generator, device=model_output.device
            )
            x_prev = x_prev + std * noise
        return x_prev.to(sample.dtype), x0.to(sample.dtype)
