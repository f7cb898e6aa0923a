"""``scripts/synthesize.py --bundle d3m``: a DICOM brain study in, the synthetic T1c and the predicted
enhancing-tumour mask out as DERIVED series of that study.

On a small oblique DICOM brain phantom study (T1, T2, FLAIR, T1c series) with an untrained small D3M
(the numbers checked are geometry, quantisation, header contents and the series rules, not image
quality), read back with the project's own ingest reader and with pydicom; an incomplete study (no
FLAIR) is named; and the real glioma study TCGA-FG-6692 (NIfTI in ``../shared``, written as a DICOM
study on its own grids here) when ``../shared`` is present.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers as h  # noqa: E402
from test_synthesize import TYPE1, TYPE2, _read_back, _source_instances, _tiny_checkpoint  # noqa: E402

from common.dicom_out import STUDY_TAGS, geometry_from_affine  # noqa: E402
from common.ingest import IngestError  # noqa: E402
from common.ingest.brain import select_brain_series  # noqa: E402
from common.ingest.rules import load_brain_rules  # noqa: E402
from common.io import load_nifti  # noqa: E402
from scripts.synthesize import brain_ingest_options, prepare_brain, synthesize  # noqa: E402

TCGA = ROOT.parent / "shared" / "data" / "brain" / "TCGA-FG-6692"
TILT_DEG = 12.0


@pytest.fixture(scope="module")
def brain_phantom():
    from common.phantoms import SMALL
    from common.phantoms.brain import make_brain_phantom

    return make_brain_phantom(3, **SMALL["brain"])


@pytest.fixture(scope="module")
def brain_study(brain_phantom, tmp_path_factory) -> Path:
    from common.phantoms.dicom import write_brain_study

    return write_brain_study(brain_phantom, tmp_path_factory.mktemp("brain_src"), "BRAIN03", tilt_deg=TILT_DEG)


@pytest.fixture(scope="module")
def d3m_ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint("d3m", tmp_path_factory.mktemp("ckpt") / "d3m.pt")


@pytest.fixture(scope="module")
def d3m_run(brain_study, d3m_ckpt, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synth_brain")
    before = h.tree_digest(brain_study)
    summary = synthesize(brain_study, "d3m", out, ckpt_path=str(d3m_ckpt), num_inference_steps=2, device="cpu")
    return {"out": out, "summary": summary, "before": before}


def test_brain_series_rules():
    """The packaged rules name the usual vendor descriptions (Siemens, GE, Philips, BraTS) by role."""
    rules = load_brain_rules()
    expect = {
        "t1_se_tra": "t1",
        "AX T1": "t1",
        "T1W_SE": "t1",
        "t1_mprage_tra": "t1",
        "T1 FLAIR AX": "t1",  # a T1-weighted FLAIR is a T1
        "AX T1 POST GD": "t1c",
        "t1_se_tra_post_Gd": "t1c",
        "T1W_SE+C": "t1c",
        "T1CE": "t1c",
        "t2_tse_tra": "t2",
        "AX T2 FSE": "t2",
        "T2W_TSE": "t2",
        "t2_tirm_tra_dark-fluid": "flair",
        "AX T2 FLAIR": "flair",
        "FLAIR_longTR": "flair",
        "localizer": None,
        "AX DWI": None,
        "T2* GRE": None,
        "SYNTHETIC T1c (D3M 0.2.3)": None,  # our own output is never taken as an input
    }
    got = {d: rules.classify(d)[0] for d in expect}
    assert got == expect
    with pytest.raises(IngestError, match="unknown role 'dce'"):
        load_brain_rules({"roles": {"dce": {"description": ["*"]}}})
    with pytest.raises(IngestError, match="a 't1' role is required"):
        load_brain_rules({"roles": {"t2": {"description": ["*"]}}})


def test_d3m_dicom_round_trip(d3m_run, brain_study, brain_phantom):
    summary, out = d3m_run["summary"], d3m_run["out"]
    assert h.tree_digest(brain_study) == d3m_run["before"]  # the source study was only read
    meta = json.loads((ROOT / "bundles" / "d3m" / "configs" / "metadata.json").read_text())
    manifest = json.loads((Path(summary["prepared_case"]) / "manifest.json").read_text())
    assert {r: v["description"] for r, v in manifest["roles"].items()} == {
        "t1": "t1_se_tra",
        "t2": "t2_tse_tra",
        "flair": "t2_tirm_tra_dark-fluid",
        "t1c": "t1_se_tra_post_Gd",
    }
    src = _source_instances(brain_study)
    src_series = {str(ds.SeriesInstanceUID) for ds in src.values()}
    t1_uids = {u for u, ds in src.items() if ds.SeriesDescription == "t1_se_tra"}
    # the source T1 as the ingest reads it: the grid everything is synthesised on
    _, t1_affine = _read_back(next(p for p in next(brain_study.iterdir()).iterdir() if p.name.endswith("t1_se_tra")))
    assert [s["key"] for s in summary["series"]] == ["t1c", "et_mask"]
    labels = {"t1c": "T1c", "et_mask": "ET mask"}
    sop_uids, series_uids = [], set()
    assert [s["modality"] for s in summary["series"]] == ["MR", "SEG"]
    for s in summary["series"]:
        folder, (vol, aff) = Path(s["folder"]), load_nifti(s["nifti"])
        assert folder.parent == out / "d3m" / "BRAIN03" / "dicom"
        files = sorted(folder.glob("*.dcm"))
        if s["key"] == "et_mask":  # a DICOM SEG of the source T1, equal to the NIfTI mask voxel for voxel
            from test_dicom_seg import _seg_on_nifti_grid

            assert len(files) == 1 and np.abs(aff - t1_affine).max() < 1e-4
            np.testing.assert_array_equal(_seg_on_nifti_grid(files[0], aff, vol.shape), vol)
            ds = pydicom.dcmread(files[0])
            assert ds.Modality == "SEG" and ds.SeriesDescription == f"SYNTHETIC ET mask (D3M {meta['version']})"
            (segment,) = ds.SegmentSequence
            assert segment.SegmentAlgorithmType == "AUTOMATIC"
            assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == meta["version"]
            refs = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
            assert {r.ReferencedSOPInstanceUID for r in refs} == t1_uids  # it references the source T1
            for tag in STUDY_TAGS:
                assert ds.get(tag) == next(iter(src.values())).get(tag, ""), tag
            assert int(ds.SeriesNumber) == s["series_number"] and str(ds.SeriesInstanceUID) not in src_series
            sop_uids.append(str(ds.SOPInstanceUID))
            series_uids.add(str(ds.SeriesInstanceUID))
            continue
        assert len(files) == vol.shape[2] == brain_phantom.seg.shape[2]
        assert vol.shape == brain_phantom.seg.shape
        assert np.abs(aff - t1_affine).max() < 1e-4  # the NIfTI output lies on the source T1 grid
        arr, aff_back = _read_back(folder)
        assert np.abs(aff_back - t1_affine).max() < 1e-4  # and so does the DICOM series
        rot = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
        assert np.degrees(np.arccos(abs(rot[2, 2]))) == pytest.approx(TILT_DEG, abs=1e-3)  # oblique stays oblique
        dss = [pydicom.dcmread(f) for f in files]
        slope = float(dss[0].RescaleSlope)
        assert np.abs(arr - vol).max() <= slope
        assert 0 < slope < (vol.max() - min(vol.min(), 0)) / 1000
        geo = geometry_from_affine(aff, vol.shape[2])
        for k, ds in enumerate(dss):
            missing = [t for t in TYPE1 if t not in ds or ds[t].value in (None, "", b"")]
            assert not missing, (files[k].name, missing)
            assert not [t for t in TYPE2 if t not in ds], files[k].name
            assert ds.SOPClassUID == MRImageStorage and list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
            assert ds.SeriesDescription == f"SYNTHETIC {labels[s['key']]} (D3M {meta['version']})"
            assert "D3M" in ds.DerivationDescription and meta["version"] in ds.DerivationDescription
            assert "t1n, t2w, t2f" in ds.DerivationDescription and "2 DDIM steps" in ds.DerivationDescription
            np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float), geo["positions"][k], atol=1e-4)
            np.testing.assert_allclose(
                np.asarray(ds.ImageOrientationPatient, float), geo["ImageOrientationPatient"], atol=1e-6
            )
            np.testing.assert_allclose(np.asarray(ds.PixelSpacing, float), geo["PixelSpacing"], atol=1e-5)
            assert float(ds.SliceThickness) == pytest.approx(geo["SliceSpacing"], abs=1e-5)
            np.testing.assert_allclose(ds.pixel_array * slope + float(ds.RescaleIntercept), vol[:, :, k].T, atol=slope)
            (ref,) = ds.SourceImageSequence
            assert ref.ReferencedSOPInstanceUID in t1_uids  # the T1 slice this slice lies on
            origin = src[ref.ReferencedSOPInstanceUID]
            normal = np.cross(geo["ImageOrientationPatient"][:3], geo["ImageOrientationPatient"][3:])
            assert abs(np.dot(np.asarray(origin.ImagePositionPatient, float) - geo["positions"][k], normal)) < 1e-3
            for tag in STUDY_TAGS:
                assert ds.get(tag) == origin.get(tag, ""), tag
            assert str(ds.SeriesInstanceUID) not in src_series and str(ds.SOPInstanceUID) not in src
            assert int(ds.SeriesNumber) == s["series_number"] > max(int(d.SeriesNumber) for d in src.values())
            sop_uids.append(str(ds.SOPInstanceUID))
        series_uids |= {str(ds.SeriesInstanceUID) for ds in dss}
    assert len(series_uids) == 2 and len(sop_uids) == len(set(sop_uids))
    # the prepared case is reused for the same study and settings (no second registration); other settings refuse
    case = Path(summary["prepared_case"])
    reused = prepare_brain(brain_study.resolve(), case.parent, case.name, brain_ingest_options({}))
    assert reused[1] == manifest
    with pytest.raises(FileExistsError, match=r"prepared differently \(\['register'\]\)"):
        prepare_brain(brain_study.resolve(), case.parent, case.name, brain_ingest_options({"register": "false"}))


def test_incomplete_brain_study_is_named(brain_phantom, d3m_ckpt, tmp_path):
    from common.phantoms.dicom import write_brain_study

    study = write_brain_study(brain_phantom, tmp_path / "src", "NOFLAIR", contrasts=("t1n", "t2w", "t1c"))
    before = h.tree_digest(study)
    with pytest.raises(IngestError, match=r"no usable FLAIR series .*t2_tse_tra") as e:
        synthesize(study, "d3m", tmp_path / "out", ckpt_path=str(d3m_ckpt), num_inference_steps=2, device="cpu")
    assert "NOFLAIR" in str(e.value) and "--ingest_rules" in str(e.value)
    assert h.tree_digest(study) == before
    assert not list((tmp_path / "out").rglob("*.dcm"))
    # the T1c is optional: a study without it still makes a case (the usual clinical request)
    sel = select_brain_series(
        write_brain_study(brain_phantom, tmp_path / "src2", "NOT1C", contrasts=("t1n", "t2w", "t2f"))
    )
    assert sorted(sel.picked) == ["flair", "t1", "t2"]
    with pytest.raises(ValueError, match=r"unknown ingest option\(s\) \['ingest_crop_size'\] for a brain study"):
        brain_ingest_options({"crop_size": "40,40,4"})
    with pytest.raises(FileNotFoundError, match="--ingest_rules .*no such file"):
        brain_ingest_options({"rules": str(tmp_path / "none.json")})
    assert brain_ingest_options({"register": "false", "max_rotation_deg": "10"})["register"] is False


def _right_handed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume and affine with the slice axis reversed where the stored affine is left-handed
    (TCGA-FG-6692's are): DICOM slices run along row x column, so a scanner writes it that way."""
    img = nib.load(path)
    vol, affine = np.asarray(img.dataobj).astype(np.float32), np.asarray(img.affine, float)
    if np.linalg.det(affine[:3, :3]) < 0:
        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = vol.shape[2] - 1
        vol, affine = np.ascontiguousarray(vol[:, :, ::-1]), affine @ flip
    return vol, affine


@pytest.mark.realdata
def test_d3m_on_tcga_as_dicom(d3m_ckpt, tmp_path):
    """TCGA-FG-6692's four raw contrasts (each on its own slightly oblique grid) written as one DICOM
    study, then through synthesize.py: the synthetic series lie on the T1 series' grid."""
    if not TCGA.exists():
        pytest.skip(f"real brain study not found at {TCGA} (../shared is not beside the repo)")
    from common.phantoms.dicom import series_folder_name, study_folder_name, study_tags, write_series

    study_dir = tmp_path / "src" / "TCGA-FG-6692" / study_folder_name("20000101", "MR brain")
    study = study_tags("TCGA-FG-6692", "20000101", "MR brain", uid_seed="TCGA-FG-6692")
    names = {"t1": (2, "AX T1"), "t2": (3, "AX T2 FSE"), "flair": (4, "AX T2 FLAIR"), "t1c": (7, "AX T1 POST GD")}
    for key, (number, desc) in names.items():
        vol, affine = _right_handed(TCGA / f"{key}.nii.gz")
        write_series(
            vol,
            affine,
            study_dir / series_folder_name(number, desc),
            study=study,
            series_number=number,
            description=desc,
        )
    t1_affine = _read_back(study_dir / series_folder_name(2, "AX T1"))[1]
    assert np.abs(t1_affine - _right_handed(TCGA / "t1.nii.gz")[1]).max() < 1e-3
    summary = synthesize(
        tmp_path / "src" / "TCGA-FG-6692",
        "d3m",
        tmp_path / "out",
        ingest={"register": False},  # its registration is tested in test_prepare_brain (a minute here)
        ckpt_path=str(d3m_ckpt),
        num_inference_steps=1,  # 26 slices of 256 x 224: ~25 s a step on one loaded core
        device="cpu",
    )
    manifest = json.loads((Path(summary["prepared_case"]) / "manifest.json").read_text())
    assert {r: v["description"] for r, v in manifest["roles"].items()} == {k: v[1] for k, v in names.items()}
    shape = nib.load(TCGA / "t1.nii.gz").shape
    for s in summary["series"]:
        vol, aff_nii = load_nifti(s["nifti"])
        ds = pydicom.dcmread(sorted(Path(s["folder"]).glob("*.dcm"))[0])
        if s["modality"] == "SEG":  # the ET mask: a DICOM SEG equal to the NIfTI mask on the T1 grid
            from test_dicom_seg import _seg_on_nifti_grid

            assert np.abs(aff_nii - t1_affine).max() < 1e-4
            np.testing.assert_array_equal(_seg_on_nifti_grid(Path(ds.filename), aff_nii, vol.shape), vol)
            assert ds.StudyInstanceUID == study["StudyInstanceUID"] and ds.PatientID == "TCGA-FG-6692"
            continue
        arr, aff = _read_back(Path(s["folder"]))
        assert arr.shape == vol.shape == shape
        assert np.abs(aff - t1_affine).max() < 1e-4 and np.abs(aff_nii - t1_affine).max() < 1e-4
        assert np.abs(arr - vol).max() <= float(ds.RescaleSlope)
        assert ds.StudyInstanceUID == study["StudyInstanceUID"] and ds.PatientID == "TCGA-FG-6692"


def test_several_series_of_a_role_are_decided_by_the_prefer_rule(brain_phantom, tmp_path):
    """Two T1 series: the rules' ``most_slices`` picks the full one (the shared prefer rule of the
    prostate ingest), and the report says why the other was left."""
    from common.phantoms.dicom import series_folder_name, tilted_affine, write_brain_study, write_series

    patient = write_brain_study(brain_phantom, tmp_path / "src", "TWO_T1")
    study_dir = next(patient.iterdir())
    t1_file = next((study_dir / series_folder_name(2, "t1_se_tra")).glob("*.dcm"))
    ds = pydicom.dcmread(t1_file, stop_before_pixels=True)
    study = {
        "PatientID": "TWO_T1",
        "StudyDate": ds.StudyDate,
        "StudyInstanceUID": ds.StudyInstanceUID,
        "FrameOfReferenceUID": ds.FrameOfReferenceUID,
        "StudyDescription": "MR brain",
        "uid_seed": "TWO_T1|short",
    }
    affine = tilted_affine(brain_phantom.affine, brain_phantom.seg.shape, 10.0)
    write_series(
        brain_phantom.images["t1n"][..., :20],
        affine,
        study_dir / series_folder_name(9, "t1_se_tra_short"),
        study=study,
        series_number=9,
        description="t1_se_tra_short",
    )
    sel = select_brain_series(patient)
    assert sel.picked["t1"][0].description == "t1_se_tra"
    (left,) = [r for r in sel.report if r["description"] == "t1_se_tra_short"]
    n = brain_phantom.seg.shape[2]
    assert left["status"] == "ignored" and f"another t1 series was chosen (most slices ({n}), latest" in left["reason"]
