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
(``schedule="linear_beta"``: ``betas = torch.linspace(beta_start, beta_end, T)`` in float32,
``alphas_cumprod = torch.cumprod(1 - betas)``), and :class:`NoiseLevelSchedule` only reads its
``alphas_cumprod``.

Index convention (MONAI's): index ``i`` in 0..T-1 is diffusion step t = i + 1, and
``alphas_cumprod[i]`` is gamma_t. Palette's gamma_0 = 1 (no noise) has no index; it is the upper
bound of the interval drawn from for index 0.
"""

from __future__ import annotations

import copy

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from monai.utils import unsqueeze_right

__all__ = [
    "DCEDIFF_EMBEDDING_SCALE",
    "NoiseLevelSchedule",
    "add_noise_at_level",
    "dcediff_inference_scheduler",
    "dcediff_train_scheduler",
    "ddim_steps_offset",
    "embedding_input_to_noise_level",
    "float64_levels",
    "float64_scheduler",
    "noise_level_to_embedding_input",
]

DCEDIFF_EMBEDDING_SCALE = 1000.0
"""Default ``scale`` of :func:`noise_level_to_embedding_input`: embedding inputs in [0, 1000]."""


def noise_level_to_embedding_input(
    gamma: torch.Tensor | float, scale: float = DCEDIFF_EMBEDDING_SCALE
) -> torch.Tensor:
    """What the network's ``timesteps`` argument receives for noise level gamma: ``scale * sqrt(gamma)``.

    This is the single mapping used for training (:class:`common.engines.noise_level.NoiseLevelInferer`
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
      training range ends at 6.6, so these lie just below it, where x_t is noise either way). With
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


def float64_levels(scheduler: Scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) of a MONAI scheduler in float64 on the CPU.

    MONAI builds its schedules in float32, where 1 - alphas_cumprod[0] is not beta_1: it is
    1.0132790e-6 for beta_1 = 1e-6 (the DCE-diff training schedule) and 1.0001659e-4 for 1e-4 (the
    inference one). The DDPM posterior's x0 coefficient at the last step, beta_1 / (1 - gamma_1),
    then scales the output by 0.98690 and 0.99983 respectively, and noise levels near 1 are off by
    the same relative amounts. Here alphas_cumprod = cumprod(1 - betas) is recomputed in float64
    from the scheduler's betas (what every MONAI schedule defines it as), which removes this. If a
    custom schedule's alphas_cumprod is not the cumulative product of its betas (relative
    difference > 1e-3), its own values are widened instead.
    """
    betas = scheduler.betas.detach().to(device="cpu", dtype=torch.float64)
    alphas = 1.0 - betas
    gammas = torch.cumprod(alphas, dim=0)
    given = scheduler.alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
    if given.shape != gammas.shape or not torch.allclose(gammas, given, rtol=1e-3, atol=1e-30):
        alphas = scheduler.alphas.detach().to(device="cpu", dtype=torch.float64)
        return betas, alphas, given
    return betas, alphas, gammas


def float64_scheduler(scheduler: Scheduler) -> Scheduler:
    """A shallow copy of a MONAI DDPM/DDIM scheduler whose ``step`` runs on float64 levels.

    ``betas``, ``alphas``, ``alphas_cumprod`` (and DDIM's ``final_alpha_cumprod``) of the copy are
    :func:`float64_levels`; everything else (``timesteps``, clipping, variance type, ...) is shared
    with ``scheduler``, which is not modified. The step's 0-dim coefficients are then exact to
    float64 and are applied to the sample in the sample's own dtype.
    """
    shadow = copy.copy(scheduler)
    shadow.betas, shadow.alphas, shadow.alphas_cumprod = float64_levels(scheduler)
    shadow.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM: 1 (set_alpha_to_one) or alphas_cumprod[0]
        to_one = float(scheduler.final_alpha_cumprod) == 1.0
        shadow.final_alpha_cumprod = shadow.one if to_one else shadow.alphas_cumprod[0]
    return shadow


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

    @staticmethod
    def add_noise(original_samples: torch.Tensor, noise: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
        """sqrt(gamma) x0 + sqrt(1 - gamma) noise; see :func:`add_noise_at_level`."""
        return add_noise_at_level(original_samples, noise, gamma)

    # the mapping lives at module level (one definition); exposed here for convenience
    noise_level_to_embedding_input = staticmethod(noise_level_to_embedding_input)


# ---------------------------------------------------------------------- DCE-diff schedules (paper values)
DCEDIFF_TRAIN = {"num_train_timesteps": 2000, "beta_start": 1e-6, "beta_end": 0.01}
DCEDIFF_INFERENCE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.09}


def dcediff_train_scheduler(**kwargs) -> DDPMScheduler:
    """DCE-diff's training schedule: ``DDPMScheduler(2000, "linear_beta", beta_start=1e-6, beta_end=0.01)``.

    Only its ``alphas_cumprod`` are used (by :class:`NoiseLevelSchedule` / the prepare batch);
    ``kwargs`` override or extend the constructor arguments.
    """
    args = {"schedule": "linear_beta", **DCEDIFF_TRAIN, **kwargs}
    return DDPMScheduler(**args)


def ddim_steps_offset(num_train_timesteps: int, num_inference_steps: int) -> int:
    """``steps_offset`` that makes MONAI's :class:`DDIMScheduler` chain self-consistent.

    MONAI 1.6 sets ``timesteps = round(linspace(T - 1 - offset, 0, n)) + offset`` but
    ``DDIMScheduler.step(t)`` moves the sample to level ``t - T // n``. With offset 0 these differ
    (T = 1000, n = 10: timesteps 999, 888, ..., 111, 0, while step(999) lands on 899), so the
    network is then evaluated at a level the sample is not at. With n dividing T and
    ``offset = T // n - 1`` the timesteps are exactly T-1, T-1-s, ..., s-1 (s = T // n): each step
    lands on the next timestep and the last one (prev < 0) on gamma = 1 (``set_alpha_to_one``).
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


def dcediff_inference_scheduler(
    kind: str = "ddpm",
    num_inference_steps: int = 1000,
    clip_sample: bool = False,
    clip_sample_min: float = -1.0,
    clip_sample_max: float = 1.0,
    **kwargs,
) -> DDPMScheduler | DDIMScheduler:
    """DCE-diff's sampling schedule: linear beta 1e-4 .. 0.09 over 1000 steps, as DDPM or DDIM.

    - ``kind="ddpm"``: ``DDPMScheduler(1000, "linear_beta", 1e-4, 0.09)``, all 1000 refinement steps
      (the paper), ancestral sampling with the posterior variance (MONAI's default
      ``variance_type="fixed_small"``, as in Palette). ``num_inference_steps`` must be 1000: MONAI's
      ``DDPMScheduler.step(t)`` always steps to t - 1, so ``set_timesteps(n < 1000)`` would skip
      levels without adjusting the posterior (wrong samples). For fewer steps use DDIM, or a
      ``DDPMScheduler`` with fewer ``num_train_timesteps`` and its own betas - the network is
      conditioned on gamma, not on the index, so any schedule is valid.
    - ``kind="ddim"``: ``DDIMScheduler`` on the same 1000 betas with ``num_inference_steps`` steps
      (must divide 1000) and ``steps_offset`` from :func:`ddim_steps_offset`, so the chain is
      consistent. If ``set_timesteps`` is later called with another n (e.g. by
      ``DiffusionVolumeInferer(num_inference_steps=...)``), the offset no longer matches and
      ``NoiseLevelInferer.sample`` warns; pass the same n there (or ``None``).

    Clipping. MONAI's schedulers clamp the x0 prediction to [-1, 1] by default
    (``clip_sample=True``). DCE targets scaled relative to the pre-contrast can reach ~2-3
    (enhancement), and a clamped x0 caps every sample at the bound (the last step returns the
    clamped x0 prediction), so the default here is ``clip_sample=False``. To keep clipping as a
    guard against wild x0 predictions at the noisy steps, pass ``clip_sample=True`` with a range that
    contains the data range, e.g. ``clip_sample_min=-1, clip_sample_max=4``.

    Args:
        kind: ``"ddpm"`` or ``"ddim"``.
        num_inference_steps: number of reverse steps (1000 for DDPM).
        clip_sample, clip_sample_min, clip_sample_max: passed to the MONAI scheduler.
        kwargs: further constructor arguments (e.g. ``variance_type`` for DDPM), overriding the above.
    """
    args = {
        "schedule": "linear_beta",
        **DCEDIFF_INFERENCE,
        "clip_sample": clip_sample,
        "clip_sample_min": clip_sample_min,
        "clip_sample_max": clip_sample_max,
        "prediction_type": "epsilon",
    }
    n = int(num_inference_steps)
    if kind == "ddpm":
        if n != DCEDIFF_INFERENCE["num_train_timesteps"]:
            raise ValueError(
                f"DDPM sampling runs all {DCEDIFF_INFERENCE['num_train_timesteps']} steps (MONAI's DDPM step"
                f" cannot skip levels); got num_inference_steps={n}. Use kind='ddim' for fewer steps."
            )
        return DDPMScheduler(**{**args, **kwargs})
    if kind == "ddim":
        args["steps_offset"] = ddim_steps_offset(DCEDIFF_INFERENCE["num_train_timesteps"], n)
        sched = DDIMScheduler(**{**args, **kwargs})
        sched.set_timesteps(n)
        return sched
    raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")

