"""Breast DCE DICOM ingest (common.ingest.breast, scripts/prepare_breast.py) on the breast phantoms written as
DICOM studies in both layouts of the public collections (Duke: one series per phase; I-SPY: one multi-phase
series): the prepared series equals the phantom's, on the oblique grid of the study, with the phantom's times;
iterunet trains and infers on the prepared cases through its command line; bad studies stop with one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pydicom
import pytest

from common.ingest import IngestError, prepare_breast_dataset
from common.ingest.breast import load_breast_rules, phase_number
from common.phantoms.breast import DICOM_TILT_DEG, write_breast_dicom
from common.phantoms.dicom import duke_phase_description, study_tags, tilted_affine, write_series

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "iterunet" / "configs"
SCRIPT = ROOT / "scripts" / "prepare_breast.py"
LAYOUTS = ("series_per_phase", "multi_phase")


@pytest.fixture(scope="module")
def breast(tmp_path_factory) -> dict:
    """3 small breast phantoms, their DICOM studies (both layouts) and their masks on the studies' oblique grid
    (NIfTI per case; the lesion mask of breast-000 also as a DICOM SEG)."""
    tmp = tmp_path_factory.mktemp("breast")
    root = h.tiny_phantoms(tmp, "breast", 3)
    sids = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    dicom = write_breast_dicom(root, sids)
    masks = dicom.pop("masks")
    truth = {}
    for sid in sids:
        img = nib.load(root / sid / "dce.nii.gz")
        oblique = tilted_affine(img.affine, img.shape[:3], DICOM_TILT_DEG)
        truth[sid] = {
            "dce": np.asarray(img.get_fdata()),
            "affine": oblique,
            "times": json.loads((root / sid / "dce_times.json").read_text())["times_s"],
        }
        for name in ("breast_mask", "lesion_mask"):
            truth[sid][name] = np.asarray(nib.load(root / sid / f"{name}.nii.gz").dataobj)
            m = nib.load(masks / sid / f"{name}.nii.gz")  # the phantom's masks on the studies' oblique grid
            assert np.array_equal(m.dataobj, truth[sid][name]) and np.allclose(m.affine, oblique)
    seg = tmp / "seg" / "lesion_seg.dcm"
    _write_seg(truth["breast-000"]["lesion_mask"], dicom["multi_phase"] / "breast-000", seg)
    return {"root": root, "dicom": dicom, "masks": masks, "truth": truth, "ids": sids, "seg": seg}


def _write_seg(labels: np.ndarray, study: Path, path: Path) -> None:
    """A minimal DICOM SEG (BINARY, one frame per slice and segment) of ``labels`` (x, y, z) on the slices of the
    study's series (positions and orientation copied from its files, one per slice position)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    files = sorted(study.rglob("1-*.dcm"))  # the first temporal position of the multi-phase series
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    heads.sort(key=lambda d: int(d.InstanceNumber))
    ref = heads[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SEG", ref.StudyInstanceUID, generate_uid()
    ds.Rows, ds.Columns = ref.Rows, ref.Columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SegmentationType = "BINARY"
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = ref.ImageOrientationPatient
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = ref.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = ref.SliceThickness
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, groups = [], []
    for seg_no in sorted(int(v) for v in np.unique(labels) if v > 0):
        for k, hd in enumerate(heads):
            fg = Dataset()
            fg.PlanePositionSequence = Sequence([Dataset()])
            fg.PlanePositionSequence[0].ImagePositionPatient = hd.ImagePositionPatient
            fg.SegmentIdentificationSequence = Sequence([Dataset()])
            fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber = seg_no
            groups.append(fg)
            frames.append((labels[:, :, k] == seg_no).T)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.NumberOfFrames = len(frames)
    bits = np.packbits(np.stack(frames).astype(np.uint8).ravel(), bitorder="little")
    ds.PixelData = bits.tobytes() + (b"\0" if bits.size % 2 else b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_phase_numbers_of_the_public_collections():
    assert [phase_number(duke_phase_description(i)) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert phase_number("ax dyn pre") is None
    assert phase_number("Ph3/ax 3d dyn") == 3 and phase_number("T1 FS post 2") == 2
    rules = load_breast_rules()
    expected = {
        "ax dyn pre": "pre",
        "ax 3d dyn pre": "pre",
        "ax dyn 1st pass": "post",
        "ax 3d dyn 2nd pass": "post",
        "ax dyn 1st pas": "post",
        "Ph2/ax 3d dyn": "dynamic",
        "Ax Vibrant MultiPhase": "dynamic",
        "Dynamic-3dfgre": "dynamic",
        "SAG 3D DYNAMIC": "dynamic",
        "t1_fl3d_tra_dynaVIEWS_spair": "dynamic",
        "ax dyn 1st pass SUB": None,
        "ISPY2: VOLSER: uni-lateral cropped: SER": None,
        "localizer": None,
        "AX T2 FSE": None,
        "ax t1": None,
    }
    assert {d: rules.classify(d)[0] for d in expected} == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_dicom_layouts_give_the_phantom_series(breast, layout, tmp_path):
    out = tmp_path / "prepared"
    src = breast["dicom"][layout]
    before = h.tree_digest(src)
    res = prepare_breast_dataset(src, out, breast_mask=breast["masks"], lesion_mask=breast["masks"])
    assert res["prepared"] == breast["ids"] and res["skipped"] == []
    for sid in breast["ids"]:
        t = breast["truth"][sid]
        img = nib.load(out / sid / "dce.nii.gz")
        np.testing.assert_array_equal(img.get_fdata(), t["dce"])  # integer signal, slope 1: no quantisation error
        np.testing.assert_allclose(img.affine, t["affine"], atol=1e-4)  # the study's oblique grid
        assert abs(img.affine[2, 1]) > 0.1  # oblique indeed (10 degrees of pitch)
        assert np.array_equal(nib.load(out / sid / "pre.nii.gz").affine, img.affine)
        assert json.loads((out / sid / "dce_times.json").read_text())["times_s"] == pytest.approx(t["times"], abs=1e-5)
        for name in ("breast_mask", "lesion_mask"):
            m = nib.load(out / sid / f"{name}.nii.gz")
            np.testing.assert_array_equal(m.get_fdata(), t[name])
            assert np.array_equal(m.affine, img.affine)
        man = json.loads((out / sid / "manifest.json").read_text())
        assert man["layout"] == ("series_per_phase" if layout == "series_per_phase" else "multi_phase_series")
        assert len(man["phases"]) == 6 and not any(p["resampled"] for p in man["phases"])
    datalist = json.loads((out / "datalist.json").read_text())
    entries = [e for k in ("training", "validation", "test") for e in datalist[k]]
    assert sorted(e["id"] for e in entries) == breast["ids"] and all(
        len(datalist[k]) == 1 for k in ("training", "validation", "test")
    )
    assert all({"dce", "pre", "breast_mask", "lesion_mask", "dce_times"} <= set(e) for e in entries)
    assert h.tree_digest(src) == before  # inputs untouched


def test_lesion_mask_from_dicom_seg(breast, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(breast["dicom"]["multi_phase"] / "breast-000", src / "breast-000")
    prepare_breast_dataset(src, tmp_path / "out", lesion_mask=breast["seg"])
    got = nib.load(tmp_path / "out" / "breast-000" / "lesion_mask.nii.gz").get_fdata()
    truth = breast["truth"]["breast-000"]["lesion_mask"]
    assert truth.max() >= 1 and np.array_equal(got, truth)


def test_datalist_keeps_sections_when_studies_are_added(breast, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for sid in breast["ids"][:2]:
        shutil.copytree(breast["dicom"]["series_per_phase"] / sid, src / sid)
    prepare_breast_dataset(src, out)
    first = json.loads((out / "datalist.json").read_text())
    shutil.copytree(breast["dicom"]["series_per_phase"] / breast["ids"][2], src / breast["ids"][2])
    res = prepare_breast_dataset(src, out)
    assert res["prepared"] == [breast["ids"][2]] and res["existing"] == breast["ids"][:2]
    second = json.loads((out / "datalist.json").read_text())
    for k in ("training", "validation", "test"):
        assert {e["id"] for e in first[k]} <= {e["id"] for e in second[k]}
    assert sum(len(second[k]) for k in ("training", "validation", "test")) == 3


def test_iterunet_trains_and_infers_on_prepared_dicom(breast, tmp_path):
    """Both layouts prepared, then the real command lines: 2 training iterations on the Duke-layout cases,
    inference on an I-SPY-layout case; the synthesised phases carry the case's oblique affine."""
    per_phase, multi = tmp_path / "per_phase", tmp_path / "multi"
    prepare_breast_dataset(
        breast["dicom"]["series_per_phase"], per_phase, breast_mask=breast["masks"], lesion_mask=breast["masks"]
    )
    prepare_breast_dataset(breast["dicom"]["multi_phase"], multi)
    run = tmp_path / "run"
    h.train(CONFIGS, run, "--dataset_dir", str(per_phase), "--val_interval", "0", *h.SMALL)
    h.final_checkpoint(run, 2)
    case = multi / "breast-001"
    out = tmp_path / "infer"
    h.evaluate(
        CONFIGS,
        run / "model.pt",
        out,
        "--case_dir",
        str(case),
        "--network_size",
        "small",
        "--mask_keys",
        "[]",
        "--progress",
        "false",
        files=["train.json", "inference.json"],
        runner=h.bundle_here,
    )
    src = nib.load(case / "dce.nii.gz")
    synth = h.assert_same_grid(out / "breast-001" / "dce_synth.nii.gz", src, shape=src.shape[:3] + (4,))
    assert np.allclose(synth.affine, breast["truth"]["breast-001"]["affine"], atol=1e-4)


# ------------------------------------------------------------------------------------------
# bad studies: one line naming the study, the series and the problem; nothing written; inputs untouched


def _copy(breast, layout: str, tmp_path: Path, sid: str = "breast-000") -> tuple[Path, Path]:
    src = tmp_path / "src"
    shutil.copytree(breast["dicom"][layout] / sid, src / sid)
    return src, next(src.glob(f"{sid}/*"))  # (root, study folder)


def _edit(files, **tags) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(f)


def _rewrite_phase(study: Path, sid: str, phase: int, volume: np.ndarray, affine: np.ndarray) -> str:
    """Replace the series of ``phase`` (one series per phase) by ``volume`` on ``affine``, in the same study."""
    desc = duke_phase_description(phase)
    folder = next(study.glob(f"*-{desc}"))
    shutil.rmtree(folder)
    tags = study_tags(sid, "20200101", "MRI BREAST BILATERAL", f"{sid}|20200101|breast", PatientSex="F")
    write_series(
        volume,
        affine,
        folder,
        study=tags,
        series_number=3 + phase,
        description=desc,
        acquisition_time_s=36300.0 + [0, 85, 155, 225, 295, 365][phase],
    )
    return folder.name


def _refused(src: Path, out: Path, pattern: str, **kw) -> None:
    before = h.tree_digest(src)
    with pytest.raises(IngestError, match=pattern) as info:
        prepare_breast_dataset(src, out, **kw)
    assert "\n" not in str(info.value) and str(info.value).startswith("patient breast-000: series ")
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert h.tree_digest(src) == before


def test_out_of_order_times_stop_with_one_line(breast, tmp_path):
    src, study = _copy(breast, "series_per_phase", tmp_path)
    third = next(study.glob("*-ax dyn 3rd pass"))
    _edit(sorted(third.glob("*.dcm")), AcquisitionTime="100520.000000")  # 10:05:20 = 20 s after pre, before the 2nd
    _refused(
        src,
        tmp_path / "out",
        r"3rd pass.*AcquisitionTime 20\.000 s .*earlier than the phase before.*strictly increasing",
    )
    # the command line: exit status 1, the same one line on stderr, nothing written
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--src", str(src), "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and lines[0].startswith("error: patient breast-000: series ") and "3rd pass" in lines[0]
    assert len(lines) == 2 and not (tmp_path / "cli").exists()


def test_skip_bad_prepares_the_others_and_lists_the_bad_study(breast, tmp_path):
    src, study = _copy(breast, "series_per_phase", tmp_path)
    shutil.copytree(breast["dicom"]["series_per_phase"] / "breast-001", src / "breast-001")
    _edit(sorted(next(study.glob("*-ax dyn 3rd pass")).glob("*.dcm")), AcquisitionTime="100520.000000")
    res = prepare_breast_dataset(src, tmp_path / "out", skip_bad=True)
    assert res["prepared"] == ["breast-001"] and [s["id"] for s in res["skipped"]] == ["breast-000"]
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())["skipped"]
    assert "3rd pass" in skipped[0]["reason"] and not (tmp_path / "out" / "breast-000").exists()


def test_duplicated_times_in_a_multi_phase_series(breast, tmp_path):
    src, study = _copy(breast, "multi_phase", tmp_path)
    _edit(sorted(study.rglob("3-*.dcm")), TriggerTime="85000")  # temporal position 3 at the time of position 2
    _refused(src, tmp_path / "out", r"Ax Vibrant MultiPhase', temporal position 3\).*TriggerTime 85\.000 s.*duplicated")


def test_phase_of_another_orientation_is_refused(breast, tmp_path):
    src, study = _copy(breast, "series_per_phase", tmp_path)
    t = breast["truth"]["breast-000"]
    name = _rewrite_phase(
        study, "breast-000", 2, t["dce"][..., 2], tilted_affine(t["affine"], t["dce"].shape[:3], 15.0)
    )
    _refused(src, tmp_path / "out", rf"{re.escape(name)}: phase 2 has another orientation .*refused \(not resampled\)")


def test_phase_on_another_grid_is_resampled_or_refused(breast, tmp_path):
    src, study = _copy(breast, "series_per_phase", tmp_path)
    t = breast["truth"]["breast-000"]
    shifted = t["affine"].copy()
    shifted[:3, 3] += t["affine"][:3, :3] @ [2.0, 3.0, 1.0]  # the grid moved by (2, 3, 1) voxels, cropped
    name = _rewrite_phase(study, "breast-000", 2, t["dce"][2:, 3:, 1:, 2], shifted)
    _refused(
        src,
        tmp_path / "out",
        rf"{re.escape(name)}: phase 2 lies on another grid .*78x77x19 voxels vs 80x80x20.*--resample true",
        resample=False,
    )
    out = tmp_path / "resampled"
    prepare_breast_dataset(src, out)
    got = nib.load(out / "breast-000" / "dce.nii.gz").get_fdata()
    np.testing.assert_allclose(got[2:, 3:, 1:, 2], t["dce"][2:, 3:, 1:, 2], atol=1e-2)  # voxel centres coincide
    assert np.all(got[:2, :, :, 2] == 0) and np.array_equal(got[..., [0, 1, 3, 4, 5]], t["dce"][..., [0, 1, 3, 4, 5]])
    man = json.loads((out / "breast-000" / "manifest.json").read_text())
    assert [p["resampled"] for p in man["phases"]] == [False, False, True, False, False, False]


def _pre_plus_multi_phase_post(breast, tmp_path, fix_count: bool) -> Path:
    """breast-000 as a separate pre-contrast series + a multi-phase series of the 5 post-contrast phases."""
    src, study = _copy(breast, "multi_phase", tmp_path)
    multi = next(study.glob("*-Ax Vibrant MultiPhase"))
    for f in multi.glob("1-*.dcm"):  # temporal position 1 (the pre-contrast phase) goes to its own series
        f.unlink()
    pre = next((breast["dicom"]["series_per_phase"] / "breast-000").glob("*/*-ax dyn pre"))
    shutil.copytree(pre, study / pre.name)
    tags = {"SeriesDescription": "Ax Vibrant MultiPhase post"}
    _edit(sorted(multi.glob("*.dcm")), **(dict(tags, NumberOfTemporalPositions=5) if fix_count else tags))
    return src


def test_pre_series_and_multi_phase_post_series(breast, tmp_path):
    src = _pre_plus_multi_phase_post(breast, tmp_path, fix_count=True)
    out = tmp_path / "out"
    prepare_breast_dataset(src, out)
    t = breast["truth"]["breast-000"]
    np.testing.assert_array_equal(nib.load(out / "breast-000" / "dce.nii.gz").get_fdata(), t["dce"])
    man = json.loads((out / "breast-000" / "manifest.json").read_text())
    assert man["layout"] == "pre_series_and_multi_phase_post" and man["time_source"].startswith("AcquisitionTime")
    assert man["times_s"] == pytest.approx(t["times"], abs=1e-5)
    assert [p["temporal_position"] for p in man["phases"]] == [None, 2, 3, 4, 5, 6]


def test_temporal_position_count_disagreeing_with_the_header(breast, tmp_path):
    src = _pre_plus_multi_phase_post(breast, tmp_path, fix_count=False)
    _refused(src, tmp_path / "out", r"NumberOfTemporalPositions says 6 but the series holds 5 images per slice")
