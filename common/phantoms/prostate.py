"""Prostate mpMRI digital reference object: T2w, ADC, PD, T1 VIBE, DWI b1400 and DCE with known truth.

Anatomy (prostate peripheral and transition zones, 0-2 lesions, bladder, rectum, pelvic muscles,
bones, femoral arteries and veins, fat, air) is a set of smooth random shapes in world
coordinates (RAS+, mm). Every series is rendered directly on its own acquisition grid, which is
oblique (rotated about a non-axis direction), so each NIfTI affine is the true world geometry of
its grid. Tissue properties drive every contrast:

- T2w: turbo spin echo ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` on a finer in-plane grid,
- PD and T1 (VIBE, flip 2 and 12 degrees) and DCE: steady-state spoiled gradient echo with
  ``R1 = 1/T1 + r1 C(t)``, ``C(t)`` from the Parker AIF and the extended Tofts model per tissue,
- DWI: b50 and b800 spin-echo EPI images with fat suppression, the ADC fitted from them
  (``ln(S50/S800)/750``) and the b1400 image calculated from the ADC like the scanner's
  ``CALC_BVAL`` series (``S50 exp(-1350 ADC)``); the multi-b DWI (b = 50, 400, 800, :data:`DWI_B_VALUES`)
  is kept too (``ProstatePhantom.dwi``) and written as a DWI series, so an ADC fitted from it can be
  checked against the ADC map.

Lesions follow their pharmacokinetics the way tumours do (strength ``lesion_coupling``, 0..1,
default 0, the phantoms as before; :func:`couple_lesion`). Each lesion's ADC draw ``ADC`` in 0.7-1.0e-3 mm^2/s sets its
cellularity ``u = (1.0e-3 - ADC) / 0.3e-3`` (0..1, 1 = most cellular), and with ``c = lesion_coupling``
and ``lerp(a, b) = (1 - c) a + c b`` its independent draws ``X_0`` become::

    T2     = lerp(T2_0,     0.09 - 0.02 u)    Ktrans = lerp(Ktrans_0, 0.30 + 0.30 u)
    kep    = lerp(kep_0,    1.00 + 0.80 u)    vp     = lerp(vp_0,     0.04 + 0.04 u)

so lower ADC goes with darker T2w, higher Ktrans and earlier, stronger uptake (ADC and Ktrans
correlate at -1 across lesions when ``c = 1``). A lesion also has an inner part, its shape scaled by
0.6 about its centre, more cellular than the outer part: ``X_core = X (1 + c d_X)`` with ADC -35 %,
T2 -20 %, Ktrans +80 %, kep +20 %, vp +50 % at ``c = 1`` (:data:`LESION_CORE_CHANGE`); both parts
are the lesion in ``lesion_mask``. The coupling adds no random draws: ``lesion_coupling=0`` gives the
independent, uniform lesions of the earlier versions, the same arrays for the same seed.

Lesion count and size are parameters too (``lesion_count_p``: probabilities of 0, 1, 2, ... lesions;
``lesion_radius_mm``: the range of a lesion's mean radius), with named settings in
:data:`LESION_PRESETS`: ``uncoupled`` (the function defaults: 0-2 lesions of 5-9 mm, coupling 0) and
``learnable``, the project's data set (``make phantoms``, ``make demo``): coupling 1 and 1-3 lesions of
7-11 mm. Why the demo needs both: inside an uncoupled lesion the true enhancement already falls
towards the edge (partial volume with the less enhancing gland) while T2w and ADC rise, and elsewhere
in the image lower ADC and darker T2w go with *less* uptake (fat and air have ADC 0, muscle is dark
on T2w), so a model that has seen few lesion voxels predicts less uptake where the lesion is darkest
and the enhancement correlation inside the lesion comes out negative. Coupled lesions make the
lesion's own pattern (darker core, stronger uptake) consistent, and larger, more numerous lesions put
more of them into a short training. The settings are recorded in each case's manifest
(``ground_truth.lesion_settings``).

Partial volume is exact for signals: each voxel's signal is the fraction-weighted sum of its
tissues' signals. A smooth multiplicative coil bias, a within-tissue texture and Rician noise are
added, and images are quantised to integers like scanner data (the ADC in 1e-6 mm^2/s, the
DICOM/Siemens unit: about 1600 in the peripheral zone).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.dce import mean_curve, select_phases
from common.io import lossless_dtype, save_json, save_nifti
from common.layout import DCE_TIMES, MANIFEST, write_datalist
from common.phantoms.pk import HAEMATOCRIT, PARKER, R1_GD_3T, TissuePK, spgr_signal, spin_echo_signal, tissue_curves
from common.phantoms.shapes import (
    BiasField,
    Ellipsoid,
    FourierField,
    Scene,
    Tube,
    bias_texture,
    grid_affine,
    quantise,
    random_ellipsoid,
    render,
    rician,
    rotation_matrix,
)

#: Base orientation of the axial grids (RAS+ directions of the i, j, k axes), as DICOM stores an
#: axial series: rows run to the patient's left, columns to posterior, slices to superior.
AXIAL_DICOM = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]).T
#: Sagittal localizer orientation (RAS+ columns): rows to posterior, columns to inferior, slices to the right.
SAGITTAL_DICOM = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]).T

#: Acquisition parameters of the simulated protocol (seconds, degrees, s/mm^2).
PROTOCOL: dict[str, dict[str, float]] = {
    "t2w": {"TR_s": 5.0, "TE_s": 0.104, "scale": 1500.0, "noise": 10.0},
    "pd": {"TR_s": 0.004, "flip_deg": 2.0, "scale": 20000.0, "noise": 6.0},
    "t1_pre": {"TR_s": 0.004, "flip_deg": 12.0, "scale": 20000.0, "noise": 6.0},
    "dce": {"TR_s": 0.004, "flip_deg": 12.0, "scale": 20000.0, "noise": 6.0, "r1_per_mM_s": R1_GD_3T},
    "dwi": {
        "TR_s": 4.0,
        "TE_s": 0.06,
        "b_low": 50.0,
        "b_mid": 800.0,
        "b_high": 1400.0,
        "scale": 900.0,
        "noise": 5.0,
        "fat_suppression": 0.05,
    },
    "localizer": {"scale": 1200.0, "noise": 5.0},
}
MAX_ADC = 4000.0  # 1e-6 mm^2/s
#: b-values (s/mm^2) of the multi-b DWI (``ProstatePhantom.dwi``); 50 and 800 are PROTOCOL's b_low and b_mid.
DWI_B_VALUES = (50.0, 400.0, 800.0)


@dataclass(frozen=True)
class Tissue:
    """MR and kinetic properties of one tissue at 3 T.

    Attributes:
        T1: longitudinal relaxation time, s.
        T2: transverse relaxation time, s.
        PD: relative proton density (0..1).
        ADC: apparent diffusion coefficient, mm^2/s.
        pk: extended Tofts parameters.
        fat: fat-suppressed on DWI.
    """

    T1: float
    T2: float
    PD: float
    ADC: float
    pk: TissuePK = TissuePK()
    fat: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Manifest entry: T1_s, T2_s, PD, ADC in mm^2/s and in 1e-6 mm^2/s, Tofts parameters."""
        return {
            "T1_s": self.T1,
            "T2_s": self.T2,
            "PD": self.PD,
            "ADC_mm2_s": self.ADC,
            "ADC_1e-6_mm2_s": round(self.ADC * 1e6, 3),
            **self.pk.as_dict(),
            "fat": self.fat,
        }


#: Default tissue table (3 T literature values, rounded). Blood is whole blood (vp = 1 - Hct).
TISSUES: dict[str, Tissue] = {
    "air": Tissue(T1=1.0, T2=0.01, PD=0.0, ADC=0.0),
    "fat": Tissue(T1=0.38, T2=0.13, PD=0.9, ADC=0.2e-3, pk=TissuePK(0.01, 0.3, 0.005), fat=True),
    "muscle": Tissue(T1=1.4, T2=0.045, PD=0.75, ADC=1.4e-3, pk=TissuePK(0.06, 0.4, 0.02)),
    "bone": Tissue(T1=0.55, T2=0.06, PD=0.6, ADC=0.3e-3, pk=TissuePK(0.03, 0.3, 0.02), fat=True),
    "artery": Tissue(T1=1.93, T2=0.06, PD=0.9, ADC=2.0e-3, pk=TissuePK(0.0, 1.0, 1.0 - HAEMATOCRIT)),
    "vein": Tissue(T1=1.93, T2=0.06, PD=0.9, ADC=2.0e-3, pk=TissuePK(0.0, 1.0, 1.0 - HAEMATOCRIT)),
    "bladder_wall": Tissue(T1=1.4, T2=0.06, PD=0.75, ADC=1.5e-3, pk=TissuePK(0.12, 0.6, 0.03)),
    "urine": Tissue(T1=3.0, T2=1.0, PD=1.0, ADC=3.0e-3),
    "rectal_wall": Tissue(T1=1.2, T2=0.06, PD=0.75, ADC=1.3e-3, pk=TissuePK(0.2, 0.8, 0.05)),
    "rectal_content": Tissue(T1=1.0, T2=0.03, PD=0.03, ADC=1.0e-3),
    "pz": Tissue(T1=1.6, T2=0.16, PD=0.85, ADC=1.6e-3, pk=TissuePK(0.10, 0.50, 0.02)),
    "tz": Tissue(T1=1.6, T2=0.09, PD=0.8, ADC=1.2e-3, pk=TissuePK(0.15, 0.70, 0.03)),
}
BLOOD = ("artery",)
VEINS = {"vein": (6.0, 8.0)}  # delay and mean transit time (s) of venous return


@dataclass
class ProstatePhantom:
    """One prostate subject: native-grid images, DCE, masks, geometry and ground truth.

    Attributes:
        seed: the seed of the subject's ``numpy.random.Generator``.
        images: ``t2w`` (fine grid) and ``adc``, ``pd``, ``t1_pre``, ``dwi_highb`` (acquisition grid),
            3D float32 ``(x, y, z)`` holding integer values (scanner quantisation). ``adc`` is in
            1e-6 mm^2/s (the DICOM/Siemens unit; about 1600 in the peripheral zone).
        affines: 4x4 RAS+ voxel-to-world affines (mm) per role: ``t2w``, ``adc``, ``pd``, ``t1_pre``,
            ``dwi_highb``, ``dce`` (the acquisition grid), ``localizer`` and ``prepared``.
        dce: 4D float32 ``(x, y, z, t)`` on the acquisition grid.
        times_s: (t,) acquisition times in seconds from the start of the dynamic series.
        organ_mask: uint8 (x, y, z) prostate mask on the acquisition grid.
        lesion_mask: uint8 (x, y, z), lesion ``i`` labelled ``i`` (1..k; 0 elsewhere).
        zone_mask: uint8 (x, y, z): 1 peripheral zone, 2 transition zone (lesion voxels excluded).
        localizer: 3D float32 sagittal localizer (3 slices), affine ``affines["localizer"]``.
        prepared_k0: first acquisition-grid slice of the prepared grid.
        prepared_slices: number of slices of the prepared grid.
        t2w_prepared: T2w on the prepared grid (box-filtered from the fine grid).
        truth: ground truth for the manifest (tissues, lesions, AIF, protocol, geometry, seed).
        dwi: b-value (s/mm^2, :data:`DWI_B_VALUES`) -> 3D float32 trace-weighted DWI on the acquisition grid
            (integer values, Rician noise); ``images["adc"]`` is the two-point fit of its b = 50 and 800 images.
    """

    seed: Any
    images: dict[str, np.ndarray]
    affines: dict[str, np.ndarray]
    dce: np.ndarray
    times_s: np.ndarray
    organ_mask: np.ndarray
    lesion_mask: np.ndarray
    zone_mask: np.ndarray
    localizer: np.ndarray
    prepared_k0: int
    prepared_slices: int
    t2w_prepared: np.ndarray
    truth: dict[str, Any] = field(default_factory=dict)
    dwi: dict[float, np.ndarray] = field(default_factory=dict)

    def prepared(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Volumes on the prepared grid (the acquisition grid restricted to ``prepared_slices``
        slices centred on the prostate) and its affine.

        Returns:
            ``({name: array}, affine)`` with names ``t2w, adc, pd, t1_pre, dwi_highb, dce (4D),
            organ_mask, lesion_mask``.
        """
        sl = slice(self.prepared_k0, self.prepared_k0 + self.prepared_slices)
        out = {k: self.images[k][:, :, sl] for k in ("adc", "pd", "t1_pre", "dwi_highb")}
        out["t2w"] = self.t2w_prepared
        out["dce"] = self.dce[:, :, sl]
        out["organ_mask"] = self.organ_mask[:, :, sl]
        out["lesion_mask"] = self.lesion_mask[:, :, sl]
        return out, self.affines["prepared"]


# ----------------------------------------------------------------------------------------------
# lesion coupling

#: Lesion count probabilities (index = number of lesions) and radius range (mm) of the default phantom.
LESION_COUNT_P = (0.2, 0.5, 0.3)
LESION_RADIUS_MM = (5.0, 9.0)
#: Named lesion settings (keyword arguments of :func:`make_prostate_phantom`). ``uncoupled``: the
#: phantom of the versions before the coupling (the function defaults). ``learnable``: the data set
#: ``make phantoms`` and ``make demo`` write, lesions a model can learn from T2w, ADC and the
#: pre-contrast frame: fully coupled, 1-3 lesions per subject (probabilities 0.25, 0.5, 0.25) of
#: 7-11 mm mean radius (14-22 mm across, the size of clinically significant index lesions).
LESION_PRESETS: dict[str, dict[str, Any]] = {
    "uncoupled": {"lesion_coupling": 0.0, "lesion_count_p": LESION_COUNT_P, "lesion_radius_mm": LESION_RADIUS_MM},
    "learnable": {"lesion_coupling": 1.0, "lesion_count_p": (0.0, 0.25, 0.5, 0.25), "lesion_radius_mm": (7.0, 11.0)},
}


def lesion_preset(name: str, option: str = "lesions") -> dict[str, Any]:
    """The keyword arguments of :data:`LESION_PRESETS` ``[name]``; an unknown name raises ``ValueError`` naming ``option``."""
    if name not in LESION_PRESETS:
        raise ValueError(f"{option} must be one of {sorted(LESION_PRESETS)}, got {name!r}")
    return dict(LESION_PRESETS[name])


def lesion_settings(coupling: float, count_p: Sequence[float], radius_mm: Sequence[float]) -> dict[str, Any]:
    """The manifest record of the lesion settings (``ground_truth["lesion_settings"]``), with the
    name of the :data:`LESION_PRESETS` entry they equal (``"custom"`` otherwise)."""
    rec = {
        "lesion_coupling": float(coupling),
        "lesion_count_p": [float(v) for v in count_p],
        "lesion_radius_mm": [float(v) for v in radius_mm],
    }
    same = lambda p: all(np.allclose(np.asarray(p[k], float), rec[k]) for k in rec)  # noqa: E731
    names = [n for n, p in LESION_PRESETS.items() if len(p["lesion_count_p"]) == len(rec["lesion_count_p"]) and same(p)]
    return {"preset": names[0] if names else "custom", **rec}


#: Ranges of the independent lesion draws (ADC in mm^2/s, T2 in s, Ktrans and kep in 1/min).
LESION_ADC = (0.7e-3, 1.0e-3)
LESION_T2 = (0.07, 0.09)
LESION_KTRANS = (0.3, 0.6)
LESION_KEP = (1.2, 2.5)
LESION_VP = (0.04, 0.08)
#: Inner part of a coupled lesion: the lesion's shape scaled by this factor about its centre.
LESION_CORE_SCALE = 0.6
#: Relative change of the inner part against the outer part at ``lesion_coupling = 1``: ADC and T2
#: lower (more cellular), Ktrans, kep and vp higher (earlier, stronger uptake).
LESION_CORE_CHANGE = {"ADC": -0.35, "T2": -0.2, "ktrans": 0.8, "kep": 0.2, "vp": 0.5}


def check_lesion_coupling(value: Any, name: str = "lesion_coupling") -> float:
    """``value`` as a float in [0, 1]; anything else raises ``ValueError`` naming ``name``."""
    try:
        c = float(value)
    except (TypeError, ValueError):
        c = float("nan")
    if isinstance(value, bool) or not 0.0 <= c <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return c


def check_lesion_shape(count_p: Sequence[float], radius_mm: Sequence[float]) -> None:
    """Raise ``ValueError`` naming the parameter unless ``count_p`` are probabilities (>= 0, sum 1)
    and ``radius_mm`` is a range ``(lo, hi)`` with ``0 < lo <= hi``."""
    p = np.asarray(count_p, float)
    if p.ndim != 1 or p.size == 0 or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"lesion_count_p must be probabilities of 0, 1, 2, ... lesions summing to 1, got {count_p!r}")
    r = np.asarray(radius_mm, float)
    if r.shape != (2,) or not 0 < r[0] <= r[1]:
        raise ValueError(f"lesion_radius_mm must be a range (lo, hi) in mm with 0 < lo <= hi, got {radius_mm!r}")


def lesion_cellularity(adc_mm2_s: float) -> float:
    """Cellularity score ``u = (ADC_max - ADC) / (ADC_max - ADC_min)`` of a lesion ADC within
    :data:`LESION_ADC`, clipped to 0..1 (1 = lowest ADC = most cellular)."""
    lo, hi = LESION_ADC
    return float(np.clip((hi - adc_mm2_s) / (hi - lo), 0.0, 1.0))


def couple_lesion(t: Tissue, coupling: float) -> tuple[Tissue, Tissue]:
    """Tie a lesion's T2 and kinetics to its ADC the way tumours are, and make its inner part.

    With ``c = coupling`` (0..1), the lesion's cellularity ``u`` (:func:`lesion_cellularity`, from
    its ADC, which is kept) and ``lerp(a, b) = (1 - c) a + c b``, the outer part (the whole lesion
    shape) becomes::

        T2     = lerp(T2_0,     0.09 - 0.02 u)     s      (darker on T2w when more cellular)
        Ktrans = lerp(Ktrans_0, 0.30 + 0.30 u)     1/min  (stronger uptake)
        kep    = lerp(kep_0,    1.00 + 0.80 u)     1/min  (earlier peak and washout)
        vp     = lerp(vp_0,     0.04 + 0.04 u)

    (``X_0`` the independent draws, :data:`LESION_T2` etc.; at ``c = 1`` Ktrans, kep and T2 are
    exact linear functions of the ADC: ADC and Ktrans correlate at -1 across lesions). The inner
    part (the shape scaled by :data:`LESION_CORE_SCALE`) is more cellular still:
    ``X_core = X (1 + c d_X)`` with ``d`` = :data:`LESION_CORE_CHANGE` (ADC -35 %, T2 -20 %,
    Ktrans +80 %, kep +20 %, vp +50 % at ``c = 1``). T1 and PD are those of the outer part.

    Returns:
        ``(outer, inner)`` tissues; ``coupling = 0`` returns ``t`` unchanged and an identical inner part.
    """
    c = check_lesion_coupling(coupling)
    u = lesion_cellularity(t.ADC)
    lerp = lambda a, b: (1.0 - c) * a + c * b  # noqa: E731
    outer = Tissue(
        T1=t.T1,
        T2=lerp(t.T2, 0.09 - 0.02 * u),
        PD=t.PD,
        ADC=t.ADC,
        pk=TissuePK(
            ktrans=lerp(t.pk.ktrans, 0.30 + 0.30 * u),
            kep=lerp(t.pk.kep, 1.00 + 0.80 * u),
            vp=lerp(t.pk.vp, 0.04 + 0.04 * u),
        ),
        fat=t.fat,
    )
    d = {k: 1.0 + c * v for k, v in LESION_CORE_CHANGE.items()}
    inner = Tissue(
        T1=outer.T1,
        T2=outer.T2 * d["T2"],
        PD=outer.PD,
        ADC=outer.ADC * d["ADC"],
        pk=TissuePK(ktrans=outer.pk.ktrans * d["ktrans"], kep=outer.pk.kep * d["kep"], vp=outer.pk.vp * d["vp"]),
        fat=outer.fat,
    )
    return outer, inner


# ----------------------------------------------------------------------------------------------
# anatomy


def _sample_lesion_center(
    rng: np.random.Generator, prostate: Ellipsoid, tz: Ellipsoid, zone: str, margin: float = 4.0
) -> np.ndarray:
    """A point inside the peripheral (``"PZ"``) or transition (``"TZ"``) zone, ``margin`` mm inside the gland."""
    R = float(np.max(prostate.radii))
    for _ in range(2000):
        p = prostate.center + rng.uniform(-R, R, 3)
        d_p = prostate.distance(p[None])[0]
        d_t = tz.distance(p[None])[0]
        if d_p > -margin:
            continue
        if (zone == "PZ" and d_t > 1.0) or (zone == "TZ" and d_t < -1.0):
            return p
    return prostate.center + np.array([0.0, -0.6 * prostate.radii[1], 0.0])


def build_scene(
    rng: np.random.Generator,
    center: np.ndarray,
    n_lesions: int | None = None,
    lesion_coupling: float = 0.0,
    lesion_count_p: Sequence[float] = LESION_COUNT_P,
    lesion_radius_mm: Sequence[float] = LESION_RADIUS_MM,
) -> tuple[Scene, dict[str, Tissue], dict]:
    """Random pelvic anatomy around the prostate centre ``center`` (world mm).

    ``lesion_coupling`` (0..1) ties each lesion's T2, kinetics and inner part to its ADC
    (:func:`couple_lesion`); 0 leaves the lesions as independent draws with no inner part.
    Without ``n_lesions`` the number of lesions is drawn with probabilities ``lesion_count_p``
    (entry k: k lesions); each lesion's mean radius is uniform in ``lesion_radius_mm``.

    Returns:
        ``(scene, tissues, description)``: the scene, the tissue table including one entry per
        lesion (``lesion1``, ``lesion2``, ...), and the shapes/lesions for the manifest.
    """
    c = np.asarray(center, float)
    e = lambda off, radii, **kw: random_ellipsoid(rng, c + np.asarray(off, float), radii, **kw)  # noqa: E731
    prostate = e((0, 0, 0), (22, 17, 18), jitter=0.12, bump=0.05, rotate_deg=8)
    tz = random_ellipsoid(
        rng,
        c + np.array([0, 3.5, 3.0]) + rng.normal(0, 1.0, 3),
        prostate.radii * np.array([0.62, 0.58, 0.66]),
        jitter=0.08,
        bump=0.05,
        rotate_deg=6,
    )
    tissues = dict(TISSUES)
    if n_lesions is None:
        n_lesions = int(rng.choice(len(lesion_count_p), p=np.asarray(lesion_count_p, float)))
    lesions, lesion_shapes = [], []
    for i in range(n_lesions):
        zone = "PZ" if rng.random() < 0.8 else "TZ"
        lc = _sample_lesion_center(rng, prostate, tz, zone)
        shp = random_ellipsoid(
            rng, lc, np.full(3, rng.uniform(*lesion_radius_mm)), jitter=0.2, bump=0.12, rotate_deg=30
        )
        name = f"lesion{i + 1}"
        tissues[name] = Tissue(
            T1=float(rng.uniform(1.45, 1.6)),
            T2=float(rng.uniform(0.07, 0.09)),
            PD=0.8,
            ADC=float(rng.uniform(0.7e-3, 1.0e-3)),
            pk=TissuePK(
                ktrans=float(rng.uniform(0.3, 0.6)), kep=float(rng.uniform(1.2, 2.5)), vp=float(rng.uniform(0.04, 0.08))
            ),
        )
        entry = {"label": i + 1, "name": name, "zone": zone}
        if lesion_coupling > 0:
            # no random draws here: the anatomy and noise of every seed stay those of lesion_coupling=0
            tissues[name], core = couple_lesion(tissues[name], lesion_coupling)
            core_shape = Ellipsoid(shp.center, shp.radii * LESION_CORE_SCALE, shp.rotation, shp.bumps, shp.phases)
            tissues[f"{name}_core"] = core
            lesion_shapes.append((f"{name}_core", core_shape))
            entry["coupling"] = float(lesion_coupling)
            entry["core"] = {"radius_scale": LESION_CORE_SCALE, **core.as_dict()}
        lesion_shapes.append((name, shp))
        lesions.append({**entry, **shp.describe(), **tissues[name].as_dict()})

    # the inner part of a lesion comes before its outer part (higher priority: it takes its voxels)
    items: list[tuple[str, Any, Any]] = [(n, s, prostate) for n, s in lesion_shapes]
    items += [("tz", tz, prostate), ("pz", prostate, None)]
    # rectum posterior to the prostate, bladder superior-anterior
    rectum_c = (0, -31 + rng.normal(0, 1.5), -5)
    lumen = e(rectum_c, (10, 7, 60), jitter=0.15, bump=0.08, rotate_deg=5)
    wall = Ellipsoid(lumen.center, lumen.radii + np.array([6.0, 6.0, 2.0]), lumen.rotation, lumen.bumps, lumen.phases)
    urine = e((0, 12, 46), (40, 30, 28), jitter=0.15, bump=0.06, rotate_deg=8)
    bwall = Ellipsoid(urine.center, urine.radii + 3.0, urine.rotation, urine.bumps, urine.phases)
    items += [
        ("rectal_content", lumen, None),
        ("rectal_wall", wall, None),
        ("urine", urine, None),
        ("bladder_wall", bwall, None),
    ]
    # femoral vessels, bones, muscles (left/right pairs), body
    vessels = []
    for s in (-1, 1):
        tilt = np.array([0.05 * s, 0.12, 1.0]) + rng.normal(0, 0.03, 3)
        art = Tube(c + np.array([s * 82, 52, 0]) + rng.normal(0, 2, 3), tilt, float(rng.uniform(3.5, 4.5)))
        vein = Tube(c + np.array([s * 66, 48, 0]) + rng.normal(0, 2, 3), tilt, float(rng.uniform(5.0, 6.5)))
        vessels += [("artery", art, None), ("vein", vein, None)]
    items += vessels
    for s in (-1, 1):
        items += [
            ("bone", e((s * 98, 8, 12), (24, 24, 24), jitter=0.08), None),  # femoral heads
            ("bone", e((s * 55, -30, -22), (14, 18, 26), jitter=0.1), None),  # ischial tuberosities
            ("bone", e((s * 16, 42, 10), (16, 9, 18), jitter=0.1), None),  # pubic rami at the symphysis
        ]
    for s in (-1, 1):
        items += [
            ("muscle", e((s * 47, 2, 0), (9, 30, 40), jitter=0.1), None),  # obturator internus
            ("muscle", e((s * 80, -72, 0), (52, 32, 90), jitter=0.1), None),  # gluteus maximus
            ("muscle", e((s * 70, 40, 5), (22, 22, 90), jitter=0.1), None),  # iliopsoas
            ("muscle", e((s * 32, 110, 0), (28, 9, 100), jitter=0.1), None),  # rectus abdominis
            ("muscle", e((s * 20, -22, -25), (18, 6, 20), jitter=0.1, rotate_deg=20), None),  # levator ani
        ]
    body = e((0, 12, 0), (178, 115, 400), jitter=0.05, bump=0.03, rotate_deg=2)
    items.append(("fat", body, None))
    desc = {
        "prostate": prostate.describe(),
        "transition_zone": tz.describe(),
        "bladder": urine.describe(),
        "rectum": lumen.describe(),
        "arteries": [v[1].describe() for v in vessels if v[0] == "artery"],
        "veins": [v[1].describe() for v in vessels if v[0] == "vein"],
        "lesions": lesions,
    }
    return Scene(items), tissues, desc


# ----------------------------------------------------------------------------------------------
# contrasts


def _tissue_tables(
    tissues: dict[str, Tissue], curves: dict[str, np.ndarray], lesion_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-tissue values of the acquisition-grid channels:
    ``[dce(t)..., pd, t1_pre, dwi_b50, dwi_b800, prostate, pz, tz, lesion1..k, dwi_b400]``."""
    P = PROTOCOL
    table = {}
    for name, t in tissues.items():
        s0 = t.PD
        dce = spgr_signal(
            s0 * P["dce"]["scale"], t.T1, curves[name], P["dce"]["r1_per_mM_s"], P["dce"]["TR_s"], P["dce"]["flip_deg"]
        )
        pd = spgr_signal(s0 * P["pd"]["scale"], t.T1, 0.0, TR_s=P["pd"]["TR_s"], flip_deg=P["pd"]["flip_deg"])
        t1 = spgr_signal(
            s0 * P["t1_pre"]["scale"], t.T1, 0.0, TR_s=P["t1_pre"]["TR_s"], flip_deg=P["t1_pre"]["flip_deg"]
        )
        d = P["dwi"]
        b0 = spin_echo_signal(s0 * d["scale"], t.T1, t.T2, d["TR_s"], d["TE_s"]) * (
            d["fat_suppression"] if t.fat else 1.0
        )
        b50 = b0 * np.exp(-d["b_low"] * t.ADC)
        b800 = b0 * np.exp(-d["b_mid"] * t.ADC)
        organ = 1.0 if name in ("pz", "tz") or name.startswith("lesion") else 0.0
        les = [1.0 if name in (ln, f"{ln}_core") else 0.0 for ln in lesion_names]
        zones = [1.0 if name == "pz" else 0.0, 1.0 if name == "tz" else 0.0]
        b400 = b0 * np.exp(-DWI_B_VALUES[1] * t.ADC)
        table[name] = np.concatenate([np.atleast_1d(dce), [pd, t1, b50, b800, organ], zones, les, [b400]]).astype(
            np.float32
        )
    return table


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` in-plane blocks of a 3D array."""
    nx, ny, nz = x.shape
    return x.reshape(nx // f, f, ny // f, f, nz).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _integer_subgrid(fine: np.ndarray, coarse: np.ndarray, fine_shape, coarse_shape) -> int | None:
    """The in-plane factor ``f`` when the fine grid splits each coarse voxel into ``f x f`` voxels on the same slices."""
    sf, sc = np.linalg.norm(fine[:3, :3], axis=0), np.linalg.norm(coarse[:3, :3], axis=0)
    f = sc[0] / sf[0]
    if abs(f - round(f)) > 1e-6 or round(f) < 1 or abs(sc[1] / sf[1] - f) > 1e-6 or abs(sc[2] - sf[2]) > 1e-6:
        return None
    f = int(round(f))
    if fine_shape[0] != f * coarse_shape[0] or fine_shape[1] != f * coarse_shape[1] or fine_shape[2] != coarse_shape[2]:
        return None
    # centre of the first f x f block of fine voxels must be the first coarse voxel centre
    c_fine = fine[:3, :3] @ np.array([(f - 1) / 2, (f - 1) / 2, 0.0]) + fine[:3, 3]
    if not np.allclose(c_fine, coarse[:3, 3], atol=1e-4) or not np.allclose(
        fine[:3, :3], coarse[:3, :3] / [f, f, 1], atol=1e-6
    ):
        return None
    return f


def make_prostate_phantom(
    seed: int | Sequence[int] = 0,
    grid_shape: Sequence[int] = (160, 160, 20),
    grid_spacing: Sequence[float] = (1.6, 1.6, 3.6),
    t2w_shape: Sequence[int] = (320, 320, 20),
    t2w_spacing: Sequence[float] = (0.8, 0.8, 3.6),
    prepared_slices: int = 16,
    n_dce: int = 20,
    dce_first_s: float = 8.0,
    dce_duration_s: float = 300.0,
    bolus_arrival_s: float | None = None,
    oblique_deg: float | None = None,
    oblique_axis: Sequence[float] = (1.0, 0.4, 0.25),
    n_lesions: int | None = None,
    lesion_coupling: float = 0.0,
    lesion_count_p: Sequence[float] = LESION_COUNT_P,
    lesion_radius_mm: Sequence[float] = LESION_RADIUS_MM,
) -> ProstatePhantom:
    """Render one prostate subject.

    Args:
        seed: seed of the subject's ``numpy.random.default_rng`` (same seed: identical arrays).
        grid_shape, grid_spacing: acquisition grid of DCE, PD, T1, ADC and DWI (voxels, mm).
        t2w_shape, t2w_spacing: T2w grid (same FOV and centre, finer in-plane).
        prepared_slices: slices of the prepared grid, centred on the prostate.
        n_dce: DCE time points, ``dce_first_s + k * dce_duration_s / (n_dce - 1)`` seconds
            (rounded to 0.1 s, the resolution of the ``TT=<t>s`` series descriptions).
        bolus_arrival_s: AIF bolus arrival; default uniform in 40-50 s.
        oblique_deg: rotation of the slice stack about ``oblique_axis``; default uniform in 8-12 deg.
        n_lesions: number of lesions; default drawn with probabilities ``lesion_count_p`` (entry k:
            k lesions; default :data:`LESION_COUNT_P`, 0, 1 or 2 lesions with 0.2, 0.5, 0.3).
        lesion_radius_mm: range of a lesion's mean radius (default :data:`LESION_RADIUS_MM`, 5-9 mm).
        lesion_coupling: 0..1, how strongly a lesion's T2w and kinetics follow its ADC and how much
            its inner part differs from its outer part (:func:`couple_lesion`); 0 gives the
            uncoupled lesions of versions before it (the same arrays for the same seed).
    """
    rng = np.random.default_rng(seed)
    if grid_shape[2] < prepared_slices:
        raise ValueError(
            f"the acquisition grid has {grid_shape[2]} slices, fewer than prepared_slices={prepared_slices}"
        )
    if n_dce < 2:
        raise ValueError(f"n_dce must be at least 2, got {n_dce}")
    lesion_coupling = check_lesion_coupling(lesion_coupling)
    check_lesion_shape(lesion_count_p, lesion_radius_mm)
    # geometry: prostate centre in scanner coordinates, oblique slice stack around it
    center = np.array([1.5, 18.0, -45.0]) + rng.normal(0, 3.0, 3)
    angle = float(rng.uniform(8.0, 12.0)) if oblique_deg is None else float(oblique_deg)
    directions = rotation_matrix(oblique_axis, angle) @ AXIAL_DICOM
    grid_center = center + rng.normal(0, [4.0, 4.0, 2.0])
    A = grid_affine(grid_shape, grid_spacing, directions, grid_center)
    A_t2 = grid_affine(t2w_shape, t2w_spacing, directions, grid_center)
    loc_dirs = rotation_matrix(oblique_axis, angle) @ SAGITTAL_DICOM
    A_loc = grid_affine((128, 128, 3), (2.0, 2.0, 10.0), loc_dirs, center)

    scene, tissues, desc = build_scene(rng, center, n_lesions, lesion_coupling, lesion_count_p, lesion_radius_mm)
    lesion_names = [les["name"] for les in desc["lesions"]]
    arrival = float(rng.uniform(40.0, 50.0)) if bolus_arrival_s is None else float(bolus_arrival_s)
    dt = dce_duration_s / (n_dce - 1)
    times = np.round(dce_first_s + dt * np.arange(n_dce), 1)
    curves = tissue_curves(times, {n: t.pk for n, t in tissues.items()}, arrival, blood=BLOOD, veins=VEINS)
    table = _tissue_tables(tissues, curves, lesion_names)

    # acquisition grid: all channels at once
    ch = render(scene, A, grid_shape, table)
    bias_field = BiasField.random(rng, center, 120.0, 0.15)
    texture = FourierField.random(rng, 10.0, 16)
    mult = bias_texture(bias_field, texture, A, grid_shape)[..., None]
    T = n_dce
    P = PROTOCOL
    dce = quantise(rician(rng, ch[..., :T] * mult, P["dce"]["noise"]))
    pd = quantise(rician(rng, ch[..., T] * mult[..., 0], P["pd"]["noise"]))
    t1 = quantise(rician(rng, ch[..., T + 1] * mult[..., 0], P["t1_pre"]["noise"]))
    d = P["dwi"]
    b50 = rician(rng, ch[..., T + 2] * mult[..., 0], d["noise"])
    b800 = rician(rng, ch[..., T + 3] * mult[..., 0], d["noise"])
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(np.maximum(b50, 1e-3) / np.maximum(b800, 1e-3)) / (d["b_mid"] - d["b_low"])
    valid = b50 > 8 * d["noise"]
    adc = np.where(valid, np.clip(adc, 0.0, MAX_ADC * 1e-6), 0.0)
    dwi_hi = np.where(
        valid, b50 * np.exp(-(d["b_high"] - d["b_low"]) * adc), rician(rng, np.zeros_like(b50), d["noise"])
    )
    adc_map = quantise(adc * 1e6, MAX_ADC)
    dwi_hi = quantise(dwi_hi)
    organ = (ch[..., T + 4] >= 0.5).astype(np.uint8)
    zones = np.zeros(tuple(grid_shape), np.uint8)
    zones[ch[..., T + 5] >= 0.5] = 1
    zones[ch[..., T + 6] >= 0.5] = 2
    lesion = np.zeros(tuple(grid_shape), np.uint8)
    for i in range(len(lesion_names)):
        lesion[ch[..., T + 7 + i] >= 0.5] = i + 1
    b400_clean = ch[..., T + 7 + len(lesion_names)] * mult[..., 0]
    del ch

    # T2w on its finer grid
    t2_table = {
        n: np.array(
            [spin_echo_signal(t.PD * P["t2w"]["scale"], t.T1, t.T2, P["t2w"]["TR_s"], P["t2w"]["TE_s"])], np.float32
        )
        for n, t in tissues.items()
    }
    t2 = render(scene, A_t2, t2w_shape, t2_table)[..., 0]
    t2 = quantise(rician(rng, t2 * bias_texture(bias_field, texture, A_t2, t2w_shape), P["t2w"]["noise"]))

    # sagittal localizer (bSSFP-like contrast, PD sqrt(T2/T1)), to be ignored by an ingest
    loc_table = {
        n: np.array([t.PD * np.sqrt(t.T2 / t.T1) * P["localizer"]["scale"]], np.float32) for n, t in tissues.items()
    }
    loc = quantise(rician(rng, render(scene, A_loc, (128, 128, 3), loc_table)[..., 0], P["localizer"]["noise"]))

    # prepared grid: prostate-centred slices of the acquisition grid (origin shift only)
    k_c = (np.linalg.inv(A) @ np.append(center, 1.0))[2]
    k0 = int(np.clip(round(k_c - (prepared_slices - 1) / 2), 0, grid_shape[2] - prepared_slices))
    A_prep = A.copy()
    A_prep[:3, 3] = A[:3, :3] @ np.array([0.0, 0.0, k0]) + A[:3, 3]
    f = _integer_subgrid(A_t2, A, t2w_shape, grid_shape)
    if f is not None:
        t2_prep = _block_mean(t2, f)[:, :, k0 : k0 + prepared_slices]
        t2_prep_how = f"{f}x{f} in-plane box average of the native T2w"
    else:
        shape_p = (grid_shape[0], grid_shape[1], prepared_slices)
        t2_prep = render(scene, A_prep, shape_p, t2_table)[..., 0]
        t2_prep = rician(rng, t2_prep * bias_texture(bias_field, texture, A_prep, shape_p), P["t2w"]["noise"])
        t2_prep_how = "rendered directly on the prepared grid"

    # multi-b DWI: the b50 and b800 images of the ADC map plus b400 (noise drawn last: the other
    # images stay those of the earlier versions for the same seed)
    b400 = rician(rng, b400_clean, d["noise"])
    dwi = {DWI_B_VALUES[0]: quantise(b50), DWI_B_VALUES[1]: quantise(b400), DWI_B_VALUES[2]: quantise(b800)}
    del b400_clean

    affines = {"t2w": A_t2, "dce": A, "localizer": A_loc, "prepared": A_prep}
    for role in ("adc", "pd", "t1_pre", "dwi_highb"):
        affines[role] = A
    truth = {
        "seed": seed if isinstance(seed, (int, np.integer)) else list(seed),
        "lesion_settings": lesion_settings(lesion_coupling, lesion_count_p, lesion_radius_mm),
        "tissues": {n: t.as_dict() for n, t in tissues.items()},
        "lesions": desc["lesions"],
        "anatomy": {k: v for k, v in desc.items() if k != "lesions"},
        "aif": {
            "model": "Parker 2006 (dcmri.aif_parker), whole blood",
            **PARKER,
            "bolus_arrival_s": arrival,
            "haematocrit": HAEMATOCRIT,
        },
        "kinetics": "extended Tofts (dcmri.conc_tissue kinetics='HF'), Ktrans and kep in 1/min",
        "protocol": PROTOCOL,
        "geometry": {
            "oblique_axis": list(np.asarray(oblique_axis, float) / np.linalg.norm(oblique_axis)),
            "oblique_deg": angle,
            "acquisition_grid": {"shape": list(grid_shape), "spacing_mm": list(grid_spacing), "affine": A.tolist()},
            "t2w_grid": {"shape": list(t2w_shape), "spacing_mm": list(t2w_spacing), "affine": A_t2.tolist()},
            "prepared_grid": {
                "shape": [grid_shape[0], grid_shape[1], prepared_slices],
                "first_slice": k0,
                "affine": A_prep.tolist(),
                "t2w": t2_prep_how,
            },
            "prostate_center_mm": center.tolist(),
        },
        "units": {"adc": "1e-6 mm^2/s", "signals": "arbitrary (integer, 12-bit)", "times": "s"},
        "dwi_b_values_s_mm2": list(DWI_B_VALUES),
        "noise_sigma": {k: v["noise"] for k, v in PROTOCOL.items()},
    }
    return ProstatePhantom(
        seed=seed,
        images={"t2w": t2, "adc": adc_map, "pd": pd, "t1_pre": t1, "dwi_highb": dwi_hi},
        affines=affines,
        dce=dce,
        times_s=times,
        organ_mask=organ,
        lesion_mask=lesion,
        zone_mask=zones,
        localizer=loc,
        prepared_k0=k0,
        prepared_slices=prepared_slices,
        t2w_prepared=t2_prep.astype(np.float32),
        truth=truth,
        dwi=dwi,
    )


# ----------------------------------------------------------------------------------------------
# writing


def write_native_nifti(ph: ProstatePhantom, folder: str | os.PathLike) -> dict[str, Path]:
    """Write the native-grid volumes (what the DICOM encodes) and ``dce_times.json`` into ``folder``.

    Files: ``t2w adc pd t1_pre dwi_highb dce organ_mask lesion_mask`` ``.nii.gz`` (images int16 with
    integer scanner values, masks uint8 on the DCE grid) and ``dce_times.json``.
    """
    folder = Path(folder)
    out = {}
    for role, img in ph.images.items():
        out[role] = save_nifti(img, ph.affines[role], folder / f"{role}.nii.gz", dtype=lossless_dtype(img))
    out["dce"] = save_nifti(ph.dce, ph.affines["dce"], folder / "dce.nii.gz", dtype=lossless_dtype(ph.dce))
    out["organ_mask"] = save_nifti(ph.organ_mask, ph.affines["dce"], folder / "organ_mask.nii.gz", dtype=np.uint8)
    out["lesion_mask"] = save_nifti(ph.lesion_mask, ph.affines["dce"], folder / "lesion_mask.nii.gz", dtype=np.uint8)
    out["dce_times"] = save_json({"times_s": ph.times_s.tolist()}, folder / DCE_TIMES)
    return out


def write_prepared_case(
    ph: ProstatePhantom, case_dir: str | os.PathLike, case_id: str, extra: dict | None = None
) -> dict[str, Any]:
    """Write one prepared case per :mod:`common.layout` and return its manifest.

    Every volume lies on the prepared grid (``ph.prepared()``). Integer-valued images (the scanner
    quantisation of the phantom) are stored as int16, losslessly; the box-filtered T2w as float32.
    The phases ``dce_pre``,
    ``dce_onset``, ``dce_early``, ``dce_late`` are chosen by :func:`common.dce.select_phases` on
    the unmasked mean curve (default rules).
    """
    case_dir = Path(case_dir)
    vols, A = ph.prepared()
    for key in ("t2w", "adc", "pd", "t1_pre", "dwi_highb"):
        save_nifti(vols[key], A, case_dir / f"{key}.nii.gz", dtype=lossless_dtype(vols[key]))
    dce_dtype = lossless_dtype(vols["dce"])
    save_nifti(vols["dce"], A, case_dir / "dce.nii.gz", dtype=dce_dtype)
    save_nifti(vols["organ_mask"], A, case_dir / "organ_mask.nii.gz", dtype=np.uint8)
    save_nifti(vols["lesion_mask"], A, case_dir / "lesion_mask.nii.gz", dtype=np.uint8)
    save_json({"times_s": ph.times_s.tolist()}, case_dir / DCE_TIMES)
    phases = select_phases(ph.times_s, mean_curve(vols["dce"]))
    for name, idx in phases.items():
        save_nifti(vols["dce"][..., idx], A, case_dir / f"dce_{name}.nii.gz", dtype=dce_dtype)
    manifest = {
        "id": case_id,
        "source": "phantom",
        "kind": "prostate",
        "phases": {name: {"index": int(i), "time_s": float(ph.times_s[i])} for name, i in phases.items()},
        "phase_rule": "common.dce.select_phases(times, mean_curve(dce)) with default rules, no mask",
        "times_s": ph.times_s.tolist(),
        "grid": {"shape": list(vols["adc"].shape), "affine": np.asarray(A).tolist()},
        "ground_truth": ph.truth,
        **(extra or {}),
    }
    save_json(manifest, case_dir / MANIFEST)
    return manifest


def write_prostate_subject(root: str | os.PathLike, sid: str, seed: Any, dicom: bool = True, **kwargs) -> str:
    """Make one subject and write its native NIfTI, DICOM study and prepared case below ``root``."""
    from common.phantoms.dicom import write_prostate_study

    root = Path(root)
    ph = make_prostate_phantom(seed=seed, **kwargs)
    write_native_nifti(ph, root / "nifti" / sid)
    if dicom:
        write_prostate_study(ph, root / "dicom", sid)
    write_prepared_case(ph, root / "prepared" / sid, sid)
    return sid


def write_prostate_phantoms(
    out: str | os.PathLike,
    n: int = 10,
    seed: int = 0,
    dicom: bool = True,
    progress: bool = True,
    workers: int = 1,
    **kwargs,
) -> dict[str, Any]:
    """Make ``n`` prostate subjects ``phantom-000``... and write NIfTI, DICOM and prepared cases.

    Layout below ``<out>/prostate``: ``nifti/<sid>/`` (native grids), ``dicom/<sid>/...`` (TCIA
    PROSTATEx layout), ``prepared/<sid>/`` (common.layout) and ``prepared/datalist.json``.
    Subject ``i`` uses the seed ``[seed, 0, i]``. ``kwargs`` go to :func:`make_prostate_phantom`.
    """
    from common.phantoms import map_subjects

    root = Path(out) / "prostate"
    jobs = [(root, f"phantom-{i:03d}", [seed, 0, i], dicom) for i in range(n)]
    subjects = map_subjects(
        functools.partial(write_prostate_subject, **kwargs), jobs, workers, "prostate phantoms", progress
    )
    return {"root": root, "subjects": subjects, "datalist": write_datalist(root / "prepared")}
