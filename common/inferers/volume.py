"""Run any conditional 2D diffusion sampler over every slice of a 3D volume: all slices of a
volume in one batch per step, under ``torch.inference_mode``, the network forward at the chosen
``precision`` (:func:`common.device.resolve_precision`), with optional repeated sampling (mean and
pixel-wise standard deviation)."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from common.bundle import positive_int
from common.device import AUTO_PRECISIONS, PrecisionNetwork, check_precision, precision_name, precision_network

logger = logging.getLogger(__name__)

__all__ = ["DiffusionVolumeInferer"]


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
        num_inference_steps: if given (not ``None``), ``sampler.scheduler.set_timesteps(num_inference_steps)``
            is called before sampling (respaced sampling); anything but a whole number >= 1 is refused
            with a message naming ``--num_inference_steps`` (0 once meant "the trained number").
        num_samples: draws per volume; > 1 returns the mean in channels ``[0, C_out)``, the
            pixel-wise standard deviation in ``[C_out, 2 C_out)`` and the first draw alone in
            ``[2 C_out, 3 C_out)`` (the figure comparable with single-sample papers).
        slice_batch_size: slices per forward pass; ``None`` or <= 0 means all slices at once.
        spatial_divisor: in-plane padding multiple (2**number of down-samplings of the U-Net).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``, resolved per device by
            :func:`common.device.resolve_precision`; only the network forward runs in it (its output
            is cast back to float32, the sampler's arithmetic stays float32 / float64). The label
            used is logged once and kept in :attr:`precision_used` (e.g. ``"bf16 channels_last"``).
        auto_precisions: the reduced precisions ``"auto"`` may choose (the bundle's setting: those its
            synthesis was measured within bounds of fp32; ``[]``: ``auto`` is fp32 everywhere).
        amp: deprecated: ``False`` means ``precision="fp32"``, ``True`` ``"auto"``; ``None`` (default)
            leaves ``precision`` as given.
        seed: seeds all sampling noise in a forked RNG (reproducible outputs, the caller's random
            state untouched); ``None`` draws fresh noise.
        progress: show a progress bar over the reverse steps.

    Returns:
        (B, C_out * (1 or 3), H, W, D), a MetaTensor carrying the input's affine and metadata.
    """

    def __init__(
        self,
        sampler,
        out_channels: int,
        num_inference_steps: int | None = None,
        num_samples: int = 1,
        slice_batch_size: int | None = None,
        spatial_divisor: int = 16,
        precision: str = "auto",
        auto_precisions: Sequence[str] = AUTO_PRECISIONS,
        amp: bool | None = None,
        seed: int | None = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.out_channels = int(out_channels)
        self.num_inference_steps = (
            None if num_inference_steps is None else positive_int(num_inference_steps, "num_inference_steps")
        )
        self.num_samples = positive_int(num_samples, "num_samples")
        self.slice_batch_size = slice_batch_size
        self.spatial_divisor = int(spatial_divisor)
        if amp is not None:
            precision = "auto" if amp else "fp32"
        self.precision, self.auto_precisions = check_precision(precision, auto_precisions)
        self.precision_used = precision_name(None)
        self.seed = seed
        self.progress = progress

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        k = self.spatial_divisor
        ph, pw = (-h) % k, (-w) % k
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, (h, w)

    def sample_slices(self, cond: torch.Tensor, network: Callable, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample (N, C_out, H, W) from 2D conditions (N, C_cond, H, W) once. ``noise``: the prior
        noise (N, C_out, H', W') on the padded grid (H', W' >= the padded H, W; cropped to it);
        ``None`` draws it chunk by chunk."""
        cond, (h, w) = self._pad(cond)
        n = cond.shape[0]
        chunk = n if not self.slice_batch_size or self.slice_batch_size <= 0 else int(self.slice_batch_size)
        outs = []
        for start in range(0, n, chunk):
            c = cond[start : start + chunk]
            if noise is not None:
                eps = noise[start : start + chunk, :, : c.shape[2], : c.shape[3]].to(c.device)
            else:  # drawn on the CPU so a seed gives the same prior noise on every device
                eps = torch.randn((c.shape[0], self.out_channels, *c.shape[2:]), dtype=torch.float32).to(c.device)
            out = self.sampler.sample(
                input_noise=eps, diffusion_model=network, conditioning=c, mode="concat", verbose=self.progress
            )
            outs.append(out.float())
        return torch.cat(outs, 0)[..., :h, :w]

    def wrap_network(self, network: Callable, device: torch.device) -> Callable:
        """``network`` at this inferer's precision on ``device`` (a :class:`PrecisionNetwork`)."""
        if network is None or isinstance(network, PrecisionNetwork):
            return network
        net = precision_network(network, self.precision, device, self.auto_precisions, logger)
        self.precision_used = net.label
        return net

    def set_timesteps(self, device: torch.device | str | None = None) -> None:
        """``sampler.scheduler.set_timesteps(num_inference_steps)`` (nothing when it is ``None``); a scheduler
        made consistent by :func:`common.monai_compat.consistent_timesteps` for another step count (a
        validation copy of the inference inferer, :func:`common.bundle.variant`) is re-aligned for this one."""
        if self.num_inference_steps is None:
            return
        n, scheduler = int(self.num_inference_steps), self.sampler.scheduler
        if getattr(scheduler, "consistent_timesteps", False):
            from common.monai_compat import consistent_timesteps

            consistent_timesteps(scheduler, n)
        scheduler.set_timesteps(n, device=device)

    def prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        """Check a conditioning volume (B, C, H, W, D) (finite values), set the scheduler's timesteps and
        return it as a plain tensor (the output gets its metadata back in :meth:`finish`)."""
        if inputs.ndim != 5:
            raise ValueError(f"expected a conditioning volume (B, C, H, W, D), got shape {tuple(inputs.shape)}")
        if not torch.isfinite(inputs).all():
            raise ValueError("the conditioning volume contains NaN or infinite values")
        self.set_timesteps(inputs.device)
        return inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs

    @contextlib.contextmanager
    def seeded(self, device: torch.device) -> Iterator[None]:
        """Inference mode in a forked RNG seeded with ``seed`` (when given): the prior noise and every
        reverse step's noise are reproducible, whatever sampler is plugged in, without touching the
        caller's random state."""
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None), torch.inference_mode():
            if self.seed is not None:
                torch.manual_seed(self.seed)
            yield

    def combine(self, draws: torch.Tensor) -> torch.Tensor:
        """``num_samples`` draws (S, N, C, ...) -> their mean (N, C, ...), or with several draws
        ``[mean, std, first draw]`` along the channels (N, 3C, ...)."""
        mean = draws.mean(0)
        return mean if self.num_samples == 1 else torch.cat([mean, draws.std(0), draws[0]], dim=1)

    @staticmethod
    def finish(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``out`` contiguous, with the input's geometry and (batched) metadata when it is a MetaTensor."""
        out = out.contiguous()
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out.clone()).copy_meta_from(inputs, copy_attr=True)
        return out

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        plain = self.prepare(inputs)
        b, c, h, w, d = plain.shape
        network = self.wrap_network(network, inputs.device)
        slices = plain.movedim(-1, 1).reshape(b * d, c, h, w)  # slices are no longer a batch of cases
        with self.seeded(inputs.device):
            out = self.combine(torch.stack([self.sample_slices(slices, network) for _ in range(self.num_samples)]))
        return self.finish(out.reshape(b, d, out.shape[1], h, w).movedim(1, -1), inputs)
