"""Residual-shifting diffusion scheduler (ResShift; reused by ResDCE-diff and Res-SRDiff).

Based on: Yue et al., "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023, https://arxiv.org/abs/2307.12348 (eqs. 1-4, 14, and the public ResShift
``get_named_eta_schedule('exponential', ...)``). Follows the layout of MONAI's
:mod:`monai.networks.schedulers.ddpm`: one class, ``set_timesteps`` / ``add_noise`` / ``step``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from monai.utils import unsqueeze_right

__all__ = ["ResidualShiftScheduler", "shifting_sqrt_etas", "SCHEDULE_PRESETS", "schedule_preset"]

SCHEDULE_PRESETS: dict[str, dict[str, float]] = {
    # Res-SRDiff (the paper's text): beta_T = 0.9999 for its shifting schedule (ResShift's eta_T),
    # so sqrt(eta_T) = sqrt(0.9999) = 0.99995; the default of the ressrdiff bundle.
    "paper": {"sqrt_eta_end": math.sqrt(0.9999)},
    # ResShift's released code (get_named_eta_schedule, etas_end 0.99): sqrt(eta_T) = 0.99,
    # eta_T = 0.9801; the value ressrdiff used before and ResDCE-diff uses.
    "resshift": {"sqrt_eta_end": 0.99},
}


def schedule_preset(name: str) -> dict[str, float]:
    """The schedule settings of a named preset (:data:`SCHEDULE_PRESETS`: ``paper`` = Res-SRDiff's
    beta_T = 0.9999, ``resshift`` = ResShift's sqrt(eta_T) = 0.99); ``ValueError`` naming
    ``--schedule_preset`` for any other name."""
    if name not in SCHEDULE_PRESETS:
        raise ValueError(f"--schedule_preset: expected one of {sorted(SCHEDULE_PRESETS)}, got {name!r}")
    return dict(SCHEDULE_PRESETS[name])


def shifting_sqrt_etas(
    num_train_timesteps: int,
    kappa: float = 2.0,
    power: float = 0.3,
    min_noise_level: float = 0.04,
    sqrt_eta_end: float = 0.99,
) -> np.ndarray:
    """The shifting schedule sqrt(eta_t), t = 1..T (ResShift eq. 14), as float64 numpy of length T.

    .. math::

        \\sqrt{\\eta_1} = \\min(\\text{min\\_noise\\_level} / \\kappa, \\text{min\\_noise\\_level}), \\quad
        \\sqrt{\\eta_T} = \\text{sqrt\\_eta\\_end},

        \\sqrt{\\eta_t} = \\sqrt{\\eta_1} \\exp\\Big(\\big(\\tfrac{t-1}{T-1}\\big)^p
            \\log\\frac{\\sqrt{\\eta_T}}{\\sqrt{\\eta_1}}\\Big).

    Index 0 of the result is t = 1. Dimensionless (fractions of the residual e0 = y0 - x0).
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if kappa <= 0 or min_noise_level <= 0 or power <= 0:
        raise ValueError("kappa, min_noise_level and power must be positive")
    sqrt_eta_1 = min(min_noise_level / kappa, min_noise_level)
    if not sqrt_eta_1 < sqrt_eta_end < 1.0:
        raise ValueError(f"need sqrt(eta_1)={sqrt_eta_1} < sqrt_eta_end={sqrt_eta_end} < 1")
    frac = np.linspace(0.0, 1.0, num_train_timesteps, dtype=np.float64) ** power  # ((t-1)/(T-1))^p
    return sqrt_eta_1 * np.exp(frac * math.log(sqrt_eta_end / sqrt_eta_1))


class ResidualShiftScheduler(nn.Module):
    """Markov chain that shifts the residual e0 = y0 - x0 from the target x0 to the condition y0.

    x0 is the clean target (e.g. the post-contrast image, or the high-resolution image) and y0 the
    degraded / conditioning image of the same shape (e.g. the pre-contrast image, or the upsampled
    low-resolution image). With the monotone schedule 0 < eta_1 < ... < eta_T < 1 (see
    :func:`shifting_sqrt_etas`), alpha_t = eta_t - eta_{t-1} and eta_0 = 0:

    - transition  q(x_t | x_{t-1}, y0) = N(x_{t-1} + alpha_t e0, kappa^2 alpha_t I)
    - marginal    q(x_t | x0, y0)     = N(x0 + eta_t e0, kappa^2 eta_t I)              (:meth:`add_noise`)
    - prior       x_T ~ N(y0, kappa^2 eta_T I)                                             (:meth:`prior_sample`)
    - posterior   q(x_{t-1} | x_t, x0, y0) = N(mu, kappa^2 (eta_{t-1} / eta_t) alpha_t I),
                  mu = (eta_{t-1} / eta_t) x_t + (alpha_t / eta_t) x0                      (:meth:`step`)

    The posterior follows from the Gaussian product of the marginal at t-1,
    N(x0 + eta_{t-1} e0, kappa^2 eta_{t-1}), and the transition, read as a likelihood of x_{t-1}
    with mean x_t - alpha_t e0 and variance kappa^2 alpha_t:
    variance = kappa^2 eta_{t-1} alpha_t / (eta_{t-1} + alpha_t) = kappa^2 (eta_{t-1}/eta_t) alpha_t and
    mean = [alpha_t (x0 + eta_{t-1} e0) + eta_{t-1} (x_t - alpha_t e0)] / eta_t
    = (eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x0: the y0 terms (+-alpha_t eta_{t-1} e0) cancel, so the
    reverse step needs only x_t and the network's x0 prediction. At t = 1 (eta_0 = 0) the posterior is
    the point mass at x0, so the last step returns the x0 prediction exactly.

    Timestep indices in this API are 0-based like MONAI's (index i <-> t = i + 1); ``self.timesteps``
    holds the indices of the sampling chain in descending order. Since the network is conditioned on
    these original training indices, respaced sampling (:meth:`set_timesteps`) needs no retraining.

    Not a subclass of :class:`monai.networks.schedulers.Scheduler`: that base builds a beta /
    alpha-cumprod schedule and its ``add_noise`` / ``get_velocity`` have no place for y0; this class
    keeps its attribute and method names (``num_train_timesteps``, ``num_inference_steps``,
    ``timesteps``, ``set_timesteps``, ``add_noise``, ``step``) so it drops into the same loops.

    Args:
        num_train_timesteps: T, number of diffusion steps used to train the model (>= 2).
        kappa: noise scale kappa (in intensity units of the images).
        power: p, the exponent of the shifting schedule (eq. 14).
        min_noise_level: sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level).
        sqrt_eta_end: sqrt(eta_T), < 1.
        clip_sample: clamp the x0 prediction to [clip_sample_min, clip_sample_max] in :meth:`step`.
        clip_sample_min: lower clamp bound when ``clip_sample``.
        clip_sample_max: upper clamp bound when ``clip_sample``.

    Attributes (float64, length T, index i <-> t = i + 1; non-persistent buffers, so ``.to()`` moves
    them and checkpoints do not store them):
        sqrt_etas, etas: the shifting schedule (fixed).
        prev_etas: eta of the previous step of the current sampling chain (0 before its first step);
            for indices skipped by :meth:`set_timesteps`, equal to ``etas`` (no transition there).
        alphas: etas - prev_etas (sums to eta_T over any chain).
        posterior_variance: kappa^2 (prev_eta / eta) alpha.
        posterior_mean_coef1, posterior_mean_coef2: prev_eta / eta (for x_t) and alpha / eta (for x0).
    """

    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 2.0,
        power: float = 0.3,
        min_noise_level: float = 0.04,
        sqrt_eta_end: float = 0.99,
        clip_sample: bool = False,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
    ) -> None:
        super().__init__()
        sqrt_etas = shifting_sqrt_etas(num_train_timesteps, kappa, power, min_noise_level, sqrt_eta_end)
        self.num_train_timesteps = int(num_train_timesteps)
        self.kappa = float(kappa)
        self.power = float(power)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_values = [float(clip_sample_min), float(clip_sample_max)]
        self.register_buffer("sqrt_etas", torch.from_numpy(sqrt_etas), persistent=False)
        self.register_buffer("etas", torch.from_numpy(sqrt_etas**2), persistent=False)
        for name in ("prev_etas", "alphas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
            self.register_buffer(name, torch.zeros_like(self.etas), persistent=False)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self._rebuild_chain(np.arange(self.num_train_timesteps))

    # ------------------------------------------------------------------ schedule of the sampling chain
    def _rebuild_chain(self, kept: np.ndarray) -> None:
        """Recompute alpha and the posterior for the chain eta_{k_1} < ... < eta_{k_n} (kept ascending)."""
        etas = self.etas.detach().cpu().double()
        prev = etas.clone()  # skipped indices: no transition (alpha = 0)
        kept_t = torch.as_tensor(kept, dtype=torch.long)
        prev[kept_t] = torch.cat([etas.new_zeros(1), etas[kept_t[:-1]]])
        alphas = etas - prev
        dev = self.etas.device
        self.prev_etas = prev.to(dev)
        self.alphas = alphas.to(dev)
        self.posterior_variance = (self.kappa**2 * prev / etas * alphas).to(dev)
        self.posterior_mean_coef1 = (prev / etas).to(dev)
        self.posterior_mean_coef2 = (alphas / etas).to(dev)
        self._kept = {int(k) for k in kept}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sample with ``num_inference_steps`` <= T steps (respacing).

        Keeps n indices spread evenly over [0, T-1], always including the first (0) and the last
        (T-1) step (n = 1 keeps only T-1: prior, then straight to the x0 prediction):
        k = round(linspace(T-1, 0, n)). The kept etas form the new chain, with eta_0 = 0 before the
        first kept step; alpha and the posterior are rebuilt from them. n = T reproduces the training
        chain exactly. ``self.timesteps`` is set to the kept indices in descending order.

        Args:
            num_inference_steps: n, number of reverse steps, 1 <= n <= T.
            device: device of ``self.timesteps``.
        """
        n = int(num_inference_steps)
        if n > self.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {n} cannot be larger than `self.num_train_timesteps`:"
                f" {self.num_train_timesteps} as the unet model trained with this scheduler can only handle"
                f" maximal {self.num_train_timesteps} timesteps."
            )
        if n < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {n}")
        desc = np.floor(np.linspace(self.num_train_timesteps - 1, 0, n) + 0.5).astype(np.int64)
        if len(np.unique(desc)) != n:  # cannot happen for n <= T (spacing >= 1); guard anyway
            raise RuntimeError(f"respacing produced duplicate steps: {desc.tolist()}")
        self.num_inference_steps = n
        self._rebuild_chain(desc[::-1].copy())
        self.timesteps = torch.from_numpy(desc.copy()).to(device)

    # ------------------------------------------------------------------ helpers
    def _gather(self, values: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """values[timesteps] cast to ``like``'s dtype/device and broadcastable against it (B, 1, ...)."""
        idx = torch.as_tensor(timesteps).to(device=values.device, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {idx.tolist()}")
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        out = values[idx].to(dtype=dtype).to(device=like.device)
        return unsqueeze_right(out, like.ndim) if out.ndim == 1 else out

    def _check_step(self, timestep: int | torch.Tensor) -> int:
        t = int(timestep)
        if t not in self._kept:
            raise ValueError(
                f"timestep {t} is not in the sampling chain {sorted(self._kept, reverse=True)};"
                " step over `scheduler.timesteps`"
            )
        return t

    # ------------------------------------------------------------------ forward process
    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        residual_target: torch.Tensor,
    ) -> torch.Tensor:
        """Sample the marginal x_t = x0 + eta_t (y0 - x0) + kappa sqrt(eta_t) eps.

        Args:
            original_samples: x0, (B, C, *spatial).
            noise: eps ~ N(0, I), same shape as x0.
            timesteps: (B,) long 0-based indices (or a scalar for all samples).
            residual_target: y0, the conditioning / degraded image, same shape as x0.

        Returns:
            x_t, (B, C, *spatial), dtype and device of ``original_samples``.
        """
        if residual_target.shape != original_samples.shape:
            raise ValueError(
                f"residual_target {tuple(residual_target.shape)} must match original_samples"
                f" {tuple(original_samples.shape)}"
            )
        eta = self._gather(self.etas, timesteps, original_samples)
        sqrt_eta = self._gather(self.sqrt_etas, timesteps, original_samples)
        noisy = original_samples + eta * (residual_target - original_samples) + self.kappa * sqrt_eta * noise
        return noisy.to(original_samples.dtype)

    def prior_sample(self, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Start of the reverse chain: x_T = y0 + kappa sqrt(eta_T) eps, shape and dtype of y0."""
        s = self._gather(self.sqrt_etas, self.num_train_timesteps - 1, y0)
        return (y0 + self.kappa * s * noise).to(y0.dtype)

    def scale_model_input(self, sample: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Optional network-input normalisation: x_t / sqrt(kappa^2 eta_t + 1).

        The marginal std of x_t for unit-variance data (ResShift's ``normalize_input`` for latents).
        Use it consistently in training and sampling, or not at all; the schedule does not depend on it.
        """
        eta = self._gather(self.etas, timesteps, sample)
        return sample / torch.sqrt(self.kappa**2 * eta + 1.0)

    # ------------------------------------------------------------------ reverse process
    def get_mean(self, timestep: int, x_0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Posterior mean (eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x0 of the current chain at ``timestep``."""
        c1 = self._gather(self.posterior_mean_coef1, int(timestep), x_t)
        c2 = self._gather(self.posterior_mean_coef2, int(timestep), x_t)
        return c1 * x_t + c2 * x_0

    def get_variance(self, timestep: int) -> torch.Tensor:
        """Posterior variance kappa^2 (eta_{t-1}/eta_t) alpha_t of the current chain (0-dim float64)."""
        return self.posterior_variance[int(timestep)]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step x_t -> x_{t-1} ~ q(x_{t-1} | x_t, x0 = model_output).

        Args:
            model_output: the network's x0 prediction, (B, C, *spatial).
            timestep: current 0-based index, an element of ``self.timesteps``.
            sample: x_t, (B, C, *spatial).
            generator: random generator for the step noise (its device is used to draw it).
            noise: optional eps (shape of ``sample``) instead of drawing it (reproducible tests).

        Returns:
            (x_{t-1}, x0_hat) with the dtype of ``sample``. At the first step of the chain
            (eta_{t-1} = 0) x_{t-1} is x0_hat itself: no noise is added.
        """
        t = self._check_step(timestep)
        pred_original_sample = model_output
        if self.clip_sample:
            pred_original_sample = torch.clamp(
                pred_original_sample, self.clip_sample_values[0], self.clip_sample_values[1]
            )
        if float(self.prev_etas[t]) == 0.0:
            return pred_original_sample.to(sample.dtype), pred_original_sample
        mean = self.get_mean(t, pred_original_sample, sample)
        if noise is None:
            gen_device = generator.device if generator is not None else sample.device
            noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=gen_device)
        std = self._gather(self.posterior_variance, t, sample).sqrt()
        prev_sample = mean + std * noise.to(device=sample.device, dtype=sample.dtype)
        return prev_sample.to(sample.dtype), pred_original_sample
