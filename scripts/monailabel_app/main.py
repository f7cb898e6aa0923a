"""MONAI Label app serving this repository's synthesis bundles (``--conf models <name>,<name>,...``: every
bundle folder of ``bundles/`` with a ``configs/contract.json``, or a bundle folder's path).

Start it with ``serve.py`` beside this file (``monailabel start_server`` plus one compatibility fix,
see README.md). Each bundle's config ids can be overridden with ``--conf <bundle>.<id> <value>``,
e.g. ``--conf resdce.ckpt_path /path/model.pt --conf resdce.num_inference_steps 4``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fastapi import HTTPException
from lib.infers import BundleSynthesisTask, CheckpointError, StudyError, bundle_overrides
from monailabel.interfaces.app import MONAILabelApp

from common.bundle import find_bundles

logger = logging.getLogger(__name__)


class GadofreeApp(MONAILabelApp):
    """Infer tasks only (synthesis has no labels to train on): one :class:`BundleSynthesisTask` per
    bundle named in ``--conf models`` (comma-separated names of ``bundles/`` or bundle folders; default: the
    first bundle there). A bundle is served when its ``configs/contract.json`` says what it reads and writes."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        known = [p.name for p in find_bundles()]
        self.models = [m.strip() for m in conf.get("models", known[0] if known else "").split(",") if m.strip()]
        unknown = [m for m in self.models if os.sep not in m and m not in known]
        if unknown or not self.models:
            raise ValueError(
                f"--conf models: {', '.join(unknown) or 'none'} not served by this app (choose from {known})"
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="gadofree-bundles",
            description="Gadolinium-free contrast synthesis and MRI super-resolution (research use only)",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, BundleSynthesisTask]:
        tasks = [
            BundleSynthesisTask(m, overrides=bundle_overrides(self.conf, os.path.basename(m))) for m in self.models
        ]
        return {t.name: t for t in tasks}

    def init_trainers(self) -> dict:
        return {}

    def init_strategies(self) -> dict:
        return {}

    def init_scoring_methods(self) -> dict:
        return {}

    def study_image(self, image) -> str:
        """The absolute path of a request's ``image``, which must be a file inside the app's datastore (the
        ``--studies`` folder, symbolic links resolved): absolute, or relative to that folder.

        Raises:
            HTTPException: 400 no image, 403 a path outside the studies folder, 404 no such file in it.
        """
        studies = Path(self.studies).expanduser().resolve()
        if not isinstance(image, str) or not image:
            raise HTTPException(400, "no image: name a series file of the studies folder with ?image=<path>")
        path = Path(image).expanduser()
        path = (path if path.is_absolute() else studies / path).resolve()
        if not path.is_relative_to(studies):
            raise HTTPException(
                403,
                f"request image {image}: outside the app's datastore {studies} "
                "(requests may name only images of the --studies folder)",
            )
        if not path.is_file():
            raise HTTPException(404, f"request image {image}: no such file in the studies folder {studies}")
        return str(path)

    def check_request(self, model: str, image: str, session_id: str, params: str) -> dict:
        """The checks of a ``POST /infer/<model>`` request before MONAI Label reads it: a served ``model``,
        an ``image`` (or session), ``params`` a JSON object with only the keys the task accepts
        (:meth:`BundleSynthesisTask.check_params`). Returns the params. Raises HTTPException (4xx, one line)."""
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}: this app serves {', '.join(sorted(self._infers))}")
        if not image and not session_id:
            raise HTTPException(400, "no image: name a series file of the studies folder with ?image=<path>")
        try:
            p = json.loads(params) if params else {}
        except ValueError as e:
            raise HTTPException(400, f'params: not JSON ({e}); send a JSON object, e.g. {{"num_samples": 2}}') from None
        if not isinstance(p, dict):
            raise HTTPException(400, f"params: must be a JSON object, got {type(p).__name__} {params[:80]}")
        try:
            self._infers[model].check_params(p)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return p

    def infer(self, request, datastore=None):
        """``image`` is a series file inside the studies folder (absolute or relative to it, e.g.
        ``<case>/t2w.nii.gz``; anything else: 403, :meth:`study_image`). A request whose image is not part of
        a study the bundle reads is answered 400 with the reason, one whose task has no usable weights 500
        with the file and the reason."""
        request = {**request, "image": self.study_image(request.get("image"))}
        try:
            return super().infer(request, datastore)
        except (StudyError, ValueError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        except CheckpointError as e:
            raise HTTPException(status_code=500, detail=str(e)) from None


UPLOAD_REFUSED = (
    "uploads are not supported by this app (it synthesises only studies of its --studies folder): "
    "name a series file of that folder with ?image=<path>; the file sent was not kept"
)


def guard_infer_endpoint() -> None:
    """Check ``POST /infer/<model>`` before MONAI Label's ``run_inference`` reads it (it parses ``params``
    with a bare ``json.loads`` and writes an uploaded file to a temporary file it removes only after a
    successful answer): uploads are refused (400, nothing written), then :meth:`GadofreeApp.check_request`.
    MONAI Label's endpoint calls ``run_inference`` by its module name, so wrapping that name is enough."""
    import monailabel.endpoints.infer as endpoint
    from monailabel.interfaces.utils.app import app_instance

    original = endpoint.run_inference
    if getattr(original, "gadofree_guard", False):
        return

    def run_inference(
        background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None
    ):
        if file is not None or label is not None:
            raise HTTPException(400, UPLOAD_REFUSED)
        instance = app_instance()
        if isinstance(instance, GadofreeApp):
            instance.check_request(model, image, session_id, params)
        return original(background_tasks, model, image, session_id, params, file, label, output)

    run_inference.gadofree_guard = True
    endpoint.run_inference = run_inference


guard_infer_endpoint()
