"""iterU-Net outputs and evaluation as ignite handlers of an inference ``SupervisedEvaluator``.

Every decollated item carries, after the bundle's post-processing (inverse TI-norm), in the input's
intensity units: ``image`` the series the chain read (T', X, Y, Z), ``pred`` the predicted time
points after the start phase (S, X, Y, Z), ``label`` the real ones (S, X, Y, Z) when acquired, and
the batch's ``dce_times_s`` (T,), masks and the source file of the series.

* :class:`IterUNetWriter` -- ``<output_dir>/<case>/dce_synth.nii.gz`` (4D, the predicted phases,
  exact affine of the input series), ``kinetics.json`` (mean lesion curves and their kinetic types),
  ``panel.png`` and ``kinetics.png``.
* :class:`IterUNetMetrics` -- per phase PSNR/SSIM/MAE (whole, breast, lesion) via
  ``common.handlers.score_case``; per lesion the enhancement error per phase, SCC and DTW of the
  lesion curves and the curve-type agreement; the baselines ``copy_forward`` and ``linear`` on every
  row; paired Wilcoxon tests (``common.metrics``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events

from common.handlers.metrics import report, score_case
from common.handlers.writer import as_numpy, case_id, loaded_files, source_file
from common.inferers.iterunet import copy_forward, linear_extrapolation
from common.io import atomic_path, save_figure, save_json, save_nifti
from common.metrics import format_table, paired_wilcoxon, summarize, write_case_csv
from common.metrics.kinetic import (
    KINETIC_THRESHOLD,
    curve_spearman,
    dtw_distance,
    enhancement_error,
    kinetic_type,
    tinorm,
    tinorm_enhancement_error,
    tinorm_stats,
)
from common.visualize import best_slice, synthesis_panel

logger = logging.getLogger(__name__)

__all__ = ["IterUNetWriter", "IterUNetMetrics", "case_curves", "phase_names"]


def phase_names(times: Sequence[float], start: int) -> list[str]:
    """Names of the predicted time points: ``t<seconds>s`` for k > start."""
    return [f"t{float(t):g}s" for t in list(times)[start + 1 :]]


def _item(item: dict, out: dict, start: int, series_key: str, times_key: str):
    series = as_numpy(out["image"])
    pred = as_numpy(out["pred"])
    label = as_numpy(out["label"]) if out.get("label") is not None else None
    times = as_numpy(item[times_key]).astype(np.float64).ravel()
    return series, pred, label, times


def case_curves(
    series: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray | None,
    times: np.ndarray,
    start: int,
    lesions: np.ndarray | None,
    threshold: float = KINETIC_THRESHOLD,
    relative_to: str = "signal",
) -> dict:
    """Mean curve per lesion label (all time points): the acquired frames 0..start followed by the
    prediction, the real curve, and both baselines'; with their kinetic types.

    Args:
        series: (T', *sp) the frames read (input units); pred, label: (S, *sp); times: (T,) seconds.
        lesions: (*sp) integer label map (each label > 0 one lesion), or None (no curves).
    """
    if lesions is None:
        return {}
    acquired = series[: start + 1]
    methods = {
        "model": pred,
        "copy_forward": copy_forward(series, start, len(times)),
        "linear": linear_extrapolation(series, times, start),
    }
    out = {}
    for lab in [int(v) for v in np.unique(lesions) if v > 0]:
        m = lesions == lab
        entry = {"voxels": int(m.sum())}
        for name, p in methods.items():
            curve = np.concatenate([acquired[:, m].mean(1), p[:, m].mean(1)])
            entry[name] = {"curve": curve.tolist(), "kinetic_type": kinetic_type(curve, times, threshold, relative_to)}
        if label is not None:
            curve = np.concatenate([acquired[:, m].mean(1), label[:, m].mean(1)])
            entry["real"] = {
                "curve": curve.tolist(),
                "kinetic_type": kinetic_type(curve, times, threshold, relative_to),
            }
        out[str(lab)] = entry
    return out


_WARNED_EMPTY: set[str] = set()


def _lesions(item: dict, key: str | None) -> np.ndarray | None:
    """The integer lesion label map of ``item[key]``, ``None`` without one. A mask without any voxel
    > 0 is also ``None``, with one warning naming its file (it gives no lesion rows or curves)."""
    if not key or item.get(key) is None:
        return None
    lesions = np.rint(as_numpy(item[key])[0]).astype(np.int64)
    if not (lesions > 0).any():
        try:
            where = source_file(item, key)
        except KeyError:
            where = f"{case_id(item, 'id', key)} ({key})"
        if where not in _WARNED_EMPTY:  # the writer and the metrics both read it: one line per file
            _WARNED_EMPTY.add(where)
            logger.warning("%s: the lesion mask has no voxel > 0: no lesion curves or lesion rows for this case", where)
        return None
    return lesions


class IterUNetWriter:
    """Write ``dce_synth.nii.gz``, ``kinetics.json``, ``panel.png`` and ``kinetics.png`` per case.

    Args:
        output_dir: root of the outputs (never the input folder).
        start: the start phase index of the chain.
        series_key, times_key: batch keys of the series (its source file gives the geometry) and its times.
        lesion_key, breast_key: mask keys (optional); one curve per lesion label, or, without a lesion
            mask, one curve over the ``breast_key`` mask (e.g. ``organ_mask`` of a prostate case) labelled 1;
            without either, over the 10 % most enhancing voxels (``common.dce.enhancing_mask``, pre -> start).
        curve_threshold, curve_relative_to: the kinetic-type rule (``common.metrics.kinetic.kinetic_type``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        start: int = 1,
        series_key: str = "dce",
        times_key: str = "dce_times_s",
        lesion_key: str | None = "lesion_mask",
        breast_key: str | None = "breast_mask",
        curve_threshold: float = KINETIC_THRESHOLD,
        curve_relative_to: str = "signal",
        panel: bool = True,
    ) -> None:
        self.output_dir, self.start = Path(output_dir), int(start)
        self.series_key, self.times_key, self.lesion_key, self.breast_key = (
            series_key,
            times_key,
            lesion_key,
            breast_key,
        )
        self.threshold, self.relative_to, self.panel = float(curve_threshold), curve_relative_to, panel
        self.written: list[dict] = []

    def frame_names(self, times_s) -> list[str]:
        """The names of the predicted frames of a case whose frames are at ``times_s`` (seconds, (T,)):
        the time points after ``start``, ``t<seconds>s`` (:func:`phase_names`)."""
        return phase_names(times_s, self.start)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self.write_case(item, out)

    def write_case(self, item: dict, out: dict) -> dict:
        src = source_file(item, self.series_key)
        ref = nib.load(src)
        cid = case_id(item, "id", self.series_key)
        case_dir = self.output_dir / cid
        protect = loaded_files(item) + (src,)
        for f in protect:
            if Path(f).resolve().parent == case_dir.resolve():
                raise FileExistsError(f"{cid}: output folder {case_dir} holds the input {f}; choose another output_dir")
        series, pred, label, times = _item(item, out, self.start, self.series_key, self.times_key)
        if tuple(pred.shape[1:]) != tuple(ref.shape[:3]):
            raise ValueError(f"{cid}: prediction grid {pred.shape[1:]} differs from {src} grid {ref.shape[:3]}")
        names = phase_names(times, self.start)
        written = {
            "id": cid,
            "dce_synth": str(
                save_nifti(np.moveaxis(pred, 0, -1), ref.affine, case_dir / "dce_synth.nii.gz", protect=protect)
            ),
        }
        lesions, region = _lesions(item, self.lesion_key), self.lesion_key
        if lesions is None and self.breast_key and item.get(self.breast_key) is not None:
            lesions, region = (as_numpy(item[self.breast_key])[0] > 0.5).astype(np.int64), self.breast_key
        if lesions is None:  # no mask at all: the 10 % of the body enhancing most from pre to the start phase
            from common.dce import enhancing_mask

            lesions, region = (
                enhancing_mask(np.moveaxis(series[: self.start + 1], 0, -1), n_baseline=1).astype(np.int64),
                "enhancing",
            )
        curves = case_curves(series, pred, label, times, self.start, lesions, self.threshold, self.relative_to)
        save_json(
            {
                "id": cid,
                "times_s": times.tolist(),
                "start_phase": self.start,
                "acquired": list(range(self.start + 1)),
                "predicted_phases": names,
                "curve_region": region,
                "kinetic_rule": {"threshold": self.threshold, "relative_to": self.relative_to},
                "source": src,
                "lesions": curves,
            },
            case_dir / "kinetics.json",
        )
        written["kinetics"] = str(case_dir / "kinetics.json")
        if self.panel:
            mask = lesions if lesions is not None and lesions.any() else None
            z = best_slice(pred.shape[1:], mask)
            inputs = {"pre": series[0][..., z], f"acquired t{times[self.start]:g}s": series[self.start][..., z]}
            outputs = {n: pred[c][..., z] for c, n in enumerate(names)}
            targets = {n: label[c][..., z] for c, n in enumerate(names)} if label is not None else None
            written["panel"] = synthesis_panel(
                case_dir / "panel.png", inputs, outputs, targets, title=f"{cid}  slice {z}"
            )
            written["kinetics_png"] = self.plot_curves(curves, times, case_dir / "kinetics.png", cid)
        self.written.append(written)
        logger.info("%s: wrote %s", cid, ", ".join(f"{k}={v}" for k, v in written.items() if k != "id"))
        return written

    def plot_curves(self, curves: dict, times: np.ndarray, path: Path, cid: str) -> str:
        import matplotlib.pyplot as plt

        n = max(1, len(curves))
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
        styles = {
            "real": ("k", "-o"),
            "model": ("tab:red", "-s"),
            "copy_forward": ("tab:gray", "--"),
            "linear": ("tab:blue", ":"),
        }
        for ax, (lab, entry) in zip(axes[0], curves.items()):
            for name, (color, fmt) in styles.items():
                if name in entry:
                    ax.plot(
                        times, entry[name]["curve"], fmt, color=color, label=f"{name} ({entry[name]['kinetic_type']})"
                    )
            ax.axvline(times[self.start], color="0.7", lw=0.8)
            ax.set_title(f"lesion {lab}", fontsize=9)
            ax.set_xlabel("time (s)")
            ax.legend(fontsize=6)
        if not curves:
            axes[0, 0].text(0.5, 0.5, "no lesion mask", ha="center")
        fig.suptitle(cid, fontsize=9)
        save_figure(fig, path)
        return str(path)


class IterUNetMetrics:
    """Score the model and the baselines ``copy_forward`` and ``linear`` against the real phases.

    Writes, in ``output_dir``: ``metrics.csv`` / ``summary.{csv,md,json}`` (image metrics per phase and
    region, ``common.handlers.metrics.report``) and ``kinetics.csv`` / ``kinetics_summary.{md,json}``
    (per lesion: ``enh_err_<phase>`` the squared error of the mean lesion intensity, ``enh_err`` their
    mean, ``scc`` Spearman and ``dtw`` DTW distance of the whole curve against the real one, ``type_agree``
    1/0; with Wilcoxon tests and a curve-type confusion matrix per method).

    Units of the lesion metrics (the paper's): ``enh_err*``, ``scc`` and ``dtw`` are computed on
    TI-normalised intensities, ``(x - mu) / sigma`` with the case's TI-norm statistics (the ones the
    bundle's ``TINormd`` stored under ``<series_key>_tinorm``; else recomputed from the series with
    ``tinorm_ref_index`` / ``tinorm_mask_key``, :func:`common.metrics.kinetic.tinorm_stats`).
    The raw-unit figures of earlier versions (input intensity units) are kept as ``enh_err_raw`` and
    ``dtw_raw`` (SCC is the same in both units).

    Args:
        lesion_metrics: ask for the lesion metrics; then a case without ``lesion_key`` is an error
            naming its series file.
    """

    BASELINES = ("copy_forward", "linear")

    def __init__(
        self,
        output_dir: str | os.PathLike,
        start: int = 1,
        method: str = "iterunet",
        series_key: str = "dce",
        times_key: str = "dce_times_s",
        lesion_key: str = "lesion_mask",
        breast_key: str | None = "breast_mask",
        lesion_metrics: bool = True,
        curve_threshold: float = KINETIC_THRESHOLD,
        curve_relative_to: str = "signal",
        tinorm_ref_index: int = 1,
        tinorm_mask_key: str | None = None,
    ) -> None:
        self.tinorm_ref_index, self.tinorm_mask_key = int(tinorm_ref_index), tinorm_mask_key
        self.output_dir, self.start, self.method = Path(output_dir), int(start), method
        self.series_key, self.times_key, self.lesion_key, self.breast_key = (
            series_key,
            times_key,
            lesion_key,
            breast_key,
        )
        self.lesion_metrics, self.threshold, self.relative_to = (
            bool(lesion_metrics),
            float(curve_threshold),
            curve_relative_to,
        )
        self.rows: list[dict] = []
        self.kinetic_rows: list[dict] = []
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.COMPLETED, self.on_completed)

    def on_iteration(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self.score(item, out)

    def score(self, item: dict, out: dict) -> None:
        cid = case_id(item, "id", self.series_key)
        if out.get("label") is None:
            logger.warning("%s: no real phases after the start phase: not scored", cid)
            return
        series, pred, label, times = _item(item, out, self.start, self.series_key, self.times_key)
        lesions = _lesions(item, self.lesion_key)
        if self.lesion_metrics and lesions is None and item.get(self.lesion_key) is None:
            raise FileNotFoundError(
                f"{source_file(item, self.series_key)}: no lesion mask ({self.lesion_key}.nii.gz beside it or "
                f"in the datalist) for the lesion metrics; add it or pass --lesion_metrics false"
            )
        names = phase_names(times, self.start)
        methods = {
            self.method: pred,
            "copy_forward": copy_forward(series, self.start, len(times)),
            "linear": linear_extrapolation(series, times, self.start),
        }
        masks = {}
        if self.breast_key and item.get(self.breast_key) is not None:
            masks[self.breast_key] = as_numpy(item[self.breast_key])[0] > 0.5
        if lesions is not None:
            masks[self.lesion_key] = lesions > 0
        ref = np.repeat(series[:1], len(names), axis=0)
        for name, p in methods.items():
            for row in score_case(p, label, masks, names, ref):
                self.rows.append({"case": cid, "method": name, **row})
        if lesions is None:
            return
        curves = case_curves(series, pred, label, times, self.start, lesions, self.threshold, self.relative_to)
        key = {self.method: "model", "copy_forward": "copy_forward", "linear": "linear"}
        mu, sigma = self.tinorm_stats(item, out, series)
        for lab, entry in curves.items():
            m = lesions == int(lab)
            real = entry["real"]
            for name, p in methods.items():
                c = entry[key[name]]
                row = {"case": f"{cid}/lesion{lab}", "method": name}
                errs = {
                    f"enh_err_{n}": tinorm_enhancement_error(p[s], label[s], m, mu, sigma) for s, n in enumerate(names)
                }
                row.update(errs)
                row["enh_err"] = float(np.mean(list(errs.values())))
                row["scc"] = curve_spearman(tinorm(c["curve"], mu, sigma), tinorm(real["curve"], mu, sigma))
                row["dtw"] = dtw_distance(tinorm(c["curve"], mu, sigma), tinorm(real["curve"], mu, sigma))
                row["enh_err_raw"] = float(np.mean([enhancement_error(p[s], label[s], m) for s in range(len(names))]))
                row["dtw_raw"] = dtw_distance(c["curve"], real["curve"])
                row["type_agree"] = float(c["kinetic_type"] == real["kinetic_type"])
                row["type_real"], row["type_pred"] = real["kinetic_type"], c["kinetic_type"]
                self.kinetic_rows.append(row)

    def tinorm_stats(self, item: dict, out: dict, series: np.ndarray) -> tuple[float, float]:
        """The case's TI-norm ``(mean, std)``: as stored by ``TINormd`` (``<series_key>_tinorm`` in the
        output or the batch), else recomputed from ``series`` (input units) by the same rule."""
        stats = out.get(f"{self.series_key}_tinorm") or item.get(f"{self.series_key}_tinorm")
        if isinstance(stats, dict) and "mean" in stats and "std" in stats:
            return float(as_numpy(stats["mean"]).ravel()[0]), float(as_numpy(stats["std"]).ravel()[0])
        mask = None
        if self.tinorm_mask_key and item.get(self.tinorm_mask_key) is not None:
            mask = as_numpy(item[self.tinorm_mask_key])[0] > 0.5
        return tinorm_stats(series, self.tinorm_ref_index, mask)

    def on_completed(self, engine: Engine) -> None:
        if not self.rows:
            logger.warning("no case had real phases after the start phase: nothing to evaluate")
            return
        # the network precision the inferer ran at, for provenance (as common.handlers.metrics records it)
        precision = getattr(getattr(engine, "inferer", None), "precision_used", None)
        self.summary = report(self.rows, self.output_dir, self.method, self.BASELINES, precision=precision)
        if self.kinetic_rows:
            self.summary["kinetics"] = kinetic_report(self.kinetic_rows, self.output_dir, self.method, self.BASELINES)


def kinetic_report(rows: list[dict], output_dir: Path, method: str, baselines: Sequence[str]) -> dict:
    """kinetics.csv, kinetics_summary.md/.json: mean +- std per method, Wilcoxon vs each baseline,
    curve-type confusion matrices (rows real type, columns predicted)."""
    write_case_csv(rows, output_dir / "kinetics.csv")
    metrics = [k for k in rows[0] if k not in ("case", "method", "type_real", "type_pred")]
    by = {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}
    summary = {m: summarize(rs, metrics) for m, rs in by.items()}
    tests = {f"{method} vs {b}": paired_wilcoxon(by[method], by[b], metrics) for b in baselines if b in by}
    types = ("I", "II", "III")
    confusion = {
        m: [[sum(1 for r in rs if r["type_real"] == a and r["type_pred"] == b) for b in types] for a in types]
        for m, rs in by.items()
    }
    table = [
        {
            "method": m,
            "n": len(rs),
            **{
                k: f"{summary[m][k]['mean']:.4g} ± {summary[m][k]['std']:.2g}"
                for k in ("enh_err", "scc", "dtw", "type_agree")
            },
        }
        for m, rs in by.items()
    ]
    md = format_table(table)
    md += "\n\nWilcoxon (model vs baseline, p-values): " + "; ".join(
        f"{k}: " + ", ".join(f"{m} p={v[m]['pvalue']:.3g}" for m in ("enh_err", "dtw")) for k, v in tests.items()
    )
    md += "\n\nCurve types (rows real I/II/III, columns predicted): " + "; ".join(
        f"{m} {c}" for m, c in confusion.items()
    )
    with atomic_path(output_dir / "kinetics_summary.md") as tmp:
        tmp.write_text(md + "\n")
    out = {"summary": summary, "wilcoxon": tests, "confusion": confusion, "types": list(types)}
    save_json(out, output_dir / "kinetics_summary.json")
    print(md)
    return out
