"""Config and command-line helpers every bundle config calls: where the bundle lies, yes/no
switches typed on the command line, and the checkpoints a run resumes from or infers with."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

__all__ = [
    "ConfigRecord",
    "bundle_root",
    "check_checkpoint",
    "flag",
    "latest_checkpoint",
    "positive_int",
    "recorded_setting",
    "slice_batching",
    "training_epochs",
]


def bundle_root(name: str) -> str:
    """Absolute path of a bundle folder, independent of the working directory.

    The folder of the ``--config_file`` given to ``python -m monai.bundle run`` wins (its parent's
    parent, when that holds ``configs/metadata.json``), so a bundle copied out of this repository
    works where it lies; otherwise ``bundles/<name>`` of the repository this package lives in.
    """
    argv = " ".join(sys.argv)
    for match in re.finditer(r"([^\s'\"\[\],=]+/configs/[^\s'\"\[\],]+\.(?:json|yaml|yml))", argv):
        root = Path(match.group(1)).expanduser().resolve().parent.parent
        if (root / "configs" / "metadata.json").exists():
            return str(root)
    return str(Path(__file__).resolve().parents[1] / "bundles" / name)


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
