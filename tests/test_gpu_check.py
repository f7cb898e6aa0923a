"""scripts/gpu_check.sh's CPU path: one line and exit 0 without CUDA; the rows it writes with tiny settings."""

from __future__ import annotations

import subprocess

import torch
from helpers import ROOT

from scripts.benchmarks import gpu


def test_without_cuda_one_line_and_exit_0(tmp_path):
    if torch.cuda.is_available():
        return  # the GPU path itself is for scripts/gpu_check.sh on a GPU machine
    res = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "b.md")], capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.strip().count("\n") == 0 and "no CUDA GPU" in res.stdout
    assert not (tmp_path / "b.md").exists()


def test_tiny_cpu_rows_replace_their_section(tmp_path, monkeypatch):
    out = tmp_path / "benchmark.md"
    out.write_text("# Benchmark\n\n| kept | table |\n")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # a rerun replaces the section instead of adding another
            assert gpu.main(out=str(out), only="resdce", device="cpu", tiny=True) == 0
    finally:
        torch.set_num_threads(n)
    text = out.read_text()
    assert text.startswith("# Benchmark\n\n| kept | table |\n") and text.count(gpu.START) == 1
    (line,) = [x for x in text.splitlines() if x.startswith("| resdce |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["resdce", "small", "fp32"] and cells[5:7] == ["32x32x2", "2"]
    train_s, step_s, vol_s = float(cells[3]), float(cells[7]), float(cells[8])
    assert train_s > 0 and step_s > 0 and abs(vol_s - 2 * step_s) <= 0.05 + 1e-9  # s/volume = steps x s/step
    assert cells[10] == "not run" and cells[11].startswith("cpu")
