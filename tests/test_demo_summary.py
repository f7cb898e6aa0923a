"""The demo ends with the figures that show whether uptake was learned where it happens."""

from __future__ import annotations

import json

from scripts.demo import print_lesion_first


def test_lesion_figures_come_first(tmp_path, capsys):
    def stats(psnr, err=None, corr=None):
        s = {"psnr": {"mean": psnr}}
        if err is not None:
            s.update(enh_rel_err={"mean": err}, enh_corr={"mean": corr})
        return s

    summary = {
        "resdce/early/whole": stats(26.4, 0.5, 0.8),
        "resdce/early/organ_mask": stats(19.7, 0.6, 0.3),
        "resdce/early/lesion_mask": stats(12.5, 0.9, -0.42),
        "copy_pre/early/lesion_mask": stats(10.0, 1.0, float("nan")),
        "copy_pre/early/organ_mask": stats(9.1, 1.0, float("nan")),
    }
    (tmp_path / "summary.json").write_text(json.dumps({"summary": summary, "wilcoxon": {}}))
    lines = print_lesion_first(tmp_path / "summary.json")
    assert len(lines) == 2 and lines[0].startswith("inside the lesion") and lines[1].startswith("inside the prostate")
    assert "PSNR  12.50 dB (copy_pre  10.00)" in lines[0] and "enhancement correlation -0.42" in lines[0]
    assert "enhancement error 0.90" in lines[0]
    assert "where the contrast uptake is (lesion first)" in capsys.readouterr().out


def test_demo_refuses_phantoms_with_other_lesions(tmp_path):
    """Reused phantoms must have the demo's lesion settings (manifest ``ground_truth.lesion_settings``;
    phantoms of earlier versions have none: ``uncoupled``); cases that are not phantoms pass."""
    import pytest

    from scripts.demo import check_lesion_settings

    prepared = tmp_path / "prostate" / "prepared"
    for sid, m in {
        "a": {"source": "phantom", "ground_truth": {"lesion_settings": {"preset": "learnable"}}},
        "b": {"source": "dicom"},
    }.items():
        (prepared / sid).mkdir(parents=True)
        (prepared / sid / "manifest.json").write_text(json.dumps(m))
    check_lesion_settings(prepared, "learnable")
    (prepared / "c").mkdir()
    (prepared / "c" / "manifest.json").write_text(json.dumps({"source": "phantom", "ground_truth": {}}))
    with pytest.raises(ValueError, match=r"c has 'uncoupled' prostate lesions, the demo expects 'learnable'"):
        check_lesion_settings(prepared, "learnable")
