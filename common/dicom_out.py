"""DICOM MR output: one file per slice on the exact grid of a NIfTI affine, shared by the phantoms and
the synthetic (derived) series of ``scripts/synthesize.py``.

Geometry: affines are NIfTI RAS+ (voxel (i, j, k) -> world mm); DICOM patient coordinates are LPS,
so positions and directions get their first two components negated. Array axis ``i`` runs along a
DICOM row (``ImageOrientationPatient[:3]``, the direction of increasing column index) and ``j`` down
the columns (``ImageOrientationPatient[3:]``); a slice's pixel array is therefore
``volume[:, :, k].T`` (rows, columns), ``PixelSpacing`` is ``[spacing_j, spacing_i]`` (row spacing
first), and ``ImagePositionPatient`` of slice ``k`` is the LPS position of voxel ``(0, 0, k)``.
Slices are numbered 1..n along the slice normal ``row x column``. Oblique grids stay oblique.

:func:`write_derived_series` writes a synthetic series into the study of a source series
(:func:`read_source_series`): same patient/study tags and frame of reference, new series and
instance UIDs, ``ImageType DERIVED\\SECONDARY``, a ``SourceImageSequence`` per slice, into a
temporary folder renamed into place when complete (:func:`atomic_folder`); an existing series
folder is never replaced.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.geometry import LPS_TO_RAS
from common.io import atomic_folder, atomic_path

__all__ = [
    "RAS_TO_LPS",
    "SERIES_TAGS",
    "STUDY_TAGS",
    "SourceSeries",
    "atomic_folder",
    "decimal_string",
    "geometry_from_affine",
    "quantise",
    "read_source_series",
    "rescale_for",
    "series_folder_name",
    "set_geometry",
    "set_pixel_module",
    "set_series_tags",
    "series_set",
    "write_derived_series",
    "write_segmentation",
    "write_slices",
]

RAS_TO_LPS = LPS_TO_RAS[:3, :3]  # the x/y flip is its own inverse

#: Patient / study level elements a derived series copies from its source series (all Type 2 or 1).
STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
)


#: General Series elements a derived series copies from its source when present and otherwise writes
#: empty: ``Laterality`` (Type 2C: a paired body part, e.g. a breast) and ``PatientPosition`` (Type 2C,
#: required in MR images without a Patient Orientation Code Sequence). dciodvfy requires both.
SERIES_TAGS = ("Laterality", "PatientPosition")


def set_series_tags(ds: Dataset, source: "SourceSeries") -> None:
    """``ds``'s :data:`SERIES_TAGS` from ``source`` (empty where the source lacks one)."""
    for key in SERIES_TAGS:
        value = source.series_tags.get(key)
        setattr(ds, key, "" if value is None else value)


def decimal_string(x: float) -> str:
    """A DICOM decimal string (DS, at most 16 characters) for ``x``."""
    for digits in range(10, 3, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{x:.3e}"


def geometry_from_affine(affine: np.ndarray, n_slices: int) -> dict[str, Any]:
    """DICOM geometry of a NIfTI RAS+ affine.

    Args:
        affine: 4x4 RAS+ voxel-to-world affine (mm).
        n_slices: number of slices (size of the third voxel axis).

    Returns:
        ``ImageOrientationPatient`` (6 floats, LPS, row then column cosine), ``PixelSpacing``
        ``[row spacing (along j), column spacing (along i)]``, ``SliceSpacing`` (mm, along k),
        and ``positions``: (n_slices, 3) LPS ``ImagePositionPatient`` of each slice (mm).

    Raises:
        ValueError: the affine is left-handed in (row, column, slice).
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
        s = float(decimal_string(max(hi, 1e-12) / 65000.0))
        return s, 0.0, np.dtype(np.uint16)
    s = float(decimal_string(max(abs(lo), abs(hi), 1e-12) / 32000.0))
    return s, 0.0, np.dtype(np.int16)


def quantise(volume: np.ndarray, slope: float, intercept: float, dtype: np.dtype) -> np.ndarray:
    """Stored values ``rint((volume - intercept) / slope)`` clipped to ``dtype``'s range (same shape)."""
    stored = np.rint((np.asarray(volume, dtype=np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    return np.clip(stored, info.min, info.max).astype(dtype)


def set_geometry(ds: Dataset, geo: dict[str, Any]) -> None:
    """Image Plane elements shared by every slice (orientation, pixel spacing, slice thickness/spacing in mm)."""
    ds.ImageOrientationPatient = [decimal_string(v) for v in geo["ImageOrientationPatient"]]
    ds.PixelSpacing = [decimal_string(v) for v in geo["PixelSpacing"]]
    ds.SliceThickness = decimal_string(geo["SliceSpacing"])
    ds.SpacingBetweenSlices = decimal_string(geo["SliceSpacing"])


def set_pixel_module(
    ds: Dataset,
    shape: Sequence[int],
    dtype: np.dtype,
    slope: float,
    intercept: float,
    window: tuple[float, float],
    min_width: float = 1.0,
) -> None:
    """Image Pixel and rescale / window elements for a 16-bit monochrome volume of ``shape`` (x, y, z).

    Args:
        window: ``(low, high)`` of the display window in rescaled (real-world) units.
        min_width: smallest ``WindowWidth`` written (real-world units).
    """
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[1]), int(shape[0])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if np.dtype(dtype) == np.uint16 else 1
    ds.RescaleIntercept = decimal_string(intercept)
    ds.RescaleSlope = decimal_string(slope)
    ds.RescaleType = "US"
    lo, hi = float(window[0]), float(window[1])
    ds.WindowCenter = decimal_string((lo + hi) / 2)
    ds.WindowWidth = decimal_string(max(hi - lo, min_width))


#: Elements that differ between the slices of a series, in tag order (more may be added per series).
PER_SLICE_TAGS = (
    pydicom.tag.Tag("SOPInstanceUID"),
    pydicom.tag.Tag("InstanceNumber"),
    pydicom.tag.Tag("ImagePositionPatient"),
    pydicom.tag.Tag("SliceLocation"),
    pydicom.tag.Tag("PixelData"),
)


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


def write_slices(
    base: Dataset,
    stored: np.ndarray,
    geo: dict[str, Any],
    folder: str | os.PathLike,
    sop_uids: Sequence[str],
    implementation_version: str = "GADOFREE",
    per_slice: Callable[[int], dict[str, Any]] | None = None,
) -> list[Path]:
    """Write a stored (x, y, z) uint16/int16 volume as one file per slice, ``1-01.dcm`` ... in ``folder``.

    The header ``base`` (everything shared by the slices) is encoded once and the per-slice elements
    (``SOPInstanceUID``, ``InstanceNumber``, ``ImagePositionPatient`` from ``geo["positions"]``,
    ``SliceLocation`` along the normal, ``PixelData`` = ``stored[:, :, k].T``, plus what ``per_slice(k)``
    returns, e.g. a ``SourceImageSequence``) are spliced in tag order. Each file is written atomically.

    Returns:
        The written paths in slice order.
    """
    stored = np.asarray(stored)
    nz = stored.shape[2]
    if len(sop_uids) != nz:
        raise ValueError(f"{len(sop_uids)} SOPInstanceUIDs for {nz} slices")
    extras = [dict(per_slice(k)) if per_slice else {} for k in range(nz)]
    extra_tags = {pydicom.tag.Tag(key) for e in extras for key in e}
    split_tags = sorted({*PER_SLICE_TAGS, *extra_tags})
    segments = _encode_segments(base, split_tags)
    iop = geo["ImageOrientationPatient"]
    normal = np.cross(iop[:3], iop[3:])
    folder = Path(folder)
    width = max(2, len(str(nz)))
    paths = []
    for k in range(nz):
        pos = geo["positions"][k]
        one = Dataset()
        one.SOPInstanceUID = sop_uids[k]
        one.InstanceNumber = k + 1
        one.ImagePositionPatient = [decimal_string(v) for v in pos]
        one.SliceLocation = decimal_string(float(pos @ normal))
        one.add_new(PER_SLICE_TAGS[-1], "OW", np.ascontiguousarray(stored[:, :, k].T).tobytes())
        for key, value in extras[k].items():
            setattr(one, key, value)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = base.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = implementation_version
        parts = [b"\x00" * 128, b"DICM", _encode_meta(meta)]
        for seg, tag in zip(segments, split_tags):
            parts.append(seg)
            if tag in one:
                parts.append(_encode(Dataset({tag: one[tag]})))
        parts.append(segments[-1])
        path = folder / f"1-{k + 1:0{width}d}.dcm"
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(parts))
        paths.append(path)
    return paths


def series_folder_name(number: int, description: str) -> str:
    """TCIA series folder name ``<n>.000000-<description>`` (path separators replaced)."""
    safe = re.sub(r"[/\\:]", "_", description)
    return f"{number}.000000-{safe}"


@dataclass
class SourceSeries:
    """A source DICOM series a derived series refers to (headers only).

    Attributes:
        folder: the series folder.
        study: :data:`STUDY_TAGS` keyword -> value of its first instance (``""`` where absent).
        series_uid: its SeriesInstanceUID.
        sop_class_uids, sop_instance_uids: per instance, sorted along the slice normal.
        positions_mm: (n,) position of each instance along ``normal`` (mm, ascending).
        normal: (3,) LPS unit slice normal.
        series_number: its SeriesNumber (None when absent).
        charset: its SpecificCharacterSet (the copied names are in it).
        series_tags: :data:`SERIES_TAGS` keyword -> value, for those its first instance holds.
    """

    folder: Path
    study: dict[str, Any]
    series_uid: str
    sop_class_uids: list[str] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    positions_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    normal: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    series_number: int | None = None
    charset: str = "ISO_IR 100"
    series_tags: dict[str, Any] = field(default_factory=dict)

    def nearest(self, position_lps: np.ndarray) -> int:
        """Index of the instance whose slice lies nearest to an LPS point (mm) along the normal."""
        return int(np.argmin(np.abs(self.positions_mm - float(np.dot(position_lps, self.normal)))))


def _readable_headers(folder: Path, **dcmread_kwargs: Any) -> Iterator[tuple[Path, Dataset]]:
    """``(path, header)`` of every readable DICOM file in ``folder`` (sorted; hidden and unreadable files
    skipped, no pixel data)."""
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, **dcmread_kwargs)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
            continue
        yield path, ds


def read_source_series(folder: str | os.PathLike, series_uid: str | None = None) -> SourceSeries:
    """Read the headers of a source series (``series_uid``, or the folder's only series).

    Raises:
        FileNotFoundError: ``folder`` holds no readable DICOM file of the series.
        ValueError: the folder holds several series and ``series_uid`` does not pick one, or an
            instance lacks ImagePositionPatient / ImageOrientationPatient.
    """
    folder = Path(folder)
    tags = [*STUDY_TAGS, "SeriesInstanceUID", "SeriesNumber", "SOPClassUID", "SOPInstanceUID"]
    tags += ["ImagePositionPatient", "ImageOrientationPatient", "SpecificCharacterSet", *SERIES_TAGS]
    found: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in _readable_headers(folder, specific_tags=tags):
        if "SOPInstanceUID" in ds:
            found.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is not None:
        found = {k: v for k, v in found.items() if k == series_uid}
    if not found:
        which = f"series {series_uid}" if series_uid else "a series"
        raise FileNotFoundError(f"{folder}: no readable DICOM instance of {which}")
    if len(found) > 1:
        raise ValueError(f"{folder}: holds {len(found)} series ({sorted(found)}); name the SeriesInstanceUID")
    uid, items = next(iter(found.items()))
    missing = [p.name for p, ds in items if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds]
    if missing:
        raise ValueError(f"{folder}: instance(s) without ImagePositionPatient/ImageOrientationPatient: {missing[:3]}")
    iop = np.asarray(items[0][1].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal) or 1.0
    pos = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for _, ds in items])
    order = np.argsort(pos, kind="stable")
    first = items[0][1]
    number = first.get("SeriesNumber")
    return SourceSeries(
        folder=folder,
        study={k: first.get(k, "") for k in STUDY_TAGS},
        series_uid=uid,
        sop_class_uids=[str(items[i][1].SOPClassUID) for i in order],
        sop_instance_uids=[str(items[i][1].SOPInstanceUID) for i in order],
        positions_mm=pos[order],
        normal=normal,
        series_number=int(number) if number not in (None, "") else None,
        charset=first.get("SpecificCharacterSet") or "ISO_IR 100",
        series_tags={k: first.get(k) for k in SERIES_TAGS if k in first},
    )


def _window(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """Display window ``(low, high)``: the volume's [0.5, 99.5] percentile range (real-world units)."""
    lo, hi = np.percentile(np.asarray(volume, dtype=np.float64), percentiles)
    return float(lo), float(hi)


def _now() -> tuple[str, str]:
    """``(DA, TM)`` of the current UTC time."""
    t = _dt.datetime.now(_dt.timezone.utc)
    return f"{t:%Y%m%d}", f"{t:%H%M%S}.{t.microsecond:06d}"


def write_derived_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    source: SourceSeries,
    *,
    series_number: int,
    description: str,
    derivation: str,
    manufacturer: str = "gadofree-bundles",
    software: str = "gadofree-bundles",
    comments: str = "SYNTHETIC image computed from other series; not an acquired contrast-enhanced scan. Research use only.",
    precision: str | None = None,
) -> list[Path]:
    """Write a synthetic 3D volume (x, y, z) with its RAS+ ``affine`` (4x4, mm) as a derived MR series.

    The series joins the study of ``source`` (patient and study tags, frame of reference copied),
    with new SeriesInstanceUID / SOPInstanceUIDs (:func:`pydicom.uid.generate_uid`), MR Image Storage,
    ``ImageType DERIVED\\SECONDARY``, ``SeriesDescription`` = ``description``, ``DerivationDescription``
    = ``derivation``, and per slice a ``SourceImageSequence`` naming the source instance nearest to it
    along the normal. Pixel data are uint16 (int16 with negative values) with ``RescaleSlope`` /
    ``RescaleIntercept`` from :func:`rescale_for`: the stored values reproduce ``volume`` within half
    a slope. Geometry is exactly ``affine``'s (:func:`geometry_from_affine`).

    Args:
        volume: (x, y, z) real-world values (e.g. the bundle's output in the units of its input).
        affine: 4x4 RAS+ voxel-to-world affine (mm) the volume lies on.
        folder: the series folder to create; it must not exist (see :func:`atomic_folder`).
        source: the series whose study the new series joins (:func:`read_source_series`).
        series_number, description, derivation: ``SeriesNumber``, ``SeriesDescription`` (must begin
            with ``SYNTHETIC``; at most 64 characters) and ``DerivationDescription``.
        manufacturer, software: ``Manufacturer`` and ``SoftwareVersions``.
        comments: ``ImageComments``.
        precision: the network precision used (e.g. ``"bf16 channels_last"``, see
            :func:`common.device.resolve_precision`); when given, ``" Network precision: <precision>."``
            is appended to ``DerivationDescription``.

    Returns:
        The written file paths in slice order (inside ``folder``).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{folder}: a DICOM series needs a 3D volume, got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{folder}: the volume holds NaN/Inf values")
    if not description.startswith("SYNTHETIC"):
        raise ValueError(f"a synthetic series description must begin with SYNTHETIC, got {description!r}")
    if len(description) > 64:
        raise ValueError(f"SeriesDescription holds at most 64 characters, got {len(description)}: {description!r}")
    geo = geometry_from_affine(affine, volume.shape[2])
    slope, intercept, dtype = rescale_for(volume)
    stored = quantise(volume, slope, intercept, dtype)
    date, time = _now()
    base = Dataset()
    base.SpecificCharacterSet = source.charset
    base.SOPClassUID = MRImageStorage
    # value 3 (image flavour) is required in MR images; OTHER: no acquisition flavour applies
    base.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    for key, value in source.study.items():
        setattr(base, key, value)
    set_series_tags(base, source)
    base.SeriesDate = base.ContentDate = date
    base.SeriesTime = base.ContentTime = time
    base.Modality = "MR"
    base.Manufacturer = manufacturer
    base.SeriesDescription = description
    base.DerivationDescription = (derivation + (f" Network precision: {precision}." if precision else ""))[:1024]
    base.ImageComments = comments[:10240]
    base.BurnedInAnnotation = "NO"
    base.SoftwareVersions = software
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = int(series_number)
    base.PositionReferenceIndicator = ""
    base.ScanningSequence = "RM"  # research mode: no acquisition behind these pixels
    base.SequenceVariant = "NONE"
    base.ScanOptions = ""
    base.MRAcquisitionType = ""
    base.RepetitionTime = ""
    base.EchoTime = ""
    base.EchoTrainLength = ""
    set_geometry(base, geo)
    set_pixel_module(base, volume.shape, dtype, slope, intercept, _window(volume), min_width=16 * slope)

    def per_slice(k: int) -> dict[str, Any]:
        i = source.nearest(geo["positions"][k])
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.sop_class_uids[i]
        ref.ReferencedSOPInstanceUID = source.sop_instance_uids[i]
        return {"SourceImageSequence": DicomSequence([ref])}

    sop_uids = [generate_uid() for _ in range(volume.shape[2])]
    with atomic_folder(folder) as tmp:
        names = [p.name for p in write_slices(base, stored, geo, tmp, sop_uids, "GADOFREE_SYN", per_slice)]
    return [Path(folder) / n for n in names]


@contextmanager
def series_set(folder: str | os.PathLike) -> Iterator[Path]:
    """All the DICOM series of one run appear together, or none does.

    Yields a hidden staging folder ``.tmp-<name>-<hex>`` beside ``folder``; the caller writes every
    series of the run into it (one sub-folder each, e.g. with :func:`write_derived_series` and
    :func:`write_segmentation`). When the block completes, the staging folder is renamed to
    ``folder`` in one ``os.rename`` (atomic on one file system): a reader, or a process killed at any
    moment, sees either every series or none (:func:`common.io.atomic_folder`). An error inside the
    block removes the staging folder. Staging folders a killed run left behind are removed first, so
    a rerun after a kill completes; an empty ``folder`` (no series) is replaced.

    Raises:
        FileExistsError: ``folder`` already holds something (a complete earlier run).
    """
    folder = Path(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    with atomic_folder(
        folder,
        hint="it holds the DICOM series of an earlier run; remove it or choose another output folder",
        sweep_stale=True,
    ) as staging:
        yield staging


def _source_datasets(source: SourceSeries) -> list[Dataset]:
    """The instances of ``source`` (headers, no pixel data) in its slice order."""
    by_uid: dict[str, Dataset] = {}
    for _, ds in _readable_headers(source.folder):
        if str(ds.get("SeriesInstanceUID", "")) == source.series_uid:
            by_uid[str(ds.SOPInstanceUID)] = ds
    return [by_uid[u] for u in source.sop_instance_uids]


def _source_frames(
    mask: np.ndarray, affine: np.ndarray, sources: Sequence[Dataset], where: str, atol_mm: float
) -> np.ndarray:
    """``mask`` (x, y, z) as (n_sources, rows, columns) frames in the order of ``sources``, each frame
    the mask slice at that instance's position; ``ValueError`` naming ``where`` when the mask is not on
    the grid of the instances (orientation, pixel spacing, size, or a position off by > ``atol_mm``)."""
    geo = geometry_from_affine(affine, mask.shape[2])
    iop = np.asarray(geo["ImageOrientationPatient"], float)
    spacing = np.asarray(geo["PixelSpacing"], float)
    frames = np.zeros((len(sources), mask.shape[1], mask.shape[0]), dtype=mask.dtype)
    used = set()
    for f, ds in enumerate(sources):
        problem = ""
        if (int(ds.Rows), int(ds.Columns)) != (mask.shape[1], mask.shape[0]):
            problem = f"{ds.Rows}x{ds.Columns} pixels, the mask {mask.shape[1]}x{mask.shape[0]}"
        elif not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            problem = "another ImageOrientationPatient"
        elif not np.allclose(np.asarray(ds.PixelSpacing, float), spacing, atol=1e-4):
            problem = f"PixelSpacing {list(ds.PixelSpacing)}, the mask {spacing.round(5).tolist()}"
        else:
            d = np.linalg.norm(geo["positions"] - np.asarray(ds.ImagePositionPatient, float)[None], axis=1)
            k = int(np.argmin(d))
            if d[k] > atol_mm:
                problem = f"no mask slice within {atol_mm} mm of its position (nearest {d[k]:.3f} mm)"
            else:
                frames[f] = mask[:, :, k].T
                used.add(k)
        if problem:
            raise ValueError(
                f"{where}: the mask is not on the grid of the source instance {ds.SOPInstanceUID}: {problem}"
            )
    if len(used) != mask.shape[2]:
        raise ValueError(f"{where}: the mask has {mask.shape[2]} slices, the source series {len(used)} of them")
    return frames


def write_segmentation(
    mask: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    source: SourceSeries,
    *,
    series_number: int,
    label: str,
    algorithm_name: str,
    algorithm_version: str,
    description: str | None = None,
    category: Any = None,
    property_type: Any = None,
    manufacturer: str = "gadofree-bundles",
    atol_mm: float = 0.01,
) -> Path:
    """Write a binary label map (x, y, z) as a DICOM Segmentation (SEG, highdicom) of ``source``.

    The SEG has one segment: ``label`` (``SegmentLabel``), segmented property ``category`` /
    ``property_type`` (SNOMED CT codes; default Morphologically Abnormal Structure / Neoplasm),
    ``SegmentAlgorithmType AUTOMATIC`` with ``algorithm_name`` / ``algorithm_version`` (family
    Artificial Intelligence). Its frames lie on the source instances: frame ``f`` is the mask slice at
    instance ``f``'s position, with the source's orientation and spacing (oblique kept), and
    references that instance (``ReferencedSeriesSequence`` and per frame ``DerivationImageSequence``);
    the mask must lie on the grid of ``source`` (its NIfTI, e.g. ``t1n.nii.gz``) within ``atol_mm``,
    else ``ValueError`` naming ``folder``. Patient, study and frame of reference are the source's.
    Written atomically as ``<folder>/1-1.dcm`` (``folder`` must not exist).

    Args:
        mask: (x, y, z) array, voxels > 0.5 in the segment (e.g. ``et_mask.nii.gz``).
        affine: 4x4 RAS+ affine of ``mask`` (mm).
        folder: the series folder to create.
        source: the series segmented (:func:`read_source_series`).
        series_number: ``SeriesNumber``; description: ``SeriesDescription`` (default
            ``"SYNTHETIC SEG <label> (<algorithm_name> <algorithm_version>)"``, at most 64 characters).

    Returns:
        The path of the written SEG file.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"{folder}: a segmentation needs a 3D mask, got shape {mask.shape}")
    binary = (np.nan_to_num(mask.astype(np.float64)) > 0.5).astype(np.uint8)
    sources = _source_datasets(source)
    frames = _source_frames(binary, affine, sources, str(folder), atol_mm)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=category or codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=property_type or codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name[:64], family=codes.cid7162.ArtificialIntelligence, version=str(algorithm_version)[:64]
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=f"{algorithm_name} {algorithm_version}"[:64],
        device_serial_number="none",
        series_description=(description or f"SYNTHETIC SEG {label} ({algorithm_name} {algorithm_version})")[:64],
        omit_empty_frames=False,
    )
    for key, value in source.series_tags.items():  # not written empty: a SEG needs neither (dciodvfy)
        if value not in (None, ""):
            setattr(seg, key, value)
    seg.ImageComments = "Computed by a research model from other series; not a clinical finding. Research use only."
    with atomic_folder(folder) as tmp:
        seg.save_as(tmp / "1-1.dcm", enforce_file_format=True)
    return Path(folder) / "1-1.dcm"
