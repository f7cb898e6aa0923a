#!/usr/bin/env python
"""Prepare breast DCE DICOM studies (TCIA Duke-Breast-Cancer-MRI, I-SPY, or any study with a pre-contrast and
post-contrast phases) as iterunet cases.

Usage::

    python scripts/prepare_breast.py --src <TCIA root, patient or study folder> --out data/breast_prepared
        [--rules my_breast_rules.json] [--resample true] [--breast_mask masks/] [--lesion_mask masks/]
        [--skip_bad false] [--overwrite false] [--seed 0] [--fractions "(0.8,0.1,0.1)"]

The phases come as one series per phase (Duke: ``ax dyn pre``, ``ax dyn 1st pass``, ...) or as one
multi-phase series (temporal positions); the series are recognised by ``common/ingest/breast_rules.json``
(copy, edit, pass with ``--rules``). Times are read from the DICOM tags (AcquisitionTime / TriggerTime /
ContentTime) in seconds after the pre-contrast phase and must be strictly increasing. A phase on another grid
than the pre-contrast phase is resampled onto it (``--resample false``: refused); a phase of another
orientation is refused. Writes ``<out>/<case>/{dce,pre[,breast_mask][,lesion_mask]}.nii.gz``,
``dce_times.json``, ``manifest.json`` and ``<out>/datalist.json`` (cases keep their split section when
studies are added). Masks: one NIfTI / DICOM SEG file for a single study, or a folder with ``<case>.nii.gz``,
``<case>/<name>.nii.gz`` or ``<case>/`` holding a DICOM SEG. A bad study stops the run with one line naming
it, its series and the problem (nothing written) unless ``--skip_bad true`` (listed in ``skipped.json``).

Then: ``python -m monai.bundle run training --config_file bundles/iterunet/configs/train.json
--dataset_dir <out>`` (training needs ``lesion_mask``).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from common.bundle import flag
from common.errors import install as install_error_hook
from common.ingest.breast import prepare_breast_dataset
from common.io import output_folder


def main(
    src: str,
    out: str,
    rules: str = "",
    resample: bool = True,
    breast_mask: str = "",
    lesion_mask: str = "",
    skip_bad: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    fractions: tuple = (0.8, 0.1, 0.1),
) -> None:
    output_folder(out, "out")  # a file or read-only folder is named before any work
    if not Path(src).is_dir():
        raise FileNotFoundError(f"--src {src}: not a folder")
    res = prepare_breast_dataset(
        src,
        out,
        rules=rules or None,
        resample=flag(resample, "resample"),
        breast_mask=breast_mask or None,
        lesion_mask=lesion_mask or None,
        fractions=tuple(float(f) for f in fractions),
        seed=int(seed),
        skip_bad=flag(skip_bad, "skip_bad"),
        overwrite=flag(overwrite, "overwrite"),
    )
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    fire.Fire(main)
