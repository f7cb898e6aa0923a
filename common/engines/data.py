"""Dataset lists, bundle location and checkpoints: the small glue every bundle config calls."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from monai.data import load_decathlon_datalist

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
    with open(path) as f:
        sections = json.load(f)
    if section not in sections:
        raise KeyError(f"{path}: no section {section!r}; sections are {sorted(k for k in sections if isinstance(sections[k], list))}")
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
    return items[:max_cases] if max_cases else items


def bundle_root(name: str) -> str:
    """Absolute path of a bundle folder, independent of the working directory.

    The folder of the ``--config_file`` given to ``python -m monai.bundle run`` wins (its parent's
    parent, when that holds ``configs/metadata.json``), so a bundle copied out of this repository
    works where it lies; otherwise ``bundles/<name>`` of the repository this package lives in.
    """
    argv = " ".join(sys.argv)
    for match in re.finditer(r"([^\s'\"\[\],=]+/configs/[^\s'\"\[\],]+\.(?:json|yaml|yml))", argv):
        root = Path(match.group(1)).expanduser().resolve().parent.parent
        if (root / "configs" / "metadata.json").exists():
            return str(root)
    return str(Path(__file__).resolve().parents[2] / "bundles" / name)


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> str:
    """Newest resumable checkpoint in ``folder`` (by the iteration/epoch number in its name), or ``""``."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""

    def number(p: Path) -> int:
        nums = re.findall(r"=(\d+)", p.name)
        return int(nums[-1]) if nums else -1

    files = sorted(folder.glob(pattern), key=lambda p: (number(p), p.stat().st_mtime))
    return str(files[-1]) if files else ""


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


def check_checkpoint(path: str | os.PathLike) -> str:
    """Fail early, saying what to do, when the trained weights are missing."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"no trained weights at {path}: train the bundle first (python -m monai.bundle run training "
            f"--config_file <bundle>/configs/train.json) or pass --ckpt_path <model.pt>"
        )
    return str(path)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", "none", ""}


def flag(value, name: str = "flag") -> bool:
    """A config switch as a bool, whether it came from JSON (``true``) or the command line.

    ``python -m monai.bundle run ... --resume false`` hands the config the *string* ``"false"``,
    which Python reads as true; every boolean a user may override is read through this function.

    Raises:
        ValueError for anything that is not a recognisable yes/no, naming ``name`` and the value.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")
