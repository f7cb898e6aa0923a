"""Training losses the bundles add to MONAI's, one module per method: Res-SRDiff's weighted L2 +
LPIPS (:mod:`.weighted_l2`), iterU-Net's L1 + SSIM + gradient difference (:mod:`.iterunet`), D3M's
v-prediction + deformation smoothness (:mod:`.d3m`)."""

from common.losses.d3m import D3MLoss
from common.losses.iterunet import GradientDifferenceLoss, IterUNetLoss
from common.losses.weighted_l2 import LPIPS_DISABLED_MESSAGE, WeightedL2PerceptualLoss

__all__ = ["D3MLoss", "GradientDifferenceLoss", "IterUNetLoss", "LPIPS_DISABLED_MESSAGE", "WeightedL2PerceptualLoss"]
