#!/usr/bin/env python
"""One DICOM study in, synthetic series out as NIfTI and as DICOM series of the same study.

Usage::

    python scripts/synthesize.py --study <TCIA patient or study folder> --bundle resdce --out <dir> \\
        [--ckpt_path model.pt] [--num_inference_steps 4] [--device cpu] [--<bundle id> <value> ...] \\
        [--ingest_<option> <value> ...] [--case_id ID] [--first_series_number N]

Steps:

1. ingest the study with the project's ingest into ``<out>/prepared/<case>/`` (an existing case of the
   same study and settings is reused): a prostate study for resdce, dcediff and iterunet
   (:func:`common.ingest.ingest_study`; the options of ``scripts/prepare_prostatex.py`` as
   ``--ingest_<option>``, e.g. ``--ingest_crop_size 160,160,16``, ``--ingest_register false``), a brain
   study for d3m (:func:`common.ingest.brain.ingest_brain_study`: T1, T2, FLAIR and, when present, T1c
   found by :data:`common.ingest.rules.BRAIN_RULES_PATH`, registered onto the T1 grid; options
   :data:`BRAIN_INGEST_OPTIONS`, e.g. ``--ingest_rules my_rules.json``, ``--ingest_brain_mask mask.nii.gz``);
2. run the bundle's ``configs/inference.json`` on that case in this process (``monai.bundle``'s
   ``create_workflow``, as ``python -m monai.bundle run evaluating``); every other ``--key value`` is a
   config override of the bundle, typed as on the ``monai.bundle`` command line) ->
   ``<out>/<bundle>/<case>/<phase>.nii.gz`` and ``panel.png``;
3. write each synthetic phase as a DICOM MR series of the source study
   (:func:`common.dicom_out.write_derived_series`) on the exact grid of its NIfTI file ->
   ``<out>/<bundle>/<case>/dicom/<n>.000000-SYNTHETIC <phase> (<method> <version>)/1-01.dcm ...``,
   and ``<out>/<bundle>/<case>/synthesis.json`` (what was written, from what).

Which bundles it runs, and what it writes, comes from each bundle's ``configs/contract.json``
(:func:`common.bundle.read_contract`): the ingest its cases need (``prostate``, ``brain``; a bundle with
none is refused with the contract's reason), the overrides for an ingested study (``study_overrides``),
and its outputs: every output file the run wrote becomes a series ``SYNTHETIC <label> (<method>
<version>)`` (a ``<key>_std`` file, written with ``--num_samples`` > 1, one more), a 4D output one series
per frame (named and timed by the JSON file its ``frames`` entry names), a label map (``label_map``) a
DICOM Segmentation (SEG, :func:`common.dicom_out.write_segmentation`) referencing the source series.
The series of one run appear together or not at all (:func:`common.dicom_out.series_set`): a run
killed while writing leaves no series, and the rerun completes.

The source study folder is only read: an ``--out`` inside it is refused, and so is an output
folder that already holds the DICOM series of a complete earlier run. The series that the synthesis grid came
from (the ingest's reference grid: the DCE time point used as pre-contrast input, by default; the T1
of a brain study) gives the patient/study tags, the frame of reference and the ``SourceImageSequence``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from common.bundle import Contract, read_contract, run_bundle, workflow_files
from common.dicom_out import (
    read_source_series,
    series_folder_name,
    series_set,
    write_derived_series,
    write_segmentation,
)
from common.errors import DEBUG_ENV, user_message
from common.errors import install as install_error_hook
from common.ingest import IngestError, ingest_study
from common.ingest import case_id as clean_case_id
from common.ingest.brain import MAX_ROTATION_DEG, MAX_TRANSLATION_MM
from common.io import load_nifti, output_folder, save_json
from common.layout import MANIFEST, CaseManifest

log = logging.getLogger("synthesize")

#: ``--ingest_<option>`` of the brain ingest: option -> (type, default, meaning).
BRAIN_INGEST_OPTIONS = {
    "rules": (str, None, "series-to-role rules JSON (default common/ingest/brain_rules.json)"),
    "register": (bool, True, "rigid registration of T2, FLAIR, T1c onto T1 (false: scanner geometry only)"),
    "max_translation_mm": (float, MAX_TRANSLATION_MM, "registration bound (mm)"),
    "max_rotation_deg": (float, MAX_ROTATION_DEG, "registration bound (degrees)"),
    "brain_mask": (str, None, "a brain mask NIfTI in the T1's scanner space (default: T1 > 0, not skull-stripped)"),
    "overwrite": (bool, False, "ingest again even if the prepared case exists"),
}
#: bundle ids this script sets itself.
RESERVED = ("case_dir", "output_dir", "dataset_dir")
INGEST_PREFIX = "ingest_"
SYNTHETIC_NOTE = "Not an acquired contrast-enhanced image; research use only."


# ------------------------------------------------------------------------------------------
# command line


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--key", "value", "--k2=v2", ...]`` -> ``{"key": value, ...}``, values typed as
    ``python -m monai.bundle run`` types them (fire: ``4`` -> int, ``[96,96]`` -> list, text stays text).

    Raises:
        ValueError: a token that is not ``--key``, or a key without a value.
    """
    from fire.parser import DefaultParseValue

    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"unexpected argument {tok!r}: overrides are --<id> <value> pairs")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value (--{key} <value>)")
            value = tokens[i + 1]
            i += 1
        out[key] = DefaultParseValue(value)
        i += 1
    return out


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ingest options without the prefix, bundle overrides)`` from the ``--key value`` pairs."""
    ingest = {k[len(INGEST_PREFIX) :]: v for k, v in options.items() if k.startswith(INGEST_PREFIX)}
    bundle = {k: v for k, v in options.items() if not k.startswith(INGEST_PREFIX)}
    return ingest, bundle


def brain_ingest_options(options: dict[str, Any]) -> dict[str, Any]:
    """The brain ingest's settings from ``--ingest_<option>`` values (:data:`BRAIN_INGEST_OPTIONS`), typed,
    with the defaults filled in (``rules`` and ``brain_mask`` as absolute paths or None).

    Raises:
        ValueError: an unknown option or a value of the wrong type.
        FileNotFoundError: a rules or brain-mask file that does not exist.
    """
    from common.bundle import flag

    unknown = sorted(set(options) - set(BRAIN_INGEST_OPTIONS))
    if unknown:
        known = [INGEST_PREFIX + k for k in BRAIN_INGEST_OPTIONS]
        raise ValueError(
            f"unknown ingest option(s) {[INGEST_PREFIX + k for k in unknown]} for a brain study (known: {known})"
        )
    out: dict[str, Any] = {k: default for k, (_, default, _) in BRAIN_INGEST_OPTIONS.items()}
    for k, v in options.items():
        kind = BRAIN_INGEST_OPTIONS[k][0]
        if kind is bool:
            out[k] = flag(v, f"--{INGEST_PREFIX}{k}")  # names the option and the value
            continue
        try:
            out[k] = kind(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--{INGEST_PREFIX}{k} {v!r}: {e}") from None
    for k in ("rules", "brain_mask"):
        if out[k] is not None:
            path = Path(out[k]).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"--{INGEST_PREFIX}{k} {path}: no such file")
            out[k] = str(path)
    return out


def ingest_config(options: dict[str, Any]):
    """The :class:`common.ingest.IngestConfig` of ``--ingest_<option>`` values (``prepare_prostatex``'s
    options and conversions; ``native`` defaults to False here: only the reference grid is needed)."""
    from common.ingest.options import OPTIONS, parse_options

    known = sorted(o.name for o in OPTIONS if o.target in ("config", "registration"))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown ingest option(s) {[INGEST_PREFIX + k for k in unknown]} (known: {known})")
    values = {"native": False, **{k: (str(v) if isinstance(v, bool) else v) for k, v in options.items()}}
    return parse_options(**values)[0]


# ------------------------------------------------------------------------------------------
# steps


def check_folders(study: Path, out: Path) -> tuple[Path, Path]:
    """Resolved ``(study, out)``; the study must be a folder and ``out`` must lie outside it.

    Raises:
        FileNotFoundError: no study folder.
        ValueError: ``out`` is the study folder or inside it.
        NotADirectoryError, PermissionError: ``out`` cannot be written (:func:`common.io.output_folder`).
    """
    study, out = Path(study).expanduser().resolve(), Path(out).expanduser().resolve()
    if not study.is_dir():
        raise FileNotFoundError(f"--study {study}: not a folder")
    if out == study or out.is_relative_to(study):
        raise ValueError(
            f"--out {out} lies inside the source study folder {study}: outputs never go into the source "
            "study; choose a folder outside it"
        )
    output_folder(out, "out")  # a file or a read-only folder is named before any work
    return study, out


def case_name(study: Path, case_id: str | None = None) -> str:
    """The case folder name the ingest gives the study (``case_id`` or the folder's name, cleaned as the
    ingest cleans it); a TCIA study folder (series folders right below it) is named ``<patient>_<study>``."""
    if case_id is None:
        is_study = any(next(d.glob("*.dcm"), None) for d in study.iterdir() if d.is_dir())
        case_id = f"{study.parent.name}_{study.name}" if is_study else study.name
    return clean_case_id(case_id)


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _reusable(case: Path, study: Path, config: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of an existing prepared ``case`` made from ``study`` with ``config`` (None: ingest it).

    Raises:
        FileExistsError: the case exists but was made from another study or with other settings.
    """
    if not (case / MANIFEST).exists() or overwrite:
        return None
    manifest = json.loads((case / MANIFEST).read_text())
    saved = manifest.get("config", {})
    differ = sorted(k for k, v in _plain(config).items() if k != "overwrite" and saved.get(k) != v)
    if Path(manifest.get("source", "")) != study or differ:
        why = f"source {manifest.get('source')}" if Path(manifest.get("source", "")) != study else f"{differ}"
        raise FileExistsError(f"{case} was prepared differently ({why}): remove it or choose another --out / --case_id")
    log.info("reusing the prepared case %s", case)
    return manifest


def prepare_case(study: Path, prepared: Path, case_id: str, cfg) -> tuple[Path, dict[str, Any]]:
    """Ingest the prostate ``study`` into ``prepared/<case_id>`` (or reuse a case made from it with the same
    settings; ``--ingest_overwrite true`` ingests it again).

    Returns:
        ``(case folder, manifest)``.

    Raises:
        FileExistsError: the case exists but was made from another study or with other settings.
    """
    case = prepared / case_id
    manifest = _reusable(case, study, cfg.to_dict(), cfg.overwrite)
    return case, manifest if manifest is not None else ingest_study(study, prepared, case_id, cfg)


def prepare_brain(study: Path, prepared: Path, case_id: str, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Ingest the brain ``study`` into ``prepared/<case_id>`` in the BraTS layout (``<case>-t1n.nii.gz`` ...,
    on the T1 grid) or reuse it, as :func:`prepare_case`; ``options`` from :func:`brain_ingest_options`."""
    from common.ingest.brain import brain_settings, ingest_brain_study

    case = prepared / case_id
    config = {k: v for k, v in options.items() if k != "overwrite"}
    manifest = _reusable(case, study, config, options["overwrite"])
    if manifest is None:
        manifest = ingest_brain_study(
            study,
            prepared,
            case_id,
            rules=options["rules"],
            register=options["register"],
            settings=brain_settings(options["max_translation_mm"], options["max_rotation_deg"]),
            brain_mask=options["brain_mask"],
            config=config,
        )
    return case, manifest


def bundle_metadata(contract: Contract) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (name, version, task ...)."""
    path = contract.root / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: cannot read the bundle metadata ({e})") from None


#: settings of the inference config the DICOM headers name (those the config defines)
SETTINGS = ("ckpt_path", "input_keys", "num_inference_steps", "num_samples", "chain_mode")


def preflight(contract: Contract, overrides: dict[str, Any]) -> str:
    """Before the study is ingested: resolve ``device`` and ``ckpt_path`` with the overrides, check the
    device (:func:`common.device.get_device`) and the weights (present, readable, trained with these
    settings: :func:`common.bundle.check_checkpoint`). Returns the checkpoint path."""
    from common.bundle import check_checkpoint
    from common.device import get_device

    parser = run_bundle(workflow_files(contract.root, "infer"), overrides, dry_run=True).parser
    get_device(parser.get_parsed_content("device"))
    record = parser.get_parsed_content("checkpoint_record") if "checkpoint_record" in parser else None
    return check_checkpoint(parser.get_parsed_content("ckpt_path"), record)


def run_inference(contract: Contract, case: Path, output_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the bundle's inference (``evaluating``, :func:`common.bundle.run_bundle`) on one prepared case folder.

    Returns:
        The resolved :data:`SETTINGS` the DICOM headers name (those the config defines).
    """
    run = run_bundle(
        workflow_files(contract.root, "infer"),
        {contract.source_id: str(case), "output_dir": str(output_dir), **overrides},
        run_id="evaluating",
    )
    settings = {k: run.parser.get_parsed_content(k) for k in SETTINGS if k in run.parser}
    if "inferer" in run.parser:  # the network precision the inferer ran at (common.device.resolve_precision)
        settings["precision_used"] = getattr(run.parser.get_parsed_content("inferer"), "precision_used", None)
    return settings


#: ingest kind of a contract -> (its options from ``--ingest_<option>`` values, the function that prepares a case)
INGESTS = {"prostate": (ingest_config, prepare_case), "brain": (brain_ingest_options, prepare_brain)}


def grid_source_series(manifest: dict[str, Any]):
    """The source series of the case's grid (:class:`common.dicom_out.SourceSeries`, from
    :class:`common.layout.CaseManifest`): the ingest's reference grid, cropped."""
    m = CaseManifest.from_dict(manifest)
    return read_source_series(m.grid_folder, m.grid_series_uid)


def first_free_series_number(manifest: dict[str, Any], contract: Contract) -> int:
    """``100 * (largest source SeriesNumber // 100 + 1) + 1``, plus the contract's ``series_offset``
    (e.g. 0 and 10 for two bundles: 101... and 111... for a study numbered below 100)."""
    numbers = CaseManifest.from_dict(manifest).series_numbers
    return 100 * (max(numbers, default=0) // 100 + 1) + 1 + contract.series_offset


def synthetic_outputs(case_out: Path, contract: Contract, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """What the bundle wrote for the case, one entry per DICOM series to write, in the contract's order:
    ``key``, ``label`` (for the SeriesDescription), ``nifti``, ``frame`` (index along the 4th axis of a 4D
    file, else None), ``what`` (the derivation's subject) and ``how`` (its method details).

    Every contract output whose file exists, then its ``<key>_std`` file where written (``--num_samples`` > 1);
    a 4D output (``frames``) gives one entry per frame, named and timed by the JSON file beside it.
    """
    ckpt = Path(str(settings["ckpt_path"])).name
    steps = settings.get("num_inference_steps")
    how = f"from {', '.join(settings.get('input_keys') or contract.input_keys)}; checkpoint {ckpt}"
    how += f", {steps} {contract.steps_name}" if steps is not None else ""
    out: list[dict[str, Any]] = []
    for o in contract.outputs:
        nifti = case_out / o.file
        if not nifti.exists():
            continue
        if o.frames is not None:
            info = json.loads((case_out / o.frames["file"]).read_text())
            times, start = info[o.frames["times_s"]], int(info[o.frames["start"]])
            acquired = ", ".join(f"{t:g} s" for t in times[: start + 1])
            chain = f"{settings['chain_mode']} chain, " if settings.get("chain_mode") else ""
            zero = f" after {o.frames['time_zero']}" if o.frames.get("time_zero") else ""
            how_f = f"from the acquired frames at {acquired}{zero} ({chain}start phase {start}); checkpoint {ckpt}"
            for c, name in enumerate(info[o.frames["names"]]):
                what = f"{o.description} at {times[start + 1 + c]:g} s"
                what += f" after {o.frames['time_zero']}" if o.frames.get("time_zero") else ""
                out.append(
                    {"key": name, "label": f"{o.label} {name}", "nifti": nifti, "frame": c, "what": what, "how": how_f}
                )
            continue
        entry = {"key": o.key, "label": o.label, "nifti": nifti, "frame": None, "what": o.description, "how": how}
        out.append(entry)
    for o in contract.outputs:  # the std files after every output (--num_samples > 1)
        nifti = case_out / o.file
        std = nifti.with_name(o.file.replace(".nii", "_std.nii", 1))
        if o.std and std.exists():
            n = settings.get("num_samples")
            over = f"over {n} samples" if n else "over the samples"
            out.append(
                {
                    **next(e for e in out if e["key"] == o.key),
                    "key": f"{o.key}_std",
                    "label": f"{o.label} std",
                    "nifti": std,
                    "what": f"pixel-wise standard deviation {over} of the {o.description}",
                }
            )
    return out


def write_dicom(
    case_out: Path,
    manifest: dict[str, Any],
    contract: Contract,
    meta: dict[str, Any],
    settings: dict[str, Any],
    first_series_number: int,
) -> list[dict[str, Any]]:
    """Write every output of :func:`synthetic_outputs` as a DICOM series in ``<case_out>/dicom/``, numbered
    from ``first_series_number``."""
    source = grid_source_series(manifest)
    bundle = contract.name
    method, version = meta.get("name", bundle), meta.get("version", "?")
    label_maps, precision = set(contract.label_outputs), settings.get("precision_used")
    written = []
    volumes: dict[Path, tuple] = {}
    with series_set(case_out / "dicom") as staging:  # the run's series appear together or not at all
        for i, o in enumerate(synthetic_outputs(case_out, contract, settings)):
            key, label, nifti = o["key"], o["label"], o["nifti"]
            if nifti not in volumes:
                volumes[nifti] = load_nifti(nifti)
            volume, affine = volumes[nifti]
            if o["frame"] is not None:
                volume = volume[..., o["frame"]]
            number = first_series_number + i
            description = f"SYNTHETIC {label} ({method} {version})"[:64]
            derivation = (
                f"{o['what']} synthesised by {method} {version} (MONAI bundle {bundle}: {meta.get('task', '')}) "
                f"{o['how']}; on the grid of series {source.series_number} ({source.folder.name}). {SYNTHETIC_NOTE}"
            )
            name = series_folder_name(number, description)
            if key in label_maps:  # a label map goes out as a DICOM Segmentation of the source series
                write_segmentation(
                    volume,
                    affine,
                    staging / name,
                    source,
                    series_number=number,
                    label=label,
                    algorithm_name=method,
                    algorithm_version=str(version),
                    description=description,
                )
                n_files, modality = 1, "SEG"
            else:
                n_files = len(
                    write_derived_series(
                        volume,
                        affine,
                        staging / name,
                        source,
                        series_number=number,
                        description=description,
                        derivation=derivation,
                        software=f"{bundle} {version}",
                        precision=precision,
                    )
                )
                modality = "MR"
            folder = case_out / "dicom" / name
            log.info("%s: %d %s file(s) in %s", key, n_files, modality, folder)
            written.append(
                {
                    "key": key,
                    "nifti": str(nifti),
                    "frame": o["frame"],
                    "folder": str(folder),
                    "series_number": number,
                    "n_files": n_files,
                    "modality": modality,
                }
            )
    return written


def synthesize(
    study: str | Path,
    bundle: str,
    out: str | Path,
    case_id: str | None = None,
    first_series_number: int | None = None,
    ingest: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Ingest ``study``, run ``bundle``'s inference on it and write the phases as DICOM (module docstring).

    Args:
        study: a TCIA patient or study folder (only read).
        bundle: a bundle name (a folder of ``bundles/``) or a bundle folder whose contract declares an ingest.
        out: output root (outside ``study``).
        case_id: case name (default: :func:`case_name`).
        first_series_number: SeriesNumber of the first synthetic series (default:
            :func:`first_free_series_number`).
        ingest: options of the ingest: ``prepare_prostatex``'s for a prostate study (e.g.
            ``{"crop_size": "96,96,8"}``), :data:`BRAIN_INGEST_OPTIONS` for d3m's brain study.
        overrides: bundle config overrides (``ckpt_path``, ``num_inference_steps``, ``device`` ...).

    Returns:
        The summary also written as ``<out>/<bundle>/<case>/synthesis.json``.
    """
    contract = read_contract(bundle, overrides=overrides)  # a multi-task bundle: the task --<task_id> names
    if contract.ingest is None:
        raise ValueError(
            f"--bundle {bundle}: reads no study (its configs/contract.json declares no ingest): {contract.no_study}"
        )
    if contract.ingest not in INGESTS:
        raise ValueError(
            f"--bundle {bundle}: its contract asks for the {contract.ingest!r} ingest, which this version of "
            f"synthesize.py does not have (it has {sorted(INGESTS)})"
        )
    overrides = {**contract.overrides, **contract.study_overrides, **overrides}
    study, out = check_folders(Path(study), Path(out))
    read_options, prepare = INGESTS[contract.ingest]
    cfg = read_options(ingest or {})
    case_id = case_name(study, case_id)
    reserved = sorted(set(overrides) & {*RESERVED, contract.source_id})
    if reserved:
        raise ValueError(f"--{', --'.join(reserved)}: set by synthesize.py from --study / --out; leave them out")
    bundle = contract.name
    case_out = out / bundle / case_id
    dicom_dir = case_out / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise FileExistsError(
            f"{dicom_dir} already holds DICOM series of an earlier run: remove it or choose another --out"
        )
    meta = bundle_metadata(contract)
    preflight(contract, overrides)
    t0 = time.perf_counter()
    case, manifest = prepare(study, out / "prepared", case_id, cfg)
    t_ingest = time.perf_counter()
    settings = run_inference(contract, case, out / bundle, overrides)
    t_infer = time.perf_counter()
    if first_series_number is None:
        first_series_number = first_free_series_number(manifest, contract)
    series = write_dicom(case_out, manifest, contract, meta, settings, int(first_series_number))
    summary = {
        "study": str(study),
        "prepared_case": str(case),
        "bundle": bundle,
        "bundle_version": meta.get("version"),
        "method": meta.get("name"),
        "overrides": _plain(overrides),
        "settings": _plain(settings),
        "study_uid": manifest.get("study_uid"),
        "series": series,
        "seconds": {
            "ingest": round(t_ingest - t0, 2),
            "inference": round(t_infer - t_ingest, 2),
            "dicom": round(time.perf_counter() - t_infer, 2),
        },
    }
    save_json(summary, case_out / "synthesis.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # --case must not become --case_id: unknown ids go to the bundle as they are
        description=__doc__.split("\n\n")[0],
        epilog="Every other --<id> <value> is an override of the bundle's inference config "
        "(e.g. --ckpt_path model.pt --num_inference_steps 4 --device cpu); --ingest_<option> <value> "
        "sets an option of the ingest: of scripts/prepare_prostatex.py for a prostate study (e.g. "
        "--ingest_crop_size 160,160,16), of the brain ingest ("
        + ", ".join(f"--{INGEST_PREFIX}{k}" for k in BRAIN_INGEST_OPTIONS)
        + ").",
    )
    parser.add_argument("--study", required=True, help="TCIA patient or study folder (only read)")
    parser.add_argument(
        "--bundle", required=True, help="bundle name or folder (its configs/contract.json declares an ingest)"
    )
    parser.add_argument("--out", required=True, help="output folder (outside the study folder)")
    parser.add_argument("--case_id", default=None, help="case name (default: the patient folder's name)")
    parser.add_argument("--first_series_number", type=int, default=None, help="SeriesNumber of the first series")
    parser.add_argument("--log_level", default="INFO", help="logging level")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO), format="%(levelname)s %(message)s"
    )
    try:
        ingest, overrides = split_options(parse_overrides(rest))
        summary = synthesize(
            args.study, args.bundle, args.out, args.case_id, args.first_series_number, ingest, **overrides
        )
    except (
        Exception
    ) as e:  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback), a bug with its traceback
        message = user_message(e) or (str(e) if isinstance(e, (IngestError, OSError, ValueError)) else None)
        if message is None or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    for s in summary["series"]:
        print(f"{s['key']}: {s['n_files']} DICOM files in {s['folder']}")
    print(f"summary: {Path(summary['series'][0]['folder']).parents[1] / 'synthesis.json'}")
    return 0


if __name__ == "__main__":
    install_error_hook()
    sys.exit(main())
