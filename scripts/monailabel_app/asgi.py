"""MONAI Label's ASGI app with the pydicom 3 fix of ``serve.py``, for the plain ``monailabel`` command
(run from the repository root, with the venv's python first on PATH):

    monailabel start_server --app scripts/monailabel_app --studies data/phantoms/prostate/prepared \
        --conf models resdce --uvicorn_app scripts.monailabel_app.asgi:app
"""

from scripts.monailabel_app.serve import alias_pydicom_sop_class_uids

alias_pydicom_sop_class_uids()

from monailabel.app import app  # noqa: E402

__all__ = ["app"]
