"""D3M's writer (T1c, the enhancing-tumour mask and the deformation, on the input's grid) and its
metrics (T1c next to its baseline, plus the ET-mask Dice and volumes)."""

from __future__ import annotations

import numpy as np

from common.handlers.metrics import SynthesisMetrics
from common.handlers.writer import SynthesisWriter, as_numpy, case_id, loaded_files, source_file
from common.io import save_nifti

__all__ = ["D3MMetrics", "D3MWriter", "dice"]


class D3MWriter(SynthesisWriter):
    """:class:`common.handlers.SynthesisWriter` (``t1c.nii.gz`` [+ ``t1c_std``], ``panel.png`` with the predicted and true ET outlined) plus
    ``et_mask.nii.gz`` (uint8 label volume, 1 = predicted enhancing tumour) and, with
    ``write_deformation``, ``deformation.nii.gz`` (H, W, D, 2: the last DDIM step's field in pixels,
    in-plane axes 0 and 1), all with the exact affine of the ``geometry_key`` file."""

    def __init__(self, *args, write_deformation: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.write_deformation = bool(write_deformation)

    def write_case(self, item: dict, out: dict) -> dict[str, str]:
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

    def panel_contours(self, item: dict, out: dict, z: int) -> dict[str, dict[str, np.ndarray]] | None:
        """The predicted ET mask and, when the case has a seg, the true ET mask, outlined on the T1c."""
        masks = {}
        if out.get("et_mask") is not None:
            masks["predicted ET"] = as_numpy(out["et_mask"])[0][..., z] > 0.5
        if out.get("label_mask") is not None:
            masks["true ET"] = as_numpy(out["label_mask"])[0][..., z] > 0.5
        return {self.output_names[0]: masks} if masks else None


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    s = pred.sum() + true.sum()
    return float(2.0 * np.logical_and(pred, true).sum() / s) if s else 1.0


class D3MMetrics(SynthesisMetrics):
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
