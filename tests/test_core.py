"""Shared basics: DCE phase selection, atomic geometry-preserving I/O, prepared-case layout."""

from __future__ import annotations

import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from common.dce import detect_arrival, enhancing_mask, mean_curve, select_phases
from common.io import atomic_path, load_nifti, save_json, save_nifti
from common.layout import split_ids, write_datalist

TIMES = np.arange(0, 300, 15.0)  # 20 points, like the phantom default


def step_curve(arrival_index=3, base=100.0, rise=50.0):
    c = np.full(len(TIMES), base)
    c[arrival_index:] += rise * (1 - np.exp(-(TIMES[arrival_index:] - TIMES[arrival_index] + 15) / 30))
    return c


def test_detect_arrival_and_default_phases():
    curve = step_curve(arrival_index=3)
    a = detect_arrival(TIMES, curve)
    assert a.index == 3 and a.time_s == 45.0 and a.baseline == 100.0
    ph = select_phases(TIMES, curve)
    # pre = the point before arrival, onset = arrival, early = arrival + 60 s, late = last
    assert ph == {"pre": 2, "onset": 3, "early": 7, "late": 19}
    ph = select_phases(
        TIMES,
        curve,
        spec={"early": {"time_s": 122}, "late": {"index": -2}, "mid": {"fraction": 0.5}},
        names=("pre", "early", "late", "mid"),
    )
    assert ph == {"pre": 2, "early": 8, "late": 18, "mid": 10}


def test_arrival_errors_name_the_problem():
    with pytest.raises(ValueError, match="no contrast arrival"):
        detect_arrival(TIMES, np.full(len(TIMES), 5.0))
    with pytest.raises(ValueError, match="increase"):
        detect_arrival(TIMES[::-1], step_curve())
    with pytest.raises(ValueError, match="index 40"):
        select_phases(TIMES, step_curve(), spec={"late": {"index": 40}}, names=("late",))
    with pytest.raises(ValueError, match="no default rule"):
        select_phases(TIMES, step_curve(), names=("mid",))


def test_mean_curve_default_mask_follows_enhancing_tissue():
    # a body of 1000 non-enhancing voxels and 50 strongly enhancing ones arriving at index 5
    dce = np.zeros((20, 20, 3, len(TIMES)))
    dce[2:18, 2:18] = 100.0
    enh = step_curve(arrival_index=5, base=100.0, rise=200.0)
    dce[5:10, 5:15, 0] = enh
    m = enhancing_mask(dce)
    assert m[5:10, 5:15, 0].all() and m.sum() < 0.15 * (dce[..., 0] > 10).sum()
    assert detect_arrival(TIMES, mean_curve(dce)).index == 5
    assert np.allclose(mean_curve(dce, dce[..., 0] > 10)[:5], 100.0)


def test_atomic_write_leaves_nothing_on_error_and_normal_permissions(tmp_path):
    target = tmp_path / "out" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and os.listdir(tmp_path / "out") == []
    save_json({"a": np.float32(1.5), "b": np.arange(2)}, target)
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1]}
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH


def test_save_nifti_keeps_oblique_affine_and_protects_inputs(tmp_path):
    th = np.deg2rad(12.0)  # oblique: rotated about x and z, anisotropic spacing
    rx = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    rz = np.array([[np.cos(th / 2), -np.sin(th / 2), 0], [np.sin(th / 2), np.cos(th / 2), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([1.6, 1.6, 3.6])
    aff[:3, 3] = [-80.0, -90.5, 12.25]
    p = save_nifti(np.random.rand(5, 4, 3), aff, tmp_path / "a.nii.gz")
    img = nib.load(p)
    assert np.allclose(img.affine, aff, atol=1e-5)
    assert np.allclose(img.get_qform(), aff, atol=1e-4) and int(img.header["sform_code"]) == 1
    arr, aff2 = load_nifti(p)
    assert arr.shape == (5, 4, 3) and np.allclose(aff2, aff, atol=1e-5)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_nifti(arr, aff, p, protect=(p,))
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_nifti(tmp_path / "missing.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        load_nifti(tmp_path / "bad.nii.gz")


def test_split_is_deterministic_and_complete(tmp_path):
    ids = [f"p{i:02d}" for i in range(20)]
    s1, s2 = split_ids(ids, seed=3), split_ids(list(reversed(ids)), seed=3)
    assert s1 == s2
    assert [len(s1[k]) for k in ("training", "validation", "test")] == [16, 2, 2]
    assert sorted(sum(s1.values(), [])) == ids
    assert split_ids(ids, seed=4) != s1
    small = split_ids(["a", "b", "c"])
    assert all(len(v) == 1 for v in small.values())
    with pytest.raises(ValueError):
        split_ids(ids, (0.5, 0.5, 0.5))
    for cid in ids[:5]:
        save_nifti(np.ones((2, 2, 2)), np.eye(4), tmp_path / cid / "t2w.nii.gz")
        save_json({}, tmp_path / cid / "manifest.json")
    dl = json.loads(write_datalist(tmp_path).read_text())
    assert sum(len(dl[k]) for k in ("training", "validation", "test")) == 5
    assert dl["training"][0]["t2w"].endswith("/t2w.nii.gz") and not dl["training"][0]["t2w"].startswith("/")
