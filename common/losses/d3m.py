"""Training losses the bundles add to MONAI's: one module per method."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import DiffusionLoss

__all__ = ["D3MLoss"]


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
