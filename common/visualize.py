"""PNG panels a person looks at: inputs, synthesised outputs, targets and error maps of one slice."""

from __future__ import annotations

import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.io import save_figure  # noqa: E402


def _window(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


#: colours of the outlines drawn by :func:`synthesis_panel` (``contours``), in order.
CONTOUR_COLOURS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00")


def _draw_contours(ax, masks: Mapping[str, np.ndarray]) -> None:
    from matplotlib.lines import Line2D

    handles = []
    for (label, mask), colour in zip(masks.items(), CONTOUR_COLOURS):
        m = np.rot90(np.asarray(mask, dtype=np.float32))
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=[colour], linewidths=0.8)
        handles.append(Line2D([], [], color=colour, lw=1.2, label=f"{label} ({int(np.asarray(mask).sum())} px)"))
    ax.legend(handles=handles, loc="upper left", fontsize=5, framealpha=0.6, borderpad=0.3, handlelength=1.2)


def best_slice(volume_shape: tuple[int, ...], mask: np.ndarray | None = None) -> int:
    """Index along the last axis to show: the slice with the largest mask area, else the middle one."""
    if mask is not None and np.any(mask):
        return int(np.argmax(np.asarray(mask).reshape(-1, mask.shape[-1]).sum(0)))
    return volume_shape[-1] // 2


def synthesis_panel(
    path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray] | None = None,
    title: str = "",
    contours: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> str:
    """Write a PNG grid of 2D slices.

    Row 1: the inputs. Row 2: the synthesised outputs. With targets, row 3: the targets (windowed
    like the outputs of the same name) and row 4: absolute error |output - target|.

    Args:
        path: PNG file, written atomically.
        inputs, outputs, targets: name -> 2D array (H, W), already the slice to show.
        contours: output name -> {legend label: 2D boolean mask (H, W)}: each mask's outline is drawn
            on that output's synthesised and target images (e.g. the predicted and the true
            enhancing-tumour mask), in :data:`CONTOUR_COLOURS` order, with a legend.
    """
    targets = targets or {}
    rows = [("input", dict(inputs)), ("synthesised", dict(outputs))]
    if targets:
        rows.append(("target", dict(targets)))
        rows.append(("|error|", {k: np.abs(outputs[k] - targets[k]) for k in outputs if k in targets}))
    ncols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.7 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(images):
                continue
            name, img = list(images.items())[c]
            img = np.rot90(np.asarray(img, dtype=np.float32))  # NIfTI (x, y) -> display rows
            if label == "|error|":
                ref = targets[name] if name in targets else img
                vmin, vmax = 0.0, _window(np.asarray(ref))[1] * 0.5
                cmap = "magma"
            elif label in ("synthesised", "target") and name in targets:
                vmin, vmax = _window(np.asarray(targets[name]))
                cmap = "gray"
            else:
                vmin, vmax = _window(img)
                cmap = "gray"
            ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(f"{label}: {name}", fontsize=8)
            if label in ("synthesised", "target") and name in (contours or {}):
                _draw_contours(ax, contours[name])
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return str(path)
