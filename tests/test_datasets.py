"""common.data.datasets: the training/validation dataset factory and its bounded cache."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import Compose, MapTransform, RandFlipd

from common.data.datasets import (
    MIB,
    BudgetCacheDataset,
    cache_rate_for_budget,
    cached_nbytes,
    cases_in_budget,
    make_dataset,
    memory_budget_bytes,
)

ROOT = Path(__file__).resolve().parents[1]


class Render(MapTransform):
    """Deterministic: key ``x`` (an int) -> a ``(1, 512, 512)`` float32 MetaTensor filled with it (1 MiB),
    affine diag(2, 3, 4, 1); counts its calls."""

    def __init__(self, keys="x"):
        super().__init__(keys)
        self.calls = 0

    def __call__(self, data):
        self.calls += 1
        d = dict(data)
        d["x"] = MetaTensor(torch.full((1, 512, 512), float(d["x"])), affine=torch.diag(torch.tensor([2.0, 3, 4, 1])))
        return d


def chain():
    """A nested Compose as the bundles build it (``[@preprocessing] + @train#transforms``), random last."""
    render = Render()
    return render, Compose([Compose([render]), RandFlipd("x", prob=0.5, spatial_axis=0)])


def data(n=10):
    return [{"id": f"case{i}", "x": i} for i in range(n)]


def test_budget_arithmetic():
    case = 204 * MIB  # d3m, one BraTS-sized case
    assert cases_in_budget(64, case, 1024 * MIB) == 5
    assert cache_rate_for_budget(64, case, 1024 * MIB) == pytest.approx(5 / 64)
    assert cache_rate_for_budget(3, case, 1024 * MIB) == 1.0
    assert cache_rate_for_budget(64, case, 100 * MIB) == 0.0
    assert cache_rate_for_budget(0, case, 1024 * MIB) == 1.0
    assert cases_in_budget(7, 0, 0) == 7  # nothing to hold
    # BraTS 2023 GLI training (~1000 cases): half of 400 GiB available holds them all, half of 200 GiB 501
    assert (
        cases_in_budget(1000, case, memory_budget_bytes(None, 0.5, available=400 * 2**30, local_world_size=1)) == 1000
    )
    assert cases_in_budget(1000, case, memory_budget_bytes(None, 0.5, available=200 * 2**30, local_world_size=1)) == 501
    # an explicit budget wins; otherwise a fraction of the available memory, split between the node's processes
    assert memory_budget_bytes(100) == 100 * MIB
    assert memory_budget_bytes(0, 0.5, available=8 * 2**30, local_world_size=2) == 2 * 2**30
    assert memory_budget_bytes(None, 0.25, available=8 * 2**30, local_world_size=1) == 2 * 2**30
    with pytest.raises(ValueError, match="memory_fraction"):
        memory_budget_bytes(None, 1.5, available=1)


def test_cached_nbytes():
    item = {"id": "a", "image": torch.zeros(3, 4, 5), "w": np.zeros((2, 2), np.float64), "n": 3}
    assert cached_nbytes(item) == 3 * 4 * 5 * 4 + 4 * 8
    mt = MetaTensor(torch.zeros(2, 8), affine=torch.eye(4, dtype=torch.float64))
    assert cached_nbytes(mt) == 2 * 8 * 4 + 16 * 8  # data + its affine


def test_auto_caches_what_fits_and_says_so(caplog):
    render, t = chain()
    with caplog.at_level(logging.INFO, logger="common.data.datasets"):
        ds = make_dataset(data(10), t, cache="auto", memory_budget_mib=3.5, num_workers=2)
    assert isinstance(ds, BudgetCacheDataset)
    case = 512 * 512 * 4 + 16 * 8  # 1 MiB of image + its affine
    assert ds.case_bytes == case
    assert ds.cache_num == 3 and ds.cache_rate == pytest.approx(0.3)
    assert ds.cached_bytes == 3 * case
    assert render.calls == 3  # the nested Compose was flattened: its deterministic part ran at caching time
    assert float(ds[1]["x"].mean()) == 1.0 and render.calls == 3  # cached: not recomputed
    assert float(ds[7]["x"].mean()) == 7.0 and render.calls == 4  # not cached: computed on the draw
    assert torch.equal(ds._cache[2]["x"].affine, torch.diag(torch.tensor([2.0, 3, 4, 1], dtype=torch.float64)))
    line = [r.getMessage() for r in caplog.records if "training dataset" in r.getMessage()][0]
    assert "3 of 10 cases cached in memory (1.0 MiB each, 3 MiB in all; budget 3.5 MiB" in line
    assert "7 run their deterministic part" in line and "up to Render" in line and "--cache_dir" in line


def test_budget_below_one_case_caches_nothing():
    render, t = chain()
    ds = make_dataset(data(4), t, cache="auto", memory_budget_mib=0.5)
    assert ds.cache_num == 0 and ds.cache_rate == 0.0 and ds.cached_bytes == 0
    assert float(ds[3]["x"].mean()) == 3.0


def test_memory_and_none():
    render, t = chain()
    ds = make_dataset(data(4), t, cache="memory", num_workers=1)
    assert type(ds) is CacheDataset and ds.cache_num == 4 and render.calls == 4
    assert float(ds[2]["x"].mean()) == 2.0 and render.calls == 4
    render, t = chain()
    ds = make_dataset(data(4), t, cache="none")
    assert type(ds) is Dataset and render.calls == 0
    assert float(ds[2]["x"].mean()) == 2.0 and render.calls == 1


def test_disk_cache_hit_on_second_run(tmp_path, caplog):
    render, t = chain()
    with caplog.at_level(logging.INFO, logger="common.data.datasets"):
        ds = make_dataset(data(3), t, cache="auto", cache_dir=str(tmp_path))  # auto + cache_dir -> disk
    assert isinstance(ds, PersistentDataset)
    first = [ds[i]["x"] for i in range(3)]
    assert render.calls == 3 and len(list((tmp_path / "training").glob("*.pt"))) == 3
    render2, t2 = chain()  # a second run: a new process would build the same chain
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file torch.load(weights_only=True) refused would warn "Corrupt cache file"
        ds2 = make_dataset(data(3), t2, cache="disk", cache_dir=str(tmp_path))
        again = [ds2[i]["x"] for i in range(3)]
    assert render2.calls == 0  # every case read from disk
    for a, b in zip(first, again):
        assert float(a.mean()) == float(b.mean())
        # the meta came back from disk too (the random flip may have negated the first axis since)
        assert isinstance(b, MetaTensor) and torch.equal(
            b.affine.diagonal().abs(), torch.tensor([2.0, 3, 4, 1], dtype=torch.float64)
        )
    lines = [r.getMessage() for r in caplog.records if "on disk" in r.getMessage()]
    assert "3 cases cached on disk in" in lines[0] and "0 files there already" in lines[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "ram"}, "--cache 'ram': must be one of auto, memory, disk, none"),
        ({"cache": "disk"}, "--cache disk needs --cache_dir DIR"),
    ],
)
def test_bad_options(kwargs, message):
    _, t = chain()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_dataset(data(2), t, **kwargs)


def test_every_bundle_uses_the_factory():
    """train#dataset and validate#dataset of every bundle are built by make_dataset with the ids cache, cache_dir,
    cache_memory_mib, and each bundle's training transform caches up to its first random transform."""
    for cfg in sorted(ROOT.glob("bundles/*/configs/train.json")):
        c = json.loads(cfg.read_text())
        assert c["cache"] == "auto" and c["cache_dir"] == "" and c["cache_memory_mib"] == 0, cfg
        for sec in ("train", "validate"):
            ds = c[sec]["dataset"]
            assert ds["_target_"] == "common.data.datasets.make_dataset", (cfg, sec)
            assert (ds["cache"], ds["cache_dir"], ds["memory_budget_mib"]) == (
                "@cache",
                "@cache_dir",
                "@cache_memory_mib",
            )
