"""MONAI Label app serving this repository's synthesis bundles (``--conf models <name>,<name>,...``: every
bundle folder of ``bundles/`` with a ``configs/contract.json``, or a bundle folder's path).

Start it with ``serve.py`` beside this file (``monailabel start_server`` plus one compatibility fix,
see README.md). Each bundle's config ids can be overridden with ``--conf <bundle>.<id> <value>``,
e.g. ``--conf resdce.ckpt_path /path/model.pt --conf resdce.num_inference_steps 4``.
"""

from __future__ import annotations

import logging
import os

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

    def infer(self, request, datastore=None):
        """``image`` may also be a series path relative to the studies folder (``<case>/t2w.nii.gz``).
        A request whose image is not part of a study the bundle reads is answered 400 with the reason,
        one whose task has no usable weights 500 with the file and the reason."""
        image = request.get("image")
        if isinstance(image, str) and not os.path.isabs(image) and os.path.isfile(os.path.join(self.studies, image)):
            request = {**request, "image": os.path.join(self.studies, image)}
        try:
            return super().infer(request, datastore)
        except StudyError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        except CheckpointError as e:
            raise HTTPException(status_code=500, detail=str(e)) from None
