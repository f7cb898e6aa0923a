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

Bundles: ``resdce`` and ``dcediff`` (DCE phases from the case's other series); ``iterunet`` (the delayed
frames of the case's 4D DCE series from its pre-contrast and start frames: every frame of
``dce_synth.nii.gz`` becomes a series ``SYNTHETIC DCE t<seconds>s ...``, seconds after contrast arrival;
defaults :data:`BUNDLE_DEFAULTS`, the prostate overrides of ``bundles/iterunet/docs/README.md``).
``d3m`` (the T1 post-contrast as ``SYNTHETIC T1c ...`` and the predicted enhancing-tumour mask as
``SYNTHETIC ET mask ...``, 1 = ET, both on the T1 grid; plus ``T1c std`` with ``--num_samples`` > 1).
``ressrdiff`` is refused with the reason (:data:`REFUSED`: one volume, not a study).

The source study folder is only read: an ``--out`` inside it is refused, and so is an output
folder that already holds DICOM series of an earlier run. The series that the synthesis grid came
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
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.dicom_out import read_source_series, series_folder_name, write_derived_series  # noqa: E402
from common.errors import DEBUG_ENV, user_message  # noqa: E402
from common.errors import install as install_error_hook  # noqa: E402
from common.ingest import IngestError, ingest_study  # noqa: E402
from common.ingest.brain import MAX_ROTATION_DEG, MAX_TRANSLATION_MM  # noqa: E402
from common.io import load_nifti, output_folder, save_json  # noqa: E402
from common.layout import MANIFEST  # noqa: E402

log = logging.getLogger("synthesize")

#: bundles whose inference reads a prepared case made by an ingest of this script: a prostate case for the
#: DCE bundles (iterunet: the delayed frames of the case's 4D DCE series, predicted from its pre and start
#: frames), a BraTS-layout brain case for d3m (:data:`BRAIN_BUNDLES`).
SUPPORTED = ("resdce", "dcediff", "iterunet", "d3m")
#: bundles that read a brain study (:func:`common.ingest.brain.ingest_brain_study`).
BRAIN_BUNDLES = ("d3m",)
#: ``--ingest_<option>`` of the brain ingest: option -> (type, default, meaning).
BRAIN_INGEST_OPTIONS = {
    "rules": (str, None, "series-to-role rules JSON (default common/ingest/brain_rules.json)"),
    "register": (bool, True, "rigid registration of T2, FLAIR, T1c onto T1 (false: scanner geometry only)"),
    "max_translation_mm": (float, MAX_TRANSLATION_MM, "registration bound (mm)"),
    "max_rotation_deg": (float, MAX_ROTATION_DEG, "registration bound (degrees)"),
    "brain_mask": (str, None, "a brain mask NIfTI in the T1's scanner space (default: T1 > 0, not skull-stripped)"),
    "overwrite": (bool, False, "ingest again even if the prepared case exists"),
}
#: bundles that exist but whose input this ingest cannot make, with the reason (one line each).
REFUSED = {
    "ressrdiff": "ressrdiff super-resolves one volume, not a study: run the bundle on a NIfTI file "
    "(bundles/ressrdiff/docs/README.md)",
}
#: iterunet on a prepared prostate case (bundles/iterunet/docs/README.md): frames picked by their offsets after
#: contrast arrival, the organ mask as curve region; any of them can be overridden (``--frame_offsets_s ...``).
BUNDLE_DEFAULTS = {"iterunet": {"frame_offsets_s": [85, 155, 225, 295, 365], "mask_keys": ["organ_mask"]}}
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
    from scripts.prepare_prostatex import OPTIONS, parse_options

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
    from common.ingest.pipeline import _clean_id

    if case_id is None:
        is_study = any(next(d.glob("*.dcm"), None) for d in study.iterdir() if d.is_dir())
        case_id = f"{study.parent.name}_{study.name}" if is_study else study.name
    return _clean_id(case_id)


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


def bundle_metadata(bundle: str) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (name, version, task ...)."""
    path = ROOT / "bundles" / bundle / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: cannot read the bundle metadata ({e})") from None


def preflight(bundle: str, overrides: dict[str, Any]) -> str:
    """Before the study is ingested: resolve ``device`` and ``ckpt_path`` with the overrides, check the
    device (:func:`common.device.get_device`) and the weights (present, readable, trained with these
    settings: :func:`common.bundle.check_checkpoint`). Returns the checkpoint path."""
    from monai.bundle import ConfigParser

    from common.bundle import check_checkpoint
    from common.device import get_device

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "inference.json"))
    parser.update(dict(overrides))
    get_device(parser.get_parsed_content("device"))
    record = parser.get_parsed_content("checkpoint_record") if "checkpoint_record" in parser else None
    return check_checkpoint(parser.get_parsed_content("ckpt_path"), record)


def run_inference(bundle: str, case: Path, output_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run ``bundles/<bundle>/configs/inference.json`` (``evaluating``) on one prepared case folder.

    Returns:
        The resolved settings the DICOM headers name: ``ckpt_path``; for the phase bundles ``input_keys``,
        ``target_keys``, ``num_inference_steps``; for d3m ``input_keys``, ``target_key``,
        ``num_inference_steps``, ``num_samples``; for iterunet ``series_key``, ``start_phase`` and ``chain_mode``.
    """
    from monai.bundle.scripts import create_workflow

    configs = ROOT / "bundles" / bundle / "configs"
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    try:
        wf = create_workflow(
            config_file=str(configs / "inference.json"),
            meta_file=str(configs / "metadata.json"),
            run_id="evaluating",
            case_dir=str(case),
            output_dir=str(output_dir),
            **overrides,
        )
        wf.run()
        keys = ("input_keys", "target_keys", "target_key", "num_inference_steps", "series_key", "start_phase")
        keys += ("chain_mode", "num_samples")
        settings = {k: wf.parser.get_parsed_content(k) for k in ("ckpt_path", *keys) if k in wf.parser}
        wf.finalize()
    finally:  # the bundle's logging.conf adds a console handler: leave the caller's logging as it was
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
    return settings


def grid_source_series(manifest: dict[str, Any]):
    """The source series of the case's grid (:class:`common.dicom_out.SourceSeries`).

    The grid is the ingest's reference grid, cropped: the DCE time point used as pre-contrast
    input (``dce.phases.pre``; all DCE time points share its grid), or the ``reference.role``
    series when another role was the reference.
    """
    source, role = Path(manifest["source"]), manifest["reference"]["role"]
    if role == "dce":
        tp = manifest["dce"]["series"][manifest["dce"]["phases"]["pre"]["index"]]
        label, number = tp["folder"], tp["series_number"]
        uid = next(
            (
                r.get("series_uid")
                for r in manifest.get("series", [])
                if r.get("folder") == label and r.get("series_number") == number
            ),
            None,
        )
    else:
        label, uid = manifest["roles"][role]["folder"], manifest["roles"][role].get("series_uid")
    return read_source_series(source / label.split("#")[0], uid)


def phase_label(key: str) -> str:
    """``"dce_early"`` -> ``"DCE early"``."""
    head, _, tail = key.partition("_")
    return f"{head.upper()} {tail.replace('_', ' ')}".strip() if tail else key.upper()


def first_free_series_number(manifest: dict[str, Any], bundle: str) -> int:
    """``100 * (largest source SeriesNumber // 100 + 1) + 1``, plus ``10 x`` the bundle's place in
    :data:`SUPPORTED` (resdce 101..., dcediff 111... for a study numbered below 100)."""
    numbers = [int(r["series_number"]) for r in manifest.get("series", []) if r.get("series_number") is not None]
    base = 100 * (max(numbers, default=0) // 100 + 1) + 1
    return base + 10 * (SUPPORTED.index(bundle) if bundle in SUPPORTED else 0)


def _std_entries(outputs: list[dict[str, Any]], case_out: Path, over: Callable[[dict], str]) -> list[dict[str, Any]]:
    """The ``<key>_std`` entries of :func:`synthetic_outputs` for each of ``outputs`` whose
    ``<key>_std.nii.gz`` was written (``--num_samples`` > 1); ``over(entry)`` completes the text
    "pixel-wise standard deviation ..." of that entry's std."""
    return [
        {
            **o,
            "key": f"{o['key']}_std",
            "label": f"{o['label']} std",
            "nifti": case_out / f"{o['key']}_std.nii.gz",
            "what": f"pixel-wise standard deviation {over(o)}",
        }
        for o in outputs
        if (case_out / f"{o['key']}_std.nii.gz").exists()
    ]


def synthetic_outputs(case_out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """What the bundle wrote for the case, one entry per DICOM series to write: ``key``, ``label`` (for the
    SeriesDescription), ``nifti``, ``frame`` (index along the 4th axis of a 4D file, else None), ``what``
    (the derivation's subject) and ``how`` (its method details).

    Phase bundles: ``<key>.nii.gz`` of every target key and ``<key>_std.nii.gz`` where ``--num_samples`` > 1
    wrote one. iterunet: each frame of ``dce_synth.nii.gz``, named by ``kinetics.json``'s predicted phases
    (``t<seconds>s``, seconds after contrast arrival). d3m: ``<target_key>.nii.gz`` (T1c), its ``_std`` where
    written, and ``et_mask.nii.gz`` (the predicted enhancing-tumour mask, 0/1).
    """
    ckpt = Path(str(settings["ckpt_path"])).name
    if "target_key" in settings:
        key = settings["target_key"]
        label = "T1c" if key == "t1c" else key
        how = (
            f"from {', '.join(settings['input_keys'])}; checkpoint {ckpt}, {settings['num_inference_steps']} DDIM steps"
        )
        out = [{"key": key, "label": label, "nifti": case_out / f"{key}.nii.gz", "what": "T1 post-contrast image"}]
        n = settings.get("num_samples")
        out += _std_entries(out, case_out, lambda o: f"over {n} samples of the T1 post-contrast")
        if (case_out / "et_mask.nii.gz").exists():
            what = "enhancing-tumour mask (1 = enhancing tumour, 0 = not; predicted jointly with the T1c)"
            out.append({"key": "et_mask", "label": "ET mask", "nifti": case_out / "et_mask.nii.gz", "what": what})
        return [{**o, "frame": None, "how": how} for o in out]
    if "target_keys" in settings:
        how = f"from {', '.join(settings['input_keys'])}; checkpoint {ckpt}, {settings['num_inference_steps']} sampling steps"
        out = []
        for key in settings["target_keys"]:
            label = phase_label(key)
            out.append({"key": key, "label": label, "nifti": case_out / f"{key}.nii.gz", "frame": None, "what": label})
        out += _std_entries(out, case_out, lambda o: f"over the samples of the {o['label']}")
        for o in out:
            o["how"] = how
        return out
    kinetics = json.loads((case_out / "kinetics.json").read_text())
    times, start = kinetics["times_s"], int(kinetics["start_phase"])
    acquired = ", ".join(f"{t:g} s" for t in times[: start + 1])
    how = (
        f"from the acquired DCE frames at {acquired} after contrast arrival ({settings.get('chain_mode', '')} chain, "
        f"start phase {start}); checkpoint {ckpt}"
    )
    return [
        {
            "key": name,
            "label": f"DCE {name}",
            "nifti": case_out / "dce_synth.nii.gz",
            "frame": c,
            "what": f"DCE frame at {times[start + 1 + c]:g} s after contrast arrival",
            "how": how,
        }
        for c, name in enumerate(kinetics["predicted_phases"])
    ]


def write_dicom(
    case_out: Path,
    manifest: dict[str, Any],
    bundle: str,
    meta: dict[str, Any],
    settings: dict[str, Any],
    first_series_number: int,
) -> list[dict[str, Any]]:
    """Write every output of :func:`synthetic_outputs` as a DICOM series in ``<case_out>/dicom/``, numbered
    from ``first_series_number``."""
    source = grid_source_series(manifest)
    method, version = meta.get("name", bundle), meta.get("version", "?")
    written = []
    volumes: dict[Path, tuple] = {}
    for i, o in enumerate(synthetic_outputs(case_out, settings)):
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
        folder = case_out / "dicom" / series_folder_name(number, description)
        files = write_derived_series(
            volume,
            affine,
            folder,
            source,
            series_number=number,
            description=description,
            derivation=derivation,
            software=f"{bundle} {version}",
        )
        written.append(
            {
                "key": key,
                "nifti": str(nifti),
                "frame": o["frame"],
                "folder": str(folder),
                "series_number": number,
                "n_files": len(files),
            }
        )
        log.info("%s: %d files in %s", key, len(files), folder)
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
        bundle: one of :data:`SUPPORTED`.
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
    if bundle in REFUSED:
        raise ValueError(f"--bundle {bundle}: not supported by synthesize.py: {REFUSED[bundle]}")
    if bundle not in SUPPORTED:
        raise ValueError(
            f"--bundle {bundle!r}: synthesize.py supports {list(SUPPORTED)} (bundles that read a case its ingest makes)"
        )
    overrides = {**BUNDLE_DEFAULTS.get(bundle, {}), **overrides}
    study, out = check_folders(Path(study), Path(out))
    brain = bundle in BRAIN_BUNDLES
    cfg = brain_ingest_options(ingest or {}) if brain else ingest_config(ingest or {})
    case_id = case_name(study, case_id)
    reserved = sorted(set(overrides) & set(RESERVED))
    if reserved:
        raise ValueError(f"--{', --'.join(reserved)}: set by synthesize.py from --study / --out; leave them out")
    case_out = out / bundle / case_id
    dicom_dir = case_out / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise FileExistsError(
            f"{dicom_dir} already holds DICOM series of an earlier run: remove it or choose another --out"
        )
    meta = bundle_metadata(bundle)
    preflight(bundle, overrides)
    t0 = time.perf_counter()
    case, manifest = (prepare_brain if brain else prepare_case)(study, out / "prepared", case_id, cfg)
    t_ingest = time.perf_counter()
    settings = run_inference(bundle, case, out / bundle, overrides)
    t_infer = time.perf_counter()
    if first_series_number is None:
        first_series_number = first_free_series_number(manifest, bundle)
    series = write_dicom(case_out, manifest, bundle, meta, settings, int(first_series_number))
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
        "--ingest_crop_size 160,160,16), of the brain ingest for d3m ("
        + ", ".join(f"--{INGEST_PREFIX}{k}" for k in BRAIN_INGEST_OPTIONS)
        + ").",
    )
    parser.add_argument("--study", required=True, help="TCIA patient or study folder (only read)")
    parser.add_argument("--bundle", required=True, help=f"one of {', '.join(SUPPORTED)}")
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
