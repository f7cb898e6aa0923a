"""DICOM series: header scan, geometry checks, and reading a series as a 3D volume.

Scanning reads headers only (``pydicom.dcmread(stop_before_pixels=True)``); volumes are read with
SimpleITK's ``ImageSeriesReader`` from an explicit file list sorted along the slice normal, so the
direction cosines and spacing come from the DICOM geometry (oblique stays oblique). Converting to
NIfTI flips ITK's LPS to RAS: ``affine = diag(-1, -1, 1, 1) @ [D * spacing | origin]``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from common.geometry import LPS_TO_RAS, array_to_sitk, sitk_affine, sitk_to_array  # noqa: F401 (re-exported)
from common.ingest.errors import IngestError

log = logging.getLogger(__name__)


HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "StudyInstanceUID",
    "PatientID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "PixelSpacing",
    "InstanceNumber",
    "AcquisitionTime",
    "AcquisitionDate",
    "ContentTime",
    "ContentDate",
    "SeriesDate",
    "TriggerTime",
    "TemporalPositionIdentifier",
    "NumberOfTemporalPositions",
    "FlipAngle",
    "ImageType",
    "DiffusionBValue",
    "SliceThickness",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "Modality",
    # vendor b-value fields and their private creators (see header_b_value)
    0x00190010,
    0x0019100C,
    0x00430010,
    0x00431039,
    0x20010010,
    0x20011003,
]
DICOM_SUFFIXES = {".dcm", ".ima", ".dicom", ""}
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _tm_seconds(tm, da=None) -> float | None:
    """DICOM TM (``HHMMSS.ffffff``, optionally with a DA date) as seconds (since the epoch with a date)."""
    if tm in (None, ""):
        return None
    s = str(tm).strip().replace(":", "")
    try:
        hh, mm = int(s[0:2]), int(s[2:4]) if len(s) >= 4 else 0
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return None
    sec = hh * 3600 + mm * 60 + ss
    if da:
        try:
            d = _dt.datetime.strptime(str(da).strip()[:8], "%Y%m%d").replace(tzinfo=_dt.timezone.utc)
            sec += d.timestamp()
        except ValueError:
            pass
    return sec


def _float(v) -> float | None:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class SliceHeader:
    """What the ingest needs from one DICOM file's header."""

    path: str
    ipp: tuple[float, float, float] | None
    iop: tuple[float, ...] | None
    rows: int | None
    cols: int | None
    pixel_spacing: tuple[float, float] | None
    instance: int | None
    acq_time_s: float | None
    content_time_s: float | None
    trigger_time_ms: float | None
    temporal_position: int | None
    n_frames: int = 1
    b_value: float | None = None


@dataclass
class DicomSeries:
    """One DICOM series (a SeriesInstanceUID in one folder), headers only."""

    uid: str | None
    folder: Path
    label: str
    number: int | None
    description: str
    image_type: tuple[str, ...] = ()
    modality: str = ""
    flip_angle: float | None = None
    b_value: float | None = None
    patient_id: str = ""
    study_uid: str = ""
    frame_of_reference: str = ""
    headers: list[SliceHeader] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return len(self.headers) + len(self.unreadable)

    def summary(self) -> dict:
        return {
            "folder": self.label,
            "series_number": self.number,
            "description": self.description,
            "series_uid": self.uid,
            "n_files": self.n_files,
            "image_type": list(self.image_type),
            "flip_angle": self.flip_angle,
            "b_value": self.b_value,
        }

    def normal(self) -> np.ndarray | None:
        """Unit slice normal (row x column cosines) of the first readable slice, LPS."""
        for h in self.headers:
            if h.iop is not None:
                return slice_normal(h.iop)
        return None


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
    n = np.cross(r, c)
    return n / (np.linalg.norm(n) or 1.0)


def normal_angle_deg(n1: np.ndarray, n2: np.ndarray) -> float:
    """Angle between two slice normals ignoring their sign (0..90 degrees)."""
    c = abs(float(np.dot(n1, n2)) / (np.linalg.norm(n1) * np.linalg.norm(n2)))
    return float(np.degrees(np.arccos(min(1.0, c))))


_B_RE = re.compile(r"(?:b[-_ ]?value|bval|b)[-_ =]*(\d{2,4})", re.IGNORECASE)


def parse_b_value(description: str) -> float | None:
    """The largest b-value written in a description (``..._b1400``, ``high bvalue 1400``), or None."""
    vals = [float(m) for m in _B_RE.findall(description or "")]
    return max(vals) if vals else None


#: vendor b-value fields: (private creator tag, creator substring, value tag)
VENDOR_B_TAGS = (
    (0x00190010, "SIEMENS", 0x0019100C),  # Siemens B_value
    (0x00430010, "GEMS", 0x00431039),  # GE slop_int_6 (b-value, sometimes + 1e9)
    (0x20010010, "PHILIPS", 0x20011003),  # Philips diffusion b-factor
)


def _number(value) -> float | None:
    """The first number of a DICOM value (bytes of an unknown-VR private element, a string, a list)."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1", "replace").replace("\x00", " ")
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\\\s]+", value.strip()) if p]
        value = parts[0] if parts else None
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    return _float(value)


def header_b_value(ds: pydicom.Dataset) -> float | None:
    """The b-value (s/mm^2) of one DWI file: ``DiffusionBValue`` (0018,9087), else the vendor fields
    (Siemens (0019,100C) ``B_value``, GE (0043,1039) first value, Philips (2001,1003)) when their
    private creator names the vendor; None when no tag holds it."""
    b = _float(ds.get("DiffusionBValue"))
    if b is not None:
        return b
    for creator_tag, vendor, tag in VENDOR_B_TAGS:
        creator = ds.get(creator_tag)
        elem = ds.get(tag)
        if creator is None or elem is None or vendor not in str(creator.value).upper():
            continue
        v = _number(elem.value)
        if v is not None:
            return v % 1e9 if v >= 1e9 else v  # GE adds 1e9 on some software versions
    return None


def _read_header(path: Path) -> tuple[pydicom.Dataset | None, SliceHeader | None, str | None]:
    """``(dataset, header, None)`` or ``(None, None, reason)`` for an unreadable/truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            pixel_at = fp.tell()
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as e:
        return None, None, f"unreadable DICOM file ({type(e).__name__}: {e})"
    if "Rows" not in ds or "Columns" not in ds:
        return None, None, "not an image (no Rows/Columns)"
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2.1"))
    n_frames = int(_float(ds.get("NumberOfFrames")) or 1)
    if ts in _UNCOMPRESSED:
        need = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("BitsAllocated", 16))
            // 8
            * int(ds.get("SamplesPerPixel", 1))
            * n_frames
        )
        if size - pixel_at < need + 8:
            return (
                None,
                None,
                f"truncated DICOM file: {size - pixel_at} bytes after the header, pixel data needs {need + 8}",
            )
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    ps = ds.get("PixelSpacing")
    h = SliceHeader(
        path=str(path),
        ipp=tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else None,
        iop=tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        pixel_spacing=tuple(float(v) for v in ps) if ps is not None and len(ps) == 2 else None,
        instance=int(_float(ds.get("InstanceNumber"))) if _float(ds.get("InstanceNumber")) is not None else None,
        acq_time_s=_tm_seconds(ds.get("AcquisitionTime"), ds.get("AcquisitionDate") or ds.get("SeriesDate")),
        content_time_s=_tm_seconds(ds.get("ContentTime"), ds.get("ContentDate") or ds.get("SeriesDate")),
        trigger_time_ms=_float(ds.get("TriggerTime")),
        temporal_position=int(_float(ds.get("TemporalPositionIdentifier")))
        if _float(ds.get("TemporalPositionIdentifier")) is not None
        else None,
        n_frames=n_frames,
        b_value=header_b_value(ds),
    )
    return ds, h, None


def _is_candidate(name: str) -> bool:
    return Path(name).suffix.lower() in DICOM_SUFFIXES and not name.startswith(".")


def scan_study(study_dir: str | os.PathLike, patient: str | None = None) -> list[DicomSeries]:
    """Read the headers of every DICOM file below ``study_dir`` and group them into series.

    Files are grouped by (folder, SeriesInstanceUID). A ``.dcm`` file that cannot be read (or whose
    pixel data is shorter than its header says) is kept in the ``unreadable`` list of the series in
    its folder, so the series that needs it fails with a clear message; other non-DICOM files are
    skipped. No pixel data is read.
    """
    root = Path(study_dir)
    if not root.is_dir():
        raise IngestError(f"{root} is not a folder", patient)
    by_key: dict[tuple[str, str | None], DicomSeries] = {}
    bad_by_folder: dict[str, list[tuple[str, str]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        label = os.path.relpath(folder, root)
        for name in sorted(filenames):
            if not _is_candidate(name):
                continue
            path = folder / name
            ds, h, why = _read_header(path)
            if h is None:
                if path.suffix.lower() in (".dcm", ".ima", ".dicom"):
                    bad_by_folder.setdefault(label, []).append((name, why))
                else:
                    log.debug("skipping non-DICOM file %s (%s)", path, why)
                continue
            uid = str(ds.get("SeriesInstanceUID", "")) or None
            key = (label, uid)
            s = by_key.get(key)
            if s is None:
                b = _float(ds.get("DiffusionBValue"))
                desc = str(ds.get("SeriesDescription", "") or "")
                s = DicomSeries(
                    uid=uid,
                    folder=folder,
                    label=label,
                    number=int(_float(ds.get("SeriesNumber"))) if _float(ds.get("SeriesNumber")) is not None else None,
                    description=desc,
                    image_type=tuple(str(v) for v in (ds.get("ImageType") or ())),
                    modality=str(ds.get("Modality", "")),
                    flip_angle=_float(ds.get("FlipAngle")),
                    b_value=b if b else parse_b_value(desc),
                    patient_id=str(ds.get("PatientID", "")),
                    study_uid=str(ds.get("StudyInstanceUID", "")),
                    frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
                )
                by_key[key] = s
            s.headers.append(h)
    for label, bad in bad_by_folder.items():
        owners = [s for (lab, _), s in by_key.items() if lab == label]
        if owners:
            for s in owners:
                s.unreadable.extend(bad)
        else:
            by_key[(label, None)] = DicomSeries(
                uid=None, folder=root / label, label=label, number=None, description="", unreadable=list(bad)
            )
    # multi-series folders get the UID tail in their label so messages stay unambiguous
    counts: dict[str, int] = {}
    for lab, _ in by_key:
        counts[lab] = counts.get(lab, 0) + 1
    out = []
    for (lab, uid), s in by_key.items():
        if counts[lab] > 1 and uid:
            s.label = f"{lab}#{uid[-8:]}"
        out.append(s)
    out.sort(key=lambda s: (s.number if s.number is not None else 10**9, s.label))
    return out


@dataclass
class Frame:
    """One 3D volume of a series (one time point): its files sorted along the slice normal."""

    files: list[str]
    positions: np.ndarray
    trigger_time_ms: float | None = None
    acq_time_s: float | None = None
    content_time_s: float | None = None
    temporal_position: int | None = None


@dataclass
class SeriesGeometry:
    """Checked geometry of a series: shared orientation and size, slice positions, frames."""

    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    positions: np.ndarray  # unique positions along the normal, ascending
    slice_spacing: float
    frames: list[Frame]
    frame_source: str = "single"


def _min_or_none(vals: Iterable[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return min(vals) if vals else None


def check_series(
    s: DicomSeries, patient: str | None = None, gap_factor: float = 1.5, spacing_tolerance: float = 0.1
) -> SeriesGeometry:
    """Validate a series' headers and split it into frames (time points).

    Raises:
        IngestError: unreadable/truncated files, missing geometry tags, slices that disagree in
            orientation or size, a missing slice (a gap > ``gap_factor`` x the median spacing),
            a duplicated slice (one position with more files than the others), a slice off the regular
            grid by more than ``spacing_tolerance`` x the spacing (at least 0.1 mm), duplicated
            positions that cannot be split into time points, fewer than 2 slices.
    """
    fail = lambda msg: IngestError(msg, patient, s.label)  # noqa: E731
    if s.unreadable:
        names = ", ".join(f"{n} ({why})" for n, why in s.unreadable[:3])
        more = f" and {len(s.unreadable) - 3} more" if len(s.unreadable) > 3 else ""
        raise fail(f"unreadable or truncated DICOM file(s): {names}{more}")
    hs = s.headers
    if not hs:
        raise fail("no readable DICOM image in the series")
    missing = [Path(h.path).name for h in hs if h.ipp is None or h.iop is None or h.pixel_spacing is None]
    if missing:
        raise fail(
            f"{len(missing)} file(s) lack ImagePositionPatient/ImageOrientationPatient/PixelSpacing: {missing[:3]}"
        )
    if any(h.n_frames > 1 for h in hs):
        raise fail("multi-frame (enhanced) DICOM files are not supported; export the series as single-frame files")
    iops = np.array([h.iop for h in hs])
    dev = np.abs(iops - iops[0]).max()
    if dev > 1e-3:
        k = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        raise fail(
            f"slices disagree in orientation: {Path(hs[k].path).name} has ImageOrientationPatient "
            f"{np.round(iops[k], 4).tolist()} vs {np.round(iops[0], 4).tolist()} in {Path(hs[0].path).name}"
        )
    sizes = {(h.rows, h.cols) for h in hs}
    if len(sizes) > 1:
        raise fail(f"slices disagree in size (rows x columns): {sorted(sizes)}")
    sp = np.array([h.pixel_spacing for h in hs])
    if np.abs(sp - sp[0]).max() > 1e-4:
        raise fail(f"slices disagree in pixel spacing: {sorted({tuple(np.round(x, 4)) for x in sp})}")
    row, col = np.array(hs[0].iop[:3]), np.array(hs[0].iop[3:])
    normal = slice_normal(hs[0].iop)
    pos = np.array([float(np.dot(h.ipp, normal)) for h in hs])
    # in-plane position must agree too (the slices of one stack are offset along the normal only)
    inplane = np.array([np.asarray(h.ipp) - p * normal for h, p in zip(hs, pos)])
    if np.abs(inplane - inplane[0]).max() > max(0.5, 0.5 * min(sp[0])):
        raise fail("slices are not stacked along the slice normal (in-plane offsets of ImagePositionPatient differ)")
    # group into unique positions (tolerance: 1% of the smallest non-zero step or 0.01 mm)
    order = np.argsort(pos, kind="stable")
    uniq: list[float] = []
    groups: list[list[int]] = []
    for i in order:
        if uniq and abs(pos[i] - uniq[-1]) < 0.01:
            groups[-1].append(int(i))
        else:
            uniq.append(float(pos[i]))
            groups.append([int(i)])
    positions = np.array(uniq)
    if len(positions) < 2:
        raise fail(f"only {len(positions)} slice position(s): cannot build a 3D volume")
    steps = np.diff(positions)
    med = float(np.median(steps))
    big = np.nonzero(steps > gap_factor * med)[0]
    if big.size:
        k = int(big[0])
        raise fail(
            f"missing slice: gap of {steps[k]:.3g} mm between slice positions {positions[k]:.2f} and "
            f"{positions[k + 1]:.2f} mm along the normal (median spacing {med:.3g} mm, limit {gap_factor}x)"
        )
    small = np.nonzero(steps < med / gap_factor)[0]
    if small.size:
        k = int(small[0])
        raise fail(
            f"irregular slice spacing: {steps[k]:.3g} mm between positions {positions[k]:.2f} and {positions[k + 1]:.2f} (median {med:.3g} mm)"
        )
    # every position on one regular grid: a slice shifted by a fraction of the spacing would be
    # read onto the wrong place (SimpleITK only warns "Non uniform sampling")
    grid = positions[0] + med * np.arange(len(positions))
    off = positions - grid - np.median(positions - grid)
    k = int(np.argmax(np.abs(off)))
    if abs(off[k]) > max(0.1, spacing_tolerance * med):
        name = Path(hs[groups[k][0]].path).name
        raise fail(
            f"irregular slice spacing: {name} lies at {positions[k]:.2f} mm along the normal, {off[k]:+.2f} mm off the "
            f"regular {med:.3g} mm grid of the other slices (tolerance {max(0.1, spacing_tolerance * med):.2g} mm); "
            "a misplaced slice or a mixed series"
        )
    counts = [len(g) for g in groups]
    if len(set(counts)) > 1:
        n_t = max(set(counts), key=counts.count)  # images per position in most of the series
        extra = [g for g in groups if len(g) > n_t]
        if n_t == 1 or (extra and len(extra) <= len(groups) // 2):
            g = extra[0]
            names = ", ".join(Path(hs[i].path).name for i in g)
            raise fail(
                f"duplicated slice: {len(g)} files at position {positions[groups.index(g)]:.2f} mm where the other "
                f"positions have {n_t} ({names}); remove the copy"
                + (f" ({len(extra)} positions affected)" if len(extra) > 1 else "")
            )
        short = [positions[i] for i, c in enumerate(counts) if c < n_t]
        raise fail(
            f"slice positions have different numbers of images ({sorted(set(counts))}): a time point misses slices "
            + (f"at {len(short)} position(s), e.g. {short[0]:.2f} mm" if short else "")
        )
    n_t = counts[0]
    frames: list[Frame]
    source = "single"
    if n_t == 1:
        idx = [g[0] for g in groups]
        frames = [_frame(hs, idx, positions)]
    else:
        frames, source = _split_frames(hs, groups, positions, n_t, fail)
    return SeriesGeometry(
        row=row,
        col=col,
        normal=normal,
        rows=hs[0].rows,
        cols=hs[0].cols,
        pixel_spacing=(float(sp[0][0]), float(sp[0][1])),
        positions=positions,
        slice_spacing=med,
        frames=frames,
        frame_source=source,
    )


def _frame(hs: list[SliceHeader], idx: list[int], positions: np.ndarray) -> Frame:
    sel = [hs[i] for i in idx]
    return Frame(
        files=[h.path for h in sel],
        positions=positions,
        trigger_time_ms=_min_or_none(h.trigger_time_ms for h in sel),
        acq_time_s=_min_or_none(h.acq_time_s for h in sel),
        content_time_s=_min_or_none(h.content_time_s for h in sel),
        temporal_position=sel[0].temporal_position,
    )


def _split_frames(hs, groups, positions, n_t, fail) -> tuple[list[Frame], str]:
    """Split a series with ``n_t`` images per position into ``n_t`` frames."""
    for name, key in (
        ("TemporalPositionIdentifier", lambda h: h.temporal_position),
        ("TriggerTime", lambda h: h.trigger_time_ms),
        ("AcquisitionTime", lambda h: h.acq_time_s),
    ):
        vals = [key(h) for h in hs]
        if any(v is None for v in vals):
            continue
        ok = all(len({vals[i] for i in g}) == n_t for g in groups)
        if not ok:
            continue
        if name == "AcquisitionTime":
            # acquisition times differ slice by slice: rank them at each position instead
            per_pos = [sorted(g, key=lambda i: (vals[i], hs[i].instance or 0)) for g in groups]
            frames = [_frame(hs, [g[t] for g in per_pos], positions) for t in range(n_t)]
            return frames, "AcquisitionTime rank per position"
        levels = sorted({vals[i] for i in range(len(hs))})
        if len(levels) != n_t:
            continue
        frames = []
        for lv in levels:
            idx = [next(i for i in g if vals[i] == lv) for g in groups]
            frames.append(_frame(hs, idx, positions))
        return frames, name
    if all(h.instance is not None for h in hs):
        per_pos = [sorted(g, key=lambda i: hs[i].instance) for g in groups]
        return [_frame(hs, [g[t] for g in per_pos], positions) for t in range(n_t)], "InstanceNumber rank per position"
    raise fail(
        f"{n_t} images at each slice position and no tag (TemporalPositionIdentifier, TriggerTime, AcquisitionTime, InstanceNumber) to split them into time points"
    )


def read_frame(frame: Frame, geom: SeriesGeometry, patient: str | None = None, label: str | None = None) -> sitk.Image:
    """Read one frame's files (sorted along the normal) with ``sitk.ImageSeriesReader`` as float32.

    The result's geometry is checked against the DICOM headers (origin = first slice position,
    third direction column = slice normal, z spacing = median slice step).
    """
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(frame.files))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise IngestError(
            f"cannot read pixel data (unreadable or truncated DICOM file): {msg[-1] if msg else e}", patient, label
        ) from e
    d = np.array(img.GetDirection()).reshape(3, 3)
    if img.GetDimension() != 3 or img.GetSize()[2] != len(frame.files):
        raise IngestError(f"SimpleITK read {img.GetSize()} from {len(frame.files)} files", patient, label)
    if (
        np.abs(d[:, 2] - geom.normal).max() > 1e-3
        or abs(img.GetSpacing()[2] - geom.slice_spacing) > 1e-2 * geom.slice_spacing
        or np.abs(np.dot(d[:, 0], geom.row)) < 0.999
    ):
        raise IngestError(
            f"SimpleITK geometry disagrees with the headers: direction {np.round(d, 4).tolist()}, spacing "
            f"{img.GetSpacing()} vs normal {np.round(geom.normal, 4).tolist()}, step {geom.slice_spacing:.4g}",
            patient,
            label,
        )
    return img


def geometry_key(g: SeriesGeometry) -> tuple:
    """What makes two series' grids the same: size, row/column directions, pixel spacing and slice
    positions (rounded to 1e-3 mm / 0.1 mm)."""
    return (
        g.rows,
        g.cols,
        tuple(np.round(g.row, 3)),
        tuple(np.round(g.col, 3)),
        tuple(np.round(g.pixel_spacing, 3)),
        tuple(np.round(g.positions, 1)),
    )
