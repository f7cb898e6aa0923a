"""Continuous noise-level conditioning for DDPM-family schedulers (Palette / WaveGrad; used by DCE-diff).

Based on: Saharia et al., "Palette: Image-to-Image Diffusion Models", SIGGRAPH 2022,
https://arxiv.org/abs/2111.05826, and Chen et al., "WaveGrad: Estimating Gradients for Waveform
Generation", ICLR 2021, https://arxiv.org/abs/2009.00713 (section 3.1, continuous noise level).

The network is conditioned on the noise level gamma = alpha_bar (the cumulative product of the alphas,
MONAI's ``Scheduler.alphas_cumprod``) instead of an integer timestep. Since gamma says exactly how
much of x0 is left in x_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps, one trained network serves any
schedule at sampling time: DCE-diff trains on a 2000-step linear-beta schedule (1e-6 .. 0.01) and
samples with a different 1000-step one (1e-4 .. 0.09), or with DDIM on those inference betas.

Nothing here re-implements a beta schedule: every schedule is a MONAI
:class:`~monai.networks.schedulers.DDPMScheduler` / :class:`~monai.networks.schedulers.DDIMScheduler`
declared in the bundle's JSON (dcediff: ``training_schedule`` and ``scheduler`` / ``ddim_scheduler``;
``schedule="linear_beta"``: ``betas = torch.linspace(beta_start, beta_end, T)`` in float32,
``alphas_cumprod = torch.cumprod(1 - betas)``), and :class:`NoiseLevelSchedule` only reads its
``alphas_cumprod``, widened to float64 by :func:`common.monai_compat.float64_levels`.

Index convention (MONAI's): index ``i`` in 0..T-1 is diffusion step t = i + 1, and
``alphas_cumprod[i]`` is gamma_t. Palette's gamma_0 = 1 (no noise) has no index; it is the upper
bound of the interval drawn from for index 0.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import Scheduler
from monai.utils import unsqueeze_right

from common.monai_compat import float64_levels

__all__ = [
    "DCEDIFF_EMBEDDING_SCALE",
    "NoiseLevelSchedule",
    "add_noise_at_level",
    "embedding_input_to_noise_level",
    "noise_level_to_embedding_input",
]

DCEDIFF_EMBEDDING_SCALE = 1000.0
"""Default ``scale`` of :func:`noise_level_to_embedding_input`: embedding inputs in [0, 1000]."""


def noise_level_to_embedding_input(gamma: torch.Tensor | float, scale: float = DCEDIFF_EMBEDDING_SCALE) -> torch.Tensor:
    """What the network's ``timesteps`` argument receives for noise level gamma: ``scale * sqrt(gamma)``.

    This is the single mapping used for training (:class:`common.inferers.noise_level.NoiseLevelInferer`
    forward pass) and sampling (its ``sample``), so train and test agree by construction.

    Why ``scale * sqrt(gamma)`` with scale 1000 (WaveGrad conditions on sqrt(alpha_bar) too):

    - sqrt(gamma) is the signal coefficient of x_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps, in [0, 1],
      strictly increasing in gamma (so strictly decreasing along a schedule's steps);
    - ``DiffusionModelUNet``'s ``get_timestep_embedding`` uses frequencies
      exp(-log(10000) k / half), i.e. periods from 2 pi to ~6e4: it is built for inputs spread over
      [0, ~1000] like integer timesteps. Raw gamma in [0, 1] (Palette's code) would leave most
      channels nearly constant;
    - it spreads the informative part of both DCE-diff schedules over that range, whereas
      ``scale * (1 - gamma)`` crushes the noisy half into a few units next to 1000. Values of
      1000 sqrt(gamma) on the training schedule (2000 steps): index 0 -> 999.9995, 500 -> 731,
      1000 -> 285, 1500 -> 59, 1999 -> 6.6; on the inference schedule (1000 steps): 0 -> 999.95,
      100 -> 792, 200 -> 399, 300 -> 127, 400 -> 25, 500 -> 3.2, 999 -> 8e-8 (pure noise; the
      training range ends at 6.6, so :class:`~common.inferers.noise_level.NoiseLevelInferer` clamps
      the network's input to :meth:`NoiseLevelSchedule.trained_range` of the training schedule). With
      1000 (1 - gamma), training indices 1500..1999 would all map into [996.5, 1000] and inference
      indices 300..999 into [984, 1000].

    Note the direction: clean (gamma = 1) maps to ``scale`` and pure noise to 0, the reverse of
    integer timesteps. The network learns either; it only matters when warm-starting from a
    timestep-conditioned checkpoint.

    Args:
        gamma: noise level(s) in [0, 1], any shape (the network wants shape (B,)).
        scale: positive multiplier; keep it fixed between training and sampling.

    Returns:
        float32 tensor of gamma's shape, on gamma's device (computed in gamma's precision first).
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    g = torch.as_tensor(gamma)
    if not g.is_floating_point():
        g = g.double()
    return (g.sqrt() * scale).float()


def embedding_input_to_noise_level(
    embedding_input: torch.Tensor | float, scale: float = DCEDIFF_EMBEDDING_SCALE
) -> torch.Tensor:
    """Inverse of :func:`noise_level_to_embedding_input`: gamma = (embedding_input / scale)^2 (float64)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    e = torch.as_tensor(embedding_input)
    e = e.double() if e.device.type != "mps" else e.float()
    return (e / scale) ** 2


def add_noise_at_level(
    original_samples: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor | float
) -> torch.Tensor:
    """x_gamma = sqrt(gamma) x0 + sqrt(1 - gamma) noise, with one gamma per sample (or a scalar).

    The continuous counterpart of MONAI's ``Scheduler.add_noise`` (identical when gamma is
    ``alphas_cumprod[t]``). The coefficients are computed in gamma's precision (float64 from
    :meth:`NoiseLevelSchedule.sample_gamma`, which keeps 1 - gamma accurate near gamma = 1) and then
    cast to the samples' dtype and device; nothing is modified in place.

    Args:
        original_samples: x0, shape (B, C, ...).
        noise: eps, same shape.
        gamma: shape (B,) or scalar, in [0, 1].
    """
    if noise.shape != original_samples.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(original_samples.shape)}")
    g = torch.as_tensor(gamma, device=original_samples.device)
    if not g.is_floating_point():
        g = g.double() if g.device.type != "mps" else g.float()
    if g.numel() and (float(g.min()) < 0.0 or float(g.max()) > 1.0):
        raise ValueError(f"gamma must lie in [0, 1], got range [{float(g.min())}, {float(g.max())}]")
    dtype = original_samples.dtype if original_samples.is_floating_point() else torch.get_default_dtype()
    signal = g.sqrt()
    sigma = (1.0 - g).sqrt()
    if g.ndim == 1:
        signal = unsqueeze_right(signal, original_samples.ndim)
        sigma = unsqueeze_right(sigma, original_samples.ndim)
    return signal.to(dtype) * original_samples + sigma.to(dtype) * noise


class NoiseLevelSchedule:
    """Palette's continuous noise levels of a MONAI scheduler.

    Args:
        scheduler: any MONAI :class:`~monai.networks.schedulers.Scheduler` (DDPM, DDIM, ...); its
            ``alphas_cumprod`` are the discrete levels gamma_1 .. gamma_T.

    Attributes (float64, CPU, length T; index i <-> t = i + 1):
        gammas: gamma_t, the scheduler's ``alphas_cumprod`` recomputed in float64 from its betas
            (:func:`float64_levels`; equal to MONAI's float32 values to float32 accuracy).
        gammas_prev: gamma_{t-1}, i.e. ``[1, gammas[:-1]]`` (gamma_0 = 1).
    """

    def __init__(self, scheduler: Scheduler) -> None:
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod (not a DDPM-family scheduler)")
        self.scheduler = scheduler
        self.gammas = float64_levels(scheduler)[2]
        self.gammas_prev = torch.cat([self.gammas.new_ones(1), self.gammas[:-1]])
        self.num_train_timesteps = int(self.gammas.numel())

    def _index(self, t_index: torch.Tensor | int) -> torch.Tensor:
        idx = torch.as_tensor(t_index).detach().to(device="cpu", dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_train_timesteps):
            raise ValueError(f"t_index must lie in [0, {self.num_train_timesteps - 1}], got {idx.tolist()}")
        return idx

    @staticmethod
    def _out(values: torch.Tensor, device: torch.device) -> torch.Tensor:
        # float64 wherever the device has it (MPS has not): 1 - gamma near gamma = 1 needs it
        return values.to(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)

    def gamma_at(self, t_index: torch.Tensor | int) -> torch.Tensor:
        """The discrete level gamma_t = ``alphas_cumprod[t_index]`` (what the sampler feeds the network)."""
        device = t_index.device if isinstance(t_index, torch.Tensor) else torch.device("cpu")
        return self._out(self.gammas[self._index(t_index)], device)

    def sample_gamma(self, t_index: torch.Tensor | int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Palette's training noise level: gamma ~ U(gamma_t, gamma_{t-1}) for each index.

        Index i draws between ``alphas_cumprod[i]`` and ``alphas_cumprod[i-1]`` (1 for i = 0), so
        with i uniform over 0..T-1 the drawn levels cover (gamma_T, 1] continuously.

        Args:
            t_index: 0-based step indices, any shape (typically (B,) from ``torch.randint(0, T, (B,))``).
            generator: optional random generator (CPU or the device's); the global RNG otherwise.

        Returns:
            gamma, same shape and device as ``t_index``, float64 (float32 on MPS).
        """
        idx = self._index(t_index)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(idx.shape, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        lo, hi = self.gammas[idx], self.gammas_prev[idx]
        gamma = hi - u * (hi - lo)  # u in [0, 1): gamma in (lo, hi]
        device = t_index.device if isinstance(t_index, torch.Tensor) else torch.device("cpu")
        return self._out(gamma, device)

    def trained_range(self) -> tuple[float, float]:
        """(gamma_min, gamma_max) = (gamma_T, 1): the levels :meth:`sample_gamma` draws from, floats.

        With i uniform over 0..T-1 training covers (gamma_T, 1]; on DCE-diff's training schedule
        (2000 linear betas 1e-6 .. 0.01) gamma_T = 4.386e-5, i.e. embedding inputs
        1000 sqrt(gamma) in [6.62, 1000]. Pass it as ``NoiseLevelInferer(noise_level_range=...)``.
        """
        return float(self.gammas[-1]), 1.0

    @staticmethod
    def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
        """sqrt(gamma) x0 + sqrt(1 - gamma) noise; see :func:`add_noise_at_level`."""
        return add_noise_at_level(original_samples, noise, gamma)

    # the mapping lives at module level (one definition); exposed here for convenience
    noise_level_to_embedding_input = staticmethod(noise_level_to_embedding_input)
