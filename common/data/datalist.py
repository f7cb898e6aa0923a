"""MONAI datalists of prepared cases: one section of ``datalist.json``, or one case folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from monai.data import load_decathlon_datalist

__all__ = ["HOW_TO_MAKE_DATA", "case_or_datalist", "load_datalist"]

HOW_TO_MAKE_DATA = (
    "Make the phantom data with `make phantoms` (or `python scripts/make_phantoms.py --out data/phantoms`), "
    "or prepare your own DICOM studies with `python scripts/prepare_prostatex.py --src <TCIA root> --out <dir>`, "
    "then pass `--dataset_dir <dir>` to the bundle command."
)


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
    """Inference input: one prepared case folder (``case_dir``, files ``<key>.nii.gz``) if given,
    else the ``section`` of the datalist in ``dataset_dir``."""
    if not case_dir:
        return load_datalist(dataset_dir, section, required_keys)
    from common.layout import case_entry

    case_dir = Path(case_dir).expanduser().resolve()
    if not case_dir.is_dir():
        raise FileNotFoundError(f"case folder {case_dir} does not exist")
    entry = case_entry(case_dir, case_dir.parent)
    entry = {k: (str(case_dir.parent / v) if k != "id" else v) for k, v in entry.items()}
    missing = [k for k in required_keys if k not in entry]
    if missing:
        raise FileNotFoundError(f"case {case_dir}: missing {', '.join(f'{k}.nii.gz' for k in missing)}")
    return [entry]
