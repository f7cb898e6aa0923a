"""Every bundle's configs follow one pattern (checked for each folder in ``bundles/``, new ones included).

- ``train.json`` is the complete training config (the card's command runs it alone);
  ``inference.json``, ``evaluate.json`` and ``multi_gpu_train.json`` are overlays stacked on it
  (``common.bundle.WORKFLOW_FILES``) that state only what differs: no ``(id, value)`` is defined in two
  config files of a bundle, and the network, the schedule, the preprocessing and the checkpoint record
  are defined in ``train.json`` alone. ``scripts/export_bundle.py`` flattens them for the Model Zoo.
- No id is defined twice in one file; ``run`` is a reference to ``training`` / ``evaluating``.
- ``multi_gpu_train.json`` never addresses a list entry by position (``train#handlers#2``): handlers
  switch themselves off with ``"_disabled_": "@is_not_rank0"``.
- An id means one thing across bundles: ``sampler`` is only ever dcediff's ``ddpm``/``ddim`` string.
- ``preprocessing`` / ``postprocessing`` are ``Compose`` objects (MONAI Deploy reads ``.transforms``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(
    p.name
    for p in (ROOT / "bundles").iterdir()
    if (p / "configs" / "train.json").exists() and (p / "configs" / "inference.json").exists()
)
CONFIG_FILES = ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json")
#: defined once, in train.json: what makes the weights mean what they mean, and what reads a case
TRAIN_ONLY = ("network_def", "preprocessing", "checkpoint_record", "initialize")
RANK0_HANDLERS = {"CheckpointSaver", "AtomicCheckpointSaver", "StatsHandler", "TensorBoardStatsHandler"}


def _load(path: Path, dup: list) -> dict:
    def hook(pairs):
        keys = [k for k, _ in pairs]
        dup.extend(k for k in set(keys) if keys.count(k) > 1)
        return dict(pairs)

    return json.loads(path.read_text(), object_pairs_hook=hook)


def _configs(bundle: str) -> tuple[dict, dict]:
    dup: list = []
    cfg = ROOT / "bundles" / bundle / "configs"
    train, infer = _load(cfg / "train.json", dup), _load(cfg / "inference.json", dup)
    assert not dup, f"{bundle}: ids defined twice in one file: {dup}"
    return train, infer


def test_all_bundles_found():
    assert {"resdce", "dcediff", "ressrdiff"} <= set(BUNDLES)


def leaves(node, prefix: str = "") -> list[tuple[str, str]]:
    """``(id, value as JSON)`` of every leaf of a config file (a scalar or a list); ``a#b`` keys are ids,
    ``+key`` merges into ``key``."""
    if isinstance(node, dict) and node:
        out = []
        for k, v in node.items():
            key = k[1:] if k.startswith("+") and not prefix else k
            out += leaves(v, f"{prefix}#{key}" if prefix else key)
        return out
    return [(prefix, json.dumps(node))]  # a list is one setting: an overlay replaces it whole


def repeated_settings(bundle: str) -> dict[tuple[str, str], list[str]]:
    """``(id, value)`` defined in more than one config file of ``bundle`` -> those files."""
    where: dict[tuple[str, str], list[str]] = {}
    for name in CONFIG_FILES:
        path = ROOT / "bundles" / bundle / "configs" / name
        if path.exists():
            for leaf in set(leaves(json.loads(path.read_text()))):
                where.setdefault(leaf, []).append(name)
    return {k: v for k, v in where.items() if len(v) > 1}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_each_setting_is_written_once(bundle):
    """No (id, value) in two config files of a bundle; train.json alone defines the shared blocks."""
    train, infer = _configs(bundle)
    twice = repeated_settings(bundle)
    assert not twice, f"{bundle}: defined in two config files: {sorted(twice.items())[:10]}"
    for key in TRAIN_ONLY:
        assert key in train and key not in infer, f"{bundle}: {key} belongs in train.json only"
    for name in CONFIG_FILES[1:]:
        path = ROOT / "bundles" / bundle / "configs" / name
        assert not (set(json.loads(path.read_text())) & {"imports", "bundle_root"}), f"{path}: use +imports"
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    for cfg, name in ((train, "train.json"), (p.get(), "inference.json")):
        assert not any(
            k.endswith("_scheduler")
            and k != "scheduler"
            and isinstance(cfg[k], dict)
            and cfg[k].get("_target_") == cfg.get("scheduler", {}).get("_target_")
            for k in cfg
        ), f"{bundle}/{name}: a second copy of the schedule"
    assert train["preprocessing"].get("_target_") == "Compose", f"{bundle}: preprocessing is not a Compose"
    assert p["postprocessing"].get("_target_") == "Compose", f"{bundle}: postprocessing is not a Compose"
    assert train["run"] == "@training" and infer["run"] == "@evaluating"


def test_a_repeated_setting_is_found(tmp_path):
    assert leaves({"a": {"b": [1, {"c": 2}], "g": None}, "+d": ["x"], "e#f": 3}) == [
        ("a#b", '[1, {"c": 2}]'),
        ("a#g", "null"),
        ("d", '["x"]'),
        ("e#f", "3"),
    ]
    (tmp_path / "bundles" / "b" / "configs").mkdir(parents=True)


def _build(bundle: str, file: str):
    p = ConfigParser()
    files = ["train.json", file] if file != "train.json" else [file]  # inference.json stacks on train.json
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in files])
    p["network_size"] = "small"
    p["device"] = "cpu"
    net = p.get_parsed_content("network_def")
    sched = p.get_parsed_content("scheduler") if "scheduler" in p else None
    return net, sched


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_and_inference_build_the_same_network_and_schedule(bundle):
    (net_t, s_t), (net_i, s_i) = _build(bundle, "train.json"), _build(bundle, "inference.json")
    assert type(net_t) is type(net_i)
    shapes_t = {k: tuple(v.shape) for k, v in net_t.state_dict().items()}
    shapes_i = {k: tuple(v.shape) for k, v in net_i.state_dict().items()}
    assert shapes_t == shapes_i
    if s_t is not None or s_i is not None:
        tables = [k for k, v in vars(s_t).items() if isinstance(v, torch.Tensor)]
        assert tables, f"{bundle}: the scheduler holds no tables"
        for k in tables:
            torch.testing.assert_close(getattr(s_t, k), getattr(s_i, k), rtol=0, atol=0, msg=f"{bundle}: scheduler.{k}")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multi_gpu_overrides_name_handlers_not_positions(bundle):
    path = ROOT / "bundles" / bundle / "configs" / "multi_gpu_train.json"
    if not path.exists():
        pytest.skip(f"{bundle} has no multi_gpu_train.json")
    text = path.read_text()
    assert not re.search(r"#\d+(#|\")", text), f"{path}: addresses a list entry by position"
    train, _ = _configs(bundle)
    assert "is_not_rank0" in train
    handlers = train["train"]["handlers"] + train["train"].get("state_handlers", [])
    savers = [h for h in handlers if isinstance(h, dict) and h.get("_target_", "").split(".")[-1] in RANK0_HANDLERS]
    assert savers and all(h.get("_disabled_") == "@is_not_rank0" for h in savers), f"{bundle}: rank-0 handlers"


def test_one_meaning_per_id_across_bundles():
    for bundle in BUNDLES:
        for file in ("train.json", "inference.json", "multi_gpu_train.json"):
            path = ROOT / "bundles" / bundle / "configs" / file
            if not path.exists():
                continue
            cfg = json.loads(path.read_text())
            if "sampler" in cfg:
                assert cfg["sampler"] in ("ddpm", "ddim"), f"{bundle}/{file}: 'sampler' is dcediff's ddpm|ddim string"
            assert "train#sampler" not in cfg and "validate#sampler" not in cfg, (
                f"{bundle}/{file}: use train#data_sampler"
            )


@pytest.mark.parametrize("bundle", BUNDLES)
def test_checkpoints_are_written_atomically(bundle):
    """MONAI's CheckpointSaver writes in place and removes the previous file first: every bundle
    uses common.handlers.AtomicCheckpointSaver instead (tests/test_checkpoints.py)."""
    text = (ROOT / "bundles" / bundle / "configs" / "train.json").read_text()
    assert '"CheckpointSaver"' not in text and "AtomicCheckpointSaver" in text


# --- blocks several bundles share: one source (common/bundle_blocks.json), copies generated and checked


def test_shared_blocks_are_copies_of_their_one_source():
    """Every block a bundle marks ``"_desc_": "shared:<name>"`` equals ``common/bundle_blocks.json``'s
    ``<name>``, every config file is in the layout ``scripts/sync_configs.py`` writes, and every shared
    block is used by at least two bundles (else it belongs in its bundle)."""
    from scripts.sync_configs import bundle_config_files, load_blocks, sync_config

    blocks = load_blocks()
    users: dict[str, set] = {name: set() for name in blocks}
    stale = []
    for path in bundle_config_files(ROOT):
        text, found = sync_config(path, blocks)
        for where, name, differs in found:
            users[name].add(path.parts[-3])
            if differs:
                stale.append(f"{path.relative_to(ROOT)} {where} ({name})")
        if not stale and text != path.read_text():
            stale.append(f"{path.relative_to(ROOT)}: layout (run python scripts/sync_configs.py)")
    assert not stale, (
        "edited copies of shared blocks (edit common/bundle_blocks.json, then run scripts/sync_configs.py): "
        + "; ".join(stale)
    )
    lonely = {n: sorted(u) for n, u in users.items() if len(u) < 2}
    assert not lonely, f"shared blocks used by fewer than two bundles: {lonely}"
    assert len(blocks) >= 20


def test_sync_fills_a_stub_and_names_an_unknown_block(tmp_path):
    from scripts.sync_configs import dumps, load_blocks, sync_config

    blocks = load_blocks()
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"x": 1, "train": {"state_handlers": [{"_desc_": "shared:resume_log"}]}}))
    text, found = sync_config(cfg, blocks)
    assert found == [("train#state_handlers#0", "resume_log", True)]
    filled = json.loads(text)["train"]["state_handlers"][0]
    assert filled == {"_target_": "common.handlers.ResumeLog", "path": "@resume_path", "_desc_": "shared:resume_log"}
    cfg.write_text(json.dumps({"train": {"trainer": {"_desc_": "shared:no_such_block"}}}))
    with pytest.raises(KeyError, match="train#trainer asks for shared block 'no_such_block'"):
        sync_config(cfg, blocks)
    # the layout: one line when it fits in 120 columns, one entry per line (4 spaces deeper) otherwise
    assert dumps({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert dumps({"k": "v" * 130}) == '{\n    "k": "' + "v" * 130 + '"\n}'


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_network_preset_travels_with_the_weights(bundle, tmp_path):
    """Every bundle saves its ``checkpoint_record`` in each checkpoint; inference takes
    ``network_size`` from the checkpoint (paper-sized GPU weights load on a CPU machine with the
    default config) and names any other recorded setting that differs, before loading."""
    from common.bundle import check_checkpoint

    train, infer = _configs(bundle)
    assert "checkpoint_record" in train and "checkpoint_record" not in infer, f"{bundle}: two checkpoint records"
    assert "recorded_setting(@ckpt_path, 'network_size'" in infer["network_size"]
    assert any("check_checkpoint(@ckpt_path, @checkpoint_record)" in s for s in infer["evaluating"])
    assert any("check_checkpoint(@resume_path, @checkpoint_record)" in s for s in train["train"]["steps"])
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    p["device"] = "cpu"
    record = p.get_parsed_content("checkpoint_record").state_dict()
    assert record["network_size"] == "small" and len(record) >= 3
    ckpt = tmp_path / "model.pt"
    torch.save({"model": {}, "config": dict(record, network_size="paper")}, ckpt)
    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    p.update({"device": "cpu", "ckpt_path": str(ckpt)})
    assert p.get_parsed_content("network_size") == "paper"
    assert check_checkpoint(ckpt, p.get_parsed_content("checkpoint_record")) == str(ckpt)
    other = next(k for k in record if k != "network_size")
    torch.save({"model": {}, "config": dict(record, network_size="paper", **{other: "something else"})}, ckpt)
    with pytest.raises(ValueError, match=rf"{other}: the checkpoint has 'something else'"):
        check_checkpoint(ckpt, p.get_parsed_content("checkpoint_record"))


LABEL_CROP_BUNDLES = [
    b for b in BUNDLES if '"crop_label_key"' in (ROOT / "bundles" / b / "configs" / "train.json").read_text()
]


@pytest.mark.parametrize("bundle", LABEL_CROP_BUNDLES)
def test_training_crops_can_centre_on_a_label(bundle):
    """``--crop_label_key lesion_mask --crop_pos 1 --crop_neg 0``: every training crop holds the label
    (centred on one of its voxels); without a label key the crops are uniform and mostly miss a
    one-voxel label. The bundles that train on patches share the blocks (``shared:label_crop_*``), so
    ``scripts/compare.py``'s budget can give every method the same crops."""
    from monai.transforms import Compose

    assert {"resdce", "dcediff", "pix2pix"} <= set(LABEL_CROP_BUNDLES)
    mask = torch.zeros(1, 64, 64, 4)
    mask[0, 40, 21, 2] = 1  # one lesion voxel
    crops = {}
    for key in ("lesion_mask", None):
        p = ConfigParser()
        p.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
        p.update({"crop_label_key": key, "crop_pos": 1.0, "crop_neg": 0.0, "patch_size": [16, 16]})
        p.update({"network_size": "small", "batch_size": 8, "slices_per_volume": 8, "device": "cpu"})
        t = Compose(p.get_parsed_content("train#transforms")).set_random_state(0)
        data = {"image": mask.repeat(2, 1, 1, 1), "label": mask.clone(), "id": "c", "lesion_mask": mask.clone()}
        crops[key] = t(data)
        assert len(crops[key]) == 8 and all(set(c) == {"image", "label", "id"} for c in crops[key])
    assert all(c["image"].sum() == 2 and c["label"].sum() == 1 for c in crops["lesion_mask"])
    assert sum(bool(c["image"].sum()) for c in crops[None]) <= 2  # a 16 x 16 x 1 crop holds it by chance
