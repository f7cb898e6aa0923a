"""Write the physics-based phantom data sets (the project's default data; no download).

Usage::

    python scripts/make_phantoms.py --out data/phantoms [--n_prostate 10] [--n_brain 4] [--n_breast 4]
        [--seed 0] [--kinds prostate,brain] [--dicom False] [--small] [--workers 4]
        [--lesions learnable|uncoupled] [--lesion_coupling 0..1]
        [--prostate_grid_shape "(96,96,20)"] [--brain_shape "(64,64,48)"] [--breast_shape "(96,96,24)"]

``--small`` uses coarse grids (same fields of view) for quick runs; ``--workers`` makes subjects in
parallel processes (same output for any value). ``--lesions`` names the prostate lesion settings
(``common.phantoms.prostate.LESION_PRESETS``): ``learnable`` (default; the data set of ``make phantoms``
and ``make demo``) has 1-3 lesions of 7-11 mm radius per subject whose ADC, T2w and kinetics go together
(coupling 1: lower ADC, darker T2w, higher Ktrans and earlier, stronger uptake, and a more cellular
inner part; ``common.phantoms.prostate.couple_lesion``); ``uncoupled`` is the phantom of the versions
before (0-2 lesions of 5-9 mm, independent draws; the same arrays for the same seed).
``--lesion_coupling`` (0..1) overrides the preset's coupling strength (0 = uncoupled lesions). With ``--dicom`` (default) the prostate and brain
phantoms are also written as DICOM studies, and the breast phantoms as DICOM studies in both layouts of
the public breast DCE collections (``<out>/breast/dicom/series_per_phase/``: Duke-Breast-Cancer-MRI, one
series per phase; ``<out>/breast/dicom/multi_phase/``: I-SPY, one multi-phase series), the input of
``scripts/prepare_breast.py``.
"""

from __future__ import annotations

from pathlib import Path

import fire

from common.errors import install as install_error_hook
from common.io import output_folder
from common.phantoms import DEFAULT_LESIONS, KINDS, write_phantoms

ROOT = Path(__file__).resolve().parents[1]


def main(
    out: str = "data/phantoms",
    kinds: str | tuple = ",".join(KINDS),
    n_prostate: int = 10,
    n_brain: int = 4,
    n_breast: int = 4,
    seed: int = 0,
    dicom: bool = True,
    small: bool = False,
    workers: int = 1,
    lesions: str = DEFAULT_LESIONS,
    lesion_coupling: float | None = None,
    **overrides,
) -> None:
    """Write the phantoms below ``out`` and print where each kind went."""
    if overrides.pop("help", False) or overrides.pop("h", False):  # **overrides swallows fire's --help
        print(__doc__)
        return
    from common.phantoms.prostate import check_lesion_coupling, lesion_preset

    for key, value in lesion_preset(lesions, "--lesions").items():
        overrides.setdefault(f"prostate_{key}", value)
    if lesion_coupling is not None:
        overrides["prostate_lesion_coupling"] = check_lesion_coupling(lesion_coupling, "--lesion_coupling")
    output_folder(out, "out")  # a file or read-only folder is named before any work
    if isinstance(kinds, str):
        kinds = tuple(k.strip() for k in kinds.split(",") if k.strip())
    written = write_phantoms(
        out,
        kinds=kinds,
        n_prostate=n_prostate,
        n_brain=n_brain,
        n_breast=n_breast,
        seed=seed,
        dicom=dicom,
        small=small,
        workers=workers,
        **overrides,
    )
    if dicom and "breast" in written:
        from common.phantoms.breast import write_breast_dicom

        written["breast"]["dicom"] = write_breast_dicom(written["breast"]["root"], written["breast"]["subjects"])
    for kind, res in written.items():
        print(
            f"[phantoms] {kind}: {len(res['subjects'])} subjects in {res['root']} ({res['seconds']:.1f} s); "
            f"datalist {res['datalist']}"
        )
        if kind == "prostate":
            print(
                f"[phantoms]   prepared cases: {Path(res['root']) / 'prepared'}"
                + (f"; DICOM studies: {Path(res['root']) / 'dicom'}" if dicom else "")
            )
        if kind == "breast" and res.get("dicom"):
            print(
                f"[phantoms]   DICOM studies and their masks: {', '.join(f'{k}: {v}' for k, v in res['dicom'].items())}"
            )


if __name__ == "__main__":
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    fire.Fire(main)
