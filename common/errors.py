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

``import common`` installs the hook when the process is ``python -m monai.bundle`` (every bundle
config imports ``common``); the project's scripts call :func:`install` themselves.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

__all__ = ["USER_ERRORS", "UserError", "install", "user_message"]


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


def user_message(exc: BaseException) -> str | None:
    """The one-line message for ``exc`` when it is a user error raised by this package, else ``None``."""
    inner = _innermost(exc)
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


def install() -> None:
    """Make uncaught user errors end the process with one line on stderr (exit status 1)."""
    if sys.excepthook is not _hook:
        sys.excepthook = _hook


def _is_bundle_run(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py")
