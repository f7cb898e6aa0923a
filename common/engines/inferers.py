"""Inferers for conditional 2D diffusion on 3D volumes.

- :class:`ResidualShiftInferer`: MONAI's :class:`~monai.inferers.DiffusionInferer` for the
  residual-shifting process (ResShift, ResDCE-diff, Res-SRDiff). The forward pass noises the target
  toward the paired conditioning channels and the network predicts x0; sampling starts from the
  prior around the conditioning image instead of pure noise.
- :class:`DiffusionVolumeInferer`: runs any such 2D sampler over every slice of a 3D volume, all
  slices of a volume in one batch per step, under ``torch.inference_mode`` and CUDA autocast, with
  optional repeated sampling (mean and pixel-wise standard deviation).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import DiffusionInferer, Inferer
from tqdm.auto import tqdm


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


class DiffusionVolumeInferer(Inferer):
    """Synthesise whole 3D volumes slice by slice with a 2D conditional diffusion sampler.

    ``inputs`` is the conditioning volume (B, C_cond, H, W, D); every axial slice (last dim) becomes
    one sample, and all slices of a volume go through each reverse step together (in chunks of
    ``slice_batch_size`` if memory demands). H and W are padded to a multiple of
    ``spatial_divisor`` (edge replication) for the U-Net and cropped back, so any in-plane size works
    and the output keeps the input grid exactly.

    Args:
        sampler: an object with MONAI's ``DiffusionInferer.sample`` signature (e.g.
            :class:`ResidualShiftInferer` or DCE-diff's noise-level inferer).
        out_channels: channels of the synthesised image C_out.
        num_inference_steps: if given, ``sampler.scheduler.set_timesteps(num_inference_steps)`` is
            called before sampling (respaced sampling).
        num_samples: draws per volume; > 1 returns the mean in channels ``[0, C_out)`` and the
            pixel-wise standard deviation in ``[C_out, 2 C_out)``.
        slice_batch_size: slices per forward pass; ``None`` or <= 0 means all slices at once.
        spatial_divisor: in-plane padding multiple (2**number of down-samplings of the U-Net).
        amp: autocast to float16 on CUDA; ignored on CPU.
        seed: seeds all sampling noise in a forked RNG (reproducible outputs, the caller's random
            state untouched); ``None`` draws fresh noise.
        progress: show a progress bar over the reverse steps.

    Returns:
        (B, C_out * (1 or 2), H, W, D), a MetaTensor carrying the input's affine and metadata.
    """

    def __init__(
        self,
        sampler,
        out_channels: int,
        num_inference_steps: int | None = None,
        num_samples: int = 1,
        slice_batch_size: int | None = None,
        spatial_divisor: int = 16,
        amp: bool = True,
        seed: int | None = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.sampler = sampler
        self.out_channels = int(out_channels)
        self.num_inference_steps = num_inference_steps
        self.num_samples = int(num_samples)
        self.slice_batch_size = slice_batch_size
        self.spatial_divisor = int(spatial_divisor)
        self.amp = amp
        self.seed = seed
        self.progress = progress

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        k = self.spatial_divisor
        ph, pw = (-h) % k, (-w) % k
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, (h, w)

    def sample_slices(self, cond: torch.Tensor, network: Callable) -> torch.Tensor:
        """Sample (N, C_out, H, W) from 2D conditions (N, C_cond, H, W) once."""
        cond, (h, w) = self._pad(cond)
        n = cond.shape[0]
        chunk = n if not self.slice_batch_size or self.slice_batch_size <= 0 else int(self.slice_batch_size)
        outs = []
        for start in range(0, n, chunk):
            c = cond[start : start + chunk]
            # drawn on the CPU so a seed gives the same prior noise on every device
            noise = torch.randn((c.shape[0], self.out_channels, *c.shape[2:]), dtype=torch.float32).to(c.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and c.device.type == "cuda"):
                out = self.sampler.sample(
                    input_noise=noise, diffusion_model=network, conditioning=c, mode="concat", verbose=self.progress
                )
            outs.append(out.float())
        return torch.cat(outs, 0)[..., :h, :w]

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        if inputs.ndim != 5:
            raise ValueError(f"expected a conditioning volume (B, C, H, W, D), got shape {tuple(inputs.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError("the conditioning volume contains NaN or infinite values")
        if self.num_inference_steps:
            self.sampler.scheduler.set_timesteps(int(self.num_inference_steps), device=inputs.device)
        b, c, h, w, d = inputs.shape
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs  # slices are no longer a batch of cases
        slices = plain.movedim(-1, 1).reshape(b * d, c, h, w)
        # a forked, seeded RNG makes the prior noise and every reverse step's noise reproducible,
        # whatever sampler is plugged in, without touching the caller's random state
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None), torch.inference_mode():
            if self.seed is not None:
                torch.manual_seed(self.seed)
            draws = torch.stack([self.sample_slices(slices, network) for _ in range(self.num_samples)])
            mean = draws.mean(0)
            out = mean if self.num_samples == 1 else torch.cat([mean, draws.std(0)], dim=1)
        out = out.reshape(b, d, out.shape[1], h, w).movedim(1, -1).contiguous()
        if isinstance(inputs, MetaTensor):  # keep the input's geometry and (batched) metadata
            out = MetaTensor(out.clone()).copy_meta_from(inputs, copy_attr=True)
        return out
