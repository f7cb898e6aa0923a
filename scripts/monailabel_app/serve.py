"""``monailabel`` (start_server, apps, ...) with two fixes, for this repository's environment.

MONAI Label 0.8.5 imports ``pydicom_seg`` (0.4.1, its last release) at server start, which imports
``pydicom._storage_sopclass_uids``, a module pydicom 3 removed (its names are in ``pydicom.uid``);
this project needs pydicom 3. The alias below is applied when this file is imported, so also in the
worker processes uvicorn spawns with ``--workers N`` (they import it as their main module).

SIGTERM (or SIGINT) stops the server and every worker process: uvicorn asks them to finish their
requests; whatever still runs ``SHUTDOWN_GRACE_S`` seconds later (a long synthesis) is terminated
(:func:`stop_within`), so no uvicorn process is left serving. Otherwise this is the ``monailabel``
command:

    .venv/bin/python scripts/monailabel_app/serve.py start_server --app scripts/monailabel_app \
        --studies data/phantoms/prostate/prepared --conf models resdce
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
import threading

#: seconds a server (or worker) may take to finish its requests after SIGTERM/SIGINT before it is ended
SHUTDOWN_GRACE_S = float(os.environ.get("GADOFREE_SHUTDOWN_GRACE_S", "10"))


def alias_pydicom_sop_class_uids() -> None:
    """Make ``pydicom._storage_sopclass_uids`` importable under pydicom 3 (as ``pydicom.uid``)."""
    if importlib.util.find_spec("pydicom._storage_sopclass_uids") is None:
        import pydicom.uid

        sys.modules["pydicom._storage_sopclass_uids"] = pydicom.uid


def stop_within(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """After uvicorn's server (in this process or a worker) receives SIGTERM/SIGINT, end the process
    ``grace_s`` seconds later if its graceful shutdown has not: its child processes are terminated, then it
    exits with status 128 + the signal. uvicorn's own handling (finish requests, shutdown events) runs first."""
    import uvicorn.server

    server_cls = uvicorn.server.Server
    if getattr(server_cls.handle_exit, "gadofree_stop_within", False):
        return
    handle_exit = server_cls.handle_exit

    def end(sig: int) -> None:
        for child in multiprocessing.active_children():
            child.terminate()
        for child in multiprocessing.active_children():
            child.join(2)
            if child.is_alive():
                child.kill()
        os._exit(128 + int(sig))

    def handle_exit_within(self, sig, frame):
        if not getattr(self, "_gadofree_timer", None):
            self._gadofree_timer = threading.Timer(grace_s, end, args=(sig,))
            self._gadofree_timer.daemon = True
            self._gadofree_timer.start()
        return handle_exit(self, sig, frame)

    handle_exit_within.gadofree_stop_within = True
    server_cls.handle_exit = handle_exit_within


alias_pydicom_sop_class_uids()
stop_within()

if __name__ == "__main__":
    from monailabel.main import Main

    Main().run()
