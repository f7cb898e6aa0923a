"""Brain tumour digital reference object in the BraTS 2023 layout (t1n, t1c, t2w, t2f, seg).

Anatomy comes from real tissue maps: the MNI152 2009a (symmetric) grey- and white-matter
probability maps and T1 template that ship inside nilearn's wheel (read from the installed
package, no network). CSF is the filled brain mask (T1 template > 0.2) minus GM minus WM, which
includes the ventricles. Each subject deforms the maps by a random affine and a smooth random
displacement field and samples them on its grid. A tumour (necrotic core 1, enhancing rim 3,
oedema 2) is placed in deep white matter in template space, so it deforms with the anatomy.

Contrasts from tissue T1, T2, PD (3 T values) with signal equations:

- ``t1n``: spoiled gradient echo (T1-weighted, MPRAGE-like contrast order WM > GM > CSF),
- ``t1c``: the same with ``R1 = 1/T1 + r1 C``, ``C`` the extended Tofts concentration 5 min after a
  Parker-AIF bolus (blood-brain barrier broken in the enhancing tumour; vessels, choroid plexus),
- ``t2w``: spin echo, ``t2f``: FLAIR, inversion recovery with the inversion time nulling CSF.

Partial volume is exact for signals (fraction-weighted sums); then a coil bias, a texture and
Rician noise, integer quantisation, and skull-stripped zero background like BraTS.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.io import lossless_dtype, save_json, save_nifti
from common.layout import DATALIST, split_ids
from common.phantoms.pk import (
    HAEMATOCRIT,
    R1_GD_3T,
    TissuePK,
    inversion_recovery_signal,
    null_inversion_time,
    spgr_signal,
    spin_echo_signal,
    tissue_curves,
)
from common.phantoms.shapes import (
    BiasField,
    FourierField,
    bias_texture,
    fraction,
    quantise,
    random_ellipsoid,
    rician,
    rotation_matrix,
)

CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
BRATS_KEYS = (*CONTRASTS, "seg")
LABELS = {"necrosis": 1, "oedema": 2, "enhancing": 3}
#: Label of each phantom tumour compartment per BraTS 2023 label set (``brats_gli``: GLI, MET, SSA,
#: MEN: 1 NETC, 2 SNFH, 3 ET; ``brats_peds``: 1 ET, 2 NET, 3 CC, 4 ED; the phantom's fluid-filled
#: core is the PEDs cystic component, it has no separate non-enhancing tumour, label 2).
PHANTOM_LABELS = {
    "brats_gli": LABELS,
    "brats_peds": {"necrosis": 3, "oedema": 4, "enhancing": 1},
}
#: BraTS 2023 case-name prefix of each label set's phantom cases.
PHANTOM_PREFIX = {"brats_gli": "BraTS-GLI", "brats_peds": "BraTS-PED"}
TEMPLATE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}

#: Tissue T1 (s), T2 (s), PD and kinetics at 3 T. Blood is whole blood (vp = 1 - Hct).
TISSUES: dict[str, dict[str, Any]] = {
    "gm": {"T1": 1.40, "T2": 0.110, "PD": 0.80, "pk": TissuePK(0.0, 1.0, 0.04)},
    "wm": {"T1": 0.85, "T2": 0.080, "PD": 0.70, "pk": TissuePK(0.0, 1.0, 0.02)},
    "csf": {"T1": 4.30, "T2": 2.000, "PD": 1.00, "pk": TissuePK()},
    "vessel": {"T1": 1.93, "T2": 0.050, "PD": 0.85, "pk": TissuePK(0.0, 1.0, 1.0 - HAEMATOCRIT)},
    "choroid": {"T1": 1.20, "T2": 0.100, "PD": 0.85, "pk": TissuePK(0.3, 0.8, 0.20)},
    "necrosis": {"T1": 2.40, "T2": 0.250, "PD": 0.92, "pk": TissuePK(0.0, 1.0, 0.0)},
    "enhancing": {"T1": 1.60, "T2": 0.120, "PD": 0.85, "pk": TissuePK(0.12, 0.40, 0.06)},
    "oedema": {"T1": 1.60, "T2": 0.200, "PD": 0.90, "pk": TissuePK(0.005, 0.30, 0.02)},
}
ORDER = tuple(TISSUES)

#: Sequence parameters (s, degrees) and signal scales.
PROTOCOL = {
    "t1n": {"TR_s": 0.012, "flip_deg": 18.0, "scale": 16000.0},
    "t1c": {"TR_s": 0.012, "flip_deg": 18.0, "scale": 16000.0, "delay_s": 300.0, "r1_per_mM_s": R1_GD_3T},
    "t2w": {"TR_s": 5.0, "TE_s": 0.100, "scale": 2000.0},
    "t2f": {"TR_s": 9.0, "TE_s": 0.100, "scale": 2500.0},
    "noise_fraction": 0.015,
}
DEFAULT_FOV_MM = (176.0, 212.0, 184.0)


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nilearn is needed for the brain phantom (its wheel ships the MNI152 tissue maps)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _load_template(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One MNI152 2009a map in [0, 1] and its affine, from nilearn's packaged data (offline)."""
    path = _template_dir() / TEMPLATE_FILES[name]
    if path.exists():
        img = nib.load(str(path))
    else:  # other nilearn versions: the public loaders read the same packaged files
        from nilearn import datasets

        loader = {
            "gm": datasets.load_mni152_gm_template,
            "wm": datasets.load_mni152_wm_template,
            "t1": datasets.load_mni152_template,
        }[name]
        img = loader(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.max() > 1.5:  # stored as uint8 0..255
        data = data / 255.0
    return data.astype(np.float32), np.asarray(img.affine, float)


def _block2(x: np.ndarray) -> np.ndarray:
    n = [s // 2 * 2 for s in x.shape]
    x = x[: n[0], : n[1], : n[2]]
    return x.reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).mean(axis=(1, 3, 5))


@functools.lru_cache(maxsize=1)
def mni_tissue_maps() -> dict[str, Any]:
    """MNI152 2009a tissue maps at 2 mm (cached): ``gm``, ``wm``, ``csf``, ``vessel``, ``choroid``
    fractions, ``affine`` (4x4, RAS mm), ``center`` of the brain (mm) and ``tumour_sites``
    (candidate tumour centres in deep white matter, (n, 3) mm)."""
    gm, A1 = _load_template("gm")
    wm, _ = _load_template("wm")
    t1, _ = _load_template("t1")
    mask = ndimage.binary_fill_holes(t1 > 0.2).astype(np.float32)
    gm, wm, mask = _block2(gm), _block2(wm), _block2(mask)
    A = A1.copy()
    A[:3, :3] = A1[:3, :3] * 2.0
    A[:3, 3] = A1[:3, :3] @ np.full(3, 0.5) + A1[:3, 3]  # centre of the first 2x2x2 block
    total = gm + wm
    scale = np.where(total > mask, mask / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    ijk = np.indices(mask.shape).reshape(3, -1).T.astype(np.float64)
    xyz = (ijk @ A[:3, :3].T + A[:3, 3]).reshape(*mask.shape, 3)
    depth = ndimage.distance_transform_edt(mask > 0.5, sampling=2.0)
    # superior sagittal sinus region: midline, within 5 mm of the brain surface, upper half
    vessel = ((np.abs(xyz[..., 0]) < 3.0) & (depth < 5.0) & (xyz[..., 2] > 0) & (mask > 0.5)).astype(np.float32)
    vessel = ndimage.gaussian_filter(vessel, 0.5)
    # choroid plexus in the atria of the lateral ventricles
    choroid = np.zeros_like(mask)
    for s in (-1, 1):
        d = (xyz - np.array([s * 26.0, -38.0, 14.0])) / np.array([5.0, 9.0, 5.0])
        choroid = np.maximum(choroid, (np.sum(d * d, axis=-1) < 1.0).astype(np.float32))
    choroid = choroid * (csf > 0.3)
    idx = np.argwhere((wm > 0.7) & (depth > 28.0))
    sites = idx @ A[:3, :3].T + A[:3, 3]
    pts = np.argwhere(mask > 0.5) @ A[:3, :3].T + A[:3, 3]
    center = (pts.min(0) + pts.max(0)) / 2
    return {
        "gm": gm,
        "wm": wm,
        "csf": csf,
        "vessel": vessel,
        "choroid": choroid,
        "affine": A,
        "center": center,
        "tumour_sites": sites,
    }


@dataclass
class BrainPhantom:
    """One BraTS-like subject.

    Attributes:
        seed: seed of the subject's generator.
        images: ``t1n``, ``t1c``, ``t2w``, ``t2f``: float32 (x, y, z), integer-valued, 0 outside the brain.
        seg: uint8 (x, y, z): 0 background, 1 necrosis, 2 oedema, 3 enhancing tumour.
        affine: 4x4 RAS+ affine (mm).
        fractions: float32 tissue fractions per voxel (``gm``, ``wm``, ``csf``, ``vessel``, ``choroid``,
            ``necrosis``, ``enhancing``, ``oedema``): the ground truth the images were made from.
        truth: tumour geometry, tissue table, protocol, deformation.
    """

    seed: Any
    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    fractions: dict[str, np.ndarray]
    truth: dict[str, Any] = field(default_factory=dict)


def _displacement(
    rng: np.random.Generator, affine: np.ndarray, shape: Sequence[int], amplitude_mm: float, wavelength_mm: float = 70.0
) -> np.ndarray:
    """Smooth random displacement field (3, *shape) in mm: one long-wavelength random Fourier field
    per component, RMS ``amplitude_mm``."""
    return np.stack(
        [FourierField.random(rng, wavelength_mm, 8).on_grid(affine, shape) * np.float32(amplitude_mm) for _ in range(3)]
    )


def make_brain_phantom(
    seed: int | Sequence[int] = 0,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] | None = None,
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    deformation_mm: float = 3.0,
    label_set: str = "brats_gli",
    enhancing: bool = True,
) -> BrainPhantom:
    """Render one brain tumour subject.

    Args:
        seed: seed of ``numpy.random.default_rng`` (same seed: identical arrays).
        shape: grid (voxels).
        spacing: voxel size (mm); default ``fov_mm / shape``.
        fov_mm: field of view when ``spacing`` is not given.
        deformation_mm: RMS of the smooth random displacement field (per component).
        label_set: labels of ``seg``: ``brats_gli`` (1 necrosis, 2 oedema, 3 enhancing) or
            ``brats_peds`` (1 enhancing, 3 the core as cystic component, 4 oedema): :data:`PHANTOM_LABELS`.
        enhancing: ``False``: a tumour without enhancing tumour (a low-grade glioma): the rim is
            non-enhancing tumour with the core's tissue (no contrast uptake; labelled as the core),
            the seg has no ET voxel. The random draws are the same, so the geometry matches the
            enhancing subject of the same seed.
    """
    enhancing_tumour = bool(enhancing)
    if label_set not in PHANTOM_LABELS:
        raise ValueError(f"label_set {label_set!r}: choose one of {sorted(PHANTOM_LABELS)}")
    rng = np.random.default_rng(seed)
    maps = mni_tissue_maps()
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(fov_mm, float) / np.asarray(shape) if spacing is None else np.asarray(spacing, float)
    c = maps["center"]
    A = np.eye(4)
    A[:3, :3] = np.diag(spacing)
    A[:3, 3] = c - spacing * (np.asarray(shape) - 1) / 2
    # template coordinates of each voxel: q = M (p - c) + c + t + u(p)
    angles = rng.uniform(-6, 6, 3)
    R = (
        rotation_matrix((1, 0, 0), angles[0])
        @ rotation_matrix((0, 1, 0), angles[1])
        @ rotation_matrix((0, 0, 1), angles[2])
    )
    M = R @ np.diag(rng.uniform(0.92, 1.08, 3))
    t = rng.normal(0, 2.0, 3)
    u = _displacement(rng, A, shape, deformation_mm)
    ii = np.indices(shape, dtype=np.float32)
    p = np.einsum("ij,j...->i...", A[:3, :3].astype(np.float32), ii) + A[:3, 3].astype(np.float32)[:, None, None, None]
    q = np.einsum("ij,j...->i...", M.astype(np.float32), p - c.astype(np.float32)[:, None, None, None])
    q += (c + t).astype(np.float32)[:, None, None, None] + u
    Ainv = np.linalg.inv(maps["affine"])
    vox = (
        np.einsum("ij,j...->i...", Ainv[:3, :3].astype(np.float32), q)
        + Ainv[:3, 3].astype(np.float32)[:, None, None, None]
    )
    sample = lambda a: ndimage.map_coordinates(a, vox, order=1, mode="constant", cval=0.0)  # noqa: E731
    gm, wm, csf = sample(maps["gm"]), sample(maps["wm"]), sample(maps["csf"])
    vessel_map, choroid_map = sample(maps["vessel"]), sample(maps["choroid"])

    # tumour in template space
    sites = maps["tumour_sites"]
    tc = sites[rng.integers(len(sites))]
    R_act = float(rng.uniform(12.0, 20.0))
    active = random_ellipsoid(rng, tc, np.full(3, R_act), jitter=0.2, bump=0.12, n_bumps=5, rotate_deg=40)
    core = random_ellipsoid(
        rng, tc + rng.normal(0, 1.5, 3), active.radii * rng.uniform(0.45, 0.6), jitter=0.1, bump=0.12
    )
    oedema = random_ellipsoid(
        rng, tc, active.radii * rng.uniform(1.6, 2.2), jitter=0.2, bump=0.2, n_bumps=6, rotate_deg=40
    )
    width = float(np.prod(spacing) ** (1 / 3))
    near = (
        np.sum((q - tc.astype(np.float32)[:, None, None, None]) ** 2, axis=0) < (oedema.extent_max() + 2 * width) ** 2
    )
    qp = np.ascontiguousarray(q[:, near].T)
    s_core, s_act, s_oed = (np.zeros(shape, np.float32) for _ in range(3))
    s_core[near] = fraction(core.distance(qp), width)
    s_act[near] = np.maximum(fraction(active.distance(qp), width), s_core[near])
    s_oed[near] = np.maximum(fraction(oedema.distance(qp), width), s_act[near])

    # tissue fractions (sum = brain fraction b)
    b = np.clip(gm + wm + csf, 0.0, 1.0)
    norm = np.where(gm + wm + csf > 1.0, 1.0 / np.maximum(gm + wm + csf, 1e-6), 1.0)
    gm, wm, csf = gm * norm, wm * norm, csf * norm
    choroid = np.minimum(choroid_map, 1.0) * csf
    csf = csf - choroid
    vessel = np.clip(vessel_map, 0.0, 1.0)
    gm, wm, csf, choroid = gm * (1 - vessel), wm * (1 - vessel), csf * (1 - vessel), choroid * (1 - vessel)
    vessel = vessel * b
    tissue = gm + wm
    necrosis = s_core * b
    enhancing = (s_act - s_core) * b
    if not enhancing_tumour:
        necrosis, enhancing = s_act * b, np.zeros_like(enhancing)
    oed = (s_oed - s_act) * tissue
    gm, wm = gm * (1 - s_oed), wm * (1 - s_oed)  # oedema replaces grey and white matter, not CSF
    csf, choroid, vessel = csf * (1 - s_act), choroid * (1 - s_act), vessel * (1 - s_act)
    fr = {
        "gm": gm,
        "wm": wm,
        "csf": csf,
        "vessel": vessel,
        "choroid": choroid,
        "necrosis": necrosis,
        "enhancing": enhancing,
        "oedema": oed,
    }
    fr = {k: v.astype(np.float32) for k, v in fr.items()}

    # signals per tissue
    P = PROTOCOL
    conc = tissue_curves(
        [P["t1c"]["delay_s"]], {n: TISSUES[n]["pk"] for n in ORDER}, bolus_arrival_s=10.0, blood=("vessel",)
    )
    ti = null_inversion_time(TISSUES["csf"]["T1"], P["t2f"]["TR_s"])
    table = np.zeros((len(ORDER), 4), np.float32)
    for i, n in enumerate(ORDER):
        T1, T2, PD = TISSUES[n]["T1"], TISSUES[n]["T2"], TISSUES[n]["PD"]
        table[i, 0] = spgr_signal(PD * P["t1n"]["scale"], T1, 0.0, TR_s=P["t1n"]["TR_s"], flip_deg=P["t1n"]["flip_deg"])
        table[i, 1] = spgr_signal(
            PD * P["t1c"]["scale"], T1, conc[n][0], P["t1c"]["r1_per_mM_s"], P["t1c"]["TR_s"], P["t1c"]["flip_deg"]
        )
        table[i, 2] = spin_echo_signal(PD * P["t2w"]["scale"], T1, T2, P["t2w"]["TR_s"], P["t2w"]["TE_s"])
        table[i, 3] = inversion_recovery_signal(PD * P["t2f"]["scale"], T1, T2, P["t2f"]["TR_s"], P["t2f"]["TE_s"], ti)
    F = np.stack([fr[n] for n in ORDER], axis=-1)  # (x, y, z, K)
    sig = np.einsum("xyzk,kc->xyzc", F, table)  # (x, y, z, 4)
    mult = bias_texture(BiasField.random(rng, c, 90.0, 0.12), FourierField.random(rng, 9.0, 16), A, shape)
    total = sum(fr.values())
    brain = total >= 0.5
    images = {}
    for j, name in enumerate(CONTRASTS):
        sigma = P["noise_fraction"] * float(
            table[ORDER.index("wm"), j] if name != "t2f" else table[ORDER.index("gm"), j]
        )
        img = quantise(rician(rng, sig[..., j] * mult, sigma), hi=32767)
        images[name] = np.where(brain, img, 0.0).astype(np.float32)
    tum = np.stack([necrosis, oed, enhancing], axis=-1)
    lab = PHANTOM_LABELS[label_set]
    lut = np.array([0, lab["necrosis"], lab["oedema"], lab["enhancing"]], np.uint8)
    seg = lut[np.where((tum.sum(-1) >= 0.5 * np.maximum(total, 1e-6)) & brain, np.argmax(tum, axis=-1) + 1, 0)]
    truth = {
        "seed": seed if isinstance(seed, (int, np.integer)) else list(seed),
        "template": "MNI152 2009a symmetric GM/WM probability maps and T1 template (nilearn package data)",
        "tissues": {
            n: {"T1_s": v["T1"], "T2_s": v["T2"], "PD": v["PD"], **v["pk"].as_dict(), "t1c_conc_mM": float(conc[n][0])}
            for n, v in TISSUES.items()
        },
        "tumour": {
            "template_center_mm": np.round(tc, 2).tolist(),
            "active": active.describe(),
            "core": core.describe(),
            "oedema": oedema.describe(),
            "labels": dict(lab),
            "label_set": label_set,
            "enhancing": enhancing_tumour,
        },
        "deformation": {
            "rotation_deg": angles.tolist(),
            "linear": M.tolist(),
            "translation_mm": t.tolist(),
            "displacement_sd_mm": deformation_mm,
        },
        "protocol": {**PROTOCOL, "t2f_TI_s": ti},
    }
    return BrainPhantom(seed=seed, images=images, seg=seg, affine=A, fractions=fr, truth=truth)


def brats_name(i: int, label_set: str = "brats_gli") -> str:
    """BraTS 2023 case name ``BraTS-GLI-<5 digits>-000`` (``BraTS-PED-...`` for ``brats_peds``)."""
    return f"{PHANTOM_PREFIX[label_set]}-{i:05d}-000"


def write_brain_case(ph: BrainPhantom, root: str | os.PathLike, case: str) -> dict[str, Path]:
    """Write ``<root>/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` and a ``manifest.json``."""
    d = Path(root) / case
    out = {}
    for name, img in ph.images.items():
        out[name] = save_nifti(img, ph.affine, d / f"{case}-{name}.nii.gz", dtype=lossless_dtype(img))
    out["seg"] = save_nifti(ph.seg, ph.affine, d / f"{case}-seg.nii.gz", dtype=np.uint8)
    save_json(
        {
            "id": case,
            "source": "phantom",
            "kind": "brain",
            "ground_truth": ph.truth,
            "label_voxels": {str(k): int((ph.seg == k).sum()) for k in range(5)},
        },
        d / "manifest.json",
    )
    return out


def _write_brain_subject(
    root: Path, case: str, seed: Any, options: dict | None = None, dicom: bool = False, **kwargs
) -> str:
    ph = make_brain_phantom(seed=seed, **(options or {}), **kwargs)
    write_brain_case(ph, root, case)
    if dicom:
        from common.phantoms.dicom import write_brain_study

        write_brain_study(ph, root / "dicom", case)
    return case


def write_brain_phantoms(
    out: str | os.PathLike,
    n: int = 4,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    dicom: bool = False,
    peds_cases: Sequence[int] = (),
    et_free_cases: Sequence[int] = (),
    **kwargs,
) -> dict[str, Any]:
    """Make ``n`` cases ``BraTS-GLI-00000-000``... under ``<out>/brain`` and ``<out>/brain/datalist.json``;
    with ``dicom``, each also as a DICOM study ``<out>/brain/dicom/<case>/`` (T1, T2, FLAIR, T1c series on
    an oblique grid: :func:`common.phantoms.dicom.write_brain_study`), the input of
    ``scripts/synthesize.py --bundle d3m``.

    Case ``i`` uses the seed ``[seed, 1, i]``; ``kwargs`` go to :func:`make_brain_phantom`. Cases whose
    index is in ``peds_cases`` carry BraTS-PEDs labels and are named ``BraTS-PED-<i>-000``; those in
    ``et_free_cases`` have no enhancing tumour (no ET voxel in their seg).
    """
    from common.phantoms import map_subjects

    root = Path(out) / "brain"
    peds, et_free = {int(i) for i in peds_cases}, {int(i) for i in et_free_cases}
    jobs = [
        (
            root,
            brats_name(i, "brats_peds" if i in peds else "brats_gli"),
            [seed, 1, i],
            {"label_set": "brats_peds" if i in peds else "brats_gli", "enhancing": i not in et_free},
        )
        for i in range(n)
    ]
    make = functools.partial(_write_brain_subject, dicom=dicom, **kwargs)
    cases = map_subjects(make, jobs, workers, "brain phantoms", progress)
    split = split_ids(cases)
    entry = lambda c: {"id": c, **{k: f"{c}/{c}-{k}.nii.gz" for k in BRATS_KEYS}}  # noqa: E731
    datalist = {k: [entry(c) for c in v] for k, v in split.items()}
    datalist["split"] = {"fractions": [0.8, 0.1, 0.1], "seed": 0}
    return {"root": root, "subjects": cases, "datalist": save_json(datalist, root / DATALIST)}
