"""The prostate ingest's options, one per :class:`IngestConfig` field (its default and ``metadata["help"]``;
``write_native`` is ``native``), four :class:`RegistrationSettings` fields, :func:`prepare_dataset`'s
``workers`` / ``seed`` / ``fractions`` / ``progress`` and ``log_level``: the command line of
``scripts/prepare_prostatex.py`` and the ``--ingest_<option>`` values of ``scripts/synthesize.py``
(:func:`parse_options`), written once."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from common.bundle import flag
from common.ingest.pipeline import IngestConfig, prepare_dataset
from common.ingest.register import RegistrationSettings

__all__ = ["OPTIONS", "Option", "parse_options"]

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
