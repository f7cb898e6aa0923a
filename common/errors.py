"""One line for a user's mistake, the whole traceback for a bug.

``python -m monai.bundle run`` reports a bad setting or a bad file as a 300-line traceback: MONAI
wraps the clear message a check raised (``--device cuda: CUDA is not available ...``) in
"Failed to evaluate ConfigExpression" and "applying transform" errors, so the line that says what
to do sits at line 70 of 330. :func:`install` replaces ``sys.excepthook`` so that such a run ends
with that message alone::

    error: --device cuda: CUDA is not available on this machine (...); use --device cpu, ...
    (set GADOFREE_DEBUG=1 for the full traceback)

Only *user errors* are shortened: the innermost exception of the chain is one of
:data:`USER_ERRORS` and was raised by this package's own code (a check that words its message for
the user). Anything else, a bug included, keeps Python's full traceback. ``GADOFREE_DEBUG=1`` (or
``true``) always shows the full traceback.

Ignite and MONAI log an exception before they re-raise it: the engine's logger says "Current run
is terminating due to exception" and MONAI's ``StatsHandler`` logs "Exception: ..." with the whole
traceback, once per engine (a validator inside a trainer doubles it), so the clear line came after
120-160 lines and 4-6 tracebacks. :func:`install` also drops those records, and only those: a
record of level ERROR or above logged while a user error is being handled, that carries the
exception (``logger.exception``) or comes from an ignite engine's logger (:class:`UserErrorLogFilter`).
Other records, and every record of a bug, are kept; ``GADOFREE_DEBUG=1`` keeps everything.

``import common`` installs the hook when the process is ``python -m monai.bundle`` (every bundle
config imports ``common``); the project's scripts call :func:`install` themselves.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path

__all__ = ["USER_ERRORS", "UserError", "UserErrorLogFilter", "install", "user_message"]


class UserError(Exception):
    """Base of the project's own error types whose message is written for the user (e.g.
    :class:`common.ingest.errors.IngestError`)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, UserError)
DEBUG_ENV = "GADOFREE_DEBUG"
_PACKAGE = Path(__file__).resolve().parent


def _innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of the ``raise ... from`` / "during handling" chain."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None:
            break
        exc = nxt
    return exc


def _raised_here(exc: BaseException) -> bool:
    """Whether the last frame of ``exc``'s traceback lies inside this package."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    try:
        return Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)
    except OSError:
        return False


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_CHAINED = re.compile(
    r"\n\s*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\s*\n"
)
_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')


def _error_class(name: str) -> type | None:
    """The exception class a traceback's last line names (a builtin, or ``common.<module>.<Class>``)."""
    import builtins
    import importlib

    if "." not in name:
        cls = getattr(builtins, name, None)
    elif name.startswith("common."):
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            return None
    else:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def _worker_message(exc: BaseException) -> str | None:
    """A user error raised in a ``DataLoader`` worker process: torch re-raises it in the main process
    as ``Caught ValueError in DataLoader worker process 0. Original Traceback ...`` (text, no chain);
    the innermost traceback of that text is read back: its last frame inside this package and its
    class one of :data:`USER_ERRORS` give its message, else ``None``."""
    text = str(exc)
    if not _WORKER.match(text):
        return None
    innermost = _CHAINED.split(text.split("\n", 1)[1])[0]
    lines = innermost.rstrip().splitlines()
    frames = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _FRAME.match(line))]
    if not frames:
        return None
    last, filename = frames[-1]
    try:
        if not Path(filename).resolve().is_relative_to(_PACKAGE):
            return None
    except OSError:
        return None
    tail = [ln for ln in lines[last + 1 :] if ln and not ln.startswith((" ", "\t"))]
    if not tail or ":" not in tail[0]:
        return None
    name, _, first = tail[0].partition(":")
    cls = _error_class(name.strip())
    if cls is None or not issubclass(cls, USER_ERRORS):
        return None
    return " ".join([first.strip(), *tail[1:]]).strip() or name.strip()


def user_message(exc: BaseException) -> str | None:
    """The one-line message for ``exc`` when it is a user error raised by this package (also in a
    ``DataLoader`` worker process), else ``None``."""
    inner = _innermost(exc)
    worker = _worker_message(inner)
    if worker is not None:
        return worker
    if not isinstance(inner, USER_ERRORS) or not _raised_here(inner):
        return None
    return str(inner).strip() or type(inner).__name__


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _hook(exc_type, exc, tb, _previous=sys.excepthook):
    message = None if _debug() or not isinstance(exc, Exception) else user_message(exc)
    if message is None:
        _previous(exc_type, exc, tb)
        return
    sys.stderr.write(f"error: {message}\n(set {DEBUG_ENV}=1 for the full traceback)\n")
    sys.stderr.flush()


class UserErrorLogFilter(logging.Filter):
    """Drop the log records with which ignite and MONAI report a user error before re-raising it.

    A record is dropped when its level is ERROR or above, the exception it carries (``exc_info``)
    or, failing that, the exception being handled where it was logged (``sys.exc_info()``: ignite
    logs inside its ``except`` block) is a user error (:func:`user_message`), and the record either
    carries that exception or was logged by an ignite engine (logger ``ignite.*``). ``GADOFREE_DEBUG=1``
    keeps every record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or _debug():
            return True
        carried = record.exc_info[1] if record.exc_info and record.exc_info[1] is not None else None
        if carried is None and not record.name.startswith("ignite."):
            return True
        exc = carried if carried is not None else sys.exc_info()[1]
        return not (isinstance(exc, Exception) and user_message(exc) is not None)


_LOG_FILTER = UserErrorLogFilter()


def _filtered_handle(self: logging.Logger, record: logging.LogRecord, _handle=logging.Logger.handle):
    if not _LOG_FILTER.filter(record):
        return None
    return _handle(self, record)


def install() -> None:
    """Make uncaught user errors end the process with one line on stderr (exit status 1), and drop
    the records ignite and MONAI log about them before re-raising (:class:`UserErrorLogFilter`, on
    every logger: MONAI's handlers log through loggers of their own that do not propagate)."""
    if sys.excepthook is not _hook:
        sys.excepthook = _hook
    if logging.Logger.handle is not _filtered_handle:
        logging.Logger.handle = _filtered_handle


def _is_bundle_run(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py")
