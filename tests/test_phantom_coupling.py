"""Prostate lesions whose ADC, T2w and kinetics go together (``lesion_coupling``): the closed form of
:func:`couple_lesion`, bit-for-bit reproduction of the uncoupled phantom at 0, the ADC-Ktrans
correlation across many lesions and the inner vs outer part of a rendered lesion."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from common.phantoms import SMALL
from common.phantoms.pk import TissuePK
from common.phantoms.prostate import (
    LESION_CORE_CHANGE,
    LESION_COUNT_P,
    LESION_PRESETS,
    LESION_RADIUS_MM,
    Tissue,
    build_scene,
    check_lesion_coupling,
    couple_lesion,
    lesion_cellularity,
    lesion_preset,
    lesion_settings,
    make_prostate_phantom,
)
from common.phantoms.shapes import world_points

#: sha256 of the arrays of ``make_prostate_phantom([5, 0, 0], n_lesions=2, **SMALL["prostate"])`` made by
#: the code before the coupling existed (commit 4455b63): lesion_coupling=0 must reproduce them.
UNCOUPLED_SHA256 = "b47ba0810cef6e36d611b83efa44582cf3ad0f1b18fd5804a14fbc64cbb8807f"


def _digest(p) -> str:
    h = hashlib.sha256()
    arrays = [*(p.images[k] for k in sorted(p.images)), p.dce, p.organ_mask, p.lesion_mask, p.zone_mask]
    arrays += [p.localizer, p.t2w_prepared, *(p.dwi[b] for b in sorted(p.dwi))]
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_coupling_zero_reproduces_the_uncoupled_phantom():
    p = make_prostate_phantom(seed=[5, 0, 0], n_lesions=2, lesion_coupling=0.0, **SMALL["prostate"])
    assert _digest(p) == UNCOUPLED_SHA256
    assert not any(n.endswith("_core") for n in p.truth["tissues"])
    assert all("core" not in les for les in p.truth["lesions"])


def test_couple_lesion_closed_form():
    t = Tissue(T1=1.5, T2=0.08, PD=0.8, ADC=0.76e-3, pk=TissuePK(0.5, 2.0, 0.07))
    assert lesion_cellularity(0.76e-3) == pytest.approx(0.8)
    assert lesion_cellularity(0.5e-3) == 1.0 and lesion_cellularity(1.2e-3) == 0.0
    outer, inner = couple_lesion(t, 1.0)
    # u = 0.8: T2 = 0.09 - 0.016, Ktrans = 0.3 + 0.24, kep = 1.0 + 0.64, vp = 0.04 + 0.032
    assert (outer.T2, outer.ADC, outer.T1, outer.PD) == pytest.approx((0.074, 0.76e-3, 1.5, 0.8))
    assert (outer.pk.ktrans, outer.pk.kep, outer.pk.vp) == pytest.approx((0.54, 1.64, 0.072))
    # inner part: ADC -35 %, T2 -20 %, Ktrans +80 %, kep +20 %, vp +50 % (ve = Ktrans / kep +50 %)
    assert (inner.ADC, inner.T2) == pytest.approx((0.494e-3, 0.0592))
    assert (inner.pk.ktrans, inner.pk.kep, inner.pk.vp) == pytest.approx((0.972, 1.968, 0.108))
    assert inner.pk.ve == pytest.approx(1.5 * outer.pk.ve)
    half, half_inner = couple_lesion(t, 0.5)  # halfway between the draw and the coupled value
    assert (half.T2, half.pk.ktrans, half.pk.kep) == pytest.approx((0.077, 0.52, 1.82))
    assert half_inner.ADC == pytest.approx(0.76e-3 * (1 + 0.5 * LESION_CORE_CHANGE["ADC"]))
    same, same_inner = couple_lesion(t, 0.0)
    assert same == t and same_inner == t
    with pytest.raises(ValueError, match="lesion_coupling"):
        couple_lesion(t, 1.5)
    with pytest.raises(ValueError, match=r"--lesion_coupling must be a number in \[0, 1\], got 'abc'"):
        check_lesion_coupling("abc", "--lesion_coupling")  # the message make_phantoms.py prints
    assert check_lesion_coupling(1) == 1.0
    with pytest.raises(ValueError, match="lesion_coupling"):
        make_prostate_phantom(seed=0, lesion_coupling=-0.1, **SMALL["prostate"])


def _lesion_table(coupling: float, n_seeds: int = 100) -> np.ndarray:
    """Rows ``(ADC, T2, Ktrans, kep, part)`` of every lesion part (part 0 outer, 1 inner) over ``n_seeds`` scenes."""
    rows = []
    for s in range(n_seeds):
        _, tissues, desc = build_scene(np.random.default_rng([s, 26]), np.zeros(3), 2, coupling)
        for les in desc["lesions"]:
            for part, name in ((0, les["name"]), (1, les["name"] + "_core")):
                if name in tissues:
                    t = tissues[name]
                    rows.append((t.ADC, t.T2, t.pk.ktrans, t.pk.kep, part))
    return np.array(rows)


def test_lesion_adc_follows_ktrans_across_seeds():
    coupled, free = _lesion_table(1.0), _lesion_table(0.0)
    outer = coupled[coupled[:, 4] == 0]
    inner = coupled[coupled[:, 4] == 1]
    assert len(outer) == len(inner) == len(free) == 200
    r = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    # coupled: outer parts on a line (r = -1), inner and outer parts pooled still strongly negative
    assert r(outer[:, 0], outer[:, 2]) == pytest.approx(-1.0, abs=1e-9)
    assert r(outer[:, 0], outer[:, 1]) == pytest.approx(1.0, abs=1e-9)  # lower ADC, darker T2w
    assert r(outer[:, 0], outer[:, 3]) == pytest.approx(-1.0, abs=1e-9)  # lower ADC, earlier uptake
    assert r(coupled[:, 0], coupled[:, 2]) == pytest.approx(-0.958, abs=0.01)  # measured -0.958
    # uncoupled (the old phantom): independent uniform draws
    assert abs(r(free[:, 0], free[:, 2])) < 0.15
    # the inner part of every lesion: lower ADC and T2, higher Ktrans and kep than its outer part
    assert np.all(inner[:, 0] < 0.66 * outer[:, 0]) and np.all(inner[:, 1] < 0.81 * outer[:, 1])
    assert np.all(inner[:, 2] > 1.79 * outer[:, 2]) and np.all(inner[:, 3] > 1.19 * outer[:, 3])


def test_rendered_lesion_inner_part_is_darker_on_adc_and_enhances_more():
    """Measured on the images (default grid, 1.6 mm): the voxels near a lesion's centre (inner part)
    against the rest of the lesion, coupled vs uncoupled on the same seed (same anatomy and noise)."""
    got, pooled = {}, {}
    for c in (0.0, 1.0):
        ph = make_prostate_phantom(seed=[0, 0, 0], n_lesions=2, lesion_coupling=c)
        pts = world_points(ph.affines["dce"], ph.dce.shape[:3]).reshape(*ph.dce.shape[:3], 3)
        pre = ph.dce[..., :2].mean(axis=-1)
        onset = int(np.argmax(ph.times_s > ph.truth["aif"]["bolus_arrival_s"] + 5.0))
        enh = ph.dce[..., onset + 1] / np.maximum(pre, 1.0) - 1.0
        rows, inside = [], ph.lesion_mask > 0
        pooled[c] = float(np.corrcoef(ph.images["adc"][inside], enh[inside])[0, 1])
        for les in ph.truth["lesions"]:
            m = ph.lesion_mask == les["label"]
            d = np.linalg.norm(pts - np.asarray(les["center_mm"]), axis=-1) / min(les["radii_mm"])
            centre, rest = m & (d < 0.35), m & (d > 0.7)
            assert centre.sum() >= 3 and rest.sum() >= 20
            adc = ph.images["adc"]
            rows.append((np.median(adc[centre]), np.median(adc[rest]), enh[centre].mean(), enh[rest].mean()))
            if c == 1.0:
                assert np.median(adc[centre]) == pytest.approx(les["core"]["ADC_1e-6_mm2_s"], rel=0.15)
        got[c] = np.array(rows)
    adc_ratio = {c: v[:, 0] / v[:, 1] for c, v in got.items()}
    enh_ratio = {c: v[:, 2] / v[:, 3] for c, v in got.items()}
    # coupled: the centre is at least 25 % darker on ADC than the rest of the lesion, and enhances at
    # least 1.2 times as much relative to the uncoupled lesion's centre-to-rest ratio (partial volume
    # only: the control). Measured: enhancement ratios 1.40 / 1.49 coupled, 1.10 / 1.10 uncoupled.
    assert np.all(adc_ratio[1.0] < 0.75) and np.all(adc_ratio[1.0] < adc_ratio[0.0] - 0.15)
    assert np.all(enh_ratio[1.0] > 1.2 * enh_ratio[0.0])
    # voxel-wise over both lesions, ADC vs enhancement: -0.93 coupled; -0.73 uncoupled, from partial
    # volume alone (edge voxels mix in the gland: higher ADC, less uptake)
    assert pooled[1.0] < -0.9 and pooled[1.0] < pooled[0.0] - 0.15 and pooled[0.0] > -0.8


def test_lesion_count_and_radius_defaults_are_the_old_draws():
    """The default ``lesion_count_p``/``lesion_radius_mm`` draw exactly what the code before them drew
    (``rng.choice([0, 1, 2], p=[0.2, 0.5, 0.3])`` and a radius uniform in 5-9 mm)."""
    for s in range(40):
        old = np.random.default_rng([s, 7])
        n_old = int(old.choice([0, 1, 2], p=[0.2, 0.5, 0.3]))
        new = np.random.default_rng([s, 7])
        n_new = int(new.choice(len(LESION_COUNT_P), p=np.asarray(LESION_COUNT_P)))
        assert n_new == n_old and old.random() == new.random()
    assert LESION_COUNT_P == (0.2, 0.5, 0.3) and LESION_RADIUS_MM == (5.0, 9.0)
    assert LESION_PRESETS["uncoupled"] == {
        "lesion_coupling": 0.0,
        "lesion_count_p": LESION_COUNT_P,
        "lesion_radius_mm": LESION_RADIUS_MM,
    }


def test_learnable_preset_lesions():
    """``learnable`` (the data set of ``make phantoms`` / ``make demo``): 1-3 lesions (0.25 / 0.5 /
    0.25) of 7-11 mm mean radius, fully coupled; recorded in the manifest's ``lesion_settings``."""
    kw = lesion_preset("learnable")
    assert kw["lesion_coupling"] == 1.0 and kw["lesion_radius_mm"] == (7.0, 11.0)
    counts, radii = [], []
    for s in range(400):
        _, tissues, desc = build_scene(np.random.default_rng([s, 3]), np.zeros(3), None, **kw)
        counts.append(len(desc["lesions"]))
        radii += [np.mean(les["radii_mm"]) for les in desc["lesions"]]
        assert all(f"{les['name']}_core" in tissues for les in desc["lesions"])
    counts = np.bincount(counts, minlength=4)
    assert counts[0] == 0 and counts.sum() == 400
    assert counts[1:] / 400 == pytest.approx([0.25, 0.5, 0.25], abs=0.06)
    # the shape's mean radius: the drawn radius (7-11 mm) times a jitter of 1 +- 0.2 per axis
    assert 5.6 <= min(radii) and max(radii) <= 13.2 and np.mean(radii) == pytest.approx(9.0, abs=0.3)
    assert lesion_settings(**{k.removeprefix("lesion_"): v for k, v in kw.items()}) == {
        "preset": "learnable",
        "lesion_coupling": 1.0,
        "lesion_count_p": [0.0, 0.25, 0.5, 0.25],
        "lesion_radius_mm": [7.0, 11.0],
    }
    assert lesion_settings(0.5, (0.5, 0.5), (3, 4))["preset"] == "custom"
    with pytest.raises(ValueError, match="lesions must be one of"):
        lesion_preset("big")
    with pytest.raises(ValueError, match="lesion_count_p must be probabilities"):
        make_prostate_phantom(seed=0, lesion_count_p=(0.5, 0.6), **SMALL["prostate"])
    with pytest.raises(ValueError, match="lesion_radius_mm must be a range"):
        make_prostate_phantom(seed=0, lesion_radius_mm=(9, 5), **SMALL["prostate"])
