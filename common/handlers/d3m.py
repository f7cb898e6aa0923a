"""D3M's writer (T1c, the enhancing-tumour mask and the deformation, on the input's grid) and its
metrics (T1c next to its baseline, plus the ET-mask Dice and volumes)."""

from __future__ import annotations

import numpy as np

from common.handlers.metrics import SynthesisMetrics
from common.handlers.writer import SynthesisWriter, as_numpy, case_id, loaded_files, source_file
from common.io import save_nifti
from common.metrics.masks import EMPTY_TRUTH_CONVENTION, mask_figures, voxel_ml

__all__ = ["D3MMetrics", "D3MWriter"]


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


MASK_KEYS = ("dice_et", "false_ml", "missed_ml", "true_ml", "pred_ml")


def summarize_mask_rows(rows: list[dict]) -> dict:
    """Means of :data:`MASK_KEYS` over the cases with a true ET (``with_et``) and, apart, over the
    ET-free cases (``et_free``: their ``dice_et`` is the fraction predicted empty, their
    ``false_ml`` the false-enhancement volume); each with its ``n``; plus the ``convention``."""
    out: dict = {"convention": EMPTY_TRUTH_CONVENTION}
    for group, keep in (("with_et", 0), ("et_free", 1)):
        sel = [r for r in rows if int(r["et_free"]) == keep]
        out[group] = {"n": len(sel), **{k: float(np.mean([r[k] for r in sel])) for k in MASK_KEYS if sel}}
    return out


class D3MMetrics(SynthesisMetrics):
    """:class:`common.handlers.SynthesisMetrics` on T1c (PSNR, SSIM, MAE, whole image and in each
    of ``mask_keys``, with the T1n-copy baseline and paired Wilcoxon tests), plus the ET-mask figures
    per case in ``mask_metrics.csv`` (:func:`common.metrics.mask_figures`: ``dice_et``, ``false_ml``
    = predicted ET outside the true ET in mL, ``missed_ml``, ``true_ml``, ``pred_ml``, ``et_free``,
    and ``tumour_ml``, the volume of the case's tumour region) and their means in ``summary.md`` /
    ``summary.json`` (``mask``), cases with a true ET and ET-free cases counted apart. An ET-free
    case's Dice follows the BraTS convention (:data:`common.metrics.EMPTY_TRUTH_CONVENTION`); its
    ``false_ml`` is the false-enhancement volume."""

    def __init__(self, *args, tumour_key: str = "tumour", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tumour_key = tumour_key
        self.mask_rows: list[dict] = []

    def on_iteration(self, engine) -> None:
        super().on_iteration(engine)
        for item, out in zip(engine.state.batch, engine.state.output):
            if out.get("et_mask") is None or out.get("label_mask") is None:
                continue
            p, t = as_numpy(out["et_mask"])[0] > 0.5, as_numpy(out["label_mask"])[0] > 0.5
            aff = np.asarray(getattr(item.get(self.geometry_key), "affine", np.eye(4)), dtype=np.float64)
            tum = item.get(self.tumour_key)
            row = {"case": case_id(item, self.id_key, self.geometry_key), "method": self.method}
            row.update(mask_figures(p, t, aff))
            row["tumour_ml"] = (
                float((as_numpy(tum)[0] > 0.5).sum() * voxel_ml(aff)) if tum is not None else float("nan")
            )
            self.mask_rows.append(row)

    def on_completed(self, engine) -> None:
        super().on_completed(engine)
        if not self.mask_rows:
            return
        from common.io import atomic_path, save_json
        from common.metrics import format_table, write_case_csv

        write_case_csv(self.mask_rows, self.output_dir / "mask_metrics.csv")
        summary = summarize_mask_rows(self.mask_rows)
        self.summary["mask"] = summary
        table = format_table(
            [
                {
                    "method": self.method,
                    "cases": label,
                    "n": summary[g]["n"],
                    **{k: f"{summary[g].get(k, float('nan')):.4g}" for k in MASK_KEYS},
                }
                for g, label in (("with_et", "with ET"), ("et_free", "ET-free"))
                if summary[g]["n"]
            ]
        )
        md = self.output_dir / "summary.md"
        text = (md.read_text() if md.exists() else "") + (
            "\n\nEnhancing-tumour mask (mean over cases; ET-free cases apart: their false_ml is the "
            f"false-enhancement volume; {EMPTY_TRUTH_CONVENTION})\n\n" + table + "\n"
        )
        with atomic_path(md) as tmp:
            tmp.write_text(text)
        js = self.output_dir / "summary.json"
        if js.exists():
            import json

            save_json({**json.loads(js.read_text()), "mask": summary}, js)
        print(table)
