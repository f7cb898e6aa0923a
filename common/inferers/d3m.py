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
from typing import Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import DiffusionInferer
from monai.networks.blocks import Warp
from tqdm.auto import tqdm

from common.inferers.volume import DiffusionVolumeInferer

logger = logging.getLogger(__name__)

__all__ = ["D3MInferer", "D3MVolumeInferer", "warp", "x0_eps_from_v"]

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


def _box(any_rows: torch.Tensor, size: int, k: int) -> tuple[int, int]:
    """[start, stop) of the True entries of ``any_rows`` grown to a multiple of ``k`` (centred, kept
    inside [0, size)); the whole axis when the grown box would not fit (the inferer pads it then)."""
    idx = torch.nonzero(any_rows).flatten()
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    n = -(-(hi - lo) // k) * k
    if n >= size:
        return 0, size
    start = min(max(lo - (n - (hi - lo)) // 2, 0), size - n)
    return start, start + n


class D3MVolumeInferer(DiffusionVolumeInferer):
    """:class:`~common.inferers.DiffusionVolumeInferer` for D3M that denoises the brain only.

    With ``brain_only``, axial slices without brain are not sampled: they are written as
    ``background`` (per output channel, network space: T1c 0, i.e. the input's zero for skull-stripped
    data whose lower percentile is 0; ET mask -1; displacement 0). Every sampled slice is then the
    full-volume result (same seed): bit for bit with ``slice_batch_size=1``, to float32 rounding
    with larger batches (the convolution kernels are chosen by batch size, which skipping changes).

    With ``crop`` as well (off by default), the brain slices are cropped in-plane to the brain's
    bounding box (over all of the volume's brain slices), grown to a multiple of ``spatial_divisor``
    and kept inside the image (the whole axis when it does not fit, padded as usual), sampled, and put
    back on the input grid exactly; outside the box is ``background``. This is faster (the box's
    share of the slice area) but NOT the full-volume result inside the brain: D3M's network attends
    over every position of the slice at every level (linear attention, full attention in the middle)
    and was trained on whole slices padded to 256 x 256, so each step sees the box's edge instead of
    the background around the brain and the difference grows along the chain. Only a purely local
    network would agree away from a rim as wide as its receptive field over the chain.

    The brain is ``brain_mask`` (a keyword of ``__call__``, (B, 1, H, W, D) or (B, H, W, D), nonzero
    inside; the bundle passes the batch's ``brain`` with MONAI's ``PrepareBatchExtraInput``, its
    ``prepare_batch``: :class:`common.data.brats.BratsMasksd` makes it from the case's
    ``*-brain_mask.nii.gz`` when the case has one, else from the raw T1's support), else
    ``inputs[:, brain_channel] > 0``.

    The prior noise is drawn for the whole (padded) volume, (D, C_out, H', W'), once per draw, and
    each slice / box takes its own part: a slice's noise does not depend on which slices are
    sampled, so (with DDIM eta = 0) skipping slices leaves every sampled slice's result unchanged.

    Args:
        brain_only: skip the slices without brain (``False``: the plain full-volume inferer, with the
            same whole-volume noise).
        crop: crop the brain slices to the brain's in-plane bounding box (only with ``brain_only``;
            faster, not exact, see above).
        background: output value per channel outside the brain slices / box.
        brain_channel: the conditioning channel whose support is the brain when no mask is given (T1).
        args, kwargs: :class:`~common.inferers.DiffusionVolumeInferer`'s.
    """

    def __init__(
        self,
        *args,
        brain_only: bool = True,
        crop: bool = False,
        background: Sequence[float] = (0.0, -1.0, 0.0, 0.0),
        brain_channel: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.brain_only, self.crop = bool(brain_only), bool(crop)
        self.background = [float(v) for v in background]
        if len(self.background) != self.out_channels:
            raise ValueError(f"background has {len(self.background)} values for {self.out_channels} output channels")
        self.brain_channel = int(brain_channel)

    def _brain(self, inputs: torch.Tensor, brain_mask) -> torch.Tensor:
        if brain_mask is None:
            return inputs[:, self.brain_channel] > 0
        m = torch.as_tensor(brain_mask, device=inputs.device)
        if m.ndim == inputs.ndim:
            m = m[:, 0]
        if m.shape != inputs[:, 0].shape:
            raise ValueError(
                f"brain mask of shape {tuple(m.shape)} is not on the input's grid {tuple(inputs[:, 0].shape)}"
            )
        return m > 0

    def _volume(self, vol: torch.Tensor, brain: torch.Tensor, network: Callable) -> torch.Tensor:
        """One draw for one volume: vol (C, H, W, D), brain (H, W, D) -> (C_out, H, W, D)."""
        c, h, w, d = vol.shape
        k = self.spatial_divisor
        hp, wp = h + (-h) % k, w + (-w) % k
        noise = torch.randn((d, self.out_channels, hp, wp), dtype=torch.float32)  # the whole volume's, on the CPU
        bg = torch.tensor(self.background, dtype=torch.float32, device=vol.device)
        out = bg.view(-1, 1, 1, 1).expand(self.out_channels, h, w, d).clone()
        zs = torch.nonzero(brain.flatten(0, 1).any(0)).flatten() if self.brain_only else torch.arange(d)
        if zs.numel() == 0:
            return out
        (r0, r1), (c0, c1) = (0, h), (0, w)
        if self.brain_only and self.crop:
            sub = brain[..., zs]
            r0, r1 = _box(sub.any(-1).any(-1), h, k)
            c0, c1 = _box(sub.any(-1).any(0), w, k)
        slices = vol[:, r0:r1, c0:c1][..., zs.to(vol.device)].movedim(-1, 0)  # (Z, C, h', w')
        eps = noise[zs.cpu(), :, r0:, c0:]
        pred = self.sample_slices(slices, network, eps)  # (Z, C_out, h', w')
        out[:, r0:r1, c0:c1, zs.to(vol.device)] = pred.movedim(0, -1).to(out.dtype)
        return out

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, brain_mask=None, **kwargs) -> torch.Tensor:  # type: ignore[override]
        plain = self.prepare(inputs)
        brain = self._brain(plain, brain_mask.as_tensor() if isinstance(brain_mask, MetaTensor) else brain_mask)
        network = self.wrap_network(network, inputs.device)
        with self.seeded(inputs.device):
            draws = [
                torch.stack([self._volume(plain[i], brain[i], network) for i in range(plain.shape[0])])
                for _ in range(self.num_samples)
            ]
            out = self.combine(torch.stack(draws))
        return self.finish(out, inputs)
