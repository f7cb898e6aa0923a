"""Atomic, geometry-preserving file output.

Every file the project writes goes to a temporary file in the destination folder first and is then
renamed into place (``os.replace`` is atomic on POSIX), so an interrupted run never leaves a
half-written NIfTI, JSON or PNG behind, and an existing input is never overwritten by accident.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``, on error remove it.

    Args:
        path: final destination.
        protect: input files that must never be overwritten; naming one of them as ``path`` raises
            ``FileExistsError`` before anything is written.
    """
    path = Path(path)
    for p in protect:
        if Path(p).exists() and path.exists() and os.path.samefile(p, path):
            raise FileExistsError(f"refusing to overwrite input file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep .nii.gz so writers pick the format from the name
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before it takes the name: a crash leaves old or new, never half
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(
    final: str | os.PathLike,
    overwrite: bool = False,
    hint: str = "remove it or choose another output folder",
    sweep_stale: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder ``.tmp-<name>-<hex>`` beside ``final``; when the block completes,
    rename it to ``final``. On any error the temporary folder is removed, so a half-written folder
    never takes the name.

    Args:
        final: the folder to create.
        overwrite: replace an existing ``final`` (moved aside, then removed once the new one is in
            place); else an existing ``final`` is refused, before anything is written and again if
            it appeared meanwhile.
        hint: what to do, appended to the refusal.
        sweep_stale: first remove ``.tmp-<name>-*`` folders a killed run left beside ``final``.

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists: refusing to overwrite it ({hint})")
    final.parent.mkdir(parents=True, exist_ok=True)
    if sweep_stale:
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being written: refusing to overwrite it")
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def output_folder(path: str | os.PathLike, name: str = "output_dir") -> str:
    """Check that files can be written to ``path`` (or, when it does not exist yet, to the folder it
    will be created in), BEFORE any work is done; nothing is created.

    A run that would only find out after an hour of sampling that its output folder is a file, or is
    read-only, stops at once with one message naming the setting and the path.

    Args:
        path: the output folder.
        name: the setting it came from (``output_dir``, ``out``), named in the message.

    Returns:
        ``path`` as a string.

    Raises:
        NotADirectoryError / PermissionError naming ``--{name}`` and the path.
    """
    folder = Path(path).expanduser()
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"--{name} {path}: {p} is a file, not a folder; give a folder path")
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # created later, by the first write
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        raise PermissionError(f"--{name} {path}: cannot write into this folder (permission denied)") from None
    except OSError as e:
        raise PermissionError(f"--{name} {path}: cannot write into this folder ({e.strerror or e})") from None
    return str(path)


def lossless_dtype(x: np.ndarray, unsigned: bool = False):
    """The smallest NIfTI storage type that keeps ``x`` exactly: ``np.int16`` when it holds only integers
    in [-32768, 32767] (with ``unsigned``, ``np.uint16`` first when they are in [0, 65535], as scanner
    data are), else ``np.float32``."""
    x = np.asarray(x)
    if x.size and np.all(x == np.rint(x)):
        lo, hi = float(x.min()), float(x.max())
        if unsigned and lo >= 0 and hi <= 65535:
            return np.uint16
        if lo >= -32768 and hi <= 32767:
            return np.int16
    return np.float32


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    dtype: Any = np.float32,
    header: nib.Nifti1Header | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write ``array`` (x, y, z[, t]) with exactly ``affine`` (4x4, RAS+ mm) to ``path``, atomically.

    Both the qform and the sform are set to ``affine`` (code 1, scanner), so every reader, ITK and
    nibabel alike, sees the same oblique geometry.
    """
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine, header=header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, protect) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as ``(float32 array, 4x4 affine)``; a missing or unreadable file names itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine)
    except Exception as e:  # nibabel raises many types for a truncated or foreign file
        raise ValueError(f"{path}: cannot read NIfTI ({e})") from e


def save_json(obj: Any, path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays are converted)."""

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")

    with atomic_path(path, protect) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n")
    return Path(path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)
