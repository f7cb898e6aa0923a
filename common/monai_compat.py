"""Workarounds for MONAI scheduler behaviour, in one place (MONAI 1.6, ``monai.networks.schedulers``).

The bundles declare MONAI's own :class:`~monai.networks.schedulers.DDPMScheduler` /
:class:`~monai.networks.schedulers.DDIMScheduler` in their JSON and apply these functions there, e.g.
(dcediff ``inference.json``)::

    "$common.monai_compat.consistent_timesteps(common.monai_compat.float64_tables(@scheduler), @num_inference_steps)"

Each function names the upstream behaviour it works around, with the MONAI source lines it was
checked against, so it can be dropped once MONAI changes:

- :func:`float64_levels` / :func:`float64_tables`: MONAI builds every beta schedule in float32
  (``scheduler.py``: ``_linear_beta`` returns ``torch.linspace(beta_start, beta_end,
  num_train_timesteps, dtype=torch.float32)``, then ``Scheduler.__init__`` sets
  ``alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)`` in float32). Near gamma = 1 that loses the
  first beta: 1 - alphas_cumprod[0] is 1.0132790e-6 for beta_1 = 1e-6 and 1.0001659e-4 for 1e-4.
- :func:`ddim_steps_offset` / :func:`consistent_timesteps`: ``DDIMScheduler.set_timesteps`` spaces
  the timesteps as ``round(linspace(T - 1 - steps_offset, 0, n)) + steps_offset`` (``ddim.py``), but
  ``DDIMScheduler.step(t)`` moves the sample to ``prev_timestep = t - T // n``; and
  ``DDPMScheduler.set_timesteps(n < T)`` picks n of the T levels (``ddpm.py``) while ``step`` /
  ``_get_mean`` always use ``alphas_cumprod[t - 1]`` as the previous level. Both leave the sample at
  a level other than the next timestep the network is told.
"""

from __future__ import annotations

import copy

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

from common.bundle import positive_int

__all__ = ["consistent_timesteps", "ddim_steps_offset", "float64_levels", "float64_tables"]


def float64_levels(scheduler: Scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) of a MONAI scheduler in float64 on the CPU, each shape (T,).

    Works around MONAI's float32 schedule tables (``monai/networks/schedulers/scheduler.py``:
    ``_linear_beta`` / ``_scaled_linear_beta`` return ``torch.linspace(..., dtype=torch.float32)``
    and ``Scheduler.__init__`` takes ``alphas_cumprod = torch.cumprod(self.alphas, dim=0)`` of
    them). In float32, 1 - alphas_cumprod[0] is not beta_1: 1.0132790e-6 for beta_1 = 1e-6 (the
    DCE-diff training schedule) and 1.0001659e-4 for 1e-4 (the sampling one). The DDPM posterior's
    x0 coefficient at the last step, beta_1 / (1 - gamma_1) (``DDPMScheduler._get_mean``), then
    scales the output by 0.98690 and 0.99983 respectively, and noise levels near 1 are off by the
    same relative amounts.

    Here alphas_cumprod = cumprod(1 - betas) is recomputed in float64 from the scheduler's betas
    (what every MONAI schedule defines it as; the float32 betas themselves are exact to 6e-8
    relative). If a custom schedule's alphas_cumprod is not the cumulative product of its betas
    (relative difference > 1e-3), its own values are widened instead.
    """
    betas = scheduler.betas.detach().to(device="cpu", dtype=torch.float64)
    alphas = 1.0 - betas
    gammas = torch.cumprod(alphas, dim=0)
    given = scheduler.alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
    if given.shape != gammas.shape or not torch.allclose(gammas, given, rtol=1e-3, atol=1e-30):
        alphas = scheduler.alphas.detach().to(device="cpu", dtype=torch.float64)
        return betas, alphas, given
    return betas, alphas, gammas


def float64_tables(scheduler: Scheduler, dtype: torch.dtype = torch.float64) -> Scheduler:
    """A shallow copy of a MONAI DDPM/DDIM scheduler whose ``step`` runs on :func:`float64_levels`.

    Works around the float32 tables of ``monai/networks/schedulers/scheduler.py`` (see
    :func:`float64_levels`): ``betas``, ``alphas``, ``alphas_cumprod``, ``one`` (DDPM's gamma_0) and
    DDIM's ``final_alpha_cumprod`` (``ddim.py``: ``torch.tensor(1.0) if set_alpha_to_one else
    alphas_cumprod[0]``) of the copy are float64 on the CPU. MONAI's ``step`` indexes them with a
    Python int, so its coefficients are 0-dim float64 tensors and the update is applied in the
    sample's own dtype (float32 stays float32). Everything else (``timesteps``, ``steps_offset``,
    clipping, variance type, ...) is shared with ``scheduler`` until the copy's ``set_timesteps``
    rebinds it; ``scheduler`` itself is not modified. Idempotent.

    Args:
        scheduler: a MONAI scheduler with ``betas`` / ``alphas`` / ``alphas_cumprod``.
        dtype: ``torch.float32`` for devices without float64 (MPS): the same copy in MONAI's precision.
    """
    shadow = copy.copy(scheduler)
    betas, alphas, gammas = float64_levels(scheduler)
    shadow.betas, shadow.alphas, shadow.alphas_cumprod = betas.to(dtype), alphas.to(dtype), gammas.to(dtype)
    shadow.one = torch.tensor(1.0, dtype=dtype)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM: 1 (set_alpha_to_one) or alphas_cumprod[0]
        to_one = float(scheduler.final_alpha_cumprod) == 1.0
        shadow.final_alpha_cumprod = shadow.one if to_one else shadow.alphas_cumprod[0]
    return shadow


def ddim_steps_offset(num_train_timesteps: int, num_inference_steps: int) -> int:
    """``steps_offset`` that makes MONAI's :class:`DDIMScheduler` chain self-consistent.

    Works around ``monai/networks/schedulers/ddim.py``: ``set_timesteps`` sets ``timesteps =
    round(linspace(T - 1 - steps_offset, 0, n)) + steps_offset`` while ``step(t)`` moves the sample
    to level ``prev_timestep = t - T // n``. With MONAI's default ``steps_offset=0`` these differ
    (T = 1000, n = 10: timesteps 999, 888, ..., 111, 0, while step(999) lands on 899), so the
    network is then evaluated at a level the sample is not at. With n dividing T and
    ``offset = T // n - 1`` the timesteps are exactly T-1, T-1-s, ..., s-1 (s = T // n): each step
    lands on the next timestep and the last one (prev < 0) on gamma = 1 (``set_alpha_to_one``).

    Raises:
        ValueError: n outside [1, T], or n not dividing T (no offset makes the chain consistent).
    """
    t, n = int(num_train_timesteps), int(num_inference_steps)
    if not 1 <= n <= t:
        raise ValueError(f"num_inference_steps must be in [1, {t}], got {n}")
    if t % n:
        divisors = [d for d in range(1, t + 1) if t % d == 0]
        raise ValueError(
            f"DDIM with MONAI's step rule needs num_inference_steps dividing {t} for a consistent chain;"
            f" got {n}. Choose one of {divisors}"
        )
    return t // n - 1


def consistent_timesteps(scheduler: Scheduler, num_inference_steps: int) -> Scheduler:
    """``scheduler.set_timesteps(n)`` such that every ``step`` lands on the next timestep; returns it.

    Works around the mismatch between MONAI's ``set_timesteps`` spacing and its ``step`` rule:

    - :class:`DDIMScheduler` (``ddim.py``: ``prev_timestep = timestep - T // n`` in ``step``, but
      ``linspace``-rounded timesteps in ``set_timesteps``): sets ``steps_offset`` to
      :func:`ddim_steps_offset` (T, n) first. A later ``set_timesteps`` with the same n (as
      ``DiffusionVolumeInferer(num_inference_steps=n)`` calls) gives the same timesteps.
    - :class:`DDPMScheduler` (``ddpm.py``: ``_get_mean`` / ``_get_variance`` always use
      ``alphas_cumprod[timestep - 1]``): n must be T (MONAI cannot skip levels without a wrong
      posterior); use DDIM for fewer steps.

    Modifies ``scheduler`` in place (apply it to a :func:`float64_tables` copy to leave a shared
    scheduler untouched).

    Raises:
        ValueError: DDPM with n != T; DDIM with n not dividing T; another scheduler type.
    """
    if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
        raise ValueError(f"consistent_timesteps needs a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
    n, t = positive_int(num_inference_steps, "num_inference_steps"), int(scheduler.num_train_timesteps)
    if isinstance(scheduler, DDIMScheduler):
        scheduler.steps_offset = ddim_steps_offset(t, n)
    elif n != t:
        raise ValueError(
            f"DDPM sampling runs all {t} steps (MONAI's DDPMScheduler.step always steps t -> t-1);"
            f" got num_inference_steps={n}. Use sampler 'ddim' for fewer steps."
        )
    scheduler.set_timesteps(n)
    scheduler.consistent_timesteps = True  # DiffusionVolumeInferer re-aligns a copy sampled with another n
    return scheduler
