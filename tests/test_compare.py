"""scripts/compare.py: two prostate bundles trained with one budget, scored on the same targets, one table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import helpers as h
import pytest

ROOT = Path(__file__).resolve().parents[1]

from common.metrics import read_case_csv  # noqa: E402
from scripts import compare as C  # noqa: E402

PHASES = ["dce_early", "dce_late"]  # compared: dcediff's two paper phases, also synthesised by resdce
# the smallest run of each bundle: 2 one-iteration epochs of 2 slices cropped to 32 x 32, 2 sampling steps
BUDGET = {
    "num_iterations": 2,
    "epoch_length": 1,
    "batch_size": 2,
    "patch_size": [32, 32],
    "seed": 0,
    "lr": 0.0005,
    "network_size": "small",
    "num_workers": 0,
    "val_interval": 0,
    "methods": {
        "resdce": {"num_inference_steps": 2},
        "dcediff": {"sampler": "ddim", "num_inference_steps": 2, "warmup_steps": 1},  # its own target_keys
    },
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 tiny phantom subjects: one to train on, two held out (so n = 2 and a paired test)."""
    return h.tiny_prostate_one_train(tmp_path_factory.mktemp("compare_phantoms"))


def _budget(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(spec))
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare_out")
    res = C.main(dataset_dir=str(data), methods="resdce,dcediff", out=str(out), budget=_budget(out, BUDGET))
    return {"out": out, "res": res}


def test_one_table_for_both_methods_on_the_same_targets(compared, data):
    out, res = compared["out"], compared["res"]
    test_ids = [e["id"] for e in h.held_out(data)]
    assert res["cases"] == sorted(test_ids)
    table = json.loads((out / "comparison.json").read_text())["table"]
    assert table == json.loads(json.dumps(res["table"]))  # the file holds what the run computed (nan as NaN)
    csv_rows = h.read_csv(out / "comparison.csv")
    assert len(csv_rows) == len(table)
    # a row per method and per baseline (once) for every phase x region each bundle scored
    scored = read_case_csv(out / "resdce" / "eval" / "metrics.csv")
    regions = {r["region"] for r in scored}
    assert regions >= {"whole", "organ_mask", "lesion_mask"}
    assert [p for p in dict.fromkeys(r["phase"] for r in table)] == PHASES  # resdce's onset is left out, with a note
    assert "resdce also synthesised dce_onset, not compared (not synthesised by every method)" in res["notes"]
    for phase in PHASES:
        for region in regions:
            rows = [r for r in table if r["phase"] == phase and r["region"] == region]
            assert sorted(r["method"] for r in rows) == ["copy_pre", "dcediff", "paired_input", "resdce"]
            assert all(r["n"] == len(test_ids) and r["psnr_n"] == len(test_ids) for r in rows)
            best = [r for r in rows if r["best"]]
            assert len(best) == 1 and best[0]["method"] in ("resdce", "dcediff")
            for r in rows:  # a Wilcoxon p of every row against the best method (nan for the best itself)
                assert "p_psnr" in r and r["vs"] == best[0]["method"]
                assert r["best"] or 0 < r["p_psnr"] <= 1
    # the baselines are the same arrays whichever bundle scored them: identical rows, shown once (from resdce)
    base = {m: read_case_csv(out / m / "eval" / "metrics.csv") for m in ("resdce", "dcediff")}
    rd, dd = ([r for r in base[m] if r["method"] == "copy_pre"] for m in ("resdce", "dcediff"))
    key = lambda r: (r["case"], r["phase"], r["region"])  # noqa: E731
    rd = [r for r in rd if r["phase"] in PHASES]  # the phases both scored
    assert len(rd) == len(dd) == len(test_ids) * len(PHASES) * len(regions)
    for a, b in zip(sorted(rd, key=key), sorted(dd, key=key)):
        assert key(a) == key(b)
        for m in ("psnr", "ssim", "mae", "enh_rel_err"):
            assert a[m] == pytest.approx(b[m], rel=1e-6)
    assert any("baseline copy_pre: identical scores from resdce and dcediff" in n for n in res["notes"])
    assert {r["kind"] for r in table if r["method"] in ("copy_pre", "paired_input")} == {"baseline (from resdce)"}
    # sampler, steps, iterations and the measured time per volume: the values used
    info = res["methods"]
    assert (info["resdce"]["sampler"], info["resdce"]["steps"]) == ("ResidualShift", 2)
    assert (info["dcediff"]["sampler"], info["dcediff"]["steps"]) == ("DDIM", 2)
    for m in ("resdce", "dcediff"):
        assert info[m]["train_iterations"] == 2 and info[m]["n_test_cases"] == len(test_ids)
        assert info[m]["s_per_volume"] == pytest.approx(info[m]["inference_s"] / len(test_ids))
        assert info[m]["s_per_volume"] > 0
        rows = [r for r in table if r["method"] == m]
        assert all(r["sampler"] == info[m]["sampler"] and r["steps"] == 2 and r["train_iterations"] == 2 for r in rows)
        assert all(r["s_per_volume"] == info[m]["s_per_volume"] for r in rows)
        assert (out / m / "models" / "model.pt").is_file()
    md = (out / "comparison.md").read_text()
    assert "| p psnr vs best | p ssim vs best |" in md
    assert "| sampler, steps | train it | s / volume |" in md
    assert "DDIM, 2" in md and "ResidualShift, 2" in md
    assert "with 2 paired case(s) the smallest two-sided p the exact test can give is 0.5" in md
    assert f"{info['dcediff']['s_per_volume']:.1f}" in md
    # one panel per test case next to the table
    for cid in test_ids:
        assert (out / f"{cid}.png").stat().st_size > 0


def test_given_checkpoints_are_not_retrained(compared, data, tmp_path):
    weights = compared["out"] / "dcediff" / "models" / "model.pt"
    res = C.main(
        dataset_dir=str(data),
        methods="dcediff",
        out=str(tmp_path),
        budget=_budget(tmp_path, BUDGET),
        ckpt=f"dcediff={weights}",
    )
    assert not (tmp_path / "dcediff" / "models").exists()
    info = res["methods"]["dcediff"]
    assert info["train_iterations"] == 2 and info["train_s"] is None and info["ckpt"] == str(weights)
    assert "given weights" in (tmp_path / "comparison.md").read_text()
    # the same weights, the same test cases, the same sampler and seed: the same scores
    key = lambda r: (r["phase"], r["region"], r["method"])  # noqa: E731
    before = {key(r): r["psnr_mean"] for r in compared["res"]["table"] if r["method"] in ("dcediff", "copy_pre")}
    assert {key(r): r["psnr_mean"] for r in res["table"]} == pytest.approx(before)


def test_methods_with_other_phase_sets_are_compared_on_the_shared_ones(data, tmp_path):
    """dcediff's two paper phases against resdce's three: compared on early and late (a phase's scores do
    not depend on the other phases, common.handlers.metrics.channel_ranges); no shared phase: refused."""
    assert C.check_configured_targets(
        {"resdce": ["dce_onset", "dce_early", "dce_late"], "dcediff": ["dce_early", "dce_late"]}
    ) == ["dce_early", "dce_late"]
    rows = {
        "resdce": _rows("resdce", {"psnr": [1.0, 2.0, 3.0]}, phase="onset")
        + _rows("resdce", {"psnr": [4.0, 5.0, 6.0]}, phase="late"),
        "dcediff": _rows("dcediff", {"psnr": [7.0, 8.0, 9.0]}, phase="late"),
    }
    kept, notes = C.restrict_to_shared_phases(rows)
    assert {m: sorted({r["phase"] for r in rs}) for m, rs in kept.items()} == {"resdce": ["late"], "dcediff": ["late"]}
    assert [r["psnr"] for r in kept["resdce"]] == [4.0, 5.0, 6.0]
    assert notes == ["resdce also synthesised onset, not compared (not synthesised by every method)"]
    spec = json.loads(json.dumps(BUDGET))
    spec["methods"]["dcediff"]["target_keys"] = ["dce_pre"]
    spec["methods"]["resdce"] = {"target_keys": ["dce_early", "dce_late"]}
    with pytest.raises(
        C.CompareError, match=r"no common phase \(target_keys: resdce: dce_early, dce_late; dcediff: dce_pre"
    ):
        C.main(dataset_dir=str(data), out=str(tmp_path / "o"), budget=_budget(tmp_path, spec))
    assert not (tmp_path / "o").exists()  # refused before any training


def test_budget_settings_are_checked(data, tmp_path):
    spec = dict(BUDGET, methods={"dcediff": {"no_such_setting": 1}})
    with pytest.raises(C.CompareError, match=r"budget.json: methods.dcediff.no_such_setting is a setting of neither"):
        C.main(dataset_dir=str(data), out=str(tmp_path / "o"), budget=_budget(tmp_path, spec))
    with pytest.raises(C.CompareError, match=r"--ckpt dcediff=.*: no such file"):
        C.main(
            dataset_dir=str(data),
            methods="resdce,dcediff",
            out=str(tmp_path / "o"),
            ckpt=f"dcediff={tmp_path / 'none.pt'}",
        )


def _rows(method: str, values: dict, cases=("a", "b", "c"), phase="dce_early", region="whole") -> list[dict]:
    return [
        {"case": c, "method": method, "phase": phase, "region": region, **{k: v[i] for k, v in values.items()}}
        for i, c in enumerate(cases)
    ]


def test_check_same_targets_names_what_differs():
    good = _rows("m1", {"psnr": [10.0, 11.0, 12.0]}) + _rows("copy_pre", {"psnr": [5.0, 6.0, 7.0]})
    other = _rows("m2", {"psnr": [9.0, 9.0, 9.0]}) + _rows("copy_pre", {"psnr": [5.0, 6.0, 7.0]})
    notes = C.check_same_targets({"m1": good, "m2": other})
    assert notes == [
        "baseline copy_pre: identical scores from m1 and m2 (3 case × phase × region rows): the same targets; shown once"
    ]
    # other case ids
    moved = _rows("m2", {"psnr": [9.0, 9.0, 9.0]}, cases=("a", "b", "x"))
    with pytest.raises(
        C.CompareError, match=r"same case ids: m1.csv has a, b, c, m2.csv has a, b, x \(only m1: c\) \(only m2: x\)"
    ):
        C.check_same_targets({"m1": good, "m2": moved}, {"m1": "m1.csv", "m2": "m2.csv"})
    # other phases
    late = _rows("m2", {"psnr": [9.0, 9.0, 9.0]}, phase="dce_late")
    with pytest.raises(C.CompareError, match=r"same phases: .* has dce_early, .* has dce_late.*same target_keys"):
        C.check_same_targets({"m1": good, "m2": late})
    # same ids and phases but another target: the shared baseline scores differently
    shifted = _rows("m2", {"psnr": [9.0, 9.0, 9.0]}) + _rows("copy_pre", {"psnr": [5.0, 6.5, 7.0]})
    with pytest.raises(
        C.CompareError,
        match=r"not scored on the same targets: baseline copy_pre .* psnr 6.0 in m1.csv but 6.5 in m2.csv for case b",
    ):
        C.check_same_targets({"m1": good, "m2": shifted}, {"m1": "m1.csv", "m2": "m2.csv"})


def test_build_table_on_known_numbers():
    rows = {
        "m1": _rows("m1", {"psnr": [10.0, 12.0, 14.0], "ssim": [0.5, 0.5, 0.5]})
        + _rows("copy_pre", {"psnr": [8.0, 9.0, 10.0], "ssim": [0.25, 0.5, 0.75]}),
        "m2": _rows("m2", {"psnr": [20.0, 20.0, 23.0], "ssim": [0.5, 0.5, 0.5]})
        + _rows("copy_pre", {"psnr": [8.0, 9.0, 10.0], "ssim": [0.25, 0.5, 0.75]}),
    }
    info = {"m1": {"sampler": "DDIM", "steps": 50, "train_iterations": 200, "s_per_volume": 1.5}}
    table = C.build_table(rows, info)
    by = {r["method"]: r for r in table}
    assert [r["method"] for r in table] == ["m1", "m2", "copy_pre"]  # the baseline once
    assert (by["m1"]["psnr_mean"], by["m1"]["psnr_std"], by["m1"]["n"]) == (12.0, 2.0, 3)
    assert (by["m2"]["psnr_mean"], by["m2"]["psnr_std"]) == (21.0, math.sqrt(3.0))
    assert (by["copy_pre"]["psnr_mean"], by["copy_pre"]["psnr_std"]) == (9.0, 1.0)
    assert (by["copy_pre"]["ssim_mean"], by["copy_pre"]["ssim_std"]) == (0.5, 0.25)
    assert by["copy_pre"]["kind"] == "baseline (from m1)"
    # m2 is the best (highest mean PSNR); three paired differences of one sign: exact two-sided p = 0.25
    assert by["m2"]["best"] and not by["m1"]["best"] and math.isnan(by["m2"]["p_psnr"])
    assert by["m1"]["p_psnr"] == pytest.approx(0.25) and by["copy_pre"]["p_psnr"] == pytest.approx(0.25)
    assert math.isnan(by["m1"]["p_ssim"])  # no non-zero difference: no test
    assert (by["m1"]["sampler"], by["m1"]["steps"], by["m1"]["s_per_volume"]) == ("DDIM", 50, 1.5)
    md = C.markdown(table, ["# t"])
    assert "| dce_early | whole | m1 | 3 | 12.00 ± 2.00 | 0.500 ± 0.000 | 0.25 | " in md
    assert "| dce_early | whole | **m2** | 3 | 21.00 ± 1.73 | 0.500 ± 0.000 | best | best |" in md
    assert "| DDIM, 50 | 200 | 1.5 |" in md
