"""Bad inputs stop with one clear message naming the file or setting (issue: reliability)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from common.data import load_datalist
from common.io import save_nifti
from common.transforms import CheckSameGridd

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("t2w", "adc", "dce_pre", "dce_onset", "dce_early", "dce_late")


def _affine(shift=(0.0, 0.0, 0.0), flip_x=False):
    a = np.array([[1.6, 0.1, 0.0, -120.0], [-0.1, 1.6, 0.2, -80.0], [0.0, -0.2, 3.6, 10.0], [0, 0, 0, 1]])
    if flip_x:
        a[:3, 0] *= -1
    a[:3, 3] += shift
    return a


def _case(root: Path, cid: str = "case-0", adc_affine=None) -> Path:
    rng = np.random.default_rng(0)
    case = root / cid
    for k in KEYS:
        aff = adc_affine if (k == "adc" and adc_affine is not None) else _affine()
        save_nifti(rng.random((16, 16, 4)).astype(np.float32) + 1.0, aff, case / f"{k}.nii.gz")
    return case


@pytest.mark.parametrize(
    "adc_affine, what", [(_affine(shift=(15.0, -10.0, 7.0)), "shifted"), (_affine(flip_x=True), "x axis flipped")]
)
def test_misaligned_input_is_named_before_any_work(tmp_path, adc_affine, what):
    case = _case(tmp_path, adc_affine=adc_affine)
    p = ConfigParser()
    p.read_config(str(ROOT / "bundles" / "resdce" / "configs" / "inference.json"))
    p["case_dir"] = str(case)
    pre = p.get_parsed_content("preprocessing")
    item = p.get_parsed_content("datalist")[0]
    with pytest.raises(Exception) as e:
        pre(item)
    text = "".join(str(x) for x in (e.value, e.value.__cause__))
    assert str(case / "adc.nii.gz") in text and "not on the grid of" in text and "dce_pre.nii.gz" in text, (what, text)
    # the aligned case passes
    good = _case(tmp_path / "good")
    p["case_dir"] = str(good)
    out = pre(p.get_parsed_content("datalist")[0])
    assert tuple(out["image"].shape) == (3, 16, 16, 4)


def test_same_grid_shape_mismatch_and_tolerance():
    ref = MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.as_tensor(_affine()))
    ok = MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.as_tensor(_affine(shift=(0.05, 0, 0))))
    CheckSameGridd(["a", "b"], "a", atol_mm=0.1)({"a": ref, "b": ok})  # 0.05 mm: float rounding of headers
    small = MetaTensor(torch.zeros(1, 8, 7, 4), affine=torch.as_tensor(_affine()))
    with pytest.raises(ValueError, match=r"grid \(8, 7, 4\) differs"):
        CheckSameGridd(["a", "b"], "a")({"a": ref, "b": small})
    # a 0.01 rotation of the direction shows up as ~0.1 mm x extent at the far corner
    rot = _affine()
    rot[:3, :3] = rot[:3, :3] @ np.array([[1, -0.01, 0], [0.01, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="differ by up to"):
        CheckSameGridd(["a", "b"], "a")(
            {"a": ref, "b": MetaTensor(torch.zeros(1, 8, 8, 4), affine=torch.as_tensor(rot))}
        )


def _datalist(tmp_path: Path, content: str) -> Path:
    (tmp_path / "datalist.json").write_text(content)
    return tmp_path


def test_datalist_errors_name_the_file(tmp_path):
    _case(tmp_path)
    path = tmp_path / "datalist.json"
    entry = {"id": "case-0", **{k: f"case-0/{k}.nii.gz" for k in KEYS}}
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON \(line 1"):
        load_datalist(_datalist(tmp_path, '{"training": [,]}'))
    with pytest.raises(ValueError, match=rf"{path}: expected an object of sections .* got a list"):
        load_datalist(_datalist(tmp_path, json.dumps([entry])))
    with pytest.raises(ValueError, match=rf"{path}: section 'test' is empty"):
        load_datalist(_datalist(tmp_path, json.dumps({"training": [entry], "test": []})), "test")
    with pytest.raises(ValueError, match=r"lists the case id\(s\) \['case-0'\] more than once"):
        load_datalist(_datalist(tmp_path, json.dumps({"training": [entry, entry]})))
    assert [e["id"] for e in load_datalist(_datalist(tmp_path, json.dumps({"training": [entry]})))] == ["case-0"]
