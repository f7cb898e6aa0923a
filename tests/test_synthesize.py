"""``scripts/synthesize.py``: a DICOM study in, synthetic DCE phases out as DICOM series of that study.

End to end on a small oblique DICOM phantom study with untrained small networks (the numbers checked
are geometry, quantisation and header contents, not image quality), read back with the project's
own ingest reader and with pydicom; the writer alone on a strongly oblique grid; the refusals; and
ProstateX-0218 when ``../shared`` is present. Budget: well under 90 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import MRImageStorage

ROOT = Path(__file__).resolve().parents[1]

import helpers as h  # noqa: E402

from common.dicom_out import (  # noqa: E402
    STUDY_TAGS,
    atomic_folder,
    geometry_from_affine,
    read_source_series,
    write_derived_series,
)
from common.geometry import sitk_affine, sitk_to_array  # noqa: E402
from common.ingest.series import check_series, read_frame, scan_study  # noqa: E402
from common.io import load_nifti  # noqa: E402
from scripts.synthesize import case_name, main, parse_overrides, split_options, synthesize  # noqa: E402

# a small PROSTATEx-like phantom: 48 x 48 x 6 DCE grid with 12 time points, oblique (8-12 degrees)
GRID = {
    "grid_shape": (48, 48, 6),
    "grid_spacing": (3.2, 3.2, 3.6),
    "t2w_shape": (96, 96, 6),
    "t2w_spacing": (1.6, 1.6, 3.6),
    "prepared_slices": 4,
    "n_dce": 12,
    "dce_duration_s": 160.0,
}
CROP = "40,40,4"  # a crop inside the DCE grid: the output grid is a shifted sub-grid of the source series
#: the MR Image Storage elements checked in every file (Type 1 must be non-empty, Type 2 present).
TYPE1 = [
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "ScanningSequence",
    "SequenceVariant",
    "PixelData",
]
TYPE2 = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "PositionReferenceIndicator",
    "Manufacturer",
    "SliceThickness",
    "ScanOptions",
    "MRAcquisitionType",
    "EchoTime",
    "EchoTrainLength",
]


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of everything below ``folder``: cheaper than hashing a real study."""
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))]


def _tiny_checkpoint(bundle: str, path: Path) -> Path:
    """Untrained ``small`` network of a bundle, saved as its CheckpointSaver would (weights + record)."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    p["network_size"], p["device"] = "small", "cpu"
    torch.manual_seed(0)
    net, record = p.get_parsed_content("network_def"), p.get_parsed_content("checkpoint_record")
    torch.save({"model": net.state_dict(), "config": record.state_dict()}, path)
    return path


def _source_instances(study: Path) -> dict[str, pydicom.Dataset]:
    """SOPInstanceUID -> header of every DICOM file below ``study``."""
    out = {}
    for f in study.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _read_back(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (x, y, z), RAS affine)`` of a series folder read by the ingest (scan, check, SimpleITK)."""
    (series,) = scan_study(folder)
    geom = check_series(series)
    img = read_frame(geom.frames[0], geom)
    return sitk_to_array(img), sitk_affine(img)


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory) -> Path:
    from common.phantoms.dicom import write_prostate_study
    from common.phantoms.prostate import make_prostate_phantom

    src = tmp_path_factory.mktemp("dicom_src")
    return Path(write_prostate_study(make_prostate_phantom(0, **GRID), src, "P000"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {b: _tiny_checkpoint(b, d / f"{b}.pt") for b in ("resdce", "dcediff")}


@pytest.fixture(scope="module")
def resdce_run(phantom_study, checkpoints, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synth")
    before = h.tree_digest(phantom_study)
    summary = synthesize(
        phantom_study,
        "resdce",
        out,
        ingest={"crop_size": CROP},
        ckpt_path=str(checkpoints["resdce"]),
        num_inference_steps=2,
        device="cpu",
    )
    return {"out": out, "summary": summary, "before": before}


def test_resdce_dicom_round_trip(resdce_run, phantom_study):
    summary, out = resdce_run["summary"], resdce_run["out"]
    assert h.tree_digest(phantom_study) == resdce_run["before"]  # the source study was only read
    meta = json.loads((ROOT / "bundles" / "resdce" / "configs" / "metadata.json").read_text())
    manifest = json.loads((Path(summary["prepared_case"]) / "manifest.json").read_text())
    src = _source_instances(phantom_study)
    src_series = {str(ds.SeriesInstanceUID) for ds in src.values()}
    src_numbers = {int(ds.SeriesNumber) for ds in src.values()}
    pre_folder = manifest["dce"]["series"][manifest["dce"]["phases"]["pre"]["index"]]["folder"]
    assert [s["key"] for s in summary["series"]] == ["dce_onset", "dce_early", "dce_late"]
    series_uids, sop_uids = set(), []
    for s in summary["series"]:
        folder, (vol, aff) = Path(s["folder"]), load_nifti(s["nifti"])
        assert folder.parent == out / "resdce" / "P000" / "dicom"
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == vol.shape[2] == 4
        # the ingest's own reader: exact grid (oblique) and values within one quantisation step
        arr, aff_back = _read_back(folder)
        assert np.abs(aff_back - aff).max() < 1e-4
        rot = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
        assert np.abs(rot - np.diag(np.diag(rot))).max() > 0.05  # oblique, and stays so
        dss = [pydicom.dcmread(f) for f in files]
        slope, icpt = float(dss[0].RescaleSlope), float(dss[0].RescaleIntercept)
        assert 0 < slope < (vol.max() - min(vol.min(), 0)) / 1000  # at least 1000 levels over the range
        assert np.abs(arr - vol).max() <= slope
        geo = geometry_from_affine(aff, vol.shape[2])
        for k, ds in enumerate(dss):  # files 1-01 ... in slice order
            missing = [t for t in TYPE1 if t not in ds or ds[t].value in (None, "", b"")]
            assert not missing, (files[k].name, missing)
            assert not [t for t in TYPE2 if t not in ds], files[k].name
            assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"] and ds.Modality == "MR"
            assert ds.SeriesDescription.startswith("SYNTHETIC")
            assert (
                ds.SeriesDescription == f"SYNTHETIC {s['key'].replace('dce_', 'DCE ')} (ResDCE-diff {meta['version']})"
            )
            assert meta["name"] in ds.DerivationDescription and meta["version"] in ds.DerivationDescription
            assert ds.DerivationDescription.endswith(f"Network precision: {summary['settings']['precision_used']}.")
            assert int(ds.SeriesNumber) == s["series_number"] and int(ds.SeriesNumber) not in src_numbers
            assert int(ds.InstanceNumber) == k + 1 and (ds.Rows, ds.Columns) == vol.shape[1::-1]
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (16, 16, 15, 1)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            # geometry of the NIfTI grid
            np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float), geo["positions"][k], atol=1e-4)
            np.testing.assert_allclose(
                np.asarray(ds.ImageOrientationPatient, float), geo["ImageOrientationPatient"], atol=1e-6
            )
            np.testing.assert_allclose(np.asarray(ds.PixelSpacing, float), geo["PixelSpacing"], atol=1e-5)
            assert float(ds.SliceThickness) == pytest.approx(geo["SliceSpacing"], abs=1e-5)
            assert float(ds.SpacingBetweenSlices) == pytest.approx(geo["SliceSpacing"], abs=1e-5)
            # pixels through pydicom, rescaled
            np.testing.assert_allclose(ds.pixel_array * slope + icpt, vol[:, :, k].T, atol=slope)
            assert float(ds.RescaleSlope) == slope and vol.min() <= float(ds.WindowCenter) <= vol.max()
            assert float(ds.WindowWidth) > 0
            # same patient and study as the source; a new series and instances
            (ref,) = ds.SourceImageSequence
            assert ref.ReferencedSOPInstanceUID in src
            origin = src[ref.ReferencedSOPInstanceUID]
            assert ref.ReferencedSOPClassUID == origin.SOPClassUID
            for tag in STUDY_TAGS:
                assert ds.get(tag) == origin.get(tag, ""), tag
            assert origin.StudyInstanceUID == manifest["study_uid"]
            # the referenced source slice is the one this slice lies on (the crop keeps the source planes)
            normal = np.cross(geo["ImageOrientationPatient"][:3], geo["ImageOrientationPatient"][3:])
            dz = np.dot(np.asarray(origin.ImagePositionPatient, float) - geo["positions"][k], normal)
            assert abs(dz) < 1e-3
            assert str(ds.SeriesInstanceUID) not in src_series and str(ds.SOPInstanceUID) not in src
            sop_uids.append(str(ds.SOPInstanceUID))
        series_uids |= {str(ds.SeriesInstanceUID) for ds in dss}
        assert len({str(ds.SeriesInstanceUID) for ds in dss}) == 1
    assert len(series_uids) == 3 and len(sop_uids) == len(set(sop_uids)) == 12
    # the references point at the DCE time point the pre-contrast input came from
    refs = {pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID for f in Path(s["folder"]).glob("*")}
    assert {str(src[u].SeriesDescription) for u in refs} == {Path(pre_folder).name.split("-", 1)[1]}
    assert not [p for p in (out / "resdce" / "P000" / "dicom").iterdir() if p.name.startswith(".")]


def test_cli_dcediff_and_refusals(resdce_run, phantom_study, checkpoints, tmp_path):
    out = resdce_run["out"]
    args = ["--study", str(phantom_study), "--out", str(out), "--ingest_crop_size", CROP, "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "synthesize.py"), *args, "--bundle", "dcediff"]
    cmd += ["--ckpt_path", str(checkpoints["dcediff"]), "--sampler", "ddim", "--num_inference_steps", "2"]
    cmd += ["--num_samples", "2"]  # the pixel-wise std over the samples becomes a series too
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "dcediff" / "P000" / "synthesis.json").read_text())
    assert summary["seconds"]["ingest"] < 1.0  # the prepared case of the resdce run was reused
    descs, numbers = [], []
    for s in summary["series"]:
        arr, aff = _read_back(Path(s["folder"]))
        vol, aff_nii = load_nifti(s["nifti"])
        ds = pydicom.dcmread(sorted(Path(s["folder"]).glob("*.dcm"))[0])
        assert np.abs(aff - aff_nii).max() < 1e-4 and np.abs(arr - vol).max() <= float(ds.RescaleSlope)
        descs.append(str(ds.SeriesDescription))
        numbers.append(int(ds.SeriesNumber))
    version = json.loads((ROOT / "bundles" / "dcediff" / "configs" / "metadata.json").read_text())["version"]
    names = ["DCE early", "DCE late", "DCE early std", "DCE late std"]
    assert descs == [f"SYNTHETIC {n} (DCE-diff {version})" for n in names]
    assert not set(numbers) & {s["series_number"] for s in resdce_run["summary"]["series"]}
    # a second run into the same folder refuses before any work: the series are never overwritten
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "already holds DICOM series" in res.stderr
    # an output folder inside the study is refused, and nothing is written there
    before = h.tree_digest(phantom_study)
    with pytest.raises(ValueError, match="inside the source study folder"):
        synthesize(phantom_study, "resdce", phantom_study / "out", ckpt_path=str(checkpoints["resdce"]))
    assert h.tree_digest(phantom_study) == before
    # wrong or missing weights are named before the study is ingested
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        synthesize(phantom_study, "resdce", tmp_path / "z", ckpt_path=str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="--network_size small"):
        synthesize(phantom_study, "resdce", tmp_path / "z", ckpt_path=str(checkpoints["resdce"]), network_size="paper")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            synthesize(phantom_study, "resdce", tmp_path / "z", ckpt_path=str(checkpoints["resdce"]), device="cuda")
    assert not (tmp_path / "z").exists()
    with pytest.raises(ValueError, match=r"unknown ingest option\(s\) \['ingest_seed'\]"):
        synthesize(phantom_study, "resdce", tmp_path / "z", ingest={"seed": 1})
    with pytest.raises(ValueError, match="ressrdiff: reads no study .*: it super-resolves one volume"):
        synthesize(phantom_study, "ressrdiff", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"no bundle 'nosuch' .*; bundles: d3m, dcediff"):
        synthesize(phantom_study, "nosuch", tmp_path / "x")
    with pytest.raises(ValueError, match="set by synthesize.py"):
        synthesize(phantom_study, "resdce", tmp_path / "y", output_dir=str(tmp_path), ingest={"crop_size": CROP})
    assert parse_overrides(["--num_inference_steps", "4", "--patch_size=[96,96]", "--device", "cpu"]) == {
        "num_inference_steps": 4,
        "patch_size": [96, 96],
        "device": "cpu",
    }
    assert case_name(phantom_study) == "P000" and case_name(phantom_study, "a b") == "a_b"
    study_folder = next(d for d in phantom_study.iterdir() if d.is_dir())  # <patient>/<MM-DD-YYYY-NA-...>/
    assert case_name(study_folder) == f"P000_{study_folder.name}".replace(" ", "_")
    assert split_options({"ingest_register": False, "seed": 1}) == ({"register": False}, {"seed": 1})
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--device"])


def _iterunet_checkpoint(path: Path) -> Path:
    """A small IterUNet with perturbed weights (the zero-initialised residual head would copy the input)."""
    from common.networks.iterunet import IterUNet

    torch.manual_seed(0)
    net = IterUNet("small")
    with torch.no_grad():
        for w in net.parameters():
            w.add_(0.05 * torch.randn_like(w))
    torch.save({"model": net.state_dict()}, path)
    return path


def test_iterunet_delayed_frames_as_dicom(resdce_run, phantom_study, tmp_path, capsys):
    """iterunet on the prepared case of the resdce run (the ingest is reused): each predicted frame of its 4D
    output is a DERIVED series of the source study, on the NIfTI's exact grid, within one quantisation step."""
    out = resdce_run["out"]
    before = h.tree_digest(phantom_study)
    summary = synthesize(
        phantom_study,
        "iterunet",
        out,
        ingest={"crop_size": CROP},
        ckpt_path=str(_iterunet_checkpoint(tmp_path / "iterunet.pt")),
        frame_offsets_s=[30, 60, 90],  # the phantom's series ends 160 s after its start
        device="cpu",
        progress=False,
    )
    assert h.tree_digest(phantom_study) == before and summary["seconds"]["ingest"] < 1.0
    case_out = out / "iterunet" / "P000"
    kin = json.loads((case_out / "kinetics.json").read_text())
    assert [s["key"] for s in summary["series"]] == kin["predicted_phases"] and len(kin["predicted_phases"]) == 2
    assert summary["overrides"]["mask_keys"] == ["organ_mask"]  # the study_overrides of its contract
    vol4, aff = load_nifti(case_out / "dce_synth.nii.gz")
    assert vol4.shape == (40, 40, 4, 2)
    version = json.loads((ROOT / "bundles" / "iterunet" / "configs" / "metadata.json").read_text())["version"]
    study_uid = json.loads((Path(summary["prepared_case"]) / "manifest.json").read_text())["study_uid"]
    resdce_numbers = {s["series_number"] for s in resdce_run["summary"]["series"]}
    for c, s in enumerate(summary["series"]):
        assert s["frame"] == c and Path(s["folder"]).parent == case_out / "dicom"
        arr, aff_back = _read_back(Path(s["folder"]))
        assert np.abs(aff_back - aff).max() < 1e-4
        dss = [pydicom.dcmread(f) for f in sorted(Path(s["folder"]).glob("*.dcm"))]
        slope = float(dss[0].RescaleSlope)
        assert np.abs(arr - vol4[..., c]).max() <= slope and vol4[..., c].std() > 100 * slope
        for ds in dss:
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"] and ds.StudyInstanceUID == study_uid
            assert ds.SeriesDescription == f"SYNTHETIC DCE {s['key']} (iterU-Net {version})"
            assert f"at {kin['times_s'][2 + c]:g} s after contrast arrival" in ds.DerivationDescription
            assert int(ds.SeriesNumber) == s["series_number"] not in resdce_numbers
            assert not [t for t in TYPE1 if t not in ds or ds[t].value in (None, "", b"")]
    # d3m on a prostate study: its brain ingest stops in one line naming the contrasts it did not find
    ckpt = _tiny_checkpoint("d3m", tmp_path / "d3m.pt")
    args = ["--study", str(phantom_study), "--bundle", "d3m", "--out", str(tmp_path / "d3m"), "--ckpt_path", str(ckpt)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: patient ") and "no usable T1 / FLAIR series" in err
    assert "t2_tse_tra" in err and not list((tmp_path / "d3m").rglob("*.dcm"))


def test_writer_oblique_grid_and_atomic(phantom_study, tmp_path):
    """A grid rotated 30 degrees about a non-axis direction, negative values (int16): exact read-back."""
    dce = sorted(p for p in phantom_study.rglob("*Twist*") if p.is_dir())[0]
    source = read_source_series(dce)
    assert len(source.sop_instance_uids) == GRID["grid_shape"][2]
    axis, a = np.array([0.3, 1.0, 0.5]) / np.linalg.norm([0.3, 1.0, 0.5]), np.radians(30.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.7, 2.3, 4.1])
    aff[:3, 3] = [-20.5, 31.25, -44.0]
    vol = np.random.default_rng(0).normal(0, 300, (20, 14, 5)).astype(np.float32)
    folder = tmp_path / "dicom" / "201.000000-SYNTHETIC test"
    files = write_derived_series(
        vol, aff, folder, source, series_number=201, description="SYNTHETIC test", derivation="test 0.0"
    )
    assert [f.name for f in files] == [f"1-{i:02d}.dcm" for i in range(1, 6)]
    arr, aff_back = _read_back(folder)
    assert np.abs(aff_back - aff).max() < 1e-4
    ds = pydicom.dcmread(files[0])
    assert ds.PixelRepresentation == 1 and np.abs(arr - vol).max() <= float(ds.RescaleSlope)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    np.testing.assert_allclose(
        iop, [*(np.diag([-1, -1, 1]) @ rot[:, 0]), *(np.diag([-1, -1, 1]) @ rot[:, 1])], atol=1e-6
    )
    assert np.sort(np.abs(iop[:3]))[-1] < 0.95  # truly oblique: the row direction is off every axis
    assert ds.StudyInstanceUID == pydicom.dcmread(next(dce.glob("*.dcm"))).StudyInstanceUID
    # never over an existing series; a failed write leaves no temporary folder
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_derived_series(vol, aff, folder, source, series_number=201, description="SYNTHETIC test", derivation="")
    with pytest.raises(ValueError, match="left-handed"):
        write_derived_series(
            vol,
            aff @ np.diag([1, 1, -1, 1]),
            tmp_path / "dicom" / "x",
            source,
            series_number=1,
            description="SYNTHETIC x",
            derivation="",
        )
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "dicom" / "y") as tmp:
            (tmp / "a").write_text("a")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == [folder.name]


@pytest.mark.realdata
def test_resdce_on_prostatex(prostatex_study, tmp_path):
    """ProstateX-0218 (70 DCE time points, oblique): ingest without registration on a 96 x 96 x 8 crop
    (about 13 s on 2 cores; the full ingest with registration takes about 37 s), one sampling step."""
    ckpt = _tiny_checkpoint("resdce", tmp_path / "resdce.pt")
    out = tmp_path / "out"
    before = _listing(prostatex_study)
    summary = synthesize(
        prostatex_study,
        "resdce",
        out,
        ingest={"crop_size": "96,96,8", "register": False},
        ckpt_path=str(ckpt),
        num_inference_steps=1,
        device="cpu",
    )
    manifest = json.loads((Path(summary["prepared_case"]) / "manifest.json").read_text())
    pre = manifest["dce"]["series"][manifest["dce"]["phases"]["pre"]["index"]]["folder"]
    grid_files = sorted((prostatex_study / pre).glob("*.dcm"))
    grid = [pydicom.dcmread(f, stop_before_pixels=True) for f in grid_files]
    src_uid = grid[0].StudyInstanceUID
    for s in summary["series"]:
        arr, aff = _read_back(Path(s["folder"]))
        vol, aff_nii = load_nifti(s["nifti"])
        assert arr.shape == vol.shape == (96, 96, 8) and np.abs(aff - aff_nii).max() < 1e-4
        rot = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
        assert np.abs(rot - np.diag(np.diag(rot))).max() > 1e-3  # ProstateX-0218 is oblique
        ds = pydicom.dcmread(sorted(Path(s["folder"]).glob("*.dcm"))[0])
        assert np.abs(arr - vol).max() <= float(ds.RescaleSlope)
        assert ds.StudyInstanceUID == src_uid and ds.SeriesDescription.startswith("SYNTHETIC DCE")
        assert ds.PatientID == grid[0].PatientID and ds.FrameOfReferenceUID == grid[0].FrameOfReferenceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {g.SOPInstanceUID for g in grid}
    # iterunet on the same prepared case (ingest reused): the delayed frames of the real 70-frame series,
    # picked at the bundle's prostate offsets after arrival (its README: two predicted frames, 156 and 224 s)
    it = synthesize(
        prostatex_study,
        "iterunet",
        out,
        ingest={"crop_size": "96,96,8", "register": False},
        ckpt_path=str(_iterunet_checkpoint(tmp_path / "iterunet.pt")),
        device="cpu",
        progress=False,
    )
    assert it["seconds"]["ingest"] < 2.0 and len(it["series"]) >= 2
    vol4, aff_nii = load_nifti(it["series"][0]["nifti"])
    for s in it["series"]:
        arr, aff = _read_back(Path(s["folder"]))
        ds = pydicom.dcmread(sorted(Path(s["folder"]).glob("*.dcm"))[0])
        assert np.abs(aff - aff_nii).max() < 1e-4 and np.abs(arr - vol4[..., s["frame"]]).max() <= float(
            ds.RescaleSlope
        )
        assert ds.StudyInstanceUID == src_uid and ds.SeriesDescription.startswith(
            f"SYNTHETIC DCE {s['key']} (iterU-Net"
        )
        assert (
            list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
            and ds.FrameOfReferenceUID == grid[0].FrameOfReferenceUID
        )
    assert _listing(prostatex_study) == before  # the real study was only read
