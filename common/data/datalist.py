"""MONAI datalists of prepared cases: one section of ``datalist.json``, or one case folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from monai.data import load_decathlon_datalist

__all__ = ["HOW_TO_MAKE_BRAIN_DATA", "HOW_TO_MAKE_DATA", "case_folder", "case_or_datalist", "load_datalist"]

HOW_TO_MAKE_DATA = (
    "Make the phantom data with `make phantoms` (or `python scripts/make_phantoms.py --out data/phantoms`), "
    "or prepare your own DICOM studies with `python scripts/prepare_prostatex.py --src <TCIA root> --out <dir>`, "
    "then pass `--dataset_dir <dir>` to the bundle command."
)
#: the same for the brain bundle (d3m): BraTS-layout cases, not the prostate ingest
HOW_TO_MAKE_BRAIN_DATA = (
    "Make the brain phantoms with `python scripts/make_phantoms.py --out data/phantoms --kinds brain`, "
    "use BraTS 2023 case folders (<case>/<case>-t1n.nii.gz ...), or prepare a raw brain study with "
    "`python scripts/prepare_brain.py --src <study> --out <dir>`, then pass `--dataset_dir <dir>` to the bundle command."
)


def case_folder(case_dir: str | os.PathLike, option: str = "case_dir") -> Path:
    """``case_dir`` resolved, or ``FileNotFoundError`` naming ``--<option>`` when it does not exist or
    is a file (not a case folder)."""
    path = Path(case_dir).expanduser().resolve()
    if path.is_file():
        raise FileNotFoundError(f"--{option} {path} is a file, not a case folder (give the folder that holds it)")
    if not path.is_dir():
        raise FileNotFoundError(f"--{option} {path}: case folder does not exist")
    return path


def load_datalist(
    dataset_dir: str | os.PathLike,
    section: str = "training",
    required_keys: Sequence[str] = (),
    datalist_file: str = "datalist.json",
    max_cases: int | None = None,
) -> list[dict]:
    """Read one section of ``<dataset_dir>/<datalist_file>`` (MONAI datalist format), absolute paths.

    Raises a ``FileNotFoundError`` that says how to make a dataset when the folder or list is
    missing, and a ``KeyError`` naming the case and the modality when an entry lacks a required key
    or the file it names does not exist.
    """
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    path = dataset_dir / datalist_file
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {dataset_dir} (missing {datalist_file}). {HOW_TO_MAKE_DATA}")
    try:
        with open(path) as f:
            sections = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(sections, dict):
        raise ValueError(
            f'{path}: expected an object of sections {{"training": [...], "validation": [...], '
            f'"test": [...]}}, got a {type(sections).__name__}'
        )
    if section not in sections:
        raise KeyError(
            f"{path}: no section {section!r}; sections are {sorted(k for k in sections if isinstance(sections[k], list))}"
        )
    if not isinstance(sections[section], list) or not sections[section]:
        raise ValueError(
            f"{path}: section {section!r} is empty"
            if isinstance(sections[section], list)
            else f"{path}: section {section!r} is not a list of cases"
        )
    items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=section, base_dir=str(dataset_dir))
    # MONAI turns any value naming an existing path into an absolute path, a case id included
    # (its folder exists): keep ids verbatim
    for item, raw in zip(items, sections[section]):
        if "id" in raw:
            item["id"] = raw["id"]
    for item in items:
        cid = item.get("id", "?")
        for key in required_keys:
            if key not in item:
                raise KeyError(f"{path}: case {cid} has no {key!r} (the bundle needs {list(required_keys)})")
            if not Path(item[key]).exists():
                raise FileNotFoundError(f"{path}: case {cid}: {key} file {item[key]} does not exist")
    if not items:
        raise ValueError(f"{path}: section {section!r} is empty")
    ids = [str(item["id"]) for item in items if "id" in item]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:  # two entries with one id would write into one output folder and mix their metrics
        raise ValueError(f"{path}: section {section!r} lists the case id(s) {dups} more than once")
    return items[:max_cases] if max_cases else items


def case_or_datalist(
    case_dir: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    section: str,
    required_keys: Sequence[str],
) -> list[dict]:
    """Inference input: one prepared case folder (``case_dir``, files ``<key>.nii.gz``: every
    ``*.nii.gz`` of the folder under its name) if given, else the ``section`` of the datalist in
    ``dataset_dir``. A ``case_dir`` that is a file or does not exist is named (:func:`case_folder`)."""
    if not case_dir:
        return load_datalist(dataset_dir, section, required_keys)
    from common.layout import case_entry

    case_dir = case_folder(case_dir)
    entry = case_entry(case_dir, case_dir.parent)
    entry = {k: (str(case_dir.parent / v) if k != "id" else v) for k, v in entry.items()}
    # every other volume of the folder under its name (the breast layout's pre / breast_mask), so the
    # bundle's grid check and masks see what the datalist of the same folder would give it
    for f in sorted(case_dir.glob("*.nii.gz")):
        entry.setdefault(f.name[: -len(".nii.gz")], str(f))
    missing = [k for k in required_keys if k not in entry]
    if missing:
        raise FileNotFoundError(f"case {case_dir}: missing {', '.join(f'{k}.nii.gz' for k in missing)}")
    return [entry]
