"""A MONAI Label infer task that runs one of this repository's bundles on a single study.

Everything the model does comes from the bundle's own inference config
(:func:`common.bundle.bundle_config` of its ``infer`` files) and its ``configs/contract.json``
(:func:`common.bundle.read_contract`: the config id that takes a study, the label outputs): the case (its ``datalist`` expression), ``preprocessing``,
``network_def`` and its checkpoint, ``prepare_batch`` (where the config has one), ``inferer``,
``postprocessing`` and the output channels and geometry (read from the config's writer handler,
:class:`OutputLayout`). This module only maps MONAI Label's request onto those pieces.
"""

from __future__ import annotations

import json
import logging
import os
import pydoc
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from common.bundle import bundle_config, check_checkpoint, read_contract, workflow_files
from common.handlers.writer import as_numpy, source_file
from common.io import save_nifti

logger = logging.getLogger(__name__)


class OutputLayout:
    """The channel names and output grid of a bundle's writer handler, read from its public attributes.

    Two kinds of writer:

    * fixed channels (``common.handlers.SynthesisWriter`` and its subclasses, e.g. ``D3MWriter``):
      ``output_names`` (one per ``pred`` channel), ``geometry_key`` and ``reference_grid(item, src)``;
    * a predicted time series (e.g. ``IterUNetWriter``): ``series_key`` (the 4D series whose file gives
      the affine and grid), ``times_key`` (the case's frame times, seconds), ``start`` (the start
      phase) and ``frame_names(times_s)`` (the names of the time points after ``start``), so the
      channels depend on the case.

    Args:
        writer: the instantiated writer handler of the bundle's ``handlers``.

    Raises:
        NotImplementedError: a writer with neither set of attributes.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        if hasattr(writer, "output_names") and hasattr(writer, "geometry_key"):
            self.kind = "fixed"
            self.geometry_key = writer.geometry_key
        elif all(hasattr(writer, a) for a in ("series_key", "times_key", "start", "frame_names")):
            self.kind = "time_series"
            self.geometry_key = writer.series_key
        else:
            raise NotImplementedError(
                f"{type(writer).__name__}: neither output_names/geometry_key nor series_key/times_key/start/frame_names, "
                "so this app does not know the output channels and grid"
            )

    @property
    def static_names(self) -> list[str] | None:
        """The channel names when they do not depend on the case (else None)."""
        return list(self.writer.output_names) if self.kind == "fixed" else None

    def names(self, data: Mapping) -> list[str]:
        """Channel names of one post-processed request."""
        if self.kind == "fixed":
            return list(self.writer.output_names)
        return list(self.writer.frame_names(self.times(data)))

    def times(self, data: Mapping) -> list[float]:
        """The case's frame times in seconds (T,) (time-series writers only)."""
        return [float(t) for t in as_numpy(data[self.writer.times_key]).astype(np.float64).ravel()]

    def grid(self, data: Mapping) -> tuple[str, np.ndarray, tuple[int, ...]]:
        """``(source file, 4x4 affine, spatial shape)`` the outputs are written on, as the writer does."""
        src = source_file(data, self.geometry_key)
        if self.kind == "fixed":
            affine, grid = self.writer.reference_grid(data, src)
            return src, np.asarray(affine, dtype=np.float64), tuple(grid)
        ref = nib.load(src)
        return src, np.asarray(ref.affine, dtype=np.float64), tuple(ref.shape[:3])


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
        result = d.get("result_key") or "image"
        if result not in ("image", *self.task.label_outputs):
            raise StudyError(
                f"{self.task.name}: result_key {result!r} is not one of {['image', *self.task.label_outputs]}"
            )
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
    handler's ``geometry_key``, or ``series_key`` for iterunet), one channel per output along the
    4th axis in the order of ``output_names`` (a 3D volume when the bundle has one output, e.g.
    ``ressrdiff``), or, for a bundle that predicts a time series (iterunet), one per predicted time
    point (``t<seconds>s``, computed per request from the case's times: :class:`OutputLayout`). The
    result's ``params`` name the channels (and the times). With ``num_samples > 1`` it is the mean
    of the samples. A request with ``"result_key": "et_mask"`` in its params (d3m) gets the
    enhancing-tumour mask instead (uint8, same affine); every d3m answer's params give its volume.

    Args:
        bundle: a bundle name (a folder of ``bundles/`` with a ``configs/contract.json``) or the path of a
            bundle folder.
        overrides: config ids and values, as ``--<id> <value>`` on the bundle's command line
            (e.g. ``{"ckpt_path": ..., "num_inference_steps": 4}``).
        description: shown by MONAI Label's ``/info``.
    """

    def __init__(
        self, bundle: str | os.PathLike, overrides: Mapping[str, Any] | None = None, description: str | None = None
    ) -> None:
        # a bundle with several tasks runs the one its overrides name (--conf <bundle>.<task_id> <task>), else its default
        self.contract = read_contract(bundle, overrides=overrides)
        self.bundle_dir = self.contract.root
        self.name = self.contract.name
        self.config_files = workflow_files(self.bundle_dir, "infer")
        self.config_file = self.config_files[-1]
        missing = [str(f) for f in self.config_files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.name}: no bundle config at {', '.join(missing)}")
        self.overrides = {**self.contract.overrides, **dict(overrides or {})}
        self.bundle_config = self.parser()
        self.source_id = self.contract.source_id
        if self.source_id not in self.bundle_config:
            raise ValueError(
                f"{self.config_file}: does not define {self.source_id!r}, the id through which its contract "
                "says it takes a single study"
            )
        self.output_writer = self.bundle_config.get_parsed_content(self._writer_id())
        self.layout = OutputLayout(self.output_writer)
        self.output_names = self.layout.static_names  # None: per case (a predicted time series)
        self.geometry_key = self.layout.geometry_key
        self.label_outputs = self.contract.label_outputs  # label maps a request may ask for (``result_key``)
        self.prepare_batch = (
            self.bundle_config.get_parsed_content("prepare_batch") if "prepare_batch" in self.bundle_config else None
        )
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
            description=description or f"{self.name}: synthesises {self._what()} (an image)",
            config={
                "bundle": self.name,
                "channels": self.output_names if self.output_names is not None else self._what(),
                "results": ["image", *self.label_outputs],
            },
        )

    def _what(self) -> str:
        if self.output_names is not None:
            return ", ".join(self.output_names)
        return f"the time points after start_phase {self.output_writer.start} (per case, t<seconds>s)"

    def parser(self, **extra: Any):
        """The bundle's inference config (a ``monai.bundle.ConfigParser``) with the app's overrides and ``extra``."""
        return bundle_config(self.config_files, {**self.overrides, **extra})

    def _writer_id(self) -> str:
        """The config id of the handler that writes the outputs: the one whose class has ``write_case``
        (``SynthesisWriter`` and its subclasses, ``IterUNetWriter``)."""
        for i, h in enumerate(self.bundle_config["handlers"]):
            cls = pydoc.locate(str(h.get("_target_", "")))
            if isinstance(cls, type) and callable(getattr(cls, "write_case", None)):
                return f"handlers#{i}"
        raise NotImplementedError(
            f"{self.config_file}: no writer handler (a class with write_case), so this app does not know the outputs"
        )

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [StudyFromImaged(self), *self.bundle_config.get_parsed_content("preprocessing").transforms]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return list(self.bundle_config.get_parsed_content("postprocessing").transforms)

    #: config ids a request's ``params`` may set for this one request (where the bundle has them)
    REQUEST_CONFIG_IDS = ("num_inference_steps", "num_samples")

    def request_params(self) -> list[str]:
        """The keys a request's ``params`` may hold: ``device`` (MONAI Label's: ``cpu``, ``cuda``, ``cuda:<n>``),
        ``result_key`` (where the bundle has label outputs) and the :attr:`REQUEST_CONFIG_IDS` the bundle's
        config defines (e.g. not iterunet's)."""
        ids = [i for i in self.REQUEST_CONFIG_IDS if i in self.bundle_config]
        return ["device", *(["result_key"] if self.label_outputs else []), *ids]

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Refuse a request's ``params`` with a key this task does not read or a value it cannot use.

        Raises:
            ValueError: one line naming the key(s) and what is accepted.
        """
        accepted = self.request_params()
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ValueError(
                f"params: {', '.join(map(repr, unknown))} not accepted by {self.name} (accepted: {', '.join(accepted)})"
            )
        for key in self.REQUEST_CONFIG_IDS:
            value = params.get(key)
            if key in params and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"params: {key} must be a positive integer, got {value!r}")
        device = params.get("device")
        if "device" in params and not (
            isinstance(device, str)
            and (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()))
        ):
            raise ValueError(f"params: device must be 'cpu', 'cuda' or 'cuda:<n>', got {device!r}")
        if "result_key" in params and params["result_key"] not in ("image", *self.label_outputs):
            raise ValueError(
                f"{self.name}: result_key {params['result_key']!r} is not one of {['image', *self.label_outputs]}"
            )

    def inferer(self, data=None):
        """The bundle's ``inferer``; with ``num_inference_steps``/``num_samples`` in the request, the one its
        config builds with those values (the sampler's schedule included, e.g. dcediff's)."""
        request = {k: data[k] for k in self.REQUEST_CONFIG_IDS if data and k in data and k in self.bundle_config}
        if request:
            return self.parser(**request).get_parsed_content("inferer")
        return self.bundle_config.get_parsed_content("inferer")

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        try:  # missing, unreadable or contradicting weights, named before any work
            check_checkpoint(self.path[0], self.record)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.name}: {e} (set it with --conf {self.name}.ckpt_path <model.pt>)") from None
        if self.prepare_batch is None:
            return super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        # the bundle's own batch preparation (as its evaluator's): inputs, targets, args and kwargs of the
        # inferer (iterunet: the series and its frame times)
        network = self._get_network(device, data)
        batch = {k: torch.as_tensor(v)[None] for k, v in data.items() if isinstance(v, (torch.Tensor, np.ndarray))}
        inputs, _, args, kwargs = self.prepare_batch(batch, torch.device(device))
        with torch.no_grad():
            outputs = self.inferer(data)(inputs, network, *args, **kwargs)
        data[self.output_label_key] = outputs[0]
        return data

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[str, dict]:
        """The result file and its params.

        The image (default): float32 NIfTI, one channel per output along the 4th axis (3D for a single
        fixed output), the writer's affine. ``"result_key": "<key>"`` in the request's params (one of the
        task's ``results``, e.g. d3m's ``et_mask``) returns that label volume instead (uint8, same
        affine). ``params``: ``channels``, ``geometry`` (the file whose affine the result has),
        ``result_key``, ``num_inference_steps`` and ``num_samples`` (where the bundle has them), for a time series ``times_s`` (the predicted time points) and ``start_phase``, for
        each label output its voxel count and volume (``<key>_voxels``, ``<key>_ml``).
        """
        pred = as_numpy(data["pred"])
        src, affine, grid = self.layout.grid(data)
        names = self.layout.names(data)
        if pred.shape != (len(names), *grid):
            raise ValueError(f"{self.name}: prediction {pred.shape} does not fit {names} on {src} {grid}")
        params: dict[str, Any] = {"bundle": self.name, "channels": names, "geometry": src}
        for key in self.REQUEST_CONFIG_IDS:  # the values this answer was computed with
            if key in self.bundle_config:
                params[key] = data[key] if key in data else self.bundle_config.get_parsed_content(key)
        if self.layout.kind == "time_series":
            start = int(self.output_writer.start)
            params.update(start_phase=start, times_s=self.layout.times(data)[start + 1 :])
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
        labels = {}
        for key in self.label_outputs:
            if data.get(key) is not None:
                labels[key] = as_numpy(data[key])[0] > 0.5
                params[f"{key}_voxels"] = int(labels[key].sum())
                params[f"{key}_ml"] = round(params[f"{key}_voxels"] * voxel_ml, 4)
        result = str(data.get("result_key") or "image")
        if result not in ("image", *labels):
            raise StudyError(f"{self.name}: result_key {result!r} is not one of {['image', *labels]}")
        params["result_key"] = result
        fd, path = tempfile.mkstemp(prefix=f"{self.name}_{result}_", suffix=".nii.gz")
        os.close(fd)
        if result != "image":
            save_nifti(labels[result], affine, path, dtype=np.uint8)
            params["channels"] = [result]
        elif self.layout.kind == "fixed" and pred.shape[0] == 1:
            save_nifti(pred[0], affine, path)
        else:
            save_nifti(np.moveaxis(pred, 0, -1), affine, path)
        return path, params
