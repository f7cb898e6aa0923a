"""Evaluation of synthesised volumes next to their trivial baselines, whole image and inside masks.

:class:`SynthesisMetrics` is an ignite handler for an inference evaluator. For every case with a
target it scores the model and each trivial baseline (e.g. the pre-contrast frame copied through,
or the paired input channel) per output channel (phase) and per region (whole image and each
non-empty mask), and at the end writes a per-case CSV (long format), a summary (mean +- std), a
paired Wilcoxon test of the model against each baseline, and prints the table.

Intensity normalisation for scoring, per case and per phase: the target phase's ``percentiles``
are mapped to [0, 1], the prediction and baselines of that phase go through the same map, and
PSNR/SSIM use ``data_range = 1`` (:func:`channel_ranges`). A phase's figures therefore depend on
that phase alone: a method that synthesises two phases and one that synthesises three score a
shared phase identically, and figures are comparable between cases. The enhancement metrics
(``enh_rel_err``, ``enh_corr``) do not depend on the scale at all.

Evaluation protocol (``common.metrics.protocols``): ``protocol="ours"`` (default) scores each case as
one 3D volume (``scoring="volume"``) and tests the model against each baseline with a paired Wilcoxon
test; ``protocol="paper"`` with the bundle's name takes the paper's scoring and statistics from
:data:`common.metrics.protocols.PAPER_PROTOCOLS` (e.g. Res-SRDiff: per 2D slice, Shapiro-Wilk ->
Kruskal-Wallis + Dunn/Bonferroni or ANOVA + Tukey). With ``scoring="slice"`` every scored axial slice
(last axis) is one row (column ``slice``) and mean +- std run over all slices of all cases; which
slices are scored is :func:`scored_slices`. The intensity normalisation is the same per-case map in
both scorings.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from ignite.engine import Engine, Events

from common.handlers.writer import as_numpy, case_id
from common.io import save_json
from common.metrics import (
    format_table,
    gmsd,
    mae,
    paired_wilcoxon,
    psnr,
    read_case_csv,
    ssim,
    summarize,
    write_case_csv,
)
from common.metrics.protocols import resolve_protocol
from common.metrics.stats import group_comparison

logger = logging.getLogger(__name__)


METRICS = {"psnr": psnr, "ssim": ssim, "mae": mae, "gmsd": gmsd}
BODY_THRESHOLD = 0.05
MIN_BODY_FRACTION = 0.01


def target_range(target: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """``(lo, scale)`` that map the ``percentiles`` of one target image (any shape) to [0, 1]: the
    image and its predictions are scored as ``(image - lo) / scale`` (scale 1 for a constant target)."""
    lo, hi = np.percentile(target, percentiles)
    return float(lo), (float(hi - lo) if hi > lo else 1.0)


def channel_ranges(target: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[np.ndarray, np.ndarray]:
    """Per phase :func:`target_range`: ``target`` (C, ...) -> ``(lo, scale)``, each (C, 1, ..., 1),
    so that ``(image - lo) / scale`` maps channel c of any (C, ...) image with channel c's range."""
    ranges = np.array([target_range(t, percentiles) for t in target], dtype=np.float64)
    shape = (len(target),) + (1,) * (target.ndim - 1)
    return ranges[:, 0].reshape(shape), ranges[:, 1].reshape(shape)


def score_case(
    pred: np.ndarray,
    target: np.ndarray,
    masks: Mapping[str, np.ndarray],
    names: Sequence[str],
    reference: np.ndarray | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    metrics: Sequence[str] = ("psnr", "ssim", "mae"),
    whole_image_metrics: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] | None = None,
    scoring: str = "volume",
    slice_mask: np.ndarray | None = None,
    body_threshold: float = BODY_THRESHOLD,
    min_body_fraction: float = MIN_BODY_FRACTION,
) -> list[dict]:
    """Metrics of one prediction against its target, over the whole volume or per 2D slice.

    Args:
        pred, target: (C, H, W, D) in the same (original) units.
        masks: region name -> (H, W, D) boolean mask; empty masks are skipped.
        names: one name per channel.
        metrics: any of ``psnr``, ``ssim``, ``mae``, ``gmsd`` (all with ``data_range = 1`` on the
            normalised images).
        reference: optional (C, H, W, D) pre-contrast image; adds two enhancement metrics on
            ``E = image - reference``: ``enh_rel_err = sum|E_pred - E_true| / sum|E_true|`` (1.0
            exactly for the pre-contrast copied through, 0 for a perfect prediction; the share of
            the true enhancement the prediction misses) and ``enh_corr``, the Pearson correlation
            of predicted and true enhancement (nan when the prediction has no enhancement).
        whole_image_metrics: name -> ``f(pred, target)`` on one normalised (H, W, D) channel, scored
            on the whole image only (e.g. LPIPS, see :func:`lpips_metric`).
        scoring: ``volume`` (one row per phase and region over the whole volume) or ``slice`` (one
            row per phase, region and scored axial slice, with its index in ``"slice"``; the slices
            are :func:`scored_slices` of the normalised target, and a region is scored on the slices
            where its mask has a voxel). The normalisation is the per-case map in both.
        slice_mask, body_threshold, min_body_fraction: the slice rule of :func:`scored_slices`.

    Returns:
        rows ``{"phase", "region"[, "slice"], "psnr", "ssim", "mae"[, "enh_rel_err", "enh_corr"]}``.
    """
    if scoring not in ("volume", "slice"):
        raise ValueError(f"--scoring: expected 'volume' or 'slice', got {scoring!r}")
    lo, scale = channel_ranges(target, percentiles)
    t = (target - lo) / scale
    p = (pred - lo) / scale
    r = None if reference is None else (reference - lo) / scale
    regions: dict[str, np.ndarray | None] = {"whole": None}
    regions.update({k: m.astype(bool) for k, m in masks.items() if m is not None and np.any(m)})
    if scoring == "slice":
        zs = scored_slices(t, slice_mask, body_threshold, min_body_fraction)
        return _score_slices(p, t, r, regions, names, metrics, whole_image_metrics, zs)
    rows = []
    for c, name in enumerate(names):
        for region, mask in regions.items():
            row = {"phase": name, "region": region}
            for m in metrics:
                row[m] = float(METRICS[m](p[c], t[c], data_range=1.0, mask=mask))
            if mask is None:
                for m, fn in (whole_image_metrics or {}).items():
                    row[m] = float(fn(p[c], t[c]))
            if r is not None:
                row.update(enhancement_scores(p[c] - r[c], t[c] - r[c], mask))
            rows.append(row)
    return rows


def scored_slices(
    target: np.ndarray,
    slice_mask: np.ndarray | None = None,
    body_threshold: float = BODY_THRESHOLD,
    min_body_fraction: float = MIN_BODY_FRACTION,
) -> list[int]:
    """The axial slices (last axis) that per-slice scoring counts: slices outside the body or organ
    are excluded, as the papers that score per slice do.

    Rule: with ``slice_mask`` (H, W, D) (e.g. the organ or brain mask), a slice is scored when the
    mask has at least one voxel in it. Without one, a voxel is *body* when the normalised target (any
    phase; 0 and 1 are the target's 0.5th and 99.5th percentiles) exceeds ``body_threshold`` (0.05:
    5 % of that range), and a slice is scored when at least ``min_body_fraction`` (0.01) of its
    voxels are body; air-only slices at the ends of the stack are left out.

    Args:
        target: normalised target (C, H, W, D) or (H, W, D).

    Returns:
        the scored slice indices, increasing.
    """
    t = np.asarray(target)
    t = t if t.ndim == 4 else t[None]
    if slice_mask is not None:
        m = np.asarray(slice_mask).astype(bool)
        if m.shape != t.shape[1:]:
            raise ValueError(f"slice mask shape {m.shape} differs from the image's {t.shape[1:]}")
        return [int(z) for z in np.nonzero(m.any(axis=(0, 1)))[0]]
    body = (t > body_threshold).any(axis=0)
    return [int(z) for z in np.nonzero(body.mean(axis=(0, 1)) >= min_body_fraction)[0]]


def _score_slices(p, t, r, regions, names, metrics, whole_image_metrics, zs) -> list[dict]:
    """Per-slice rows of :func:`score_case` (normalised (C, H, W, D) arrays, scored slices ``zs``)."""
    rows = []
    for c, name in enumerate(names):
        pc, tc = np.moveaxis(p[c], -1, 0)[:, None], np.moveaxis(t[c], -1, 0)[:, None]  # (D, 1, H, W)
        for region, mask in regions.items():
            zr = zs if mask is None else [z for z in zs if mask[..., z].any()]
            if not zr:
                continue
            mz = None if mask is None else np.moveaxis(mask, -1, 0)[zr][:, None]
            vals = {m: np.atleast_1d(METRICS[m](pc[zr], tc[zr], data_range=1.0, mask=mz)) for m in metrics}
            for i, z in enumerate(zr):
                row = {"phase": name, "region": region, "slice": int(z)}
                row.update({m: float(v[i]) for m, v in vals.items()})
                if mask is None:
                    for m, fn in (whole_image_metrics or {}).items():
                        row[m] = float(fn(p[c][..., z : z + 1], t[c][..., z : z + 1]))
                if r is not None:
                    ms = None if mask is None else mask[..., z]
                    row.update(enhancement_scores(p[c][..., z] - r[c][..., z], t[c][..., z] - r[c][..., z], ms))
                rows.append(row)
    return rows


def lpips_metric(weights_path: str | os.PathLike) -> Callable[[np.ndarray, np.ndarray], float]:
    """LPIPS (:class:`common.metrics.perceptual.LPIPS`, from a LOCAL weights file: AlexNet trunk as
    Res-SRDiff's released code scores it, or VGG16, whichever the file holds) of two normalised
    volumes (H, W, D) in [0, 1]: the mean over axial slices of the per-slice distance. Only AlexNet
    figures are comparable with the paper's."""
    import torch

    from common.metrics.perceptual import LPIPS

    net = LPIPS(weights_path, data_range=1.0)

    def lpips(pred: np.ndarray, target: np.ndarray) -> float:
        x = torch.as_tensor(np.moveaxis(pred, -1, 0)[:, None], dtype=torch.float32)
        y = torch.as_tensor(np.moveaxis(target, -1, 0)[:, None], dtype=torch.float32)
        with torch.inference_mode():
            return float(net(x, y).mean())

    return lpips


def enhancement_scores(e_pred: np.ndarray, e_true: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """``enh_rel_err`` and ``enh_corr`` of a predicted vs. true enhancement map, inside ``mask``."""
    ep, et = (e_pred, e_true) if mask is None else (e_pred[mask], e_true[mask])
    ep, et = ep.astype(np.float64).ravel(), et.astype(np.float64).ravel()
    denom = np.abs(et).sum()
    rel = float(np.abs(ep - et).sum() / denom) if denom > 0 else float("nan")
    corr = float(np.corrcoef(ep, et)[0, 1]) if ep.std() > 0 and et.std() > 0 else float("nan")
    return {"enh_rel_err": rel, "enh_corr": corr}


class SynthesisMetrics:
    """Score each case's ``pred`` and ``baseline_<name>`` outputs against ``label``; report at the end.

    Args:
        output_dir: where ``metrics.csv``, ``summary.csv``, ``summary.md`` and ``summary.json`` go.
        output_names: one name per output channel.
        baselines: names of the trivial baselines present as ``baseline_<name>`` in the outputs.
        mask_keys: datalist keys of masks to score inside (skipped when absent or empty).
        enhancement_reference: output key holding the pre-contrast image per channel (e.g.
            ``"baseline_copy_pre"``) for the enhancement error; ``None`` disables it.
        method: the model's name in the tables. With ``num_samples > 1`` the model row scores the mean
            of the draws and a ``<method>_first_draw`` row the first draw alone (``pred_first``),
            the figure comparable with single-sample papers.
        metrics: image metrics to compute (see :func:`score_case`); ``lpips`` (whole image) needs
            ``lpips_weights``, a local LPIPS file (AlexNet, as the paper, or VGG16).
        lpips_weights: path of the LPIPS weights (only with ``lpips`` in ``metrics``).
        protocol: ``ours`` (default: volume scoring, paired Wilcoxon) or ``paper`` (the scoring and
            statistics of ``bundle``'s paper, :data:`common.metrics.protocols.PAPER_PROTOCOLS`).
        bundle: the bundle's name (``resdce``, ``dcediff``, ``ressrdiff``, ``d3m``, ``iterunet``).
        scoring, statistics: override the protocol's ``volume|slice`` and ``wilcoxon|kruskal_dunn``.
        slice_mask_key: with slice scoring, the datalist mask whose slices are scored (e.g.
            ``"organ_mask"``); ``None``: the body rule of :func:`scored_slices`.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_names: Sequence[str],
        baselines: Sequence[str] = (),
        mask_keys: Sequence[str] = ("organ_mask", "lesion_mask"),
        enhancement_reference: str | None = None,
        method: str = "model",
        id_key: str = "id",
        geometry_key: str = "image",
        metrics: Sequence[str] = ("psnr", "ssim", "mae"),
        lpips_weights: str | os.PathLike | None = None,
        protocol: str = "ours",
        bundle: str | None = None,
        scoring: str | None = None,
        statistics: str | None = None,
        slice_mask_key: str | None = None,
    ) -> None:
        self.protocol = resolve_protocol(protocol, bundle, scoring, statistics)
        self.slice_mask_key = slice_mask_key
        unknown = [m for m in metrics if m not in METRICS and m != "lpips"]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {sorted([*METRICS, 'lpips'])}")
        self.whole_image_metrics = {}
        if "lpips" in metrics:
            if not lpips_weights:
                raise ValueError(
                    "--metrics lists lpips, which needs pretrained weights: pass --lpips_weights <local .pth> "
                    "(LPIPS VGG16 + linear heads; nothing is downloaded, see common/metrics/perceptual.py)"
                )
            self.whole_image_metrics["lpips"] = lpips_metric(lpips_weights)
        self.metrics = [m for m in metrics if m != "lpips"]
        self.output_dir = Path(output_dir)
        self.output_names = list(output_names)
        self.baselines = list(baselines)
        self.mask_keys = list(mask_keys)
        self.enhancement_reference = enhancement_reference
        self.method = method
        self.id_key = id_key
        self.geometry_key = geometry_key
        self.rows: list[dict] = []
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.COMPLETED, self.on_completed)

    def on_iteration(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            if out.get("label") is None:
                continue
            cid = case_id(item, self.id_key, self.geometry_key)
            target = as_numpy(out["label"])
            masks = {k: as_numpy(item[k])[0] > 0.5 for k in self.mask_keys if item.get(k) is not None}
            ref = self._lookup(out, item, self.enhancement_reference) if self.enhancement_reference else None
            ref = None if ref is None else as_numpy(ref)
            slice_mask = None
            if self.protocol["scoring"] == "slice" and self.slice_mask_key:
                if item.get(self.slice_mask_key) is None:
                    raise KeyError(f"{cid}: --slice_mask_key {self.slice_mask_key!r} is not in the case's data")
                slice_mask = as_numpy(item[self.slice_mask_key])[0] > 0.5
            methods = {
                self.method: out["pred"],
                **({f"{self.method}_first_draw": out["pred_first"]} if out.get("pred_first") is not None else {}),
                **{b: self._lookup(out, item, f"baseline_{b}") for b in self.baselines},
            }
            for name, pred in methods.items():
                if pred is None:
                    raise KeyError(
                        f"{cid}: baseline {name!r} (key 'baseline_{name}') is in neither the output nor the batch"
                    )
                for row in score_case(
                    as_numpy(pred),
                    target,
                    masks,
                    self.output_names,
                    ref,
                    metrics=self.metrics,
                    whole_image_metrics=self.whole_image_metrics,
                    scoring=self.protocol["scoring"],
                    slice_mask=slice_mask,
                ):
                    self.rows.append({"case": cid, "method": name, **row})

    @staticmethod
    def _lookup(out: dict, item: dict, key: str):
        """A post-processed output key, else the same key of the batch (e.g. a baseline a transform made)."""
        return out[key] if out.get(key) is not None else item.get(key)

    def on_completed(self, engine: Engine) -> None:
        if not self.rows:
            logger.warning("no case had a target: nothing to evaluate")
            return
        # the network precision the inferer ran at (common.device.resolve_precision), for provenance
        precision = getattr(getattr(engine, "inferer", None), "precision_used", None)
        self.summary = report(
            self.rows, self.output_dir, self.method, self.baselines, self.protocol, precision=precision
        )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.metrics.lock`` (POSIX ``flock``), so two evaluations that
    finish at once into one folder merge one after the other."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".metrics.lock", "a") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_rows(earlier: list[dict], rows: list[dict]) -> tuple[list[dict], list[str], list[str]]:
    """Per-case rows of an earlier evaluation in the same folder, plus this one's.

    A case scored now replaces its earlier rows (the same ``case`` id, any method); other cases of
    the earlier file are kept. Returns ``(merged, kept ids, replaced ids)``."""
    now = {r["case"] for r in rows}
    before = {str(r.get("case")) for r in earlier}
    kept = [r for r in earlier if str(r.get("case")) not in now]
    return kept + list(rows), sorted(before - now), sorted(before & now)


def report(
    rows: list[dict],
    output_dir: str | os.PathLike,
    method: str,
    baselines: Sequence[str],
    protocol: Mapping[str, str] | None = None,
    precision: str | None = None,
) -> dict:
    """Write metrics.csv / summary.{csv,md,json} and print the model-vs-baseline table; return the summary.
    ``precision`` (e.g. ``"bf16 channels_last"``), when given, is written under the table of
    ``summary.md`` and as ``"precision"`` in ``summary.json``.

    An existing ``metrics.csv`` in ``output_dir`` (an evaluation of other cases into the same folder)
    is merged, under a lock, with this one's rows (:func:`merge_rows`), and the summary covers all
    cases; what was kept and replaced is logged. Earlier rows of the other scoring (per slice vs per
    volume) are not merged: they are replaced, with a warning.

    ``protocol`` (:func:`common.metrics.protocols.resolve_protocol`; default ours) is recorded in
    summary.json. The paired Wilcoxon tests (pairs: the same case, and in slice scoring the same
    slice) are always written under ``"wilcoxon"``; with ``statistics="kruskal_dunn"`` the group
    comparison of all methods per phase, region and metric
    (:func:`common.metrics.stats.group_comparison`) is added under ``"group_tests"`` and to summary.md."""
    output_dir = Path(output_dir)
    protocol = dict(protocol) if protocol is not None else resolve_protocol()
    with _locked(output_dir):
        if (output_dir / "metrics.csv").is_file():
            earlier = read_case_csv(output_dir / "metrics.csv")
            if earlier and rows and (any("slice" in r for r in earlier) != any("slice" in r for r in rows)):
                logger.warning(
                    "%s: the earlier evaluation in this folder used the other scoring (per slice / per volume): replaced",
                    output_dir / "metrics.csv",
                )
                earlier = []
            rows, kept, replaced = merge_rows(earlier, rows)
            if kept:
                logger.warning(
                    "%s: kept %d case(s) of an earlier evaluation in this folder (%s)%s",
                    output_dir / "metrics.csv",
                    len(kept),
                    ", ".join(kept),
                    f"; re-scored {', '.join(replaced)}" if replaced else "",
                )
        return _report(rows, output_dir, method, baselines, protocol, precision)


def _unit(r: Mapping) -> str:
    """The pairing unit of a row: its case, and its slice in slice scoring."""
    return f"{r['case']}/z{int(float(r['slice']))}" if r.get("slice") not in (None, "") else str(r["case"])


def _report(
    rows: list[dict],
    output_dir: Path,
    method: str,
    baselines: Sequence[str],
    protocol: Mapping[str, str],
    precision: str | None = None,
) -> dict:
    metric_names = [
        k for k in ("psnr", "ssim", "mae", "gmsd", "lpips", "enh_rel_err", "enh_corr") if any(k in r for r in rows)
    ]
    write_case_csv(rows, output_dir / "metrics.csv")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["phase"], r["region"]), []).append(r)
    table, summary = [], {}
    for (m, phase, region), rs in groups.items():
        stats = summarize(rs, metric_names)
        summary[f"{m}/{phase}/{region}"] = stats
        table.append(
            {
                "method": m,
                "phase": phase,
                "region": region,
                "n": len(rs),
                **{k: f"{stats[k]['mean']:.4g} ± {stats[k]['std']:.2g}" for k in metric_names},
            }
        )
    tests = {}
    for b in baselines:
        for phase, region in {(r["phase"], r["region"]) for r in rows}:
            a = sorted(
                (r for r in rows if r["method"] == method and r["phase"] == phase and r["region"] == region),
                key=_unit,
            )
            c = sorted(
                (r for r in rows if r["method"] == b and r["phase"] == phase and r["region"] == region),
                key=_unit,
            )
            if len(a) == len(c) and a:
                a = [{**r, "unit": _unit(r)} for r in a]
                c = [{**r, "unit": _unit(r)} for r in c]
                tests[f"{method} vs {b}/{phase}/{region}"] = paired_wilcoxon(a, c, metric_names, case_key="unit")
    group_tests: dict = {}
    if protocol.get("statistics") == "kruskal_dunn":
        for phase, region in sorted({(r["phase"], r["region"]) for r in rows}):
            sel = [r for r in rows if r["phase"] == phase and r["region"] == region]
            methods = list(dict.fromkeys(r["method"] for r in sel))
            group_tests[f"{phase}/{region}"] = {
                k: group_comparison({m: [v.get(k) for v in sel if v["method"] == m] for m in methods})
                for k in metric_names
            }
    table.sort(key=lambda r: (r["phase"], r["region"], r["method"] != method, r["method"]))
    md = format_table(table)
    md += (
        f"\n\nProtocol: {protocol.get('protocol')} ({protocol.get('bundle') or 'any bundle'}): "
        f"scoring {protocol.get('scoring')}, statistics {protocol.get('statistics')}; "
        f"normalisation {protocol.get('normalisation')}"
    )
    if group_tests:
        md += "\n\n" + _group_lines(group_tests, method)
    (output_dir).mkdir(parents=True, exist_ok=True)
    write_case_csv(table, output_dir / "summary.csv")
    from common.io import atomic_path

    with atomic_path(output_dir / "summary.md") as tmp:
        tmp.write_text(md + "\n" + (f"\nNetwork precision: {precision}\n" if precision else ""))
    out = {"summary": summary, "wilcoxon": tests, "protocol": dict(protocol)}
    if group_tests:
        out["group_tests"] = group_tests
    if precision:
        out["precision"] = precision
    save_json(out, output_dir / "summary.json")
    print(md)
    print(f"\nper-case metrics: {output_dir / 'metrics.csv'}\nsummary: {output_dir / 'summary.md'}")
    return {**out, "table": table}


def _group_lines(group_tests: Mapping[str, Mapping[str, dict]], method: str) -> str:
    """One markdown line per phase/region and metric: the test, its omnibus p and the adjusted p of
    the model against every other method."""
    lines = ["Group tests (Shapiro-Wilk -> ANOVA + Tukey HSD, else Kruskal-Wallis + Dunn/Bonferroni):"]
    for where, per_metric in group_tests.items():
        for k, g in per_metric.items():
            pairs = [
                f"vs {name.split(' vs ')[1] if name.startswith(method + ' vs ') else name.split(' vs ')[0]} "
                f"p_adj={v['pvalue_adj']:.3g}"
                for name, v in g["pairs"].items()
                if method in name.split(" vs ")
            ]
            lines.append(
                f"- {where} {k}: {g['test']} p={g['omnibus']['pvalue']:.3g}"
                + (f"; {method} " if pairs else "")
                + ", ".join(pairs)
            )
    return "\n".join(lines)
