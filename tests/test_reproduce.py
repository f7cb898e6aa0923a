"""scripts/reproduce.py: one command per paper writes our figures beside the published ones.

Every paper runs with ``--budget smoke`` on tiny phantoms (2 iterations, 2 sampling steps, one test
case); ResDCE-diff and DCE-diff also on ProstateX-0218 through the ingest (skipped without ``../shared``).
The runs are made once per module and shared by the tests; a rerun must resume, not retrain. The file
took 124 s on the project's 2-core CPU shared with other jobs (2026-12-06)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import helpers as h
import pytest

from common.bundle import find_bundles
from scripts import reproduce as R

ROOT = Path(__file__).resolve().parents[1]
PAPERS = sorted(R.find_papers())
#: the data each paper's smoke run reads (a folder of the phantoms made below)
PHANTOM_DATA = {
    "resdce": "prostate/prepared",
    "dcediff": "prostate/prepared",
    "ressrdiff": "prostate/nifti",
    "d3m": "brain",
    "iterunet": "breast",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """3 prostate subjects (one per section; native T2w 64x64x18 for super-resolution), 4 brain, 4 breast
    (48x48x16: the lesion metrics' SSIM dominates iterunet's evaluation)."""
    root = tmp_path_factory.mktemp("repro_phantoms")
    h.tiny_phantoms(root, "prostate", 3, prostate_t2w_shape=(64, 64, 18), prostate_t2w_spacing=(4.0, 4.6, 3.6))
    h.tiny_phantoms(root, "brain", 4)
    h.tiny_phantoms(root, "breast", 4, breast_shape=(48, 48, 16), breast_spacing=(4.0, 4.0, 6.0))
    return root


@pytest.fixture(scope="module")
def smoke(phantoms, tmp_path_factory):
    """``smoke(paper)`` -> ``(out folder, report)``: each paper's smoke run on the phantoms, made once."""
    done: dict[str, tuple[Path, dict]] = {}

    def run(paper: str) -> tuple[Path, dict]:
        if paper not in done:
            out = tmp_path_factory.mktemp(f"repro_{paper}")
            report = R.main(
                paper=paper, data=str(phantoms / PHANTOM_DATA[paper]), budget="smoke", out=str(out), device="cpu"
            )
            done[paper] = (out, report)
        return done[paper]

    return run


def _spec(paper: str) -> dict:
    return json.loads(R.find_papers()[paper].read_text())


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def test_every_bundle_paper_is_listed():
    assert PAPERS == sorted(PHANTOM_DATA)  # one paper file per reproducing bundle
    for paper, path in R.find_papers().items():  # each file lies in the bundle of its paper's method
        main = next(m for m in _spec(paper)["methods"] if m["kind"] == "method")
        assert path == ROOT / "bundles" / main["bundle"] / "docs" / "paper_results.json"


@pytest.mark.parametrize("paper", PAPERS)
def test_paper_results_follow_the_schema(paper):
    spec = R.check_paper_results(_spec(paper), paper)
    ids = {m["id"] for m in spec["methods"]}
    assert [m["kind"] for m in spec["methods"]].count("method") == 1
    assert {r["method"] for r in spec["results"]} <= ids
    # a published value is a number with its table; a missing one is null with a note saying where to copy it from
    assert all(r["value"] is None or isinstance(r["value"], (int, float)) for r in spec["results"])
    assert all(r["note"] for r in spec["results"] if r["value"] is None)
    for b in R.BUDGETS:
        assert spec["budget"][b]["train"]["num_iterations"] >= 1
    assert spec["budget"]["smoke"]["train"]["num_iterations"] <= 2
    assert spec["budget"]["paper"]["train"]["num_iterations"] >= 10000
    assert spec["budget"]["paper"]["train"]["network_size"] == "paper"


def test_the_schema_check_names_the_problem():
    good = _spec("resdce")
    cases = [
        (lambda s: s.pop("budget"), "'budget' missing"),
        (lambda s: s["results"][0].update(value=None, note=""), "results[0]: a null value needs a note"),
        (lambda s: s["results"][0].update(value="28 dB"), "results[0].value: a number or null"),
        (lambda s: s["results"][0].update(method="nobody"), "results[0].method 'nobody' is not a methods id"),
        (lambda s: s["results"][0].pop("page"), "results[0].page: a number or null"),
        (lambda s: s["methods"].append(dict(s["methods"][0])), "twice"),
        (lambda s: s["dataset"]["layouts"][0].update(ingest="knee"), "dataset.layouts[0].ingest"),
        (lambda s: s.update(protocol="theirs"), "'protocol' must be 'paper' or 'ours'"),
        (
            lambda s: s["budget"]["smoke"]["train"].update(warmup_steps=1),
            "budget.smoke.train.warmup_steps: not a setting every bundle has",
        ),
    ]
    for spoil, message in cases:
        bad = copy.deepcopy(good)
        spoil(bad)
        with pytest.raises(R.ReproduceError, match=r"^x\.json: ") as e:
            R.check_paper_results(bad, "x.json")
        assert message in str(e.value)


def test_published_values_filled_from_the_docs():
    """The values the bundle docs cite are in the files (and nothing else is invented: the rest is null)."""
    filled = {
        (p, r["method"], r["metric"]): r["value"] for p in PAPERS for r in _spec(p)["results"] if r["value"] is not None
    }
    assert filled == {
        ("resdce", "resdce", "speedup"): 3.56,
        ("resdce", "resdce", "parameters_M"): 58.4,
        ("resdce", "dcediff", "parameters_M"): 125,
        ("dcediff", "dcediff", "n_scored"): 1104,
        ("ressrdiff", "ressrdiff", "n_scored"): 2668,
        ("d3m", "d3m", "parameters_M"): 56,
    }


@pytest.mark.parametrize("paper", PAPERS)
def test_smoke_run_writes_the_side_by_side_table(paper, smoke):
    out, report = smoke(paper)
    spec = _spec(paper)
    saved = json.loads((out / "reproduction.json").read_text())
    md = (out / "reproduction.md").read_text()
    assert saved["paper"] == paper and saved["budget"] == "smoke"
    assert len(saved["results"]) == len(spec["results"])
    main_id = next(m["id"] for m in spec["methods"] if m["kind"] == "method")
    have = {b.name for b in find_bundles()}
    for pub, got in zip(spec["results"], saved["results"]):
        # the published figure as the paper file has it, beside ours
        assert (got["table"], got["method"], got["metric"], got["value"], got["std"]) == (
            pub["table"],
            pub["method"],
            pub["metric"],
            pub["value"],
            pub["std"],
        )
        if pub["value"] is not None:
            assert f"| {R._fmt(pub['value'], pub['std'], pub['metric'])} |" in md
        plan = next(m for m in spec["methods"] if m["id"] == pub["method"])
        if pub["method"] == main_id or plan["kind"] == "trivial baseline":
            assert _finite(got["ours"]["mean"]) and got["ours"]["n"] >= 1, got  # our figure, finite
            assert R._fmt(got["ours"]["mean"], got["ours"]["std"], pub["metric"]) in md
        if plan.get("bundle") and plan["bundle"] not in have:  # e.g. Pix2Pix before its bundle exists
            assert got["ours_status"] == "not implemented" and got["ours"]["mean"] is None
    methods = {m["id"]: m for m in saved["methods"]}
    assert methods[main_id]["status"] == "run"
    assert methods[main_id]["run"]["info"]["train_iterations"] == spec["budget"]["smoke"]["train"]["num_iterations"]
    for m in spec["methods"]:
        if m["kind"] == "baseline" and not m.get("bundle"):
            assert methods[m["id"]]["status"] == "not implemented" and f"`{m['id']}`, baseline): not implemented" in md
    assert "## Differences that remain" in md and "smoke budget" in md
    for d in spec["differences"]:
        assert d in saved["differences"]
    # the trivial baselines the bundles score are rows of our full table
    trivial = [m["id"] for m in spec["methods"] if m["kind"] == "trivial baseline"]
    assert set(trivial) <= {r["method"] for r in saved["table"]}


def test_resdce_paper_puts_dcediff_beside_resdce_with_one_budget(smoke):
    out, report = smoke("resdce")
    methods = {m["id"]: m for m in report["methods"]}
    runs = {k: methods[k]["run"]["info"] for k in ("resdce", "dcediff")}
    assert runs["resdce"]["train_iterations"] == runs["dcediff"]["train_iterations"] == 2
    assert (runs["resdce"]["sampler"], runs["resdce"]["steps"]) == ("ResidualShift", 2)
    assert (runs["dcediff"]["sampler"], runs["dcediff"]["steps"]) == ("DDIM", 2)
    speed = next(r for r in report["results"] if r["metric"] == "speedup")
    assert speed["ours"]["mean"] == pytest.approx(runs["dcediff"]["s_per_volume"] / runs["resdce"]["s_per_volume"])
    # the paper's protocol: per-slice scoring, so n counts slices (16 per tiny phantom volume, one test case)
    psnr = next(r for r in report["results"] if r["method"] == "resdce" and r["metric"] == "psnr")
    assert psnr["ours"]["n"] > 1 and any("protocol of resdce: paper (scoring slice" in x for x in report["header"])
    table = {(r["phase"], r["region"], r["method"]) for r in report["table"]}
    assert {("dce_early", "whole", m) for m in ("resdce", "dcediff", "copy_pre", "paired_input")} <= table


def test_iterunet_paper_has_the_single_time_point_baseline(smoke):
    out, report = smoke("iterunet")
    methods = {m["id"]: m for m in report["methods"]}
    assert methods["iterunet"]["status"] == methods["iterunet_direct"]["status"] == "run"
    # two stages: the recursive one started from the warm-up weights
    assert (out / "smoke" / "iterunet" / "warmup" / "model.pt").is_file()
    assert methods["iterunet"]["run"]["ckpt"].endswith("recursive/model.pt")
    kin = [r for r in report["results"] if r.get("file") == "kinetics.csv"]
    assert kin and all(_finite(r["ours"]["mean"]) for r in kin)


def test_bad_input_is_one_line(tmp_path, phantoms):
    with pytest.raises(R.ReproduceError, match=r"^--paper 'nope': one of d3m, dcediff, iterunet, resdce, ressrdiff"):
        R.main(paper="nope", data=str(tmp_path))
    with pytest.raises(R.ReproduceError, match=rf"^--data {tmp_path / 'missing'}: no such folder"):
        R.main(paper="resdce", data=str(tmp_path / "missing"), out=str(tmp_path / "o"))
    with pytest.raises(
        R.ReproduceError,
        match=r"not a layout this paper reads; expected one of: prepared prostate cases \(datalist.json \+ \*/dce_pre.nii.gz\)",
    ):
        R.main(paper="resdce", data=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(R.ReproduceError, match=rf"^--data {phantoms / 'brain'}: not a layout this paper reads"):
        R.main(paper="resdce", data=str(phantoms / "brain"), out=str(tmp_path / "o"))  # brain cases, a prostate paper
    assert not (tmp_path / "o" / "smoke").exists()
    with pytest.raises(R.ReproduceError, match=r"^--budget 'huge': one of paper, smoke"):
        R.main(paper="resdce", data=str(tmp_path), budget="huge")
    with pytest.raises(R.ReproduceError, match=r"--ingest_seg: .* needs no ingest"):
        R.main(paper="d3m", data=str(phantoms / "brain"), out=str(tmp_path / "o"), ingest_seg="x.nii.gz")


def test_the_command_line_ends_a_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    """``scripts/reproduce.py`` as typed (fire parses argv; the error hook is left out: it patches this
    process's excepthook and logging, and the script's own errors end in :func:`R.cli`)."""
    monkeypatch.setattr(R, "install_error_hook", lambda: None)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--paper", "resdce", "--data", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as e:
        R.cli()
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --data {tmp_path / 'missing'}: no such folder"]


# ---------------------------------------------------------------- ProstateX-0218 through the ingest


@pytest.fixture(scope="module")
def prostatex_runs(prostatex_study, tmp_path_factory) -> dict:
    """ResDCE-diff's paper from the DICOM study (the ingest runs), then DCE-diff's on the ingest's output."""
    out = tmp_path_factory.mktemp("repro_px")
    first = R.main(paper="resdce", data=str(prostatex_study), budget="smoke", out=str(out / "resdce"), device="cpu")
    prepared = out / "resdce" / "data"
    second = R.main(paper="dcediff", data=str(prepared), budget="smoke", out=str(out / "dcediff"), device="cpu")
    return {"out": out, "resdce": first, "dcediff": second, "prepared": prepared}


def test_prostatex_through_the_ingest(prostatex_runs):
    prepared = prostatex_runs["prepared"]
    assert (prepared / "ProstateX-0218" / "manifest.json").is_file() and (prepared / R.INGEST_MARKER).is_file()
    # the smoke budget's ingest options (a small crop, no registration) reached the ingest
    import nibabel as nib

    assert nib.load(prepared / "ProstateX-0218" / "dce_pre.nii.gz").shape == (96, 96, 8)
    for paper in ("resdce", "dcediff"):
        report = prostatex_runs[paper]
        assert "scored case(s): 1: ProstateX-0218" in report["header"]
        own = [r for r in report["results"] if r["method"] == paper and r["metric"] in ("psnr", "ssim")]
        assert own and all(_finite(r["ours"]["mean"]) for r in own)
        # one study lands in the training section: scored there, and the report says so
        assert any("no test case: test uses the training section" in x for x in report["header"])
    assert "PROSTATEx-style DICOM studies -> prepared prostate cases" in prostatex_runs["resdce"]["data"]["layout"]


def test_a_rerun_resumes_instead_of_retraining(prostatex_runs, prostatex_study, capsys):
    out = prostatex_runs["out"] / "resdce"
    models = [out / "smoke" / m / "models" / "model.pt" for m in ("resdce", "dcediff")]
    before = [p.stat().st_mtime_ns for p in models]
    capsys.readouterr()
    again = R.main(paper="resdce", data=str(prostatex_study), budget="smoke", out=str(out), device="cpu")
    log = capsys.readouterr().out
    ran = [m["id"] for m in again["methods"] if m["status"] == "run"]  # resdce, dcediff (+ pix2pix where present)
    assert {"resdce", "dcediff"} <= set(ran)
    assert "ingest (prostate): skipped, done before" in log
    assert log.count("skipped, trained before (2 iterations)") == len(ran)
    assert log.count("skipped, done before with these weights and settings") == len(ran)
    assert [p.stat().st_mtime_ns for p in models] == before  # not retrained
    key = lambda rep: [(r["method"], r["metric"], r.get("phase"), r["ours"]["mean"]) for r in rep["results"]]  # noqa: E731
    assert key(again) == key(prostatex_runs["resdce"])


def test_a_bundles_rows_are_named_by_the_method_id():
    """The same bundle runs as several methods (iterU-Net and its single-time-point baseline; D3M's ablations,
    which write ``d3m_no_mssdm``): its own rows take the method's id, baselines keep their names."""
    rows = [{"method": m} for m in ("d3m_no_mssdm", "copy_t1n", "d3m_first_draw", "d3m", "bicubic")]
    assert [r["method"] for r in R._rename(rows, "d3m", "abl")] == [
        "abl",
        "copy_t1n",
        "abl_first_draw",
        "abl",
        "bicubic",
    ]
