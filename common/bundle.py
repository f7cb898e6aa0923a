"""Config and command-line helpers every bundle config calls (where the bundle lies, yes/no switches
typed on the command line, the checkpoints a run resumes from or infers with), the one way to run a
bundle from Python (:func:`run_bundle`) and the bundle contract (:func:`read_contract`): what a
bundle reads and writes, declared in its ``configs/contract.json``, so that the scripts name no bundle."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "BundleOutput",
    "BundleRun",
    "ConfigRecord",
    "Contract",
    "REPO_BUNDLES",
    "WORKFLOW_FILES",
    "bundle_config",
    "bundle_dir",
    "bundle_root",
    "check_checkpoint",
    "find_bundles",
    "flag",
    "latest_checkpoint",
    "one_of",
    "positive_int",
    "read_contract",
    "recorded_setting",
    "run_bundle",
    "slice_batching",
    "training_epochs",
    "variant",
    "workflow_files",
]

#: the bundles of this repository
REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
#: the config files each workflow of a bundle stacks, in order (later files override earlier ones)
WORKFLOW_FILES = {
    "train": ("train.json",),
    "multi_gpu": ("train.json", "multi_gpu_train.json"),
    "infer": ("train.json", "inference.json"),
    "evaluate": ("train.json", "inference.json", "evaluate.json"),
}
CONTRACT = "contract.json"
INGEST_KINDS = ("prostate", "brain", "breast")


def bundle_root(default: str | None = None) -> str:
    """Absolute path of the bundle folder, independent of the working directory.

    A config calls it for its ``bundle_root`` id, which ``--bundle_root <folder>`` (or
    :func:`run_bundle`, from the config file's location) replaces. Without that override it is the
    folder of the config file the running MONAI workflow was made from (the ``configs`` folder's
    parent of ``python -m monai.bundle run ... --config_file <bundle>/configs/train.json``: the
    ``ConfigWorkflow`` that evaluates the config holds it), so a bundle copied anywhere works where
    it lies. ``default``: a bundle name of this repository, used only when the config is parsed by a
    bare ``ConfigParser`` (no workflow, no override).

    Raises:
        ValueError: none of the three gives a folder.
    """
    from monai.bundle.workflows import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigWorkflow):
            root = Path(owner.config_root_path).expanduser().resolve()
            return str(root.parent if root.name == "configs" else root)
        frame = frame.f_back
    if default:
        return str(REPO_BUNDLES / default)
    raise ValueError("bundle_root: the config is not run from its file; pass --bundle_root <bundle folder>")


def bundle_dir(bundle: str | os.PathLike) -> Path:
    """A bundle folder from its name (a folder of this repository's ``bundles/``) or its path.

    Raises:
        FileNotFoundError: no such bundle (the message lists the bundles there are).
    """
    text = str(bundle)
    path = Path(text).expanduser() if (os.sep in text or text.startswith(".")) else REPO_BUNDLES / text
    if not (path / "configs").is_dir():
        known = ", ".join(p.name for p in find_bundles())
        raise FileNotFoundError(f"no bundle {text!r} ({path / 'configs'} does not exist); bundles: {known}")
    return path.resolve()


def find_bundles(root: str | os.PathLike = REPO_BUNDLES) -> list[Path]:
    """The bundle folders below ``root`` that declare a contract (``configs/contract.json``), sorted by name."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / "configs" / CONTRACT).is_file()) if root.is_dir() else []


def workflow_files(bundle: str | os.PathLike, workflow: str) -> list[Path]:
    """The config files of ``bundle`` that ``workflow`` (a key of :data:`WORKFLOW_FILES`) stacks."""
    if workflow not in WORKFLOW_FILES:
        raise ValueError(f"workflow {workflow!r}: one of {list(WORKFLOW_FILES)}")
    configs = bundle_dir(bundle) / "configs"
    return [configs / f for f in WORKFLOW_FILES[workflow]]


def _root_of(config_files: Sequence[str | os.PathLike]) -> str:
    first = Path(config_files[0]).expanduser().resolve().parent
    return str(first.parent if first.name == "configs" else first)


def bundle_config(config_files: str | os.PathLike | Sequence[str | os.PathLike], overrides: Mapping | None = None):
    """A ``monai.bundle.ConfigParser`` of ``config_files`` (stacked in order) with ``overrides`` applied and
    ``bundle_root`` set from the first file's location (unless overridden)."""
    from monai.bundle import ConfigParser

    files = [str(f) for f in ([config_files] if isinstance(config_files, (str, os.PathLike)) else config_files)]
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": _root_of(files), **dict(overrides or {})})
    return parser


@dataclasses.dataclass
class BundleRun:
    """What :func:`run_bundle` ran: its parser (``get_parsed_content`` gives every resolved setting) and
    the seconds its ``run`` took."""

    parser: Any
    seconds: float


def run_bundle(
    config_files: str | os.PathLike | Sequence[str | os.PathLike],
    overrides: Mapping | None = None,
    run_id: str = "run",
    workflow_type: str | None = None,
    dry_run: bool = False,
) -> BundleRun:
    """Run a bundle from Python as ``python -m monai.bundle run <run_id> --config_file <files> --<id> <value>``
    does (MONAI's ``ConfigWorkflow``: initialize, run, finalize), with ``bundle_root`` set from the
    first config file's location and the caller's logging left as it was (a bundle's ``logging.conf``
    adds a console handler). ``dry_run``: build the workflow, do not run it (``seconds`` is 0)."""
    from monai.bundle import create_workflow

    files = [str(f) for f in ([config_files] if isinstance(config_files, (str, os.PathLike)) else config_files)]
    configs = Path(files[0]).expanduser().resolve().parent
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        wf = create_workflow(
            config_file=files if len(files) > 1 else files[0],
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf") if (configs / "logging.conf").is_file() else False,
            run_id=run_id,
            workflow_type=workflow_type,
            **{"bundle_root": _root_of(files), **dict(overrides or {})},
        )
        seconds = 0.0
        if not dry_run:
            t0 = time.perf_counter()
            wf.run()
            seconds = time.perf_counter() - t0
            wf.finalize()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return BundleRun(wf.parser, seconds)


# ---------------------------------------------------------------------------------------- the contract


@dataclasses.dataclass(frozen=True)
class BundleOutput:
    """One output a bundle writes per case (an entry of ``outputs`` in ``configs/contract.json``).

    Attributes:
        key: the output's key (``dce_early``, ``t1c``, ``et_mask``); also the stem of ``file`` by default.
        file: file name in ``<output_dir>/<case>/`` (``<key>.nii.gz``).
        label: short name for people and the DICOM SeriesDescription (``DCE early``).
        description: what it is, for the DICOM derivation text (``T1 post-contrast image``).
        label_map: a label volume (0/1 ...), not intensities (MONAI Label returns it as ``result_key``).
        std: a ``<key>_std`` file beside it holds the pixel-wise standard deviation over samples, when written.
        frames: for a 4D file, one series per frame: ``{"file": <JSON beside the output>, "names": <its
            list of frame names>, "times_s": <its list of all time points, seconds>, "start": <its index of
            the last acquired time point>, "time_zero": <optional: what time 0 is, e.g. contrast arrival>}``;
            frame ``c`` is at ``times_s[start + 1 + c]``.
        target: the key of this output's ground truth in a case's datalist entry (default ``key``), or
            ``@<id>``: the config id that holds it (e.g. ``@volume_key`` for a super-resolved volume).
    """

    key: str
    file: str
    label: str
    description: str
    label_map: bool = False
    std: bool = False
    frames: dict | None = None
    target: str = ""

    @property
    def series_description(self) -> str:
        """``SYNTHETIC <label>`` (the method and version are added by the writer)."""
        return f"SYNTHETIC {self.label}"


@dataclasses.dataclass(frozen=True)
class Contract:
    """What a bundle reads and writes (``configs/contract.json``), read by the scripts so none names a bundle.

    Attributes:
        root: the bundle folder; ``name`` its folder name.
        ingest: the study ingest whose prepared case it reads (``prostate``, ``brain``, ``breast``), or None
            (the bundle reads no study, e.g. one volume; ``no_study`` says what to do instead).
        source_id: the config id that takes one study (``case_dir``: a prepared case folder; ``input_file``: one volume).
        input_keys: the series the bundle reads from a case.
        outputs: :class:`BundleOutput` per output (a bundle may write a subset, e.g. per ``target_keys``).
        study_overrides: config overrides for a case made by the ingest (e.g. which frames to predict).
        sampler: the sampler's name, or ``@<id>`` of the config id that names it.
        steps_name: what ``num_inference_steps`` counts, for the DICOM derivation text (``DDIM steps``).
        series_offset: added to the first free DICOM SeriesNumber so two bundles' series do not collide.
        task, task_id, tasks: for a bundle with several tasks (``"tasks"`` in its contract.json), the task
            this contract describes, the config id that selects it (``--<task_id> <task>``) and every task's
            name; ``None``, ``None``, ``()`` for a bundle with one task.
    """

    root: Path
    ingest: str | None
    source_id: str
    input_keys: tuple[str, ...]
    outputs: tuple[BundleOutput, ...]
    study_overrides: dict = dataclasses.field(default_factory=dict)
    sampler: str = "?"
    steps_name: str = "sampling steps"
    series_offset: int = 0
    no_study: str = ""
    task: str | None = None
    task_id: str | None = None
    tasks: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def overrides(self) -> dict:
        """The config overrides that run the bundle in this contract's task (``{task_id: task}``; ``{}``
        for a bundle with one task)."""
        return {self.task_id: self.task} if self.task_id and self.task else {}

    def output(self, key: str) -> BundleOutput | None:
        return next((o for o in self.outputs if o.key == key), None)

    @property
    def label_outputs(self) -> list[str]:
        return [o.key for o in self.outputs if o.label_map]


def read_contract(bundle: str | os.PathLike, task: str | None = None, overrides: Mapping | None = None) -> Contract:
    """The :class:`Contract` of a bundle (a name of this repository's ``bundles/`` or a folder path).

    A bundle with several tasks (e.g. one method for prostate DCE, brain T1c and super-resolution) has
    in its ``contract.json`` ``"task_id"`` (the config id that selects the task), ``"default_task"``
    (the config's default) and ``"tasks": {"<task>": {<a contract's entries>}}``; the task's entries
    are read over the file's top-level ones (shared entries such as ``sampler`` written once).
    The task is ``task``, else ``overrides[task_id]`` (the overrides a script passes to the bundle,
    e.g. ``--task brain_t1c``), else ``default_task``; the contract's :attr:`Contract.overrides`
    then select it when the bundle is run. A bundle with one task takes no ``task``.

    Raises:
        FileNotFoundError: no bundle or no ``configs/contract.json``.
        ValueError: a contract that is not valid, or an unknown task (the message names the file and the entry).
    """
    root = bundle_dir(bundle)
    path = root / "configs" / CONTRACT
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the bundle declares no contract (what it reads and writes)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    task_id, tasks = data.get("task_id"), data.get("tasks")
    if tasks is None:
        if task is not None:
            raise ValueError(f"{path}: the bundle has one task, not {task!r} (its contract has no tasks)")
    else:
        if not isinstance(tasks, dict) or not tasks or not isinstance(task_id, str):
            raise ValueError(f"{path}: tasks must be a non-empty object and task_id a string (the config id)")
        if task is None and overrides and task_id in overrides:
            task = str(overrides[task_id])
        task = data.get("default_task", next(iter(tasks))) if task is None else task
        if task not in tasks:
            raise ValueError(f"{path}: --{task_id} {task!r}: not one of {', '.join(tasks)}")
        data = {**{k: v for k, v in data.items() if k not in ("tasks", "default_task")}, **tasks[task]}

    def need(d: Mapping, key: str, kind: type, where: str):
        if not isinstance(d.get(key), kind):
            raise ValueError(f"{path}: {where}{key} must be a {kind.__name__}, got {d.get(key)!r}")
        return d[key]

    ingest = data.get("ingest")
    if ingest is not None and ingest not in INGEST_KINDS:
        raise ValueError(f"{path}: ingest must be one of {list(INGEST_KINDS)} or null, got {ingest!r}")
    outputs = []
    for i, o in enumerate(need(data, "outputs", list, "")):
        where = f"outputs[{i}]."
        key = need(o, "key", str, where)
        frames = o.get("frames")
        if frames is not None and not all(
            isinstance(frames.get(k), str) for k in ("file", "names", "times_s", "start")
        ):
            raise ValueError(f"{path}: {where}frames needs file, names, times_s and start (strings)")
        outputs.append(
            BundleOutput(
                key=key,
                file=o.get("file", f"{key}.nii.gz"),
                label=need(o, "label", str, where),
                description=o.get("description", o["label"]),
                label_map=bool(o.get("label_map", False)),
                std=bool(o.get("std", False)),
                frames=frames,
                target=str(o.get("target", key)),
            )
        )
    return Contract(
        root=root,
        ingest=ingest,
        source_id=need(data, "source_id", str, ""),
        input_keys=tuple(need(data, "input_keys", list, "")),
        outputs=tuple(outputs),
        study_overrides=dict(data.get("study_overrides", {})),
        sampler=str(data.get("sampler", "?")),
        steps_name=str(data.get("steps_name", "sampling steps")),
        series_offset=int(data.get("series_offset", 0)),
        no_study=str(data.get("no_study", "")),
        task=task if tasks is not None else None,
        task_id=task_id if tasks is not None else None,
        tasks=tuple(tasks) if tasks is not None else (),
    )


def variant(obj: Any, **changes: Any) -> Any:
    """An independent deep copy of a configured object with some of its settings changed, so that one
    definition serves two uses: validation during training samples with the bundle's ``inferer``
    (``"$common.bundle.variant(@inferer, num_inference_steps=@val_num_inference_steps, progress=False)"``)
    instead of a second copy of its config; the copy's sampler and scheduler are its own (sampling sets
    the scheduler's timesteps, which training must not see).

    Raises:
        AttributeError: a setting the object does not have (named with the object's class).
    """
    import copy

    unknown = [k for k in changes if not hasattr(obj, k)]
    if unknown:
        raise AttributeError(f"{type(obj).__name__} has no setting {', '.join(unknown)} to change")
    out = copy.deepcopy(obj)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


# ---------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> str:
    """Newest READABLE resumable checkpoint in ``folder`` (by the iteration/epoch number in its name),
    or ``""``. A newer file that cannot be read (a run killed while writing it with an older,
    non-atomic saver; a truncated copy) is skipped with a warning naming it, and the last good one
    is taken."""
    import logging

    folder = Path(folder)
    if not folder.is_dir():
        return ""

    def number(p: Path) -> int:
        nums = re.findall(r"=(\d+)", p.name)
        return int(nums[-1]) if nums else -1

    files = sorted(folder.glob(pattern), key=lambda p: (number(p), p.stat().st_mtime))
    for path in reversed(files):
        try:
            _read_checkpoint(path)
        except ValueError as e:
            logging.getLogger(__name__).warning("skipping unreadable checkpoint: %s", e)
            continue
        return str(path)
    return ""


def _plain(value):
    """A setting as plain JSON-like data (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class ConfigRecord:
    """The settings that make a checkpoint's weights mean what they mean (network preset, channels,
    the diffusion schedule), saved in every checkpoint next to the weights and compared on loading.

    It is an object with ``state_dict`` / ``load_state_dict``, so ignite's ``Checkpoint`` (MONAI's
    ``CheckpointSaver`` / ``CheckpointLoader``) stores it under its key (``"config"``) like the model.
    A bundle declares one ``checkpoint_record`` block, identical in train.json and inference.json.

    Args:
        settings: id -> value (resolved config values: strings, numbers, lists, dicts).
    """

    def __init__(self, **settings) -> None:
        self.settings = {k: _plain(v) for k, v in settings.items()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def mismatches(self, saved: dict) -> list[str]:
        """The recorded settings whose value in ``saved`` differs from this run's."""
        return [k for k, v in self.settings.items() if k in saved and saved[k] != v]

    def load_state_dict(self, saved: dict, path: str | os.PathLike | None = None) -> None:
        where = f"checkpoint {path}" if path else "the checkpoint"
        foreign = sorted(k for k in saved if k not in self.settings)
        lacking = [k for k in self.settings if k not in saved]
        # each record lacks settings of the other: another bundle's weights (d3m's given to iterunet share
        # only network_size); a record that is a subset (older weights, before a setting was recorded) is fine
        if foreign and lacking:
            raise ValueError(
                f"{where}: not weights of this bundle: it records settings this bundle does not have "
                f"({', '.join(foreign)}; trained by another bundle?); give the model.pt this bundle's training "
                f"wrote (--ckpt_path)"
            )
        wrong = self.mismatches(saved)
        if wrong:
            what = "; ".join(f"{k}: the checkpoint has {saved[k]!r}, this run {self.settings[k]!r}" for k in wrong)
            hint = " ".join(f"--{k} {_cli(saved[k])}" for k in wrong)
            raise ValueError(
                f"{where} was trained with other settings ({what}): pass {hint} "
                "(or the checkpoint that matches this configuration)"
            )


def _cli(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value).replace(" ", "")


def _read_checkpoint(path: str | os.PathLike) -> dict:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a checkpoint, or pickled code (weights_only refuses it)
        raise ValueError(
            f"cannot read the checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint (a dict of state dicts): {type(ckpt).__name__}")
    return ckpt


def recorded_setting(path: str | os.PathLike, key: str, default=None):
    """The value of ``key`` recorded in the checkpoint at ``path`` (its ``"config"`` entry, see
    :class:`ConfigRecord`), or ``default`` when there is no readable checkpoint or no record.

    Used for ``network_size`` in inference configs: weights trained with the paper-sized network on
    a GPU load with the right preset on a CPU machine without any override."""
    if not path or not Path(path).is_file():
        return default
    try:
        record = _read_checkpoint(path).get("config")
    except ValueError:
        return default  # check_checkpoint reports the unreadable file with its reason
    return record.get(key, default) if isinstance(record, dict) else default


def check_checkpoint(path: str | os.PathLike, record: ConfigRecord | None = None) -> str:
    """Fail early, saying what to do, when the trained weights are missing or unreadable, or were
    trained with other settings than ``record`` (e.g. ``--network_size``): one message naming the
    file and each differing setting, before any network is built or data read."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"no trained weights at {path}: train the bundle first (python -m monai.bundle run training "
            f"--config_file <bundle>/configs/train.json) or pass --ckpt_path <model.pt>"
        )
    saved = _read_checkpoint(path).get("config")  # a truncated or foreign file is named here, not at load time
    if record is not None and isinstance(saved, dict):
        record.load_state_dict(saved, path)
    return str(path)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", "none", ""}


def flag(value, name: str = "flag") -> bool:
    """A config switch as a bool, whether it came from JSON (``true``) or the command line.

    ``python -m monai.bundle run ... --resume false`` hands the config the *string* ``"false"``,
    which Python reads as true; every boolean a user may override is read through this function.

    Raises:
        ValueError for anything that is not a recognisable yes/no, naming ``name`` and the value.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def one_of(value, choices, name: str):
    """``value`` when it is one of ``choices`` (e.g. a multi-task bundle's ``--task``), else ``ValueError``
    naming the setting and the choices (a config would otherwise fail with a bare ``KeyError``)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"--{name} {value!r}: expected one of {', '.join(map(str, choices))}")
    return value


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1, else ``ValueError`` naming the setting (``--num_iterations 0``,
    ``--batch_size -4``, ``--epoch_length 0`` would otherwise be coerced or fail deep inside)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}: expected a whole number >= 1, got {value!r}") from None
    if number < 1 or number != float(value):
        raise ValueError(f"--{name}: expected a whole number >= 1, got {value!r}")
    return number


def warmup_length(warmup, num_iterations, name: str = "warmup_steps") -> int:
    """The learning-rate warm-up in iterations (>= 1), with a warning naming the setting when it takes
    more than a quarter of the run: a paper's warm-up (DCE-diff: 10,000 iterations) in a short run keeps
    the learning rate near zero, and the loss does not move (300 iterations reach 3 % of ``lr``)."""
    w, n = max(1, int(warmup)), positive_int(num_iterations, "num_iterations")
    if w > n / 4:
        logging.getLogger(__name__).warning(
            "--%s %d: the learning rate warms up over %d of the run's %d iterations and reaches %.0f %% of"
            " --lr by its end; set a shorter --%s for a short run",
            name, w, min(w, n), n, 100 * min(1.0, n / w), name,
        )  # fmt: skip
    return w


def slice_batching(batch_size, slices_per_volume) -> tuple[int, int]:
    """``(volumes, slices)`` per training step with exactly ``batch_size`` slices in all.

    ``batch_size`` is what a user reads it as, the number of 2D slices per optimiser step;
    ``slices_per_volume`` is the most slices one volume contributes. The slices actually drawn per
    volume are the largest divisor of ``batch_size`` that is <= ``slices_per_volume``, so
    ``volumes * slices == batch_size`` always (batch 8, up to 4 per volume: 2 x 4; batch 6: 2 x 3;
    batch 2: 1 x 2)."""
    b = positive_int(batch_size, "batch_size")
    s = positive_int(slices_per_volume, "slices_per_volume")
    slices = max(d for d in range(1, min(b, s) + 1) if b % d == 0)
    return b // slices, slices


def training_epochs(num_iterations, epoch_length) -> tuple[int, int]:
    """``(max_epochs, epoch_length)`` for a run of exactly ``num_iterations`` iterations: the last
    epoch is cut short by :class:`common.handlers.StopAtIteration` when ``num_iterations`` is not a
    multiple of ``epoch_length``."""
    n = positive_int(num_iterations, "num_iterations")
    e = min(positive_int(epoch_length, "epoch_length"), n)
    return -(-n // e), e
