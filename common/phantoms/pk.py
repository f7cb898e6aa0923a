"""Pharmacokinetics and signal models of the phantoms: Parker AIF, extended Tofts, spoiled gradient echo.

The kinetics come from `dcmri <https://github.com/dcmri/dcmri>`_ (Apache-2.0):

- :func:`parker_aif` wraps ``dcmri.aif_parker`` (Parker et al. 2006 population AIF, whole-blood
  concentration; dcmri returns mol/L, this module works in mmol/L = mM),
- :func:`tofts_concentration` wraps ``dcmri.conc_tissue(kinetics="HF")``: dcmri's high-flow
  two-compartment model *is* the extended Tofts model (``Ct = vp*Cp + Ktrans * exp(-kep t) * Cp``),
- :func:`spgr_signal` is the steady-state spoiled gradient-echo equation, identical to
  ``dcmri.signal_ss`` (dcmri 0.6's ``signal_spgr`` is the *transient* approach to steady state
  after a preparation pulse, not the steady-state equation), written in numpy because it is
  evaluated on millions of voxels and ``dcmri.signal_ss`` is not vectorised for that.

Units: time in seconds, concentrations in mM, ``Ktrans`` and ``kep`` in 1/min (the clinical
convention; converted to 1/s for dcmri), relaxivity ``r1`` in 1/(mM s), ``T1`` in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import dcmri
import numpy as np

#: Parker et al. (2006) population AIF parameters, as implemented by ``dcmri.aif_parker``.
PARKER = {
    "A1_mM_min": 0.809,
    "A2_mM_min": 0.330,
    "T1_min": 0.17046,
    "T2_min": 0.365,
    "sigma1_min": 0.0563,
    "sigma2_min": 0.132,
    "alpha_mM": 1.050,
    "beta_per_min": 0.1685,
    "s_per_min": 38.078,
    "tau_min": 0.483,
}
HAEMATOCRIT = 0.42
R1_GD_3T = 4.5  # 1/(mM s): gadolinium chelate relaxivity at 3 T (approximate)


@dataclass(frozen=True)
class TissuePK:
    """Extended Tofts parameters of one tissue.

    Attributes:
        ktrans: volume transfer constant, 1/min.
        kep: efflux rate constant, 1/min (``ve = ktrans / kep``).
        vp: plasma volume fraction (0..1).
    """

    ktrans: float = 0.0
    kep: float = 1.0
    vp: float = 0.0

    @property
    def ve(self) -> float:
        """Extravascular extracellular volume fraction ``ktrans / kep``."""
        return self.ktrans / self.kep if self.kep > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """Parameters for a manifest (``ktrans_per_min``, ``kep_per_min``, ``vp``, ``ve``)."""
        d = asdict(self)
        return {"ktrans_per_min": d["ktrans"], "kep_per_min": d["kep"], "vp": d["vp"], "ve": self.ve}


def parker_aif(t_s: np.ndarray | Sequence[float] | float, bolus_arrival_s: float = 0.0) -> np.ndarray:
    """Parker population arterial input function (whole blood), in mM.

    Args:
        t_s: time points in seconds, any shape.
        bolus_arrival_s: bolus arrival time in seconds (the AIF's first-pass peak is about
            ``T1 = 0.17046 min`` = 10.2 s later).

    Returns:
        Blood concentration in mM, same shape as ``t_s``.
    """
    return 1000.0 * np.asarray(dcmri.aif_parker(np.asarray(t_s, dtype=np.float64), float(bolus_arrival_s)))


def plasma_from_blood(cb_mM: np.ndarray, hct: float = HAEMATOCRIT) -> np.ndarray:
    """Plasma concentration ``Cp = Cb / (1 - Hct)`` from a whole-blood concentration (mM)."""
    return np.asarray(cb_mM, dtype=np.float64) / (1.0 - hct)


def tofts_concentration(
    t_s: np.ndarray | Sequence[float],
    cp_mM: np.ndarray | Sequence[float],
    ktrans: float,
    kep: float,
    vp: float = 0.0,
) -> np.ndarray:
    """Extended Tofts tissue concentration ``Ct(t) = vp Cp(t) + Ktrans (exp(-kep t) * Cp)(t)``, mM.

    Computed by ``dcmri.conc_tissue(kinetics="HF")`` (exact exponential convolution of the
    piecewise-linear input). Sample ``t_s`` finely (about 1 s or less) for an accurate convolution;
    :func:`tissue_curves` does that and interpolates to the acquisition times.

    Args:
        t_s: time points in seconds, 1D, increasing (need not be uniform).
        cp_mM: plasma concentration at ``t_s``, mM.
        ktrans: 1/min.
        kep: 1/min (``ve = ktrans / kep``).
        vp: plasma volume fraction.

    Returns:
        Tissue concentration in mM at ``t_s`` (1D).
    """
    t = np.asarray(t_s, dtype=np.float64)
    cp = np.asarray(cp_mM, dtype=np.float64)
    if ktrans <= 0 or kep <= 0:
        return vp * cp
    ktrans_s, kep_s = ktrans / 60.0, kep / 60.0
    # dcmri's HF model takes a blood input ca and haematocrit H: with H = 0, ca is the plasma input.
    return np.asarray(dcmri.conc_tissue(cp, t=t, kinetics="HF", H=0.0, vb=float(vp), vi=ktrans_s / kep_s, PS=ktrans_s))


def spgr_signal(
    S0: np.ndarray | float,
    T1_s: np.ndarray | float,
    conc_mM: np.ndarray | float = 0.0,
    r1: float = R1_GD_3T,
    TR_s: float = 0.004,
    flip_deg: float = 12.0,
) -> np.ndarray:
    """Steady-state spoiled gradient-echo signal with contrast agent, broadcast over the inputs.

    ``R1 = 1/T1 + r1 C``, ``E1 = exp(-TR R1)``, ``S = S0 sin(a) (1 - E1) / (1 - cos(a) E1)``
    (T2* decay at the short echo time is ignored). Same as ``dcmri.signal_ss(S0, R1, TR, a)``.

    Args:
        S0: equilibrium signal scale (proton density times receive gain), arbitrary units.
        T1_s: pre-contrast T1 in seconds.
        conc_mM: contrast agent concentration in mM.
        r1: relaxivity in 1/(mM s).
        TR_s: repetition time in seconds.
        flip_deg: flip angle in degrees.
    """
    a = np.deg2rad(flip_deg)
    R1 = 1.0 / np.asarray(T1_s, dtype=np.float64) + r1 * np.asarray(conc_mM, dtype=np.float64)
    E1 = np.exp(-TR_s * R1)
    return np.asarray(S0, dtype=np.float64) * np.sin(a) * (1.0 - E1) / (1.0 - np.cos(a) * E1)


def spin_echo_signal(S0, T1_s, T2_s, TR_s: float, TE_s: float) -> np.ndarray:
    """Spin-echo (TSE) signal ``S0 (1 - exp(-TR/T1)) exp(-TE/T2)``."""
    T1, T2 = np.asarray(T1_s, dtype=np.float64), np.asarray(T2_s, dtype=np.float64)
    return np.asarray(S0, dtype=np.float64) * (1.0 - np.exp(-TR_s / T1)) * np.exp(-TE_s / T2)


def inversion_recovery_signal(S0, T1_s, T2_s, TR_s: float, TE_s: float, TI_s: float) -> np.ndarray:
    """Magnitude inversion-recovery spin-echo signal ``S0 |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``."""
    T1, T2 = np.asarray(T1_s, dtype=np.float64), np.asarray(T2_s, dtype=np.float64)
    mz = 1.0 - 2.0 * np.exp(-TI_s / T1) + np.exp(-TR_s / T1)
    return np.asarray(S0, dtype=np.float64) * np.abs(mz) * np.exp(-TE_s / T2)


def null_inversion_time(T1_s: float, TR_s: float) -> float:
    """Inversion time (s) that nulls a tissue of longitudinal relaxation ``T1_s`` (FLAIR: CSF)."""
    return float(T1_s * np.log(2.0 / (1.0 + np.exp(-TR_s / T1_s))))


def tissue_curves(
    times_s: Sequence[float],
    params: Mapping[str, TissuePK],
    bolus_arrival_s: float,
    hct: float = HAEMATOCRIT,
    dt_s: float = 0.5,
    blood: Sequence[str] = (),
    veins: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Concentration-time curves (mM) at ``times_s`` for each named tissue.

    The Parker AIF is evaluated on a fine grid (``dt_s``) from 0 to the last time point,
    converted to plasma with ``hct``, pushed through :func:`tofts_concentration` for each tissue
    and linearly interpolated to ``times_s``.

    Args:
        times_s: acquisition times in seconds.
        params: ``{tissue: TissuePK}``.
        bolus_arrival_s: AIF bolus arrival time in seconds.
        hct: haematocrit.
        dt_s: fine sampling step in seconds.
        blood: tissues that are arterial whole blood: their curve is the AIF itself.
        veins: ``{tissue: (delay_s, mean_transit_s)}``: venous whole blood, the AIF delayed and
            dispersed by a compartment (``dcmri.flux_comp``).
    """
    times_s = np.asarray(times_s, dtype=np.float64)
    t = np.arange(0.0, max(float(times_s.max()), 0.0) + 2 * dt_s, dt_s)
    cb = parker_aif(t, bolus_arrival_s)
    cp = plasma_from_blood(cb, hct)
    out: dict[str, np.ndarray] = {}
    for name, p in params.items():
        if name in blood:
            c = cb
        elif veins and name in veins:
            delay, mtt = veins[name]
            c = np.asarray(dcmri.flux_comp(parker_aif(t, bolus_arrival_s + delay), mtt, t=t))
        else:
            c = tofts_concentration(t, cp, p.ktrans, p.kep, p.vp)
        out[name] = np.interp(times_s, t, c)
    return out
