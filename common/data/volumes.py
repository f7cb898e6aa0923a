"""Datalists for "any folder of volumes": one image per case, e.g. HR volumes for super-resolution.

A super-resolution bundle needs nothing but high-resolution (HR) volumes; the low-resolution input
is simulated from each one on the fly. :func:`volume_datalist` turns a folder into the MONAI
datalist section a bundle reads, in this order of preference:

1. ``<dataset_dir>/<datalist_file>`` (MONAI datalist format, e.g. the brain phantoms' or a user's
   own ``datalist.json``) when that file exists: its ``section``, the volume under ``key``
   (read with :func:`common.data.load_datalist`, so paths are absolute and checked);
2. otherwise every file matching the glob ``pattern`` below ``dataset_dir`` (sorted), split into
   training / validation / test at the case level with :func:`common.layout.split_ids`
   (ids sorted, shuffled with ``seed``, cut by ``fractions``: deterministic, and independent of the
   order the file system lists them in).

Case ids: the first folder below ``dataset_dir`` that holds the file (``phantom-000`` for
``phantom-000/t2w.nii.gz``, ``ProstateX-0218`` for ``ProstateX-0218/native/t2w.nii.gz``); when
files share that folder or lie directly in ``dataset_dir``, the relative path without the NIfTI
suffix, ``/`` replaced by ``_`` (``case7_t1``).

Nothing is written into ``dataset_dir``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from common.data.datalist import HOW_TO_MAKE_DATA, load_datalist
from common.layout import SECTIONS, split_ids

__all__ = ["SECTIONS", "find_volumes", "split_volumes", "volume_datalist", "volume_or_datalist"]

_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


def _stem(rel: str) -> str:
    for s in _SUFFIXES:
        if rel.endswith(s):
            return rel[: -len(s)]
    return rel


def find_volumes(dataset_dir: str | os.PathLike, pattern: str = "*/t2w.nii.gz") -> dict[str, str]:
    """``{case_id: absolute path}`` of the files below ``dataset_dir`` matching the glob ``pattern``.

    Raises ``FileNotFoundError`` (saying how to make data) when the folder does not exist or nothing
    matches. Ids: see the module docstring; they are unique by construction.
    """
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset at {root} (not a folder). {HOW_TO_MAKE_DATA}")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no volumes matching {pattern!r} below {root}. {HOW_TO_MAKE_DATA}")
    rels = [p.relative_to(root).as_posix() for p in files]
    ids = [r.split("/")[0] if "/" in r else "" for r in rels]
    if "" in ids or len(set(ids)) != len(ids):
        ids = [_stem(r).replace("/", "_") for r in rels]
    return {i: str(p) for i, p in zip(ids, files)}


def split_volumes(
    dataset_dir: str | os.PathLike,
    pattern: str = "*/t2w.nii.gz",
    key: str = "image",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[dict]]:
    """All three sections ``{"training", "validation", "test"}`` of a folder of volumes (glob + seeded split).

    Each entry is ``{"id": case_id, key: absolute path}``; entries are sorted by id within a section.
    """
    found = find_volumes(dataset_dir, pattern)
    split = split_ids(list(found), [float(f) for f in fractions], int(seed))
    return {section: [{"id": i, key: found[i]} for i in split[section]] for section in SECTIONS}


def volume_datalist(
    dataset_dir: str | os.PathLike,
    section: str = "training",
    key: str = "image",
    pattern: str = "*/t2w.nii.gz",
    datalist_file: str | None = "datalist.json",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_cases: int | None = None,
) -> list[dict]:
    """One section of the datalist of a folder of volumes: ``[{"id": ..., key: path}, ...]``.

    Args:
        dataset_dir: the folder.
        section: ``"training"``, ``"validation"`` or ``"test"``.
        key: datalist key of the volume (in a ``datalist_file``, and in the returned entries).
        pattern: glob below ``dataset_dir`` when no datalist file is used.
        datalist_file: name of a MONAI datalist in ``dataset_dir`` to prefer when present;
            ``""`` / ``None`` always globs.
        fractions, seed: the case-level split of globbed volumes (:func:`common.layout.split_ids`).
        max_cases: keep the first ``max_cases`` entries.

    Raises:
        ValueError when the section is empty (e.g. a single volume is all training), naming the size of
        each section and what to pass instead.
    """
    if section not in SECTIONS:
        raise ValueError(f"unknown datalist section {section!r}; choose from {SECTIONS}")
    root = Path(dataset_dir).expanduser().resolve()
    listed = root / datalist_file if datalist_file else None
    if listed is not None and listed.is_file():
        sections = json.loads(listed.read_text())
        first = next((e for s in SECTIONS for e in sections.get(s) or []), None)
        if first is not None and key not in first:
            raise KeyError(
                f"{listed}: entries have no {key!r} (keys: {sorted(first)}); pass the volume's key "
                f"(e.g. --volume_key {next((k for k in first if k != 'id'), key)}) or --datalist_file '' "
                "to glob --volume_pattern instead"
            )
        sizes = {s: len(sections.get(s) or []) for s in SECTIONS}
        if not sizes.get(section):
            raise ValueError(_empty(section, sizes, str(listed)))
        items = load_datalist(root, section, [key], datalist_file=datalist_file)
        items = [{**e, "id": e.get("id") or Path(e[key]).parent.name} for e in items]
    else:
        sections = split_volumes(root, pattern, key, fractions, seed)
        if not sections[section]:
            raise ValueError(_empty(section, {s: len(v) for s, v in sections.items()}, f"{root}/{pattern}"))
        items = sections[section]
    return items[:max_cases] if max_cases else items


def _empty(section: str, sizes: dict, where: str) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sizes.items())
    return (
        f"datalist section {section!r} of {where} is empty ({counts}); with so few volumes use "
        "--datalist_section training (inference/evaluation), --val_interval 0 (training), "
        "--input_file <volume> (one volume), or add volumes"
    )


def volume_or_datalist(
    input_file: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    section: str,
    key: str = "image",
    pattern: str = "*/t2w.nii.gz",
    datalist_file: str | None = "datalist.json",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    case_id: str = "",
) -> list[dict]:
    """Inference input: the single volume ``input_file`` if given, else :func:`volume_datalist`.

    A single file's id is ``case_id`` if given, else its file name without the NIfTI suffix, or the
    name of its folder when the file is named after the key (``<case>/t2w.nii.gz`` -> ``<case>``).
    """
    if not input_file:
        return volume_datalist(dataset_dir, section, key, pattern, datalist_file, fractions, seed)
    path = Path(input_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"input volume {path} does not exist")
    stem = _stem(path.name)
    cid = case_id or (path.parent.name if stem == key else stem)
    return [{"id": cid, key: str(path)}]
