"""Raw brain MRI study -> one BraTS-layout case on the T1 grid (for the D3M bundle).

Two entry points: :func:`prepare_brain_case` (NIfTI files or SimpleITK images, one per contrast) and
:func:`ingest_brain_study` (a DICOM study folder: the series are found by the rules of
:func:`common.ingest.rules.load_brain_rules`, read with the ingest's checked reader, then prepared as
above, with a ``manifest.json`` naming the source series).

T2, FLAIR and T1c are rigidly registered onto T1 (:func:`common.ingest.register.register_rigid`,
Mattes MI, SimpleITK) and resampled onto the T1 grid (linear); T1 is copied with its own affine,
so every written file carries exactly the T1 affine. Optional label files (``seg``: BraTS labels,
``brain_mask``) are resampled with nearest neighbour (they must already be in the scanner space
of T1). Skull stripping needs model weights and is out of scope: pass a brain mask when you have
one (``<case>-brain_mask.nii.gz`` is then used for the "brain" region and the slice sampling).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from common.geometry import sitk_affine, sitk_to_array
from common.ingest.errors import IngestError
from common.ingest.register import RegistrationSettings, register_rigid, resample_to
from common.ingest.rules import Rules, load_brain_rules
from common.ingest.series import DicomSeries, SeriesGeometry, check_series, read_frame, scan_study
from common.ingest.study import prefer_series
from common.io import save_json, save_nifti
from common.layout import MANIFEST

log = logging.getLogger(__name__)

__all__ = [
    "MOVING",
    "BrainSelection",
    "brain_settings",
    "check_out_outside",
    "check_same_grid",
    "ingest_brain_study",
    "prepare_brain_case",
    "select_brain_series",
]

MOVING = {"t2w": "t2", "t2f": "flair", "t1c": "t1c"}  # BraTS key -> argument name
#: a contrast given as a file path or as an image already read (e.g. from DICOM)
Source = Union[str, os.PathLike, sitk.Image]


#: default bounds of the brain registration (mm, degrees): see :func:`brain_settings`.
MAX_TRANSLATION_MM, MAX_ROTATION_DEG = 25.0, 20.0


def brain_settings(
    max_translation_mm: float = MAX_TRANSLATION_MM, max_rotation_deg: float = MAX_ROTATION_DEG
) -> RegistrationSettings:
    """The ingest's rigid settings with wider bounds: series of one brain study can be minutes apart
    with head motion (TCGA-FG-6692: T2 and FLAIR 15-18 mm / 3-15 deg from T1, checked visually)."""
    return RegistrationSettings(max_translation_mm=max_translation_mm, max_rotation_deg=max_rotation_deg)


def _is_path(x: Any) -> bool:
    return x is not None and not isinstance(x, sitk.Image)


def _read(x: Source, name: str = "image") -> sitk.Image:
    """``x`` as a float32 SimpleITK image; a file that is not an image is named in one line."""
    if isinstance(x, sitk.Image):
        return x
    try:
        return sitk.ReadImage(str(x), sitk.sitkFloat32)
    except RuntimeError as e:  # SimpleITK's message is a multi-line ITK exception dump
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unable to determine ImageIO" in ln or "could not" in ln.lower()), "")
        raise ValueError(
            f"{name} file {x}: cannot be read as an image (not NIfTI/NRRD/MHA or truncated"
            f"{': ' + why[:160] if why else ''})"
        ) from None


def check_out_outside(
    src: str | os.PathLike, out: str | os.PathLike, src_option: str = "src", out_option: str = "out"
) -> None:
    """Refuse an output folder equal to or inside the source folder (outputs never go into the
    source): ``FileExistsError`` naming both options."""
    srcp, outp = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if outp == srcp or outp.is_relative_to(srcp):
        raise FileExistsError(
            f"--{out_option} {out} lies inside --{src_option} {srcp}: outputs never go into the source folder; "
            f"choose an --{out_option} outside it"
        )


def prepare_brain_case(
    t1: Source,
    t2: Source,
    flair: Source,
    out: str | Path,
    case: str,
    t1c: Source | None = None,
    seg: str | Path | None = None,
    brain_mask: str | Path | None = None,
    settings: RegistrationSettings | None = None,
    register: bool = True,
) -> dict:
    """Write ``<out>/<case>/<case>-{t1n,t2w,t2f[,t1c][,seg][,brain_mask]}.nii.gz`` + ``registration.json``.

    Args:
        t1, t2, flair, t1c: NIfTI files (or SimpleITK images, float32) of one study, each on its own
            grid (t1c optional: without it the case can only be used for inference).
        out: root of the BraTS-layout folder (never the folder of the inputs).
        case: case folder name.
        seg, brain_mask: optional label files on (or in the scanner space of) the T1.
        settings: rigid registration settings (default :func:`brain_settings`).
        register: ``False`` only resamples through the scanner geometry (identity transform).
    Returns: ``{"case", "files": {key: path}, "registration": {key: result dict}}``.
    Raises: ``FileNotFoundError`` naming a missing input; :class:`IngestError` when a registration fails.
    """
    inputs = {"t1": t1, "t2": t2, "flair": flair, "t1c": t1c, "seg": seg, "brain_mask": brain_mask}
    for name, f in inputs.items():
        if _is_path(f) and not Path(f).exists():
            raise FileNotFoundError(f"{case}: {name} file {f} does not exist")
    d = Path(out) / case
    src_dirs = {Path(f).resolve().parent for f in inputs.values() if _is_path(f)}
    if any(d.resolve() == sd or d.resolve().is_relative_to(sd) for sd in src_dirs):
        raise FileExistsError(f"{case}: output folder {d} lies in the folder of the inputs; choose another --out")
    settings = settings or brain_settings()
    if isinstance(t1, sitk.Image):
        fixed = sitk.Cast(t1, sitk.sitkFloat32)
        affine, t1_array = sitk_affine(fixed), sitk_to_array(fixed)
    else:
        fixed = _read(t1, "t1")
        ref_nib = nib.load(str(t1))
        affine, t1_array = ref_nib.affine, np.asarray(ref_nib.get_fdata(), np.float32)
    files = {"t1n": save_nifti(t1_array, affine, d / f"{case}-t1n.nii.gz")}
    report: dict[str, Mapping] = {}
    for key, arg in MOVING.items():
        if inputs[arg] is None:
            continue
        moving = _read(inputs[arg], arg)
        tx = None
        if register:
            res = register_rigid(fixed, moving, settings, name=f"{case} {arg}", patient=case, series=arg)
            tx, report[key] = res.transform, res.to_dict()
        arr = sitk_to_array(resample_to(moving, fixed, tx, "linear"))
        files[key] = save_nifti(arr.astype(np.float32), affine, d / f"{case}-{key}.nii.gz")
    for key in ("seg", "brain_mask"):
        if inputs[key] is not None:
            arr = sitk_to_array(resample_to(_read(inputs[key], key), fixed, None, "nearest"))
            files[key] = save_nifti(np.rint(arr).astype(np.uint8), affine, d / f"{case}-{key}.nii.gz", dtype=np.uint8)
    save_json(
        {
            "case": case,
            "inputs": {k: str(v) if _is_path(v) else "image" for k, v in inputs.items() if v is not None},
            "registration": report,
            "note": "not skull-stripped unless a brain_mask was given",
        },
        d / "registration.json",
    )
    return {"case": case, "files": {k: str(v) for k, v in files.items()}, "registration": report}


def check_same_grid(files: Mapping[str, str | Path]) -> None:
    """Raise ``IngestError`` naming the file when a written file's affine or shape differs from the t1n's."""
    ref = nib.load(str(files["t1n"]))
    for k, f in files.items():
        img = nib.load(str(f))
        if img.shape[:3] != ref.shape[:3] or not np.array_equal(img.affine, ref.affine):
            raise IngestError(f"{f} ({k}) is not on the T1 grid of {files['t1n']}")


@dataclass
class BrainSelection:
    """The series picked for each role of a brain study (:func:`select_brain_series`).

    Attributes:
        study_dir: the study folder scanned.
        study_uid, patient_id: of the picked series.
        picked: role -> ``(series, checked geometry, reason)`` (roles of :data:`common.ingest.rules.BRAIN_ROLES`
            that were found).
        report: one entry per scanned series: folder, number, description, UID, role, status, reason.
    """

    study_dir: Path
    study_uid: str
    patient_id: str
    picked: dict[str, tuple[DicomSeries, SeriesGeometry, str]]
    report: list[dict[str, Any]] = field(default_factory=list)


def select_brain_series(
    study_dir: str | os.PathLike, rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None
) -> BrainSelection:
    """Find the T1, T2, FLAIR (and T1c, when present) series of a DICOM brain study.

    Every series below ``study_dir`` is classified by its SeriesDescription (``rules``: default
    :data:`common.ingest.rules.BRAIN_RULES_PATH`), its headers are checked (:func:`check_series`: one
    orientation, regular slices) and a structural series must be a single volume. When several series
    match a role, the rule's ``prefer`` picks one; when the folder holds several studies, the one with
    the most matched roles is used.

    Raises:
        IngestError: no DICOM series, or a required role (T1, T2, FLAIR by default) without a usable
            series; the message names the study folder, the role and the series seen.
    """
    study_dir = Path(study_dir)
    rules = load_brain_rules(rules)
    patient = study_dir.name
    series = scan_study(study_dir, patient)
    if not series:
        raise IngestError(f"{study_dir}: no DICOM series found", patient)
    report: dict[int, dict[str, Any]] = {}

    def note(s: DicomSeries, role: str | None, status: str, reason: str) -> None:
        report[id(s)] = {**s.summary(), "role": role, "status": status, "reason": reason}

    roles = {id(s): rules.classify(s.description, s.image_type) if s.headers else (None, "") for s in series}
    studies: dict[str, list[DicomSeries]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    study_uid = max(studies.items(), key=lambda kv: (len({roles[id(s)][0] for s in kv[1]} - {None}), len(kv[1])))[0]
    cands: dict[str, list[tuple[DicomSeries, SeriesGeometry]]] = {}
    for s in series:
        role, why = roles[id(s)]
        if s.study_uid != study_uid:
            note(s, None, "ignored", f"ignored: belongs to another study ({s.study_uid})")
        elif not s.headers:
            note(s, None, "ignored", f"ignored: no readable DICOM file ({', '.join(n for n, _ in s.unreadable[:3])})")
        elif role is None:
            note(s, None, "ignored", why)
        else:
            try:
                geom = check_series(s, patient)
            except IngestError as e:
                note(s, role, "broken", f"{why}, but unusable: {e.problem}")
                continue
            if len(geom.frames) != 1:
                note(s, role, "broken", f"{why}, but holds {len(geom.frames)} volumes (a structural series has one)")
                continue
            cands.setdefault(role, []).append((s, geom))
            note(s, role, "candidate", why)
    picked = {}
    for role, items in cands.items():
        (chosen, geom), how = prefer_series(rules.role(role).prefer, items)
        picked[role] = (chosen, geom, roles[id(chosen)][1])
        if len(items) > 1:  # a choice the user should see, not only in the manifest
            others = ", ".join(repr(s.label) for s, _ in items if s is not chosen)
            log.warning(
                "%s: %d %s series: using %r (%s); not %s", patient, len(items), role.upper(), chosen.label, how, others
            )
        for s, _ in items:
            if s is chosen:
                report[id(s)]["status"] = "used"
            else:
                report[id(s)].update(
                    status="ignored", reason=f"{roles[id(s)][1]}; another {role} series was chosen ({how})"
                )
    missing = [r for r in rules.required if r not in picked]
    if missing:
        seen = "; ".join(f"{s.label!r} ({s.description!r}: {report[id(s)]['reason']})" for s in series)
        raise IngestError(
            f"{study_dir}: no usable {' / '.join(m.upper() for m in missing)} series (rules {rules.source}). "
            f"Series seen: {seen}. Pass --ingest_rules with a pattern for its SeriesDescription if it is there",
            patient,
        )
    t1 = picked["t1"][0]
    return BrainSelection(
        study_dir=study_dir,
        study_uid=study_uid,
        patient_id=t1.patient_id,
        picked=picked,
        report=[report[id(s)] for s in series if id(s) in report],
    )


def ingest_brain_study(
    study_dir: str | os.PathLike,
    out: str | os.PathLike,
    case_id: str,
    rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None,
    register: bool = True,
    settings: RegistrationSettings | None = None,
    brain_mask: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """DICOM brain study -> ``<out>/<case_id>/`` in the BraTS layout (:func:`prepare_brain_case` on the
    T1 grid) + ``manifest.json``.

    The manifest names the source (``source``, ``study_uid``, ``patient_id``), the series used per role
    (``roles``: folder relative to ``study_dir``, ``series_uid``, ``series_number``, description), the
    reference grid (``reference.role`` = ``t1``), every scanned series with its status (``series``), the
    written files, the registration results and ``config`` (the settings, for reuse checks).

    Raises:
        IngestError: see :func:`select_brain_series`; a failed registration.
        FileExistsError: ``out`` is the study folder.
    """
    study_dir, out = Path(study_dir).resolve(), Path(out)
    if out.resolve() == study_dir or out.resolve().is_relative_to(study_dir):
        raise FileExistsError(f"{out} lies inside the source study {study_dir}: choose another output folder")
    sel = select_brain_series(study_dir, rules)
    images = {}
    for role, (s, geom, _) in sel.picked.items():
        images[role] = read_frame(geom.frames[0], geom, case_id, s.label)
        log.info("%s: %s <- %s (%s)", case_id, role, s.label, s.description)
    res = prepare_brain_case(
        images["t1"],
        images["t2"],
        images["flair"],
        out,
        case_id,
        t1c=images.get("t1c"),
        brain_mask=brain_mask,
        settings=settings,
        register=register,
    )
    manifest = {
        "id": case_id,
        "kind": "brain",
        "source": str(study_dir),
        "study_uid": sel.study_uid,
        "patient_id": sel.patient_id,
        "reference": {"role": "t1"},
        "roles": {
            role: {"folder": s.label, "series_uid": s.uid, "series_number": s.number, "description": s.description}
            for role, (s, _, _) in sel.picked.items()
        },
        "series": sel.report,
        "files": res["files"],
        "registration": res["registration"],
        "config": dict(config or {}),
        "note": "not skull-stripped unless a brain_mask was given",
    }
    save_json(manifest, out / case_id / MANIFEST)
    return manifest
