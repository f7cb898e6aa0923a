"""The bundle contract (``configs/contract.json``, :func:`common.bundle.read_contract`): the scripts name no
bundle, every contract agrees with its bundle's configs, and a bundle copied under a new name trains,
synthesises DICOM, is served by the MONAI Label app, is compared and exports without any change to
``scripts/`` or ``common/``. Budget: about a minute on 2 cores (2 training iterations, 2 sampling steps)."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest

from common.bundle import bundle_config, find_bundles, read_contract, workflow_files

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = [p.name for p in find_bundles(ROOT / "bundles") if not p.name.endswith("_copy")]
#: scripts that must run any bundle from its contract, naming none
GENERIC = [
    ROOT / "scripts" / "synthesize.py",
    ROOT / "scripts" / "compare.py",
    ROOT / "scripts" / "export_bundle.py",
    ROOT / "scripts" / "reproduce.py",
    *sorted((ROOT / "scripts" / "monailabel_app").rglob("*.py")),
]


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every string constant of ``path`` that is not a docstring (help examples and
    documentation are docstrings or comments; what the code does is in the other strings)."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_scripts_name_no_bundle():
    assert len(BUNDLES) >= 5
    word = re.compile(rf"\b({'|'.join(map(re.escape, BUNDLES))})\b")
    found = [
        f"{p.relative_to(ROOT)}:{line}: {text!r}"
        for p in GENERIC
        for line, text in _code_strings(p)
        if word.search(text)
    ]
    assert not found, "\n".join(found)
    for p in GENERIC:  # and no bundle-name constants such as SUPPORTED = (...)
        assert not re.search(
            r"^(SUPPORTED|BRAIN_BUNDLES|BUNDLE_DEFAULTS|REFUSED|LABEL_OUTPUTS)\b", p.read_text(), re.M
        ), p


def test_no_sys_path_insert_in_generic_scripts():
    assert not [p for p in GENERIC if "sys.path.insert" in p.read_text()]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_contract_agrees_with_the_configs(bundle):
    c = read_contract(bundle)
    p = bundle_config(workflow_files(bundle, "infer"), {"device": "cpu"})
    assert c.name == bundle and c.source_id in p, c.source_id
    if "input_keys" in p:
        assert list(c.input_keys) == list(p.get_parsed_content("input_keys"))
    names = [o.key for o in c.outputs]
    assert len(set(names)) == len(names) and all(o.file.endswith(".nii.gz") for o in c.outputs)
    for key in ("target_keys", "target_key", "output_name"):  # what the config writes is declared
        if key in p:
            value = p.get_parsed_content(key)
            assert set([value] if isinstance(value, str) else value) <= set(names), (key, value, names)
    assert c.ingest in (None, "prostate", "brain", "breast") and (c.ingest or c.no_study)
    assert p.get_parsed_content("bundle_root") == str(ROOT / "bundles" / bundle)  # from the config's location


def test_contract_errors_name_the_file(tmp_path):
    b = tmp_path / "b"
    (b / "configs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="contract.json: the bundle declares no contract"):
        read_contract(b)
    (b / "configs" / "contract.json").write_text(
        json.dumps({"source_id": "case_dir", "input_keys": [], "outputs": [{}]})
    )
    with pytest.raises(ValueError, match=r"contract.json: outputs\[0\].key must be a str"):
        read_contract(b)
    (b / "configs" / "contract.json").write_text(json.dumps({"ingest": "knee", "outputs": []}))
    with pytest.raises(ValueError, match="ingest must be one of"):
        read_contract(b)


# ------------------------------------------------------------------------------ a bundle copied under a new name

COPY = "resdce_copy"
GRID = {"grid_shape": (48, 48, 6), "grid_spacing": (3.2, 3.2, 3.6), "t2w_shape": (96, 96, 6)}
GRID.update(t2w_spacing=(1.6, 1.6, 3.6), prepared_slices=4, n_dce=12, dce_duration_s=160.0)


@pytest.fixture(scope="module")
def copied():
    """``bundles/resdce`` copied to ``bundles/resdce_copy`` (its metadata renamed), removed afterwards."""
    dst = ROOT / "bundles" / COPY
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(ROOT / "bundles" / "resdce", dst, ignore=shutil.ignore_patterns("models", "outputs", "eval"))
    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["name"] = "ResDCE-diff copy"
    meta_path.write_text(json.dumps(meta, indent=4))
    try:
        yield dst
    finally:
        shutil.rmtree(dst, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return h.tiny_prostate_one_train(tmp_path_factory.mktemp("copy_phantoms"))


@pytest.fixture(scope="module")
def trained(copied, data, tmp_path_factory) -> Path:
    """2 iterations with the card's command on the copy's train.json (its outputs go where asked)."""
    models = tmp_path_factory.mktemp("copy_models")
    h.train(
        copied / "configs",
        models,
        "--dataset_dir", str(data), "--batch_size", "2", "--patch_size", "[32,32]", "--network_size", "small",
        "--num_workers", "0", "--val_interval", "0", "--resume", "false", "--device", "cpu",
    )  # fmt: skip
    assert (models / "model.pt").is_file()
    return models / "model.pt"


@pytest.mark.slow
def test_copied_bundle_runs_everywhere(copied, data, trained, tmp_path):
    from common.phantoms.dicom import write_prostate_study
    from common.phantoms.prostate import make_prostate_phantom
    from scripts import compare as C
    from scripts.export_bundle import export
    from scripts.synthesize import synthesize

    assert COPY in [p.name for p in find_bundles()]
    # DICOM out through synthesize.py: the copy's contract gives the ingest and the outputs
    study = Path(write_prostate_study(make_prostate_phantom(0, **GRID), tmp_path / "src", "P000"))
    summary = synthesize(
        study, COPY, tmp_path / "synth", ingest={"crop_size": "40,40,4"}, ckpt_path=str(trained),
        num_inference_steps=2, device="cpu",
    )  # fmt: skip
    assert [s["key"] for s in summary["series"]] == ["dce_onset", "dce_early", "dce_late"]
    assert summary["method"] == "ResDCE-diff copy" and all(s["n_files"] == 4 for s in summary["series"])
    assert Path(summary["series"][0]["folder"]).parents[2] == tmp_path / "synth" / COPY
    # compare.py: the copy in the table, scored on the held-out cases
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"seed": 0, "methods": {COPY: {"num_inference_steps": 2}}}))
    res = C.main(
        dataset_dir=str(data), out=str(tmp_path / "cmp"), budget=str(budget), ckpt=f"{COPY}={trained}", device="cpu"
    )
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert COPY in table and res is not None
    # export: a standalone Model Zoo bundle
    out = export(COPY, tmp_path / "dist", weights=trained)
    cfg = json.loads((out / "configs" / "inference.json").read_text())
    assert cfg["run"] == "@evaluating" and (out / "models" / "model.pt").is_file()
    # the MONAI Label app's infer task on one series of a prepared case
    BundleSynthesisTask = h.monailabel_task_class()
    task = BundleSynthesisTask(COPY, {"ckpt_path": str(trained), "num_inference_steps": 2, "device": "cpu"})
    case = data / h.held_out(data)[0]["id"]
    path, params = task({"image": str(case / "t2w.nii.gz"), "device": "cpu"})
    img = nib.load(path)
    ref = nib.load(case / "dce_pre.nii.gz")
    assert params["channels"] == ["dce_onset", "dce_early", "dce_late"] and task.label_outputs == []
    assert img.shape == (*ref.shape[:3], 3) and np.allclose(img.affine, ref.affine)


def test_variant_is_an_independent_copy_with_settings_changed():
    from types import SimpleNamespace

    from common.bundle import variant

    inner = SimpleNamespace(timesteps=[1, 2])
    obj = SimpleNamespace(num_inference_steps=15, progress=True, sampler=inner)
    v = variant(obj, num_inference_steps=2, progress=False)
    assert (v.num_inference_steps, v.progress, obj.num_inference_steps, obj.progress) == (2, False, 15, True)
    assert v.sampler is not inner and v.sampler.timesteps == [1, 2]
    with pytest.raises(AttributeError, match="SimpleNamespace has no setting steps"):
        variant(obj, steps=3)


def test_run_bundle_takes_bundle_root_from_the_config_location(tmp_path):
    from common.bundle import run_bundle

    b = tmp_path / "anywhere" / "mybundle"
    (b / "configs").mkdir(parents=True)
    (b / "configs" / "x.json").write_text(
        json.dumps(
            {"imports": ["$import common"], "bundle_root": "$common.bundle.bundle_root()", "run": ["$@bundle_root"]}
        )
    )
    run = run_bundle([b / "configs" / "x.json"], {"output_dir": str(tmp_path)})
    assert run.parser.get_parsed_content("run") == [str(b)] and run.seconds >= 0
    assert run_bundle([b / "configs" / "x.json"], {"bundle_root": "/elsewhere"}).parser["bundle_root"] == "/elsewhere"


def test_case_manifest_names_the_grid_series(tmp_path):
    """:class:`common.layout.CaseManifest`: the series of the case's grid for a prostate (DCE pre frame)
    and a brain (T1 role) manifest, the study's SeriesNumbers, and one line for a manifest without a grid."""
    from common.layout import CaseManifest

    dce = {
        "source": "/studies/P1",
        "reference": {"role": "dce"},
        "dce": {
            "series": [{"folder": "a#1", "series_number": 7}, {"folder": "b", "series_number": 8}],
            "phases": {"pre": {"index": 1}},
        },
        "series": [{"folder": "b", "series_number": 8, "series_uid": "1.2.3"}, {"series_number": 3}, {"x": 1}],
    }
    m = CaseManifest.from_dict(dce)
    assert (m.grid_folder, m.grid_series_uid, m.series_numbers) == (Path("/studies/P1/b"), "1.2.3", (8, 3))
    brain = {"source": "/s", "reference": {"role": "t1"}, "roles": {"t1": {"folder": "2-t1#x", "series_uid": "9"}}}
    assert (CaseManifest.from_dict(brain).grid_series, CaseManifest.from_dict(brain).series_numbers) == ("2-t1", ())
    (tmp_path / "manifest.json").write_text('{"truth": {}}')
    with pytest.raises(ValueError, match=r"manifest.json: not the manifest of a DICOM ingest"):
        CaseManifest.read(tmp_path)
