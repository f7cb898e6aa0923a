"""The DICOM ingest on the real PROSTATEx study ProstateX-0218 (../shared/data/prostatex).

Skipped when the shared data is absent. The pipeline runs once per test session (the
``prepared_prostatex`` fixture in ``conftest.py``, ~20-40 s on 2 cores) through
:func:`common.ingest.prepare_dataset` on the single patient folder.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

pytestmark = pytest.mark.realdata

from conftest import PROSTATEX_0218 as STUDY  # noqa: E402


@pytest.fixture
def prepared(prepared_prostatex):
    return prepared_prostatex


def _dicom_geometry(series_glob: str):
    """RAS affine of a series computed independently from its headers (pydicom), and its size."""
    files = sorted(STUDY.glob(f"*/{series_glob}/*.dcm"))
    assert files, series_glob
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(ds[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ds.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    p0, p1 = (np.array(d.ImagePositionPatient, float) for d in ds[:2])
    dz = float(np.dot(p1 - p0, normal))
    ps = [float(v) for v in ds[0].PixelSpacing]  # (row spacing, column spacing)
    lps = np.eye(4)
    lps[:3, 0] = row * ps[1]
    lps[:3, 1] = col * ps[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = p0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, (int(ds[0].Columns), int(ds[0].Rows), len(ds))


def test_roles_found(prepared):
    m = prepared["manifest"]
    roles = m["roles"]
    assert roles["t2w"]["description"].startswith("t2_tse_tra")
    assert roles["adc"]["description"].endswith("_ADC")
    assert "PD" in roles["pd"]["description"]
    assert roles["dwi_highb"]["description"] == "ep2d-advdiff-3Scan-high bvalue 1400"
    # the VIBE with the flip angle closest to the DCE's 12 deg: 10 deg; 5 and 20 deg ignored, logged
    assert roles["t1_pre"]["flip_angle"] == 10
    assert m["choices"] and m["choices"][0]["role"] == "t1_pre"
    ignored = {r["description"] for r in m["ignored"]}
    assert {"fl3d_vibe_pre_flip_5deg_Wip403d", "fl3d_vibe_pre_flip_20deg_Wip403d"} <= ignored


def test_dce_time_points(prepared):
    m, case = prepared["manifest"], prepared["case"]
    times = json.loads((case / "dce_times.json").read_text())["times_s"]
    assert len(times) == 70 == m["dce"]["n_time_points"]
    assert times[0] == pytest.approx(8.0) and times[-1] == pytest.approx(298.9)
    assert np.all(np.diff(times) > 0)
    # the series behind each time point are in series-number order too (27..96)
    assert [s["series_number"] for s in m["dce"]["series"]] == list(range(27, 97))
    arrival = m["dce"]["arrival"]["time_s"]
    assert 35.0 <= arrival <= 55.0, arrival
    ph = m["dce"]["phases"]
    assert ph["pre"]["index"] == m["dce"]["arrival"]["index"] - 1
    assert ph["onset"]["index"] == m["dce"]["arrival"]["index"]
    assert ph["late"]["index"] == 69
    assert ph["pre"]["time_s"] < ph["onset"]["time_s"] < ph["early"]["time_s"] < ph["late"]["time_s"]


def test_outputs_on_cropped_reference_grid(prepared):
    case, m = prepared["case"], prepared["manifest"]
    ref_affine, ref_size = _dicom_geometry("27.000000-Twist*")
    assert ref_size == (160, 160, 20)
    direction = ref_affine[:3, :3] / np.linalg.norm(ref_affine[:3, :3], axis=0)
    assert not np.allclose(direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-3)  # oblique
    keys = ["t2w", "adc", "pd", "t1_pre", "dwi_highb", "dce_pre", "dce_onset", "dce_early", "dce_late"]
    for key in keys + ["dce"]:
        img = nib.load(case / f"{key}.nii.gz")
        assert img.shape[:3] == (160, 160, 16), key
        a = img.affine
        np.testing.assert_allclose(a[:3, :3], ref_affine[:3, :3], atol=1e-4, err_msg=key)
        # the origin is a voxel of the reference grid: the crop's first voxel (no rotation, no resampling)
        start = np.linalg.solve(ref_affine, a[:, 3])[:3]
        np.testing.assert_allclose(start, np.round(start), atol=1e-3, err_msg=key)
        np.testing.assert_allclose(np.round(start), [0, 0, 2], err_msg=key)  # centred 16 of 20 slices
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), a, atol=1e-4)
    assert nib.load(case / "dce.nii.gz").shape == (160, 160, 16, 70)
    for key in keys:
        arr = np.asarray(nib.load(case / f"{key}.nii.gz").dataobj)
        assert np.isfinite(arr).all() and arr.std() > 0, key
    np.testing.assert_allclose(np.array(m["crop"]["affine_ras"]), nib.load(case / "t2w.nii.gz").affine, atol=1e-4)


def test_native_geometry_matches_dicom(prepared):
    case = prepared["case"]
    for glob, key in (("5.000000-t2*", "t2w"), ("9.000000-ep2d*", "adc")):
        aff, size = _dicom_geometry(glob)
        img = nib.load(case / "native" / f"{key}.nii.gz")
        assert img.shape == size
        np.testing.assert_allclose(img.affine, aff, atol=1e-3)


def test_registration_recorded_and_bounded(prepared):
    regs = prepared["manifest"]["registration"]
    assert set(regs) == {"t2w", "adc", "pd", "t1_pre", "dwi_highb"}
    assert regs["dwi_highb"]["shared_from"] == "adc"
    for role, r in regs.items():
        assert r["translation_norm_mm"] <= 10 and r["rotation_deg_max"] <= 10, (role, r)
        assert r["metric_final"] <= r["metric_initial"], (role, r)


def test_datalist_and_rerun(prepared):
    from common.ingest import IngestConfig, prepare_dataset

    out = prepared["out"]
    dl = json.loads((out / "datalist.json").read_text())
    entries = dl["training"] + dl["validation"] + dl["test"]
    assert [e["id"] for e in entries] == ["ProstateX-0218"]
    assert entries[0]["t2w"] == "ProstateX-0218/t2w.nii.gz"
    assert json.loads((out / "skipped.json").read_text())["skipped"] == []
    again = prepare_dataset(STUDY, out, IngestConfig(), workers=1, progress=False)
    assert again["existing"] == ["ProstateX-0218"] and again["prepared"] == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left
