"""D3M training forward, loss, batch preparation and DDIM sampling with the deformation inside
every denoising step, plus the bundle's output transform, writer and metrics.

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
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import DiffusionInferer
from monai.losses import DiffusionLoss
from monai.networks.blocks import Warp
from monai.transforms import MapTransform
from tqdm.auto import tqdm

from common.engines.prepare_batch import ConditionalDiffusionPrepareBatch

logger = logging.getLogger(__name__)

__all__ = [
    "D3MInferer",
    "D3MLoss",
    "D3MMetrics",
    "D3MPrepareBatch",
    "D3MWriter",
    "SplitD3MOutputsd",
    "warp",
    "x0_eps_from_v",
]

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


class D3MPrepareBatch(ConditionalDiffusionPrepareBatch):
    """Noise ``label`` = [T1c, ET mask] (B, 2, H, W) with independent noise per channel and one t per
    sample (uniform 0..T-1); condition on ``image`` (B, 3, H, W); the loss target is v."""

    def __init__(self, scheduler, condition_name: str = "image", target_name: str = "label") -> None:
        super().__init__(
            num_train_timesteps=scheduler.num_train_timesteps,
            condition_name=condition_name,
            target_name=target_name,
            predict="noise",
        )
        self.scheduler = scheduler

    def get_target(self, images, noise, timesteps):
        return self.scheduler.get_velocity(images, noise, timesteps)


class D3MLoss(nn.Module):
    """``image_weight * mean_b(abar_b mse_img_b) + mask_weight * mean_b(abar_b mse_mask_b) + smooth_weight * DiffusionLoss(u)``.

    ``pred``: the training inferer's output (B, 5, H, W) = [phi_u(v_img), phi_u(v_mask), u_H, u_W, abar_t];
    ``target``: the true v (B, 2, H, W).
    """

    def __init__(
        self,
        image_weight: float = 1.0,
        mask_weight: float = 1.0,
        smooth_weight: float = 1.0,
        weight_by_alpha_bar: bool = True,
    ) -> None:
        super().__init__()
        self.image_weight, self.mask_weight, self.smooth_weight = (
            float(image_weight),
            float(mask_weight),
            float(smooth_weight),
        )
        self.weight_by_alpha_bar = bool(weight_by_alpha_bar)
        self.smooth = DiffusionLoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = pred[:, 4, 0, 0].float() if self.weight_by_alpha_bar else torch.ones(pred.shape[0], device=pred.device)
        err = ((pred[:, :2].float() - target.float()) ** 2).mean(dim=(2, 3))  # (B, 2)
        loss = self.image_weight * (w * err[:, 0]).mean() + self.mask_weight * (w * err[:, 1]).mean()
        if self.smooth_weight:
            loss = loss + self.smooth_weight * self.smooth(pred[:, 2:4].float())
        return loss


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


class SplitD3MOutputsd(MapTransform):
    """Post-processing: ``pred`` (4 ch: T1c, mask, u_H, u_W) -> ``pred`` (T1c, 1 ch), ``et_mask``
    (1 ch, 1.0 where the mask estimate > 0), ``deformation`` (2 ch); ``pred_std`` -> its T1c
    channel; ``label`` (T1c[, mask]) -> ``label`` (T1c) and ``label_mask`` (1.0 inside the true ET)."""

    def __init__(self) -> None:
        super().__init__(["pred"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        p = d["pred"]
        d["pred"], d["et_mask"], d["deformation"] = p[:1], (p[1:2] > 0).float(), p[2:4]
        if d.get("pred_std") is not None:
            d["pred_std"] = d["pred_std"][:1]
        lab = d.get("label")
        if lab is not None:
            d["label"] = lab[:1]
            d["label_mask"] = (lab[1:2] > 0).float() if lab.shape[0] > 1 else None
        return d


def _writer_base():
    from common.handlers.writer import SynthesisWriter

    return SynthesisWriter


class D3MWriter(_writer_base()):
    """:class:`common.handlers.SynthesisWriter` (``t1c.nii.gz`` [+ ``t1c_std``], ``panel.png``) plus
    ``et_mask.nii.gz`` (uint8 label volume, 1 = predicted enhancing tumour) and, with
    ``write_deformation``, ``deformation.nii.gz`` (H, W, D, 2: the last DDIM step's field in pixels,
    in-plane axes 0 and 1), all with the exact affine of the ``geometry_key`` file."""

    def __init__(self, *args, write_deformation: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.write_deformation = bool(write_deformation)

    def write_case(self, item: dict, out: dict) -> dict[str, str]:
        from common.handlers.writer import as_numpy, case_id, loaded_files, source_file
        from common.io import save_nifti

        written = super().write_case(item, out)
        src = source_file(item, self.geometry_key)
        affine, _ = self.reference_grid(item, src)
        case_dir = self.output_dir / case_id(item, self.id_key, self.geometry_key)
        protect = loaded_files(item) + (src,)
        if out.get("et_mask") is not None:
            m = as_numpy(out["et_mask"])[0] > 0.5
            written["et_mask"] = str(
                save_nifti(m, affine, case_dir / "et_mask.nii.gz", dtype=np.uint8, protect=protect)
            )
        if self.write_deformation and out.get("deformation") is not None:
            u = np.moveaxis(as_numpy(out["deformation"]), 0, -1)
            written["deformation"] = str(save_nifti(u, affine, case_dir / "deformation.nii.gz", protect=protect))
        return written


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    s = pred.sum() + true.sum()
    return float(2.0 * np.logical_and(pred, true).sum() / s) if s else 1.0


def _metrics_base():
    from common.handlers.metrics import SynthesisMetrics

    return SynthesisMetrics


class D3MMetrics(_metrics_base()):
    """:class:`common.handlers.SynthesisMetrics` on T1c (PSNR, SSIM, MAE, whole image and in each
    of ``mask_keys``, with the T1n-copy baseline and paired Wilcoxon tests), plus the ET-mask figures
    per case in ``mask_metrics.csv`` and appended to ``summary.md``: ``dice_et``, ``false_ml``
    (predicted ET outside the true ET, mL) and ``missed_ml`` (true ET not predicted, mL)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_rows: list[dict] = []

    def on_iteration(self, engine) -> None:
        super().on_iteration(engine)
        from common.handlers.writer import as_numpy, case_id

        for item, out in zip(engine.state.batch, engine.state.output):
            if out.get("et_mask") is None or out.get("label_mask") is None:
                continue
            p, t = as_numpy(out["et_mask"])[0] > 0.5, as_numpy(out["label_mask"])[0] > 0.5
            aff = np.asarray(getattr(item.get(self.geometry_key), "affine", np.eye(4)), dtype=np.float64)
            ml = abs(np.linalg.det(aff[:3, :3])) / 1000.0
            self.mask_rows.append(
                {
                    "case": case_id(item, self.id_key, self.geometry_key),
                    "method": self.method,
                    "dice_et": dice(p, t),
                    "false_ml": float(np.logical_and(p, ~t).sum() * ml),
                    "missed_ml": float(np.logical_and(~p, t).sum() * ml),
                    "true_ml": float(t.sum() * ml),
                }
            )

    def on_completed(self, engine) -> None:
        super().on_completed(engine)
        if not self.mask_rows:
            return
        from common.io import atomic_path
        from common.metrics import format_table, write_case_csv

        write_case_csv(self.mask_rows, self.output_dir / "mask_metrics.csv")
        keys = ("dice_et", "false_ml", "missed_ml", "true_ml")
        mean = {k: float(np.mean([r[k] for r in self.mask_rows])) for k in keys}
        self.summary["mask"] = mean
        table = format_table([{"method": self.method, "n": len(self.mask_rows), **{k: f"{mean[k]:.4g}" for k in keys}}])
        md = self.output_dir / "summary.md"
        text = (
            (md.read_text() if md.exists() else "") + "\n\nEnhancing-tumour mask (mean over cases)\n\n" + table + "\n"
        )
        with atomic_path(md) as tmp:
            tmp.write_text(text)
        print(table)
