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
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from common import dce as dce_mod
from common.geometry import array_to_sitk, sitk_affine, sitk_to_array
from common.ingest.adc import compute_adc
from common.ingest.errors import IngestError
from common.ingest.register import RegistrationSettings, RigidResult, register_rigid, resample_to
from common.ingest.rules import Rules, load_rules
from common.ingest.series import read_frame, scan_study
from common.ingest.study import ADC_SOURCES, StudySelection, classify_study
from common.io import atomic_folder, load_nifti, save_json, save_nifti
from common.layout import DCE_4D, DCE_TIMES, MANIFEST, update_datalist_if_any

log = logging.getLogger(__name__)

INGEST_VERSION = 1
REFERENCE_FRAMES = ("pre", "mean_pre", "mean_post", "mean")
ARRIVAL_MASKS = ("enhancing", "foreground", "organ")
PRE_SOURCES = ("dce", "t1_pre")
PHASE_NAMES = ("pre", "onset", "early", "late")  # the phases written as ``dce_<name>``
SKIPPED = "skipped.json"


def _option(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose ``metadata["help"]`` documents it (read by the CLI and the docstring)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class IngestConfig:
    """Settings of the ingest (all have defaults; ``scripts/prepare_prostatex.py`` builds its options
    from these fields, their defaults and their ``metadata["help"]``).
    """

    rules: Any = _option(None, "rules JSON path / dict / None for common.ingest.rules.DEFAULT_RULES_PATH.")
    reference_role: str = _option("dce", 'role whose grid all outputs share ("dce", or e.g. "t2w").')
    reference_frame: str = _option(
        "mean_pre",
        'for a DCE reference, the fixed image of the registration: "mean_pre" (mean of the time points up to '
        '"pre"; default), "pre", "mean_post" (from "onset" on) or "mean".',
    )
    phase_rule: str = _option(
        "arrival",
        'named phase rule (common.dce.PHASE_RULES): "arrival" (onset/early after contrast arrival; default) or '
        '"dcediff_paper" (early = middle time point, late = last); recorded in the manifest.',
    )
    phases: Mapping[str, Mapping[str, float]] | None = _option(
        None,
        'per-phase overrides on top of phase_rule ({"early": {"time_s": 120}}, {"pre": {"index": 3}}).',
    )
    early_delay_s: float = _option(60.0, "default delay of early after arrival (s).")
    pre_source: str = _option(
        "dce",
        '"dce" (last time point before arrival) or "t1_pre" (dce_pre is the registered VIBE pre-contrast volume).',
    )
    arrival_mask: str = _option(
        "enhancing",
        'voxels whose mean curve finds arrival: "enhancing" (the 10% of the body that enhances most; default), '
        '"foreground" (the whole body, common.dce.foreground_mask) or "organ" (the organ mask, when given).',
    )
    crop_size: Sequence[int] = _option((160, 160, 16), "output grid size (x, y, z) in voxels of the reference grid.")
    mask: str | os.PathLike | None = _option(
        None,
        "organ (prostate) mask NIfTI for the crop centre: a file, or a folder holding <case>.nii.gz, "
        "<case>/organ_mask.nii.gz or <case>*.nii*. Without it an organ_mask.nii.gz inside the patient folder "
        "is used if present.",
    )
    mask_role: str | None = _option(
        None,
        "the role whose space the mask was drawn in (its registration transform is applied); None = scanner space.",
    )
    register: bool = _option(True, "False resamples in scanner space without registration.")
    registration: RegistrationSettings = _option(
        factory=RegistrationSettings, help="common.ingest.register.RegistrationSettings (bounds included)."
    )
    share_transforms: Mapping[str, str] = _option(
        factory=lambda: {"dwi_highb": "adc"},
        help="roles that reuse another role's transform when both series lie on the same grid "
        "(the high-b DWI and the ADC come from one acquisition).",
    )
    adc_source: str = _option(
        "auto",
        '"auto" (the scanner\'s ADC series; fitted from a multi-b DWI when the study has none), "scanner" (never '
        'fit: a study without an ADC series is refused) or "dwi" (always fit from the DWI, the ADC series ignored).',
    )
    adc_min_b: float = _option(
        50.0, "lowest b-value (s/mm^2) of the DWI images an ADC is fitted from (mono-exponential least squares)."
    )
    adc_max_b: float | None = _option(None, "highest b-value (s/mm^2) of the ADC fit; None: no upper bound.")
    adc_background: float = _option(
        0.1,
        "fitted ADC voxels whose lowest-b signal is below this fraction of its 99th percentile are set to 0 (air).",
    )
    write_native: bool = _option(True, "also write each chosen series on its own grid under native/.")
    overwrite: bool = _option(False, "replace an existing case (else ingest_study raises).")

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


IngestConfig.__doc__ += "\n    Attributes:\n" + "".join(
    f"        {f.name}: {f.metadata['help']}\n" for f in dataclasses.fields(IngestConfig)
)


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


def case_id(name: str) -> str:
    """The case folder name the ingest gives ``name``: runs of characters other than letters, digits,
    ``.``, ``_``, ``-`` become ``_`` (``"a b"`` -> ``"a_b"``), leading/trailing ``.``/``_`` go; ``"case"`` if empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


_clean_id = case_id


def _grid(img: sitk.Image) -> dict[str, Any]:
    return {
        "size": list(img.GetSize()),
        "spacing_mm": [round(v, 6) for v in img.GetSpacing()],
        "affine_ras": np.round(sitk_affine(img), 6).tolist(),
    }


# ------------------------------------------------------------------------------------------
# the stages of one study: select -> read -> phases -> register -> crop -> write
#
# Each stage takes the job and the earlier stages' dataclasses and returns its own; each
# dataclass writes its part of the manifest (``manifest()``).


@dataclass(frozen=True)
class IngestJob:
    """One study to ingest: where from, where to, with which settings (checked by :func:`make_job`)."""

    study_dir: Path
    out_dir: Path
    case_id: str
    cfg: IngestConfig

    @property
    def final(self) -> Path:
        """The case folder ``<out_dir>/<case_id>``."""
        return self.out_dir / self.case_id


@dataclass
class StudyData:
    """Stage 2 (:func:`read_study`): the pixel data of the chosen series.

    Attributes:
        sel: the classification (:func:`common.ingest.study.classify_study`).
        frames: one 3D image per DCE time point, all on the first one's grid.
        dce4: the DCE as an (x, y, z, t) float array (native DCE grid, scanner intensities).
        native: role -> the 3D image of each single-series role on its own grid.
    """

    sel: StudySelection
    frames: list[sitk.Image]
    dce4: np.ndarray
    native: dict[str, sitk.Image]

    @property
    def adc_record(self) -> dict[str, Any] | None:
        """The manifest's ``adc`` entry: where the ADC came from (None without an ADC)."""
        sel = self.sel
        if sel.adc_plan is not None:
            return sel.adc_plan.record()
        if "adc" in sel.roles:
            s = sel.roles["adc"]
            return {"source": "scanner ADC series", "folder": s.label, "description": s.description}
        return None

    @property
    def ref_frame(self) -> sitk.Image:
        """The first DCE time point: its grid is the DCE grid."""
        return self.frames[0]

    @property
    def times(self) -> np.ndarray:
        """(t,) acquisition times in seconds."""
        return self.sel.times_s

    def manifest_series(self) -> dict[str, Any]:
        """``roles`` ... ``ignored`` entries of the manifest."""
        sel = self.sel
        return {
            "roles": {
                role: {
                    **s.summary(),
                    "native_grid": _grid(self.native[role]),
                    **({"computed_from_dwi": sel.adc_plan.record()} if role == "adc" and sel.adc_plan else {}),
                }
                for role, s in sel.roles.items()
            },
            "missing_roles": sel.missing,
            "choices": sel.choices,
            "series": sel.report,
            "ignored": [r for r in sel.report if r["status"] == "ignored"],
        }

    def manifest_dce(self) -> dict[str, Any]:
        """The series part of the manifest's ``dce`` entry (times, series, native grid)."""
        sel = self.sel
        return {
            "n_time_points": len(self.times),
            "times_s": [round(float(x), 4) for x in self.times],
            "time_source": sel.time_source,
            "series": [
                {
                    "time_s": tp.time_s,
                    "folder": tp.series.label,
                    "description": tp.series.description,
                    "series_number": tp.series.number,
                }
                for tp in sel.dce
            ],
            "flip_angle": sel.dce[0].series.flip_angle,
            "native_grid": _grid(self.ref_frame),
        }


@dataclass
class OrganMask:
    """The organ mask of a case (:func:`load_organ_mask`): its file and the binary 3D image (float 0/1)."""

    path: Path
    native: sitk.Image


@dataclass
class PhaseChoice:
    """Stage 3 (:func:`pick_phases`): contrast arrival and the phase time points.

    Attributes:
        phases: phase name -> time-point index (``common.dce.DEFAULT_PHASES``).
        arrival: :func:`common.dce.detect_arrival`'s result, None when every phase was given.
        curve: (t,) mean curve over the arrival mask, None when not needed.
        curve_mask: the kind of arrival mask used (``IngestConfig.arrival_mask`` or its fallback).
        pre_source: ``IngestConfig.pre_source``.
        rule: ``IngestConfig.phase_rule`` (a name of :data:`common.dce.PHASE_RULES`).
    """

    phases: dict[str, int]
    arrival: Any
    curve: np.ndarray | None
    curve_mask: str
    pre_source: str
    rule: str = "arrival"

    def manifest(self, times: np.ndarray) -> dict[str, Any]:
        """The ``arrival``, ``mean_curve`` and ``phases`` entries of the manifest's ``dce``."""
        a = self.arrival
        d = {
            "arrival": None
            if a is None
            else {
                "index": a.index,
                "time_s": a.time_s,
                "baseline": a.baseline,
                "peak": a.peak,
                "curve_mask": self.curve_mask,
            },
            "mean_curve": None if self.curve is None else [round(float(c), 4) for c in self.curve],
            "phase_rule": self.rule,
            "phases": {
                name: {"index": int(idx), "time_s": float(times[idx]), "source": "dce"}
                for name, idx in self.phases.items()
            },
        }
        if self.pre_source == "t1_pre":
            d["phases"]["pre"]["source"] = "t1_pre (registered VIBE pre-contrast)"
        return d


@dataclass
class Registration:
    """Stage 4 (:func:`register_study`): every volume on the reference grid.

    Attributes:
        ref_img: the reference grid (a 3D image).
        ref_label: its role (``"dce"`` or ``IngestConfig.reference_role``).
        frame: ``IngestConfig.reference_frame`` for a DCE reference, else None.
        records: role -> registration record for the manifest.
        transforms: role -> rigid transform (fixed -> moving), None without registration.
        volumes: role -> (x, y, z) array on the reference grid, in the order of ``StudyData.native``.
        dce: (x, y, z, t) DCE on the reference grid.
        mask: (x, y, z) uint8 organ mask on the reference grid, or None.
    """

    ref_img: sitk.Image
    ref_label: str
    frame: str | None
    records: dict[str, dict[str, Any]]
    transforms: dict[str, sitk.Transform | None]
    volumes: dict[str, np.ndarray]
    dce: np.ndarray
    mask: np.ndarray | None

    def manifest_reference(self) -> dict[str, Any]:
        return {"role": self.ref_label, "frame": self.frame, "grid": _grid(self.ref_img)}


@dataclass
class CropWindow:
    """Stage 5 (:func:`crop_study`): the output box and the cropped volumes.

    Attributes:
        size: (x, y, z) voxels.
        center: box centre in reference-grid voxels, None for the grid centre.
        center_source: what the centre is (for the manifest).
        affine: 4x4 RAS affine of the output grid (mm).
        arrays: output key -> (x, y, z) array, in the order they are written.
        dce: the cropped (x, y, z, t) DCE.
    """

    size: tuple[int, int, int]
    center: Any
    center_source: str
    affine: np.ndarray
    arrays: dict[str, np.ndarray]
    dce: np.ndarray

    def manifest(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "center_vox": None if self.center is None else np.asarray(self.center, dtype=float).round(3).tolist(),
            "center_source": self.center_source,
            "affine_ras": np.round(self.affine, 6).tolist(),
        }


@dataclass
class CaseFiles:
    """Stage 6 (:func:`write_volumes`): key -> file name relative to the case folder."""

    outputs: dict[str, str]
    native: dict[str, str]


@dataclass
class IngestResult:
    """Stages 1-5 of one study: what :func:`write_case` writes and :func:`build_manifest` records."""

    job: IngestJob
    rules: Rules
    study: StudyData
    mask: OrganMask | None
    phases: PhaseChoice
    registration: Registration
    crop: CropWindow


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """``timings[key]`` = seconds spent in the block (left unset when it raises)."""
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def make_job(
    study_dir: str | os.PathLike, out_dir: str | os.PathLike, case_id: str | None, cfg: IngestConfig
) -> IngestJob:
    """Check the settings (before any file is read) and name the case.

    Raises:
        FileExistsError: the case exists and ``cfg.overwrite`` is False.
        IngestError: an unknown ``reference_frame`` / ``arrival_mask`` / ``pre_source`` or a bad ``crop_size``.
    """
    study_dir = Path(study_dir)
    job = IngestJob(study_dir, Path(out_dir), _clean_id(case_id or study_dir.name), cfg)
    cid = job.case_id
    if job.final.exists() and not cfg.overwrite:
        raise FileExistsError(f"{job.final} exists (use overwrite=True to replace it)")
    if cfg.reference_frame not in REFERENCE_FRAMES:
        raise IngestError(f"unknown reference_frame {cfg.reference_frame!r} (known: {REFERENCE_FRAMES})", cid)
    if cfg.arrival_mask not in ARRIVAL_MASKS:
        raise IngestError(f"unknown arrival_mask {cfg.arrival_mask!r} (known: {ARRIVAL_MASKS})", cid)
    if cfg.pre_source not in PRE_SOURCES:
        raise IngestError(f"pre_source must be 'dce' or 't1_pre', got {cfg.pre_source!r}", cid)
    if len(tuple(cfg.crop_size)) != 3:
        raise IngestError(f"crop_size must have 3 values, got {cfg.crop_size}", cid)
    if cfg.adc_source not in ADC_SOURCES:
        raise IngestError(f"unknown adc_source {cfg.adc_source!r} (known: {ADC_SOURCES})", cid)
    if cfg.adc_max_b is not None and cfg.adc_max_b <= cfg.adc_min_b:
        raise IngestError(f"adc_max_b ({cfg.adc_max_b:g}) must exceed adc_min_b ({cfg.adc_min_b:g})", cid)
    return job


def select_series(job: IngestJob, rules: Rules) -> StudySelection:
    """Stage 1: scan the DICOM headers below the study folder and assign roles (no pixel data)."""
    cfg, cid = job.cfg, job.case_id
    series = scan_study(job.study_dir, cid)
    if not series:
        raise IngestError(f"no DICOM files found below {job.study_dir}", cid)
    sel = classify_study(series, rules, cid, cfg.adc_source, cfg.adc_min_b, cfg.adc_max_b)
    if cfg.reference_role != "dce" and cfg.reference_role not in sel.roles:
        raise IngestError(f"reference role {cfg.reference_role!r} has no series in the study", cid)
    if cfg.pre_source == "t1_pre" and "t1_pre" not in sel.roles:
        raise IngestError("pre_source='t1_pre' but the study has no t1_pre series", cid)
    return sel


def read_study(job: IngestJob, sel: StudySelection) -> StudyData:
    """Stage 2: read every chosen series; the DCE time points must share one grid; no NaN/Inf or constant image."""
    cid = job.case_id
    frames = [read_frame(tp.frame, tp.geom, cid, tp.series.label) for tp in sel.dce]
    for tp, img in zip(sel.dce, frames):
        if not _same_grid(img, frames[0]):
            raise IngestError(
                f"DCE time point {tp.time_s:g} s lies on another grid than the first time point", cid, tp.series.label
            )
    dce4 = np.stack([sitk_to_array(f) for f in frames], axis=-1)
    for k, tp in enumerate(sel.dce):
        _check_values(dce4[..., k], cid, tp.series.label, f"DCE time point {k} ({tp.time_s:g} s)")
    native: dict[str, sitk.Image] = {}
    for role, s in sel.roles.items():
        if role == "adc" and sel.adc_plan is not None:  # fitted from the DWI (common.ingest.adc)
            img = compute_adc(sel.adc_plan, cid, job.cfg.adc_background)
            _check_values(sitk.GetArrayViewFromImage(img), cid, s.label, "ADC fitted from the DWI")
            native[role] = img
            continue
        g = sel.geoms[role]
        img = read_frame(g.frames[0], g, cid, s.label)
        _check_values(sitk.GetArrayViewFromImage(img), cid, s.label, role)
        native[role] = img
    return StudyData(sel, frames, dce4, native)


def load_organ_mask(job: IngestJob) -> OrganMask | None:
    """The organ mask (:func:`find_mask`) as a binary 3D image in scanner space, or None."""
    cid = job.case_id
    mask_path = find_mask(job.cfg, job.study_dir, cid)
    if mask_path is None:
        return None
    try:
        m_arr, m_aff = load_nifti(mask_path)
    except (FileNotFoundError, ValueError) as e:
        raise IngestError(f"organ mask: {e}", cid) from e
    if m_arr.ndim == 4 and m_arr.shape[-1] == 1:
        m_arr = m_arr[..., 0]
    if m_arr.ndim != 3 or not (m_arr > 0.5).any():
        raise IngestError(f"organ mask {mask_path} must be a non-empty 3D volume, got shape {m_arr.shape}", cid)
    return OrganMask(mask_path, array_to_sitk((m_arr > 0.5).astype(np.float32), m_aff))


def pick_phases(job: IngestJob, study: StudyData, mask: OrganMask | None) -> PhaseChoice:
    """Stage 3: contrast arrival on the mean curve of the arrival mask, and the phases (:func:`common.dce.select_phases`)."""
    cfg = job.cfg
    times, dce4 = study.times, study.dce4
    try:
        spec = dce_mod.phase_rule(cfg.phase_rule, cfg.phases)
    except ValueError as e:
        raise IngestError(str(e), job.case_id) from None
    names = list(dce_mod.DEFAULT_PHASES)
    curve_mask_kind = cfg.arrival_mask
    if not any(n not in spec for n in names if n != "late"):  # every phase given: no curve needed
        return PhaseChoice(
            dce_mod.select_phases(times, None, spec, names, cfg.early_delay_s),
            None,
            None,
            curve_mask_kind,
            cfg.pre_source,
            cfg.phase_rule,
        )
    if curve_mask_kind == "organ" and mask is not None:
        m_ref = sitk_to_array(resample_to(mask.native, study.ref_frame, None, "nearest")) > 0.5
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
        raise IngestError(f"DCE phase selection failed: {e}", job.case_id) from e
    return PhaseChoice(phases, arrival, curve, curve_mask_kind, cfg.pre_source, cfg.phase_rule)


def _register_all(job: IngestJob, study: StudyData, ref_fixed: sitk.Image, dce_fixed: sitk.Image):
    """Rigid transforms (fixed -> moving) and manifest records of every role but the reference.

    Roles in ``share_transforms`` go last and reuse their source's transform when both lie on one grid."""
    cfg, sel, native = job.cfg, study.sel, study.native
    records: dict[str, dict[str, Any]] = {}
    transforms: dict[str, sitk.Transform | None] = {}
    moving_roles = [r for r in native if r != cfg.reference_role] + (["dce"] if cfg.reference_role != "dce" else [])
    moving_roles.sort(key=lambda r: r in cfg.share_transforms)
    for role in moving_roles:
        mov = dce_fixed if role == "dce" else native[role]
        label = sel.dce[0].series.label if role == "dce" else sel.roles[role].label
        src = cfg.share_transforms.get(role)
        if src and src in transforms and src in native and _same_grid(native[src], mov):
            transforms[role] = transforms[src]
            records[role] = dict(records[src], shared_from=src)
            continue
        if not cfg.register:
            transforms[role] = None
            records[role] = {"transform": "identity (registration off)"}
            continue
        res: RigidResult = register_rigid(ref_fixed, mov, cfg.registration, role, job.case_id, label)
        transforms[role] = res.transform
        records[role] = res.to_dict()
    return records, transforms


def register_study(job: IngestJob, study: StudyData, choice: PhaseChoice, mask: OrganMask | None) -> Registration:
    """Stage 4: register every modality onto the reference grid and resample it (and the mask) there."""
    cfg, cid = job.cfg, job.case_id
    ref_frame = study.ref_frame
    dce_fixed = array_to_sitk(_dce_fixed(study.dce4, choice.phases, cfg.reference_frame), sitk_affine(ref_frame))
    dce_fixed.CopyInformation(ref_frame)
    if cfg.reference_role == "dce":
        ref_img, ref_fixed, ref_label = ref_frame, dce_fixed, "dce"
    else:
        ref_img = study.native[cfg.reference_role]
        ref_fixed, ref_label = ref_img, cfg.reference_role
    records, transforms = _register_all(job, study, ref_fixed, dce_fixed)
    volumes = {
        role: sitk_to_array(img)
        if role == cfg.reference_role
        else sitk_to_array(resample_to(img, ref_img, transforms[role], "linear"))
        for role, img in study.native.items()
    }
    if cfg.reference_role == "dce":
        dce_ref = study.dce4
    else:
        dce_ref = np.stack(
            [sitk_to_array(resample_to(f, ref_img, transforms["dce"], "linear")) for f in study.frames], axis=-1
        )
    mask_ref = None
    if mask is not None:
        mt = transforms.get(cfg.mask_role) if cfg.mask_role else None
        if cfg.mask_role and cfg.mask_role not in transforms and cfg.mask_role != cfg.reference_role:
            raise IngestError(f"mask_role {cfg.mask_role!r} has no registered series", cid)
        mask_ref = (sitk_to_array(resample_to(mask.native, ref_img, mt, "nearest")) > 0.5).astype(np.uint8)
        if not mask_ref.any():
            raise IngestError(f"organ mask {mask.path} does not overlap the reference grid", cid)
    frame = cfg.reference_frame if ref_label == "dce" else None
    return Registration(ref_img, ref_label, frame, records, transforms, volumes, dce_ref, mask_ref)


def crop_study(job: IngestJob, choice: PhaseChoice, reg: Registration, mask: OrganMask | None) -> CropWindow:
    """Stage 5: crop/pad every volume to ``crop_size`` around the organ mask's centroid (or the grid centre)."""
    crop_or_pad, mask_centroid = _crop_functions()
    ref_affine = sitk_affine(reg.ref_img)
    size = tuple(int(v) for v in job.cfg.crop_size)
    if reg.mask is not None:
        center, center_source = mask_centroid(reg.mask), f"organ mask centroid ({mask.path})"
    else:
        center, center_source = None, "reference grid centre"

    def crop(arr: np.ndarray):
        return crop_or_pad(arr, ref_affine, size, center_vox=center, pad_value=0.0)

    arrays: dict[str, np.ndarray] = {}
    affine_out = None
    for role, arr in reg.volumes.items():
        arrays[role], affine_out = crop(arr)
    dce_out, affine_dce = crop(reg.dce)
    affine_out = affine_dce if affine_out is None else affine_out
    if not np.allclose(affine_out, affine_dce):
        raise IngestError("crop_or_pad returned different affines for the 3D and 4D volumes", job.case_id)
    for name in PHASE_NAMES:
        arrays[f"dce_{name}"] = dce_out[..., choice.phases[name]]
    if choice.pre_source == "t1_pre":
        arrays["dce_pre"] = arrays["t1_pre"]
    if reg.mask is not None:
        arrays["organ_mask"], _ = crop(reg.mask.astype(np.float32))
    return CropWindow(size, center, center_source, affine_out, arrays, dce_out)


def write_volumes(r: IngestResult, folder: Path) -> CaseFiles:
    """Stage 6a: the case's NIfTI files and ``dce_times.json`` into ``folder`` (and ``native/`` if asked)."""
    study, crop = r.study, r.crop
    outputs: dict[str, str] = {}
    for key, arr in crop.arrays.items():
        dtype = np.uint8 if key == "organ_mask" else np.float32
        save_nifti(arr, crop.affine, folder / f"{key}.nii.gz", dtype=dtype)
        outputs[key] = f"{key}.nii.gz"
    save_nifti(crop.dce, crop.affine, folder / f"{DCE_4D}.nii.gz")
    outputs[DCE_4D] = f"{DCE_4D}.nii.gz"
    save_json(
        {"times_s": [round(float(x), 4) for x in study.times], "time_source": study.sel.time_source}, folder / DCE_TIMES
    )
    outputs["dce_times"] = DCE_TIMES
    native_out: dict[str, str] = {}
    if r.job.cfg.write_native:
        for role, img in study.native.items():
            save_nifti(sitk_to_array(img), sitk_affine(img), folder / "native" / f"{role}.nii.gz")
            native_out[role] = f"native/{role}.nii.gz"
        for name in PHASE_NAMES:
            save_nifti(
                study.dce4[..., r.phases.phases[name]],
                sitk_affine(study.ref_frame),
                folder / "native" / f"dce_{name}.nii.gz",
            )
            native_out[f"dce_{name}"] = f"native/dce_{name}.nii.gz"
        if r.mask is not None:
            save_nifti(
                sitk_to_array(r.mask.native),
                sitk_affine(r.mask.native),
                folder / "native" / "organ_mask.nii.gz",
                dtype=np.uint8,
            )
            native_out["organ_mask"] = "native/organ_mask.nii.gz"
    return CaseFiles(outputs, native_out)


def build_manifest(r: IngestResult, files: CaseFiles, timings: Mapping[str, float]) -> dict[str, Any]:
    """``manifest.json`` of a case from the stages' results; ``timings`` in seconds (rounded to ms)."""
    job, sel = r.job, r.study.sel
    return {
        "kind": "ingest",
        "ingest_version": INGEST_VERSION,
        "case_id": job.case_id,
        "patient_id": next((s.patient_id for s in sel.roles.values() if s.patient_id), sel.dce[0].series.patient_id),
        "source": str(job.study_dir.resolve()),
        "study_uid": sel.study_uid,
        "rules": r.rules.source,
        **r.study.manifest_series(),
        "adc": r.study.adc_record,
        "dce": {**r.study.manifest_dce(), **r.phases.manifest(r.study.times)},
        "reference": r.registration.manifest_reference(),
        "registration": r.registration.records,
        "crop": r.crop.manifest(),
        "organ_mask": str(r.mask.path) if r.mask is not None else None,
        "outputs": files.outputs,
        "native": files.native,
        "config": job.cfg.to_dict(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def write_case(r: IngestResult, timings: dict[str, float], t_start: float) -> dict[str, Any]:
    """Stage 6: write into ``<out_dir>/.tmp-<case>-*``, the manifest last, then rename into place.

    ``timings`` gets ``write_s`` and ``total_s`` (since ``t_start``) before the manifest is made.
    Nothing is left behind when it fails. Returns the manifest."""
    job = r.job
    t = time.perf_counter()
    with atomic_folder(
        job.final, overwrite=job.cfg.overwrite, hint="use overwrite=True to replace it", sweep_stale=True
    ) as tmp:
        files = write_volumes(r, tmp)
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start
        manifest = build_manifest(r, files, timings)
        save_json(manifest, tmp / MANIFEST)  # last: a case counts as done when it has a manifest
    timings["write_s"] = time.perf_counter() - t
    return manifest


def ingest_study(
    study_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    case_id: str | None = None,
    config: IngestConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Ingest one patient's DICOM folder into ``<out_dir>/<case_id>/`` (layout: :mod:`common.layout`).

    Stages (each timed into the manifest's ``timings_s``): :func:`select_series` (``scan_s``),
    :func:`read_study` (``read_s``), :func:`load_organ_mask` + :func:`pick_phases` (``phases_s``),
    :func:`register_study` (``register_s``), :func:`crop_study` (``crop_s``), :func:`write_case`
    (``write_s``; ``total_s``).

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
    job = make_job(study_dir, out_dir, case_id, dataclasses.replace(config or IngestConfig(), **overrides))
    _crop_functions()  # first call imports MONAI: outside the timings
    t_start = time.perf_counter()
    rules = load_rules(job.cfg.rules)
    timings: dict[str, float] = {}
    with _timed(timings, "scan_s"):
        sel = select_series(job, rules)
    with _timed(timings, "read_s"):
        study = read_study(job, sel)
    with _timed(timings, "phases_s"):
        mask = load_organ_mask(job)
        choice = pick_phases(job, study, mask)
    with _timed(timings, "register_s"):
        reg = register_study(job, study, choice, mask)
    with _timed(timings, "crop_s"):
        crop = crop_study(job, choice, reg, mask)
    manifest = write_case(IngestResult(job, rules, study, mask, choice, reg, crop), timings, t_start)
    log.info("patient %s: prepared %s in %.1f s", job.case_id, job.final, time.perf_counter() - t_start)
    return manifest


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
        return {
            "id": case_id,
            "source": folder,
            "status": "ok",
            "seconds": round(time.perf_counter() - t, 2),
            "timings_s": m["timings_s"],
        }
    except IngestError as e:
        err = e.with_context(patient=case_id)
        log.warning("skipping %s: %s", case_id, err)
        return {
            "id": case_id,
            "source": folder,
            "status": "skipped",
            "reason": str(err),
            "seconds": round(time.perf_counter() - t, 2),
        }
    except Exception as e:  # an unexpected failure skips the study too, with its traceback logged
        log.error("skipping %s: unexpected %s: %s\n%s", case_id, type(e).__name__, e, traceback.format_exc())
        return {
            "id": case_id,
            "source": folder,
            "status": "skipped",
            "reason": f"patient {case_id}: unexpected {type(e).__name__}: {e}",
            "seconds": round(time.perf_counter() - t, 2),
        }


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
    leaves nothing behind. Cases already in ``datalist.json`` keep their section (new ones are placed,
    see :func:`common.layout.update_datalist`). Returns a summary ``{"prepared", "existing", "skipped",
    "datalist", "placed" (section -> ids placed now), ...}``.
    """
    cfg = config or IngestConfig()
    out = Path(out)
    src_dir, out_dir = Path(src).expanduser().resolve(), out.expanduser().resolve()
    if out_dir == src_dir or src_dir in out_dir.parents:
        raise IngestError(
            f"--out {out} lies inside --src {src}: the source studies are never written into, and the prepared "
            "cases would be read back as studies; choose a folder outside the source"
        )
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
        with cf.ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads,)
        ) as ex:
            futs = {ex.submit(_run_one, cid, str(folder), str(out), cfg): cid for cid, folder in todo}
            for f in cf.as_completed(futs):
                try:
                    done(f.result())
                except Exception as e:  # a crashed worker process
                    cid = futs[f]
                    done(
                        {
                            "id": cid,
                            "source": str(dict(todo)[cid]),
                            "status": "skipped",
                            "reason": f"patient {cid}: worker crashed: {type(e).__name__}: {e}",
                        }
                    )
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r["id"])
    skipped = [r for r in results if r["status"] != "ok"]
    prepared = [r["id"] for r in results if r["status"] == "ok"]
    save_json(
        {
            "source": str(Path(src).resolve()),
            "skipped": [{k: r[k] for k in ("id", "source", "reason")} for r in skipped],
        },
        out / SKIPPED,
    )
    datalist, placed = update_datalist_if_any(
        out, fractions, seed, {"source": str(Path(src).resolve()), "prepared_by": "common.ingest"}
    )
    return {
        "prepared": prepared,
        "existing": sorted(existing),
        "skipped": [{"id": r["id"], "reason": r["reason"]} for r in skipped],
        "datalist": str(datalist) if datalist else None,
        "placed": {k: v for k, v in placed.items() if v},
        "skipped_json": str(out / SKIPPED),
        "seconds": round(time.perf_counter() - t0, 2),
        "results": results,
    }


def time_ingest(
    study_dir: str | os.PathLike, config: IngestConfig | None = None, keep: str | os.PathLike | None = None
) -> dict[str, float]:
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
