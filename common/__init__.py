"""Shared package of the gadolinium-free contrast synthesis and MRI super-resolution bundles.

Sub-packages: ``phantoms`` (physics-based digital reference objects), ``ingest`` (DICOM study
ingest, registration, cropping), ``metrics``, ``transforms`` (MONAI dictionary transforms),
``schedulers``, ``networks``, ``inferers``, ``handlers`` (what MONAI lacks, in MONAI's own split),
``engines`` (batch preparation), ``data`` (datalists), and the modules ``bundle`` (config and
command-line helpers), ``io``, ``dce``, ``layout``, ``device``, ``losses``, ``visualize``.

Sub-modules load on first attribute access (``common.inferers``), so a bundle config needs only
``"$import common"`` and a light import (e.g. the ingest's worker processes) stays light. Importing it
changes nothing global: the one-line error hook (:func:`common.errors.install`) is installed by the
entry points (each script's ``__main__``, each bundle config's ``initialize``).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "bundle",
    "data",
    "dce",
    "device",
    "errors",
    "engines",
    "handlers",
    "inferers",
    "ingest",
    "io",
    "layout",
    "losses",
    "metrics",
    "monai_compat",
    "networks",
    "phantoms",
    "schedulers",
    "transforms",
    "visualize",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
