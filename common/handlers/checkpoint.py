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
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from common.io import atomic_path

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "StopAtIteration"]

logger = logging.getLogger(__name__)


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: ``torch.save`` through a temporary file + fsync + rename; ``remove`` of an
    old checkpoint is deferred until the next save has completed.

    Args:
        dirname: folder of the checkpoints (created when missing).
        filename: fixed file name (MONAI's ``final_filename`` / ``key_metric_filename``), else the
            name ignite gives (``checkpoint_epoch=3.pt``).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        with atomic_path(self.dirname / name) as tmp:
            torch.save(checkpoint, tmp)
        for old in self._pending:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending.clear()

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` (same arguments) whose files are written atomically and
    whose previous checkpoint is removed only once its successor is on disk."""

    def __init__(self, save_dir: str, save_dict: dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, *args, **kwargs)
        for attr, name in (
            ("_final_checkpoint", self._final_filename),
            ("_key_metric_checkpoint", kwargs.get("key_metric_filename")),
            ("_interval_checkpoint", None),
        ):
            ckpt = getattr(self, attr, None)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(save_dir, name)


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
