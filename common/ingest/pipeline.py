"""One patient's DICOM study -> one prepared case (:mod:`common.layout`); a TCIA folder -> a dataset.

:func:`ingest_study` runs, for one patient folder:

1. scan + classify (:mod:`common.ingest.series`, :mod:`common.ingest.study`), headers only;
2. read every chosen series with SimpleITK, assemble the 4D DCE and its time vector;
3. find contrast arrival and the phases (:mod:`common.dce`);
4. rigidly register each modality onto the reference grid (the DCE grid by default) and resample;
5. crop/pad to ``crop_size`` around the organ mask's centroid (or the grid centre)
   with ``common.transforms.crop``;
6. write the case into a temporary folder, renamed into place when complete.

:func:`prepare_dataset` runs it for every patient below a folder in worker processes, records the
studies it had to skip (``skipped.json``) and writes ``datalist.json``. :func:`time_ingest` times
the stages on one study for the benchmark.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from common import dce as dce_mod
from common.ingest.errors import IngestError
from common.ingest.register import RegistrationSettings, RigidResult, register_rigid, resample_to
from common.ingest.rules import Rules, load_rules
from common.ingest.series import array_to_sitk, read_frame, scan_study, sitk_affine, sitk_to_array
from common.ingest.study import StudySelection, classify_study
from common.io import load_nifti, save_json, save_nifti
from common.layout import DCE_4D, DCE_TIMES, MANIFEST, write_datalist

log = logging.getLogger(__name__)

INGEST_VERSION = 1
REFERENCE_FRAMES = ("pre", "mean_pre", "mean_post", "mean")
ARRIVAL_MASKS = ("enhancing", "foreground", "organ")
SKIPPED = "skipped.json"


@dataclass
class IngestConfig:
    """Settings of the ingest (all have defaults; the CLI exposes the common ones).

    Attributes:
        rules: rules JSON path / dict / None for :data:`common.ingest.rules.DEFAULT_RULES_PATH`.
        reference_role: role whose grid all outputs share (``"dce"``, or e.g. ``"t2w"``).
        reference_frame: for a DCE reference, the fixed image of the registration: ``"mean_pre"``
            (mean of the time points up to ``pre``; default), ``"pre"``, ``"mean_post"`` (from
            ``onset`` on) or ``"mean"``.
        phases: per-phase overrides for :func:`common.dce.select_phases`
            (``{"early": {"time_s": 120}}``, ``{"pre": {"index": 3}}``).
        early_delay_s: default delay of ``early`` after arrival.
        pre_source: ``"dce"`` (last time point before arrival) or ``"t1_pre"`` (``dce_pre`` is the
            registered VIBE pre-contrast volume).
        arrival_mask: voxels whose mean curve finds arrival: ``"enhancing"`` (the 10% of the
            body that enhances most; default), ``"foreground"`` (the whole body,
            ``common.dce.foreground_mask``) or ``"organ"`` (the organ mask, when given).
        crop_size: output grid size (x, y, z) in voxels of the reference grid.
        mask: organ (prostate) mask NIfTI for the crop centre: a file, or a folder holding
            ``<case>.nii.gz``, ``<case>/organ_mask.nii.gz`` or ``<case>*.nii*``. Without it an
            ``organ_mask.nii.gz`` inside the patient folder is used if present.
        mask_role: the role whose space the mask was drawn in (its registration transform is
            applied); None = scanner space (no transform).
        register: False resamples in scanner space without registration.
        registration: :class:`RegistrationSettings` (bounds included).
        share_transforms: roles that reuse another role's transform when both series lie on the
            same grid (the high-b DWI and the ADC come from one acquisition).
        write_native: also write each chosen series on its own grid under ``native/``.
        overwrite: replace an existing case (else :func:`ingest_study` raises).
    """

    rules: Any = None
    reference_role: str = "dce"
    reference_frame: str = "mean_pre"
    phases: Mapping[str, Mapping[str, float]] | None = None
    early_delay_s: float = 60.0
    pre_source: str = "dce"
    arrival_mask: str = "enhancing"
    crop_size: Sequence[int] = (160, 160, 16)
    mask: str | os.PathLike | None = None
    mask_role: str | None = None
    register: bool = True
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    share_transforms: Mapping[str, str] = field(default_factory=lambda: {"dwi_highb": "adc"})
    write_native: bool = True
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rules"] = self.rules if isinstance(self.rules, (dict, type(None))) else str(self.rules)
        if isinstance(self.rules, Rules):
            d["rules"] = self.rules.source
        d["registration"] = self.registration.to_dict()
        d["crop_size"] = list(self.crop_size)
        d["mask"] = str(self.mask) if self.mask is not None else None
        d["share_transforms"] = dict(self.share_transforms)
        d["phases"] = {k: dict(v) for k, v in (self.phases or {}).items()}
        return d


def _crop_functions():
    try:
        from common.transforms.crop import crop_or_pad, mask_centroid
    except ImportError as e:  # pragma: no cover - depends on the other module having landed
        raise ImportError("common.transforms.crop (crop_or_pad, mask_centroid) is needed for the ingest crop") from e
    return crop_or_pad, mask_centroid


def _check_values(arr: np.ndarray, patient: str, label: str, what: str) -> None:
    if not np.all(np.isfinite(arr)):
        n = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise IngestError(f"{what}: {n} NaN/Inf voxel value(s)", patient, label)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise IngestError(f"{what}: constant image (every voxel = {lo:g})", patient, label)


def find_mask(config: IngestConfig, study_dir: Path, case_id: str) -> Path | None:
    """The organ mask file for a case (see :attr:`IngestConfig.mask`), or None."""
    if config.mask is not None:
        m = Path(config.mask)
        if m.is_file():
            return m
        if m.is_dir():
            for cand in (m / f"{case_id}.nii.gz", m / f"{case_id}.nii", m / case_id / "organ_mask.nii.gz"):
                if cand.is_file():
                    return cand
            hits = sorted(m.glob(f"{case_id}*.nii*"))
            if hits:
                return hits[0]
            return None
        raise IngestError(f"mask {m} not found", case_id)
    hits = sorted(p for p in study_dir.rglob("organ_mask.nii*") if not any(part.startswith(".") for part in p.parts))
    return hits[0] if hits else None


def _dce_fixed(dce4: np.ndarray, phases: dict[str, int], mode: str) -> np.ndarray:
    n = dce4.shape[-1]
    pre, onset = phases.get("pre", 0), phases.get("onset", min(1, n - 1))
    if mode == "pre":
        return dce4[..., pre]
    if mode == "mean_pre":
        return dce4[..., : pre + 1].mean(-1)
    if mode == "mean_post":
        return dce4[..., onset:].mean(-1)
    if mode == "mean":
        return dce4.mean(-1)
    raise IngestError(f"unknown reference_frame {mode!r} (known: {REFERENCE_FRAMES})")


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    )


def _clean_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def ingest_study(
    study_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    case_id: str | None = None,
    config: IngestConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Ingest one patient's DICOM folder into ``<out_dir>/<case_id>/`` (layout: :mod:`common.layout`).

    Args:
        study_dir: the patient folder (or one study folder) with one sub-folder per series.
        out_dir: dataset root; the case goes to ``<out_dir>/<case_id>``.
        case_id: defaults to the folder name.
        config: :class:`IngestConfig`; keyword ``overrides`` replace its fields.

    Returns:
        the manifest (also written as ``manifest.json``), with ``timings_s``.

    Raises:
        IngestError: bad input (message names the patient, the series folder and the problem);
            nothing is left in ``out_dir`` for the case.
        FileExistsError: the case exists and ``overwrite`` is False.
    """
    cfg = dataclasses.replace(config or IngestConfig(), **overrides)
    study_dir = Path(study_dir)
    out_dir = Path(out_dir)
    case_id = _clean_id(case_id or study_dir.name)
    final = out_dir / case_id
    if final.exists() and not cfg.overwrite:
        raise FileExistsError(f"{final} exists (use overwrite=True to replace it)")
    if cfg.reference_frame not in REFERENCE_FRAMES:
        raise IngestError(f"unknown reference_frame {cfg.reference_frame!r} (known: {REFERENCE_FRAMES})", case_id)
    if cfg.arrival_mask not in ARRIVAL_MASKS:
        raise IngestError(f"unknown arrival_mask {cfg.arrival_mask!r} (known: {ARRIVAL_MASKS})", case_id)
    if cfg.pre_source not in ("dce", "t1_pre"):
        raise IngestError(f"pre_source must be 'dce' or 't1_pre', got {cfg.pre_source!r}", case_id)
    if len(tuple(cfg.crop_size)) != 3:
        raise IngestError(f"crop_size must have 3 values, got {cfg.crop_size}", case_id)
    crop_or_pad, mask_centroid = _crop_functions()  # first call imports MONAI: outside the timings
    t_start = time.perf_counter()
    rules = load_rules(cfg.rules)
    timings: dict[str, float] = {}

    # 1) scan + classify -------------------------------------------------------------------
    t = time.perf_counter()
    series = scan_study(study_dir, case_id)
    if not series:
        raise IngestError(f"no DICOM files found below {study_dir}", case_id)
    sel = classify_study(series, rules, case_id)
    if cfg.reference_role != "dce" and cfg.reference_role not in sel.roles:
        raise IngestError(f"reference role {cfg.reference_role!r} has no series in the study", case_id)
    if cfg.pre_source == "t1_pre" and "t1_pre" not in sel.roles:
        raise IngestError("pre_source='t1_pre' but the study has no t1_pre series", case_id)
    timings["scan_s"] = time.perf_counter() - t

    # 2) read ------------------------------------------------------------------------------
    t = time.perf_counter()
    frames: list[sitk.Image] = []
    for tp in sel.dce:
        img = read_frame(tp.frame, tp.geom, case_id, tp.series.label)
        frames.append(img)
    ref_frame = frames[0]
    for tp, img in zip(sel.dce, frames):
        if not _same_grid(img, ref_frame):
            raise IngestError(f"DCE time point {tp.time_s:g} s lies on another grid than the first time point", case_id, tp.series.label)
    dce4 = np.stack([sitk_to_array(f) for f in frames], axis=-1)
    for k, tp in enumerate(sel.dce):
        _check_values(dce4[..., k], case_id, tp.series.label, f"DCE time point {k} ({tp.time_s:g} s)")
    native: dict[str, sitk.Image] = {}
    for role, s in sel.roles.items():
        g = sel.geoms[role]
        img = read_frame(g.frames[0], g, case_id, s.label)
        _check_values(sitk.GetArrayViewFromImage(img), case_id, s.label, role)
        native[role] = img
    timings["read_s"] = time.perf_counter() - t

    # 3) phases ----------------------------------------------------------------------------
    t = time.perf_counter()
    times = sel.times_s
    mask_path = find_mask(cfg, study_dir, case_id)
    mask_native: sitk.Image | None = None
    if mask_path is not None:
        try:
            m_arr, m_aff = load_nifti(mask_path)
        except (FileNotFoundError, ValueError) as e:
            raise IngestError(f"organ mask: {e}", case_id) from e
        if m_arr.ndim == 4 and m_arr.shape[-1] == 1:
            m_arr = m_arr[..., 0]
        if m_arr.ndim != 3 or not (m_arr > 0.5).any():
            raise IngestError(f"organ mask {mask_path} must be a non-empty 3D volume, got shape {m_arr.shape}", case_id)
        mask_native = array_to_sitk((m_arr > 0.5).astype(np.float32), m_aff)
    spec = {k: dict(v) for k, v in (cfg.phases or {}).items()}
    names = list(dce_mod.DEFAULT_PHASES)
    curve_mask_kind = cfg.arrival_mask
    curve = None
    arrival = None
    needs_curve = any(n not in spec for n in names if n != "late")
    if needs_curve:
        if curve_mask_kind == "organ" and mask_native is not None:
            m_ref = sitk_to_array(resample_to(mask_native, ref_frame, None, "nearest")) > 0.5
            cmask = m_ref if m_ref.any() else dce_mod.enhancing_mask(dce4)
        elif curve_mask_kind == "foreground":
            cmask = dce_mod.foreground_mask(dce4)
        else:
            cmask = dce_mod.enhancing_mask(dce4)
            curve_mask_kind = "enhancing"
        curve = dce_mod.mean_curve(dce4, cmask)
        try:
            arrival = dce_mod.detect_arrival(times, curve)
            phases = dce_mod.select_phases(times, curve, spec, names, cfg.early_delay_s)
        except ValueError as e:
            raise IngestError(f"DCE phase selection failed: {e}", case_id) from e
    else:
        phases = dce_mod.select_phases(times, None, spec, names, cfg.early_delay_s)
    timings["phases_s"] = time.perf_counter() - t

    # 4) register + resample onto the reference grid ----------------------------------------
    t = time.perf_counter()
    dce_fixed_arr = _dce_fixed(dce4, phases, cfg.reference_frame)
    dce_fixed = array_to_sitk(dce_fixed_arr, sitk_affine(ref_frame))
    dce_fixed.CopyInformation(ref_frame)
    if cfg.reference_role == "dce":
        ref_img, ref_fixed, ref_label = ref_frame, dce_fixed, "dce"
    else:
        ref_img = native[cfg.reference_role]
        ref_fixed, ref_label = ref_img, cfg.reference_role
    regs: dict[str, dict[str, Any]] = {}
    transforms: dict[str, sitk.Transform | None] = {}
    moving_roles = [r for r in native if r != cfg.reference_role] + (["dce"] if cfg.reference_role != "dce" else [])
    # shared transforms last, so their source is registered first
    moving_roles.sort(key=lambda r: r in cfg.share_transforms)
    for role in moving_roles:
        mov = dce_fixed if role == "dce" else native[role]
        label = sel.dce[0].series.label if role == "dce" else sel.roles[role].label
        src = cfg.share_transforms.get(role)
        if src and src in transforms and src in native and _same_grid(native[src], mov):
            transforms[role] = transforms[src]
            regs[role] = dict(regs[src], shared_from=src)
            continue
        if not cfg.register:
            transforms[role] = None
            regs[role] = {"transform": "identity (registration off)"}
            continue
        res: RigidResult = register_rigid(ref_fixed, mov, cfg.registration, role, case_id, label)
        transforms[role] = res.transform
        regs[role] = res.to_dict()
    resampled: dict[str, np.ndarray] = {}
    for role, img in native.items():
        if role == cfg.reference_role:
            resampled[role] = sitk_to_array(img)
        else:
            resampled[role] = sitk_to_array(resample_to(img, ref_img, transforms[role], "linear"))
    if cfg.reference_role == "dce":
        dce_ref = dce4
    else:
        dce_ref = np.stack([sitk_to_array(resample_to(f, ref_img, transforms["dce"], "linear")) for f in frames], axis=-1)
    mask_ref = None
    if mask_native is not None:
        mt = transforms.get(cfg.mask_role) if cfg.mask_role else None
        if cfg.mask_role and cfg.mask_role not in transforms and cfg.mask_role != cfg.reference_role:
            raise IngestError(f"mask_role {cfg.mask_role!r} has no registered series", case_id)
        mask_ref = (sitk_to_array(resample_to(mask_native, ref_img, mt, "nearest")) > 0.5).astype(np.uint8)
        if not mask_ref.any():
            raise IngestError(f"organ mask {mask_path} does not overlap the reference grid", case_id)
    timings["register_s"] = time.perf_counter() - t

    # 5) crop --------------------------------------------------------------------------------
    t = time.perf_counter()
    ref_affine = sitk_affine(ref_img)
    size = tuple(int(v) for v in cfg.crop_size)
    if mask_ref is not None:
        center = mask_centroid(mask_ref)
        center_source = f"organ mask centroid ({mask_path})"
    else:
        center = None
        center_source = "reference grid centre"
    out_arrays: dict[str, np.ndarray] = {}
    affine_out = None
    for role, arr in resampled.items():
        out_arrays[role], affine_out = crop_or_pad(arr, ref_affine, size, center_vox=center, pad_value=0.0)
    dce_out, affine_dce = crop_or_pad(dce_ref, ref_affine, size, center_vox=center, pad_value=0.0)
    affine_out = affine_dce if affine_out is None else affine_out
    if not np.allclose(affine_out, affine_dce):
        raise IngestError("crop_or_pad returned different affines for the 3D and 4D volumes", case_id)
    for name in ("pre", "onset", "early", "late"):
        out_arrays[f"dce_{name}"] = dce_out[..., phases[name]]
    if cfg.pre_source == "t1_pre":
        out_arrays["dce_pre"] = out_arrays["t1_pre"]
    if mask_ref is not None:
        out_arrays["organ_mask"], _ = crop_or_pad(mask_ref.astype(np.float32), ref_affine, size, center_vox=center, pad_value=0.0)
    timings["crop_s"] = time.perf_counter() - t

    # 6) write into a temporary folder, then rename into place -------------------------------
    t = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".tmp-{case_id}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".tmp-{case_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        outputs: dict[str, str] = {}
        for key, arr in out_arrays.items():
            dtype = np.uint8 if key == "organ_mask" else np.float32
            save_nifti(arr, affine_out, tmp / f"{key}.nii.gz", dtype=dtype)
            outputs[key] = f"{key}.nii.gz"
        save_nifti(dce_out, affine_out, tmp / f"{DCE_4D}.nii.gz")
        outputs[DCE_4D] = f"{DCE_4D}.nii.gz"
        save_json({"times_s": [round(float(x), 4) for x in times], "time_source": sel.time_source}, tmp / DCE_TIMES)
        outputs["dce_times"] = DCE_TIMES
        native_out: dict[str, str] = {}
        if cfg.write_native:
            for role, img in native.items():
                save_nifti(sitk_to_array(img), sitk_affine(img), tmp / "native" / f"{role}.nii.gz")
                native_out[role] = f"native/{role}.nii.gz"
            for name in ("pre", "onset", "early", "late"):
                save_nifti(dce4[..., phases[name]], sitk_affine(ref_frame), tmp / "native" / f"dce_{name}.nii.gz")
                native_out[f"dce_{name}"] = f"native/dce_{name}.nii.gz"
            if mask_native is not None:
                save_nifti(sitk_to_array(mask_native), sitk_affine(mask_native), tmp / "native" / "organ_mask.nii.gz", dtype=np.uint8)
                native_out["organ_mask"] = "native/organ_mask.nii.gz"
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start
        manifest = _manifest(
            case_id, study_dir, cfg, rules, sel, native, ref_frame, phases, arrival, curve, curve_mask_kind, times,
            ref_label, ref_img, regs, size, center, center_source, affine_out, outputs, native_out, mask_path, timings,
        )
        save_json(manifest, tmp / MANIFEST)  # last: a case counts as done when it has a manifest
        old = None
        if final.exists():
            if not cfg.overwrite:
                raise FileExistsError(f"{final} exists (use overwrite=True to replace it)")
            old = out_dir / f".old-{case_id}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    timings["write_s"] = time.perf_counter() - t
    log.info("patient %s: prepared %s in %.1f s", case_id, final, time.perf_counter() - t_start)
    return manifest


def _grid(img: sitk.Image) -> dict[str, Any]:
    return {
        "size": list(img.GetSize()),
        "spacing_mm": [round(v, 6) for v in img.GetSpacing()],
        "affine_ras": np.round(sitk_affine(img), 6).tolist(),
    }


def _manifest(case_id, study_dir, cfg, rules, sel: StudySelection, native, dce_native, phases, arrival, curve, curve_mask_kind, times,
              ref_label, ref_img, regs, size, center, center_source, affine_out, outputs, native_out, mask_path, timings) -> dict:
    roles = {}
    for role, s in sel.roles.items():
        roles[role] = {**s.summary(), "native_grid": _grid(native[role])}
    dce_series = []
    for tp in sel.dce:
        dce_series.append({"time_s": tp.time_s, "folder": tp.series.label, "description": tp.series.description, "series_number": tp.series.number})
    d = {
        "kind": "ingest",
        "ingest_version": INGEST_VERSION,
        "case_id": case_id,
        "patient_id": next((s.patient_id for s in sel.roles.values() if s.patient_id), sel.dce[0].series.patient_id),
        "source": str(study_dir.resolve()),
        "study_uid": sel.study_uid,
        "rules": rules.source,
        "roles": roles,
        "missing_roles": sel.missing,
        "choices": sel.choices,
        "series": sel.report,
        "ignored": [r for r in sel.report if r["status"] == "ignored"],
        "dce": {
            "n_time_points": len(times),
            "times_s": [round(float(x), 4) for x in times],
            "time_source": sel.time_source,
            "series": dce_series,
            "flip_angle": sel.dce[0].series.flip_angle,
            "native_grid": _grid(dce_native),
            "arrival": None if arrival is None else {
                "index": arrival.index, "time_s": arrival.time_s, "baseline": arrival.baseline, "peak": arrival.peak,
                "curve_mask": curve_mask_kind,
            },
            "mean_curve": None if curve is None else [round(float(c), 4) for c in curve],
            "phases": {
                name: {"index": int(idx), "time_s": float(times[idx]), "source": "dce"} for name, idx in phases.items()
            },
        },
        "reference": {"role": ref_label, "frame": cfg.reference_frame if ref_label == "dce" else None, "grid": _grid(ref_img)},
        "registration": regs,
        "crop": {
            "size": list(size),
            "center_vox": None if center is None else np.asarray(center, dtype=float).round(3).tolist(),
            "center_source": center_source,
            "affine_ras": np.round(affine_out, 6).tolist(),
        },
        "organ_mask": str(mask_path) if mask_path is not None else None,
        "outputs": outputs,
        "native": native_out,
        "config": cfg.to_dict(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if cfg.pre_source == "t1_pre":
        d["dce"]["phases"]["pre"]["source"] = "t1_pre (registered VIBE pre-contrast)"
    return d


# ------------------------------------------------------------------------------------------
# batch


def find_patients(src: str | os.PathLike) -> list[tuple[str, Path]]:
    """``[(case_id, patient_folder)]`` below ``src``.

    ``src`` may be a TCIA root (``<patient>/<study>/<series>/*.dcm``: patients are its first-level
    folders), a single patient folder (``<study>/<series>/*.dcm``) or one study folder
    (``<series>/*.dcm``). A collection folder with a single sub-folder above a TCIA root is
    descended into.
    """
    src = Path(src)
    if not src.is_dir():
        raise IngestError(f"{src} is not a folder")

    def first_depth(root: Path) -> int | None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if any(f.lower().endswith((".dcm", ".ima")) for f in filenames):
                return len(Path(dirpath).relative_to(root).parts) + 1
        return None

    depth = first_depth(src)
    if depth is None:
        raise IngestError(f"{src}: no DICOM (.dcm) files found")
    while depth > 4:
        subs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subs) != 1:
            break
        src, depth = subs[0], depth - 1
    if depth <= 3:  # a patient or a study folder
        return [(_clean_id(src.name), src)]
    return [(_clean_id(p.name), p) for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _worker_init(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _run_one(case_id: str, folder: str, out: str, cfg: IngestConfig) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        m = ingest_study(folder, out, case_id, cfg)
        return {"id": case_id, "source": folder, "status": "ok", "seconds": round(time.perf_counter() - t, 2), "timings_s": m["timings_s"]}
    except IngestError as e:
        err = e.with_context(patient=case_id)
        log.warning("skipping %s: %s", case_id, err)
        return {"id": case_id, "source": folder, "status": "skipped", "reason": str(err), "seconds": round(time.perf_counter() - t, 2)}
    except Exception as e:  # an unexpected failure skips the study too, with its traceback logged
        log.error("skipping %s: unexpected %s: %s\n%s", case_id, type(e).__name__, e, traceback.format_exc())
        return {"id": case_id, "source": folder, "status": "skipped", "reason": f"patient {case_id}: unexpected {type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t, 2)}


def prepare_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: IngestConfig | None = None,
    workers: int | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Ingest every patient below ``src`` into ``out``; write ``datalist.json`` and ``skipped.json``.

    Patients with a finished case (``<out>/<id>/manifest.json``) are skipped unless
    ``config.overwrite``. A study that fails is recorded in ``skipped.json`` with the reason and
    leaves nothing behind. Returns a summary ``{"prepared", "existing", "skipped", "datalist", ...}``.
    """
    cfg = config or IngestConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    patients = find_patients(src)
    ids = [cid for cid, _ in patients]
    dups = {i for i in ids if ids.count(i) > 1}
    if dups:
        raise IngestError(f"{src}: patient folders map to the same case id: {sorted(dups)}")
    if cfg.mask is not None and Path(cfg.mask).is_file() and len(patients) > 1:
        raise IngestError(
            f"mask {cfg.mask} is one file but {src} holds {len(patients)} patients: pass a folder with <case>.nii.gz "
            "or <case>/organ_mask.nii.gz per patient"
        )
    todo, existing = [], []
    for cid, folder in patients:
        if (out / cid / MANIFEST).exists() and not cfg.overwrite:
            existing.append(cid)
        else:
            todo.append((cid, folder))
    load_rules(cfg.rules)  # fail early on a bad rules file
    _crop_functions()
    n_cpu = os.cpu_count() or 1
    workers = int(workers or min(4, n_cpu))
    workers = max(1, min(workers, len(todo) or 1))
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(todo), desc="ingest", unit="patient", disable=not progress) if tqdm else None

    def done(r):
        results.append(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{r['id']}: {r['status']}")
        if on_result:
            on_result(r)

    if workers == 1:
        for cid, folder in todo:
            done(_run_one(cid, str(folder), str(out), cfg))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        threads = max(1, n_cpu // workers)
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads,)) as ex:
            futs = {ex.submit(_run_one, cid, str(folder), str(out), cfg): cid for cid, folder in todo}
            for f in cf.as_completed(futs):
                try:
                    done(f.result())
                except Exception as e:  # a crashed worker process
                    cid = futs[f]
                    done({"id": cid, "source": str(dict(todo)[cid]), "status": "skipped", "reason": f"patient {cid}: worker crashed: {type(e).__name__}: {e}"})
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r["id"])
    skipped = [r for r in results if r["status"] != "ok"]
    prepared = [r["id"] for r in results if r["status"] == "ok"]
    save_json({"source": str(Path(src).resolve()), "skipped": [{k: r[k] for k in ("id", "source", "reason")} for r in skipped]}, out / SKIPPED)
    case_dirs = sorted(p.parent for p in out.glob(f"*/{MANIFEST}") if not p.parent.name.startswith("."))
    datalist = None
    if case_dirs:
        datalist = write_datalist(out, case_dirs, fractions=fractions, seed=seed, extra={"source": str(Path(src).resolve()), "prepared_by": "common.ingest"})
    return {
        "prepared": prepared,
        "existing": sorted(existing),
        "skipped": [{"id": r["id"], "reason": r["reason"]} for r in skipped],
        "datalist": str(datalist) if datalist else None,
        "skipped_json": str(out / SKIPPED),
        "seconds": round(time.perf_counter() - t0, 2),
        "results": results,
    }


def time_ingest(study_dir: str | os.PathLike, config: IngestConfig | None = None, keep: str | os.PathLike | None = None) -> dict[str, float]:
    """Ingest one study into a temporary folder (or ``keep``) and return the seconds per stage:
    ``scan_s`` (headers + classification), ``read_s`` (pixel data), ``phases_s``, ``register_s``
    (registration + resampling), ``crop_s``, ``write_s``, ``total_s``, plus ``n_dce``."""
    cfg = dataclasses.replace(config or IngestConfig(), overwrite=True)
    with tempfile.TemporaryDirectory(prefix="time_ingest_") as tmp:
        out = Path(keep) if keep is not None else Path(tmp)
        t = time.perf_counter()
        m = ingest_study(study_dir, out, None, cfg)
        res = dict(m["timings_s"])
        res["total_s"] = round(time.perf_counter() - t, 3)
        res["n_dce"] = m["dce"]["n_time_points"]
        return res
