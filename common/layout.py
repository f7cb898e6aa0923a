"""The prepared-case layout shared by the ingest, the phantoms and every bundle.

A *prepared case* is one folder per subject with NIfTI volumes that all share one grid (the
reference grid: the DCE grid by default), so a bundle can stack them as channels::

    <root>/<case_id>/
        t2w.nii.gz  adc.nii.gz  pd.nii.gz  t1_pre.nii.gz  [dwi_highb.nii.gz]
        dce.nii.gz            4D (x, y, z, t), all time points
        dce_times.json        {"times_s": [...]} seconds from the start of the dynamic series
        dce_pre.nii.gz  dce_onset.nii.gz  dce_early.nii.gz  dce_late.nii.gz   (3D phases)
        [organ_mask.nii.gz] [lesion_mask.nii.gz]
        manifest.json         what was found, chosen and ignored (ingest) or the ground truth (phantom)
    <root>/datalist.json      MONAI datalist: {"training": [...], "validation": [...], "test": [...]}

Each datalist entry maps these keys to paths relative to the datalist's folder, plus ``"id"``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from common.io import save_json

MODALITIES = ("t2w", "adc", "pd", "t1_pre", "dwi_highb")
PHASE_KEYS = ("dce_pre", "dce_onset", "dce_early", "dce_late")
MASK_KEYS = ("organ_mask", "lesion_mask")
DCE_4D = "dce"
DCE_TIMES = "dce_times.json"
MANIFEST = "manifest.json"
DATALIST = "datalist.json"


def case_entry(case_dir: str | os.PathLike, root: str | os.PathLike) -> dict[str, str]:
    """Datalist entry for one prepared case: every known NIfTI present, as a path relative to ``root``."""
    case_dir, root = Path(case_dir), Path(root)
    entry: dict[str, str] = {"id": case_dir.name}
    for key in (*MODALITIES, *PHASE_KEYS, *MASK_KEYS, DCE_4D):
        f = case_dir / f"{key}.nii.gz"
        if f.exists():
            entry[key] = os.path.relpath(f, root)
    return entry


def split_ids(ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[str]]:
    """Deterministic subject-level split into training/validation/test.

    The ids are sorted, shuffled with ``seed`` and cut by ``fractions``; every non-empty split gets at
    least one subject when there are enough subjects (validation and test before training).
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    return {
        "training": sorted(ids[:n_train]),
        "validation": sorted(ids[n_train : n_train + n_val]),
        "test": sorted(ids[n_train + n_val :]),
    }


def write_datalist(
    root: str | os.PathLike,
    case_dirs: Iterable[str | os.PathLike] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write ``<root>/datalist.json`` for the prepared cases below ``root`` (or ``case_dirs``).

    A case folder counts when it holds a ``manifest.json``. Returns the datalist path.
    """
    root = Path(root)
    if case_dirs is None:
        case_dirs = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    entries = {Path(c).name: case_entry(c, root) for c in case_dirs}
    if not entries:
        raise FileNotFoundError(f"{root}: no prepared cases (folders with {MANIFEST}) to list")
    split = split_ids(list(entries), fractions, seed)
    datalist: dict[str, object] = {k: [entries[i] for i in v] for k, v in split.items()}
    datalist["split"] = {"fractions": list(fractions), "seed": seed}
    if extra:
        datalist.update(extra)
    return save_json(datalist, root / DATALIST)
