#!/usr/bin/env python
"""Prepare one raw brain MRI study (T1, T2, FLAIR[, T1c]; NIfTI, each on its own grid) as a
BraTS-layout case for the D3M bundle: T2, FLAIR and T1c rigidly registered onto the T1 grid.

Usage::

    python scripts/prepare_brain.py --src ../shared/data/brain/TCGA-FG-6692 --out data/brain_prepared
        [--case TCGA-FG-6692] [--t1 t1.nii.gz] [--t2 t2.nii.gz] [--flair flair.nii.gz] [--t1c t1c.nii.gz]
        [--seg seg.nii.gz] [--brain_mask mask.nii.gz] [--register True]
        [--max_translation_mm 25] [--max_rotation_deg 20]

File names are relative to ``--src``. Writes ``<out>/<case>/<case>-{t1n,t2w,t2f,t1c}.nii.gz`` (+ seg /
brain_mask when given) and ``registration.json``; the bundle reads ``<out>`` with
``--dataset_dir <out>`` (training needs a seg with the ET label) or one case with ``--case_dir``.
Not skull-stripped (that needs model weights): pass ``--brain_mask`` when you have one.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from common.errors import install as install_error_hook
from common.ingest.brain import brain_settings, check_out_outside, prepare_brain_case
from common.io import output_folder


def main(
    src: str,
    out: str,
    case: str = "",
    t1: str = "t1.nii.gz",
    t2: str = "t2.nii.gz",
    flair: str = "flair.nii.gz",
    t1c: str = "t1c.nii.gz",
    seg: str = "",
    brain_mask: str = "",
    register: bool = True,
    max_translation_mm: float = 25.0,
    max_rotation_deg: float = 20.0,
) -> dict:
    output_folder(out, "out")  # a file or read-only folder is named before any work
    check_out_outside(src, out)  # nested too, not only equal
    srcp = Path(src).expanduser().resolve()
    opt = lambda f: str(srcp / f) if f else None  # noqa: E731
    t1c_path = opt(t1c)
    if t1c_path and not Path(t1c_path).exists() and t1c == "t1c.nii.gz":
        t1c_path = None  # the default T1c is optional (inference-only case)
    res = prepare_brain_case(
        srcp / t1,
        srcp / t2,
        srcp / flair,
        out,
        case or srcp.name,
        t1c=t1c_path,
        seg=opt(seg),
        brain_mask=opt(brain_mask),
        settings=brain_settings(max_translation_mm, max_rotation_deg),
        register=str(register).lower() not in ("0", "false", "no"),
    )
    print(json.dumps(res["files"], indent=1))
    return res


if __name__ == "__main__":
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    fire.Fire(main)
