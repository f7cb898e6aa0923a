"""Training and sampling with continuous noise-level conditioning (Palette; the DCE-diff bundle).

- :class:`common.engines.NoiseLevelPrepareBatch`: for each sample of a batch, draws a step index t uniformly from
  the TRAINING scheduler and a continuous noise level gamma ~ U(gamma_t, gamma_{t-1}) (Palette's
  training, see :meth:`common.schedulers.noise_level.NoiseLevelSchedule.sample_gamma`); the loss
  target is the noise.
- :class:`NoiseLevelInferer`: the training forward pass (noise the target x0 to level gamma, predict
  eps from ``cat([x_gamma, condition])`` and the embedding input of gamma) and sampling with any
  DDPM-family MONAI scheduler, feeding the network that scheduler's own ``alphas_cumprod[t]``.

The network is told the noise level through its ``timesteps`` argument, as
``noise_level_to_embedding_input(gamma, embedding_scale)`` (= 1000 sqrt(gamma) by default), in both
the forward pass and sampling, so one network trained on one schedule samples with another.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from tqdm.auto import tqdm

from common.monai_compat import float64_tables
from common.schedulers.noise_level import (
    DCEDIFF_EMBEDDING_SCALE,
    NoiseLevelSchedule,
    add_noise_at_level,
    noise_level_to_embedding_input,
)

__all__ = ["NoiseLevelInferer"]


def _predict(
    network: Callable,
    x: torch.Tensor,
    embedding_input: torch.Tensor,
    context: torch.Tensor | None = None,
    seg: torch.Tensor | None = None,
) -> torch.Tensor:
    kwargs: dict[str, Any] = {"timesteps": embedding_input}
    if context is not None:
        kwargs["context"] = context
    if seg is not None:  # SPADE networks
        kwargs["seg"] = seg
    return network(x, **kwargs)


class NoiseLevelInferer(DiffusionInferer):
    """Palette-style conditional DDPM: epsilon prediction conditioned on the continuous noise level.

    The target x0 has C_out channels (DCE early/late), the condition C_cond (T2w, PD, ADC,
    pre-contrast); in ``"concat"`` mode the network sees ``cat([x, condition], dim=1)``
    (C_out + C_cond channels), in ``"crossattn"`` mode x alone with ``context=condition``. Its
    ``timesteps`` argument is ``noise_level_to_embedding_input(gamma, embedding_scale)``.

    Args:
        scheduler: the SAMPLING scheduler, a MONAI ``DDPMScheduler`` or ``DDIMScheduler`` (dcediff
            declares both in its JSON, ``scheduler`` / ``ddim_scheduler``, and passes them through
            :func:`common.monai_compat.consistent_timesteps`) with ``prediction_type="epsilon"``.
            ``DiffusionVolumeInferer`` calls its ``set_timesteps``.
            Its clipping settings apply (see Sampling below). Training does not use it: the levels
            come with the batch (``gamma`` from :class:`NoiseLevelPrepareBatch`).
        embedding_scale: ``scale`` of :func:`noise_level_to_embedding_input`; must match training.
        eta: DDIM's eta (0: deterministic DDIM); ignored by DDPM.
        noise_level_range: (gamma_min, gamma_max), the levels the network was TRAINED on
            (:meth:`~common.schedulers.noise_level.NoiseLevelSchedule.trained_range` of the training
            schedule; dcediff's config id ``trained_noise_levels``: (4.386e-5, 1), embedding inputs
            6.62 .. 1000). The network's noise-level input is clamped to it, in training and
            sampling alike; the sample itself is noised and stepped at the true level. DCE-diff
            samples on a schedule reaching gamma_T ~ 7e-21, and 532 of its 1000 levels (6 of 10 DDIM
            steps) lie below the trained gamma_min: there x_t is noise to within sqrt(gamma) < 0.0066
            of the signal, and the network is told the noisiest level it knows instead of one it never
            saw. None: no clamping.

    Sampling (:meth:`sample`) runs over ``scheduler.timesteps``; at step t the network receives the
    embedding input of ``scheduler.alphas_cumprod[t]`` (broadcast to the batch), and the update is
    the scheduler's own ``step(eps_hat, t, x_t)``, run on a float64 copy of its betas / alphas /
    alphas_cumprod (:func:`common.monai_compat.float64_tables`, idempotent; MONAI's float32 tables
    would scale the final DDPM output by beta_1 / (1 - gamma_1) = 0.99983 on the DCE-diff inference
    schedule); the network's gamma comes from the same float64 table:

    - DDPM: x0_hat = (x_t - sqrt(1 - gamma_t) eps_hat) / sqrt(gamma_t), then the posterior
      q(x_{t-1} | x_t, x0_hat) (Ho et al. eq. 7) plus noise of the ``variance_type`` variance
      (default ``"fixed_small"``: the posterior variance, as Palette). MONAI's step always goes to
      t - 1, so a DDPM scheduler must run all its steps (respaced DDPM timesteps raise here).
    - DDIM: x_prev = sqrt(gamma_prev) x0_hat + sqrt(1 - gamma_prev - sigma^2) eps_hat (+ sigma z),
      with the previous level at ``t - T // n`` (``gamma = 1`` past the end with
      ``set_alpha_to_one``). If that is not the next entry of ``scheduler.timesteps`` (MONAI's
      default spacing; see :func:`common.monai_compat.ddim_steps_offset`) a warning is
      issued, as the network would then be told a level the sample is not at.
    - Clipping: with ``clip_sample=True`` (MONAI's default) x0_hat is clamped to
      ``[clip_sample_min, clip_sample_max]`` (default [-1, 1]) at every step, and the final step
      returns the clamped x0_hat: intensities beyond the bound (DCE enhancement relative to the
      pre-contrast reaches ~2-3) are saturated. Use ``clip_sample=False`` or a bound containing the
      data range. Without clipping the x0_hat of the noisiest steps is huge (gamma_T ~ 1e-20 on the
      DCE-diff inference schedule) but enters the update multiplied by sqrt(gamma_prev), so it is
      harmless in float32.
    - Precision: under CUDA autocast the network output (float16) is cast to the sample's dtype
      before ``step``; the step coefficients are float64 scalars, so the update runs in the
      sample's precision (float32 from ``DiffusionVolumeInferer``).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        embedding_scale: float = DCEDIFF_EMBEDDING_SCALE,
        eta: float = 0.0,
        noise_level_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__(scheduler=scheduler)
        if not embedding_scale > 0:
            raise ValueError(f"embedding_scale must be positive, got {embedding_scale}")
        self.embedding_scale = float(embedding_scale)
        self.eta = float(eta)
        self.noise_level_range: tuple[float, float] | None = None
        if noise_level_range is not None:
            lo, hi = (float(v) for v in noise_level_range)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"noise_level_range must satisfy 0 <= min < max <= 1, got {noise_level_range}")
            self.noise_level_range = (lo, hi)

    def embedding_input(self, gamma: torch.Tensor | float, batch_size: int, device: torch.device) -> torch.Tensor:
        """The network's ``timesteps`` for noise level(s) gamma: shape (batch_size,), float32.

        gamma is first clamped to ``noise_level_range`` (when set), so the embedding input lies in
        ``[noise_level_to_embedding_input(min), noise_level_to_embedding_input(max)]``.
        """
        if self.noise_level_range is not None:
            g = torch.as_tensor(gamma)
            g = g if g.is_floating_point() else g.double()
            gamma = g.clamp(*self.noise_level_range)
        emb = noise_level_to_embedding_input(gamma, self.embedding_scale).to(device)
        if emb.ndim == 0:
            emb = emb.expand(batch_size)
        if emb.shape != (batch_size,):
            raise ValueError(f"expected one noise level per sample ({batch_size},), got shape {tuple(emb.shape)}")
        return emb.contiguous()

    # ------------------------------------------------------------------ training forward pass
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: Callable,
        noise: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        mode: str = "concat",
        seg: torch.Tensor | None = None,
        gamma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps prediction for a training batch.

        Args:
            inputs: x0, the clean target (B, C_out, H, W).
            diffusion_model: network taking ``(x, timesteps=embedding_input[, context=...])``.
            noise: eps, same shape as ``inputs``.
            timesteps: the drawn step indices; unused (the level is ``gamma``), accepted because
                the prepare batch passes them.
            condition: conditioning image (B, C_cond, H, W).
            mode: ``"concat"`` (Palette) or ``"crossattn"``.
            seg: segmentation for SPADE networks.
            gamma: noise levels (B,) from :class:`NoiseLevelPrepareBatch`; required.
        """
        if mode not in ("concat", "crossattn"):
            raise NotImplementedError(f"{mode} condition is not supported")
        if gamma is None:
            raise ValueError("the noise-level forward pass needs `gamma` (use NoiseLevelPrepareBatch)")
        if condition is None:
            raise ValueError("conditional diffusion needs the conditioning image (the batch's 'image')")
        x_noisy = add_noise_at_level(inputs, noise, gamma)
        emb = self.embedding_input(gamma, inputs.shape[0], inputs.device)
        if mode == "concat":
            return _predict(diffusion_model, torch.cat([x_noisy, condition], dim=1), emb, None, seg)
        return _predict(diffusion_model, x_noisy, emb, condition, seg)

    # ------------------------------------------------------------------ sampling
    def check_scheduler(self, scheduler: Scheduler) -> None:
        """Raise for schedulers this sampler cannot run correctly; warn for an inconsistent DDIM chain."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; use a DDPM or DDIM scheduler")
        pred = getattr(scheduler, "prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"the network predicts noise; scheduler.prediction_type must be 'epsilon', got {pred!r}")
        steps = [int(t) for t in scheduler.timesteps]
        if isinstance(scheduler, DDPMScheduler):
            if any(a - b != 1 for a, b in zip(steps[:-1], steps[1:])) or steps[-1] != 0:
                raise ValueError(
                    "MONAI's DDPMScheduler.step always steps t -> t-1, so its timesteps must be consecutive"
                    f" down to 0 (got {steps[:3]}...{steps[-2:]} from set_timesteps("
                    f"{scheduler.num_inference_steps})); use DDIM for fewer steps, or a DDPMScheduler built"
                    " with fewer num_train_timesteps"
                )
        elif isinstance(scheduler, DDIMScheduler):
            stride = scheduler.num_train_timesteps // scheduler.num_inference_steps
            lands = [t - stride for t in steps]
            if lands[:-1] != steps[1:] or lands[-1] >= 0:
                warnings.warn(
                    f"DDIM chain is inconsistent: step(t) lands on t - {stride} but the next timestep differs"
                    f" (timesteps {steps[:3]}..., landing on {lands[:3]}...), so the network is told a noise"
                    " level the sample is not at. Build the scheduler with"
                    " common.monai_compat.consistent_timesteps(scheduler, n) (dcediff's JSON does) and keep n.",
                    stacklevel=3,
                )

    def _step(
        self,
        scheduler: Scheduler,
        model_output: torch.Tensor,
        t: int,
        sample: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if isinstance(scheduler, DDIMScheduler):
            out = scheduler.step(model_output, t, sample, eta=self.eta, generator=generator)
        elif isinstance(scheduler, DDPMScheduler):
            out = scheduler.step(model_output, t, sample, generator=generator)
        else:
            out = scheduler.step(model_output, t, sample)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: Callable,
        scheduler: Scheduler | None = None,
        save_intermediates: bool | None = False,
        intermediate_steps: int | None = 100,
        conditioning: torch.Tensor | None = None,
        mode: str = "concat",
        verbose: bool = True,
        seg: torch.Tensor | None = None,
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Reverse chain from x_T = ``input_noise`` over ``scheduler.timesteps`` (MONAI's signature).

        Args:
            input_noise: x_T ~ N(0, I), shape of the target (N, C_out, H, W).
            diffusion_model: the eps-predicting network.
            scheduler: sampling scheduler; ``self.scheduler`` if None.
            save_intermediates: also return the samples after steps t with t % intermediate_steps == 0.
            intermediate_steps: see ``save_intermediates``.
            conditioning: the conditioning image (N, C_cond, H, W); required.
            mode: ``"concat"`` or ``"crossattn"``.
            verbose: tqdm progress bar over the steps.
            seg: segmentation for SPADE networks.
            cfg: classifier-free guidance scale (as MONAI: unconditioned input = ``cfg_fill_value``);
                only meaningful for a network trained with condition dropout.
            cfg_fill_value: fill value of the unconditioned input.
            generator: random generator for the DDPM / DDIM (eta > 0) step noise, on the sample's device.
        """
        if mode not in ("concat", "crossattn"):
            raise NotImplementedError(f"{mode} condition is not supported")
        if conditioning is None:
            raise ValueError("conditional sampling needs the conditioning image")
        if scheduler is None:
            scheduler = self.scheduler
        self.check_scheduler(scheduler)
        gammas = NoiseLevelSchedule(scheduler).gammas  # float64 alphas_cumprod (see float64_levels)
        # step on a float64 copy of the schedule (float32 on MPS, which has no float64)
        stepper = float64_tables(scheduler, torch.float32 if input_noise.device.type == "mps" else torch.float64)
        image = input_noise
        n = image.shape[0] * (2 if cfg is not None else 1)
        if cfg is not None:
            uncond = torch.full_like(conditioning, cfg_fill_value)
            cond_input = torch.cat([uncond, conditioning], dim=0)
        else:
            cond_input = conditioning
        intermediates = []
        for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not verbose):
            t = int(t)
            emb = self.embedding_input(gammas[t], n, image.device)
            x = torch.cat([image] * 2, dim=0) if cfg is not None else image
            if mode == "concat":
                model_output = _predict(diffusion_model, torch.cat([x, cond_input], dim=1), emb, None, seg)
            else:
                model_output = _predict(diffusion_model, x, emb, cond_input, seg)
            if cfg is not None:
                out_uncond, out_cond = model_output.chunk(2)
                model_output = out_uncond + cfg * (out_cond - out_uncond)
            image = self._step(stepper, model_output.to(image.dtype), t, image, generator)
            if save_intermediates and intermediate_steps and t % intermediate_steps == 0:
                intermediates.append(image)
        return (image, intermediates) if save_intermediates else image
