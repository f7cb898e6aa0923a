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

import dataclasses
import inspect
import json
import logging
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from common.bundle import flag  # noqa: E402
from common.errors import install as install_error_hook  # noqa: E402
from common.ingest import IngestConfig, IngestError, RegistrationSettings, prepare_dataset  # noqa: E402
from common.io import output_folder  # noqa: E402

#: IngestConfig fields whose option has another name (kept from the first version of this script).
RENAMED = {"write_native": "native"}
#: the RegistrationSettings fields exposed (IngestConfig.registration itself is not one option); their help.
REGISTRATION_HELP = {
    "max_translation_mm": "bound on the rigid registration's translation (mm); a larger move is an error.",
    "max_rotation_deg": "bound on the rigid registration's total rotation angle (degrees); a larger one is an error.",
    "sampling_percentage": "fraction of the voxels the Mattes mutual information samples (at least min_samples).",
    "iterations": "most iterations of the gradient-descent optimizer.",
}
#: prepare_dataset's parameters exposed (defaults from its signature); their help.
DATASET_HELP = {
    "workers": "worker processes (None: min(4, CPU count)).",
    "fractions": "training, validation, test fractions of the patient-level split.",
    "seed": "seed of the split.",
    "progress": "show a progress bar.",
}
#: options of this script only.
SCRIPT_OPTIONS = {"log_level": ("WARNING", "logging level (DEBUG, INFO, WARNING, ERROR).")}


class Option(NamedTuple):
    """One command-line option: ``target`` is ``"config"``, ``"registration"``, ``"dataset"`` or ``"script"``,
    ``key`` the field / parameter it sets, ``convert`` turns the command-line value into that field's value."""

    name: str
    default: Any
    help: str
    target: str
    key: str
    convert: Callable[[Any], Any]


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


def _mapping(v):
    """A JSON object given as text (or already parsed by fire) -> dict; None stays None."""
    if isinstance(v, str):
        v = json.loads(v)
    return None if v is None else dict(v)


def _is_mapping(hint) -> bool:
    return any(
        isinstance(t, type) and issubclass(t, Mapping) for t in (typing.get_origin(hint), *typing.get_args(hint))
    )


def _optional_float(name: str) -> Callable[[Any], float | None]:
    def convert(v: Any) -> float | None:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number or None, got {v!r}") from None

    return convert


def _converter(name: str, default: Any, hint: Any = None) -> Callable[[Any], Any]:
    """How the command-line value of option ``name`` becomes a field value, from the field's default and type."""
    if default is None and hint is not None and set(typing.get_args(hint)) == {float, type(None)}:
        return _optional_float(name)
    if isinstance(default, bool):
        return lambda v: flag(v, name)
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, tuple) and default and all(isinstance(x, int) for x in default):
        return lambda v: _ints(v, len(default))
    if isinstance(default, tuple):
        return _floats
    if isinstance(default, Mapping) or _is_mapping(hint):
        return _mapping
    if isinstance(default, str):
        return str
    return lambda v: v  # None default (paths, optional roles, rules): as given


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _build_options() -> list[Option]:
    """Every option, in ``--help`` order: dataset (workers), IngestConfig fields, registration, dataset, script."""
    hints = typing.get_type_hints(IngestConfig)
    dataset = inspect.signature(prepare_dataset).parameters
    reg = {f.name: f for f in dataclasses.fields(RegistrationSettings)}

    def ds(key: str) -> Option:
        d = dataset[key].default
        return Option(
            key,
            d,
            DATASET_HELP[key],
            "dataset",
            key,
            (lambda v: int(v) if v else None) if d is None else _converter(key, d),
        )

    out = [ds("workers")]
    for f in dataclasses.fields(IngestConfig):
        if f.name == "registration":
            continue
        name = RENAMED.get(f.name, f.name)
        d = _default(f)
        out.append(Option(name, d, f.metadata["help"], "config", f.name, _converter(name, d, hints[f.name])))
    for key, help in REGISTRATION_HELP.items():
        d = _default(reg[key])
        out.append(Option(key, d, help, "registration", key, _converter(key, d)))
    out += [ds(k) for k in DATASET_HELP if k != "workers"]
    out += [Option(k, d, h, "script", k, str) for k, (d, h) in SCRIPT_OPTIONS.items()]
    return out


#: the command-line options (defaults and help from IngestConfig, RegistrationSettings, prepare_dataset).
OPTIONS: list[Option] = _build_options()


def parse_options(**values: Any) -> tuple[IngestConfig, dict[str, Any], dict[str, Any]]:
    """Option values (missing ones take their defaults) -> ``(IngestConfig, prepare_dataset kwargs, script options)``."""
    parts: dict[str, dict[str, Any]] = {"config": {}, "registration": {}, "dataset": {}, "script": {}}
    known = {o.name: o for o in OPTIONS}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} (known: {sorted(known)})")
    for o in known.values():
        parts[o.target][o.key] = o.convert(values.get(o.name, o.default))
    cfg = IngestConfig(**parts["config"], registration=RegistrationSettings(**parts["registration"]))
    return cfg, parts["dataset"], parts["script"]


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
