"""A MONAI Label infer task that runs one of this repository's bundles on a single study.

Everything the model does comes from the bundle's own ``configs/inference.json`` through
:class:`monai.bundle.ConfigParser`: the case (its ``datalist`` expression), ``preprocessing``,
``network_def`` and its checkpoint, ``inferer``, ``postprocessing`` and the output geometry (the
config's writer handler). This module only maps MONAI Label's request onto those pieces.
"""

from __future__ import annotations

import json
import logging
import os
import pydoc
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from common.bundle import bundle_root, check_checkpoint
from common.handlers.writer import SynthesisWriter, as_numpy, source_file
from common.io import save_nifti

logger = logging.getLogger(__name__)

# config ids through which a bundle's inference.json takes one study: a prepared case folder, or one volume
SOURCE_IDS = ("case_dir", "input_file")


def config_value(text: str) -> Any:
    """A ``--conf`` value as the bundle command line reads it: JSON (``2``, ``true``, ``[64,64]``) or a string."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def bundle_overrides(conf: Mapping[str, str], name: str) -> dict[str, Any]:
    """The ``<name>.<id> <value>`` entries of the app's ``--conf`` as ``{id: value}`` config overrides."""
    prefix = f"{name}."
    return {k[len(prefix) :]: config_value(v) for k, v in conf.items() if k.startswith(prefix)}


class StudyError(ValueError):
    """A request whose ``image`` is not a series of a study the bundle can read (the message says why)."""


class CheckpointError(RuntimeError):
    """The task's weights are missing, unreadable or were trained with other settings (the message says which)."""


class StudyFromImaged:
    """Fill a request with the bundle's datalist entry of the study its ``image`` belongs to.

    ``image`` names one series file. For a bundle that reads a prepared case (``case_dir``), the
    case is the file's folder and the other series are found beside it by the bundle's own
    ``datalist`` expression; for one that reads a single volume (``input_file``), it is the file.
    The request's ``image`` is replaced by the entry (MONAI Label keeps it as ``image_path``): the
    bundle's transforms make their own ``image``. Raises :class:`StudyError` naming what is wrong.

    Args:
        task: the :class:`BundleSynthesisTask` whose config builds the entry.
    """

    def __init__(self, task: BundleSynthesisTask) -> None:
        self.task = task

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = d.get("image")
        if not isinstance(image, (str, os.PathLike)):
            raise StudyError(f"{self.task.name}: the request's image must be the path of a series file, got {image!r}")
        image = Path(image).expanduser().resolve()
        if not image.is_file():
            raise StudyError(f"{self.task.name}: request image {image} does not exist")
        source = str(image.parent) if self.task.source_id == "case_dir" else str(image)
        try:
            entries = self.task.parser(**{self.task.source_id: source}).get_parsed_content("datalist")
        except Exception as e:  # the bundle's own message (below ConfigParser's) names the folder and missing series
            while e.__cause__ is not None:
                e = e.__cause__
            raise StudyError(f"{self.task.name}: request image {image} is not part of a complete study: {e}") from None
        entry = entries[0]
        series = {k: str(Path(v).resolve()) for k, v in entry.items() if k != "id" and isinstance(v, str)}
        if str(image) not in series.values():
            raise StudyError(
                f"{self.task.name}: request image {image} is not a series of the case {image.parent}; "
                f"the case has {', '.join(sorted(Path(v).name for v in series.values()))}"
            )
        d.pop("image")
        d.update(entry)
        return d


class BundleSynthesisTask(BasicInferTask):
    """Synthesis (not segmentation) with one bundle of this repository, as a MONAI Label infer task.

    The result is an image, not a label: a NIfTI volume in the intensity units of the bundle's
    outputs, with exactly the affine of the input the bundle writes its outputs on (the writer
    handler's ``geometry_key``), one channel per output along the 4th axis in the order of
    ``output_names`` (a 3D volume when the bundle has one output, e.g. ``ressrdiff``). The result's
    ``params`` name the channels. With ``num_samples > 1`` it is the mean of the samples.

    Args:
        bundle: a bundle name (``resdce``, ``dcediff``, ``ressrdiff``) or the path of a bundle folder.
        overrides: config ids and values, as ``--<id> <value>`` on the bundle's command line
            (e.g. ``{"ckpt_path": ..., "num_inference_steps": 4}``).
        description: shown by MONAI Label's ``/info``.
    """

    def __init__(
        self, bundle: str | os.PathLike, overrides: Mapping[str, Any] | None = None, description: str | None = None
    ) -> None:
        self.bundle_dir = Path(bundle) if os.sep in str(bundle) else Path(bundle_root(str(bundle)))
        self.name = self.bundle_dir.name
        self.config_file = self.bundle_dir / "configs" / "inference.json"
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.name}: no bundle config at {self.config_file}")
        self.overrides = dict(overrides or {})
        self.bundle_config = self.parser()
        self.source_id = next((k for k in SOURCE_IDS if k in self.bundle_config), None)
        if self.source_id is None:
            raise ValueError(f"{self.config_file}: defines none of {SOURCE_IDS}, so it cannot take a single study")
        self.output_writer = self.bundle_config.get_parsed_content(self._writer_id())
        self.output_names = list(self.output_writer.output_names)
        self.geometry_key = self.output_writer.geometry_key
        self.record = (
            self.bundle_config.get_parsed_content("checkpoint_record")
            if "checkpoint_record" in self.bundle_config
            else None
        )
        super().__init__(
            path=str(self.bundle_config.get_parsed_content("ckpt_path")),
            network=self.bundle_config.get_parsed_content("network_def"),
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description=description or f"{self.name}: synthesises {', '.join(self.output_names)} (an image)",
            config={"bundle": self.name, "channels": self.output_names},
        )

    def parser(self, **extra: Any) -> ConfigParser:
        """The bundle's inference config with the app's overrides and ``extra`` applied."""
        p = ConfigParser()
        p.read_config(str(self.config_file))
        p.update({**self.overrides, **extra})
        return p

    def _writer_id(self) -> str:
        for i, h in enumerate(self.bundle_config["handlers"]):
            cls = pydoc.locate(str(h.get("_target_", "")))
            if isinstance(cls, type) and issubclass(cls, SynthesisWriter):
                return f"handlers#{i}"
        raise NotImplementedError(
            f"{self.config_file}: no common.handlers.SynthesisWriter handler, so this app does not know the output geometry"
        )

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [StudyFromImaged(self), *self.bundle_config.get_parsed_content("preprocessing").transforms]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return list(self.bundle_config.get_parsed_content("postprocessing").transforms)

    def inferer(self, data=None):
        return self.bundle_config.get_parsed_content("inferer")

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        try:  # missing, unreadable or contradicting weights, named before any work
            check_checkpoint(self.path[0], self.record)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.name}: {e} (set it with --conf {self.name}.ckpt_path <model.pt>)") from None
        return super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[str, dict]:
        pred = as_numpy(data["pred"])
        src = source_file(data, self.geometry_key)
        affine, grid = self.output_writer.reference_grid(data, src)
        if pred.shape != (len(self.output_names), *grid):
            raise ValueError(f"{self.name}: prediction {pred.shape} does not fit {self.output_names} on {src} {grid}")
        fd, path = tempfile.mkstemp(prefix=f"{self.name}_", suffix=".nii.gz")
        os.close(fd)
        save_nifti(pred[0] if pred.shape[0] == 1 else np.moveaxis(pred, 0, -1), affine, path)
        return path, {"bundle": self.name, "channels": self.output_names, "geometry": src}
