"""BraTS 2023 folder layout for D3M: ``<root>/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

- :func:`brats_datalist`: one section of ``<root>/datalist.json`` when the folder has one (the
  phantoms and ``scripts/prepare_brain.py`` write it); otherwise the case folders are scanned and
  split 80/10/10 with a fixed seed (sorted case names, so every run and every bundle command gets
  the same split), and the split is written to ``datalist_file`` (by default beside the bundle's
  outputs, never into the data folder).
- :func:`brats_case_or_datalist`: one BraTS case folder (``--case_dir``) or a datalist section.
- :class:`BratsMasksd`: ``et`` (the ET mask in {-1, +1}), ``tumour`` and ``brain`` (0/1) from the
  seg / a brain-mask file / the T1 support; a seg without any ET label -> ``ValueError`` naming it.
- :class:`SliceWeightd`: per-voxel sampling weight (brain 1, tumour ``tumour_weight``) for
  ``RandWeightedCropd`` slices: slices without brain are never drawn, tumour slices over-sampled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from common.data.datalist import HOW_TO_MAKE_BRAIN_DATA, case_folder, load_datalist

__all__ = [
    "BRATS_KEYS",
    "BratsMasksd",
    "SliceWeightd",
    "brats_case_or_datalist",
    "brats_datalist",
    "brats_entry",
    "split_cases",
]

BRATS_KEYS = ("t1n", "t1c", "t2w", "t2f", "seg")


def _meta_file(d: Mapping, key: Hashable) -> str:
    meta = getattr(d.get(key), "meta", None) or {}
    return str(meta.get("filename_or_obj", key))


def brats_entry(
    case_dir: str | os.PathLike,
    required: Sequence[str] = ("t1n", "t2w", "t2f"),
    optional: Sequence[str] = ("t1c", "seg", "brain_mask"),
) -> dict:
    """``{"id", key: absolute path}`` of one BraTS case folder; a missing required contrast raises
    ``FileNotFoundError`` naming the expected file."""
    case_dir = case_folder(case_dir)
    cid = case_dir.name
    entry: dict[str, Any] = {"id": cid}
    for key in (*required, *optional):
        f = case_dir / f"{cid}-{key}.nii.gz"
        if f.exists():
            entry[key] = str(f)
        elif key in required:
            raise FileNotFoundError(f"case {cid}: missing contrast {key}: expected {f}")
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


def brats_datalist(
    dataset_dir: str | os.PathLike,
    section: str,
    required_keys: Sequence[str] = ("t1n", "t2w", "t2f"),
    datalist_file: str | os.PathLike | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_cases: int | None = None,
) -> list[dict]:
    """One section of the BraTS folder ``dataset_dir`` (see the module docstring), absolute paths."""
    root = Path(dataset_dir).expanduser().resolve()
    if (root / "datalist.json").exists():
        return load_datalist(root, section, required_keys, max_cases=max_cases)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset at {root}. {HOW_TO_MAKE_BRAIN_DATA}")
    cases = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"{p.name}-*.nii.gz")))
    if not cases:
        raise FileNotFoundError(
            f"{root}: no BraTS case folders (<case>/<case>-t1n.nii.gz ...). {HOW_TO_MAKE_BRAIN_DATA}"
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
    items = [entries[c] for c in split.get(section, [])]
    if not items:
        raise ValueError(f"{root}: section {section!r} of the seeded split is empty ({len(cases)} cases)")
    return items[:max_cases] if max_cases else items


def brats_case_or_datalist(
    case_dir: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    section: str,
    required_keys: Sequence[str] = ("t1n", "t2w", "t2f"),
    datalist_file=None,
) -> list[dict]:
    """Inference input: one BraTS case folder if ``case_dir`` is given, else a datalist section."""
    if case_dir:
        return [brats_entry(case_dir, required_keys)]
    return brats_datalist(dataset_dir, section, required_keys, datalist_file)


class BratsMasksd(MapTransform):
    """From ``seg`` (1, H, W, D) BraTS labels: ``et`` = +1 where the label is in ``et_labels`` else -1,
    ``tumour`` = 1 where it is in ``tumour_labels``; ``brain`` = 1 inside ``brain_key``'s mask when
    given, else where ``reference_key`` > 0 (skull-stripped input; see docs for raw studies).

    Args:
        et_labels: BraTS 2023 GLI enhancing tumour is 3 (the released code used 2, oedema).
        tumour_labels: region of the tumour metrics (1 | 2 | 3).
        require_et: a seg without any ``et_labels`` voxel raises ``ValueError`` naming the file.
    """

    def __init__(
        self,
        seg_key: str = "seg",
        et_labels: Sequence[int] = (3,),
        tumour_labels: Sequence[int] = (1, 2, 3),
        reference_key: str = "t1n",
        brain_key: str = "brain_mask",
        require_et: bool = True,
    ) -> None:
        super().__init__([seg_key], allow_missing_keys=True)
        self.seg_key, self.reference_key, self.brain_key = seg_key, reference_key, brain_key
        self.et_labels, self.tumour_labels = [int(v) for v in et_labels], [int(v) for v in tumour_labels]
        self.require_et = bool(require_et)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        ref = d[self.reference_key]
        brain = d.get(self.brain_key)
        d["brain"] = ((brain if brain is not None else ref) > 0).to(torch.float32)
        seg = d.get(self.seg_key)
        if seg is not None:
            s = torch.round(torch.as_tensor(seg)).long()
            et = torch.isin(s, torch.tensor(self.et_labels))
            if self.require_et and not bool(et.any()):
                raise ValueError(
                    f"{_meta_file(d, self.seg_key)}: no enhancing-tumour voxel (labels {self.et_labels}); "
                    f"labels present: {sorted(torch.unique(s).tolist())}. Set et_labels to the ET label of your data"
                )
            d["et"] = et.to(torch.float32) * 2 - 1
            d["tumour"] = torch.isin(s, torch.tensor(self.tumour_labels)).to(torch.float32)
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
