"""Helpers shared by the bundle tests (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bundle(*args: str, cwd: Path = ROOT, module: str | None = "monai.bundle") -> subprocess.CompletedProcess:
    """Run ``python -m <module> *args`` (a user's command line) in ``cwd``; fail the test with its output.

    One thread per process (``OMP_NUM_THREADS=1``): CI has two cores and some tests start two processes.
    ``module=None`` runs ``python *args`` (a script).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
EVAL_FILES = ("train.json", "inference.json", "evaluate.json")
# ids every bundle defines: train.json, train.json + multi_gpu_train.json, inference.json + evaluate.json
TRAIN_IDS = ("training", "run", "train#trainer", "validate#evaluator", "network_def")
MULTI_GPU_IDS = ("training", "network", "train#data_sampler")
EVAL_IDS = ("evaluating", "run", "evaluator", "inferer")
# the smallest settings of every bundle's training: small network, no loader workers; a short validation
SMALL = ["--network_size", "small", "--num_workers", "0"]
TINY_VAL = ["--val_num_inference_steps", "2", "--val_max_cases", "1"]


def config_file(configs: Path, *names: str) -> str:
    """The ``--config_file`` value of ``names`` in ``configs``: one path, or several stacked as ``"['a','b']"``."""
    if len(names) == 1:
        return str(configs / names[0])
    return "[" + ",".join(f"'{configs / n}'" for n in names) + "]"


def parser(configs: Path, *names: str, **overrides):
    """A ``ConfigParser`` of the config files ``names`` in ``configs`` (stacked in order), ``overrides`` set."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(configs / n) for n in names])
    for key, value in overrides.items():
        p[key] = value
    return p


def check_bundle_configs(configs: Path, train=(), evaluate=(), more=(), shared=()) -> dict:
    """The bundle's config files parse together and define their ids: ``train.json`` :data:`TRAIN_IDS` and
    ``train``; with ``multi_gpu_train.json`` :data:`MULTI_GPU_IDS`; ``inference.json`` + ``evaluate.json``
    :data:`EVAL_IDS` and ``evaluate``; every further ``(files, ids)`` of ``more``. The ``shared`` blocks are
    defined in ``train.json`` only (``inference.json`` is an overlay stacked on it); ``bundle_root`` is the bundle's folder;
    ``metadata.json`` has a changelog line for its version and validates against the Model Zoo schema
    (when ``../shared`` is present). Returns the metadata."""
    import json

    ids_by_files = (
        (["train.json"], [*TRAIN_IDS, *train]),
        (["train.json", "multi_gpu_train.json"], MULTI_GPU_IDS),
        (list(EVAL_FILES), [*EVAL_IDS, *evaluate]),
        *more,
    )
    for files, ids in ids_by_files:
        p = parser(configs, *files)
        missing = [i for i in ids if i not in p]
        assert not missing, f"{missing} missing from {files}"
    train_cfg, infer_cfg = (json.loads((configs / f).read_text()) for f in ("train.json", "inference.json"))
    for key in shared:  # defined once: in train.json, which inference.json stacks on
        assert key in train_cfg and key not in infer_cfg, key
    assert parser(configs, "train.json").get_parsed_content("bundle_root") == str(configs.parent)
    meta = json.loads((configs / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], f"version {meta['version']} has no changelog line"
    if SCHEMA.exists():
        import jsonschema

        jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    return meta


def tiny_phantoms(out: Path, kind: str, n: int, layout: str = "", **overrides) -> Path:
    """``n`` small phantom subjects of ``kind`` ("prostate", "brain", "breast"; without DICOM studies)
    written below ``out``; returns ``out/<kind>/<layout>`` (``layout``: "prepared", "nifti" or none)."""
    from common.phantoms import write_phantoms

    if kind in ("prostate", "brain"):
        overrides.setdefault("dicom", False)
    write_phantoms(out, kinds=(kind,), small=True, progress=False, **{f"n_{kind}": n}, **overrides)
    return out / kind / layout if layout else out / kind


def tiny_prostate_one_train(out: Path) -> Path:
    """3 tiny prepared prostate subjects (:func:`tiny_phantoms`) with the first (by id) to train and
    validate on and the other two held out (``test``); returns the prepared folder."""
    import json

    prepared = tiny_phantoms(out, "prostate", 3, "prepared")
    sections = json.loads((prepared / "datalist.json").read_text())
    cases = sorted((e for k in ("training", "validation", "test") for e in sections[k]), key=lambda e: e["id"])
    sections.update(training=cases[:1], validation=cases[:1], test=cases[1:])
    (prepared / "datalist.json").write_text(json.dumps(sections))
    return prepared


def held_out(data: Path) -> list[dict]:
    """The ``test`` section of ``data/datalist.json``."""
    import json

    return json.loads((data / "datalist.json").read_text())["test"]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def train(configs: Path, output_dir: Path, *overrides: str, iterations: int = 2, runner=None, **kw):
    """``monai.bundle run training`` on ``configs/train.json`` into ``output_dir`` for ``iterations``
    one-iteration epochs, through ``runner`` (:func:`bundle`, the default, or :func:`bundle_here`)."""
    args = ("--output_dir", str(output_dir), "--num_iterations", str(iterations), "--epoch_length", "1")
    return (runner or bundle)("run", "training", "--config_file", str(configs / "train.json"), *args, *overrides, **kw)


def evaluate(configs: Path, ckpt: Path, output_dir: Path, *overrides: str, files=EVAL_FILES, runner=None, **kw):
    """``monai.bundle run evaluating`` on the config ``files`` of ``configs`` (inference + evaluation by
    default) with the weights ``ckpt``, writing to ``output_dir``, through ``runner`` (as :func:`train`)."""
    cfg = config_file(configs, *files)
    args = ("--ckpt_path", str(ckpt), "--output_dir", str(output_dir))
    return (runner or bundle)("run", "evaluating", "--config_file", cfg, *args, *overrides, **kw)


def final_checkpoint(output_dir: Path, iteration: int) -> dict:
    """Asserts a training run wrote ``model.pt`` and ``checkpoints/checkpoint_final.pt`` at ``iteration``;
    returns the latter."""
    import torch

    ckpt = output_dir / "checkpoints" / "checkpoint_final.pt"
    assert (output_dir / "model.pt").exists() and ckpt.exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["trainer"]["iteration"] == iteration
    return state


def assert_restored(res: subprocess.CompletedProcess, source: str = "") -> None:
    """The run restored its state (a resumed training: from its own checkpoint, or ``from <source>``)."""
    assert f"Restored all variables{f' from {source}' if source else ''}" in res.stdout + res.stderr


def assert_same_grid(out_file: Path, ref, shape: tuple | None = None):
    """``out_file`` has the shape (``ref``'s, or ``shape``) and the affine of ``ref`` (a file or a loaded
    image) and finite values; returns it loaded."""
    import nibabel as nib
    import numpy as np

    out = nib.load(out_file)
    ref = nib.load(ref) if isinstance(ref, (str, Path)) else ref
    assert out.shape == (ref.shape if shape is None else shape) and np.array_equal(out.affine, ref.affine)
    assert np.isfinite(out.get_fdata()).all()
    return out


def check_dce_evaluation(out: Path, data: Path, ref: str, phases, methods) -> list[dict]:
    """A DCE bundle's evaluation of ``data``'s test cases in ``out``: every phase on the grid of the case's
    ``ref`` file, a panel per case, ``metrics.csv`` with ``methods`` (copying the pre-contrast misses all
    uptake inside the organ), nothing written into ``data``. Returns the metrics rows."""
    import pytest

    test_ids = [e["id"] for e in held_out(data)]
    for cid in test_ids:
        for name in phases:
            assert_same_grid(out / cid / f"{name}.nii.gz", data / cid / ref)
        assert (out / cid / "panel.png").exists()
    rows = read_csv(out / "metrics.csv")
    assert {r["method"] for r in rows} == set(methods)
    assert {r["region"] for r in rows} >= {"whole", "organ_mask"}
    copy_pre = [r for r in rows if r["method"] == "copy_pre" and r["region"] == "organ_mask"]
    assert all(float(r["enh_rel_err"]) == pytest.approx(1.0) for r in copy_pre)
    assert not (data / test_ids[0] / "panel.png").exists()  # the inputs were not touched
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(configs: Path, output_dir: Path, *overrides: str) -> dict:
    """``torchrun --nproc_per_node 2`` on train.json + multi_gpu_train.json (gloo on a CPU) for 2
    iterations; asserts the final model and the resumable checkpoint exist and returns the latter."""
    bundle(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']",
        "--output_dir",
        str(output_dir),
        "--num_iterations",
        "2",
        "--epoch_length",
        "1",
        *overrides,
        module=None,
    )
    return final_checkpoint(output_dir, 2)


def bundle_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle *args`` run in this process (in ``cwd`` when given): the same command-line
    parsing (fire, as ``monai/bundle/__main__.py``) and the same ``monai.bundle.scripts`` code, without
    paying ~7 s of interpreter and MONAI start-up per call. Returns stdout/stderr like :func:`bundle`;
    raises on error. The subprocess form (:func:`bundle`) stays the one each bundle's first training
    uses (the user's command line, its error hook); lines logged once per process
    (``common.device.log_precision_once``) may be missing from a run here."""
    import contextlib
    import io
    import logging

    import fire
    from monai.bundle import scripts

    out, err = io.StringIO(), io.StringIO()
    root_handlers = list(logging.getLogger().handlers)
    where = contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext()
    try:
        with where, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            fire.Fire({"run": scripts.run}, command=list(args))
    finally:  # logging.conf adds a console handler on the (redirected) stdout: take it away again
        logging.getLogger().handlers[:] = root_handlers
    return subprocess.CompletedProcess(list(args), 0, out.getvalue(), err.getvalue())


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder`` (``"dir"`` for folders): equal before and
    after a run when the run left the folder untouched."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def monailabel_task_class():
    """The MONAI Label app's ``BundleSynthesisTask``, imported from the app's own folder as MONAI Label
    loads it (pydicom's SOP class aliases set first, as ``serve.py`` does); skips without monailabel."""
    import pytest

    pytest.importorskip("monailabel")
    app = str(ROOT / "scripts" / "monailabel_app")
    sys.path.insert(0, app)
    try:
        from serve import alias_pydicom_sop_class_uids

        alias_pydicom_sop_class_uids()
        from lib.infers import BundleSynthesisTask
    finally:
        sys.path.remove(app)
    return BundleSynthesisTask
