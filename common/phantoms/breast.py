"""Breast DCE digital reference object with lesions of the three kinetic curve types.

One breast in an axial field of view: fat, fibroglandular tissue (a thresholded smooth random
field), skin, pectoralis muscle and lung, and 1-3 lesions. Each lesion's extended Tofts
parameters are drawn for its intended kinetic type (Kuhl et al. 1999: I persistent, II plateau,
III washout) and accepted only when its noise-free signal curve has that type with a margin, so
the type is ground truth. Signals: Parker AIF, extended Tofts, fat-suppressed spoiled gradient
echo; pre-contrast at 0 s and five post-contrast phases at 85, 155, 225, 295 and 365 s.

Written per subject (``<out>/breast/<sid>/``): ``dce.nii.gz`` (x, y, z, t), ``dce_times.json``,
``pre.nii.gz``, ``breast_mask.nii.gz``, ``lesion_mask.nii.gz`` (lesion i labelled i) and
``manifest.json``; and ``<out>/breast/datalist.json``. :func:`write_breast_dicom` also writes each
subject as DICOM studies in both layouts of the public collections (``<out>/breast/dicom/series_per_phase/``:
Duke-Breast-Cancer-MRI, one series per phase; ``<out>/breast/dicom/multi_phase/``: I-SPY, one multi-phase
series), for ``scripts/prepare_breast.py``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.io import lossless_dtype, save_json, save_nifti
from common.layout import DATALIST, DCE_TIMES, MANIFEST, split_ids
from common.metrics.kinetic import KINETIC_THRESHOLD, kinetic_type, relative_change  # noqa: F401 (the rule lives there)
from common.phantoms.pk import HAEMATOCRIT, PARKER, R1_GD_3T, TissuePK, spgr_signal, tissue_curves
from common.phantoms.shapes import (
    BiasField,
    Ellipsoid,
    FourierField,
    LevelSet,
    Scene,
    bias_texture,
    grid_affine,
    quantise,
    random_ellipsoid,
    render,
    rician,
)

TIMES_S = (0.0, 85.0, 155.0, 225.0, 295.0, 365.0)
KINETIC_TYPES = ("I", "II", "III")
THRESHOLD = KINETIC_THRESHOLD  # +-10 % change from the first post-contrast phase to the last

#: SPGR protocol of the breast DCE.
PROTOCOL = {
    "TR_s": 0.0045,
    "flip_deg": 10.0,
    "r1_per_mM_s": R1_GD_3T,
    "scale": 20000.0,
    "noise": 6.0,
    "fat_suppression": 0.15,
}

#: Tissue T1 (s), proton density and extended Tofts parameters (Ktrans, kep in 1/min).
TISSUES: dict[str, dict[str, Any]] = {
    "air": {"T1": 1.0, "PD": 0.0, "pk": TissuePK()},
    "fat": {"T1": 0.37, "PD": 0.9, "pk": TissuePK(0.01, 0.3, 0.005), "fat": True},
    "fgt": {"T1": 1.44, "PD": 0.8, "pk": TissuePK(0.03, 0.2, 0.01)},
    "skin": {"T1": 1.0, "PD": 0.7, "pk": TissuePK(0.05, 0.5, 0.02)},
    "muscle": {"T1": 1.4, "PD": 0.75, "pk": TissuePK(0.08, 0.5, 0.02)},
    "lung": {"T1": 1.2, "PD": 0.08, "pk": TissuePK(0.0, 1.0, 0.05)},
}

#: Parameter ranges per kinetic type (uniform) and two acceptance windows of the noise-free lesion
#: curve: ``accept``, its relative change from the first post-contrast phase to the last (the type
#: itself), and ``early``, its relative enhancement at the first post-contrast phase,
#: S(85 s) / S(0) - 1. The early windows are disjoint, with gaps of 0.2: washout lesions take up
#: fast and strongly, persistent ones slowly (Kuhl et al. 1999), so the early phase carries the type,
#: which is the premise of predicting the delayed phases from it. Without them the Tofts ranges alone
#: overlap at 85 s (type I 0.68-1.66, II 0.95-1.99, III 1.03-3.21) and no model could tell the types
#: apart from the acquired phases.
TYPE_RANGES = {
    "I": {
        "ktrans": (0.05, 0.15),
        "kep": (0.06, 0.2),
        "vp": (0.01, 0.03),
        "accept": (0.16, np.inf),
        "early": (0.65, 1.1),
    },
    "II": {"ktrans": (0.10, 0.25), "kep": (0.3, 0.5), "vp": (0.01, 0.04), "accept": (-0.04, 0.04), "early": (1.3, 1.7)},
    "III": {
        "ktrans": (0.3, 1.0),
        "kep": (0.9, 3.0),
        "vp": (0.03, 0.10),
        "accept": (-np.inf, -0.16),
        "early": (1.9, np.inf),
    },
}


def early_enhancement(signal: np.ndarray) -> float:
    """Relative enhancement at the first post-contrast phase, ``signal[1] / signal[0] - 1`` (signal: (t,))."""
    return float(signal[1] / signal[0] - 1.0)


def _lesion_signal(pk: TissuePK, T1: float, PD: float, times: np.ndarray, arrival: float) -> np.ndarray:
    c = tissue_curves(times, {"l": pk}, arrival)["l"]
    P = PROTOCOL
    return spgr_signal(PD * P["scale"], T1, c, P["r1_per_mM_s"], P["TR_s"], P["flip_deg"])


def sample_lesion_pk(
    rng: np.random.Generator,
    ktype: str,
    times: np.ndarray,
    arrival: float,
    T1: float = 1.4,
    PD: float = 0.8,
    max_tries: int = 500,
) -> tuple[TissuePK, float, float]:
    """Tofts parameters whose noise-free curve has kinetic type ``ktype`` with a margin, and the
    type's early enhancement (both windows of :data:`TYPE_RANGES`).

    Returns:
        ``(pk, relative_change, early_enhancement)`` of the noise-free curve.
    """
    r = TYPE_RANGES[ktype]
    for _ in range(max_tries):
        pk = TissuePK(*(float(rng.uniform(*r[k])) for k in ("ktrans", "kep", "vp")))
        signal = _lesion_signal(pk, T1, PD, times, arrival)
        change = relative_change(signal, times)
        early = early_enhancement(signal)
        if r["accept"][0] < change < r["accept"][1] and r["early"][0] < early < r["early"][1]:
            return pk, change, early
    raise RuntimeError(f"no Tofts parameters of type {ktype} found in {max_tries} tries")


@dataclass
class BreastPhantom:
    """One breast DCE subject.

    Attributes:
        seed: seed of the subject's generator.
        dce: float32 (x, y, z, t), integer-valued signal; ``dce[..., 0]`` is the pre-contrast phase.
        times_s: (t,) seconds (0 = pre-contrast; post-contrast phases at the centre of k-space).
        affine: 4x4 RAS+ affine of the grid (mm).
        breast_mask: uint8 (x, y, z).
        lesion_mask: uint8 (x, y, z), lesion i labelled i.
        lesions: per lesion: label, kinetic type, Tofts parameters, T1, centre, radii, noise-free change.
        truth: the rest of the ground truth (tissues, AIF, protocol).
    """

    seed: Any
    dce: np.ndarray
    times_s: np.ndarray
    affine: np.ndarray
    breast_mask: np.ndarray
    lesion_mask: np.ndarray
    lesions: list[dict[str, Any]]
    truth: dict[str, Any] = field(default_factory=dict)


def make_breast_phantom(
    seed: int | Sequence[int] = 0,
    shape: Sequence[int] = (128, 128, 32),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    times_s: Sequence[float] = TIMES_S,
    n_lesions: int | None = None,
    lesion_types: Sequence[str] | None = None,
    bolus_arrival_s: float | None = None,
) -> BreastPhantom:
    """Render one breast DCE subject.

    Args:
        seed: seed of ``numpy.random.default_rng`` (same seed: identical arrays).
        shape, spacing: the grid (voxels, mm); the FOV is centred on the breast.
        times_s: phase times in seconds, the first pre-contrast.
        n_lesions: 1-3 by default.
        lesion_types: kinetic type per lesion; default the three types in turn from a random start.
        bolus_arrival_s: AIF arrival after the pre-contrast phase; default uniform 15-25 s.
    """
    rng = np.random.default_rng(seed)
    times = np.asarray(times_s, float)
    fov = np.asarray(shape, float) * np.asarray(spacing, float)
    # world: breast centred at the origin, chest wall at y = -0.35 FOV (posterior), axial slices
    y_cw = -0.35 * fov[1] + rng.normal(0, 3)
    directions = np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]).T
    A = grid_affine(shape, spacing, directions, (0.0, 0.0, 0.0))
    size = min(fov[0] * 0.36, 75.0)
    breast = random_ellipsoid(
        rng, (0, y_cw, 0), (size, 0.62 * fov[1], min(0.5 * fov[2] + 10, 60)), jitter=0.08, bump=0.04, rotate_deg=4
    )
    inner = Ellipsoid(
        breast.center + np.array([0, 4.0, 0]), breast.radii - 6.0, breast.rotation, breast.bumps, breast.phases
    )
    skin = Ellipsoid(breast.center, breast.radii + 2.0, breast.rotation, breast.bumps, breast.phases)
    thorax_c = np.array([0.0, y_cw - 130.0, 0.0])
    lung = Ellipsoid(thorax_c, np.array([170.0, 118.0, 400.0]))
    pectoralis = Ellipsoid(thorax_c, np.array([182.0, 131.0, 400.0]))
    fgt_field = FourierField.random(rng, 28.0, 24)
    density = float(rng.uniform(-0.6, 0.4))  # higher threshold: less fibroglandular tissue
    fgt = LevelSet(fgt_field, density, 6.0, inner)

    tissues = {k: dict(v) for k, v in TISSUES.items()}
    if n_lesions is None:
        n_lesions = int(rng.integers(1, 4))
    if lesion_types is None:
        start = int(rng.integers(0, 3))
        lesion_types = [KINETIC_TYPES[(start + i) % 3] for i in range(n_lesions)]
    arrival = float(rng.uniform(15.0, 25.0)) if bolus_arrival_s is None else float(bolus_arrival_s)
    lesion_items, lesions = [], []
    placed: list[tuple[np.ndarray, float]] = []
    for i, ktype in enumerate(lesion_types):
        radius = float(rng.uniform(5.0, 9.0))
        half = fov / 2 - radius - 2 * np.asarray(spacing, float)
        for _ in range(2000):  # in the gland region in front of the chest wall, in the FOV, apart from the others
            p = inner.center + rng.uniform(-1, 1, 3) * inner.radii * 0.8
            if (
                inner.distance(p[None])[0] < -radius - 3
                and p[1] > y_cw + radius + 8
                and np.all(np.abs(p) < half)
                and all(np.linalg.norm(p - q) > radius + r + 4 for q, r in placed)
            ):
                break
        placed.append((p, radius))
        shp = random_ellipsoid(
            rng, p, np.full(3, radius), jitter=0.2, bump=0.15 if ktype == "III" else 0.06, rotate_deg=40
        )
        T1 = float(rng.uniform(1.3, 1.5))
        pk, change, early = sample_lesion_pk(rng, ktype, times, arrival, T1=T1)
        name = f"lesion{i + 1}"
        tissues[name] = {"T1": T1, "PD": 0.8, "pk": pk}
        lesion_items.append((name, shp, breast))
        lesions.append(
            {
                "label": i + 1,
                "kinetic_type": ktype,
                **pk.as_dict(),
                "T1_s": T1,
                **shp.describe(),
                "relative_change_noise_free": change,
                "early_enhancement_noise_free": early,
            }
        )

    scene = Scene(
        lesion_items
        + [
            ("lung", lung, None),
            ("muscle", pectoralis, None),
            ("fgt", fgt, None),
            ("fat", breast, None),
            ("skin", skin, None),
        ]
    )
    curves = tissue_curves(times, {n: t["pk"] for n, t in tissues.items()}, arrival)
    P = PROTOCOL
    table = {}
    for n, t in tissues.items():
        fs = P["fat_suppression"] if t.get("fat") else 1.0
        sig = spgr_signal(t["PD"] * fs * P["scale"], t["T1"], curves[n], P["r1_per_mM_s"], P["TR_s"], P["flip_deg"])
        flags = [1.0 if n in ("fat", "fgt", "skin") or n.startswith("lesion") else 0.0]
        flags += [1.0 if n == f"lesion{j + 1}" else 0.0 for j in range(len(lesions))]
        table[n] = np.concatenate([sig, flags]).astype(np.float32)
    ch = render(scene, A, shape, table)
    T = len(times)
    mult = bias_texture(BiasField.random(rng, (0, y_cw, 0), 100.0, 0.12), FourierField.random(rng, 8.0, 16), A, shape)
    dce = quantise(rician(rng, ch[..., :T] * mult[..., None], P["noise"]))
    breast_mask = (ch[..., T] >= 0.5).astype(np.uint8)
    lesion_mask = np.zeros(tuple(shape), np.uint8)
    for j in range(len(lesions)):
        lesion_mask[ch[..., T + 1 + j] >= 0.5] = j + 1
        lesions[j]["voxels"] = int((lesion_mask == j + 1).sum())
    truth = {
        "seed": seed if isinstance(seed, (int, np.integer)) else list(seed),
        "tissues": {
            n: {"T1_s": t["T1"], "PD": t["PD"], **t["pk"].as_dict()}
            for n, t in tissues.items()
            if not n.startswith("lesion")
        },
        "aif": {
            "model": "Parker 2006 (dcmri.aif_parker), whole blood",
            **PARKER,
            "bolus_arrival_s": arrival,
            "haematocrit": HAEMATOCRIT,
        },
        "kinetics": "extended Tofts (dcmri.conc_tissue kinetics='HF'), Ktrans and kep in 1/min",
        "protocol": PROTOCOL,
        "kinetic_type_rule": "change from the first post-contrast phase to the last: > +10% I, within +-10% II, < -10% III",
        "fibroglandular_threshold": density,
    }
    return BreastPhantom(
        seed=seed,
        dce=dce,
        times_s=times,
        affine=A,
        breast_mask=breast_mask,
        lesion_mask=lesion_mask,
        lesions=lesions,
        truth=truth,
    )


def write_breast_case(ph: BreastPhantom, case_dir: str | os.PathLike, case_id: str) -> dict[str, Any]:
    """Write one breast subject's files into ``case_dir`` and return its manifest."""
    case_dir = Path(case_dir)
    dtype = lossless_dtype(ph.dce)
    save_nifti(ph.dce, ph.affine, case_dir / "dce.nii.gz", dtype=dtype)
    save_nifti(ph.dce[..., 0], ph.affine, case_dir / "pre.nii.gz", dtype=dtype)
    save_nifti(ph.breast_mask, ph.affine, case_dir / "breast_mask.nii.gz", dtype=np.uint8)
    save_nifti(ph.lesion_mask, ph.affine, case_dir / "lesion_mask.nii.gz", dtype=np.uint8)
    save_json({"times_s": ph.times_s.tolist()}, case_dir / DCE_TIMES)
    manifest = {
        "id": case_id,
        "source": "phantom",
        "kind": "breast",
        "times_s": ph.times_s.tolist(),
        "lesions": ph.lesions,
        "grid": {"shape": list(ph.breast_mask.shape), "affine": ph.affine.tolist()},
        "ground_truth": ph.truth,
    }
    save_json(manifest, case_dir / MANIFEST)
    return manifest


BREAST_KEYS = ("pre", "dce", "breast_mask", "lesion_mask")


def _write_breast_subject(root: Path, sid: str, seed: Any, **kwargs) -> str:
    write_breast_case(make_breast_phantom(seed=seed, **kwargs), root / sid, sid)
    return sid


def write_breast_phantoms(
    out: str | os.PathLike, n: int = 4, seed: int = 0, progress: bool = True, workers: int = 1, **kwargs
) -> dict[str, Any]:
    """Make ``n`` breast subjects ``breast-000``... under ``<out>/breast`` and its ``datalist.json``.

    Subject ``i`` uses the seed ``[seed, 2, i]``; ``kwargs`` go to :func:`make_breast_phantom`.
    """
    from common.phantoms import map_subjects

    root = Path(out) / "breast"
    jobs = [(root, f"breast-{i:03d}", [seed, 2, i]) for i in range(n)]
    ids = map_subjects(functools.partial(_write_breast_subject, **kwargs), jobs, workers, "breast phantoms", progress)
    split = split_ids(ids)
    entry = lambda sid: {"id": sid, **{k: f"{sid}/{k}.nii.gz" for k in BREAST_KEYS}, "dce_times": f"{sid}/{DCE_TIMES}"}  # noqa: E731
    datalist = {k: [entry(s) for s in v] for k, v in split.items()}
    datalist["split"] = {"fractions": [0.8, 0.1, 0.1], "seed": 0}
    return {"root": root, "subjects": ids, "datalist": save_json(datalist, root / DATALIST)}


#: oblique pitch (degrees) of the breast DICOM studies (:func:`common.phantoms.dicom.tilted_affine`).
DICOM_TILT_DEG = 10.0


def write_breast_dicom(
    root: str | os.PathLike,
    subjects: Sequence[str] | None = None,
    layouts: Sequence[str] = ("series_per_phase", "multi_phase"),
    tilt_deg: float = DICOM_TILT_DEG,
) -> dict[str, Path]:
    """Write the breast subjects of ``root`` (``<root>/<sid>/dce.nii.gz`` + ``dce_times.json``, as written by
    :func:`write_breast_phantoms`) as DICOM studies ``<root>/dicom/<layout>/<sid>/<study>/<series>/*.dcm``.

    The DICOM voxels are the NIfTI series' voxels (integers: stored exactly) on the subject's grid pitched
    by ``tilt_deg`` (oblique); the phase times are the phantom's (:func:`common.phantoms.dicom.write_breast_study`).
    The subjects' masks on that oblique grid (the same voxels, the DICOM affine) go to
    ``<root>/dicom/masks/<sid>/{breast_mask,lesion_mask}.nii.gz``, ready for ``--breast_mask`` / ``--lesion_mask``.
    Returns ``{layout: folder}`` (each a TCIA root for ``scripts/prepare_breast.py --src``) and ``{"masks": folder}``.
    """
    import json

    import nibabel as nib

    from common.phantoms.dicom import write_breast_study

    root = Path(root)
    if subjects is None:
        subjects = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}"))
    from common.phantoms.dicom import tilted_affine

    out = {}
    for sid in subjects:
        img = nib.load(str(root / sid / "dce.nii.gz"))
        oblique = tilted_affine(img.affine, img.shape[:3], tilt_deg) if tilt_deg else img.affine
        for name in ("breast_mask", "lesion_mask"):
            arr = np.asarray(nib.load(str(root / sid / f"{name}.nii.gz")).dataobj).astype(np.uint8)
            save_nifti(arr, oblique, root / "dicom" / "masks" / sid / f"{name}.nii.gz", dtype=np.uint8)
    out["masks"] = root / "dicom" / "masks"
    for layout in layouts:
        folder = root / "dicom" / layout
        for sid in subjects:
            img = nib.load(str(root / sid / "dce.nii.gz"))
            times = json.loads((root / sid / DCE_TIMES).read_text())["times_s"]
            dce = np.asarray(img.dataobj)
            write_breast_study(dce, times, img.affine, folder, sid, layout=layout, tilt_deg=tilt_deg)
        out[layout] = folder
    return out
