"""BraTS 2023 folder layout for D3M: ``<root>/<case>/<prefix>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

- :data:`LABEL_SETS`, :func:`resolve_label_set`: the BraTS 2023 label conventions. ``brats_gli``
  (GLI, and the MET, SSA and MEN challenges: 1 NETC, 2 SNFH, 3 ET) and ``brats_peds`` (1 ET, 2 NET,
  3 CC, 4 ED); ``auto`` picks one per case from the BraTS 2023 name prefix (``BraTS-PED-`` -> peds,
  ``BraTS-GLI-`` / ``-MET-`` / ``-SSA-`` / ``-MEN-`` -> gli; other names -> gli).
- :func:`brats_entry`: one case folder of any name holding exactly one ``*-<key>.nii.gz`` per
  contrast (the folders as BraTS and BraSyn ship them, renamed or not).
- :func:`brats_datalist`: one section of ``<root>/datalist.json`` when the folder has one (the
  phantoms and ``scripts/prepare_brain.py`` write it); otherwise the case folders are scanned and
  split 80/10/10 with a fixed seed (sorted case names, so every run and every bundle command gets
  the same split), and the split is written to ``datalist_file`` (by default beside the bundle's
  outputs, never into the data folder). Section ``all``: every case (a BraSyn validation folder).
- :func:`brats_case_or_datalist`: one BraTS case folder (``--case_dir``) or a datalist section.
- :class:`BratsMasksd`: ``et`` (the ET mask in {-1, +1}; all -1 for a case without ET), ``tumour``
  and ``brain`` (0/1) from the seg / a brain-mask file / the T1 support; a seg label outside the
  case's label set -> ``ValueError`` naming the file, the labels found and the set.
- :class:`SliceWeightd`: per-voxel sampling weight (brain 1, tumour ``tumour_weight``) for
  ``RandWeightedCropd`` slices: slices without brain are never drawn, tumour slices over-sampled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from common.data.datalist import HOW_TO_MAKE_BRAIN_DATA, case_folder, load_datalist

__all__ = [
    "AUTO",
    "BRATS_KEYS",
    "BRATS_PREFIXES",
    "LABEL_SETS",
    "BratsMasksd",
    "LabelSet",
    "SliceWeightd",
    "brats_case_or_datalist",
    "brats_datalist",
    "brats_entry",
    "label_set_of",
    "log_label_sets",
    "resolve_label_set",
    "split_cases",
]

BRATS_KEYS = ("t1n", "t1c", "t2w", "t2f", "seg")
AUTO = "auto"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSet:
    """One BraTS label convention: ``names`` {label: name} (0 is background), the enhancing-tumour
    labels ``et`` and the labels of the whole tumour region ``tumour``."""

    name: str
    names: Mapping[int, str]
    et: tuple[int, ...]
    tumour: tuple[int, ...]

    @property
    def labels(self) -> tuple[int, ...]:
        return (0, *sorted(self.names))

    def describe(self) -> str:
        return f"{self.name} (" + ", ".join(f"{k} {v}" for k, v in sorted(self.names.items())) + ")"


#: The BraTS 2023 label sets (challenge papers): GLI, MET, SSA and MEN share one; PEDs has its own.
LABEL_SETS: dict[str, LabelSet] = {
    "brats_gli": LabelSet("brats_gli", {1: "NETC", 2: "SNFH", 3: "ET"}, et=(3,), tumour=(1, 2, 3)),
    "brats_peds": LabelSet("brats_peds", {1: "ET", 2: "NET", 3: "CC", 4: "ED"}, et=(1,), tumour=(1, 2, 3, 4)),
}
#: BraTS 2023 case-name prefixes and the label set ``auto`` gives them.
BRATS_PREFIXES: dict[str, str] = {
    "BraTS-GLI-": "brats_gli",
    "BraTS-MET-": "brats_gli",
    "BraTS-SSA-": "brats_gli",
    "BraTS-MEN-": "brats_gli",
    "BraTS-PED-": "brats_peds",
}
DEFAULT_LABEL_SET = "brats_gli"


def _check_label_set(label_set: str) -> str:
    name = str(label_set).strip().lower()
    if name != AUTO and name not in LABEL_SETS:
        raise ValueError(f"--label_set {label_set!r}: unknown; choose one of {[*LABEL_SETS, AUTO]}")
    return name


def resolve_label_set(label_set: str, *names: str | os.PathLike | None) -> tuple[str, str | None]:
    """``(label set name, matched prefix)`` for a case: ``label_set`` itself unless it is ``auto``;
    then the first BraTS 2023 prefix found at the start of any of ``names`` (file or case names;
    paths are reduced to their base name), else :data:`DEFAULT_LABEL_SET` and ``None``."""
    name = _check_label_set(label_set)
    if name != AUTO:
        return name, None
    for n in names:
        if not n:
            continue
        base = Path(str(n)).name
        for prefix, set_name in BRATS_PREFIXES.items():
            if base.startswith(prefix):
                return set_name, prefix
    return DEFAULT_LABEL_SET, None


def label_set_of(label_set: str, *names: str | os.PathLike | None) -> LabelSet:
    """The :class:`LabelSet` of a case (see :func:`resolve_label_set`)."""
    return LABEL_SETS[resolve_label_set(label_set, *names)[0]]


def _meta_file(d: Mapping, key: Hashable) -> str:
    meta = getattr(d.get(key), "meta", None) or {}
    return str(meta.get("filename_or_obj", key))


def _find(case_dir: Path, key: str) -> Path | None:
    """The one ``*-<key>.nii.gz`` (or ``.nii``) in ``case_dir``; ``None`` when there is none; two or
    more raise ``ValueError`` naming them."""
    found = sorted({*case_dir.glob(f"*-{key}.nii.gz"), *case_dir.glob(f"*-{key}.nii")})
    if len(found) > 1:
        raise ValueError(
            f"case folder {case_dir}: {len(found)} candidates for {key}: {', '.join(p.name for p in found)}; "
            f"keep one *-{key}.nii.gz per case folder"
        )
    return found[0] if found else None


def brats_entry(
    case_dir: str | os.PathLike,
    required: Sequence[str] = ("t1n", "t2w", "t2f"),
    optional: Sequence[str] = ("t1c", "seg", "brain_mask"),
) -> dict:
    """``{"id", key: absolute path}`` of one case folder of any name holding exactly one
    ``*-<key>.nii.gz`` per contrast (BraTS 2023 / BraSyn: ``BraTS-GLI-00001-000-t1n.nii.gz``).

    ``id`` is the folder name. A missing required contrast raises ``FileNotFoundError`` naming it
    (in a BraSyn test folder only T1c may be missing: D3M synthesises it); two files for one key
    raise ``ValueError`` naming both.
    """
    case_dir = case_folder(case_dir)
    cid = case_dir.name
    entry: dict[str, Any] = {"id": cid}
    for key in (*required, *optional):
        f = _find(case_dir, key)
        if f is not None:
            entry[key] = str(f)
        elif key in required:
            raise FileNotFoundError(
                f"case {cid}: missing input {key}: no *-{key}.nii.gz in {case_dir} (expected e.g. {cid}-{key}.nii.gz; "
                f"needed: {', '.join(required)})"
            )
    return entry


def split_cases(
    cases: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[str]]:
    """Seeded shuffle of the sorted names, then training/validation/test by ``fractions`` (each
    non-empty section gets at least one case when there are >= 3 cases)."""
    names = sorted(cases)
    order = np.random.default_rng(seed).permutation(len(names))
    names = [names[i] for i in order]
    n = len(names)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {
        "training": names[:n_train],
        "validation": names[n_train : n_train + n_val],
        "test": names[n_train + n_val :],
    }


SECTIONS = ("training", "validation", "test")


def _is_case_folder(p: Path) -> bool:
    return p.is_dir() and any(next(p.glob(f"*-{k}.nii*"), None) is not None for k in BRATS_KEYS)


def brats_datalist(
    dataset_dir: str | os.PathLike,
    section: str,
    required_keys: Sequence[str] = ("t1n", "t2w", "t2f"),
    datalist_file: str | os.PathLike | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_cases: int | None = None,
    label_set: str | None = None,
) -> list[dict]:
    """One section of the BraTS folder ``dataset_dir`` (see the module docstring), absolute paths;
    ``section`` ``all``: the cases of every section (of the datalist, each id once, or of the
    scanned folder). With ``label_set``, the label set of the section's cases is logged in one line
    (:func:`log_label_sets`)."""
    items = _brats_datalist(dataset_dir, section, required_keys, datalist_file, seed, fractions, max_cases)
    if label_set is not None:
        log_label_sets(items, label_set, section)
    return items


def log_label_sets(items: Sequence[Mapping], label_set: str, what: str = "", seg_key: str = "seg") -> str:
    """Log (INFO) and return one line: the label set each case of ``items`` gets, counted per set
    (``auto``: from the BraTS 2023 prefix of its seg file name, else of its id)."""
    counts: dict[tuple[str, str | None], int] = {}
    for it in items:
        key = resolve_label_set(label_set, it.get(seg_key), it.get("id"))
        counts[key] = counts.get(key, 0) + 1
    parts = [
        f"{n} x {name} (ET {'|'.join(map(str, LABEL_SETS[name].et))}, tumour "
        f"{'|'.join(map(str, LABEL_SETS[name].tumour))}; "
        + (f"prefix {prefix}" if prefix else ("no BraTS 2023 prefix" if _check_label_set(label_set) == AUTO else "set"))
        + ")"
        for (name, prefix), n in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
    ]
    line = f"label_set {label_set}: {len(items)} {what + ' ' if what else ''}case(s): " + ", ".join(parts)
    logger.info(line)
    return line


def _brats_datalist(dataset_dir, section, required_keys, datalist_file, seed, fractions, max_cases) -> list[dict]:
    root = Path(dataset_dir).expanduser().resolve()
    if (root / "datalist.json").exists():
        if section != "all":
            return load_datalist(root, section, required_keys, max_cases=max_cases)
        import json

        present = [s for s in SECTIONS if json.loads((root / "datalist.json").read_text()).get(s)]
        loaded = [it for s in present for it in load_datalist(root, s, required_keys)]
        items = list({str(it.get("id") or sorted(it.items())): it for it in loaded}.values())
        return items[:max_cases] if max_cases else items
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset at {root}. {HOW_TO_MAKE_BRAIN_DATA}")
    cases = sorted(p.name for p in root.iterdir() if _is_case_folder(p))
    if not cases:
        raise FileNotFoundError(
            f"{root}: no BraTS case folders (<case>/<case>-t1n.nii.gz ... or *-t1n.nii.gz). {HOW_TO_MAKE_BRAIN_DATA}"
        )
    entries = {c: brats_entry(root / c, required_keys) for c in cases}
    split = split_cases(cases, fractions, seed)
    if datalist_file:
        from common.io import save_json

        rel = {
            k: [{kk: (os.path.relpath(vv, root) if kk != "id" else vv) for kk, vv in entries[c].items()} for c in v]
            for k, v in split.items()
        }
        rel["split"] = {"fractions": list(fractions), "seed": seed, "root": str(root)}
        save_json(rel, datalist_file)
    names = cases if section == "all" else split.get(section, [])
    items = [entries[c] for c in names]
    if not items:
        raise ValueError(f"{root}: section {section!r} of the seeded split is empty ({len(cases)} cases)")
    return items[:max_cases] if max_cases else items


def brats_case_or_datalist(
    case_dir: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    section: str,
    required_keys: Sequence[str] = ("t1n", "t2w", "t2f"),
    datalist_file=None,
    target_key: str = "t1c",
    seg_key: str = "seg",
    label_set: str | None = None,
) -> list[dict]:
    """Inference input: one BraTS case folder if ``case_dir`` is given, else a datalist section.

    A case without its ``target_key`` (a BraSyn test case missing T1c) is synthesised, not scored:
    its seg, if any, is left out (the ET mask is scored together with the T1c it belongs to). With
    ``label_set``, the label sets of the cases with a seg are logged in one line."""
    items = (
        [brats_entry(case_dir, required_keys)]
        if case_dir
        else brats_datalist(dataset_dir, section, required_keys, datalist_file)
    )
    out = []
    for it in items:
        if not it.get(target_key) and it.get(seg_key):
            logger.info("case %s has no %s: synthesised; its %s is not scored", it.get("id"), target_key, seg_key)
            it = {k: v for k, v in it.items() if k != seg_key}
        out.append(it)
    with_seg = [it for it in out if it.get(seg_key)]
    if label_set is not None and with_seg:
        log_label_sets(with_seg, label_set, "scored", seg_key)
    return out


class BratsMasksd(MapTransform):
    """From ``seg`` (1, H, W, D) BraTS labels: ``et`` = +1 where the label is an enhancing-tumour
    label of the case's label set else -1 (all -1 for a case without ET: such cases train the mask
    decoder on "no ET here"), ``tumour`` = 1 inside the set's tumour region; ``brain`` = 1 inside
    ``brain_key``'s mask when given, else where ``reference_key`` > 0 (skull-stripped input; see the
    bundle docs for raw studies).

    Args:
        label_set: ``brats_gli`` (ET 3, tumour 1|2|3), ``brats_peds`` (ET 1, tumour 1|2|3|4) or
            ``auto`` (per case from the BraTS 2023 prefix of the seg file name or the case id, as
            :func:`log_label_sets` reports it once per run from the datalist; each distinct choice
            is also logged at DEBUG level, once per transform and process).
        et_labels, tumour_labels: override the label set's ET labels / tumour region (``None``: from
            ``label_set``; the released D3M code used 2, oedema, as ET).
        require_et: a seg without any ET voxel raises ``ValueError`` naming the file (off by default).

    A seg holding a label outside the case's label set raises ``ValueError`` naming the file, the
    labels found and the set: labels are never remapped silently.
    """

    def __init__(
        self,
        seg_key: str = "seg",
        et_labels: Sequence[int] | None = None,
        tumour_labels: Sequence[int] | None = None,
        reference_key: str = "t1n",
        brain_key: str = "brain_mask",
        require_et: bool = False,
        label_set: str = DEFAULT_LABEL_SET,
        id_key: str = "id",
    ) -> None:
        super().__init__([seg_key], allow_missing_keys=True)
        self.seg_key, self.reference_key, self.brain_key, self.id_key = seg_key, reference_key, brain_key, id_key
        self.label_set = _check_label_set(label_set)
        self.et_labels = None if et_labels is None else [int(v) for v in et_labels]
        self.tumour_labels = None if tumour_labels is None else [int(v) for v in tumour_labels]
        self.require_et = bool(require_et)
        self._logged: set[tuple] = set()

    def case_label_set(self, d: Mapping) -> LabelSet:
        """The label set of the case ``d`` (logged the first time each choice is made)."""
        seg_file, cid = _meta_file(d, self.seg_key), d.get(self.id_key)
        name, prefix = resolve_label_set(self.label_set, seg_file, cid)
        ls = LABEL_SETS[name]
        key = (name, prefix)
        if key not in self._logged:
            self._logged.add(key)
            et = self.et_labels if self.et_labels is not None else list(ls.et)
            tum = self.tumour_labels if self.tumour_labels is not None else list(ls.tumour)
            why = (
                f"label_set {self.label_set}"
                if self.label_set != AUTO
                else (f"label_set auto: prefix {prefix}" if prefix else "label_set auto: no BraTS 2023 prefix")
            )
            logger.debug(
                "%s -> %s; ET labels %s, tumour region %s (first case: %s)",
                why,
                ls.describe(),
                "|".join(map(str, et)),
                "|".join(map(str, tum)),
                cid or Path(seg_file).name,
            )
        return ls

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        ref = d[self.reference_key]
        brain = d.get(self.brain_key)
        d["brain"] = ((brain if brain is not None else ref) > 0).to(torch.float32)
        seg = d.get(self.seg_key)
        if seg is not None:
            ls = self.case_label_set(d)
            s = torch.round(torch.as_tensor(seg)).long()
            found = sorted(torch.unique(s).tolist())
            outside = [v for v in found if v not in ls.labels]
            if outside:
                raise ValueError(
                    f"{_meta_file(d, self.seg_key)}: labels {found} found, {outside} outside the label set "
                    f"{ls.describe()}; choose --label_set ({', '.join([*LABEL_SETS, AUTO])}) or fix the seg"
                )
            et_labels = self.et_labels if self.et_labels is not None else list(ls.et)
            tumour_labels = self.tumour_labels if self.tumour_labels is not None else list(ls.tumour)
            et = torch.isin(s, torch.tensor(et_labels))
            if self.require_et and not bool(et.any()):
                raise ValueError(
                    f"{_meta_file(d, self.seg_key)}: no enhancing-tumour voxel (labels {et_labels}); "
                    f"labels present: {found}. Set et_labels to the ET label of your data"
                )
            d["et"] = et.to(torch.float32) * 2 - 1
            d["tumour"] = torch.isin(s, torch.tensor(tumour_labels)).to(torch.float32)
            for k in ("et", "tumour"):
                if hasattr(seg, "copy_meta_from") or hasattr(seg, "meta"):
                    from monai.data import MetaTensor

                    d[k] = MetaTensor(d[k].as_tensor() if hasattr(d[k], "as_tensor") else d[k], meta=dict(seg.meta))
        return d


class SliceWeightd(MapTransform):
    """``name`` = ``brain_key`` + (tumour_weight - 1) * ``tumour_key`` (voxel weights; a slice is drawn
    with probability proportional to its sum)."""

    def __init__(
        self, brain_key: str = "brain", tumour_key: str = "et", tumour_weight: float = 5.0, name: str = "slice_weight"
    ) -> None:
        super().__init__([brain_key])
        self.brain_key, self.tumour_key, self.tumour_weight, self.name = (
            brain_key,
            tumour_key,
            float(tumour_weight),
            name,
        )

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        w = d[self.brain_key].clone().float()
        if d.get(self.tumour_key) is not None:
            w = w + (self.tumour_weight - 1.0) * (d[self.tumour_key] > 0).float()
        d[self.name] = w
        return d
