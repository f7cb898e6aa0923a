"""The benchmark (``make bench``): the README block it rewrites, and that every section measures the
network, scheduler and inferer its bundle's configs build (tiny sizes: timings are not asserted)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import benchmark as B  # noqa: E402
from scripts.benchmarks import common as C  # noqa: E402


def _readme_rows(path: Path) -> list[dict]:
    text = path.read_text()
    return B.parse_block(text[text.index(B.START) : text.index(B.END)])[0]


@pytest.fixture
def readme(tmp_path) -> Path:
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    return copy


def test_readme_block_has_every_section():
    rows = _readme_rows(ROOT / "README.md")
    assert {r["section"] for r in rows} >= {"phantoms", "ingest", "resdce", "dcediff", "ressrdiff"}
    assert all(set(r) == set(B.COLUMNS) for r in rows if not B.is_cost(r))
    # the README's block is exactly what benchmark.py writes for its rows (parse and render agree)
    text = (ROOT / "README.md").read_text()
    block = text[text.index(B.START) + len(B.START) : text.index(B.END)]
    assert block == "\n" + B.render_block(*B.parse_block(block))


def test_subset_run_replaces_only_its_sections(readme, tmp_path):
    before_text = readme.read_text()
    before = _readme_rows(readme)
    i_ingest = [k for k, r in enumerate(before) if r["section"] == "ingest"]
    n_phantoms = sum(r["section"] == "phantoms" for r in before)

    def fake_ingest(tmp: Path) -> list[dict]:
        return [
            {"what": "fake ingest A", "value": "1.0 s", "device": "cpu", "note": "a | b"},
            {"what": "fake ingest B", "value": "2.0 s", "device": "cpu", "note": "n"},
        ]

    def broken(tmp: Path) -> list[dict]:
        raise RuntimeError("out of memory")

    sections = {
        "ingest": fake_ingest,
        "phantoms": broken,
        "newsec": lambda tmp: [{"what": "new", "value": "3", "device": "cpu", "note": ""}],
        "resdce": lambda tmp: [{"what": "resdce", "value": "skipped", "device": "cpu", "note": "no data"}],
    }
    rows = B.run(sections, ["ingest", "phantoms", "newsec", "resdce"], out=tmp_path / "bench.md", readme=readme)
    assert [r["section"] for r in rows] == ["ingest", "ingest", "phantoms", "newsec", "resdce"]
    assert rows[2]["value"] == "failed" and "out of memory" in rows[2]["note"]

    after = _readme_rows(readme)
    # ingest's one row replaced in place by the two new ones; the failed and the skipped section's
    # rows kept; the new section appended; every other row unchanged, in order
    # (the cost table's rows, a second table, are kept as they were, after the first table's)
    cost = [r for r in before if B.is_cost(r)]
    before = [r for r in before if not B.is_cost(r)]
    expect = (
        before[: i_ingest[0]]
        + [dict(r, section="ingest") for r in fake_ingest(tmp_path)]
        + [r for r in before[i_ingest[0] :] if r["section"] != "ingest"]
        + [{"section": "newsec", "what": "new", "value": "3", "device": "cpu", "note": ""}]
    )
    assert [r for r in after if not B.is_cost(r)] == expect
    assert [r for r in after if B.is_cost(r)] == cost
    assert sum(r["section"] == "phantoms" for r in after) == n_phantoms
    # the README outside the markers is untouched
    text = readme.read_text()
    assert text[: text.index(B.START)] == before_text[: before_text.index(B.START)]
    assert text[text.index(B.END) :] == before_text[before_text.index(B.END) :]
    # "measured on" lines: the run's for ingest and newsec, the old ones for the rest
    _, measured = B.parse_block(text[text.index(B.START) : text.index(B.END)])
    _, measured_before = B.parse_block(before_text[before_text.index(B.START) : before_text.index(B.END)])
    assert measured["ingest"] == measured["newsec"] != measured_before["ingest"]
    assert measured["phantoms"] == measured_before["phantoms"] and measured["resdce"] == measured_before["resdce"]
    # benchmark.md has all rows, the failure included; no temporary file left behind
    md = (tmp_path / "bench.md").read_text()
    assert (
        "| ingest | fake ingest A | 1.0 s | cpu | a \\| b |" in md and "| phantoms | section phantoms | failed |" in md
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "bench.md"]
    # a second identical run changes nothing
    once = readme.read_text()
    B.run({"ingest": fake_ingest}, ["ingest"], out=tmp_path / "bench.md", readme=readme)
    assert _readme_rows(readme) == after and readme.read_text().count(B.START) == once.count(B.START) == 1


def test_readme_without_markers_and_unknown_section(tmp_path):
    plain = tmp_path / "README.md"
    plain.write_text("# no table\n")
    with pytest.raises(ValueError, match="bench:start"):
        B.update_readme(plain, [], ["x"], "today")
    assert plain.read_text() == "# no table\n"
    assert {"phantoms", "ingest", "resdce", "dcediff", "ressrdiff"} <= set(B.discover())
    with pytest.raises(ValueError, match="unknown benchmark section"):
        B.run({"a": lambda tmp: []}, ["b"], out=tmp_path / "b.md", readme=None)


def _config_params(bundle: str, config: str = "inference.json", **overrides) -> int:
    from monai.bundle import ConfigParser

    p = ConfigParser()
    files = ["train.json", config] if config == "inference.json" else [config]  # inference.json stacks on train.json
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in files])
    for k, v in overrides.items():
        p[k] = v
    return C.n_params(p.get_parsed_content("network_def"))


def test_sections_measure_the_bundles_networks(one_thread):
    """Each section's measure function, at tiny sizes, reports the parameter count of the network the
    bundle's config builds; its inferers carry the config's settings."""
    from scripts.benchmarks import dcediff, resdce, ressrdiff

    torch.manual_seed(0)
    resdce_n = _config_params("resdce", network_size="small")
    res = resdce.measure_inference("small", "cpu", shape=(16, 16, 1), steps=(2,))
    assert round(res["params_m"] * 1e6) == resdce_n and res["vol2_scaled"] is False
    train = resdce.measure_training("small", "cpu", batch=2, iters=1, shape=(16, 16))
    assert round(train["params_m"] * 1e6) == _config_params("resdce", "train.json", network_size="small") == resdce_n
    assert train["ips"] > 0

    d = dcediff.measure("small", "cpu", shape=(16, 16, 1), budget_s={"cpu": 0.0})
    assert round(d["dcediff_params_m"] * 1e6) == _config_params("dcediff", network_size="small")
    assert round(d["resdce_params_m"] * 1e6) == resdce_n
    for name, steps in (("dcediff_ddpm1000", 1000), ("dcediff_ddim50", 50), ("resdce15", 15)):
        r = d[name]  # timed over 2 steps and scaled (budget 0): total = per-step x chain length
        assert r["scaled"] and r["probe"] == 2 and r["total_s"] == pytest.approx(r["step_s"] * steps)

    s = ressrdiff.measure("small", "cpu", slice_shape=(16, 16), depth=2, steps=(2,))
    assert round(s["params_m"] * 1e6) == _config_params("ressrdiff", network_size="small")
    assert s["chunk"] == 1  # the bundle's CPU default: one slice per forward pass


def test_chain_runs_the_last_k_steps_of_the_bundle_schedule(one_thread):
    """``Chain.run(k)`` evaluates the network k times (one batch of slices per step) on the config's
    schedule and restores the full schedule afterwards."""
    from scripts.benchmarks import dcediff

    net, vol, c_cond = dcediff.dcediff_chain_parts("small", "cpu", "ddim", 50)
    assert vol.num_inference_steps == 50 and c_cond == 4
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, *args, **kwargs):
            calls.append(x.shape[0])
            return self.inner(x, *args, **kwargs)

    chain = dcediff.Chain(vol, torch.randn(1, c_cond, 16, 16, 3), Counting(net), torch.device("cpu"))
    full = chain.scheduler.timesteps.clone()
    assert chain.total_steps == 50 and len(full) == 50
    chain.run(3)
    assert calls == [3, 3, 3]  # 3 steps, the 3 slices batched
    assert torch.equal(chain.scheduler.timesteps, full) and vol.num_inference_steps == 50


def test_flop_count_of_known_layers_is_their_closed_form():
    """``count_flops`` (torch's FlopCounterMode): a multiply-add is 2 FLOPs, the bias is not counted."""
    lin = torch.nn.Linear(12, 7)
    assert C.count_flops(lambda: lin(torch.randn(5, 12))) == 2 * 5 * 12 * 7
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, stride=2)
    x = torch.randn(2, 3, 10, 10)
    h_out = w_out = (10 + 2 - 3) // 2 + 1  # 5
    assert C.count_flops(lambda: conv(x)) == 2 * 2 * 8 * h_out * w_out * 3 * 3 * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast changes the dtype, not the count
        assert C.count_flops(lambda: lin(torch.randn(5, 12))) == 2 * 5 * 12 * 7
    assert C.matmul_gflops(torch.float32, n=64, repeat=1) > 0


def test_cost_rows_fill_the_new_columns(monkeypatch, one_thread):
    """The cost table (``--only cost``): per precision (fp32, auto as it resolves here, bf16 forced) the
    time per step and per volume, FLOPs per step and the achieved rate against the matmul peak; the
    README block renders it as a second table and reads it back."""
    from common.device import cpu_has_native_bf16

    monkeypatch.setenv("BENCH_QUICK", "1")
    case = C.CostCase("resdce", "one 16x16x1 volume, 15 steps", ((1, 3, 16, 16, 1),), 15, 2.0, 1)
    peaks = {"fp32": 100.0, "bf16": 50.0}
    rows = C.cost_rows(case, "small", "cpu", peaks)
    assert [r["precision"].split()[0] for r in rows] == ["fp32", "auto", "bf16"]
    assert rows[2]["precision"].startswith("bf16 (forced: bf16")
    for r in rows:
        assert set(B.COST_COLUMNS) - {"section"} <= set(r)
        step, vol = float(r["s/step"]), float(r["s/volume"])
        # 15 steps x 2 volumes per measured input; s/step is printed to 3 digits (up to 0.5 % off)
        assert vol == pytest.approx(step * 15 * 2.0, rel=6e-3)
        rate = float(r["GFLOP/step"]) / step
        assert float(r["GFLOP/s"]) == pytest.approx(rate, rel=2e-2)
        used = r["precision"].split("= ")[-1].split(":")[-1].strip().split()[0].rstrip(")")
        emulated = used == "bf16" and not cpu_has_native_bf16()  # on the fp32 units: set against their rate
        ref = "fp32" if emulated else used
        share, tail = r["of matmul peak"].split(" % of ")
        assert tail == ref + (" (bf16 emulated)" if emulated else "")
        # the printed share (whole percents, or 2 digits below 10 %: up to 5 % off) of the unrounded rate;
        # `rate` here comes from the rounded cells (0.5 % more)
        assert float(share) == pytest.approx(100 * rate / peaks[ref], rel=6e-2, abs=0.51 if float(share) >= 10 else 0)
    assert C.percent(0.7) == "70" and C.percent(0.05) == "5" and C.percent(0.0031) == "0.31" and C.percent(1.1) == "110"
    # one step of the chain is one forward of the bundle's network over the volume's slice (FLOPs > 0, all equal)
    assert len({r["GFLOP/step"] for r in rows}) == 1 and float(rows[0]["GFLOP/step"]) > 0
    # the second table's header carries the new columns; parse and render agree
    rows = [{**r, "section": "cost"} for r in rows] + [
        {"section": "x", "what": "w", "value": "v", "device": "cpu", "note": "n"}
    ]
    block = B.render_block(rows, {"cost": "today"})
    assert "| " + " | ".join(B.COST_COLUMNS) + " |" in block and "| " + " | ".join(B.COLUMNS) + " |" in block
    parsed, measured = B.parse_block(block)
    assert measured == {"cost": "today"} and B.render_block(parsed, measured) == block
    assert sorted(sorted(r.items()) for r in parsed) == sorted(sorted(r.items()) for r in rows)


def test_every_bundle_has_a_cost_case():
    from scripts.benchmarks import cost

    found = cost.cases()
    assert {"resdce", "dcediff", "ressrdiff", "d3m", "iterunet"} <= set(found)
    for name, make in found.items():
        for preset in ("small", "paper"):
            case = make(preset, "cpu", False)
            assert case.bundle == name and case.steps >= 1 and case.scale >= 1
    d3m = found["d3m"]("paper", "cpu", False)
    assert d3m.scale == pytest.approx(155 / 4) and d3m.inputs[0] == (1, 3, 240, 240, 4) and d3m.steps == 250


def test_precision_quality_compares_two_evaluations(tmp_path):
    """``precision_quality.compare``: per phase the PSNR / SSIM means of both runs and their difference
    (whole image, the model's rows only), and the relative L2 of the two syntheses over all cases."""
    import json

    import nibabel as nib
    import numpy as np

    from scripts.benchmarks import precision_quality as Q

    a = np.arange(8, dtype=np.float32).reshape(2, 2, 2) + 1
    for run, psnr, ssim, vol in (("fp32", 20.0, 0.8, a), ("bf16", 20.05, 0.799, a + 0.1)):
        (tmp_path / run / "c1").mkdir(parents=True)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / run / "c1" / "late.nii.gz")
        stats = lambda p, s: {"psnr": {"mean": p, "std": 0, "n": 1}, "ssim": {"mean": s, "std": 0, "n": 1}}  # noqa: E731
        summary = {"m/late/whole": stats(psnr, ssim), "m/late/organ": stats(1.0, 0.1), "copy/late/whole": stats(5, 0.5)}
        (tmp_path / run / "summary.json").write_text(json.dumps({"summary": summary}))
    got = Q.compare(tmp_path / "fp32", tmp_path / "bf16", "m")
    assert set(got) == {"late"}
    late = got["late"]
    assert late["psnr_diff"] == pytest.approx(0.05) and late["ssim_diff"] == pytest.approx(-0.001) and late["n"] == 1
    assert late["rel_l2"] == pytest.approx(0.1 * np.sqrt(8) / np.linalg.norm(a), rel=1e-5)


def test_precision_quality_seed_spread_run_takes_the_next_seed():
    """The yardstick run (fp32, another sampling seed) changes only the seed: the bundles' default 0
    becomes 1, a seed given in the overrides becomes the next one; the other overrides stay."""
    from scripts.benchmarks import precision_quality as Q

    assert Q._next_seed("") == "--seed 1"
    assert Q._next_seed("--sampler ddim --num_inference_steps 50") == "--sampler ddim --num_inference_steps 50 --seed 1"
    assert Q._next_seed("--seed 7 --case_dir '/a b'") == "--seed 8 --case_dir '/a b'"


def test_precision_quality_records_one_file_per_precision():
    """bf16 (what ``auto`` runs on bf16 hardware) keeps ``precision_cpu_run.json``, another precision gets its
    own record, and the benchmark rows read every record (DCE-diff's bf16 and fp16 both)."""
    from scripts.benchmarks import precision_quality as Q

    assert Q.record_name("bf16") == "precision_cpu_run.json"
    assert Q.record_name("fp16") == "precision_cpu_run_fp16.json"
    whats = [r["what"] for r in Q.rows(ROOT)]
    assert any(w.startswith("dcediff bf16 vs fp32") for w in whats)
    assert any(w.startswith("dcediff fp16 vs fp32") for w in whats)
