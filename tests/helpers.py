"""Helpers shared by the bundle tests (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

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


def check_bundle_configs(configs: Path, ids_by_files) -> dict:
    """Every ``(files, ids)`` pair: the config files (names in ``configs``) parse together and define
    every id; ``metadata.json`` has a changelog line for its version and validates against the Model
    Zoo schema (when ``../shared`` is present). Returns the metadata."""
    import json

    from monai.bundle import ConfigParser

    for files, ids in ids_by_files:
        p = ConfigParser()
        p.read_config([str(configs / f) for f in files])
        missing = [i for i in ids if i not in p]
        assert not missing, f"{missing} missing from {files}"
    meta = json.loads((configs / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], f"version {meta['version']} has no changelog line"
    if SCHEMA.exists():
        import jsonschema

        jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    return meta


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(configs: Path, output_dir: Path, *overrides: str) -> dict:
    """``torchrun --nproc_per_node 2`` on train.json + multi_gpu_train.json (gloo on a CPU) for 2
    iterations; asserts the final model and the resumable checkpoint exist and returns the latter."""
    import torch

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
    assert (output_dir / "model.pt").exists()
    state = torch.load(output_dir / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2
    return state


def bundle_here(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle *args`` run in this process: the same command-line parsing (fire, as
    ``monai/bundle/__main__.py``) and the same ``monai.bundle.scripts`` code, without paying ~7 s of
    interpreter and MONAI start-up per call. Returns stdout/stderr like :func:`bundle`; raises on error.
    The subprocess form (:func:`bundle`) stays the one each bundle's main test uses."""
    import contextlib
    import io
    import logging

    import fire
    from monai.bundle import scripts

    out, err = io.StringIO(), io.StringIO()
    root_handlers = list(logging.getLogger().handlers)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            fire.Fire({"run": scripts.run}, command=list(args))
    finally:  # logging.conf adds a console handler on the (redirected) stdout: take it away again
        logging.getLogger().handlers[:] = root_handlers
    return subprocess.CompletedProcess(list(args), 0, out.getvalue(), err.getvalue())
