"""Bad inputs stop with one clear message naming the file or setting (issue: reliability)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import helpers as h
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from common.data import load_datalist
from common.io import save_nifti
from common.transforms import CheckSameGridd

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("t2w", "adc", "dce_pre", "dce_onset", "dce_early", "dce_late")


def _affine(shift=(0.0, 0.0, 0.0), flip_x=False):
    a = np.array([[1.6, 0.1, 0.0, -120.0], [-0.1, 1.6, 0.2, -80.0], [0.0, -0.2, 3.6, 10.0], [0, 0, 0, 1]])
    if flip_x:
        a[:3, 0] *= -1
    a[:3, 3] += shift
    return a


def _case(root: Path, cid: str = "case-0", adc_affine=None) -> Path:
    rng = np.random.default_rng(0)
    case = root / cid
    for k in KEYS:
        aff = adc_affine if (k == "adc" and adc_affine is not None) else _affine()
        save_nifti(rng.random((16, 16, 4)).astype(np.float32) + 1.0, aff, case / f"{k}.nii.gz")
    return case


@pytest.mark.parametrize(
    "adc_affine, what", [(_affine(shift=(15.0, -10.0, 7.0)), "shifted"), (_affine(flip_x=True), "x axis flipped")]
)
def test_misaligned_input_is_named_before_any_work(tmp_path, adc_affine, what):
    case = _case(tmp_path, adc_affine=adc_affine)
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / "resdce" / "configs" / f) for f in ("train.json", "inference.json")])
    p["case_dir"] = str(case)
    pre = p.get_parsed_content("preprocessing")
    item = p.get_parsed_content("datalist")[0]
    with pytest.raises(Exception) as e:
        pre(item)
    text = "".join(str(x) for x in (e.value, e.value.__cause__))
    assert str(case / "adc.nii.gz") in text and "not on the grid of" in text and "dce_pre.nii.gz" in text, (what, text)
    # the aligned case passes
    good = _case(tmp_path / "good")
    p["case_dir"] = str(good)
    out = pre(p.get_parsed_content("datalist")[0])
    assert tuple(out["image"].shape) == (3, 16, 16, 4)


def test_same_grid_shape_mismatch_and_tolerance():
    ref = MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.as_tensor(_affine()))
    ok = MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.as_tensor(_affine(shift=(0.05, 0, 0))))
    CheckSameGridd(["a", "b"], "a", atol_mm=0.1)({"a": ref, "b": ok})  # 0.05 mm: float rounding of headers
    small = MetaTensor(torch.zeros(1, 8, 7, 4), affine=torch.as_tensor(_affine()))
    with pytest.raises(ValueError, match=r"grid \(8, 7, 4\) differs"):
        CheckSameGridd(["a", "b"], "a")({"a": ref, "b": small})
    # a 0.01 rotation of the direction shows up as ~0.1 mm x extent at the far corner
    rot = _affine()
    rot[:3, :3] = rot[:3, :3] @ np.array([[1, -0.01, 0], [0.01, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="differ by up to"):
        CheckSameGridd(["a", "b"], "a")(
            {"a": ref, "b": MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.as_tensor(rot))}
        )


def _datalist(tmp_path: Path, content: str) -> Path:
    (tmp_path / "datalist.json").write_text(content)
    return tmp_path


def test_datalist_errors_name_the_file(tmp_path):
    _case(tmp_path)
    path = tmp_path / "datalist.json"
    entry = {"id": "case-0", **{k: f"case-0/{k}.nii.gz" for k in KEYS}}
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON \(line 1"):
        load_datalist(_datalist(tmp_path, '{"training": [,]}'))
    with pytest.raises(ValueError, match=rf"{path}: expected an object of sections .* got a list"):
        load_datalist(_datalist(tmp_path, json.dumps([entry])))
    with pytest.raises(ValueError, match=rf"{path}: section 'test' is empty"):
        load_datalist(_datalist(tmp_path, json.dumps({"training": [entry], "test": []})), "test")
    with pytest.raises(ValueError, match=r"lists the case id\(s\) \['case-0'\] more than once"):
        load_datalist(_datalist(tmp_path, json.dumps({"training": [entry, entry]})))
    assert [e["id"] for e in load_datalist(_datalist(tmp_path, json.dumps({"training": [entry]})))] == ["case-0"]


# --- settings and files that stop a run before any work, each with one line (common.errors) ---


def _raised(parser: ConfigParser, id_: str) -> str:
    """The one line a user sees when resolving ``id_`` fails (what ``common.errors``' hook prints)."""
    from common.errors import user_message

    with pytest.raises(Exception) as e:
        parser.get_parsed_content(id_)
    message = user_message(e.value)
    assert message is not None, f"not a one-line user error: {e.value!r}"
    assert "\n" not in message, message
    return message


def _parser(bundle: str, file: str = "inference.json", **overrides) -> ConfigParser:
    p = ConfigParser()
    files = ["train.json", file] if file == "inference.json" else [file]  # inference.json stacks on train.json
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in files])
    for k, v in overrides.items():
        p[k] = v
    return p


@pytest.mark.parametrize("bundle", ["resdce", "dcediff", "ressrdiff", "iterunet", "d3m"])
def test_run_stops_before_work_with_one_line(tmp_path, bundle):
    case = _case(tmp_path / "data")
    before = h.tree_digest(case)
    out = tmp_path / "out"
    common = {"case_dir": str(case), "output_dir": str(out), "ckpt_path": str(tmp_path / "missing.pt")}
    # a device this machine does not have: not the silent CUDA -> CPU fallback, not torch's AssertionError
    msg = _raised(_parser(bundle, **common, device="cuda:7"), "evaluating")
    assert msg.startswith("--device cuda:7: "), msg
    assert "CUDA is not available" in msg or "CUDA device(s)" in msg, msg
    msg = _raised(_parser(bundle, **common, device="gpu0"), "evaluating")
    assert msg.startswith("--device 'gpu0': not a device"), msg
    # output folder that is a file / lies under a file: found before the network is built
    (tmp_path / "a_file").write_text("x")
    msg = _raised(_parser(bundle, **{**common, "output_dir": str(tmp_path / "a_file")}, device="cpu"), "evaluating")
    assert (
        msg == f"--output_dir {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a folder; give a folder path"
    )
    msg = _raised(
        _parser(bundle, **{**common, "output_dir": str(tmp_path / "a_file" / "x")}, device="cpu"), "evaluating"
    )
    assert "is a file, not a folder" in msg
    # no weights: named, with the command that makes them
    msg = _raised(_parser(bundle, **common, device="cpu"), "evaluating")
    assert msg.startswith(f"no trained weights at {tmp_path / 'missing.pt'}: train the bundle first"), msg
    # a truncated checkpoint
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    msg = _raised(_parser(bundle, **{**common, "ckpt_path": str(tmp_path / "broken.pt")}, device="cpu"), "evaluating")
    assert msg.startswith(f"cannot read the checkpoint {tmp_path / 'broken.pt'}: "), msg
    assert not out.exists() or not any(out.iterdir()), "nothing may be written when a run stops before work"
    assert h.tree_digest(case) == before, "inputs must be unchanged"


def test_unwritable_output_message(tmp_path, monkeypatch):
    """The permission path of ``output_folder`` (also where the tests run as root)."""
    import tempfile

    from common.io import output_folder

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", deny)
    with pytest.raises(
        PermissionError, match=rf"^--out {tmp_path}: cannot write into this folder \(permission denied\)$"
    ):
        output_folder(tmp_path, "out")


@pytest.mark.parametrize("bundle", ["resdce", "ressrdiff", "dcediff"])
def test_sampling_settings_below_one_are_refused(bundle):
    for steps in (0, -3, 2.5):
        msg = _raised(_parser(bundle, num_inference_steps=steps), "inferer")
        assert msg == f"--num_inference_steps: expected a whole number >= 1, got {steps!r}", msg
    msg = _raised(_parser(bundle, num_samples=0), "inferer")
    assert msg == "--num_samples: expected a whole number >= 1, got 0", msg


@pytest.mark.parametrize("bundle", ["resdce", "dcediff", "ressrdiff", "iterunet", "d3m"])
def test_training_settings_below_one_are_refused(bundle):
    for key, value in (("num_iterations", 0), ("epoch_length", 0), ("num_iterations", -5)):
        msg = _raised(_parser(bundle, "train.json", **{key: value}), "epochs")
        assert msg == f"--{key}: expected a whole number >= 1, got {value!r}", msg
    if bundle in ("resdce", "dcediff", "ressrdiff"):
        for value in (0, -4):
            msg = _raised(_parser(bundle, "train.json", batch_size=value), "slice_batching")
            assert msg == f"--batch_size: expected a whole number >= 1, got {value!r}", msg


@pytest.mark.parametrize("bundle, extra", [("resdce", {}), ("dcediff", {})])
def test_patch_larger_than_image_is_refused(tmp_path, bundle, extra):
    from common.errors import user_message

    p = _parser(bundle, "train.json", **extra)
    keys = p.get_parsed_content("input_keys") + p.get_parsed_content("target_keys")
    keys += [k for k in (p.get_parsed_content("target_load_keys") if "target_load_keys" in p else []) if k not in keys]
    rng = np.random.default_rng(0)
    for k in keys:
        save_nifti(rng.random((16, 16, 4)).astype(np.float32) + 1.0, _affine(), tmp_path / "case-0" / f"{k}.nii.gz")
    entry = {"id": "case-0", **{k: f"case-0/{k}.nii.gz" for k in keys}}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))

    def first_patch(patch_size):
        p = _parser(bundle, "train.json", dataset_dir=str(tmp_path), patch_size=patch_size, **extra)
        return p.get_parsed_content("train#preprocessing")(p.get_parsed_content("train#datalist")[0])[0]

    with pytest.raises(Exception) as e:
        first_patch([256, 256])
    msg = user_message(e.value)
    assert msg is not None and msg.startswith("--patch_size [256, 256]: larger than the image "), msg
    assert "spatial shape (16, 16, 4)" in msg and "use at most [16, 16]" in msg, msg
    # a patch that fits, and the whole-slice default, pass
    assert tuple(first_patch([8, 8])["image"].shape[1:]) == (8, 8)
    assert tuple(first_patch([-1, -1])["image"].shape[1:]) == (16, 16)


def test_truncated_nifti_is_named(tmp_path):
    case = _case(tmp_path)
    path = case / "adc.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    p = _parser("resdce", case_dir=str(case))
    pre = p.get_parsed_content("preprocessing")
    with pytest.raises(Exception) as e:
        pre(p.get_parsed_content("datalist")[0])
    from common.errors import user_message

    msg = user_message(e.value)
    assert msg == (
        f"{path} (adc): cannot be read (EOFError: Compressed file ended before the end-of-stream marker was "
        "reached); is it truncated, or not an image?"
    ), msg


def test_bundle_run_ends_with_one_line_and_debug_shows_the_traceback(tmp_path):
    """The real command line: ``python -m monai.bundle run`` prints the message alone (exit 1);
    ``GADOFREE_DEBUG=1`` gives Python's traceback."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str([str(ROOT / "bundles/resdce/configs" / f) for f in ("train.json", "inference.json")]),
    ]
    cmd += ["--device", "cuda:7", "--output_dir", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-2].startswith("error: --device cuda:7: "), res.stderr[-2000:]
    assert lines[-1] == "(set GADOFREE_DEBUG=1 for the full traceback)"
    assert "Traceback" not in res.stderr


def test_debug_flag_and_bugs_keep_the_traceback(monkeypatch, capsys):
    from common import errors

    def user_error():
        from common.bundle import positive_int

        try:
            positive_int(0, "batch_size")
        except ValueError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e

    try:
        user_error()
    except RuntimeError as e:
        exc = e
    errors._hook(type(exc), exc, exc.__traceback__)
    assert capsys.readouterr().err == (
        "error: --batch_size: expected a whole number >= 1, got 0\n(set GADOFREE_DEBUG=1 for the full traceback)\n"
    )
    monkeypatch.setenv("GADOFREE_DEBUG", "1")
    errors._hook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "Failed to evaluate ConfigExpression" in err
    monkeypatch.delenv("GADOFREE_DEBUG")
    # an error raised outside this package (a bug, or a library's message) keeps its traceback
    try:
        {}["x"]
    except KeyError as e:
        exc = e
    assert errors.user_message(exc) is None
    try:
        int("x")
    except ValueError as e:
        exc = e
    assert errors.user_message(exc) is None


def test_split_is_stable_when_studies_are_added(tmp_path, caplog):
    """35 single-study additions to an ingest output never move a case (the reshuffle once moved
    22 of 35 held-out cases); the new ones keep the 0.8/0.1/0.1 shares."""
    import logging

    from common.layout import DATALIST, MANIFEST, split_ids, write_datalist

    def add_case(cid):
        (tmp_path / cid).mkdir()
        (tmp_path / cid / MANIFEST).write_text("{}")
        save_nifti(np.ones((2, 2, 2), np.float32), np.eye(4), tmp_path / cid / "t2w.nii.gz")

    def sections():
        d = json.loads((tmp_path / DATALIST).read_text())
        return {e["id"]: k for k in ("training", "validation", "test") for e in d[k]}

    for i in range(10):
        add_case(f"P{i:03d}")
    write_datalist(tmp_path)
    first = sections()
    assert first == {i: k for k, v in split_ids([f"P{i:03d}" for i in range(10)]).items() for i in v}
    history = dict(first)
    for i in range(10, 45):
        add_case(f"P{i:03d}")
        with caplog.at_level(logging.INFO, logger="common.layout"):
            write_datalist(tmp_path)
        now = sections()
        assert {c: now[c] for c in history} == history, f"a case moved when P{i:03d} was added"
        assert f"P{i:03d}" in caplog.text and "new case(s) placed in" in caplog.text
        history = now
    counts = {k: sum(v == k for v in history.values()) for k in ("training", "validation", "test")}
    assert counts == {"training": 36, "validation": 5, "test": 4} or counts == {
        "training": 36,
        "validation": 4,
        "test": 5,
    }
    # a removed case is dropped with a warning; other settings re-split everything, with a warning
    import shutil

    shutil.rmtree(tmp_path / "P003")
    with caplog.at_level(logging.WARNING, logger="common.layout"):
        write_datalist(tmp_path)
    assert "no longer prepared, dropped: P003" in caplog.text and "P003" not in sections()
    with caplog.at_level(logging.WARNING, logger="common.layout"):
        write_datalist(tmp_path, seed=1)
    assert "split settings changed" in caplog.text


def test_two_evaluations_into_one_folder_merge(tmp_path, caplog):
    """The second evaluation into a folder keeps the first one's cases (it once kept only its own),
    a case scored again replaces its rows, and the summary counts every case."""
    import logging

    from common.handlers.metrics import report, score_case
    from common.metrics import read_case_csv

    rng = np.random.default_rng(0)

    def rows(cid, offset):
        target = rng.random((2, 12, 12, 2)).astype(np.float32)
        out = []
        for name, pred in (("model", target + offset), ("copy", target * 0.5)):
            out += [{"case": cid, "method": name, **r} for r in score_case(pred, target, {}, ["early", "late"])]
        return out

    report(rows("A", 0.01), tmp_path, "model", ["copy"])
    with caplog.at_level(logging.WARNING):
        summary = report(rows("B", 0.02), tmp_path, "model", ["copy"])
    assert "kept 1 case(s) of an earlier evaluation in this folder (A)" in caplog.text
    cases = sorted({r["case"] for r in read_case_csv(tmp_path / "metrics.csv")})
    assert cases == ["A", "B"]
    assert {r["n"] for r in summary["table"]} == {2}
    first_psnr = [
        r["psnr"] for r in read_case_csv(tmp_path / "metrics.csv") if r["case"] == "A" and r["method"] == "model"
    ]
    # A scored again with another prediction replaces A's rows, B is kept
    summary = report(rows("A", 0.2), tmp_path, "model", ["copy"])
    again = read_case_csv(tmp_path / "metrics.csv")
    assert sorted(
        r["case"] for r in again if r["method"] == "model" and r["phase"] == "early" and r["region"] == "whole"
    ) == ["A", "B"]
    new_psnr = [r["psnr"] for r in again if r["case"] == "A" and r["method"] == "model"]
    assert len(new_psnr) == len(first_psnr) and max(new_psnr) < min(first_psnr)
    assert {r["n"] for r in summary["table"]} == {2}


def test_scripts_refuse_an_out_that_is_a_file_or_inside_the_source(tmp_path):
    """``--out`` naming a file stops before any work with one line (no FileExistsError traceback);
    an ``--out`` inside the DICOM source is refused (the source is never written into)."""
    import subprocess
    import sys

    from common.ingest import IngestError
    from common.ingest.pipeline import prepare_dataset

    (tmp_path / "file").write_text("x")
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_phantoms.py"),
            "--out",
            str(tmp_path / "file"),
            "--kinds",
            "brain",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-2:] == [
        f"error: --out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder; give a folder path",
        "(set GADOFREE_DEBUG=1 for the full traceback)",
    ], res.stderr[-2000:]
    (tmp_path / "src").mkdir()
    with pytest.raises(
        IngestError, match=r"--out .*/src/prepared lies inside --src .*src: the source studies are never written"
    ):
        prepare_dataset(tmp_path / "src", tmp_path / "src" / "prepared")
    assert not (tmp_path / "src" / "prepared").exists()


def test_mask_of_another_shape_stops_before_outputs(tmp_path):
    """A lesion mask of another shape is named by the pre-processing, before a case's outputs are
    written (the scoring used to find it only after writing them)."""
    case = _case(tmp_path)
    save_nifti(np.zeros((16, 15, 4), np.float32), _affine(), case / "lesion_mask.nii.gz")
    p = _parser("resdce", case_dir=str(case))
    item = p.get_parsed_content("datalist")[0]
    assert item.get("lesion_mask"), item
    with pytest.raises(Exception) as e:
        p.get_parsed_content("preprocessing")(item)
    from common.errors import user_message

    msg = user_message(e.value)
    assert msg == (
        f"{case / 'lesion_mask.nii.gz'} (lesion_mask): grid (16, 15, 4) differs from {case / 'dce_pre.nii.gz'} "
        "(dce_pre) (16, 16, 4); every volume of a case must be on one grid (re-run the ingest)"
    ), msg


# --- scripts/prepare_brain.py (issue 25) ----------------------------------------------------------


def _prepare_brain(*args: str):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GADOFREE_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_brain.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _one_line(res) -> str:
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-2]], res.stderr
    assert lines[-1] == "(set GADOFREE_DEBUG=1 for the full traceback)"
    return lines[-2][len("error: ") :]


def _raw_brain(folder: Path) -> dict[str, str]:
    """t1/t2/flair NIfTI files of a tiny phantom head; returns name -> digest of every file."""
    from common.phantoms.brain import make_brain_phantom

    ph = make_brain_phantom(seed=[0, 1, 0], shape=(24, 28, 20))
    folder.mkdir(parents=True)
    for name, key in (("t1", "t1n"), ("t2", "t2w"), ("flair", "t2f")):
        save_nifti(ph.images[key].astype(np.float32), ph.affine, folder / f"{name}.nii.gz")
    return h.tree_digest(folder)


def test_prepare_brain_refuses_an_out_nested_in_src_and_a_text_file_as_t2(tmp_path):
    import re

    from scripts.prepare_brain import main  # the command's own function; one run below goes through the command

    src = tmp_path / "study"
    before = _raw_brain(src)
    msg = _one_line(_prepare_brain("--src", str(src), "--out", str(src / "prepared")))  # one line, exit 1
    assert msg.startswith(f"--out {src / 'prepared'} lies inside --src {src}: outputs never go into the source folder")
    for out in (src, src / "a" / "b"):
        with pytest.raises(Exception, match=re.escape(f"--out {out} lies inside --src {src}: outputs never go into")):
            main(str(src), str(out))
    (src / "notes.txt").write_text("T2 was not exported\n")
    with pytest.raises(Exception, match=re.escape(f"t2 file {src / 'notes.txt'}: cannot be read as an image")):
        main(str(src), str(tmp_path / "out"), t2="notes.txt")
    assert not any((tmp_path / "out").rglob("*-t2w.nii.gz"))
    (src / "notes.txt").unlink()
    assert h.tree_digest(src) == before  # the source is never written into


def test_a_choice_between_two_t1_series_is_said_on_the_console(tmp_path, caplog):
    """A second T1 series (flipped, half intensity, fewer slices): the rule picks one and one warning
    line says which, why, and which was left (not only in the manifest)."""
    import logging

    import pydicom

    from common.ingest.brain import select_brain_series
    from common.phantoms.brain import make_brain_phantom
    from common.phantoms.dicom import series_folder_name, tilted_affine, write_brain_study, write_series

    ph = make_brain_phantom(seed=[0, 1, 0], shape=(24, 28, 20))
    patient = write_brain_study(ph, tmp_path / "src", "TWO_T1")
    study_dir = next(patient.iterdir())
    ds = pydicom.dcmread(next((study_dir / series_folder_name(2, "t1_se_tra")).glob("*.dcm")), stop_before_pixels=True)
    study = {k: getattr(ds, k) for k in ("PatientID", "StudyDate", "StudyInstanceUID", "FrameOfReferenceUID")}
    affine = tilted_affine(ph.affine, ph.seg.shape, 10.0)
    write_series(
        0.5 * ph.images["t1n"][::-1, :, :12],
        affine,
        study_dir / series_folder_name(9, "t1_se_tra_flipped"),
        study={**study, "StudyDescription": "MR brain", "uid_seed": "TWO_T1|flipped"},
        series_number=9,
        description="t1_se_tra_flipped",
    )
    with caplog.at_level(logging.WARNING, logger="common.ingest.brain"):
        sel = select_brain_series(patient)
    said = [r.getMessage() for r in caplog.records if "T1 series" in r.getMessage()]
    assert len(said) == 1, said
    chosen = sel.picked["t1"][0].label
    assert (
        said[0].startswith(f"TWO_T1: 2 T1 series: using {chosen!r} (most slices (20)")
        and "t1_se_tra_flipped" in said[0]
    )
