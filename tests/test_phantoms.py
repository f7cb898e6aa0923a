"""Physics-based phantoms: kinetics and signal equations against closed forms, DICOM round trip,
determinism, and the physics and layout of the written prostate, brain and breast data sets."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import dcmri
import nibabel as nib
import numpy as np
import pydicom
import pytest

from common.dce import mean_curve, select_phases
from common.layout import MASK_KEYS, MODALITIES, PHASE_KEYS
from common.phantoms import SMALL, write_phantoms
from common.phantoms.brain import BRATS_KEYS, make_brain_phantom, mni_tissue_maps
from common.phantoms.breast import TIMES_S, kinetic_type, make_breast_phantom, relative_change
from common.phantoms.dicom import (
    PROSTATE_SERIES,
    geometry_from_affine,
    read_series_sitk,
    sitk_to_ras,
    write_series,
)
from common.phantoms.pk import TissuePK, parker_aif, plasma_from_blood, spgr_signal, tissue_curves, tofts_concentration
from common.phantoms.prostate import AXIAL_DICOM, make_prostate_phantom
from common.phantoms.shapes import grid_affine, rotation_matrix, world_points

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def parker_closed_form(t_min: np.ndarray) -> np.ndarray:
    """Parker et al. 2006 population AIF (whole blood, mM), t in minutes after bolus arrival."""
    A1, A2, T1, T2 = 0.809, 0.330, 0.17046, 0.365
    s1, s2, alpha, beta, s, tau = 0.0563, 0.132, 1.050, 0.1685, 38.078, 0.483
    g1 = A1 / (s1 * np.sqrt(2 * np.pi)) * np.exp(-((t_min - T1) ** 2) / (2 * s1**2))
    g2 = A2 / (s2 * np.sqrt(2 * np.pi)) * np.exp(-((t_min - T2) ** 2) / (2 * s2**2))
    return g1 + g2 + alpha * np.exp(-beta * t_min) / (1 + np.exp(-s * (t_min - tau)))


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    """One small phantom set of every kind, written once for the module."""
    out = tmp_path_factory.mktemp("phantoms")
    written = write_phantoms(out, n_prostate=2, n_brain=1, n_breast=2, seed=0, small=True, progress=False)
    return out, written


@pytest.fixture(scope="module")
def default_prostate():
    """One prostate subject on the default grids, with two lesions."""
    return make_prostate_phantom(seed=[0, 0, 0], n_lesions=2)


def _nii(path):
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine)


# ------------------------------------------------------------------------------------------------
# kinetics and signal equations


def test_parker_aif_peak_against_closed_form():
    bat = 30.0
    t = np.arange(0.0, 180.0, 0.01)
    c = parker_aif(t, bolus_arrival_s=bat)
    ref = parker_closed_form((t - bat) / 60.0)
    np.testing.assert_allclose(c, ref, rtol=1e-5, atol=1e-9)
    i_ref = int(np.argmax(ref))
    assert abs(t[np.argmax(c)] - t[i_ref]) <= 0.011
    # first-pass peak about T1 = 0.17046 min (10.2 s) after arrival
    assert abs((t[i_ref] - bat) - 0.17046 * 60) < 1.0
    assert c.max() == pytest.approx(ref[i_ref], rel=1e-6)
    assert 5.5 < c.max() < 6.5  # mM
    assert c[t < bat - 10].max() < 1e-3 * c.max()


def test_plasma_haematocrit():
    np.testing.assert_allclose(plasma_from_blood(np.array([0.58, 1.16])), [1.0, 2.0])


@pytest.mark.parametrize("ktrans,kep,vp", [(0.1, 0.5, 0.02), (0.5, 2.0, 0.08), (0.25, 0.3, 0.0)])
def test_tofts_step_input_closed_form(ktrans, kep, vp):
    t = np.arange(0.0, 3000.0, 0.5)
    cp0 = 2.0
    ct = tofts_concentration(t, np.full_like(t, cp0), ktrans, kep, vp)
    kt, kp = ktrans / 60.0, kep / 60.0  # 1/min -> 1/s
    ref = vp * cp0 + kt * cp0 / kp * (1 - np.exp(-kp * t))
    np.testing.assert_allclose(ct, ref, rtol=1e-9, atol=1e-12)
    # plateau: ve * Cp0 + vp * Cp0
    assert ct[-1] == pytest.approx((ktrans / kep + vp) * cp0, rel=1e-2)


def test_tofts_without_leakage_is_plasma_volume():
    t = np.linspace(0, 100, 201)
    cp = np.sin(t / 10) ** 2
    np.testing.assert_allclose(tofts_concentration(t, cp, 0.0, 1.0, 0.05), 0.05 * cp)


def test_spgr_signal_equation():
    S0, T1, TR, flip, r1 = 1000.0, np.array([0.4, 1.6, 3.0]), 0.004, 12.0, 4.5
    C = np.array([0.0, 0.5, 2.0])
    a = np.deg2rad(flip)
    E = np.exp(-TR * (1 / T1 + r1 * C))
    ref = S0 * np.sin(a) * (1 - E) / (1 - np.cos(a) * E)
    np.testing.assert_allclose(spgr_signal(S0, T1, C, r1, TR, flip), ref, rtol=1e-12)
    # same as dcmri's steady-state spoiled gradient-echo signal
    for t1, c in zip(T1, C):
        assert spgr_signal(S0, t1, c, r1, TR, flip) == pytest.approx(
            float(dcmri.signal_ss(S0, 1 / t1 + r1 * c, TR, flip)), rel=1e-9
        )
    # contrast agent raises the T1-weighted signal monotonically
    s = spgr_signal(S0, 1.6, np.linspace(0, 5, 11), r1, TR, flip)
    assert np.all(np.diff(s) > 0)


def test_tissue_curves_blood_follows_aif():
    times = np.array([0.0, 30.0, 45.0, 60.0, 120.0])
    curves = tissue_curves(times, {"artery": TissuePK(), "pz": TissuePK(0.1, 0.5, 0.02)}, 20.0, blood=("artery",))
    np.testing.assert_allclose(curves["artery"], parker_aif(times, 20.0), rtol=1e-6, atol=1e-9)
    assert curves["pz"][0] < 1e-4 and curves["pz"][-1] > 0.05


def test_kinetic_type_rule():
    t = np.array(TIMES_S)
    assert kinetic_type([100, 200, 215, 225, 235, 240], t) == "I"  # +20 %
    assert kinetic_type([100, 200, 205, 200, 195, 190], t) == "II"  # -5 %
    assert kinetic_type([100, 200, 190, 180, 170, 150], t) == "III"  # -25 %
    assert relative_change([100, 200, 0, 0, 0, 240], t) == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------
# DICOM


def _oblique_affine(shape, spacing, angle=10.0):
    return grid_affine(shape, spacing, rotation_matrix((1.0, 0.4, 0.25), angle) @ AXIAL_DICOM, (10.0, -20.0, 30.0))


def test_dicom_round_trip_values_and_geometry(tmp_path):
    """Float data with negatives on an anisotropic, non-square, oblique grid."""
    shape, spacing = (12, 9, 5), (1.3, 2.1, 3.3)
    A = _oblique_affine(shape, spacing)
    vol = np.random.default_rng(0).normal(100.0, 80.0, shape).astype(np.float32)
    study = {
        "PatientID": "p",
        "StudyInstanceUID": "1.2.3",
        "FrameOfReferenceUID": "1.2.4",
        "StudyDate": "20200101",
        "uid_seed": "t",
    }
    files = write_series(vol, A, tmp_path / "s", study=study, series_number=3, description="test")
    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert ds.Rows == 9 and ds.Columns == 12
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([2.1, 1.3])  # row spacing (along j) first
    img = read_series_sitk(tmp_path / "s")
    arr, B = sitk_to_ras(img)
    assert arr.shape == shape
    np.testing.assert_allclose(arr, vol, atol=slope / 2 + 1e-6)
    # geometry: SimpleITK is LPS; NIfTI RAS = flip the signs of the first two rows
    D = np.asarray(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (LPS @ A)[:3, 3], atol=1e-5)
    np.testing.assert_allclose(D, (LPS @ A)[:3, :3] / spacing, atol=1e-6)
    np.testing.assert_allclose(B, A, atol=1e-5)
    assert np.abs(D - np.eye(3)).max() > 0.05  # oblique stays oblique


def test_dicom_slices_ordered_along_normal(tmp_path):
    A = _oblique_affine((6, 5, 4), (2.0, 2.0, 4.0))
    study = {
        "PatientID": "p",
        "StudyInstanceUID": "1.2.3",
        "FrameOfReferenceUID": "1.2.4",
        "StudyDate": "20200101",
        "uid_seed": "u",
    }
    files = write_series(
        np.arange(120, dtype=np.float32).reshape(6, 5, 4),
        A,
        tmp_path / "s",
        study=study,
        series_number=1,
        description="order",
    )
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array([float(v) for v in heads[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = [np.array([float(v) for v in h.ImagePositionPatient]) @ normal for h in heads]
    assert [int(h.InstanceNumber) for h in heads] == [1, 2, 3, 4]
    assert np.all(np.diff(along) == pytest.approx(4.0))
    assert [f.name for f in files] == ["1-01.dcm", "1-02.dcm", "1-03.dcm", "1-04.dcm"]
    # the LPS IOP is the RAS affine direction with x and y negated
    np.testing.assert_allclose(iop[:3], LPS[:3, :3] @ A[:3, 0] / 2.0, atol=1e-8)
    np.testing.assert_allclose(geometry_from_affine(A, 4)["positions"][0], (LPS @ A)[:3, 3])


def test_prostate_study_layout_and_round_trip(phantom_set):
    out, _ = phantom_set
    patient = out / "prostate" / "dicom" / "phantom-000"
    (study,) = list(patient.iterdir())
    assert study.name == "01-01-2020-NA-MR prostaat"
    names = sorted(p.name for p in study.iterdir())
    for number, desc, _ in PROSTATE_SERIES.values():
        assert f"{number}.000000-{desc}" in names
    times = json.loads((out / "prostate" / "nifti" / "phantom-000" / "dce_times.json").read_text())["times_s"]
    dce_dirs = [f"{27 + i}.000000-Twist_dynamic_Wip576_TT={t:.1f}s" for i, t in enumerate(times)]
    assert "7.000000-ep2d_diff_tra_DYNDIST" in names  # the multi-b DWI (b = 50, 400, 800) in one series
    assert set(dce_dirs) <= set(names) and len(names) == len(PROSTATE_SERIES) + 1 + len(times)
    assert dce_dirs[0].endswith("TT=8.0s")
    nifti = out / "prostate" / "nifti" / "phantom-000"
    dce, A_dce = _nii(nifti / "dce.nii.gz")
    # pixel values and geometry of the fine T2w, the ADC and two DCE time points
    for folder, ref in [("5.000000-t2_tse_tra", "t2w"), ("9.000000-ep2d_diff_tra_ADC", "adc")]:
        vol, A = _nii(nifti / f"{ref}.nii.gz")
        arr, B = sitk_to_ras(read_series_sitk(study / folder))
        np.testing.assert_array_equal(arr, vol)  # integer data, slope 1: exact
        np.testing.assert_allclose(B, A, atol=1e-4)
    t2, A_t2 = _nii(nifti / "t2w.nii.gz")
    assert t2.shape == tuple(SMALL["prostate"]["t2w_shape"]) and not np.allclose(A_t2, A_dce)
    for i in (0, len(times) - 1):
        arr, B = sitk_to_ras(read_series_sitk(study / dce_dirs[i]))
        np.testing.assert_array_equal(arr, dce[..., i])
        np.testing.assert_allclose(B, A_dce, atol=1e-4)
        h = pydicom.dcmread(next((study / dce_dirs[i]).glob("1-01.dcm")), stop_before_pixels=True)
        assert float(h.TriggerTime) == pytest.approx(times[i] * 1000.0)
        assert int(h.SeriesNumber) == 27 + i and h.Modality == "MR" and h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    adc_head = pydicom.dcmread(next((study / "9.000000-ep2d_diff_tra_ADC").glob("*.dcm")), stop_before_pixels=True)
    assert float(adc_head.RescaleSlope) == 1.0 and "ADC" in adc_head.ImageType
    # the localizer is sagittal: its slice normal is left-right
    loc = pydicom.dcmread(next((study / "1.000000-localizer").glob("*.dcm")), stop_before_pixels=True)
    iop = np.array([float(v) for v in loc.ImageOrientationPatient])
    assert abs(np.cross(iop[:3], iop[3:])[0]) > 0.95 and len(list((study / "1.000000-localizer").glob("*.dcm"))) == 3
    uids = {pydicom.dcmread(next(p.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID for p in study.iterdir()}
    assert len(uids) == 1


# ------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("kind", ["prostate", "brain", "breast"])
def test_same_seed_identical_different_seed_differs(kind):
    make = {"prostate": make_prostate_phantom, "brain": make_brain_phantom, "breast": make_breast_phantom}[kind]
    kw = dict(SMALL[kind])
    if kind == "prostate":
        kw = {**kw, "n_dce": 6}
    a, b, c = make(seed=[7, 1], **kw), make(seed=[7, 1], **kw), make(seed=[7, 2], **kw)

    def arrays(p):
        if kind == "prostate":
            return [*p.images.values(), p.dce, p.organ_mask, p.lesion_mask, p.localizer, p.affines["dce"]]
        if kind == "brain":
            return [*p.images.values(), p.seg, p.affine]
        return [p.dce, p.breast_mask, p.lesion_mask, p.affine]

    for x, y in zip(arrays(a), arrays(b)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    for x, y in zip(arrays(a), arrays(c)):
        if x.ndim >= 3 and x.dtype == np.float32:  # every image differs with the seed
            assert x.tobytes() != y.tobytes()


# ------------------------------------------------------------------------------------------------
# prostate


def test_prostate_default_grids_and_prepared_geometry(default_prostate):
    ph = default_prostate
    A = ph.affines["dce"]
    assert ph.dce.shape == (160, 160, 20, 20) and ph.images["t2w"].shape == (320, 320, 20)
    np.testing.assert_allclose(np.linalg.norm(A[:3, :3], axis=0), [1.6, 1.6, 3.6])
    np.testing.assert_allclose(np.linalg.norm(ph.affines["t2w"][:3, :3], axis=0), [0.8, 0.8, 3.6])
    # oblique: 8-12 degrees between the slice normal and the scanner z axis or about another axis
    D = A[:3, :3] / np.linalg.norm(A[:3, :3], axis=0)
    angle = np.degrees(np.arccos((np.trace(D @ AXIAL_DICOM.T) - 1) / 2))
    assert 8.0 <= angle <= 12.0 and np.abs(D - AXIAL_DICOM).max() > 0.05
    # the T2w grid has the same FOV: the outer corners of both grids coincide
    for grid, shape in ((A, (160, 160, 20)), (ph.affines["t2w"], (320, 320, 20))):
        corner = grid[:3, :3] @ np.array([-0.5, -0.5, -0.5]) + grid[:3, 3]
        far = grid[:3, :3] @ (np.array(shape) - 0.5) + grid[:3, 3]
        if grid is A:
            c0, c1 = corner, far
        else:
            np.testing.assert_allclose(corner, c0, atol=1e-6)
            np.testing.assert_allclose(far, c1, atol=1e-6)
    vols, P = ph.prepared()
    for key, v in vols.items():
        assert v.shape[:3] == (160, 160, 16), key
    assert vols["dce"].shape == (160, 160, 16, 20)
    np.testing.assert_allclose(P[:3, :3], A[:3, :3])  # same directions and spacing
    np.testing.assert_allclose(P[:3, 3], A[:3, :3] @ [0, 0, ph.prepared_k0] + A[:3, 3])  # origin shift only
    k_centre = np.argwhere(vols["organ_mask"] > 0)[:, 2].mean()
    assert abs(k_centre - 7.5) <= 2.5


def test_prostate_physics(default_prostate):
    ph = default_prostate
    adc = ph.images["adc"]
    pz = ph.zone_mask == 1
    tz = ph.zone_mask == 2
    les = ph.lesion_mask > 0
    assert les.sum() > 20 and pz.sum() > 200
    # ADC in 1e-6 mm^2/s: PZ about 1600, TZ about 1200, lesions 700-1000 and lower than the PZ
    assert 1350 < np.median(adc[pz]) < 1800 and 1000 < np.median(adc[tz]) < 1400
    assert np.median(adc[les]) < 0.75 * np.median(adc[pz])
    for les_truth in ph.truth["lesions"]:
        m = ph.lesion_mask == les_truth["label"]
        assert np.median(adc[m]) == pytest.approx(les_truth["ADC_1e-6_mm2_s"], rel=0.2)
        assert les_truth["zone"] in ("PZ", "TZ")
    # DWI b1400 brighter in lesions (restricted diffusion)
    assert ph.images["dwi_highb"][les].mean() > 1.3 * ph.images["dwi_highb"][pz].mean()
    # lesions enhance earlier and stronger than normal PZ
    t = ph.times_s
    c_les, c_pz = ph.dce[les].mean(axis=0), ph.dce[pz].mean(axis=0)
    rel_les, rel_pz = c_les / c_les[:2].mean() - 1, c_pz / c_pz[:2].mean() - 1
    assert rel_les.max() > 1.3 * rel_pz.max()
    onset = int(np.argmax(t > ph.truth["aif"]["bolus_arrival_s"] + 5.0))  # first frame of the wash-in
    assert np.all(rel_les[onset : onset + 3] > 1.3 * rel_pz[onset : onset + 3])
    t90 = lambda r: t[np.argmax(r >= 0.9 * r.max())]  # noqa: E731
    assert t90(rel_les) <= t90(rel_pz) and t[np.argmax(rel_les)] <= t[np.argmax(rel_pz)]
    # femoral arteries enhance strongly and early: peak before the lesions, several times baseline
    pts = world_points(ph.affines["dce"], ph.dce.shape[:3])
    art = np.zeros(len(pts), bool)
    for tube in ph.truth["anatomy"]["arteries"]:
        d = np.asarray(tube["direction"]) / np.linalg.norm(tube["direction"])
        rel = pts - np.asarray(tube["point_mm"])
        art |= np.linalg.norm(rel - np.outer(rel @ d, d), axis=1) < tube["radius_mm"] - 1.0
    art = art.reshape(ph.dce.shape[:3])
    assert art.sum() > 20
    c_art = ph.dce[art].mean(axis=0)
    rel_art = c_art / c_art[:2].mean() - 1
    assert rel_art.max() > 3.0 and rel_art.max() > 2 * rel_les.max()
    assert t[np.argmax(rel_art)] <= t[np.argmax(rel_les)]
    # T1 (VIBE 12 deg) equals the DCE baseline up to noise
    body = ph.images["t1_pre"] > 100
    assert abs(np.mean(ph.dce[..., 0][body]) / np.mean(ph.images["t1_pre"][body]) - 1) < 0.01


def test_prostate_prepared_cases_on_disk(phantom_set):
    out, written = phantom_set
    prep = out / "prostate" / "prepared"
    datalist = json.loads((prep / "datalist.json").read_text())
    assert {"training", "validation", "test"} <= set(datalist)
    ids = [e["id"] for k in ("training", "validation", "test") for e in datalist[k]]
    assert sorted(ids) == ["phantom-000", "phantom-001"] == written["prostate"]["subjects"]
    nx, ny = SMALL["prostate"]["grid_shape"][:2]
    for sid in ids:
        case = prep / sid
        affines = []
        for key in (*MODALITIES, *PHASE_KEYS, *MASK_KEYS, "dce"):
            vol, aff = _nii(case / f"{key}.nii.gz")
            assert vol.shape[:3] == (nx, ny, 16), key
            affines.append(aff)
        for aff in affines[1:]:
            np.testing.assert_allclose(aff, affines[0], atol=1e-6)
        dce, _ = _nii(case / "dce.nii.gz")
        times = json.loads((case / "dce_times.json").read_text())["times_s"]
        assert dce.shape[3] == len(times)
        manifest = json.loads((case / "manifest.json").read_text())
        expected = select_phases(times, mean_curve(dce))
        for name, idx in expected.items():
            assert manifest["phases"][name]["index"] == idx
            phase, _ = _nii(case / f"dce_{name}.nii.gz")
            np.testing.assert_array_equal(phase, dce[..., idx])
        assert manifest["ground_truth"]["seed"] == [0, 0, int(sid[-3:])]
        assert "pz" in manifest["ground_truth"]["tissues"] and "bolus_arrival_s" in manifest["ground_truth"]["aif"]
        # the prepared grid is the DCE grid restricted to 16 slices (origin shift only)
        _, A_native = _nii(out / "prostate" / "nifti" / sid / "dce.nii.gz")
        np.testing.assert_allclose(affines[0][:3, :3], A_native[:3, :3], atol=1e-6)
        k0 = manifest["ground_truth"]["geometry"]["prepared_grid"]["first_slice"]
        np.testing.assert_allclose(affines[0][:3, 3], A_native[:3, :3] @ [0, 0, k0] + A_native[:3, 3], atol=1e-5)
        native, _ = _nii(out / "prostate" / "nifti" / sid / "adc.nii.gz")
        adc, _ = _nii(case / "adc.nii.gz")
        np.testing.assert_array_equal(adc, native[:, :, k0 : k0 + 16])
    for entry in datalist["training"]:
        for key, rel in entry.items():
            if key != "id":
                assert (prep / rel).exists()


# ------------------------------------------------------------------------------------------------
# brain


def test_mni_maps_load_offline():
    maps = mni_tissue_maps()
    assert maps["gm"].shape == maps["wm"].shape == maps["csf"].shape
    assert maps["gm"].max() <= 1.0 and maps["csf"].sum() > 1000 and len(maps["tumour_sites"]) > 10


def test_brain_cases_on_disk(phantom_set):
    out, _ = phantom_set
    case = "BraTS-GLI-00000-000"
    d = out / "brain" / case
    seg, A = _nii(d / f"{case}-seg.nii.gz")
    assert set(np.unique(seg).astype(int)) == {0, 1, 2, 3}
    imgs = {}
    for key in ("t1n", "t1c", "t2w", "t2f"):
        imgs[key], aff = _nii(d / f"{case}-{key}.nii.gz")
        assert imgs[key].shape == tuple(SMALL["brain"]["shape"])
        np.testing.assert_allclose(aff, A)
        assert imgs[key][seg == 0].min() == 0  # skull-stripped, zero background
    et = seg == 3
    assert imgs["t1c"][et].mean() > 1.5 * imgs["t1n"][et].mean()  # gadolinium in the enhancing tumour
    nec = seg == 1
    assert imgs["t1c"][nec].mean() < 0.7 * imgs["t1c"][et].mean()  # necrotic core does not enhance
    assert imgs["t2f"][seg == 2].mean() > 1.2 * np.median(
        imgs["t2f"][(seg == 0) & (imgs["t2f"] > 0)]
    )  # FLAIR-bright oedema
    datalist = json.loads((out / "brain" / "datalist.json").read_text())
    entries = [e for k in ("training", "validation", "test") for e in datalist[k]]
    assert [e["id"] for e in entries] == [case]
    assert all((out / "brain" / entries[0][k]).exists() for k in BRATS_KEYS)


def test_brain_flair_suppresses_csf():
    ph = make_brain_phantom(seed=3, **SMALL["brain"])
    csf, wm = ph.fractions["csf"] > 0.8, ph.fractions["wm"] > 0.8
    assert csf.sum() > 20 and wm.sum() > 200
    im = ph.images
    assert im["t2w"][csf].mean() > 1.5 * im["t2w"][wm].mean()  # CSF bright on T2w
    assert im["t2f"][csf].mean() < 0.3 * im["t2f"][wm].mean()  # and nulled on FLAIR
    assert im["t1n"][wm].mean() > im["t1n"][csf].mean() * 2  # T1w: WM bright, CSF dark


# ------------------------------------------------------------------------------------------------
# breast


def test_breast_lesions_have_their_kinetic_type(phantom_set):
    out, written = phantom_set
    n_checked = 0
    for sid in written["breast"]["subjects"]:
        d = out / "breast" / sid
        dce, A = _nii(d / "dce.nii.gz")
        lesion, _ = _nii(d / "lesion_mask.nii.gz")
        times = json.loads((d / "dce_times.json").read_text())["times_s"]
        assert times == [0, 85, 155, 225, 295, 365] and dce.shape[3] == 6
        pre, _ = _nii(d / "pre.nii.gz")
        np.testing.assert_array_equal(pre, dce[..., 0])
        manifest = json.loads((d / "manifest.json").read_text())
        assert sorted(np.unique(lesion).astype(int)) == list(range(len(manifest["lesions"]) + 1))
        for les in manifest["lesions"]:
            curve = dce[lesion == les["label"]].mean(axis=0)
            assert kinetic_type(curve, times) == les["kinetic_type"], (sid, les)
            assert {"ktrans_per_min", "kep_per_min", "vp"} <= set(les)
            n_checked += 1
    assert n_checked >= 2
    assert (out / "breast" / "datalist.json").exists()


def test_breast_all_three_types():
    ph = make_breast_phantom(seed=11, lesion_types=("I", "II", "III"), **SMALL["breast"])
    for les in ph.lesions:
        curve = ph.dce[ph.lesion_mask == les["label"]].mean(axis=0)
        assert kinetic_type(curve, ph.times_s) == les["kinetic_type"]
        assert curve[1] > 1.5 * curve[0]  # every lesion enhances
    assert [les["kinetic_type"] for les in ph.lesions] == ["I", "II", "III"]


def test_breast_types_are_told_apart_by_the_early_phase():
    """The acquired early phase carries the kinetic type (the premise of iterU-Net): the rendered
    (noisy, partial-volume) mean lesion enhancement at 85 s falls in disjoint windows per type."""
    from common.phantoms.breast import TYPE_RANGES, early_enhancement

    early = {"I": [], "II": [], "III": []}
    for seed in range(4):
        ph = make_breast_phantom(seed=100 + seed, lesion_types=("I", "II", "III"), **SMALL["breast"])
        for les in ph.lesions:
            curve = ph.dce[ph.lesion_mask == les["label"]].mean(axis=0)
            lo, hi = TYPE_RANGES[les["kinetic_type"]]["early"]
            assert lo < les["early_enhancement_noise_free"] < hi
            early[les["kinetic_type"]].append(early_enhancement(curve))
    assert max(early["I"]) < min(early["II"]) and max(early["II"]) < min(early["III"]), early
    np.testing.assert_allclose(early_enhancement(np.array([100.0, 250.0, 0.0])), 1.5)


# ------------------------------------------------------------------------------------------------
# entry points


def test_cli_and_options(tmp_path, capsys, phantom_set):
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "make_phantoms.py"), run_name="not_main")
    mod["main"](out=str(tmp_path), kinds="breast", n_breast=1, small=True)
    assert "breast: 1 subjects" in capsys.readouterr().out
    assert (tmp_path / "breast" / "breast-000" / "dce.nii.gz").exists()
    # parallel workers give the same data as the sequential module fixture (same seed)
    out, _ = phantom_set
    write_phantoms(tmp_path / "par", kinds="breast", n_breast=2, small=True, progress=False, workers=2)
    for sid in ("breast-000", "breast-001"):
        a, _ = _nii(tmp_path / "par" / "breast" / sid / "dce.nii.gz")
        b, _ = _nii(out / "breast" / sid / "dce.nii.gz")
        assert a.tobytes() == b.tobytes()
    with pytest.raises(TypeError):
        write_phantoms(tmp_path, kinds="breast", n_breast=1, small=True, nonsense_option=1)
    with pytest.raises(ValueError):
        write_phantoms(tmp_path, kinds="liver")
