"""Ignite handlers that write what a person keeps: NIfTI outputs with exact geometry and PNG panels."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from common.io import save_nifti
from common.visualize import best_slice, synthesis_panel

logger = logging.getLogger(__name__)


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def source_file(item: dict, key: str) -> str:
    """Path of the file ``item[key]`` was loaded from (MONAI keeps it in the MetaTensor's meta)."""
    value = item.get(key)
    meta = getattr(value, "meta", None) or item.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    if isinstance(value, (str, os.PathLike)):
        name = value
    if not name:
        raise KeyError(f"cannot find the source file of {key!r} in the batch (keys: {sorted(item)})")
    return str(name)


def case_id(item: dict, id_key: str, geometry_key: str) -> str:
    cid = item.get(id_key)
    if isinstance(cid, (list, tuple)):
        cid = cid[0]
    if not cid:
        cid = Path(source_file(item, geometry_key)).parent.name
    # an id is a folder name below the output root, never a path that could lead elsewhere
    return Path(str(cid)).name


def loaded_files(item: dict) -> tuple[str, ...]:
    """Every file the case's data were loaded from (inputs, targets, masks): none may be overwritten."""
    files = []
    for value in item.values():
        meta = getattr(value, "meta", None)
        name = meta.get("filename_or_obj") if isinstance(meta, dict) else None
        if isinstance(name, str) and name:
            files.append(name)
    return tuple(dict.fromkeys(files))


class SynthesisWriter:
    """Write each case's synthesised volumes as NIfTI on the grid of the input they came from.

    For every decollated item, ``output["pred"]`` (C_out, H, W, D) in original intensity units
    (after the bundle's post-processing) is written as ``<output_dir>/<case>/<name>.nii.gz`` for each
    of ``output_names``, with the affine and header of the source file of ``geometry_key``, read
    from that file itself, so spacing, direction (oblique included) and origin are exactly the
    input's. ``output["pred_std"]`` (from repeated sampling) goes to ``<name>_std.nii.gz``. A PNG
    panel (inputs, outputs, and target and error map when a target exists) goes beside them. Inputs
    are never overwritten, and every file is written atomically.

    Args:
        output_dir: root folder of the outputs.
        output_names: one name per output channel, e.g. ``["dce_onset", "dce_early", "dce_late"]``.
        geometry_key: datalist key of the input whose geometry the outputs take.
        input_keys: datalist keys of the inputs to show in the panel (their loaded, scaled volumes).
        mask_key: optional mask key whose largest slice the panel shows.
        id_key: datalist key with the case id (else the source folder name).
        panel: write the PNG panel.
        geometry_from: ``"file"`` (default): the affine and grid of the source file of
            ``geometry_key``, read from that file; ``"meta"``: the affine and grid the loaded
            ``geometry_key`` carries in memory (a MetaTensor), for outputs on a grid that no file
            has, e.g. a low-resolution acquisition resampled onto a finer grid.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_names: Sequence[str],
        geometry_key: str,
        input_keys: Sequence[str] = (),
        mask_key: str | None = None,
        id_key: str = "id",
        panel: bool = True,
        geometry_from: str = "file",
    ) -> None:
        if geometry_from not in ("file", "meta"):
            raise ValueError(f"geometry_from must be 'file' or 'meta', got {geometry_from!r}")
        self.geometry_from = geometry_from
        self.output_dir = Path(output_dir)
        self.output_names = list(output_names)
        self.geometry_key = geometry_key
        self.input_keys = list(input_keys)
        self.mask_key = mask_key
        self.id_key = id_key
        self.panel = panel
        self.written: list[dict[str, str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):
            raise RuntimeError("SynthesisWriter needs a decollated engine output (decollate=True)")
        for item, out in zip(batch, output):
            self.write_case(item, out)

    def write_case(self, item: dict, out: dict) -> dict[str, str]:
        src = source_file(item, self.geometry_key)
        affine, grid = self.reference_grid(item, src)
        cid = case_id(item, self.id_key, self.geometry_key)
        case_dir = self.output_dir / cid
        pred = as_numpy(out["pred"])
        if pred.shape[0] != len(self.output_names):
            raise ValueError(f"{cid}: prediction has {pred.shape[0]} channels for outputs {self.output_names}")
        if tuple(pred.shape[1:]) != tuple(grid):
            raise ValueError(f"{cid}: prediction grid {pred.shape[1:]} differs from {src} grid {tuple(grid)}")
        written: dict[str, str] = {"id": cid}
        protect = loaded_files(item) + (src,)
        for f in protect:
            if Path(f).resolve().parent == case_dir.resolve():
                raise FileExistsError(f"{cid}: output folder {case_dir} holds the input {f}; choose another output_dir")
        for c, name in enumerate(self.output_names):
            written[name] = str(save_nifti(pred[c], affine, case_dir / f"{name}.nii.gz", protect=protect))
        if "pred_std" in out and out["pred_std"] is not None:
            std = as_numpy(out["pred_std"])
            for c, name in enumerate(self.output_names):
                written[f"{name}_std"] = str(
                    save_nifti(std[c], affine, case_dir / f"{name}_std.nii.gz", protect=protect)
                )
        if self.panel:
            written["panel"] = self.write_panel(item, out, pred, case_dir / "panel.png", cid)
        self.written.append(written)
        logger.info("%s: wrote %s", cid, ", ".join(f"{k}={v}" for k, v in written.items() if k != "id"))
        return written

    def reference_grid(self, item: dict, src: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """(4x4 affine, spatial shape) the outputs are written on (see ``geometry_from``)."""
        if self.geometry_from == "file":
            ref = nib.load(src)
            return ref.affine, tuple(ref.shape[:3])
        x = item[self.geometry_key]
        if not hasattr(x, "affine"):
            raise TypeError(f"geometry_from='meta' needs {self.geometry_key!r} as a MetaTensor with an affine")
        return np.asarray(x.affine.detach().cpu().numpy(), dtype=np.float64), tuple(x.shape[1:4])

    def write_panel(self, item: dict, out: dict, pred: np.ndarray, path: Path, cid: str) -> str:
        mask = as_numpy(item[self.mask_key])[0] if self.mask_key and item.get(self.mask_key) is not None else None
        z = best_slice(pred.shape[1:], mask)
        inputs = {k: as_numpy(item[k])[0][..., z] for k in self.input_keys if k in item}
        outputs = {n: pred[c][..., z] for c, n in enumerate(self.output_names)}
        targets = None
        if out.get("label") is not None:
            label = as_numpy(out["label"])
            targets = {n: label[c][..., z] for c, n in enumerate(self.output_names)}
        contours = self.panel_contours(item, out, z)
        return synthesis_panel(path, inputs, outputs, targets, title=f"{cid}  slice {z}", contours=contours)

    def panel_contours(self, item: dict, out: dict, z: int) -> dict[str, dict[str, np.ndarray]] | None:
        """Mask outlines to draw on the panel's output and target images at slice ``z`` (output name ->
        {label: 2D mask}; see :func:`common.visualize.synthesis_panel`). None here; subclasses add some."""
        return None
