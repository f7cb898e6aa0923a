"""The prostate bundles are comparable on one prepared case: the same phases (chosen once, by the
ingest's named phase rule) and the same intensity scale (the DCE's own pre-contrast frame)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.dce import PHASE_RULES, phase_rule, select_phases

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from common.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("comparable")
    write_phantoms(out, kinds=("prostate",), n_prostate=3, dicom=False, small=True, progress=False)
    return out / "prostate" / "prepared"


def _case(bundle: str, case_dir: Path, **overrides) -> dict:
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    p["case_dir"] = str(case_dir)
    for k, v in overrides.items():
        p[k] = v
    item = p.get_parsed_content("datalist")[0]
    return {"out": p.get_parsed_content("preprocessing")(item), "parser": p}


def test_both_prostate_bundles_score_against_identical_arrays(prepared):
    case_dir = next(p.parent for p in sorted(prepared.glob("*/manifest.json")))
    r = _case("resdce", case_dir)
    d = _case("dcediff", case_dir)
    rk, dk = r["parser"]["target_keys"], d["parser"]["target_keys"]
    assert d["parser"].get_parsed_content("target_scale_reference") == "dce_pre"
    assert r["parser"].get_parsed_content("target_scale_reference") == "dce_pre"
    # same targets, same network-space scale: channel for channel equal
    for k in dk:
        a = r["out"]["label"][rk.index(k)]
        b = d["out"]["label"][dk.index(k)]
        assert torch.equal(a.as_tensor(), b.as_tensor()), k
        raw = nib.load(case_dir / f"{k}.nii.gz").get_fdata(dtype=np.float32)
        # and they are the prepared files, scaled by the DCE pre-contrast frame's percentiles
        rec = d["out"]["dce_pre_scaling"]
        lo, hi = float(rec["a_min"]), float(rec["a_max"])
        np.testing.assert_allclose(b.numpy(), (raw - lo) / (hi - lo) * 2 - 1, rtol=0, atol=2e-5)
    pre = nib.load(case_dir / "dce_pre.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_allclose(np.percentile(pre, [0.5, 99.5]), [float(rec["a_min"]), float(rec["a_max"])], rtol=1e-5)
    # the copy-the-pre-contrast baseline of dcediff is the DCE pre-contrast frame itself, in its units
    base = d["out"]["baseline_copy_pre"]
    assert base.shape[0] == len(dk)
    for c in range(len(dk)):
        np.testing.assert_array_equal(base[c].numpy(), pre)
    # t1_pre stays a conditioning input of dcediff (channel 3), not its scale
    assert d["parser"]["input_keys"] == ["t2w", "pd", "adc", "t1_pre"]


def test_named_phase_rules_one_definition(prepared, tmp_path):
    """The ingest and a bundle that selects phases from the 4D series apply the same named rule."""
    assert phase_rule("arrival") == {}
    assert phase_rule("dcediff_paper") == {"early": {"fraction": 0.5}, "late": {"index": -1}}
    assert phase_rule("dcediff_paper", {"late": {"index": -2}})["late"] == {"index": -2}
    assert PHASE_RULES["dcediff_paper"] == {"early": {"fraction": 0.5}, "late": {"index": -1}}  # unchanged by the call
    with pytest.raises(ValueError, match=r"--phase_rule 'middle': unknown; choose from \['arrival', 'dcediff_paper'\]"):
        phase_rule("middle")
    times = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100], float)
    curve = np.array([1, 1, 1, 1, 5, 9, 10, 10, 10, 10, 10], float)
    assert select_phases(times, curve, phase_rule("dcediff_paper"), ("early", "late")) == {"early": 5, "late": 10}
    assert select_phases(times, curve, phase_rule("arrival"), ("pre", "onset", "early", "late")) == {
        "pre": 3,
        "onset": 4,
        "early": 10,
        "late": 10,
    }
    # dcediff reading the 4D series with the paper's rule picks the frames the rule names
    case_dir = next(p.parent for p in sorted(prepared.glob("*/manifest.json")))
    n = nib.load(case_dir / "dce.nii.gz").shape[-1]
    d = _case("dcediff", case_dir, phase_source="dce", phase_rule="dcediff_paper")
    dce = nib.load(case_dir / "dce.nii.gz").get_fdata(dtype=np.float32)
    rec = d["out"]["dce_pre_scaling"]
    lo, hi = float(rec["a_min"]), float(rec["a_max"])
    for c, idx in enumerate((round(0.5 * (n - 1)), n - 1)):
        np.testing.assert_allclose(d["out"]["label"][c].numpy(), (dce[..., idx] - lo) / (hi - lo) * 2 - 1, atol=2e-5)
