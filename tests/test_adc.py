"""ADC fitted from a multi-b DWI (common.ingest.adc): the closed-form fit, the phantom's DWI against its
known ADC map (both DICOM layouts, standard and vendor b-value tags), and the real PROSTATEx study.

The ingest of a phantom study with its ADC series removed is tested in tests/test_ingest.py (it reuses
that module's phantom study and full ingest)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.ingest import IngestError, ingest_study, load_rules, scan_study
from common.ingest.adc import FitADC, FitADCd, compute_adc, plan_adc_fit
from common.ingest.series import header_b_value
from common.phantoms.dicom import study_tags, write_dwi_series
from common.phantoms.prostate import DWI_B_VALUES, make_prostate_phantom

SMALL = {
    "grid_shape": (48, 48, 12),
    "grid_spacing": (3.2, 3.2, 3.6),
    "t2w_shape": (96, 96, 12),
    "t2w_spacing": (1.6, 1.6, 3.6),
    "prepared_slices": 8,
    "n_dce": 4,
}


# --------------------------------------------------------------------------------------------
# the fit, closed form


def test_fit_two_and_three_b_values_closed_form():
    # two b-values: ADC = ln(S1 / S2) / (b2 - b1)
    two = np.array([1000.0, 300.0]).reshape(2, 1, 1, 1)
    got = float(FitADC([50, 800], background=0)(two).ravel()[0])
    assert got == pytest.approx(math.log(1000 / 300) / 750 * 1e6, rel=1e-6)  # 1605.297
    assert got == pytest.approx(1605.297, abs=1e-3)
    # three b-values off the exponential: the least-squares slope of ln S on b, worked by hand:
    # b - mean(b) = (-366.667, -16.667, 383.333), sum of squares 281666.7, ln S - mean = (0.5716, 0.0608, -0.6324)
    three = np.array([1000.0, 600.0, 300.0]).reshape(3, 1, 1, 1)
    assert float(FitADC([50, 400, 800], background=0)(three).ravel()[0]) == pytest.approx(1608.3165, abs=1e-3)
    # an exact mono-exponential gives its ADC back, whatever the b-values; b = 0 (perfusion) is left out by min_b
    b = np.array([0.0, 50.0, 400.0, 800.0, 800.0])
    s = 700.0 * np.exp(-b * 1.2e-3)
    s[0] *= 1.3  # pseudo-diffusion at b = 0
    got = FitADC(b)(s.reshape(-1, 1, 1, 1)).ravel()[0]
    assert got == pytest.approx(1200.0, rel=1e-6)
    assert FitADC(b, min_b=0)(s.reshape(-1, 1, 1, 1)).ravel()[0] > 1250.0  # with b = 0 it is biased up


def test_fit_background_negative_torch_and_dict():
    b = [50.0, 400.0, 800.0]
    sig = np.zeros((3, 2, 2, 1))
    sig[:, 0, 0, 0] = 1000.0 * np.exp(-np.array(b) * 2.0e-3)  # tissue, ADC 2000
    sig[:, 1, 0, 0] = [3.0, 2.0, 2.5]  # air: below 0.1 x the 99th percentile of the b=50 image
    sig[:, 0, 1, 0] = [500.0, 520.0, 540.0]  # rising signal: negative ADC -> 0
    sig[:, 1, 1, 0] = 1000.0 * np.exp(-np.array(b) * 0.8e-3)
    out = FitADC(b)(sig)
    assert out.shape == (1, 2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :, 0], [[2000.0, 0.0], [0.0, 800.0]], atol=1e-2)
    t = FitADCd(keys="dwi", b_values=b, output_keys="adc")({"dwi": torch.as_tensor(sig)})
    assert isinstance(t["adc"], torch.Tensor) and t["adc"].shape == (1, 2, 2, 1)
    np.testing.assert_allclose(t["adc"].numpy(), out, atol=1e-3)
    with pytest.raises(ValueError, match="two distinct b-values"):
        FitADC([50.0, 50.0, 1400.0], max_b=1000.0)


# --------------------------------------------------------------------------------------------
# the phantom's DWI against its ADC map


@pytest.fixture(scope="module")
def phantom():
    return make_prostate_phantom(3, **SMALL)


def _median_rel_error(adc: np.ndarray, ph) -> float:
    inside = ph.organ_mask > 0
    truth = ph.images["adc"][inside]
    assert inside.sum() > 50 and np.median(truth) > 1000  # prostate ADC about 1200-1600
    return float(np.median(np.abs(adc[inside] - truth) / truth))


def test_phantom_dwi_fit_matches_its_adc_map(phantom):
    assert sorted(phantom.dwi) == list(DWI_B_VALUES) == [50.0, 400.0, 800.0]
    sig = np.stack([phantom.dwi[b] for b in DWI_B_VALUES])
    adc = FitADC(DWI_B_VALUES)(sig)[0]
    err = _median_rel_error(adc, phantom)
    assert err < 0.05, err
    # the prostate median itself agrees with the ADC map's (the zones' 1.2e-3 / 1.6e-3 mm^2/s)
    inside = phantom.organ_mask > 0
    assert np.median(adc[inside]) == pytest.approx(np.median(phantom.images["adc"][inside]), rel=0.02)


@pytest.mark.parametrize("layout", ["one_series", "per_b"])
def test_phantom_dwi_dicom_layouts(phantom, layout, tmp_path):
    """Both DICOM layouts of the DWI are read back (standard DiffusionBValue in one series, Siemens
    (0019,100C) in one series per b-value), planned by b-value and fitted on the exact DWI grid."""
    study = study_tags("PA", "20200101", "MR prostaat", f"adc|{layout}")
    folders = write_dwi_series(phantom.dwi, phantom.affines["adc"], tmp_path / "study", study, layout=layout)
    assert len(folders) == (1 if layout == "one_series" else 3)
    series = scan_study(tmp_path / "study", "PA")
    rules = load_rules()
    assert [rules.classify(s.description, s.image_type)[0] for s in series] == ["dwi"] * len(folders)
    assert sorted({h.b_value for s in series for h in s.headers}) == [50.0, 400.0, 800.0]
    plan = plan_adc_fit(series, "PA")
    assert plan.b_used == [50.0, 400.0, 800.0] and len(plan.images) == 3
    img = compute_adc(plan, "PA")
    from common.geometry import sitk_affine, sitk_to_array

    np.testing.assert_allclose(sitk_affine(img), phantom.affines["adc"], atol=1e-3)
    adc = sitk_to_array(img)
    assert _median_rel_error(adc, phantom) < 0.05
    rec = plan.record()
    assert rec["source"] == "computed from DWI" and rec["b_values_s_mm2"] == [50.0, 400.0, 800.0]
    # the fit range: b >= 400 leaves two b-values, b >= 500 only one
    assert plan_adc_fit(series, "PA", min_b=400).b_used == [400.0, 800.0]
    with pytest.raises(IngestError, match=r"leave \['800'\] in the ADC range b >= 500"):
        plan_adc_fit(series, "PA", min_b=500)


def test_vendor_b_value_fields():
    import pydicom

    ds = pydicom.Dataset()
    assert header_b_value(ds) is None
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "OB", b"800 ")
    assert header_b_value(ds) == 800.0
    ge = pydicom.Dataset()
    ge.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", ["1000001000", "8", "0", "0"])
    assert header_b_value(ge) == 1000.0  # GE's 1e9 offset removed
    ph = pydicom.Dataset()
    ph.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", 400.0)
    assert header_b_value(ph) == 400.0
    ph.DiffusionBValue = 500.0  # the standard tag wins
    assert header_b_value(ph) == 500.0
    other = pydicom.Dataset()  # a Siemens-looking element under another creator is not a b-value
    other.private_block(0x0019, "ACME", create=True).add_new(0x0C, "IS", "800")
    assert header_b_value(other) is None


# --------------------------------------------------------------------------------------------
# the real PROSTATEx study


def _hide_series(study: Path, dst: Path, *patterns: str) -> Path:
    """A copy of ``study`` made of symlinks to its files, without the series folders matching ``patterns``."""
    import fnmatch

    for dirpath, _, files in os.walk(study):
        rel = Path(dirpath).relative_to(study)
        if any(fnmatch.fnmatch(part, p) for part in rel.parts for p in patterns):
            continue
        for f in files:
            (dst / rel).mkdir(parents=True, exist_ok=True)
            os.symlink(Path(dirpath) / f, dst / rel / f)
    return dst


ADC_SERIES = "9.000000-ep2d*ADC*"


def _dwi_b_values(study: Path) -> list[float]:
    """Every b-value in the DWI series of a real study (a header scan of its diffusion folders only)."""
    rules, found = load_rules(), set()
    for d in study.glob("*/*diff*"):
        for s in scan_study(d, study.name):
            if rules.classify(s.description, s.image_type)[0] in ("dwi", "dwi_highb"):
                found |= {h.b_value for h in s.headers if h.b_value is not None}
    return sorted(found)


def test_prostatex_without_adc_single_b_is_refused(prostatex_study, tmp_path):
    """ProstateX-0218 holds the scanner ADC (series 9) and one DWI series, b = 1400 only (series 19,
    ``ep2d-advdiff-3Scan-high bvalue 1400``): with the ADC hidden the study is refused in one line
    naming the patient, the DWI series and its single b-value, and nothing is written."""
    b_found = _dwi_b_values(prostatex_study)
    if len(b_found) >= 2:  # pragma: no cover - another study in its place
        pytest.skip(f"the study's DWI holds b = {b_found}: test_prostatex_adc_from_dwi covers it")
    assert b_found == [1400.0], b_found
    # the refusal comes from the headers: three DCE time points (series 27-29) are enough to get there
    src = _hide_series(prostatex_study, tmp_path / "ProstateX-0218", ADC_SERIES, "[3-9]?.000000-Twist*")
    with pytest.raises(IngestError) as e:
        ingest_study(src, tmp_path / "out", "ProstateX-0218")
    msg = str(e.value)
    assert msg.startswith("patient ProstateX-0218: series ") and "19.000000-ep2dadvdiff3Scanhigh bvalue 1400" in msg
    assert "single b-value (1400 s/mm^2)" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "ProstateX-0218").exists()


def test_prostatex_adc_from_dwi(prostatex_study, tmp_path, request):
    """With two or more DWI b-values, the ADC fitted with the ADC series hidden correlates with the
    scanner's inside the body (the full study's ingest is the session fixture ``prepared_prostatex``)."""
    b_found = _dwi_b_values(prostatex_study)
    if len(b_found) < 2:
        pytest.skip(f"ProstateX-0218's DWI holds b = {b_found} s/mm^2 only (series 19, high b-value): no ADC to fit")
    import nibabel as nib  # pragma: no cover - a study with multi-b DWI

    prepared = request.getfixturevalue("prepared_prostatex")
    src = _hide_series(prostatex_study, tmp_path / "ProstateX-0218", ADC_SERIES)
    m = ingest_study(src, tmp_path / "out", "ProstateX-0218")
    assert m["adc"]["source"] == "computed from DWI"
    a = np.asarray(nib.load(prepared["case"] / "adc.nii.gz").dataobj, float)
    b = np.asarray(nib.load(tmp_path / "out" / "ProstateX-0218" / "adc.nii.gz").dataobj, float)
    body = (a > 0) & (b > 0)
    assert np.corrcoef(a[body], b[body])[0, 1] > 0.9


def test_prostatex_keeps_the_scanner_adc(prepared_prostatex):
    """The full ProstateX-0218 (session fixture): its scanner ADC is used, recorded as such, and no
    series of it is taken for a multi-b DWI (its b = 1400 series stays the high-b DWI)."""
    m = prepared_prostatex["manifest"]
    assert m["adc"]["source"] == "scanner ADC series" and m["adc"]["folder"].split("/")[-1].startswith("9.000000-")
    assert "computed_from_dwi" not in m["roles"]["adc"] and m["roles"]["dwi_highb"]["b_value"] == 1400.0
    assert not [r for r in m["series"] if r["role"] == "dwi"]
