"""Image, kinetic, statistical and perceptual metrics (what MONAI lacks, on top of MONAI's metrics).

``perceptual`` (LPIPS, FID) needs local weight files and is imported from
``common.metrics.perceptual`` explicitly; it is also re-exported here.
"""

from .image import gms_map, gmsd, mae, psnr, ssim, ssim_map
from .kinetic import curve_spearman, dtw_distance, enhancement_error, enhancement_errors, kinetic_curve, mean_in_mask
from .masks import EMPTY_TRUTH_CONVENTION, dice_et, mask_figures, voxel_ml
from .perceptual import LPIPS, FIDScore, LPIPSLoss, lpips_state_dict_keys
from .stats import (
    format_table,
    metric_names,
    paired_wilcoxon,
    read_case_csv,
    summarize,
    summary_rows,
    write_case_csv,
    write_summary,
)

__all__ = [
    "psnr",
    "ssim",
    "ssim_map",
    "mae",
    "dice_et",
    "mask_figures",
    "voxel_ml",
    "EMPTY_TRUTH_CONVENTION",
    "gmsd",
    "gms_map",
    "mean_in_mask",
    "enhancement_error",
    "enhancement_errors",
    "kinetic_curve",
    "curve_spearman",
    "dtw_distance",
    "write_case_csv",
    "read_case_csv",
    "metric_names",
    "summarize",
    "summary_rows",
    "write_summary",
    "paired_wilcoxon",
    "format_table",
    "LPIPS",
    "LPIPSLoss",
    "FIDScore",
    "lpips_state_dict_keys",
]
