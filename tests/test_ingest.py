"""DICOM ingest (common.ingest) on small fabricated studies.

Unit tests of the rules, geometry helpers and registration run always; the end-to-end tests use
the DICOM prostate phantom (``common.phantoms``) on a small grid, and corrupt copies of it for the
bad-input cases. Budget: well under 60 s on 2 cores.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from common.ingest import (
    IngestConfig,
    IngestError,
    RegistrationSettings,
    array_to_sitk,
    ingest_study,
    load_rules,
    parse_tt,
    prepare_dataset,
    register_rigid,
    sitk_affine,
    sitk_to_array,
    time_ingest,
)
from common.ingest.register import pyramid_levels
from common.ingest.series import parse_b_value
from common.io import save_nifti
from common.layout import split_ids

# small grids for make_prostate_phantom (the default is the PROSTATEx protocol, 160 x 160 x 20)
PHANTOM_GRID: dict = {
    "grid_shape": (48, 48, 12),
    "grid_spacing": (3.2, 3.2, 3.6),
    "t2w_shape": (96, 96, 12),
    "t2w_spacing": (1.6, 1.6, 3.6),
    "prepared_slices": 8,
    "n_dce": 12,
    "dce_duration_s": 160.0,
}


# --------------------------------------------------------------------------------------------
# helpers


def _phantom_api():
    try:
        from common.phantoms.dicom import write_prostate_study
        from common.phantoms.prostate import make_prostate_phantom
    except ImportError as e:
        pytest.skip(f"the DICOM phantom (common.phantoms.prostate / .dicom) is not available: {e}")
    try:
        import common.transforms.crop  # noqa: F401
    except ImportError as e:
        pytest.skip(f"common.transforms.crop is not available: {e}")
    return make_prostate_phantom, write_prostate_study


def _vol(ph, role: str) -> np.ndarray:
    return np.asarray(ph.dce if role == "dce" else ph.images[role], dtype=np.float64)


def _aff(ph, role: str) -> np.ndarray:
    return np.asarray(ph.affines[role], dtype=np.float64)


def _study_dirs(patient_dir: Path) -> dict[str, Path]:
    """``{SeriesDescription: folder}`` of a DICOM patient folder."""
    out = {}
    for d in sorted(p for p in Path(patient_dir).rglob("*") if p.is_dir()):
        files = sorted(d.glob("*.dcm"))
        if files:
            out[str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesDescription)] = d
    return out


def _folder(patient_dir: Path, pattern: str) -> Path:
    hits = [d for desc, d in _study_dirs(patient_dir).items() if fnmatch.fnmatchcase(desc.lower(), pattern.lower())]
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def _files_along_normal(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.dcm"))
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(ds[0].ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    return [f for _, f in sorted(zip((float(np.dot(np.array(d.ImagePositionPatient, float), n)) for d in ds), files))]


def _edit(folder: Path, fn) -> None:
    for k, f in enumerate(_files_along_normal(folder)):
        ds = pydicom.dcmread(f)
        fn(ds, k)
        ds.save_as(f)


def _no_leftovers(out: Path, case_id: str) -> None:
    assert not (out / case_id).exists()
    if out.exists():
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# rules, helpers (no phantom needed)


@pytest.mark.parametrize(
    "desc, image_type, role",
    [
        ("t2_tse_tra_320_p2", (), "t2w"),
        ("t2_tse_tra", (), "t2w"),
        ("ep2d-advdiff-3Scan-4bval_spair_511b_ADC", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), "adc"),
        ("ep2d_diff_tra_ADC", (), "adc"),
        ("ep2d-advdiff-3Scan-high bvalue 1400", (), "dwi_highb"),
        ("ep2d_diff_tra_CALC_BVAL_b1400", (), "dwi_highb"),
        ("ep2d_diff_tra_DYNDIST", (), "dwi"),
        ("ep2d_diff_tra_DYNDIST_ADC", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), "adc"),
        ("ep2d_diff_tra_DYNDIST_CALC_BVAL", (), "dwi_highb"),
        ("ep2d_diff_tra_b400", (), "dwi"),
        ("fl3d_vibe_pre_flip_2deg_Wip403d_PD", (), "pd"),
        ("fl3d_vibe_pre_flip_2deg_PD", (), "pd"),
        ("fl3d_vibe_pre_flip_10deg_Wip403d", (), "t1_pre"),
        ("fl3d_vibe_pre_flip_12deg", (), "t1_pre"),
        ("Twist_dynamic_Wip576_TT=8.0s", (), "dce"),
        ("t1_twist_tra_dyn", (), "dce"),
        ("localizer", (), None),
        ("t2_localizer", (), None),
        ("t2_tse_sag", (), None),
        ("t2_tse_cor", (), None),
    ],
)
def test_default_rules_roles(desc, image_type, role):
    got, why = load_rules().classify(desc, image_type)
    assert got == role, (desc, why)


def test_rules_custom_and_invalid(tmp_path):
    rules = load_rules(
        {
            "roles": {"dce": {"description": ["my_dyn*"]}, "t2w": {"description": ["MY_T2*"], "case_sensitive": True}},
            "required": ["dce"],
        }
    )
    assert rules.classify("my_dyn_3", ())[0] == "dce"
    assert rules.classify("MY_T2_ax", ())[0] == "t2w"
    assert rules.classify("my_t2_ax", ())[0] is None
    with pytest.raises(IngestError, match="unknown role"):
        load_rules({"roles": {"flair": {"description": ["*"]}}})
    with pytest.raises(IngestError, match="unknown prefer rule"):
        load_rules({"roles": {"dce": {"description": ["*"]}, "t2w": {"prefer": "biggest"}}})
    with pytest.raises(IngestError, match="'dce' role is required"):
        load_rules({"roles": {"t2w": {"description": ["*"]}}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IngestError, match="cannot read JSON"):
        load_rules(bad)
    # the packaged file is valid JSON a user can copy
    assert load_rules().required == ("dce", "t1_pre", "t2w", "adc")


def test_parsers_and_error_message():
    assert parse_tt("Twist_dynamic_Wip576_TT=298.9s") == pytest.approx(298.9)
    assert parse_tt("t1_twist_tra_dyn") is None
    assert parse_b_value("ep2d_diff_tra_CALC_BVAL_b1400") == 1400
    assert parse_b_value("ep2d-advdiff-3Scan-high bvalue 1400") == 1400
    e = IngestError("missing slice: gap", "P7", "2011/5-t2")
    assert str(e) == "patient P7: series 2011/5-t2: missing slice: gap"
    assert str(IngestError("x").with_context(patient="P1")) == "patient P1: x"


def test_pyramid_levels_small_grids():
    assert pyramid_levels((160, 160, 20), (4, 2, 1), (2, 1, 0)) == ([4, 2, 1], [2.0, 1.0, 0.0])
    assert pyramid_levels((48, 48, 12), (4, 2, 1), (2, 1, 0)) == ([2, 1], [1.0, 0.0])
    assert pyramid_levels((8, 8, 3), (4, 2, 1), (2, 1, 0)) == ([1], [0.0])


def _oblique_affine(shape=(20, 18, 10), spacing=(1.5, 1.2, 3.0), angle_deg=20.0):
    a = np.radians(angle_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ np.array(
        [[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [12.0, -30.0, 5.5]
    return aff


def test_ras_lps_roundtrip_oblique(tmp_path):
    aff = _oblique_affine()
    arr = np.random.default_rng(0).random((20, 18, 10)).astype(np.float32)
    img = array_to_sitk(arr, aff)
    np.testing.assert_allclose(sitk_affine(img), aff, atol=1e-6)
    np.testing.assert_array_equal(sitk_to_array(img), arr)
    # the physical point of voxel (i, j, k): ITK (LPS) and the RAS affine agree up to the flip
    ijk = (3, 7, 4)
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    ras = aff @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(lps * [-1, -1, 1], ras[:3], atol=1e-6)
    # written with common.io.save_nifti, SimpleITK reads the same geometry back
    save_nifti(arr, sitk_affine(img), tmp_path / "x.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-5)


def test_register_rigid_recovers_and_bounds():
    """A textured volume and a rigidly moved copy: the known transform comes back; bounds raise."""
    rng = np.random.default_rng(1)
    from scipy import ndimage

    vol = ndimage.gaussian_filter(rng.random((48, 48, 24)), 2.0) * 1000
    img = array_to_sitk(vol.astype(np.float32), _oblique_affine((48, 48, 24), (2.0, 2.0, 2.0)))
    known = sitk.Euler3DTransform()
    known.SetCenter(img.TransformContinuousIndexToPhysicalPoint((23.5, 23.5, 11.5)))
    known.SetRotation(0.0, 0.0, np.radians(2.0))
    known.SetTranslation((2.0, -2.0, 1.0))
    moving = sitk.Resample(img, img, known, sitk.sitkLinear, 0.0)  # moving(p) = img(known(p))
    res = register_rigid(img, moving, RegistrationSettings(sampling_percentage=0.3))
    inv = known.GetInverse()
    for idx in ((24, 24, 12), (10, 30, 6), (38, 12, 18)):
        p = img.TransformIndexToPhysicalPoint(idx)
        assert np.linalg.norm(np.subtract(res.transform.TransformPoint(p), inv.TransformPoint(p))) < 1.0
    assert abs(res.rotation_angle_deg - 2.0) < 1.0
    with pytest.raises(IngestError, match=r"moved more than the bounds \(1 mm"):
        register_rigid(
            img, moving, RegistrationSettings(sampling_percentage=0.3, max_translation_mm=1.0), "t2w", "P9", "5-t2"
        )


# --------------------------------------------------------------------------------------------
# the DICOM phantom


@pytest.fixture(scope="module")
def phantom_src(tmp_path_factory):
    """One small phantom patient written as DICOM: ``(phantom, patient_dir, src_root)``."""
    make, write = _phantom_api()
    src = tmp_path_factory.mktemp("dicom_src")
    ph = make(0, **PHANTOM_GRID)
    pdir = Path(write(ph, src, "P000"))
    if pdir.name != "P000":  # the writer may return the study folder below the patient
        pdir = src / "P000"
    return ph, pdir, src


def _grid_size(ph) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(ph.dce).shape[:3])


@pytest.fixture(scope="module")
def good_case(phantom_src, tmp_path_factory):
    ph, pdir, _ = phantom_src
    out = tmp_path_factory.mktemp("prepared")
    m = ingest_study(pdir, out, "P000", crop_size=_grid_size(ph))
    return m, out / "P000"


def _copy(pdir: Path, tmp_path: Path, pid: str = "PX") -> Path:
    dst = tmp_path / "src" / pid
    shutil.copytree(pdir, dst)
    return dst


def test_phantom_roles_times_and_ignored(good_case, phantom_src):
    ph = phantom_src[0]
    m, case = good_case
    assert set(m["roles"]) == {"t2w", "adc", "dwi_highb", "pd", "t1_pre"}
    times = json.loads((case / "dce_times.json").read_text())["times_s"]
    np.testing.assert_allclose(times, np.asarray(ph.times_s, float), atol=0.051)
    ignored = [r["description"] for r in m["ignored"]]
    assert any("localizer" in d.lower() for d in ignored)
    # contrast arrival: the last pre-contrast time point precedes the phantom's bolus, onset follows it
    bolus = float(ph.truth["aif"]["bolus_arrival_s"])
    dt = float(np.median(np.diff(times)))
    assert m["dce"]["phases"]["pre"]["time_s"] < bolus <= m["dce"]["phases"]["onset"]["time_s"] < bolus + 2 * dt
    ph_idx = m["dce"]["phases"]
    assert ph_idx["pre"]["index"] < ph_idx["onset"]["index"] <= ph_idx["early"]["index"] <= ph_idx["late"]["index"]


def test_phantom_volumes_recovered(good_case, phantom_src):
    """Same grid as the phantom's DCE grid (no crop): values and geometry come back."""
    ph = phantom_src[0]
    m, case = good_case
    ref = _aff(ph, "dce")
    for key in ("dce", "adc", "pd", "t1_pre", "dwi_highb", "t2w", "dce_pre", "dce_late"):
        img = nib.load(case / f"{key}.nii.gz")
        np.testing.assert_allclose(img.affine, ref, atol=1e-3, err_msg=key)
    dce = np.asarray(nib.load(case / "dce.nii.gz").dataobj, float)
    truth = _vol(ph, "dce")
    assert dce.shape == truth.shape
    np.testing.assert_allclose(dce, truth, atol=0.01 * np.ptp(truth) + 1e-3)
    for role in ("adc", "pd", "t1_pre"):
        got = np.asarray(nib.load(case / f"{role}.nii.gz").dataobj, float)
        want = _vol(ph, role)
        if want.shape != got.shape:
            continue  # this phantom keeps the role on its own grid; compared natively below
        inner = (slice(2, -2),) * 3  # registration may move a fraction of a voxel: skip the border
        err = np.abs(got[inner] - want[inner])
        assert np.median(err) < 0.02 * np.ptp(want), role
        assert np.corrcoef(got[inner].ravel(), want[inner].ravel())[0, 1] > 0.98, role
    # native T2w: the phantom's own grid and values
    t2 = nib.load(case / "native" / "t2w.nii.gz")
    np.testing.assert_allclose(t2.affine, _aff(ph, "t2w"), atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(t2.dataobj, float), _vol(ph, "t2w"), atol=0.01 * np.ptp(_vol(ph, "t2w")) + 1e-3
    )
    # the series are aligned in the phantom: registration moves the prostate by less than 1 mm
    ijk = np.argwhere(np.asarray(ph.organ_mask) > 0)
    ras = (ref @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    for role, r in m["registration"].items():
        assert _max_displacement(r, ras) < 1.0, (role, r)


def _transform(r: dict) -> sitk.Euler3DTransform:
    """The Euler3DTransform a manifest registration record describes."""
    tx = sitk.Euler3DTransform()
    tx.SetCenter(r["center_mm"])
    tx.SetRotation(*np.radians(r["angles_deg"]))
    tx.SetTranslation(r["translation_mm"])
    return tx


def _max_displacement(r: dict, ras_points: np.ndarray) -> float:
    """Largest displacement (mm) of the RAS points under a manifest registration record."""
    if "angles_deg" not in r:
        return 0.0
    tx = _transform(r)
    lps = ras_points * [-1.0, -1.0, 1.0]
    return max(float(np.linalg.norm(np.subtract(tx.TransformPoint(tuple(p)), p))) for p in lps)


def _apply_known_motion(folder: Path, known: sitk.Euler3DTransform) -> None:
    """Rewrite a series' pixel data as ``img(known(p))`` keeping its DICOM geometry."""
    files = _files_along_normal(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    img = reader.Execute()
    moved = sitk.GetArrayFromImage(sitk.Resample(img, img, known, sitk.sitkLinear, 0.0))  # (z, y, x)

    def put(ds, k):
        slope, icpt = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16
        info = np.iinfo(dtype)
        ds.PixelData = np.clip(np.round((moved[k] - icpt) / slope), info.min, info.max).astype(dtype).tobytes()

    _edit(folder, put)


@pytest.fixture(scope="module")
def moved_t2w(phantom_src, tmp_path_factory):
    """The phantom with its T2w content moved by a known 3 mm + 2 deg rigid transform."""
    _, pdir, _ = phantom_src
    tmp = tmp_path_factory.mktemp("moved")
    study = _copy(pdir, tmp, "PM")
    t2 = _folder(study, "t2*tse*tra*")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in _files_along_normal(t2)])
    img = reader.Execute()
    known = sitk.Euler3DTransform()
    known.SetCenter(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    known.SetRotation(0.0, 0.0, np.radians(2.0))
    known.SetTranslation((2.0, -2.0, 1.0))  # |t| = 3 mm
    _apply_known_motion(t2, known)
    return study, known, img


def test_known_offset_recovered(moved_t2w, phantom_src, tmp_path):
    study, known, t2img = moved_t2w
    ph = phantom_src[0]
    m = ingest_study(study, tmp_path / "out", "PM", crop_size=_grid_size(ph))
    r = m["registration"]["t2w"]
    got = _transform(r)
    inv = known.GetInverse()  # fixed(p) = t2(p) = moved(inv(p))
    c = np.array(t2img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in t2img.GetSize()]))
    for off in ((0, 0, 0), (20, 15, 8), (-20, 15, -8), (15, -20, 0)):
        p = tuple(c + off)
        err = np.linalg.norm(np.subtract(got.TransformPoint(p), inv.TransformPoint(p)))
        assert err < 1.0, (off, err, r)
    rot = np.array(got.GetMatrix()).reshape(3, 3) @ np.array(known.GetMatrix()).reshape(3, 3)
    assert np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))) < 1.0, r
    assert 1.0 < r["rotation_angle_deg"] < 3.0 and 2.0 < r["translation_norm_mm"] < 4.5


def test_registration_bound_is_an_error(moved_t2w, tmp_path):
    study = moved_t2w[0]
    with pytest.raises(IngestError) as ei:
        ingest_study(study, tmp_path / "out", "PM", registration=RegistrationSettings(max_translation_mm=1.0))
    msg = str(ei.value)
    assert "patient PM" in msg and "moved more than the bounds" in msg and "t2w" in msg and "mm" in msg
    assert _folder(study, "t2*tse*tra*").name in msg
    _no_leftovers(tmp_path / "out", "PM")


def _drop(pattern):
    def f(study):
        for desc, d in _study_dirs(study).items():
            if fnmatch.fnmatchcase(desc.lower(), pattern.lower()):
                shutil.rmtree(d)
        return None

    return f


def _drop_middle_slice(study):
    d = _folder(study, "t2*tse*tra*")
    files = _files_along_normal(d)
    files[len(files) // 2].unlink()
    return d


def _truncate(study):
    d = _folder(study, "*ADC*")
    f = sorted(d.glob("*.dcm"))[1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _garbage(study):
    d = _folder(study, "t2*tse*tra*")  # a required series (a broken optional one is skipped)
    (sorted(d.glob("*.dcm"))[0]).write_bytes(b"this is not a DICOM file" * 10)
    return d


def _tilt_one(study):
    cands = [
        dd
        for desc, dd in _study_dirs(study).items()
        if fnmatch.fnmatchcase(desc.lower(), "fl3d_vibe_pre*") and "pd" not in desc.lower()
    ]
    d = cands[0]

    def tilt(ds, k):
        if k == 1:
            a = np.radians(10)
            r = np.array(ds.ImageOrientationPatient[:3], float)
            c = np.array(ds.ImageOrientationPatient[3:], float)
            c2 = np.cos(a) * c + np.sin(a) * np.cross(r, c)
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*r, *c2]]

    _edit(d, tilt)
    return d


def _shrink_one(study):
    d = _folder(study, "*ADC*")

    def shrink(ds, k):
        if k == 2:
            px = ds.pixel_array[:-2, :]
            ds.Rows = px.shape[0]
            ds.PixelData = px.tobytes()

    _edit(d, shrink)
    return d


def _constant(study):
    d = _folder(study, "*ADC*")

    def const(ds, k):
        px = ds.pixel_array
        ds.PixelData = np.full_like(px, 7).tobytes()

    _edit(d, const)
    return d


def _dce_short(study):
    dyn = sorted((parse_tt(desc), d) for desc, d in _study_dirs(study).items() if desc.lower().startswith("twist"))
    d = dyn[len(dyn) // 2][1]
    _files_along_normal(d)[-1].unlink()  # an end slice: no gap inside the series, but another grid
    return d


def _duplicate_slice(study):
    d = _folder(study, "t2*tse*tra*")
    f = _files_along_normal(d)[3]
    shutil.copy(f, d / f"copy-{f.name}")
    return d


def _shift_slice(study):
    """One T2w slice moved 0.8 mm along the normal (of 3.6 mm spacing): SimpleITK only warns."""
    d = _folder(study, "t2*tse*tra*")

    def shift(ds, k):
        if k == 3:
            iop = np.array(ds.ImageOrientationPatient, float)
            n = np.cross(iop[:3], iop[3:])
            ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array(ds.ImagePositionPatient, float) + 0.8 * n]

    _edit(d, shift)
    return d


BAD_CASES = {
    "no_dce": (_drop("twist*"), r"no DCE series found"),
    "no_pre": (_drop("fl3d_vibe_pre_flip_1*"), r"no t1_pre series found"),
    "missing_slice": (_drop_middle_slice, r"missing slice: gap of"),
    "duplicated_slice": (
        _duplicate_slice,
        r"duplicated slice: 2 files at position .* where the other positions have 1 \(.*copy-",
    ),
    "shifted_slice": (
        _shift_slice,
        r"irregular slice spacing: .* mm along the normal, \+0\.[5-8]\d mm off the regular",
    ),
    "truncated": (_truncate, r"unreadable or truncated DICOM file.*truncated"),
    "unreadable": (_garbage, r"unreadable or truncated DICOM file.*unreadable"),
    "orientation": (_tilt_one, r"slices disagree in orientation"),
    "size": (_shrink_one, r"slices disagree in size"),
    "constant": (_constant, r"constant image"),
    "dce_time_point_short": (_dce_short, r"DCE time point lies on another grid"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises(case, phantom_src, tmp_path):
    _, pdir, _ = phantom_src
    study = _copy(pdir, tmp_path, "PB")
    corrupt, pattern = BAD_CASES[case]
    folder = corrupt(study)
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=pattern) as ei:
        ingest_study(study, out, "PB")
    msg = str(ei.value)
    assert msg.startswith("patient PB"), msg
    if folder is not None:
        assert folder.name in msg, msg
        assert ei.value.series and folder.name in ei.value.series
    _no_leftovers(out, "PB")


def test_nan_image_is_an_error(phantom_src, tmp_path, monkeypatch):
    import common.ingest.pipeline as pl

    _, pdir, _ = phantom_src
    real = pl.read_frame

    def with_nan(frame, geom, patient=None, label=None):
        img = real(frame, geom, patient, label)
        if label and "pd" in label.lower():
            a = sitk.GetArrayFromImage(img)
            a[0, 0, 0] = np.nan
            nan = sitk.GetImageFromArray(a)
            nan.CopyInformation(img)
            return nan
        return img

    monkeypatch.setattr(pl, "read_frame", with_nan)
    with pytest.raises(IngestError, match=r"patient PN: series .*PD.*: pd: 1 NaN/Inf voxel"):
        ingest_study(pdir, tmp_path / "out", "PN")
    _no_leftovers(tmp_path / "out", "PN")


def test_crash_while_writing_leaves_nothing(phantom_src, tmp_path, monkeypatch):
    import common.ingest.pipeline as pl

    _, pdir, _ = phantom_src
    real = pl.save_json

    def boom(obj, path, *a, **k):
        if Path(path).name == "manifest.json":
            raise RuntimeError("disk full (simulated)")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(pl, "save_json", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        ingest_study(pdir, tmp_path / "out", "PC")
    _no_leftovers(tmp_path / "out", "PC")


def test_extra_series_choice_and_other_plane(phantom_src, tmp_path):
    """A second, shorter T2w series loses to the one with more slices; a sagittal series whose
    description matches a role is ignored by its orientation."""
    _, pdir, _ = phantom_src
    study = _copy(pdir, tmp_path, "PE")
    t2 = _folder(study, "t2*tse*tra*")
    short = t2.parent / ("99.000000-" + t2.name.split("-", 1)[1] + "_short")
    shutil.copytree(t2, short)
    files = _files_along_normal(short)
    files[0].unlink()
    files[-1].unlink()
    uid = pydicom.uid.generate_uid()
    _edit(short, lambda ds, k: (setattr(ds, "SeriesInstanceUID", uid), setattr(ds, "SeriesNumber", 99)))
    loc = _folder(study, "*localizer*")
    sag = loc.parent / "98.000000-t2_tse_tra_sag_like"
    shutil.copytree(loc, sag)
    uid2 = pydicom.uid.generate_uid()
    _edit(
        sag,
        lambda ds, k: (setattr(ds, "SeriesInstanceUID", uid2), setattr(ds, "SeriesDescription", "t2_tse_tra_oblique")),
    )
    m = ingest_study(study, tmp_path / "out", "PE", crop_size=(16, 16, 4), write_native=False)
    assert m["roles"]["t2w"]["folder"].endswith(t2.name)
    choice = next(c for c in m["choices"] if c["role"] == "t2w")
    assert choice["rule"] == "most_slices" and choice["chosen"].endswith(t2.name)
    sag_rec = next(r for r in m["series"] if r["folder"].endswith(sag.name))
    assert sag_rec["status"] == "ignored" and "deg from the DCE normal" in sag_rec["reason"]
    assert not (tmp_path / "out" / "PE" / "native").exists()


@pytest.mark.parametrize("time_tag", ["TriggerTime", "AcquisitionTime"])
def test_dce_as_one_series_with_temporal_positions(phantom_src, good_case, tmp_path, time_tag):
    ph, pdir, _ = phantom_src
    study = _copy(pdir, tmp_path, "PT")
    dyn = [(desc, d) for desc, d in _study_dirs(study).items() if desc.lower().startswith("twist")]
    dyn.sort(key=lambda x: parse_tt(x[0]))
    merged = dyn[0][1].parent / "50.000000-t1_twist_tra_dyn"
    merged.mkdir()
    uid = pydicom.uid.generate_uid()
    rng = np.random.default_rng(0)
    names = rng.permutation(len(dyn) * 1000)
    n = 0
    for t_idx, (desc, d) in enumerate(dyn):
        tt = parse_tt(desc)
        for k, f in enumerate(_files_along_normal(d)):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = uid
            ds.SeriesNumber = 50
            ds.SeriesDescription = "t1_twist_tra_dyn"
            ds.InstanceNumber = n + 1
            if time_tag == "TriggerTime":
                ds.TemporalPositionIdentifier = t_idx + 1
                ds.TriggerTime = f"{tt * 1000:.1f}"
            else:
                for tag in ("TemporalPositionIdentifier", "TriggerTime"):
                    if tag in ds:
                        delattr(ds, tag)
                s = 10 * 3600 + tt + 0.01 * k  # slices of one time point a little apart
                ds.AcquisitionTime = f"{int(s // 3600):02d}{int(s % 3600 // 60):02d}{s % 60:09.6f}"
            ds.save_as(merged / f"{names[n]:05d}.dcm")
            n += 1
        shutil.rmtree(d)
    m = ingest_study(study, tmp_path / "out", "PT", crop_size=_grid_size(ph), write_native=False)
    times = np.asarray(ph.times_s, float)
    expect = times if time_tag == "TriggerTime" else times - times[0]
    np.testing.assert_allclose(m["dce"]["times_s"], expect, atol=0.06)
    assert time_tag in m["dce"]["time_source"]
    a = np.asarray(nib.load(tmp_path / "out" / "PT" / "dce.nii.gz").dataobj)
    b = np.asarray(nib.load(good_case[1] / "dce.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)


def test_mask_centres_the_crop(phantom_src, tmp_path):
    ph, pdir, _ = phantom_src
    mask = np.asarray(ph.organ_mask) > 0
    mpath = save_nifti(mask.astype(np.uint8), _aff(ph, "dce"), tmp_path / "masks" / "PK.nii.gz", dtype=np.uint8)
    size = (16, 16, 6)
    m = ingest_study(pdir, tmp_path / "out", "PK", crop_size=size, mask=tmp_path / "masks", write_native=False)
    assert str(mpath) in m["crop"]["center_source"]
    out = nib.load(tmp_path / "out" / "PK" / "organ_mask.nii.gz")
    assert out.shape == size
    got = np.argwhere(np.asarray(out.dataobj) > 0).mean(0)
    assert np.all(np.abs(got - (np.array(size) - 1) / 2) <= 1.0), got
    # the crop affine is the reference affine moved to the box's first voxel
    ref = _aff(ph, "dce")
    start = np.linalg.solve(ref, out.affine[:, 3])[:3]
    np.testing.assert_allclose(start, np.round(start), atol=1e-3)
    np.testing.assert_allclose(out.affine[:3, :3], ref[:3, :3], atol=1e-5)


def test_phase_overrides_and_vibe_pre(phantom_src, tmp_path):
    ph, pdir, _ = phantom_src
    times = np.asarray(ph.times_s, float)
    m = ingest_study(
        pdir,
        tmp_path / "out",
        "PP",
        crop_size=(16, 16, 4),
        write_native=False,
        phases={"early": {"time_s": float(times[-2])}, "late": {"index": -1}},
        pre_source="t1_pre",
    )
    assert m["dce"]["phases"]["early"]["index"] == len(times) - 2
    assert m["dce"]["phases"]["pre"]["source"].startswith("t1_pre")
    case = tmp_path / "out" / "PP"
    np.testing.assert_array_equal(
        np.asarray(nib.load(case / "dce_pre.nii.gz").dataobj), np.asarray(nib.load(case / "t1_pre.nii.gz").dataobj)
    )
    assert m["dce"]["phase_rule"] == "arrival"
    # a named phase rule (common.dce.PHASE_RULES), recorded in the manifest
    m = ingest_study(
        pdir, tmp_path / "out2", "PR", crop_size=(16, 16, 4), write_native=False, phase_rule="dcediff_paper"
    )
    n = len(times)
    assert m["dce"]["phase_rule"] == "dcediff_paper"
    assert m["dce"]["phases"]["early"]["index"] == round(0.5 * (n - 1)) and m["dce"]["phases"]["late"]["index"] == n - 1
    with pytest.raises(IngestError, match=r"--phase_rule 'middle': unknown"):
        ingest_study(pdir, tmp_path / "out3", "PQ", crop_size=(16, 16, 4), write_native=False, phase_rule="middle")


def test_batch_skips_reruns_and_splits(phantom_src, tmp_path):
    """Three good patients and two bad ones through prepare_dataset (2 worker processes)."""
    make, write = _phantom_api()
    _, pdir, _ = phantom_src
    src = tmp_path / "src"
    for pid in ("P1", "P2", "P3"):
        shutil.copytree(pdir, src / pid)
    bad_dce = _copy(pdir, tmp_path, "P4")
    _drop("twist*")(bad_dce)
    bad_trunc = _copy(pdir, tmp_path, "P5")
    _truncate(bad_trunc)
    out = tmp_path / "out"
    cfg = IngestConfig(crop_size=(16, 16, 4), write_native=False)
    s1 = prepare_dataset(src, out, cfg, workers=2, progress=False)
    assert s1["prepared"] == ["P1", "P2", "P3"]
    reasons = {s["id"]: s["reason"] for s in s1["skipped"]}
    assert set(reasons) == {"P4", "P5"}
    assert "no DCE series found" in reasons["P4"] and "patient P4" in reasons["P4"]
    assert "truncated" in reasons["P5"]
    skipped = json.loads((out / "skipped.json").read_text())["skipped"]
    assert {s["id"] for s in skipped} == {"P4", "P5"}
    assert not (out / "P4").exists() and not (out / "P5").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    dl = json.loads((out / "datalist.json").read_text())
    split = split_ids(["P1", "P2", "P3"], (0.8, 0.1, 0.1), 0)
    for k in ("training", "validation", "test"):
        assert [e["id"] for e in dl[k]] == split[k]
    entry = (dl["training"] + dl["validation"] + dl["test"])[0]
    for key in ("t2w", "adc", "pd", "t1_pre", "dwi_highb", "dce", "dce_pre", "dce_onset", "dce_early", "dce_late"):
        assert (out / entry[key]).is_file(), key
    first = (out / "datalist.json").read_text()
    mtime = (out / "P1" / "manifest.json").stat().st_mtime_ns
    # re-run: finished patients are skipped, the bad ones tried again; same datalist
    s2 = prepare_dataset(src, out, cfg, workers=1, progress=False)
    assert s2["existing"] == ["P1", "P2", "P3"] and s2["prepared"] == []
    assert {s["id"] for s in s2["skipped"]} == {"P4", "P5"}
    assert (out / "P1" / "manifest.json").stat().st_mtime_ns == mtime
    assert (out / "datalist.json").read_text() == first
    # overwrite: re-done, still one folder per patient
    s3 = prepare_dataset(
        src / "P2",
        out,
        IngestConfig(crop_size=(16, 16, 4), write_native=False, overwrite=True),
        workers=1,
        progress=False,
    )
    assert s3["prepared"] == ["P2"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["P1", "P2", "P3"]


def test_cli_and_time_ingest(phantom_src, tmp_path, capsys):
    import importlib.util

    _, pdir, _ = phantom_src
    spec = importlib.util.spec_from_file_location(
        "prepare_prostatex", Path(__file__).resolve().parents[1] / "scripts" / "prepare_prostatex.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(src=str(pdir), out=str(tmp_path / "out"), workers=1, crop_size="16x16x4", native=False, progress=False)
    text = capsys.readouterr().out
    assert "prepared 1" in text and (tmp_path / "out" / "datalist.json").is_file()
    assert (tmp_path / "out" / pdir.name / "manifest.json").is_file()
    t = time_ingest(pdir, IngestConfig(crop_size=(16, 16, 4), write_native=False))
    assert {"scan_s", "read_s", "register_s", "write_s", "total_s"} <= set(t) and t["n_dce"] == len(
        phantom_src[0].times_s
    )


# --------------------------------------------------------------------------------------------
# stages of ingest_study, one at a time, on hand-made arrays


def test_stage_pick_phases_closed_form():
    """A uniform body at 100 that jumps to 300 at t = 40 s: arrival index 4 (first point above
    baseline 100 + 10% of the 200 rise), pre 3, onset 4, early nearest 40 + 20 s = index 6, late 7."""
    from types import SimpleNamespace

    from common.ingest.pipeline import IngestJob, PhaseChoice, StudyData, make_job, pick_phases

    times = np.arange(8) * 10.0
    dce4 = np.full((4, 4, 2, 8), 100.0, np.float32)
    dce4[..., 4:] = 300.0
    study = StudyData(SimpleNamespace(times_s=times), [], dce4, {})
    job = make_job(
        "/nonexistent/U1", "/nonexistent/out", None, IngestConfig(arrival_mask="foreground", early_delay_s=20.0)
    )
    assert isinstance(job, IngestJob) and job.case_id == "U1" and job.final == Path("/nonexistent/out/U1")
    ch = pick_phases(job, study, None)
    assert ch.phases == {"pre": 3, "onset": 4, "early": 6, "late": 7}
    assert (
        ch.arrival.index == 4
        and ch.arrival.time_s == 40.0
        and ch.arrival.baseline == 100.0
        and ch.arrival.peak == 300.0
    )
    np.testing.assert_allclose(ch.curve, [100] * 4 + [300] * 4)
    d = ch.manifest(times)
    assert d["arrival"] == {"index": 4, "time_s": 40.0, "baseline": 100.0, "peak": 300.0, "curve_mask": "foreground"}
    assert d["mean_curve"] == [100.0] * 4 + [300.0] * 4
    assert d["phases"]["early"] == {"index": 6, "time_s": 60.0, "source": "dce"}
    # "organ" without a mask falls back to the enhancing voxels (and says so)
    assert pick_phases(_with_cfg(job, arrival_mask="organ"), study, None).curve_mask == "enhancing"
    # every phase given: no curve, no arrival; pre from the VIBE is recorded
    given = {"pre": {"index": 1}, "onset": {"index": 2}, "early": {"time_s": 31.0}, "late": {"index": -2}}
    ch = pick_phases(_with_cfg(job, phases=given, pre_source="t1_pre"), study, None)
    assert ch == PhaseChoice({"pre": 1, "onset": 2, "early": 3, "late": 6}, None, None, "foreground", "t1_pre")
    d = ch.manifest(times)
    assert d["arrival"] is None and d["mean_curve"] is None
    assert d["phases"]["pre"] == {"index": 1, "time_s": 10.0, "source": "t1_pre (registered VIBE pre-contrast)"}


def _with_cfg(job, **changes):
    import dataclasses

    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, **changes))


def test_stage_crop_study_closed_form():
    """Crop (4, 4, 2) of a (10, 8, 6) grid: around the mask centroid (3, 2, 1) the box starts at
    floor(c + 0.5) - size // 2 = (1, 0, 0); around the grid centre (4.5, 3.5, 2.5) at (3, 2, 2)."""
    from common.ingest.pipeline import CropWindow, OrganMask, PhaseChoice, Registration, crop_study, make_job

    ref = sitk.Image([10, 8, 6], sitk.sitkFloat32)
    ref.SetSpacing((2.0, 1.0, 3.0))
    ref.SetOrigin((5.0, -4.0, 7.0))
    ref_affine = sitk_affine(ref)
    vol = np.arange(10 * 8 * 6, dtype=np.float32).reshape(10, 8, 6)
    dce = np.stack([vol + 1000 * t for t in range(5)], axis=-1)
    mask = np.zeros((10, 8, 6), np.uint8)
    mask[2:5, 1:4, 0:3] = 1
    choice = PhaseChoice({"pre": 1, "onset": 2, "early": 3, "late": 4}, None, None, "enhancing", "t1_pre")
    reg = Registration(ref, "dce", "mean_pre", {}, {}, {"t2w": vol, "t1_pre": -vol}, dce, mask)
    job = make_job("/nonexistent/U2", "/nonexistent/out", None, IngestConfig(crop_size=(4, 4, 2), pre_source="t1_pre"))
    c = crop_study(job, choice, reg, OrganMask(Path("m.nii.gz"), None))
    assert isinstance(c, CropWindow)
    assert list(c.arrays) == ["t2w", "t1_pre", "dce_pre", "dce_onset", "dce_early", "dce_late", "organ_mask"]
    np.testing.assert_array_equal(c.arrays["t2w"], vol[1:5, 0:4, 0:2])
    np.testing.assert_array_equal(c.dce, dce[1:5, 0:4, 0:2])
    np.testing.assert_array_equal(c.arrays["dce_onset"], vol[1:5, 0:4, 0:2] + 2000)
    np.testing.assert_array_equal(c.arrays["dce_pre"], -vol[1:5, 0:4, 0:2])  # pre_source t1_pre
    assert c.arrays["organ_mask"].sum() == 3 * 3 * 2
    np.testing.assert_allclose(
        c.affine, ref_affine @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    )
    assert c.manifest() == {
        "size": [4, 4, 2],
        "center_vox": [3.0, 2.0, 1.0],
        "center_source": "organ mask centroid (m.nii.gz)",
        "affine_ras": np.round(c.affine, 6).tolist(),
    }
    np.testing.assert_allclose(c.affine[:3, 3], [-(5.0 + 2.0), 4.0, 7.0])  # RAS: x, y of the LPS origin negated
    # no mask: the grid centre; no organ_mask output
    no_mask = Registration(ref, "dce", "mean_pre", {}, {}, {"t2w": vol}, dce, None)
    c = crop_study(job, PhaseChoice(choice.phases, None, None, "enhancing", "dce"), no_mask, None)
    assert list(c.arrays) == ["t2w", "dce_pre", "dce_onset", "dce_early", "dce_late"]
    np.testing.assert_array_equal(c.arrays["t2w"], vol[3:7, 2:6, 2:4])
    np.testing.assert_array_equal(c.arrays["dce_pre"], vol[3:7, 2:6, 2:4] + 1000)
    assert c.center is None and c.manifest()["center_source"] == "reference grid centre"


# --------------------------------------------------------------------------------------------
# the command line: options built from IngestConfig

# every option of the first version of scripts/prepare_prostatex.py
CLI_OPTIONS = [
    "src",
    "out",
    "workers",
    "overwrite",
    "rules",
    "mask",
    "mask_role",
    "reference_role",
    "reference_frame",
    "crop_size",
    "phases",
    "pre_source",
    "early_delay_s",
    "arrival_mask",
    "register",
    "max_translation_mm",
    "max_rotation_deg",
    "sampling_percentage",
    "iterations",
    "native",
    "seed",
    "fractions",
    "progress",
    "log_level",
]


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_prostatex_cli", Path(__file__).resolve().parents[1] / "scripts" / "prepare_prostatex.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_defaults_are_ingest_config_defaults():
    import dataclasses
    import inspect

    from common.ingest.options import RENAMED

    mod = _cli()
    params = inspect.signature(mod.main).parameters
    assert set(CLI_OPTIONS) <= set(params)
    cfg = IngestConfig()
    for f in dataclasses.fields(IngestConfig):
        if f.name != "registration":
            name = RENAMED.get(f.name, f.name)
            assert params[name].default == getattr(cfg, f.name), f.name
            assert f.metadata["help"] and f.metadata["help"] in mod.main.__doc__, f.name
    for name in ("max_translation_mm", "max_rotation_deg", "sampling_percentage", "iterations"):
        assert params[name].default == getattr(RegistrationSettings(), name)
    ds = inspect.signature(prepare_dataset).parameters
    for name in ("workers", "fractions", "seed", "progress"):
        assert params[name].default == ds[name].default
    # the defaults, parsed, are IngestConfig() and prepare_dataset's defaults
    got, dataset, script = mod.parse_options()
    assert got == cfg
    assert dataset == {"workers": None, "fractions": (0.8, 0.1, 0.1), "seed": 0, "progress": True}
    assert script == {"log_level": "WARNING"}
    with pytest.raises(TypeError, match="unknown option"):
        mod.parse_options(crop=3)


def test_cli_parses_options_through_fire(monkeypatch, capsys):
    """The command line (through fire, as ``python scripts/prepare_prostatex.py ...``) -> IngestConfig."""
    import fire

    mod = _cli()
    seen = {}

    def fake_prepare(src, out, cfg, **kw):
        seen.update(src=src, out=out, cfg=cfg, **kw)
        return {
            "prepared": ["A"],
            "existing": [],
            "skipped": [],
            "seconds": 0.0,
            "datalist": "d.json",
            "skipped_json": "s.json",
        }

    monkeypatch.setattr(mod, "prepare_dataset", fake_prepare)
    fire.Fire(
        mod.main,
        command=[
            "/in",
            "--out",
            "/o",
            "--crop_size",
            "16x16x4",
            "--noregister",
            "--overwrite",
            "--native",
            "False",
            "--phases",
            '{"early": {"time_s": 120}}',
            "--max_rotation_deg",
            "5",
            "--iterations",
            "7",
            "--workers",
            "2",
            "--fractions",
            "0.5,0.25,0.25",
            "--seed",
            "3",
            "--progress",
            "false",
            "--mask_role",
            "t2w",
            "--pre_source",
            "t1_pre",
        ],
    )
    assert "prepared 1" in capsys.readouterr().out
    cfg = seen["cfg"]
    assert (seen["src"], seen["out"], seen["workers"], seen["seed"], seen["progress"]) == ("/in", "/o", 2, 3, False)
    assert seen["fractions"] == (0.5, 0.25, 0.25)
    assert (
        cfg.crop_size == (16, 16, 4) and cfg.register is False and cfg.overwrite is True and cfg.write_native is False
    )
    assert cfg.phases == {"early": {"time_s": 120}} and cfg.mask_role == "t2w" and cfg.pre_source == "t1_pre"
    assert cfg.registration == RegistrationSettings(max_rotation_deg=5.0, iterations=7)
    assert cfg.reference_frame == IngestConfig().reference_frame  # untouched options keep the defaults
    with pytest.raises(ValueError, match="register: expected true or false"):
        mod.parse_options(register="maybe")
    with pytest.raises(ValueError, match="expected 3 integers"):
        mod.parse_options(crop_size="16x16")


def test_broken_optional_series_is_skipped_with_a_warning(phantom_src, tmp_path, caplog):
    """A truncated file in the high-b DWI (no bundle needs it) no longer drops the whole study."""
    import logging

    _, pdir, _ = phantom_src
    study = _copy(pdir, tmp_path, "PW")
    d = _folder(study, "*b1400*")
    f = sorted(d.glob("*.dcm"))[1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="common.ingest"):
        m = ingest_study(study, tmp_path / "out", "PW")
    assert "dwi_highb" not in m["roles"] and {"t2w", "adc", "pd", "t1_pre"} <= set(m["roles"])
    assert not (tmp_path / "out" / "PW" / "dwi_highb.nii.gz").exists()
    assert (tmp_path / "out" / "PW" / "t2w.nii.gz").exists()
    assert "optional dwi_highb series skipped" in caplog.text and "truncated" in caplog.text


# --------------------------------------------------------------------------------------------
# ADC fitted from the multi-b DWI when the study has no ADC series (common.ingest.adc)


def _remove(study: Path, *patterns: str) -> None:
    for pattern in patterns:
        shutil.rmtree(_folder(study, pattern))


def test_study_without_adc_gets_it_from_the_dwi(good_case, phantom_src, tmp_path):
    """The phantom study with its ADC series removed: the ADC fitted from the b = 50, 400, 800 DWI
    series correlates > 0.95 with the full study's (scanner) ADC, matches the phantom's ADC map in the
    prostate (median within 5 %) on the DWI grid, and the manifest says it was computed and from what."""
    ph, pdir, _ = phantom_src
    m_full, case_full = good_case
    assert m_full["adc"]["source"] == "scanner ADC series"
    dwi_rec = next(r for r in m_full["series"] if r["description"] == "ep2d_diff_tra_DYNDIST")
    assert dwi_rec["status"] == "ignored" and "ADC series is used" in dwi_rec["reason"]
    study = _copy(pdir, tmp_path, "PN")
    _remove(study, "*_ADC")
    m = ingest_study(study, tmp_path / "out", "PN", crop_size=_grid_size(ph))
    rec = m["adc"]
    assert rec["source"] == "computed from DWI" and rec["unit"] == "1e-6 mm^2/s"
    assert rec["b_values_s_mm2"] == [50.0, 400.0, 800.0] and rec["min_b"] == 50.0 and rec["max_b"] is None
    assert [s["description"] for s in rec["series"]] == ["ep2d_diff_tra_DYNDIST"]
    assert m["roles"]["adc"]["computed_from_dwi"] == rec and m["config"]["adc_min_b"] == 50.0
    a = np.asarray(nib.load(case_full / "adc.nii.gz").dataobj, float)
    b = np.asarray(nib.load(tmp_path / "out" / "PN" / "adc.nii.gz").dataobj, float)
    assert a.shape == b.shape
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    native = nib.load(tmp_path / "out" / "PN" / "native" / "adc.nii.gz")
    np.testing.assert_allclose(native.affine, _aff(ph, "adc"), atol=1e-3)
    inside = ph.organ_mask > 0
    truth = _vol(ph, "adc")[inside]
    err = np.median(np.abs(np.asarray(native.dataobj, float)[inside] - truth) / truth)
    assert err < 0.05, err


def _single_b(study: Path) -> Path:
    d = _folder(study, "*DYNDIST")
    for f in d.glob("*.dcm"):
        if float(pydicom.dcmread(f, stop_before_pixels=True).DiffusionBValue) != 50.0:
            f.unlink()
    return d


def _no_b_tags(study: Path) -> Path:
    d = _folder(study, "*DYNDIST")
    for f in d.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.DiffusionBValue
        ds.save_as(f)
    return d


ADC_BAD_CASES = {
    # (series removed, corruption, ingest options, message, the series the message names)
    "neither": (("*_ADC", "*DYNDIST", "*b1400"), None, {}, r"no adc series found .*no DWI series with two", None),
    "only_high_b": (("*_ADC", "*DYNDIST"), None, {}, r"single b-value \(1400 s/mm\^2\)", "*b1400"),
    "single_b": (("*_ADC",), _single_b, {}, r"the DWI holds a single b-value \(50 s/mm\^2\)", "*DYNDIST"),
    "no_b_tags": (("*_ADC",), _no_b_tags, {}, r"b-values missing from the tags", "*DYNDIST"),
    "scanner_only": (("*_ADC",), None, {"adc_source": "scanner"}, r"no adc series found", None),
    "range": (("*_ADC",), None, {"adc_min_b": 500.0}, r"leave \['800'\] in the ADC range b >= 500", "*DYNDIST"),
}


@pytest.mark.parametrize("case", sorted(ADC_BAD_CASES))
def test_adc_from_dwi_bad_input(case, phantom_src, tmp_path):
    """No ADC and a DWI that cannot give one: one line naming the patient (and the series) and the problem."""
    _, pdir, _ = phantom_src
    study = _copy(pdir, tmp_path, "PD")
    removed, corrupt, options, pattern, named = ADC_BAD_CASES[case]
    folder = _folder(study, named) if named else None
    _remove(study, *removed)
    if corrupt is not None:
        corrupt(study)
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=pattern) as ei:
        ingest_study(study, out, "PD", **options)
    msg = str(ei.value)
    assert msg.startswith("patient PD") and "\n" not in msg, msg
    if folder is not None:
        assert ei.value.series and folder.name in ei.value.series, msg
    _no_leftovers(out, "PD")


def test_adc_source_option_chooses_the_adc(phantom_src):
    """Headers only: "auto" and "scanner" take the ADC series, "dwi" plans the fit from the b = 50, 400,
    800 series and ignores the ADC series, saying why; an unknown value is refused."""
    from common.ingest import classify_study, scan_study

    _, pdir, _ = phantom_src
    series = scan_study(pdir, "P")
    rules = load_rules()
    for source in ("auto", "scanner"):
        sel = classify_study(series, rules, "P", adc_source=source)
        assert sel.adc_plan is None and sel.roles["adc"].description == "ep2d_diff_tra_ADC"
    sel = classify_study(series, rules, "P", adc_source="dwi", adc_min_b=50.0, adc_max_b=600.0)
    assert sel.roles["adc"].description == "ep2d_diff_tra_DYNDIST"
    assert sel.adc_plan.b_used == [50.0, 400.0] and sel.adc_plan.b_found == [50.0, 400.0, 800.0]
    rec = {r["description"]: r for r in sel.report}
    assert rec["ep2d_diff_tra_ADC"]["status"] == "ignored" and "adc_source='dwi'" in rec["ep2d_diff_tra_ADC"]["reason"]
    assert rec["ep2d_diff_tra_DYNDIST"]["status"] == "chosen"
    with pytest.raises(IngestError, match="unknown adc_source 'both'"):
        classify_study(series, rules, "P", adc_source="both")
