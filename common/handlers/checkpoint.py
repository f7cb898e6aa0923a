"""Checkpoints that survive a kill: MONAI's ``CheckpointSaver`` with atomic writes and deferred removal.

MONAI's saver writes in place (ignite's ``DiskSaver(atomic=False)``) and ignite's ``Checkpoint``
removes the previous file *before* writing the new one, so a process killed during a save loses
the only checkpoint (or leaves a truncated one where good weights were). Here every file is
written to a hidden temporary file in the same folder, fsynced and renamed into place
(:func:`common.io.atomic_path`), and the file a save replaces is deleted only after the new one is
complete.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from common.io import atomic_path

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "ResumeLog", "StopAtIteration"]

logger = logging.getLogger(__name__)


_NUMBERED = re.compile(r"^(.+_[A-Za-z]+)=(\d+)\.pt$")  # ignite's "<prefix>_<epoch|iteration>=<n>.pt"


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: ``torch.save`` through a temporary file + fsync + rename; ``remove`` of an
    old checkpoint is deferred until the next save has completed.

    Across restarts: ignite only knows the files of its own run, so the numbered checkpoints of an
    earlier run (``checkpoint_epoch=3.pt`` after a resume at epoch 3) would pile up. After each
    completed save of a numbered checkpoint, all but the newest ``keep`` numbered files in the folder
    are removed; the first save also removes hidden temporary files a killed run left behind.

    Args:
        dirname: folder of the checkpoints (created when missing).
        filename: fixed file name (MONAI's ``final_filename`` / ``key_metric_filename``), else the
            name ignite gives (``checkpoint_epoch=3.pt``).
        keep: numbered checkpoints to keep (ignite's ``n_saved``); ``None`` keeps every one.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, keep: int | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self.keep = keep
        self._pending: list[str] = []
        self._swept = False

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        if not self._swept:
            self._sweep_temporaries()
        with atomic_path(self.dirname / name) as tmp:
            torch.save(checkpoint, tmp)
        for old in self._pending:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending.clear()
        if self.keep and (m := _NUMBERED.match(name)):
            self._prune(name, m.group(1))

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)

    def _sweep_temporaries(self) -> None:
        """Remove ``.<name>.*.tmp.pt`` files: the unfinished writes of a killed run (one run per folder)."""
        self._swept = True
        for tmp in self.dirname.glob(".*.tmp*.pt"):
            logger.info("removing the unfinished checkpoint write %s of an earlier run", tmp)
            tmp.unlink(missing_ok=True)

    def _prune(self, just_saved: str, stem: str) -> None:
        """Keep the newest ``keep`` files named ``<stem>=<n>.pt`` (the series ``just_saved`` belongs to)."""
        numbered = sorted(
            (int(m.group(2)), p)
            for p in self.dirname.iterdir()
            if (m := _NUMBERED.match(p.name)) is not None and m.group(1) == stem
        )
        for _, path in numbered[: max(len(numbered) - int(self.keep), 0)]:
            if path.name != just_saved:
                logger.info("removing the superseded checkpoint %s", path)
                path.unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` (same arguments) whose files are written atomically and
    whose previous checkpoint is removed only once its successor is on disk; numbered checkpoints
    left by earlier runs are pruned to ``n_saved`` (see :class:`AtomicDiskSaver`)."""

    def __init__(self, save_dir: str, save_dict: dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, *args, **kwargs)
        for attr, name, keep in (
            ("_final_checkpoint", self._final_filename, None),
            ("_key_metric_checkpoint", kwargs.get("key_metric_filename"), None),
            ("_interval_checkpoint", None, kwargs.get("n_saved", 1)),
        ):
            ckpt = getattr(self, attr, None)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(save_dir, name, keep)


class ResumeLog:
    """Ignite handler: after a ``CheckpointLoader`` restored a run (list it after the loader), log
    where the run really continues; ignite's own "resuming from iteration 0" line is written before
    the checkpoint is loaded.

    Args:
        path: the checkpoint resumed from (``""``: a fresh run, nothing is logged).
    """

    def __init__(self, path: str | os.PathLike = "") -> None:
        self.path = str(path or "")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        if self.path:
            s = engine.state
            engine.logger.info(
                f"resumed from {self.path}: continuing after iteration {s.iteration} (epoch {s.epoch} of "
                f"{s.max_epochs}, {s.epoch_length} iterations per epoch)"
            )


class StopAtIteration:
    """Ignite handler: end the run after exactly ``iteration`` iterations (``num_iterations`` need
    not be a multiple of ``epoch_length``). The last, shortened epoch still completes
    (``EPOCH_COMPLETED``: validation, epoch checkpoints) and so does the run (``COMPLETED``: the final
    checkpoint and model); a run resumed at or past that iteration stops at once."""

    def __init__(self, iteration: int) -> None:
        self.iteration = int(iteration)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        engine.add_event_handler(Events.EPOCH_STARTED, self.on_epoch_started)

    def on_iteration(self, engine) -> None:
        if engine.state.iteration >= self.iteration and engine.state.iteration % engine.state.epoch_length:
            engine.terminate_epoch()  # mid-epoch: close this (last) epoch now

    def on_epoch_started(self, engine) -> None:
        if engine.state.iteration >= self.iteration:
            engine.terminate()
