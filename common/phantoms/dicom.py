"""DICOM MR writer for the phantoms: one file per slice, TCIA PROSTATEx folder layout.

Layout written by :func:`write_prostate_study`::

    <root>/<patient>/<MM-DD-YYYY>-NA-MR prostaat/<n>.000000-<SeriesDescription>/1-01.dcm, 1-02.dcm, ...

Geometry: the phantom affines are NIfTI RAS+ (voxel (i, j, k) -> world mm); DICOM patient
coordinates are LPS, so positions and directions get their first two components negated. Array
axis ``i`` runs along a DICOM row (``ImageOrientationPatient[:3]``, the direction of increasing
column index) and ``j`` down the columns (``ImageOrientationPatient[3:]``); a slice's pixel array
is therefore ``volume[:, :, k].T`` (rows, columns), ``PixelSpacing`` is ``[spacing_j, spacing_i]``
(row spacing first), and ``ImagePositionPatient`` of slice ``k`` is the LPS position of voxel
``(0, 0, k)``. Slices are numbered 1..n along the slice normal ``row x column``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.io import atomic_path

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _ds(x: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``x``."""
    for digits in range(10, 3, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{x:.3e}"


def geometry_from_affine(affine: np.ndarray, n_slices: int) -> dict[str, Any]:
    """DICOM geometry of a NIfTI RAS+ affine.

    Returns:
        ``ImageOrientationPatient`` (6 floats, LPS, row then column cosine), ``PixelSpacing``
        ``[row spacing (along j), column spacing (along i)]``, ``SliceThickness``/spacing (mm),
        and ``positions``: (n_slices, 3) LPS ``ImagePositionPatient`` of each slice.
    """
    A = np.asarray(affine, float)
    sp = np.linalg.norm(A[:3, :3], axis=0)
    dirs_lps = RAS_TO_LPS @ (A[:3, :3] / sp)
    origin_lps = RAS_TO_LPS @ A[:3, 3]
    step_lps = RAS_TO_LPS @ A[:3, 2]
    normal = np.cross(dirs_lps[:, 0], dirs_lps[:, 1])
    if normal @ dirs_lps[:, 2] < 0:
        raise ValueError("the affine is left-handed in (row, column, slice): DICOM slices would run against the normal")
    return {
        "ImageOrientationPatient": [*dirs_lps[:, 0], *dirs_lps[:, 1]],
        "PixelSpacing": [sp[1], sp[0]],
        "SliceSpacing": sp[2],
        "positions": origin_lps[None, :] + np.arange(n_slices)[:, None] * step_lps[None, :],
    }


def rescale_for(
    volume: np.ndarray, slope: float | None = None, intercept: float | None = None
) -> tuple[float, float, np.dtype]:
    """``(slope, intercept, stored dtype)`` so ``stored * slope + intercept`` reproduces ``volume``.

    Integer-valued volumes in ``[0, 65535]`` are stored as uint16 with slope 1 (exact, like a
    Siemens series; ADC included). Other volumes use uint16 (non-negative) or int16 with a slope
    chosen to fill the range, so the round-trip error is at most ``slope / 2``.
    """
    v = np.asarray(volume)
    lo, hi = float(v.min()), float(v.max())
    if slope is not None:
        icpt = 0.0 if intercept is None else float(intercept)
        dtype = np.uint16 if lo - icpt >= 0 else np.int16
        return float(slope), icpt, np.dtype(dtype)
    if lo >= 0 and hi <= 65535 and np.all(v == np.rint(v)):
        return 1.0, 0.0, np.dtype(np.uint16)
    if lo >= 0:
        s = float(_ds(max(hi, 1e-12) / 65000.0))
        return s, 0.0, np.dtype(np.uint16)
    s = float(_ds(max(abs(lo), abs(hi), 1e-12) / 32000.0))
    return s, 0.0, np.dtype(np.int16)


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
    nx, ny, nz = volume.shape
    geo = geometry_from_affine(affine, nz)
    slope, intercept, dtype = rescale_for(volume, slope, intercept)
    stored = np.rint((volume.astype(np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    stored = np.clip(stored, info.min, info.max).astype(dtype)
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
    base.ImageOrientationPatient = [_ds(v) for v in geo["ImageOrientationPatient"]]
    base.PixelSpacing = [_ds(v) for v in geo["PixelSpacing"]]
    base.SliceThickness = _ds(geo["SliceSpacing"])
    base.SpacingBetweenSlices = _ds(geo["SliceSpacing"])
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = ny, nx
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 0 if dtype == np.uint16 else 1
    base.RescaleIntercept = _ds(intercept)
    base.RescaleSlope = _ds(slope)
    base.RescaleType = "US"
    lo, hi = float(volume.min()), float(volume.max())
    base.WindowCenter = _ds((lo + hi) / 2)
    base.WindowWidth = _ds(max(hi - lo, 1.0))
    for key, value in (extra or {}).items():
        setattr(base, key, value)

    # The header is the same for every slice but for five elements: encode the shared parts once
    # (split at the per-slice tags, so the elements stay in tag order) and splice the rest in.
    segments = _encode_segments(base, _PER_SLICE_TAGS)
    normal = np.cross(geo["ImageOrientationPatient"][:3], geo["ImageOrientationPatient"][3:])
    paths = []
    width = max(2, len(str(nz)))
    for k in range(nz):
        sop_uid = _uid(series_uid, k)
        pos = geo["positions"][k]
        per_slice = Dataset()
        per_slice.SOPInstanceUID = sop_uid
        per_slice.InstanceNumber = k + 1
        per_slice.ImagePositionPatient = [_ds(v) for v in pos]
        per_slice.SliceLocation = _ds(float(pos @ normal))
        per_slice.add_new(_PER_SLICE_TAGS[-1], "OW", np.ascontiguousarray(stored[:, :, k].T).tobytes())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "GADOFREE_PH"
        parts = [b"\x00" * 128, b"DICM", _encode_meta(meta)]
        for seg, tag in zip(segments, _PER_SLICE_TAGS):
            parts += [seg, _encode(Dataset({tag: per_slice[tag]}))]
        parts.append(segments[-1])
        path = folder / f"1-{k + 1:0{width}d}.dcm"
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(parts))
        paths.append(path)
    return paths


#: Elements that differ between the slices of a series, in tag order.
_PER_SLICE_TAGS = [
    pydicom.tag.Tag("SOPInstanceUID"),
    pydicom.tag.Tag("InstanceNumber"),
    pydicom.tag.Tag("ImagePositionPatient"),
    pydicom.tag.Tag("SliceLocation"),
    pydicom.tag.Tag("PixelData"),
]


def _encode(ds: Dataset) -> bytes:
    """Explicit VR little endian encoding of a dataset's elements (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _encode_meta(meta: FileMetaDataset) -> bytes:
    """Encoded file meta information group (with its group length)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _encode_segments(base: Dataset, split_tags: Sequence) -> list[bytes]:
    """``base`` encoded in ``len(split_tags) + 1`` pieces: elements before the first split tag,
    between consecutive split tags, and after the last."""
    if any(t in base for t in split_tags):
        raise ValueError("the shared header must not hold the per-slice elements")
    bounds = [-1, *[int(t) for t in split_tags], 1 << 33]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg = Dataset()
        for elem in base:
            if lo < int(elem.tag) < hi:
                seg.add(elem)
        out.append(_encode(seg))
    return out


def series_folder_name(number: int, description: str) -> str:
    """TCIA series folder name ``<n>.000000-<description>`` (path separators replaced)."""
    safe = re.sub(r"[/\\:]", "_", description)
    return f"{number}.000000-{safe}"


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
DCE_DESCRIPTION = "Twist_dynamic_Wip576_{tt}"


def study_folder_name(study_date: str, description: str = "MR prostaat") -> str:
    """TCIA study folder ``MM-DD-YYYY-NA-<description>`` from a DICOM date ``YYYYMMDD``."""
    d = _dt.datetime.strptime(study_date, "%Y%m%d")
    return f"{d:%m-%d-%Y}-NA-{description}"


def write_prostate_study(phantom, root: str | os.PathLike, patient_id: str, study_date: str = "20200101") -> Path:
    """Write a prostate phantom as a DICOM study in the TCIA PROSTATEx layout; returns the patient folder.

    Series (number, description): 1 ``localizer`` (sagittal, 3 slices, to be ignored by an ingest),
    5 ``t2_tse_tra`` (fine grid), 9 ``ep2d_diff_tra_ADC`` (1e-6 mm^2/s, slope 1),
    19 ``ep2d_diff_tra_CALC_BVAL_b1400``, 23 ``fl3d_vibe_pre_flip_2deg_PD``,
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
    uid_seed = f"{patient_id}|{phantom.truth.get('seed')}|{study_date}"
    study = {
        "PatientID": patient_id,
        "PatientName": patient_id,
        "StudyDate": study_date,
        "StudyTime": 36000.0,
        "StudyInstanceUID": _uid(uid_seed, "study"),
        "FrameOfReferenceUID": _uid(uid_seed, "frame"),
        "StudyDescription": "MR prostaat",
        "uid_seed": uid_seed,
    }
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
    "series_folder_name",
    "study_folder_name",
    "format_tt",
    "read_series_sitk",
    "sitk_to_ras",
    "PROSTATE_SERIES",
)
