"""The papers' evaluation protocols and pre-processing (issue 26, items 1-3), with hand-computed numbers:
per-slice scoring, Kruskal-Wallis / Dunn / ANOVA-Tukey, iterU-Net's TI-norm lesion metrics, D3M's
percentile clipping and Res-SRDiff's beta_T = 0.9999 schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import helpers as h
import numpy as np
import pytest
import torch
from scipy.stats import chi2, f_oneway, kruskal, tukey_hsd

from common.handlers.metrics import report, score_case, scored_slices
from common.metrics.kinetic import tinorm_enhancement_error, tinorm_stats
from common.metrics.protocols import PAPER_PROTOCOLS, resolve_protocol
from common.metrics.stats import dunn_test, group_comparison, kruskal_wallis

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- protocol table and per-slice scoring


def test_protocol_table_and_resolution():
    assert resolve_protocol()["scoring"] == "volume" and resolve_protocol()["statistics"] == "wilcoxon"
    for bundle in ("resdce", "dcediff", "ressrdiff"):
        assert resolve_protocol("paper", bundle)["scoring"] == "slice"
    assert resolve_protocol("paper", "ressrdiff")["statistics"] == "kruskal_dunn"
    assert resolve_protocol("paper", "iterunet")["scoring"] == "volume"
    assert set(PAPER_PROTOCOLS) == {"resdce", "dcediff", "ressrdiff", "d3m", "iterunet"}
    assert resolve_protocol("paper", "ressrdiff", statistics="wilcoxon")["statistics"] == "wilcoxon"
    with pytest.raises(ValueError, match="--protocol paper needs the bundle"):
        resolve_protocol("paper")
    with pytest.raises(ValueError, match="--scoring"):
        resolve_protocol(scoring="patch")


def _volume():
    """Target (1, 16, 16, 4): slice 0 air (all 0), slices 1-3 body at 100 with a 200 square; the
    prediction adds 10, 20, 40 to slices 1, 2, 3 (and 5 to the air slice, never scored)."""
    t = np.zeros((1, 16, 16, 4))
    t[0, :, :, 1:] = 100.0
    t[0, 4:8, 4:8, 1:] = 200.0
    p = t.copy()
    for z, d in enumerate((5.0, 10.0, 20.0, 40.0)):
        p[0, :, :, z] += d
    return p, t


def test_per_slice_scoring_equals_hand_computed_slice_means(tmp_path):
    p, t = _volume()
    lo, hi = np.percentile(t[0], (0.5, 99.5))  # the per-case map: 0.5th -> 0, 99.5th -> 1
    scale = hi - lo
    assert scored_slices((t - lo) / scale) == [1, 2, 3]  # the air slice is left out
    rows = score_case(p, t, {}, ["late"], scoring="slice", metrics=("psnr", "mae"))
    assert [r["slice"] for r in rows] == [1, 2, 3]
    offsets = {1: 10.0, 2: 20.0, 3: 40.0}
    for r in rows:
        e = offsets[r["slice"]] / scale  # every voxel of the slice is off by the same amount
        assert r["mae"] == pytest.approx(e, rel=1e-12)
        assert r["psnr"] == pytest.approx(-20 * math.log10(e), rel=1e-12)
    # a lesion on slice 3 only: scored on that slice alone
    lesion = np.zeros(t.shape[1:], bool)
    lesion[4:8, 4:8, 3] = True
    rows = score_case(p, t, {"lesion": lesion}, ["late"], scoring="slice", metrics=("mae",))
    assert [(r["region"], r["slice"]) for r in rows if r["region"] == "lesion"] == [("lesion", 3)]
    # an organ mask on slices 2-3 picks the slices
    organ = np.zeros(t.shape[1:], bool)
    organ[2:10, 2:10, 2:] = True
    assert [r["slice"] for r in score_case(p, t, {}, ["late"], scoring="slice", slice_mask=organ)] == [2, 3]

    # the report: mean +- std over all slices of all cases, pairs of (case, slice)
    rows = []
    for cid, k in (("a", 1.0), ("b", 2.0)):
        for name, pred in (("model", t + (p - t) * k), ("copy", t + 3 * (p - t) * k)):
            rows += [
                {"case": cid, "method": name, **r}
                for r in score_case(pred, t, {}, ["late"], scoring="slice", metrics=("mae",))
            ]
    out = report(rows, tmp_path, "model", ["copy"], resolve_protocol("paper", "ressrdiff"))
    hand = [k * d / scale for k in (1.0, 2.0) for d in (10.0, 20.0, 40.0)]  # six slice MAEs of the model
    s = out["summary"]["model/late/whole"]["mae"]
    assert s["n"] == 6 and s["mean"] == pytest.approx(np.mean(hand)) and s["std"] == pytest.approx(np.std(hand, ddof=1))
    assert out["wilcoxon"]["model vs copy/late/whole"]["mae"]["n"] == 6
    g = out["group_tests"]["late/whole"]["mae"]
    assert g["test"] in ("kruskal_dunn", "anova_tukey") and "model vs copy" in g["pairs"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["protocol"]["scoring"] == "slice" and "group_tests" in saved
    assert "Group tests" in (tmp_path / "summary.md").read_text()


def test_synthesis_metrics_handler_takes_the_papers_protocol(tmp_path):
    from types import SimpleNamespace

    from common.handlers.metrics import SynthesisMetrics

    p, t = _volume()
    organ = np.zeros((1, *t.shape[1:]))
    organ[0, 2:10, 2:10, 2:] = 1.0  # slices 2 and 3
    item = {"id": "c1", "organ_mask": organ}
    out = {"label": t, "pred": p, "baseline_copy": t + 2 * (p - t)}
    handler = SynthesisMetrics(
        tmp_path, ["late"], baselines=["copy"], mask_keys=(), protocol="paper", bundle="ressrdiff",
        metrics=("mae",), slice_mask_key="organ_mask",
    )  # fmt: skip
    engine = SimpleNamespace(state=SimpleNamespace(batch=[item], output=[out]))
    handler.on_iteration(engine)
    handler.on_completed(engine)
    assert sorted({r["slice"] for r in handler.rows}) == [2, 3]
    lo, hi = np.percentile(t[0], (0.5, 99.5))
    s = handler.summary["summary"]["model/late/whole"]["mae"]
    assert s["n"] == 2 and s["mean"] == pytest.approx((20 + 40) / 2 / (hi - lo))
    assert handler.summary["protocol"]["statistics"] == "kruskal_dunn" and "group_tests" in handler.summary
    with pytest.raises(ValueError, match="--protocol paper needs the bundle"):
        SynthesisMetrics(tmp_path, ["late"], protocol="paper")


# ---------------------------------------------------------------- statistics

A, B, C = [1.0, 2.0, 2.0, 3.0], [2.0, 4.0, 5.0, 5.0], [6.0, 7.0, 7.0, 8.0]


def test_kruskal_wallis_equals_scipy_and_the_hand_formula():
    res = kruskal_wallis({"a": A, "b": B, "c": C})
    ref = kruskal(A, B, C)
    assert res["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert res["pvalue"] == pytest.approx(ref.pvalue, rel=1e-12)
    # by hand: pooled ranks a 1,3,3,5 (sum 12); b 3,6,7.5,7.5 (24); c 9,10.5,10.5,12 (42); N = 12;
    # ties of 3 (the 2s), 2 (the 5s), 2 (the 7s): sum(t^3 - t) = 24 + 6 + 6 = 36
    h0 = 12 / (12 * 13) * (12**2 / 4 + 24**2 / 4 + 42**2 / 4) - 3 * 13
    hand = h0 / (1 - 36 / (12**3 - 12))
    assert res["statistic"] == pytest.approx(hand, rel=1e-12)
    assert res["pvalue"] == pytest.approx(chi2.sf(hand, 2), rel=1e-12) and res["df"] == 2


def test_dunn_z_and_bonferroni_p_equal_the_hand_computation():
    res = dunn_test({"a": A, "b": B, "c": C})
    # mean ranks 3, 6, 10.5; tie-corrected variance N(N+1)/12 - sum(t^3 - t) / (12 (N - 1)) = 13 - 36/132
    var = 13 - 36 / 132
    se = math.sqrt(var * (1 / 4 + 1 / 4))
    for pair, diff in (("a vs b", 3 - 6), ("a vs c", 3 - 10.5), ("b vs c", 6 - 10.5)):
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2))  # two-sided normal p
        assert res[pair]["z"] == pytest.approx(z, rel=1e-12)
        assert res[pair]["pvalue"] == pytest.approx(p, rel=1e-12)
        assert res[pair]["pvalue_adj"] == pytest.approx(min(1.0, 3 * p), rel=1e-12)  # 3 comparisons
    assert res["a vs c"]["z"] == pytest.approx(-2.9730944, rel=1e-6)
    assert res["a vs b"]["mean_rank_a"] == 3.0 and res["b vs c"]["mean_rank_b"] == 10.5


def test_group_comparison_picks_anova_tukey_for_normal_groups_else_kruskal_dunn():
    rng = np.random.default_rng(0)
    normal = {k: rng.normal(m, 1.0, 30) for k, m in (("x", 0.0), ("y", 0.5), ("z", 2.0))}
    g = group_comparison(normal)
    assert g["normal"] and g["test"] == "anova_tukey"
    assert g["omnibus"]["statistic"] == pytest.approx(f_oneway(*normal.values()).statistic, rel=1e-12)
    assert g["pairs"]["x vs z"]["pvalue_adj"] == pytest.approx(tukey_hsd(*normal.values()).pvalue[0, 2], rel=1e-9)
    skewed = {k: rng.exponential(1.0, 30) ** 3 + m for k, m in (("x", 0.0), ("y", 1.0))}
    g = group_comparison(skewed)
    assert not g["normal"] and g["test"] == "kruskal_dunn"
    assert g["omnibus"]["pvalue"] == pytest.approx(kruskal(*skewed.values()).pvalue, rel=1e-12)
    assert g["pairs"]["x vs y"]["pvalue_adj"] == pytest.approx(g["pairs"]["x vs y"]["pvalue"])  # one pair: m = 1


# ---------------------------------------------------------------- iterU-Net in TI-norm units


def _iterunet_case(with_stats: bool):
    """Series (pre, t1) 12x12x2; t1 is 0 on the left half, 4 on the right (TI-norm mean 2, std 2); the
    lesion (right half, slice 0) is 1 before contrast and 4 at t1; predicted / real lesion means at the
    two later phases are 11 / 15 and 9 / 10."""
    sp = (12, 12, 2)
    series = np.zeros((2, *sp))
    series[0] = 1.0
    series[1, 6:] = 4.0
    lesion = np.zeros(sp, np.int64)
    lesion[6:, :, 0] = 1
    pred, label = np.zeros((2, *sp)), np.zeros((2, *sp))
    pred[0], label[0], pred[1], label[1] = 11.0, 15.0, 9.0, 10.0
    item = {"id": "case1", "dce_times_s": np.array([0.0, 85.0, 155.0, 225.0]), "lesion_mask": lesion[None]}
    if with_stats:
        item["dce_tinorm"] = {"mean": torch.tensor([2.0], dtype=torch.float64), "std": torch.tensor([2.0])}
    out = {"image": series, "pred": pred, "label": label}
    return item, out, series, pred, label, lesion


def test_tinorm_enhancement_error_of_a_hand_made_curve():
    _, _, series, pred, label, lesion = _iterunet_case(True)
    assert tinorm_stats(series) == (2.0, 2.0)
    # ((11 - 2)/2 - (15 - 2)/2)^2 = (4.5 - 6.5)^2 = 4; raw (11 - 15)^2 = 16
    assert tinorm_enhancement_error(pred[0], label[0], lesion, 2.0, 2.0) == pytest.approx(4.0, abs=1e-12)
    assert tinorm_enhancement_error(pred[1], label[1], lesion, 2.0, 2.0) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("with_stats", [True, False])
def test_iterunet_lesion_metrics_in_tinorm_units(tmp_path, with_stats):
    from common.handlers.iterunet import IterUNetMetrics

    item, out, *_ = _iterunet_case(with_stats)
    m = IterUNetMetrics(tmp_path, start=1, breast_key=None)
    m.score(item, out)
    (row,) = [r for r in m.kinetic_rows if r["method"] == "iterunet"]
    assert row["enh_err_t155s"] == pytest.approx(4.0) and row["enh_err_t225s"] == pytest.approx(0.25)
    assert row["enh_err"] == pytest.approx((4.0 + 0.25) / 2) and row["enh_err_raw"] == pytest.approx((16 + 1) / 2)
    # curves model 1, 4, 11, 9 and real 1, 4, 15, 10: DTW 4 + 1 = 5 raw, 2.5 in TI-norm units (std 2)
    assert row["dtw_raw"] == pytest.approx(5.0) and row["dtw"] == pytest.approx(2.5)
    assert row["scc"] == pytest.approx(1.0)


# ---------------------------------------------------------------- pre-processing as the papers state it


def test_d3m_preprocessing_clips_to_the_percentiles():
    from common.transforms import ScalePercentilesd

    configs = ROOT / "bundles" / "d3m" / "configs"
    for names in (("train.json",), ("train.json", "inference.json")):
        p = h.parser(configs, *names)
        assert p["percentiles"] == [0.5, 99.5]
        (scale,) = [t for t in p.get_parsed_content("preprocessing").transforms if isinstance(t, ScalePercentilesd)]
        x = np.linspace(0.0, 1.0, 1000).reshape(1, 10, 10, 10)
        x[0, 0, 0, 0], x[0, -1, -1, -1] = -50.0, 50.0  # outliers below and above the percentiles
        d = scale({k: torch.as_tensor(x, dtype=torch.float32) for k in p["input_keys"]})
        lo, hi = np.percentile(x, (0.5, 99.5))
        for k in p["input_keys"]:
            y = np.asarray(d[k])
            assert y.min() == 0.0 and y.max() == 1.0
            assert y[0, 0, 0, 0] == 0.0 and y[0, -1, -1, -1] == 1.0  # clipped, not -25 / 25
            inside = (x > lo) & (x < hi)
            assert np.allclose(y[inside], (x[inside] - lo) / (hi - lo), atol=1e-6)  # inside: the linear map


def test_ressrdiff_schedule_ends_at_the_papers_beta_T_and_keeps_resshift_as_a_preset(tmp_path):
    from common.bundle import check_checkpoint

    configs = ROOT / "bundles" / "ressrdiff" / "configs"
    for names in (("train.json",), ("train.json", "inference.json")):
        p = h.parser(configs, *names, network_size="small")
        assert p["schedule_preset"] == "paper"
        s = p.get_parsed_content("scheduler")
        assert float(s.sqrt_etas[-1]) == pytest.approx(math.sqrt(0.9999), rel=1e-15)
        assert float(s.etas[-1]) == pytest.approx(0.9999, rel=1e-12)
        s = h.parser(configs, *names, network_size="small", schedule_preset="resshift").get_parsed_content("scheduler")
        assert float(s.sqrt_etas[-1]) == pytest.approx(0.99, rel=1e-15)
    from common.errors import user_message

    with pytest.raises(Exception) as err:  # MONAI wraps it; the user sees the innermost line
        h.parser(configs, "train.json", "inference.json", schedule_preset="ddpm").get_parsed_content("sqrt_eta_end")
    assert "--schedule_preset: expected one of ['paper', 'resshift'], got 'ddpm'" in user_message(err.value)

    # weights trained before (recorded sqrt_eta_end 0.99) are refused by default, naming the override,
    # and accepted with it or with the resshift preset
    record = h.parser(configs, "train.json", "inference.json", network_size="small").get_parsed_content(
        "checkpoint_record"
    )
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "config": {**record.state_dict(), "sqrt_eta_end": 0.99}}, old)
    with pytest.raises(ValueError, match=r"sqrt_eta_end: the checkpoint has 0\.99.*--sqrt_eta_end 0\.99"):
        check_checkpoint(old, record)
    for override in ({"schedule_preset": "resshift"}, {"sqrt_eta_end": 0.99}):
        rec = h.parser(configs, "train.json", "inference.json", network_size="small", **override).get_parsed_content(
            "checkpoint_record"
        )
        assert check_checkpoint(old, rec) == str(old)
    new = tmp_path / "new.pt"
    torch.save({"model": {}, "config": record.state_dict()}, new)
    assert check_checkpoint(new, record) == str(new)


@pytest.mark.parametrize("bundle", ["resdce", "dcediff", "ressrdiff"])
def test_evaluate_config_selects_the_papers_protocol(bundle):
    """``--protocol paper`` on the evaluation stack gives the handler the paper's scoring and statistics
    (:data:`PAPER_PROTOCOLS`); the default stays ours."""
    from common.bundle import bundle_config, workflow_files
    from common.handlers import SynthesisMetrics

    files = workflow_files(ROOT / "bundles" / bundle, "evaluate")
    for protocol, expected in (("ours", resolve_protocol("ours", bundle)), ("paper", PAPER_PROTOCOLS[bundle])):
        p = bundle_config(files, {"protocol": protocol, "device": "cpu", "network_size": "small"})
        (handler,) = [x for x in p.get_parsed_content("handlers") if isinstance(x, SynthesisMetrics)]
        assert handler.protocol == resolve_protocol(protocol, bundle)
        assert handler.protocol["scoring"] == expected["scoring"]
