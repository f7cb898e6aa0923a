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

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from common.io import save_json

MODALITIES = ("t2w", "adc", "pd", "t1_pre", "dwi_highb")
PHASE_KEYS = ("dce_pre", "dce_onset", "dce_early", "dce_late")
MASK_KEYS = ("organ_mask", "lesion_mask")
DCE_4D = "dce"
DCE_TIMES = "dce_times.json"
MANIFEST = "manifest.json"
DATALIST = "datalist.json"
SECTIONS = ("training", "validation", "test")


@dataclasses.dataclass(frozen=True)
class CaseManifest:
    """What a DICOM ingest wrote to ``<case>/manifest.json``, typed: the source study, the series of the
    case's grid, and the SeriesNumbers already used in the study (readers need no manifest internals).

    Attributes:
        source: the study folder the case was ingested from.
        grid_series: the folder of the DICOM series whose grid the case's volumes share (the DCE time
            point used as pre-contrast input for a prostate study, the T1 of a brain study), relative
            to ``source``.
        grid_series_uid: its SeriesInstanceUID where recorded (a folder may hold several series), else None.
        series_numbers: every SeriesNumber of the source study.
        data: the whole manifest.
    """

    source: Path
    grid_series: str
    grid_series_uid: str | None
    series_numbers: tuple[int, ...]
    data: Mapping[str, Any]

    @classmethod
    def read(cls, case_dir: str | os.PathLike) -> CaseManifest:
        """The manifest of the case folder ``case_dir`` (``ValueError`` naming the file when it lacks the
        reference grid: a phantom's manifest, or one written by an older ingest)."""
        path = Path(case_dir) / MANIFEST
        return cls.from_dict(json.loads(path.read_text()), path)

    @classmethod
    def from_dict(cls, m: Mapping[str, Any], path: str | os.PathLike = MANIFEST) -> CaseManifest:
        try:
            role = m["reference"]["role"]
            if role == "dce":
                tp = m["dce"]["series"][m["dce"]["phases"]["pre"]["index"]]
                label, number = tp["folder"], tp["series_number"]
                uid = next(
                    (
                        r.get("series_uid")
                        for r in m.get("series", [])
                        if r.get("folder") == label and r.get("series_number") == number
                    ),
                    None,
                )
            else:
                label, uid = m["roles"][role]["folder"], m["roles"][role].get("series_uid")
            source = Path(m["source"])
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}: not the manifest of a DICOM ingest (no reference grid: {e!r})") from None
        numbers = tuple(int(r["series_number"]) for r in m.get("series", []) if r.get("series_number") is not None)
        return cls(source, label.split("#")[0], uid, numbers, m)

    @property
    def grid_folder(self) -> Path:
        """The grid series' folder (absolute)."""
        return self.source / self.grid_series


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


def extend_split(
    previous: Mapping[str, Sequence[str]], ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Keep every case where an earlier split put it; place only the new ones.

    Adding studies to a prepared folder must never move a held-out case into training. Each new id
    (sorted) goes to the split furthest below its share ``fraction * n`` of the grown total
    (ties: test, then validation, then training), so repeated additions keep the fractions.

    Args:
        previous: ``{"training": [...], "validation": [...], "test": [...]}`` of the earlier datalist.
        ids: every case id present now (ids of ``previous`` no longer present are dropped).
        fractions: training/validation/test shares.

    Returns:
        ``(split, added)``: the new split and, per section, the ids placed in it now.
    """
    names = SECTIONS
    present = set(ids)
    split = {k: sorted(i for i in previous.get(k, []) if i in present) for k in names}
    known = {i for v in split.values() for i in v}
    added: dict[str, list[str]] = {k: [] for k in names}
    for i in sorted(present - known):
        n = sum(len(v) for v in split.values()) + 1
        deficit = {k: f * n - len(split[k]) for k, f in zip(names, fractions)}
        target = max(reversed(names), key=lambda k: deficit[k] if fractions[names.index(k)] > 0 else -1e9)
        split[target].append(i)
        added[target].append(i)
    return {k: sorted(v) for k, v in split.items()}, added


def write_datalist(
    root: str | os.PathLike,
    case_dirs: Iterable[str | os.PathLike] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """:func:`update_datalist`, returning only the path."""
    return update_datalist(root, case_dirs, fractions, seed, extra)[0]


def prepared_cases(root: str | os.PathLike) -> list[Path]:
    """The case folders below ``root`` that hold a ``manifest.json`` (hidden folders, e.g. a case still
    being written, left out), sorted."""
    return sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST}") if not p.parent.name.startswith("."))


def update_datalist_if_any(
    root: str | os.PathLike, fractions: Sequence[float], seed: int, extra: Mapping[str, object] | None = None
) -> tuple[Path | None, dict[str, list[str]]]:
    """:func:`update_datalist` over :func:`prepared_cases` of ``root``; ``(None, {})`` when there is none."""
    cases = prepared_cases(root)
    if not cases:
        return None, {}
    return update_datalist(root, cases, fractions=fractions, seed=seed, extra=extra)


def update_datalist(
    root: str | os.PathLike,
    case_dirs: Iterable[str | os.PathLike] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    extra: Mapping[str, object] | None = None,
) -> tuple[Path, dict[str, list[str]]]:
    """Write ``<root>/datalist.json`` for the prepared cases below ``root`` (or ``case_dirs``).

    A case folder counts when it holds a ``manifest.json``. When ``datalist.json`` exists already
    with the same ``fractions`` and ``seed``, every case keeps its section and only new cases are
    placed (:func:`extend_split`); what was added where is logged. Other settings re-split all cases
    (:func:`split_ids`) with a warning. Returns the datalist path and, per section, the ids placed
    in it by this call (every id, on a first or fresh split).
    """
    import json
    import logging

    log = logging.getLogger(__name__)
    root = Path(root)
    if case_dirs is None:
        case_dirs = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    entries = {Path(c).name: case_entry(c, root) for c in case_dirs}
    if not entries:
        raise FileNotFoundError(f"{root}: no prepared cases (folders with {MANIFEST}) to list")
    settings = {"fractions": [float(f) for f in fractions], "seed": seed}
    previous = None
    if (root / DATALIST).is_file():
        try:
            previous = json.loads((root / DATALIST).read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); splitting all cases anew", root / DATALIST, e)
    old = previous.get("split") if isinstance(previous, dict) else None
    if (
        isinstance(old, dict)
        and [float(f) for f in old.get("fractions", [])] == settings["fractions"]
        and old.get("seed") == seed
    ):
        ids_of = {k: [e["id"] for e in previous.get(k, []) if isinstance(e, dict) and "id" in e] for k in SECTIONS}
        split, added = extend_split(ids_of, list(entries), fractions)
        for k, v in added.items():
            if v:
                log.info("%s: %d new case(s) placed in %s: %s", root / DATALIST, len(v), k, ", ".join(v))
        gone = sorted({i for v in ids_of.values() for i in v} - set(entries))
        if gone:
            log.warning("%s: case(s) no longer prepared, dropped: %s", root / DATALIST, ", ".join(gone))
    else:
        if previous is not None:
            log.warning("%s: split settings changed (%s -> %s); all cases split anew", root / DATALIST, old, settings)
        split = split_ids(list(entries), fractions, seed)
        added = {k: list(v) for k, v in split.items()}
    datalist: dict[str, object] = {k: [entries[i] for i in v] for k, v in split.items()}
    datalist["split"] = settings
    if extra:
        datalist.update(extra)
    return save_json(datalist, root / DATALIST), added
