"""``monailabel`` (start_server, apps, ...) with one compatibility fix, for this repository's environment.

MONAI Label 0.8.5 imports ``pydicom_seg`` (0.4.1, its last release) at server start, which imports
``pydicom._storage_sopclass_uids``, a module pydicom 3 removed (its names are in ``pydicom.uid``);
this project needs pydicom 3. The alias below is the only difference from the ``monailabel`` command:

    .venv/bin/python scripts/monailabel_app/serve.py start_server --app scripts/monailabel_app \
        --studies data/phantoms/prostate/prepared --conf models resdce
"""

from __future__ import annotations

import importlib.util
import sys


def alias_pydicom_sop_class_uids() -> None:
    """Make ``pydicom._storage_sopclass_uids`` importable under pydicom 3 (as ``pydicom.uid``)."""
    if importlib.util.find_spec("pydicom._storage_sopclass_uids") is None:
        import pydicom.uid

        sys.modules["pydicom._storage_sopclass_uids"] = pydicom.uid


if __name__ == "__main__":
    alias_pydicom_sop_class_uids()
    from monailabel.main import Main

    Main().run()
