"""DICOM MR writer for the phantoms: one file per slice, TCIA PROSTATEx folder layout.

Layout written by :func:`write_prostate_study` and :func:`write_brain_study`::

    <root>/<patient>/<MM-DD-YYYY>-NA-MR prostaat/<n>.000000-<SeriesDescription>/1-01.dcm, 1-02.dcm, ...
    <root>/<patient>/<MM-DD-YYYY>-NA-MR brain/<n>.000000-<SeriesDescription>/1-01.dcm, ...

Geometry (RAS+ affines -> LPS DICOM planes, one file per slice along the normal), rescaling and the
slice writer live in :mod:`common.dicom_out`, shared with the synthetic series of ``scripts/synthesize.py``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

# the geometry, rescale and slice writer are shared with the synthetic series (common.dicom_out)
from common.dicom_out import (  # noqa: F401 (re-exported)
    RAS_TO_LPS,
    geometry_from_affine,
    quantise,
    rescale_for,
    series_folder_name,
    set_geometry,
    set_pixel_module,
    write_slices,
)
from common.dicom_out import decimal_string as _ds


def _uid(*parts: Any) -> str:
    """Deterministic UID from the given parts (same parts: same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _tm(seconds: float) -> str:
    """DICOM TM ``HHMMSS.ffffff`` for seconds since midnight."""
    seconds = float(seconds) % 86400
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    study: dict[str, Any],
    series_number: int,
    description: str,
    slope: float | None = None,
    intercept: float | None = None,
    acquisition_time_s: float = 36000.0,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write a 3D volume ``(x, y, z)`` with its RAS+ ``affine`` as one DICOM MR series, a file per slice.

    Args:
        volume: 3D array; written as uint16/int16 with ``RescaleSlope``/``RescaleIntercept`` from
            :func:`rescale_for` (or the given ``slope``/``intercept``).
        affine: 4x4 RAS+ voxel-to-world affine (mm) of ``volume``.
        folder: series folder; files ``1-01.dcm``... (``1-NN``, one per slice along the normal).
        study: ``PatientID``, ``PatientName``, ``StudyInstanceUID``, ``FrameOfReferenceUID``,
            ``StudyDate`` (YYYYMMDD), ``StudyTime`` (seconds), ``StudyDescription``, ``uid_seed``.
        series_number, description: ``SeriesNumber`` and ``SeriesDescription``.
        acquisition_time_s: seconds since midnight, written as AcquisitionTime/ContentTime/SeriesTime.
        extra: more header keywords (e.g. ``TriggerTime``, ``FlipAngle``, ``ImageType``).

    Returns:
        The written file paths in slice order.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a DICOM series needs a 3D volume, got shape {volume.shape}")
    nz = volume.shape[2]
    geo = geometry_from_affine(affine, nz)
    slope, intercept, dtype = rescale_for(volume, slope, intercept)
    stored = quantise(volume, slope, intercept, dtype)
    folder = Path(folder)
    series_uid = _uid(study["uid_seed"], "series", series_number, description)
    base = Dataset()
    base.SOPClassUID = MRImageStorage
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    base.StudyDate = base.SeriesDate = base.AcquisitionDate = base.ContentDate = study["StudyDate"]
    base.StudyTime = _tm(study.get("StudyTime", 36000.0))
    base.SeriesTime = base.AcquisitionTime = base.ContentTime = _tm(acquisition_time_s)
    base.AccessionNumber = ""
    base.Modality = "MR"
    base.Manufacturer = "gadofree digital reference object"
    base.ReferringPhysicianName = ""
    base.StudyDescription = study.get("StudyDescription", "MR prostaat")
    base.SeriesDescription = description
    base.PatientName = study.get("PatientName", study["PatientID"])
    base.PatientID = study["PatientID"]
    base.PatientBirthDate = ""
    base.PatientSex = study.get("PatientSex", "M")
    base.MagneticFieldStrength = 3
    base.StudyInstanceUID = study["StudyInstanceUID"]
    base.SeriesInstanceUID = series_uid
    base.StudyID = "1"
    base.SeriesNumber = int(series_number)
    base.FrameOfReferenceUID = study["FrameOfReferenceUID"]
    base.PositionReferenceIndicator = ""
    set_geometry(base, geo)
    set_pixel_module(base, volume.shape, dtype, slope, intercept, (float(volume.min()), float(volume.max())))
    for key, value in (extra or {}).items():
        setattr(base, key, value)

    sop_uids = [_uid(series_uid, k) for k in range(nz)]
    return write_slices(base, stored, geo, folder, sop_uids, "GADOFREE_PH")


def format_tt(t_s: float) -> str:
    """``TT=<t>s`` with one decimal, like the Siemens TWIST series descriptions (``TT=8.0s``)."""
    return f"TT={t_s:.1f}s"


#: Series of the simulated PROSTATEx-like study: role -> (series number, description, extra header).
PROSTATE_SERIES: dict[str, tuple[int, str, dict[str, Any]]] = {
    "localizer": (
        1,
        "localizer",
        {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "FlipAngle": 50, "RepetitionTime": 4.0, "EchoTime": 2.0},
    ),
    "t2w": (
        5,
        "t2_tse_tra",
        {
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
            "ScanningSequence": "SE",
            "RepetitionTime": 5000,
            "EchoTime": 104,
            "FlipAngle": 160,
        },
    ),
    "adc": (
        9,
        "ep2d_diff_tra_ADC",
        {
            "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"],
            "ScanningSequence": "EP",
            "RepetitionTime": 4000,
            "EchoTime": 60,
            "FlipAngle": 90,
        },
    ),
    "dwi_highb": (
        19,
        "ep2d_diff_tra_CALC_BVAL_b1400",
        {
            "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "CALC_BVAL", "TRACEW", "ND"],
            "ScanningSequence": "EP",
            "RepetitionTime": 4000,
            "EchoTime": 60,
            "FlipAngle": 90,
            "DiffusionBValue": 1400,
        },
    ),
    "pd": (
        23,
        "fl3d_vibe_pre_flip_2deg_PD",
        {"ScanningSequence": "GR", "RepetitionTime": 4.0, "EchoTime": 1.5, "FlipAngle": 2},
    ),
    "t1_pre": (
        24,
        "fl3d_vibe_pre_flip_12deg",
        {"ScanningSequence": "GR", "RepetitionTime": 4.0, "EchoTime": 1.5, "FlipAngle": 12},
    ),
}
DCE_FIRST_SERIES = 27
#: the multi-b DWI of the simulated study (:func:`write_dwi_series`): series number, description, header.
DWI_SERIES: tuple[int, str, dict[str, Any]] = (
    7,
    "ep2d_diff_tra_DYNDIST",
    {
        "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND"],
        "ScanningSequence": "EP",
        "RepetitionTime": 4000,
        "EchoTime": 60,
        "FlipAngle": 90,
    },
)
DWI_LAYOUTS = ("one_series", "per_b")
DCE_DESCRIPTION = "Twist_dynamic_Wip576_{tt}"


def study_folder_name(study_date: str, description: str = "MR prostaat") -> str:
    """TCIA study folder ``MM-DD-YYYY-NA-<description>`` from a DICOM date ``YYYYMMDD``."""
    d = _dt.datetime.strptime(study_date, "%Y%m%d")
    return f"{d:%m-%d-%Y}-NA-{description}"


def study_tags(patient_id: str, study_date: str, description: str, uid_seed: str, **extra: Any) -> dict[str, Any]:
    """The patient/study tags of a simulated study (the ``study`` argument of :func:`write_series`):
    study time 10:00:00, study and frame-of-reference UIDs derived from ``uid_seed`` (the same seed gives
    the same UIDs), ``extra`` tags added."""
    return {
        "PatientID": patient_id,
        "PatientName": patient_id,
        **extra,
        "StudyDate": study_date,
        "StudyTime": 36000.0,
        "StudyInstanceUID": _uid(uid_seed, "study"),
        "FrameOfReferenceUID": _uid(uid_seed, "frame"),
        "StudyDescription": description,
        "uid_seed": uid_seed,
    }


def write_prostate_study(phantom, root: str | os.PathLike, patient_id: str, study_date: str = "20200101") -> Path:
    """Write a prostate phantom as a DICOM study in the TCIA PROSTATEx layout; returns the patient folder.

    Series (number, description): 1 ``localizer`` (sagittal, 3 slices, to be ignored by an ingest),
    5 ``t2_tse_tra`` (fine grid), 9 ``ep2d_diff_tra_ADC`` (1e-6 mm^2/s, slope 1),
    19 ``ep2d_diff_tra_CALC_BVAL_b1400``, 23 ``fl3d_vibe_pre_flip_2deg_PD``,
    7 ``ep2d_diff_tra_DYNDIST`` (the multi-b DWI, b = 50, 400, 800 in one series: :func:`write_dwi_series`),
    24 ``fl3d_vibe_pre_flip_12deg`` and one series per DCE time point from 27,
    ``Twist_dynamic_Wip576_TT=<t>s``, with ``TriggerTime`` (ms) and ``AcquisitionTime`` per point.

    Args:
        phantom: a :class:`common.phantoms.prostate.ProstatePhantom`.
        root: folder that receives ``<patient_id>/``.
        patient_id: PatientID and folder name.
        study_date: DICOM date ``YYYYMMDD``.
    """
    root = Path(root)
    patient_dir = root / patient_id
    study_dir = patient_dir / study_folder_name(study_date)
    study = study_tags(patient_id, study_date, "MR prostaat", f"{patient_id}|{phantom.truth.get('seed')}|{study_date}")
    t = 36000.0 + 60.0  # 10:01:00, then series in protocol order
    vols = {"localizer": (phantom.localizer, phantom.affines["localizer"])}
    for role in ("t2w", "adc", "dwi_highb", "pd", "t1_pre"):
        vols[role] = (phantom.images[role], phantom.affines[role])
    for role, (number, desc, extra) in PROSTATE_SERIES.items():
        vol, aff = vols[role]
        write_series(
            vol,
            aff,
            study_dir / series_folder_name(number, desc),
            study=study,
            series_number=number,
            description=desc,
            acquisition_time_s=t,
            extra=extra,
        )
        t += 120.0
    if getattr(phantom, "dwi", None):
        write_dwi_series(phantom.dwi, phantom.affines["adc"], study_dir, study, acquisition_time_s=t)
        t += 120.0
    # DCE: one series per time point; one rescale for all (integer data: slope 1)
    slope, intercept, _ = rescale_for(phantom.dce)
    n_t = phantom.dce.shape[-1]
    for i, t_s in enumerate(np.asarray(phantom.times_s, float)):
        number = DCE_FIRST_SERIES + i
        desc = DCE_DESCRIPTION.format(tt=format_tt(t_s))
        extra = {
            "ScanningSequence": "GR",
            "RepetitionTime": 4.0,
            "EchoTime": 1.5,
            "FlipAngle": 12,
            "TriggerTime": _ds(t_s * 1000.0),
            "TemporalPositionIdentifier": i + 1,
            "NumberOfTemporalPositions": n_t,
        }
        write_series(
            phantom.dce[..., i],
            phantom.affines["dce"],
            study_dir / series_folder_name(number, desc),
            study=study,
            series_number=number,
            description=desc,
            slope=slope,
            intercept=intercept,
            acquisition_time_s=t + t_s,
            extra=extra,
        )
    return patient_dir


def write_dwi_series(
    dwi: dict[float, np.ndarray],
    affine: np.ndarray,
    study_dir: str | os.PathLike,
    study: dict[str, Any],
    layout: str = "one_series",
    series_number: int | None = None,
    description: str | None = None,
    acquisition_time_s: float = 36000.0,
) -> list[Path]:
    """Write a multi-b DWI (``{b-value s/mm^2: (x, y, z) volume}``, one ``affine``) into ``study_dir``.

    Layouts (``layout``):

    - ``"one_series"``: one series (``series_number``, default 7, ``ep2d_diff_tra_DYNDIST``) holding
      every b-value, ``DiffusionBValue`` (0018,9087) per file, files ``1-01.dcm``... b-value by b-value
      (``InstanceNumber`` running over the whole series);
    - ``"per_b"``: one series per b-value (numbers from ``series_number``, descriptions
      ``<description>_b<b>``) whose b-value is only in the Siemens private field (0019,100C) ``B_value``
      (private creator ``SIEMENS MR HEADER``), as some vendors export it.

    Returns:
        the series folders written.
    """
    if layout not in DWI_LAYOUTS:
        raise ValueError(f"unknown DWI layout {layout!r} (known: {DWI_LAYOUTS})")
    number0, desc0, extra0 = DWI_SERIES
    number0 = number0 if series_number is None else int(series_number)
    desc0 = desc0 if description is None else description
    study_dir = Path(study_dir)
    bs = sorted(float(b) for b in dwi)
    slope, intercept, _ = rescale_for(np.stack([np.asarray(dwi[b]) for b in bs]))
    folders: list[Path] = []
    tmp_root = study_dir / f".tmp-dwi-{number0}"
    try:
        for j, b in enumerate(bs):
            if layout == "one_series":
                number, desc, final = number0, desc0, study_dir / series_folder_name(number0, desc0)
            else:
                number, desc = number0 + j, f"{desc0}_b{b:g}"
                final = study_dir / series_folder_name(number, desc)
            extra = {**extra0, "SeriesDescription": desc}
            if layout == "one_series":
                extra["DiffusionBValue"] = float(b)
                extra["SeriesInstanceUID"] = _uid(study["uid_seed"], "series", number, desc)
            files = write_series(
                dwi[b],
                affine,
                tmp_root / f"b{j}",
                study=study,
                series_number=number,
                description=f"{desc}|b={b:g}",  # seeds distinct SOP instance UIDs per b-value
                slope=slope,
                intercept=intercept,
                acquisition_time_s=acquisition_time_s + (j if layout == "one_series" else 60.0 * j),
                extra=extra,
            )
            offset = j * len(files) if layout == "one_series" else 0
            width = max(2, len(str(len(files) * (len(bs) if layout == "one_series" else 1))))
            final.mkdir(parents=True, exist_ok=True)
            for k, f in enumerate(files):
                ds = pydicom.dcmread(f)
                ds.InstanceNumber = offset + k + 1
                if layout == "per_b":
                    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", str(int(round(b))))
                ds.save_as(final / f"1-{offset + k + 1:0{width}d}.dcm", enforce_file_format=True)
            if final not in folders:
                folders.append(final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return folders


#: Series of the simulated brain study: BraTS key -> (series number, description, extra header).
BRAIN_SERIES: dict[str, tuple[int, str, dict[str, Any]]] = {
    "t1n": (2, "t1_se_tra", {"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 10, "FlipAngle": 90}),
    "t2w": (3, "t2_tse_tra", {"ScanningSequence": "SE", "RepetitionTime": 5000, "EchoTime": 100, "FlipAngle": 150}),
    "t2f": (
        4,
        "t2_tirm_tra_dark-fluid",
        {"ScanningSequence": ["SE", "IR"], "RepetitionTime": 9000, "EchoTime": 100, "InversionTime": 2500},
    ),
    "t1c": (
        6,
        "t1_se_tra_post_Gd",
        {"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 10, "FlipAngle": 90, "ContrastBolusAgent": "Gd"},
    ),
}


def tilted_affine(affine: np.ndarray, shape: Sequence[int], tilt_deg: float) -> np.ndarray:
    """``affine`` (4x4 RAS+) rotated by ``tilt_deg`` about the left-right axis through the grid centre: the
    same voxels on an oblique (pitched) plane, as an axial acquisition angled to the AC-PC line."""
    a = np.radians(float(tilt_deg))
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    centre = np.asarray(affine, float) @ np.r_[(np.asarray(shape[:3], float) - 1) / 2, 1.0]
    to, back = np.eye(4), np.eye(4)
    to[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    return back @ rot @ to @ np.asarray(affine, float)


def write_brain_study(
    phantom,
    root: str | os.PathLike,
    patient_id: str,
    study_date: str = "20200101",
    contrasts: Sequence[str] = ("t1n", "t2w", "t2f", "t1c"),
    tilt_deg: float = 10.0,
) -> Path:
    """Write a brain phantom as a DICOM study (TCIA layout); returns the patient folder.

    Series (number, description, :data:`BRAIN_SERIES`): 2 ``t1_se_tra`` (T1), 3 ``t2_tse_tra``,
    4 ``t2_tirm_tra_dark-fluid`` (FLAIR), 6 ``t1_se_tra_post_Gd`` (T1 post-contrast), each one volume
    on the phantom's grid pitched by ``tilt_deg`` (:func:`tilted_affine`; 0 = the phantom's own axes).

    Args:
        phantom: a :class:`common.phantoms.brain.BrainPhantom`.
        root: folder that receives ``<patient_id>/``.
        patient_id: PatientID and folder name.
        study_date: DICOM date ``YYYYMMDD``.
        contrasts: the BraTS keys to write (leave one out to make an incomplete study).
    """
    unknown = sorted(set(contrasts) - set(BRAIN_SERIES))
    if unknown:
        raise ValueError(f"unknown brain contrast(s) {unknown}; choose from {sorted(BRAIN_SERIES)}")
    study_dir = Path(root) / patient_id / study_folder_name(study_date, "MR brain")
    uid_seed = f"{patient_id}|{phantom.seed}|{study_date}|brain"
    study = study_tags(patient_id, study_date, "MR brain", uid_seed, PatientSex="F")
    affine = tilted_affine(phantom.affine, phantom.seg.shape, tilt_deg)
    t = 36000.0 + 60.0
    for key in sorted(contrasts, key=lambda k: BRAIN_SERIES[k][0]):
        number, desc, extra = BRAIN_SERIES[key]
        write_series(
            phantom.images[key],
            affine,
            study_dir / series_folder_name(number, desc),
            study=study,
            series_number=number,
            description=desc,
            acquisition_time_s=t + 180.0 * number,
            extra=extra,
        )
    return Path(root) / patient_id


def read_series_sitk(folder: str | os.PathLike):
    """Read a series folder with SimpleITK's ``ImageSeriesReader`` (files ordered by GDCM along the normal)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    if not files:
        raise FileNotFoundError(f"{folder}: no DICOM series")
    reader.SetFileNames(files)
    return reader.Execute()


def sitk_to_ras(image) -> tuple[np.ndarray, np.ndarray]:
    """``(array (x, y, z), 4x4 RAS+ affine)`` of a SimpleITK image (LPS) for comparison with NIfTI."""
    from common.geometry import sitk_affine, sitk_to_array

    return sitk_to_array(image), sitk_affine(image)


__all__: Sequence[str] = (
    "geometry_from_affine",
    "rescale_for",
    "write_series",
    "write_prostate_study",
    "write_brain_study",
    "study_tags",
    "tilted_affine",
    "BRAIN_SERIES",
    "series_folder_name",
    "study_folder_name",
    "format_tt",
    "read_series_sitk",
    "sitk_to_ras",
    "PROSTATE_SERIES",
    "BREAST_LAYOUTS",
    "duke_phase_description",
    "ordinal",
    "write_breast_study",
    "write_dwi_series",
)


# ------------------------------------------------------------------------------------------
# breast DCE studies (both layouts of the public collections)

#: layouts of :func:`write_breast_study`: Duke-Breast-Cancer-MRI (one series per phase) and I-SPY / GE
#: (one multi-phase series).
BREAST_LAYOUTS = ("series_per_phase", "multi_phase")
BREAST_MULTI_PHASE_DESCRIPTION = "Ax Vibrant MultiPhase"


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ... ``11th``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def duke_phase_description(i: int) -> str:
    """Duke-Breast-Cancer-MRI series description of phase ``i`` (0: ``ax dyn pre``, 1: ``ax dyn 1st pass``, ...)."""
    return "ax dyn pre" if i == 0 else f"ax dyn {ordinal(i)} pass"


def write_breast_study(
    dce: np.ndarray,
    times_s: Sequence[float],
    affine: np.ndarray,
    root: str | os.PathLike,
    patient_id: str,
    layout: str = "series_per_phase",
    study_date: str = "20200101",
    tilt_deg: float = 10.0,
    uid_seed: str = "",
) -> Path:
    """Write a breast DCE series ``dce`` (x, y, z, t) as a DICOM study in the TCIA layout; returns the patient folder.

    ``layout``:

    - ``"series_per_phase"`` (Duke-Breast-Cancer-MRI): series 3, 4, ... ``ax dyn pre``, ``ax dyn 1st pass``, ...,
      one per phase; the phase times are in ``AcquisitionTime`` (10:05:00 + ``times_s``), no ``TriggerTime``;
    - ``"multi_phase"`` (I-SPY / GE): one series ``Ax Vibrant MultiPhase`` (number 3) holding every phase, files
      ``<phase>-<slice>.dcm``, with ``TemporalPositionIdentifier`` (1..t), ``NumberOfTemporalPositions``,
      ``TriggerTime`` (ms after the pre-contrast phase) and ``AcquisitionTime``.

    The voxels lie on ``affine`` pitched by ``tilt_deg`` about the left-right axis (:func:`tilted_affine`; an
    oblique acquisition; 0 keeps ``affine``). One rescale for all phases (integer data: slope 1, exact).
    """
    if layout not in BREAST_LAYOUTS:
        raise ValueError(f"unknown breast DICOM layout {layout!r}; choose from {BREAST_LAYOUTS}")
    import shutil

    import pydicom

    dce = np.asarray(dce)
    times = np.asarray(times_s, float)
    if dce.ndim != 4 or dce.shape[-1] != len(times):
        raise ValueError(f"dce must be (x, y, z, t) with t = {len(times)} times, got {dce.shape}")
    study_dir = Path(root) / patient_id / study_folder_name(study_date, "MRI BREAST BILATERAL")
    seed = uid_seed or f"{patient_id}|{study_date}|breast"
    study = study_tags(patient_id, study_date, "MRI BREAST BILATERAL", seed, PatientSex="F")
    aff = tilted_affine(affine, dce.shape[:3], tilt_deg) if tilt_deg else np.asarray(affine, float)
    slope, intercept, _ = rescale_for(dce)
    n_t, nz = dce.shape[-1], dce.shape[2]
    t0 = 36000.0 + 300.0  # 10:05:00: the pre-contrast phase
    common = {"ScanningSequence": "GR", "RepetitionTime": 4.5, "EchoTime": 2.0, "FlipAngle": 10}
    if layout == "series_per_phase":
        for i in range(n_t):
            desc = duke_phase_description(i)
            write_series(
                dce[..., i],
                aff,
                study_dir / series_folder_name(3 + i, desc),
                study=study,
                series_number=3 + i,
                description=desc,
                slope=slope,
                intercept=intercept,
                acquisition_time_s=t0 + times[i],
                extra=dict(common),
            )
        return Path(root) / patient_id
    desc = BREAST_MULTI_PHASE_DESCRIPTION
    folder = study_dir / series_folder_name(3, desc)
    series_uid = _uid(seed, "series", 3, desc)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_t):
        tmp = folder / f".phase{i + 1}"
        extra = {
            **common,
            "SeriesInstanceUID": series_uid,
            "TemporalPositionIdentifier": i + 1,
            "NumberOfTemporalPositions": n_t,
            "TriggerTime": _ds(times[i] * 1000.0),
        }
        files = write_series(
            dce[..., i],
            aff,
            tmp,
            study={**study, "uid_seed": f"{seed}|phase{i + 1}"},  # distinct SOP instance UIDs per phase
            series_number=3,
            description=desc,
            slope=slope,
            intercept=intercept,
            acquisition_time_s=t0 + times[i],
            extra=extra,
        )
        for k, f in enumerate(files):
            ds = pydicom.dcmread(str(f))
            ds.InstanceNumber = i * nz + k + 1
            ds.save_as(str(folder / f"{i + 1}-{k + 1:0{max(2, len(str(nz)))}d}.dcm"), enforce_file_format=True)
        shutil.rmtree(tmp)
    return Path(root) / patient_id
