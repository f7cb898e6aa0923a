"""DICOM out (issue 25): the ET mask as a DICOM SEG on the source T1 grid (read back with highdicom,
voxel for voxel), conformance checked by dciodvfy (dicom3tools) when installed, and the series of
one run appearing all together or not at all, also across a SIGKILL."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from common.dicom_out import read_source_series, series_set, write_derived_series, write_segmentation
from common.geometry import LPS_TO_RAS
from common.phantoms.dicom import study_tags, tilted_affine, write_series

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 14, 6)


def _oblique_affine() -> np.ndarray:
    a = np.diag([1.2, 1.1, 2.5, 1.0])
    a[:3, 3] = [-20.0, -15.0, 10.0]
    return tilted_affine(a, SHAPE, 12.0)  # pitched 12 degrees: an oblique grid stays oblique


@pytest.fixture()
def t1(tmp_path):
    """A source T1 series (DICOM phantom, oblique), its volume, affine and an ET-like blob mask."""
    affine = _oblique_affine()
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    volume = 100.0 + 3.0 * ii + 2.0 * jj + kk
    mask = (((ii - 8) / 4.0) ** 2 + ((jj - 6) / 3.0) ** 2 + ((kk - 3) / 1.5) ** 2 <= 1.0).astype(np.uint8)
    mask[15, 2, 0] = 1  # a corner voxel: the first slice and the edges are placed right too
    study = study_tags("PHANTOM-1", "20200101", "MR brain", "seed-1", PatientSex="F")
    folder = tmp_path / "study" / "2.000000-t1_se_tra"
    write_series(volume, affine, folder, study=study, series_number=2, description="t1_se_tra")
    return {"folder": folder, "volume": volume, "affine": affine, "mask": mask}


def _seg_on_nifti_grid(path: Path, affine_ras: np.ndarray, shape) -> np.ndarray:
    """The SEG read back with highdicom (``get_volume``: array + LPS affine), resampled by index onto
    the NIfTI grid ``affine_ras``; asserts every SEG voxel centre is a NIfTI voxel centre (1e-3 voxel)."""
    import highdicom as hd

    vol = hd.seg.segread(path).get_volume(combine_segments=True)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij"), -1).reshape(-1, 3)
    world_lps = (vol.affine @ np.c_[idx, np.ones(len(idx))].T)[:3]
    ras = LPS_TO_RAS[:3, :3] @ world_lps
    ijk = (np.linalg.inv(affine_ras) @ np.r_[ras, np.ones((1, ras.shape[1]))])[:3].T
    assert np.abs(ijk - np.rint(ijk)).max() < 1e-3
    ijk = np.rint(ijk).astype(int)
    out = np.full(shape, -1, dtype=np.int64)
    out[tuple(ijk.T)] = vol.array.reshape(-1)
    assert (out >= 0).all(), "the SEG does not cover the T1 grid"
    return out


def test_seg_reads_back_equal_to_the_mask_on_the_t1_grid(t1, tmp_path):
    src = read_source_series(t1["folder"])
    path = write_segmentation(
        t1["mask"],
        t1["affine"],
        tmp_path / "out" / "1002.000000-SYNTHETIC ET",
        src,
        series_number=1002,
        label="enhancing tumour",
        algorithm_name="d3m",
        algorithm_version="0.3.0",
    )
    back = _seg_on_nifti_grid(path, t1["affine"], SHAPE)
    np.testing.assert_array_equal(back, t1["mask"])
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert (
        ds.StudyInstanceUID == src.study["StudyInstanceUID"]
        and ds.FrameOfReferenceUID == src.study["FrameOfReferenceUID"]
    )
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "enhancing tumour" and segment.SegmentAlgorithmType == "AUTOMATIC"
    (algo,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algo.AlgorithmName == "d3m" and algo.AlgorithmVersion == "0.3.0"
    refs = ds.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == src.series_uid
    assert sorted(r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence) == sorted(src.sop_instance_uids)
    # every frame names the source instance it lies on
    per_frame = [
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(per_frame) == sorted(src.sop_instance_uids)
    # a mask on another grid is refused, naming the folder
    shifted = t1["affine"].copy()
    shifted[:3, 3] += 1.0
    with pytest.raises(ValueError, match="the mask is not on the grid of the source instance"):
        write_segmentation(
            t1["mask"],
            shifted,
            tmp_path / "out" / "x",
            src,
            series_number=3,
            label="et",
            algorithm_name="d3m",
            algorithm_version="1",
        )
    assert not (tmp_path / "out" / "x").exists()


def test_derived_series_tags(t1, tmp_path):
    """ImageType has its value 3; Laterality / PatientPosition copied when the source has them, else
    written empty (Type 2C the MR IOD asks for)."""
    src = read_source_series(t1["folder"])
    files = write_derived_series(
        t1["volume"],
        t1["affine"],
        tmp_path / "a",
        src,
        series_number=1001,
        description="SYNTHETIC T1c",
        derivation="test",
    )
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert ds.Laterality == "" and ds.PatientPosition == ""
    src.series_tags = {"Laterality": "L", "PatientPosition": "HFS"}
    files = write_derived_series(
        t1["volume"],
        t1["affine"],
        tmp_path / "b",
        src,
        series_number=1001,
        description="SYNTHETIC T1c",
        derivation="test",
    )
    ds = pydicom.dcmread(files[0])
    assert ds.Laterality == "L" and ds.PatientPosition == "HFS"
    for f in t1["folder"].iterdir():  # read from the source where present
        d = pydicom.dcmread(f)
        d.PatientPosition = "FFS"
        d.save_as(f)
    assert read_source_series(t1["folder"]).series_tags == {"PatientPosition": "FFS"}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_dciodvfy_finds_no_error_of_ours(t1, tmp_path):
    """One file of each synthetic series: the derived MR series and the SEG. Errors that come from the
    source phantom's own header (copied patient/study elements) would be filtered here; today there
    are none, so every error line counts."""
    src = read_source_series(t1["folder"])
    mr = write_derived_series(
        t1["volume"],
        t1["affine"],
        tmp_path / "mr",
        src,
        series_number=1001,
        description="SYNTHETIC T1c",
        derivation="x",
    )[0]
    seg = write_segmentation(
        t1["mask"],
        t1["affine"],
        tmp_path / "seg",
        src,
        series_number=1002,
        label="ET",
        algorithm_name="d3m",
        algorithm_version="1",
    )
    for path in (mr, seg):
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path}:\n" + "\n".join(errors)


# --- all the series of a run, or none ---------------------------------------------------------


def test_series_set_appears_whole(t1, tmp_path):
    src = read_source_series(t1["folder"])
    dicom = tmp_path / "case" / "dicom"
    with series_set(dicom) as staging:
        assert staging.parent == dicom.parent and staging.name.startswith(".tmp-dicom-")
        write_derived_series(
            t1["volume"], t1["affine"], staging / "a", src, series_number=1, description="SYNTHETIC a", derivation="x"
        )
        assert not dicom.exists()  # nothing visible before the block completes
    assert sorted(p.name for p in dicom.iterdir()) == ["a"]
    with pytest.raises(FileExistsError, match="DICOM series of an earlier run"):
        with series_set(dicom):
            pass
    other = tmp_path / "case" / "other"
    with pytest.raises(RuntimeError):
        with series_set(other) as staging:
            (staging / "x").mkdir()
            raise RuntimeError("boom")
    assert not other.exists() and not list(other.parent.glob(".tmp-other-*"))


def test_series_set_after_a_kill_shows_nothing_and_the_rerun_completes(t1, tmp_path):
    """SIGKILL after the first of two series is complete: no series is visible, only the hidden
    staging folder; the rerun removes it and writes both."""
    dicom = tmp_path / "case" / "dicom"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        import numpy as np
        from common.dicom_out import read_source_series, series_set, write_derived_series
        src = read_source_series({str(t1["folder"])!r})
        vol = np.asarray(np.load({str(tmp_path / "vol.npy")!r}))
        aff = np.load({str(tmp_path / "aff.npy")!r})
        with series_set(Path({str(dicom)!r})) as staging:
            for n in (1, 2):
                write_derived_series(vol, aff, staging / f"s{{n}}", src, series_number=n, description=f"SYNTHETIC {{n}}", derivation="x")
                if n == 1 and sys.argv[1] == "stall":
                    print("first", flush=True)
                    time.sleep(60)
        print("done", flush=True)
        """
    )
    np.save(tmp_path / "vol.npy", t1["volume"])
    np.save(tmp_path / "aff.npy", t1["affine"])
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), "stall"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not dicom.exists()
    (stale,) = dicom.parent.glob(".tmp-dicom-*")
    assert (stale / "s1").is_dir()
    res = subprocess.run([sys.executable, str(tmp_path / "run.py"), "go"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr[-2000:]
    assert sorted(p.name for p in dicom.iterdir()) == ["s1", "s2"]
    assert not list(dicom.parent.glob(".tmp-dicom-*"))
    assert len(list((dicom / "s2").glob("*.dcm"))) == SHAPE[2]


def test_seg_on_the_t1_grid_of_the_brain_ingest(tmp_path):
    """The path synthesize.py takes for d3m: a DICOM brain study (pitched 10 degrees) through the
    brain ingest; a mask on its ``t1n.nii.gz`` grid goes out as a SEG on the source T1 instances and
    reads back equal, voxel for voxel."""
    import nibabel as nib

    from common.ingest.brain import ingest_brain_study
    from common.phantoms.brain import make_brain_phantom
    from common.phantoms.dicom import write_brain_study

    ph = make_brain_phantom(seed=[0, 1, 0], shape=(24, 28, 20))
    patient = write_brain_study(ph, tmp_path / "src", "P")
    manifest = ingest_brain_study(patient, tmp_path / "prepared", "P", register=False)
    t1n = nib.load(manifest["files"]["t1n"])
    values = np.asarray(t1n.dataobj)
    mask = (values > np.percentile(values, 90)).astype(np.uint8)
    src = read_source_series(patient / manifest["roles"]["t1"]["folder"])
    path = write_segmentation(
        mask,
        t1n.affine,
        tmp_path / "seg",
        src,
        series_number=1003,
        label="ET",
        algorithm_name="d3m",
        algorithm_version="1",
    )
    np.testing.assert_array_equal(_seg_on_nifti_grid(path, t1n.affine, mask.shape), mask)
