"""iterU-Net's training loss: 0.1 L1 + 1 SSIM + 1 perceptual (off by default) + 0.1 gradient
difference, summed over the steps of a chain."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from monai.losses import SSIMLoss

__all__ = ["GradientDifferenceLoss", "IterUNetLoss"]


class GradientDifferenceLoss(nn.Module):
    """Gradient difference loss (Mathieu et al. 2016, alpha = 1): the mean over voxels and axes of
    ``| |d pred / d a| - |d target / d a| |`` with forward differences along every spatial axis a.

    Inputs (B, C, *spatial); returns a scalar (image units).
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = []
        for ax in range(2, pred.ndim):
            dp = torch.diff(pred, dim=ax).abs()
            dt = torch.diff(target, dim=ax).abs()
            terms.append((dp - dt).abs().mean())
        return torch.stack(terms).mean()


class IterUNetLoss(nn.Module):
    """``sum over steps s of  w_l1 L1 + w_ssim (1 - SSIM) + w_perc perceptual + w_gdl GDL``.

    Args:
        l1_weight, ssim_weight, perceptual_weight, gdl_weight: the weights (paper: 0.1, 1, 1, 0.1;
            the perceptual term is off, 0, by default).
        ssim_data_range: data range of the TI-normed images for MONAI's ``SSIMLoss``.
        ssim_win_size: SSIM window (every patch dimension must be at least this).
        spatial_dims: 3.
        perceptual_weights_path: a local torch hub folder holding MedicalNet (``warvito_MedicalNet-models_main``
            with its ResNet-10 weights) for MONAI's ``PerceptualLoss(network_type="medicalnet_resnet10_23datasets")``.
            Nothing is downloaded: with ``perceptual_weight > 0`` and no such folder, a ``FileNotFoundError``
            says what is missing.

    ``forward(pred, target)``: (B, S, *spatial) each, S steps of the chain (channel s = time point
    start+1+s); returns the scalar sum over steps.
    """

    def __init__(
        self,
        l1_weight: float = 0.1,
        ssim_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        gdl_weight: float = 0.1,
        ssim_data_range: float = 10.0,
        ssim_win_size: int = 7,
        spatial_dims: int = 3,
        perceptual_weights_path: str = "",
    ) -> None:
        super().__init__()
        self.w = {
            "l1": float(l1_weight),
            "ssim": float(ssim_weight),
            "perceptual": float(perceptual_weight),
            "gdl": float(gdl_weight),
        }
        self.ssim = SSIMLoss(spatial_dims=spatial_dims, data_range=float(ssim_data_range), win_size=int(ssim_win_size))
        self.gdl = GradientDifferenceLoss()
        self.perceptual = None
        if self.w["perceptual"] > 0:
            hub = Path(perceptual_weights_path).expanduser() if perceptual_weights_path else None
            if hub is None or not (hub / "warvito_MedicalNet-models_main").is_dir():
                raise FileNotFoundError(
                    f"perceptual_weight={perceptual_weight} needs the MedicalNet ResNet-10 weights on disk (they cannot be "
                    f"downloaded at run time): pass --perceptual_weights_path <torch hub folder holding "
                    f"warvito_MedicalNet-models_main> (got {perceptual_weights_path!r}), or --perceptual_weight 0"
                )
            from monai.losses import PerceptualLoss

            self.perceptual = PerceptualLoss(
                spatial_dims=3, network_type="medicalnet_resnet10_23datasets", is_fake_3d=False, cache_dir=str(hub)
            )

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        total = pred.new_zeros(())
        for s in range(pred.shape[1]):
            p, t = pred[:, s : s + 1].float(), target[:, s : s + 1].float()
            total = total + self.w["l1"] * (p - t).abs().mean()
            if self.w["ssim"]:
                total = total + self.w["ssim"] * self.ssim(p, t)
            if self.w["gdl"]:
                total = total + self.w["gdl"] * self.gdl(p, t)
            if self.perceptual is not None:
                total = total + self.w["perceptual"] * self.perceptual(p, t)
        return total
