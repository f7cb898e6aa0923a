#!/usr/bin/env python
"""Prepare PROSTATEx-style TCIA DICOM downloads as registered, cropped NIfTI cases + a datalist.

Usage::

    python scripts/prepare_prostatex.py --src <TCIA root or one patient folder> --out <dir> [options]
    python scripts/prepare_prostatex.py --help      # every option with its default and help

The options are built from :class:`common.ingest.IngestConfig` (one per field, its default and its
``metadata["help"]``; ``write_native`` is ``--native``), four :class:`RegistrationSettings` fields
(``--max_translation_mm``, ``--max_rotation_deg``, ``--sampling_percentage``, ``--iterations``),
:func:`common.ingest.prepare_dataset`'s ``--workers``, ``--seed``, ``--fractions``, ``--progress``
(defaults from its signature) and ``--log_level``. Examples: ``--crop_size 160,160,16`` (or
``160x160x16``), ``--phases '{"early": {"time_s": 120}}'``, ``--pre_source t1_pre``,
``--register False``, ``--overwrite``, ``--fractions 0.8,0.1,0.1``; a study without an ADC series
gets its ADC fitted from a multi-b DWI (``--adc_min_b 50`` and ``--adc_max_b`` bound the b-values,
``--adc_source dwi`` fits it even where the scanner's ADC exists, ``--adc_source scanner`` never fits).

Writes ``<out>/<patient>/`` per patient (layout: ``common/layout.py``), ``<out>/datalist.json``
(patient-level split, seeded) and ``<out>/skipped.json`` (studies that could not be
ingested, with the reason). Patients with a finished case are skipped unless ``--overwrite``.
Exit status 1 when no case could be prepared.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import fire

from common.errors import install as install_error_hook
from common.ingest import IngestError, prepare_dataset
from common.ingest.options import OPTIONS, parse_options
from common.io import output_folder


def main(src: str, out: str, **values: Any) -> None:
    output_folder(out, "out")  # a file or read-only folder is named before any work
    cfg, dataset, script = parse_options(**values)
    level = getattr(logging, str(script["log_level"]).upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_dataset(src, out, cfg, **dataset)
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
    for section, ids in summary.get("placed", {}).items():
        print(f"  placed in {section}: {', '.join(ids)}")
    print(f"skipped list: {summary['skipped_json']}")
    if not summary["datalist"]:
        sys.exit(1)


def _describe_main() -> None:
    """Give :func:`main` the signature and docstring of :data:`OPTIONS` (read by fire and ``help()``)."""
    P = inspect.Parameter
    params = [P("src", P.POSITIONAL_OR_KEYWORD, annotation=str), P("out", P.POSITIONAL_OR_KEYWORD, annotation=str)]
    params += [P(o.name, P.KEYWORD_ONLY, default=o.default) for o in OPTIONS]
    main.__signature__ = inspect.Signature(params, return_annotation=None)
    lines = [
        "Ingest every patient below ``src`` into ``out`` (see the module docstring).",
        "",
        "Args:",
        "    src: TCIA root, one patient folder or one study folder.",
        "    out: dataset folder written.",
    ]
    lines += [f"    {o.name}: {o.help}" for o in OPTIONS]
    main.__doc__ = "\n".join(lines) + "\n"


_describe_main()


if __name__ == "__main__":
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    fire.Fire(main)
