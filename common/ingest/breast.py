"""Breast DCE DICOM study -> one prepared iterunet case; a TCIA folder -> a prepared dataset.

Public breast DCE collections ship the dynamic series in one of two layouts:

- **one series per phase** (TCIA Duke-Breast-Cancer-MRI: ``ax dyn pre``, ``ax dyn 1st pass``,
  ``ax dyn 2nd pass``, ...): the pre-contrast phase and each post-contrast phase are separate series;
- **one multi-phase series** (I-SPY, GE ``Ax Vibrant MultiPhase``): one series whose slices repeat
  at every position, one image per temporal position (``TemporalPositionIdentifier``, else
  ``TriggerTime``, else ``AcquisitionTime``; :func:`common.ingest.series.check_series` splits them);
- and the mix of both: a pre-contrast series and one multi-phase series of the post-contrast phases.

The series are recognised by the rules of ``common/ingest/breast_rules.json`` (same format as the
prostate rules, :mod:`common.ingest.rules`; roles ``pre``, ``post``, ``dynamic``), checked with the
prostate ingest's header checks and read with its geometry-preserving reader (oblique stays oblique).

Times: per phase from the first usable tag of the rules' ``time_tags`` (``AcquisitionTime`` first
for one series per phase, ``TriggerTime`` first for a multi-phase series), in seconds after the
pre-contrast phase; they must be finite and strictly increasing in phase order (the phase number
written in the description, else the series number, or the temporal position), else the study is
refused naming the series. A phase on another grid than the pre-contrast phase (same orientation,
other size / spacing / position) is resampled onto it (linear, scanner space) unless ``resample=False``;
a phase of another *orientation* is always refused: it is another acquisition, not a phase of this one.

Output per case (``<out>/<case>/``, written into a temporary folder and renamed when complete)::

    dce.nii.gz          (x, y, z, t) every phase on the pre-contrast grid, with its exact affine
    dce_times.json      {"times_s": [0.0, ...]} seconds after the pre-contrast phase
    pre.nii.gz          the pre-contrast phase (x, y, z)
    [breast_mask.nii.gz] [lesion_mask.nii.gz]   when given (NIfTI or DICOM SEG, resampled nearest)
    manifest.json       the series used, the layout, the time source, every series seen

and ``<out>/datalist.json`` (seeded split that keeps every case in its section when studies are
added, :func:`common.layout.update_datalist`). CLI: ``scripts/prepare_breast.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from common.geometry import sitk_affine, sitk_to_array
from common.ingest.errors import IngestError
from common.ingest.register import resample_to
from common.ingest.rules import Rules, load_rules
from common.ingest.series import DicomSeries, Frame, SeriesGeometry, check_series, read_frame, scan_study
from common.ingest.study import prefer_series
from common.io import atomic_folder, lossless_dtype, save_json, save_nifti
from common.layout import DATALIST, DCE_TIMES, MANIFEST, update_datalist_if_any

log = logging.getLogger(__name__)

__all__ = [
    "BREAST_ROLES",
    "BREAST_RULES_PATH",
    "BreastPhase",
    "BreastPlan",
    "ingest_breast_study",
    "load_breast_rules",
    "plan_breast_study",
    "prepare_breast_dataset",
    "read_label_image",
]

BREAST_RULES_PATH = Path(__file__).with_name("breast_rules.json")
BREAST_ROLES = ("pre", "post", "dynamic")
LAYOUTS = ("series_per_phase", "multi_phase_series", "pre_series_and_multi_phase_post")
DEFAULT_PHASE_NUMBER = (r"(\d+)\s*(?:st|nd|rd|th)\b", r"\bph(?:ase)?\s*[-_#]?\s*(\d+)", r"post\s*[-_#]?\s*(\d+)")
DEFAULT_TIME_TAGS = {
    "series_per_phase": ("AcquisitionTime", "TriggerTime", "ContentTime"),
    "multi_phase": ("TriggerTime", "AcquisitionTime", "ContentTime"),
}
MASK_NAMES = ("breast_mask", "lesion_mask")
SKIPPED = "skipped.json"
_TIME_OF = {
    "TriggerTime": lambda f: None if f.trigger_time_ms is None else f.trigger_time_ms / 1000.0,
    "AcquisitionTime": lambda f: f.acq_time_s,
    "ContentTime": lambda f: f.content_time_s,
}


def load_breast_rules(rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None) -> Rules:
    """The breast study rules (roles :data:`BREAST_ROLES`): ``rules`` as in :func:`common.ingest.rules.load_rules`,
    default :data:`BREAST_RULES_PATH`. Also checks the ``phase_number`` expressions and ``time_tags``."""
    r = load_rules(rules, known_roles=BREAST_ROLES, reference_role="pre", default=BREAST_RULES_PATH)
    for p in _phase_patterns(r):
        try:
            re.compile(p)
        except re.error as e:
            raise IngestError(f"rules {r.source}: phase_number pattern {p!r} is not a regular expression ({e})") from e
    for layout, tags in _time_tags(r).items():
        bad = [t for t in tags if t not in _TIME_OF]
        if bad:
            raise IngestError(f"rules {r.source}: time_tags.{layout} has unknown tags {bad} (known: {list(_TIME_OF)})")
    return r


def _phase_patterns(rules: Rules) -> tuple[str, ...]:
    return tuple((rules.raw or {}).get("phase_number", DEFAULT_PHASE_NUMBER))


def _time_tags(rules: Rules) -> dict[str, tuple[str, ...]]:
    tags = dict(DEFAULT_TIME_TAGS)
    tags.update({k: tuple(v) for k, v in ((rules.raw or {}).get("time_tags") or {}).items()})
    return tags


def phase_number(description: str, patterns: Sequence[str] = DEFAULT_PHASE_NUMBER) -> int | None:
    """The phase number written in a series description (``ax dyn 2nd pass`` -> 2, ``Ph3/ax 3d dyn`` -> 3)."""
    for p in patterns:
        m = re.search(p, description or "", re.IGNORECASE)
        if m:
            return int(m.group(1))
    return None


@dataclass
class BreastPhase:
    """One phase of the dynamic series: its series, checked geometry, frame (files) and time."""

    series: DicomSeries
    geom: SeriesGeometry
    frame: Frame
    time_s: float
    temporal_position: int | None = None
    resample: bool = False

    def describe(self) -> str:
        tp = f", temporal position {self.temporal_position}" if self.temporal_position is not None else ""
        return f"{self.series.label!r} ({self.series.description!r}{tp})"


@dataclass
class BreastPlan:
    """What :func:`plan_breast_study` found (headers only): the phases in time order and their times.

    Attributes:
        study_dir, case_id: the study folder and the case id.
        layout: ``"series_per_phase"`` or ``"multi_phase_series"``.
        phases: the phases, pre-contrast first; ``phases[i].resample``: on another grid than the pre.
        time_source: the tag the times were read from.
        report: one entry per scanned series: folder, number, description, UID, role, status, reason.
    """

    study_dir: Path
    case_id: str
    layout: str
    phases: list[BreastPhase]
    time_source: str
    study_uid: str = ""
    patient_id: str = ""
    report: list[dict[str, Any]] = field(default_factory=list)

    @property
    def times_s(self) -> list[float]:
        return [p.time_s for p in self.phases]


def _first_ipp(s: DicomSeries, frame: Frame) -> np.ndarray:
    path = frame.files[0]
    h = next(h for h in s.headers if h.path == path)
    return np.asarray(h.ipp, float)


def _grid_difference(ref: BreastPhase, p: BreastPhase) -> str | None:
    """Why ``p`` is not on ``ref``'s voxel grid (same orientation assumed), or None."""
    a, b = ref.geom, p.geom
    if (a.rows, a.cols, len(a.positions)) != (b.rows, b.cols, len(b.positions)):
        return f"{b.cols}x{b.rows}x{len(b.positions)} voxels vs {a.cols}x{a.rows}x{len(a.positions)}"
    if (
        np.abs(np.subtract(a.pixel_spacing, b.pixel_spacing)).max() > 1e-4
        or abs(a.slice_spacing - b.slice_spacing) > 1e-3
    ):
        return (
            f"spacing {b.pixel_spacing[1]:.4g}x{b.pixel_spacing[0]:.4g}x{b.slice_spacing:.4g} mm vs "
            f"{a.pixel_spacing[1]:.4g}x{a.pixel_spacing[0]:.4g}x{a.slice_spacing:.4g} mm"
        )
    d = float(np.abs(_first_ipp(ref.series, ref.frame) - _first_ipp(p.series, p.frame)).max())
    if d > 1e-2:
        return f"first slice {d:.3g} mm away from the pre-contrast phase's"
    return None


def _orientation_difference(ref: SeriesGeometry, g: SeriesGeometry) -> float:
    return float(max(np.abs(ref.row - g.row).max(), np.abs(ref.col - g.col).max()))


def _series_number(s: DicomSeries) -> int:
    return s.number if s.number is not None else 10**9


def _assign_times(phases: list[BreastPhase], tags: Sequence[str], patient: str) -> str:
    """Fill ``time_s`` (seconds after the first phase) from the first usable tag; check them. Returns the tag."""
    for tag in tags:
        vals = [_TIME_OF[tag](p.frame) for p in phases]
        if any(v is None for v in vals) or len(set(vals)) == 1:
            continue  # absent for a phase, or the same for all (e.g. TriggerTime 0 everywhere)
        t = np.asarray(vals, float) - float(vals[0])
        for i, p in enumerate(phases):
            if not np.isfinite(t[i]):
                raise IngestError(f"{tag} of phase {i} is not a finite number", patient, p.series.label)
        for i in range(1, len(phases)):
            if not t[i] > t[i - 1]:
                what = "duplicated" if t[i] == t[i - 1] else "earlier than the phase before"
                raise IngestError(
                    f"phase {i} {phases[i].describe()} has {tag} {t[i]:.3f} s after the pre-contrast phase, "
                    f"{what} (phase {i - 1} {phases[i - 1].describe()} at {t[i - 1]:.3f} s): phase times must be "
                    "strictly increasing in phase order",
                    patient,
                    phases[i].series.label,
                )
        for p, ti in zip(phases, t):
            p.time_s = float(ti)
        return tag
    raise IngestError(
        f"no usable time tag for the {len(phases)} phases ({', '.join(tags)}: absent for a phase or equal for all): "
        f"{', '.join(p.describe() for p in phases)}",
        patient,
    )


def _phase_order(items: list, patterns) -> tuple[list, str]:
    """Single-phase series ``(series, geometry)`` in phase order, and how it was decided: by the phase
    number in their descriptions when every one has a distinct number, else by SeriesNumber."""
    nums = [phase_number(s.description, patterns) for s, _ in items]
    if all(n is not None for n in nums) and len(set(nums)) == len(nums):
        return [it for _, it in sorted(zip(nums, items), key=lambda x: x[0])], "phase number in the description"
    return sorted(items, key=lambda it: _series_number(it[0])), "series number"


def plan_breast_study(
    study_dir: str | os.PathLike,
    rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None,
    case_id: str | None = None,
    resample: bool = True,
) -> BreastPlan:
    """Find, check and order the DCE phases of a breast study (headers only; nothing is written).

    Layout choice: a ``pre`` series and at least one ``post`` series -> one series per phase (pre, then
    the posts ordered by the phase number in their descriptions, else by series number); else a ``pre`` series
    and a multi-phase ``post`` series -> the pre, then the post's temporal positions; else the
    ``pre``/``post``/``dynamic`` series with the most temporal positions (at least 2) -> a multi-phase series;
    else two or more single-volume ``dynamic`` series -> one series per phase, the first the pre-contrast.

    Raises:
        IngestError: no dynamic series; a phase of another orientation than the pre-contrast phase; a phase on
            another grid with ``resample=False``; times absent, not finite or not strictly increasing; a
            temporal position count that disagrees with ``NumberOfTemporalPositions``. The message names
            the study (case id) and the series.
    """
    study_dir = Path(study_dir)
    patient = case_id or study_dir.name
    rules = load_breast_rules(rules)
    patterns = _phase_patterns(rules)
    series = scan_study(study_dir, patient)
    if not series:
        raise IngestError(f"{study_dir}: no DICOM series found", patient)
    report: dict[int, dict[str, Any]] = {}

    def note(s, role, status, reason):
        report[id(s)] = {**s.summary(), "role": role, "status": status, "reason": reason}

    roles = {
        id(s): rules.classify(s.description, s.image_type) if s.headers else (None, "no readable file") for s in series
    }
    studies: dict[str, list[DicomSeries]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    study_uid = max(studies.items(), key=lambda kv: (sum(roles[id(s)][0] is not None for s in kv[1]), len(kv[1])))[0]
    cands: dict[str, list[tuple[DicomSeries, SeriesGeometry]]] = {r: [] for r in BREAST_ROLES}
    for s in series:
        role, why = roles[id(s)]
        if s.study_uid != study_uid:
            note(s, None, "ignored", f"ignored: belongs to another study ({s.study_uid})")
        elif role is None:
            note(s, None, "ignored", why if s.headers else "ignored: no readable DICOM file")
        else:
            geom = check_series(s, patient)  # a broken dynamic series stops the study: its phases are needed
            cands[role].append((s, geom))
            note(s, role, "candidate", why)

    pre_single = [(s, g) for s, g in cands["pre"] if len(g.frames) == 1]
    post_single = [(s, g) for s, g in cands["post"] if len(g.frames) == 1]
    multi = [(s, g) for r in BREAST_ROLES for s, g in cands[r] if len(g.frames) > 1]
    dyn_single = [(s, g) for s, g in cands["dynamic"] if len(g.frames) == 1]
    phases: list[BreastPhase]
    multi_post = [(s, g) for s, g in cands["post"] if len(g.frames) > 1]
    pre, pre_why = prefer_series(rules.role("pre").prefer, pre_single) if pre_single else (None, "")
    if pre_single and post_single:
        layout = "series_per_phase"
        posts, order = _phase_order(post_single, patterns)
        for s, _ in pre_single:
            if s is not pre[0]:
                note(s, "pre", "ignored", f"ignored: another pre-contrast series was chosen ({pre_why})")
        chosen = [pre, *posts]
    elif pre_single and multi_post:
        layout, order = "pre_series_and_multi_phase_post", "the pre-contrast series, then temporal position"
        best = max(multi_post, key=lambda it: (len(it[1].frames), _series_number(it[0])))
        chosen = [pre, best]
    elif multi:
        layout, order = "multi_phase_series", "temporal position"
        best = max(multi, key=lambda it: (len(it[1].frames), _series_number(it[0])))
        chosen = [best]
        for s, g in multi:
            if s is not best[0]:
                note(
                    s,
                    roles[id(s)][0],
                    "ignored",
                    f"ignored: another multi-phase series has more phases ({len(g.frames)})",
                )
    elif len(dyn_single) >= 2:
        layout = "series_per_phase"
        chosen, order = _phase_order(dyn_single, patterns)
        order += " (the first is the pre-contrast phase)"
    else:
        seen = "; ".join(f"{s.label!r} ({s.description!r}: {report[id(s)]['reason']})" for s in series[:40])
        raise IngestError(
            f"{study_dir}: no breast DCE phases found: need a pre-contrast series and post-contrast series, or one "
            f"multi-phase series (rules {rules.source}). Series seen: {seen}. Pass --rules with patterns for their "
            "SeriesDescription if they are there",
            patient,
        )
    if layout == "series_per_phase":
        phases = [BreastPhase(s, g, g.frames[0], 0.0) for s, g in chosen]
        tags = _time_tags(rules)["series_per_phase"]
    else:
        s, g = chosen[-1]
        n_declared = _declared_positions(s)
        if n_declared is not None and n_declared != len(g.frames):
            raise IngestError(
                f"NumberOfTemporalPositions says {n_declared} but the series holds {len(g.frames)} images per slice "
                "position: a temporal position is missing or duplicated",
                patient,
                s.label,
            )
        phases = [BreastPhase(s, g, f, 0.0, f.temporal_position) for f in g.frames]
        tags = _time_tags(rules)["multi_phase"]
        if layout == "pre_series_and_multi_phase_post":  # times across two series: the scanner clock first
            phases.insert(0, BreastPhase(pre[0], pre[1], pre[1].frames[0], 0.0))
            tags = _time_tags(rules)["series_per_phase"]
    if len(phases) < 2:
        raise IngestError(
            f"the dynamic series has a single phase ({phases[0].describe()}); 2 or more are needed", patient
        )
    ref = phases[0]
    for i, p in enumerate(phases[1:], 1):
        if p.series is ref.series:
            continue
        dev = _orientation_difference(ref.geom, p.geom)
        if dev > 1e-3:
            raise IngestError(
                f"phase {i} has another orientation than the pre-contrast phase {ref.describe()}: "
                f"ImageOrientationPatient {np.round(np.r_[p.geom.row, p.geom.col], 4).tolist()} vs "
                f"{np.round(np.r_[ref.geom.row, ref.geom.col], 4).tolist()}; a phase of another orientation is "
                "refused (not resampled): it is not the same dynamic acquisition",
                patient,
                p.series.label,
            )
        why = _grid_difference(ref, p)
        if why:
            if not resample:
                raise IngestError(
                    f"phase {i} lies on another grid than the pre-contrast phase {ref.describe()} ({why}); "
                    "it is refused because resampling is off (--resample true resamples it onto the pre-contrast grid)",
                    patient,
                    p.series.label,
                )
            p.resample = True
            log.warning("%s: phase %d %s: %s; resampled onto the pre-contrast grid", patient, i, p.describe(), why)
    source = _assign_times(phases, tags, patient)
    for s, _ in chosen:
        report[id(s)]["status"] = "used"
    used = {id(p.series) for p in phases}
    for s, _ in [it for r in BREAST_ROLES for it in cands[r]]:
        if id(s) not in used and report[id(s)]["status"] == "candidate":
            report[id(s)].update(status="ignored", reason=f"{report[id(s)]['reason']}; not part of the chosen phases")
    log.info(
        "%s: %d phases (%s, ordered by %s), %s s after the pre-contrast phase (%s)",
        patient,
        len(phases),
        layout,
        order,
        [round(p.time_s, 1) for p in phases],
        source,
    )
    return BreastPlan(
        study_dir=study_dir,
        case_id=patient,
        layout=layout,
        phases=phases,
        time_source=f"{source} (ordered by {order})",
        study_uid=study_uid,
        patient_id=chosen[0][0].patient_id,
        report=[report[id(s)] for s in series if id(s) in report],
    )


def _declared_positions(s: DicomSeries) -> int | None:
    import pydicom

    try:
        ds = pydicom.dcmread(s.headers[0].path, stop_before_pixels=True, specific_tags=["NumberOfTemporalPositions"])
    except Exception:  # the header was read once already; a second failure is not this check's business
        return None
    v = ds.get("NumberOfTemporalPositions")
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------
# masks


def _is_dicom_seg(path: Path) -> bool:
    if path.is_dir():
        return True
    if path.name.endswith((".nii", ".nii.gz")):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except Exception:
        return False
    return str(ds.get("Modality", "")) == "SEG"


def read_dicom_seg(path: str | os.PathLike, reference: sitk.Image, name: str = "mask") -> np.ndarray:
    """A DICOM SEG (one file, or a folder holding one) as a uint8 label array (x, y, z) on ``reference``'s grid.

    Segment ``n`` is labelled ``n``. Each frame is placed by its ``ImagePositionPatient``; the SEG must lie on
    the reference slices (same orientation, pixel spacing and size; frames at reference slice positions),
    which is how segmentations drawn on the pre-contrast (or any phase) of the study are stored.

    Raises:
        IngestError: not a SEG, or frames that do not lie on the reference grid (naming the file).
    """
    import pydicom

    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        segs = [p for p in files if _is_dicom_seg(p)]
        if len(segs) != 1:
            raise IngestError(f"{name} {path}: expected one DICOM SEG file in the folder, found {len(segs)}")
        path = segs[0]
    try:
        ds = pydicom.dcmread(str(path))
        frames = np.asarray(ds.pixel_array)
    except Exception as e:
        raise IngestError(f"{name} {path}: cannot read the DICOM SEG ({type(e).__name__}: {e})") from e
    if str(ds.get("Modality", "")) != "SEG":
        raise IngestError(f"{name} {path}: not a DICOM SEG (Modality {ds.get('Modality', '')!r})")
    if frames.ndim == 2:
        frames = frames[None]
    size = reference.GetSize()
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    spacing = np.array(reference.GetSpacing())
    origin = np.array(reference.GetOrigin())
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
        ps = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, float)
        per_frame = ds.PerFrameFunctionalGroupsSequence
    except (AttributeError, IndexError) as e:
        raise IngestError(f"{name} {path}: SEG lacks the plane orientation / pixel measures / per-frame groups") from e
    if (
        np.abs(iop[:3] - direction[:, 0]).max() > 1e-3
        or np.abs(iop[3:] - direction[:, 1]).max() > 1e-3
        or abs(ps[0] - spacing[1]) > 1e-3
        or abs(ps[1] - spacing[0]) > 1e-3
        or (int(ds.Columns), int(ds.Rows)) != (size[0], size[1])
    ):
        raise IngestError(
            f"{name} {path}: the SEG is not on the pre-contrast grid (orientation {np.round(iop, 4).tolist()}, pixel "
            f"spacing {ps.tolist()}, {ds.Columns}x{ds.Rows}); export it on the pre-contrast series or pass a NIfTI"
        )
    out = np.zeros(size, np.uint8)
    inv = np.linalg.inv(direction * spacing)
    for k, fg in enumerate(per_frame):
        try:
            ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float)
            seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        except (AttributeError, IndexError) as e:
            raise IngestError(f"{name} {path}: frame {k + 1} lacks its position or segment number") from e
        ijk = inv @ (ipp - origin)
        z = int(round(ijk[2]))
        if np.abs(ijk[:2]).max() > 1e-2 or abs(ijk[2] - z) > 1e-2 or not 0 <= z < size[2]:
            raise IngestError(
                f"{name} {path}: frame {k + 1} at {np.round(ipp, 2).tolist()} is not a slice of the pre-contrast grid"
            )
        out[:, :, z][frames[k].T > 0] = seg_no
    return out


def read_label_image(path: str | os.PathLike, reference: sitk.Image, name: str = "mask") -> np.ndarray:
    """A label file (NIfTI in scanner space, or DICOM SEG) as uint8 (x, y, z) on ``reference``'s grid
    (NIfTI: nearest-neighbour resampling through the scanner coordinates; identical when on the grid)."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{name} {path}: file not found")
    if _is_dicom_seg(path):
        return read_dicom_seg(path, reference, name)
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as e:
        raise IngestError(
            f"{name} {path}: cannot read it as NIfTI or DICOM SEG ({str(e).strip().splitlines()[-1]})"
        ) from e
    if img.GetDimension() != 3:
        raise IngestError(f"{name} {path}: a 3D label image is needed, got {img.GetDimension()}D")
    if not np.any(sitk.GetArrayViewFromImage(img)):
        raise IngestError(f"{name} {path}: the mask is empty (no labelled voxel)")
    arr = sitk_to_array(resample_to(img, reference, None, "nearest"))
    if not np.any(arr):
        raise IngestError(
            f"{name} {path}: no labelled voxel falls inside the pre-contrast grid: the mask is not in this study's "
            "scanner space"
        )
    return np.rint(arr).astype(np.uint8)


def _mask_for(spec: str | os.PathLike | None, case_id: str, n_cases: int, name: str) -> Path | None:
    """A mask file for ``case_id``: ``spec`` itself when it is a file (one study) or a DICOM SEG folder, else
    ``<spec>/<case>.nii.gz``, ``<spec>/<case>/<name>.nii.gz``, ``<spec>/<case>*.nii*`` or ``<spec>/<case>/`` (SEG)."""
    if spec in (None, ""):
        return None
    p = Path(spec)
    if p.is_file():
        if n_cases > 1:
            raise IngestError(
                f"--{name} {p} is one file but there are {n_cases} studies: pass a folder with <case>.nii.gz"
            )
        return p
    if not p.is_dir():
        raise IngestError(f"--{name} {p}: not found")
    for cand in (p / f"{case_id}.nii.gz", p / f"{case_id}.nii", p / case_id / f"{name}.nii.gz", p / f"{case_id}.dcm"):
        if cand.is_file():
            return cand
    hits = sorted(p.glob(f"{case_id}*.nii*"))
    if hits:
        return hits[0]
    for folder in (p / case_id, p) if n_cases == 1 else (p / case_id,):
        if folder.is_dir() and any(_is_dicom_seg(f) for f in folder.iterdir() if f.is_file()):
            return folder
    log.warning(
        "%s: no %s in %s (<case>.nii.gz, <case>/%s.nii.gz or a DICOM SEG); prepared without", case_id, name, p, name
    )
    return None


# ------------------------------------------------------------------------------------------
# one study


def read_phases(plan: BreastPlan) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    """Read the planned phases: ``(dce (x, y, z, t) float32, 4x4 RAS+ affine of the pre phase, pre image)``."""
    ref_img = None
    vols = []
    for i, p in enumerate(plan.phases):
        img = read_frame(p.frame, p.geom, plan.case_id, p.series.label)
        if ref_img is None:
            ref_img = img
        elif p.resample:
            img = resample_to(img, ref_img, None, "linear")
        arr = sitk_to_array(img)
        if not np.all(np.isfinite(arr)):
            raise IngestError(f"phase {i}: NaN/Inf voxel values", plan.case_id, p.series.label)
        vols.append(arr.astype(np.float32))
    return np.stack(vols, -1), sitk_affine(ref_img), ref_img


def ingest_breast_study(
    study_dir: str | os.PathLike,
    out: str | os.PathLike,
    case_id: str | None = None,
    rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None,
    resample: bool = True,
    breast_mask: str | os.PathLike | None = None,
    lesion_mask: str | os.PathLike | None = None,
    overwrite: bool = False,
    plan: BreastPlan | None = None,
) -> dict[str, Any]:
    """One breast DCE DICOM study -> ``<out>/<case_id>/`` (see the module docstring); returns the manifest.

    Args:
        study_dir: the patient (or study) folder, one sub-folder per series.
        out: dataset root (never inside ``study_dir``).
        case_id: default the folder name.
        rules: rules JSON path / dict / None (:data:`BREAST_RULES_PATH`).
        resample: resample a phase on another grid onto the pre-contrast grid (False: refuse it).
        breast_mask, lesion_mask: optional label files (NIfTI in the scanner space of the study, or a DICOM SEG
            on the pre-contrast slices).
        overwrite: replace an existing case.
        plan: a plan made already by :func:`plan_breast_study` (else made here).

    Raises:
        IngestError: see :func:`plan_breast_study`; a mask that cannot be read or placed. Nothing is written then.
        FileExistsError: the case exists and ``overwrite`` is False; ``out`` inside the study.
    """
    study_dir, out = Path(study_dir).resolve(), Path(out)
    if out.resolve() == study_dir or out.resolve().is_relative_to(study_dir):
        raise FileExistsError(f"{out} lies inside the source study {study_dir}: choose another output folder")
    case_id = case_id or study_dir.name
    final = out / case_id
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists: refusing to overwrite it (pass --overwrite true to replace it)")
    plan = plan or plan_breast_study(study_dir, rules, case_id, resample)
    dce, affine, ref_img = read_phases(plan)
    masks = {}
    for name, spec in (("breast_mask", breast_mask), ("lesion_mask", lesion_mask)):
        if spec is not None:
            masks[name] = (read_label_image(spec, ref_img, name), str(spec))
    dtype = lossless_dtype(dce, unsigned=True)
    with atomic_folder(final, overwrite=overwrite, hint="pass --overwrite true to replace it", sweep_stale=True) as tmp:
        files = {"dce": save_nifti(dce, affine, tmp / "dce.nii.gz", dtype=dtype)}
        files["pre"] = save_nifti(dce[..., 0], affine, tmp / "pre.nii.gz", dtype=dtype)
        for name, (arr, _) in masks.items():
            files[name] = save_nifti(arr, affine, tmp / f"{name}.nii.gz", dtype=np.uint8)
        save_json({"times_s": plan.times_s}, tmp / DCE_TIMES)
        manifest = {
            "id": case_id,
            "kind": "breast",
            "source": str(study_dir),
            "study_uid": plan.study_uid,
            "patient_id": plan.patient_id,
            "layout": plan.layout,
            "times_s": plan.times_s,
            "time_source": plan.time_source,
            "phases": [
                {
                    "index": i,
                    "folder": p.series.label,
                    "series_uid": p.series.uid,
                    "series_number": p.series.number,
                    "description": p.series.description,
                    "temporal_position": p.temporal_position,
                    "time_s": p.time_s,
                    "resampled": p.resample,
                }
                for i, p in enumerate(plan.phases)
            ],
            "grid": {
                "shape": list(dce.shape),
                "affine": np.asarray(affine).tolist(),
                "reference": "pre-contrast phase",
            },
            "masks": {name: src for name, (_, src) in masks.items()},
            "files": {k: Path(v).name for k, v in files.items()} | {"dce_times": DCE_TIMES},
            "series": plan.report,
            "config": {"rules": load_breast_rules(rules).source, "resample": resample},
        }
        save_json(manifest, tmp / MANIFEST)  # last: a case counts as done when it has a manifest
    log.info("%s: prepared %s (%d phases, %s)", case_id, final, dce.shape[-1], plan.layout)
    return manifest


# ------------------------------------------------------------------------------------------
# a dataset


def _breast_entries(root: Path) -> None:
    """Add the breast keys (``pre``, ``breast_mask``, ``dce_times``) to every entry of ``<root>/datalist.json``
    (:func:`common.layout.update_datalist` lists the prostate keys; ``lesion_mask`` and ``dce`` it has)."""
    path = root / DATALIST
    datalist = json.loads(path.read_text())
    for section in ("training", "validation", "test"):
        for e in datalist.get(section, []):
            case = root / e["id"]
            for key in ("pre", "breast_mask", "lesion_mask"):
                if (case / f"{key}.nii.gz").is_file():
                    e[key] = f"{e['id']}/{key}.nii.gz"
            if (case / DCE_TIMES).is_file():
                e["dce_times"] = f"{e['id']}/{DCE_TIMES}"
    save_json(datalist, path)


def prepare_breast_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None,
    resample: bool = True,
    breast_mask: str | os.PathLike | None = None,
    lesion_mask: str | os.PathLike | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Every breast DCE study below ``src`` (a TCIA root ``<patient>/<study>/<series>/``, a patient or a study
    folder) -> prepared cases in ``out`` + ``datalist.json``.

    Every study is planned (headers only: series, orientation, grids, times) before anything is written: a bad
    study stops the run with one line naming it, its series and the problem, and nothing is written, unless
    ``skip_bad`` (then it is listed in ``skipped.json`` and the others are prepared). Cases already prepared
    (``<out>/<id>/manifest.json``) are kept unless ``overwrite``; cases already in ``datalist.json`` keep their
    section (new ones are placed by :func:`common.layout.extend_split`), so adding studies never moves a
    held-out case into training.

    ``breast_mask`` / ``lesion_mask``: one file (a single study) or a folder with ``<case>.nii.gz``,
    ``<case>/<name>.nii.gz`` or ``<case>/`` holding a DICOM SEG.

    Returns:
        ``{"prepared", "existing", "skipped", "datalist", "placed"}``.
    """
    from common.ingest.pipeline import find_patients

    rules = load_breast_rules(rules)
    out = Path(out)
    src_dir, out_dir = Path(src).expanduser().resolve(), out.expanduser().resolve()
    if out_dir == src_dir or src_dir in out_dir.parents:
        raise IngestError(
            f"--out {out} lies inside --src {src}: the source studies are never written into; choose another folder"
        )
    patients = find_patients(src)
    ids = [cid for cid, _ in patients]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise IngestError(f"{src}: patient folders map to the same case id: {dups}")
    todo, existing, skipped = [], [], []
    for cid, folder in patients:
        if (out / cid / MANIFEST).exists() and not overwrite:
            existing.append(cid)
            continue
        masks = {
            n: _mask_for(spec, cid, len(patients), n)
            for n, spec in (("breast_mask", breast_mask), ("lesion_mask", lesion_mask))
        }
        try:
            plan = plan_breast_study(folder, rules, cid, resample)
        except IngestError as e:
            if not skip_bad:
                raise e.with_context(patient=cid) from None
            skipped.append({"id": cid, "source": str(folder), "reason": str(e.with_context(patient=cid))})
            log.warning("skipping %s: %s", cid, e)
            continue
        todo.append((cid, folder, plan, masks))
    prepared = []
    for cid, folder, plan, masks in todo:
        try:
            ingest_breast_study(folder, out, cid, rules, resample, overwrite=overwrite, plan=plan, **masks)
        except IngestError as e:
            if not skip_bad:
                raise e.with_context(patient=cid) from None
            skipped.append({"id": cid, "source": str(folder), "reason": str(e.with_context(patient=cid))})
            continue
        prepared.append(cid)
    if skip_bad or skipped:
        save_json({"source": str(src_dir), "skipped": skipped}, out / SKIPPED)
    datalist, placed = update_datalist_if_any(
        out, fractions, seed, {"source": str(src_dir), "prepared_by": "common.ingest.breast"}
    )
    if datalist is not None:
        _breast_entries(out)
    return {
        "prepared": prepared,
        "existing": sorted(existing),
        "skipped": [{"id": s["id"], "reason": s["reason"]} for s in skipped],
        "datalist": str(datalist) if datalist else None,
        "placed": {k: v for k, v in placed.items() if v},
    }
