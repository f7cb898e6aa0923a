"""Physics-based digital reference objects: the project's embedded default data.

Real patient data cannot ship, so the demo and the tests run on phantoms with known ground truth,
written in the file layouts users have:

- ``prostate``: mpMRI (T2w, ADC, PD, T1, DWI b1400, DCE) on oblique grids, as NIfTI, as a DICOM
  study in the TCIA PROSTATEx layout, and as prepared cases (:mod:`common.layout`),
- ``brain``: BraTS 2023 glioma cases (t1n, t1c, t2w, t2f, seg) from MNI152 tissue maps,
- ``breast``: DCE with lesions of the three kinetic curve types.

Every subject is deterministic for its seed. Entry point: :func:`write_phantoms` (CLI:
``python scripts/make_phantoms.py --out data/phantoms``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

KINDS = ("prostate", "brain", "breast")
#: Prostate lesion settings (:data:`common.phantoms.prostate.LESION_PRESETS`) of the project's data
#: set, the one ``make phantoms`` (``scripts/make_phantoms.py``) and ``make demo`` write. The Python
#: functions keep the uncoupled defaults (``lesion_coupling=0``: the phantoms of earlier versions).
DEFAULT_LESIONS = "learnable"

#: Size presets for quick runs (tests, CI): same FOVs, coarser grids.
SMALL: dict[str, dict[str, Any]] = {
    "prostate": {
        "grid_shape": (64, 56, 18),
        "grid_spacing": (4.0, 4.6, 3.6),
        "t2w_shape": (128, 112, 18),
        "t2w_spacing": (2.0, 2.3, 3.6),
    },
    "brain": {"shape": (48, 56, 44)},
    "breast": {"shape": (80, 80, 20), "spacing": (2.4, 2.4, 4.8)},
}


def map_subjects(
    fn: Callable[..., Any], jobs: Sequence[tuple], workers: int = 1, desc: str = "", progress: bool = True
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in order, with a tqdm bar; in ``workers`` processes when > 1.

    Each subject has its own seed, so the output does not depend on ``workers``.
    """
    from tqdm.auto import tqdm

    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in tqdm(jobs, desc=desc, disable=not progress)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in tqdm(futures, desc=desc, disable=not progress)]


def _split_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"prostate_grid_shape": v, ...}`` -> ``{"prostate": {"grid_shape": v}, ...}``."""
    out: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
    for key, value in overrides.items():
        kind, _, name = key.partition("_")
        if kind not in out or not name:
            raise TypeError(f"unknown option {key!r}: size overrides are named <kind>_<parameter>, kind one of {KINDS}")
        out[kind][name] = value
    return out


def write_phantoms(
    out: str | os.PathLike,
    kinds: Sequence[str] | str = KINDS,
    n_prostate: int = 10,
    n_brain: int = 4,
    n_breast: int = 4,
    seed: int = 0,
    dicom: bool = True,
    small: bool = False,
    progress: bool = True,
    workers: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Write the phantom data sets below ``out`` and return what was written.

    Layout: ``<out>/prostate/{nifti,dicom,prepared}/...`` (prepared cases + ``datalist.json``),
    ``<out>/brain/<BraTS case>/...`` + ``datalist.json`` (+ ``dicom/<BraTS case>/``), ``<out>/breast/<sid>/...``
    + ``datalist.json``.

    Args:
        out: output folder.
        kinds: any of ``prostate``, ``brain``, ``breast`` (a sequence or a comma-separated string).
        n_prostate, n_brain, n_breast: subjects per kind.
        seed: base seed; subject ``i`` of kind ``k`` uses ``numpy.random.default_rng([seed, k, i])``
            (k: prostate 0, brain 1, breast 2).
        dicom: also write the prostate and brain DICOM studies (``<out>/prostate/dicom/``,
            ``<out>/brain/dicom/``).
        small: coarse grids (:data:`SMALL`) for quick runs.
        progress: tqdm progress bars.
        workers: subjects made in parallel processes (the output is the same for any value).
        overrides: ``<kind>_<parameter>=value`` passed to the kind's ``make_*_phantom`` (e.g.
            ``prostate_grid_shape=(96, 96, 20)``, ``brain_shape=(64, 64, 48)``); they win over ``small``.

    Returns:
        ``{kind: {"root": Path, "subjects": [...], "datalist": Path, "seconds": float}}``.
    """
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown phantom kind(s) {unknown}; choose from {KINDS}")
    params = _split_overrides(overrides)
    for kind in KINDS:
        if small:
            params[kind] = {**SMALL[kind], **params[kind]}
    out = Path(out)
    written: dict[str, Any] = {}
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == "prostate":
            from common.phantoms.prostate import write_prostate_phantoms

            res = write_prostate_phantoms(
                out, n=n_prostate, seed=seed, dicom=dicom, progress=progress, workers=workers, **params[kind]
            )
        elif kind == "brain":
            from common.phantoms.brain import write_brain_phantoms

            res = write_brain_phantoms(
                out, n=n_brain, seed=seed, dicom=dicom, progress=progress, workers=workers, **params[kind]
            )
        else:
            from common.phantoms.breast import write_breast_phantoms

            res = write_breast_phantoms(out, n=n_breast, seed=seed, progress=progress, workers=workers, **params[kind])
        res["seconds"] = time.perf_counter() - t0
        written[kind] = res
    return written


__all__ = ["write_phantoms", "map_subjects", "KINDS", "SMALL", "DEFAULT_LESIONS"]
