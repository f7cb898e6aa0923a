#!/usr/bin/env python
"""Prepare PROSTATEx-style TCIA DICOM downloads as registered, cropped NIfTI cases + a datalist.

Usage::

    python scripts/prepare_prostatex.py --src <TCIA root or one patient folder> --out <dir>
        [--workers 4] [--overwrite] [--rules my_rules.json] [--mask <file or folder>]
        [--reference_role dce] [--reference_frame mean_pre] [--crop_size 160,160,16]
        [--phases '{"early": {"time_s": 120}}'] [--pre_source dce|t1_pre]
        [--max_translation_mm 10] [--max_rotation_deg 10] [--register True] [--native True]
        [--seed 0] [--fractions 0.8,0.1,0.1] [--log_level INFO]

Writes ``<out>/<patient>/`` per patient (layout: ``common/layout.py``), ``<out>/datalist.json``
(patient-level 80/10/10 split, seeded) and ``<out>/skipped.json`` (studies that could not be
ingested, with the reason). Patients with a finished case are skipped unless ``--overwrite``.
Exit status 1 when no case could be prepared.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from common.ingest import IngestConfig, IngestError, RegistrationSettings, prepare_dataset  # noqa: E402


def _ints(v, n=3) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [p for p in v.replace("x", ",").replace(" ", ",").split(",") if p]
    out = tuple(int(p) for p in v)
    if len(out) != n:
        raise ValueError(f"expected {n} integers, got {v!r}")
    return out


def _floats(v) -> tuple[float, ...]:
    if isinstance(v, str):
        v = [p for p in v.replace(" ", ",").split(",") if p]
    return tuple(float(p) for p in v)


def main(
    src: str,
    out: str,
    workers: int | None = None,
    overwrite: bool = False,
    rules: str | None = None,
    mask: str | None = None,
    mask_role: str | None = None,
    reference_role: str = "dce",
    reference_frame: str = "mean_pre",
    crop_size="160,160,16",
    phases=None,
    pre_source: str = "dce",
    early_delay_s: float = 60.0,
    arrival_mask: str = "enhancing",
    register: bool = True,
    max_translation_mm: float = 10.0,
    max_rotation_deg: float = 10.0,
    sampling_percentage: float = 0.15,
    iterations: int = 100,
    native: bool = True,
    seed: int = 0,
    fractions="0.8,0.1,0.1",
    progress: bool = True,
    log_level: str = "WARNING",
) -> None:
    """Ingest every patient below ``src`` into ``out`` (see the module docstring)."""
    logging.basicConfig(level=getattr(logging, str(log_level).upper(), logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    if isinstance(phases, str):
        phases = json.loads(phases)
    cfg = IngestConfig(
        rules=rules,
        reference_role=reference_role,
        reference_frame=reference_frame,
        phases=phases,
        early_delay_s=float(early_delay_s),
        pre_source=pre_source,
        arrival_mask=arrival_mask,
        crop_size=_ints(crop_size),
        mask=mask,
        mask_role=mask_role,
        register=bool(register),
        registration=RegistrationSettings(
            max_translation_mm=float(max_translation_mm),
            max_rotation_deg=float(max_rotation_deg),
            sampling_percentage=float(sampling_percentage),
            iterations=int(iterations),
        ),
        write_native=bool(native),
        overwrite=bool(overwrite),
    )
    workers = int(workers) if workers else min(4, os.cpu_count() or 1)
    try:
        summary = prepare_dataset(src, out, cfg, workers=workers, fractions=_floats(fractions), seed=int(seed), progress=bool(progress))
    except IngestError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"prepared {len(summary['prepared'])}, already there {len(summary['existing'])}, "
        f"skipped {len(summary['skipped'])} in {summary['seconds']:.1f} s"
    )
    for s in summary["skipped"]:
        print(f"  skipped {s['id']}: {s['reason']}")
    print(f"datalist: {summary['datalist']}")
    print(f"skipped list: {summary['skipped_json']}")
    if not summary["datalist"]:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
