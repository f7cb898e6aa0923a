"""Model Zoo readiness (issue 14), for every bundle:

- ``configs/metadata.json`` validates against the zoo's schema, has a changelog line for its
  version, lists the third-party packages its code imports, and its ``network_data_format`` is the
  network's real input and output: MONAI's ``verify_net_in_out`` (the zoo's ``ci/verify_bundle.py``
  check) runs the network with the declared channels and the extra forward arguments the metadata
  declares (the timestep, D3M's alpha_bar, iterU-Net's target time);
- the zoo's unit-test pattern (``ConfigWorkflow(...)``, ``initialize()``, ``check_properties()``
  with nothing missing, ``run()``, ``finalize()``) trains and infers on tiny phantoms, and every
  file ``post_processed_outputs`` declares is written with the declared channels on the input's grid;
- ``scripts/export_bundle.py`` writes a bundle that passes the zoo's file, metadata and version
  checks and trains and infers from its own folder in a Python that cannot import this
  repository's ``common`` (``-S``: no ``.pth`` file runs, so the editable install's finder is
  absent; ``PYTHONPATH`` is the exported folder and site-packages alone; asserted in that process).

This module imports nothing of ``common`` at import time: the exported bundle's process imports it
for the same checks (one source for them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
BUNDLES = ["resdce", "dcediff", "ressrdiff", "iterunet", "d3m", "pix2pix"]
#: the phantom folder each bundle reads, and the input whose grid its outputs carry
DATA = {
    "resdce": ("prostate/prepared", "{case}/dce_pre.nii.gz"),
    "dcediff": ("prostate/prepared", "{case}/t1_pre.nii.gz"),
    "ressrdiff": ("prostate/nifti", "{case}/t2w.nii.gz"),
    "iterunet": ("breast", "{case}/pre.nii.gz"),
    "d3m": ("brain", "{case}/{case}-t1n.nii.gz"),
    "pix2pix": ("prostate/prepared", "{case}/dce_pre.nii.gz"),  # its default task, prostate_dce
}
TINY = {"network_size": "small", "num_workers": 0}
TRAIN = {
    "resdce": {"patch_size": [32, 32], "batch_size": 4},
    "dcediff": {"patch_size": [32, 32], "batch_size": 4},
    "ressrdiff": {"patch_size": [32, 32], "batch_size": 4, "warmup_iterations": 1},
    "iterunet": {},
    "d3m": {"spatial_size": [64, 64], "batch_size": 4, "slices_per_volume": 2},
    "pix2pix": {"patch_size": [32, 32], "batch_size": 4},
}
INFER = {"dcediff": {"sampler": "ddim"}}
#: the zoo's required files (ci/verify_bundle.py: necessary and preferred)
REQUIRED_FILES = ["configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md"]


def export_module():
    """``scripts/export_bundle.py`` loaded by path (this repository's root is not put on sys.path)."""
    spec = importlib.util.spec_from_file_location("export_bundle", ROOT / "scripts" / "export_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size(dim, n: int = 2, any_: int = 16) -> int:
    """A concrete size for a metadata dimension: ``8``, ``"8*n"`` (with n), ``"*"`` or ``"B"`` (batch 1)."""
    if isinstance(dim, int):
        return dim
    if dim == "B":
        return 1
    if dim == "*":
        return any_
    return int(eval(dim, {}, {"n": n}))  # "8*n", "2**p" style expressions of the zoo's spec


def forward_args(inputs: dict) -> dict:
    """The network's forward arguments other than ``image``, as the metadata declares them: the
    mid-range value (or 1) in the declared dtype and shape."""
    import torch

    args = {}
    for name, spec in inputs.items():
        if name == "image":
            continue
        dims = spec["spatial_shape"]
        shape = (1,) if dims == ["B"] else (1, spec["num_channels"], *(_size(d) for d in dims))
        lo_hi = spec.get("value_range") or [1, 1]
        args[name] = torch.full(shape, (lo_hi[0] + lo_hi[-1]) / 2, dtype=getattr(torch, spec["dtype"]))
    return args


def infer_files(configs: Path) -> list[str]:
    """The inference config files of a bundle: this repository's ``inference.json`` is an overlay stacked
    on ``train.json``; an exported bundle's is standalone (flattened), read alone as the Model Zoo reads it."""
    names = ["train.json", "inference.json"] if configs.is_relative_to(ROOT / "bundles") else ["inference.json"]
    return [str(configs / n) for n in names]


def check_network(configs: Path, overrides: dict | None = None) -> dict:
    """The network of ``inference.json`` run on the input ``metadata.json`` declares: the output must
    have the declared channels, dtype and the input's spatial size; then MONAI's own
    ``verify_net_in_out`` (for a network returning ``(pred, state)``, the same check on ``pred``).
    Returns ``{"input": shape, "output": shape, "extra": names}``."""
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out

    fmt = json.loads((configs / "metadata.json").read_text())["network_data_format"]
    overrides = {**TINY, "ckpt_path": "", **(overrides or {})}
    overrides.pop("num_workers")
    parser = ConfigParser()
    parser.read_config(infer_files(configs))
    parser.update(overrides)
    net = parser.get_parsed_content("network_def").eval()
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    x = torch.rand(1, image["num_channels"], *(_size(d) for d in image["spatial_shape"]))
    extra = forward_args(fmt["inputs"])
    with torch.no_grad():
        out = net(x, **extra)
    returns_state = isinstance(out, tuple)
    y = out[0] if returns_state else out
    assert tuple(y.shape) == (1, pred["num_channels"], *x.shape[2:]), (configs, tuple(y.shape))
    assert y.dtype == getattr(torch, pred["dtype"])
    if not returns_state:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(configs / "metadata.json"),
            config_file=infer_files(configs),
            device="cpu",
            n=2,
            extra_forward_args=extra,
            **overrides,
        )
    return {"input": list(x.shape), "output": list(y.shape), "extra": sorted(extra)}


def run_workflows(configs: Path, dataset_dir: Path, out: Path, bundle: str, ckpt_path: Path | None = None) -> dict:
    """The zoo's unit-test pattern: ConfigWorkflow train, then infer with the trained weights (or the
    bundle's own ``models/model.pt`` when ``ckpt_path`` is None). Returns what check_properties
    said for each and where the outputs lie."""
    from monai.bundle import ConfigWorkflow

    result = {}
    files = {"logging_file": str(configs / "logging.conf"), "meta_file": str(configs / "metadata.json")}
    train = {**TINY, **TRAIN[bundle], "num_iterations": 2, "epoch_length": 1, "val_interval": 0}
    infer = {"network_size": "small", "num_inference_steps": 2, "progress": False, **INFER.get(bundle, {})}
    if ckpt_path is not None:
        infer["ckpt_path"] = str(ckpt_path)
    for kind, file, extra, output_dir in (
        ("train", "train.json", train, out / "models"),
        ("infer", "inference.json", infer, out / "eval"),
    ):
        wf = ConfigWorkflow(
            config_file=str(configs / file) if file == "train.json" else infer_files(configs),
            workflow_type=kind,
            dataset_dir=str(dataset_dir),
            output_dir=str(output_dir),
            **files,
            **extra,
        )
        wf.initialize()
        result[kind] = wf.check_properties()
        wf.run()
        wf.finalize()
    result["model"] = str(out / "models" / "model.pt")
    result["eval"] = str(out / "eval")
    return result


def check_outputs(meta: dict, eval_dir: Path, dataset_dir: Path, reference: str) -> list[str]:
    """Every file ``post_processed_outputs`` names (``<output_dir>/<case>/<file>`` in its description)
    exists for every case, on the grid of the case's ``reference`` input, with the declared channels
    (a 4th axis when more than one) and dtype. Returns the file names."""
    import nibabel as nib
    import numpy as np

    post = meta["network_data_format"]["post_processed_outputs"]
    names = {}
    for key, spec in post.items():
        m = re.search(r"<output_dir>/<case>/(\S+?\.nii\.gz)", spec.get("description", ""))
        assert m, f"post_processed_outputs#{key} does not name its file (<output_dir>/<case>/...)"
        names[m.group(1)] = spec
    cases = sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
    assert cases, f"no case folder in {eval_dir}"
    for case in cases:
        ref = nib.load(dataset_dir / reference.format(case=case))
        for name, spec in names.items():
            img = nib.load(eval_dir / case / name)
            channels = img.shape[3] if img.ndim == 4 else 1
            assert img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine), (case, name)
            assert channels == spec["num_channels"], (case, name, img.shape)
            assert img.get_data_dtype() == np.dtype(spec["dtype"]), (case, name, img.get_data_dtype())
    return sorted(names)


def zoo_checks(bundle_dir: Path, weights: bool = True) -> dict:
    """ci/verify_bundle.py's checks that need no download: required files (the weights or
    ``large_files.yml`` where ``weights``: a bundle of this repository ships none), version in the
    changelog, metadata against the schema (when ../shared is present). Returns the metadata."""
    missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    assert not missing, f"{bundle_dir}: missing {missing}"
    if weights:
        assert (bundle_dir / "models" / "model.pt").is_file() or (bundle_dir / "large_files.yml").is_file()
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], f"version {meta['version']} has no changelog line"
    if SCHEMA.exists():
        import jsonschema

        jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    return meta


def exported_main(args_file: str) -> None:
    """Run inside the exported bundle's folder (cwd), in the isolated Python: the checks above on
    the exported copy; writes their results as JSON."""
    args = json.loads(Path(args_file).read_text())
    bundle_dir = Path.cwd()
    found = importlib.util.find_spec("common")
    result = {"common": None if found is None else str(found.origin)}
    import scripts.common

    result["vendored"] = scripts.common.__file__
    result["network"] = check_network(bundle_dir / "configs")
    result.update(run_workflows(bundle_dir / "configs", Path(args["dataset_dir"]), Path(args["out"]), args["bundle"]))
    Path(args["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from common.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("zoo_phantoms")
    # the native T2w (ressrdiff's HR volume) on a 64 x 64 grid, as tests/test_bundle_ressrdiff.py
    write_phantoms(
        out,
        kinds=("prostate",),
        n_prostate=3,
        dicom=False,
        small=True,
        progress=False,
        prostate_t2w_shape=(64, 64, 18),
        prostate_t2w_spacing=(4.0, 4.6, 3.6),
    )
    write_phantoms(out, kinds=("brain",), n_brain=3, small=True, progress=False)
    write_phantoms(out, kinds=("breast",), n_breast=3, small=True, progress=False)
    return out


def isolated_env(bundle_dir: Path) -> dict:
    """Environment of a Python that sees the exported folder and site-packages only (with ``-S``: no
    ``.pth`` file runs, so this repository's editable install is not on the path)."""
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(bundle_dir), *site_packages]), OMP_NUM_THREADS="1")


def start_exported_run(bundle: str, model: Path, dataset_dir: Path, tmp: Path) -> dict:
    """Export ``bundle`` with ``model`` and start :func:`exported_main` in the isolated Python, in
    the background (it overlaps the next bundle's in-process run on a 2-core machine)."""
    out = export_module().export(bundle, tmp / bundle, weights=model)
    result_file, log = tmp / "result.json", tmp / "exported_run.log"
    args = tmp / "args.json"
    args.write_text(
        json.dumps(
            {"bundle": bundle, "dataset_dir": str(dataset_dir), "out": str(tmp / "run"), "result": str(result_file)}
        )
    )
    code = (
        f"import sys; sys.path.append({str(Path(__file__).parent)!r}); import test_zoo; "
        f"test_zoo.exported_main({str(args)!r})"
    )
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", code], cwd=out, env=isolated_env(out), stdout=f, stderr=subprocess.STDOUT
        )
    return {"out": out, "proc": proc, "result": result_file, "log": log}


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    """bundle -> run_workflows result on this repository's bundle (run once, on first use), with
    ``"exported"``: the exported bundle's isolated run, started as soon as the weights exist."""
    done: dict = {}

    def get(bundle: str) -> dict:
        if bundle not in done:
            out = tmp_path_factory.mktemp(f"zoo_{bundle}")
            configs = ROOT / "bundles" / bundle / "configs"
            dataset_dir = phantoms / DATA[bundle][0]
            done[bundle] = run_workflows(configs, dataset_dir, out, bundle, out / "models" / "model.pt")
            exported = tmp_path_factory.mktemp(f"zoo_export_{bundle}")
            done[bundle]["exported"] = start_exported_run(bundle, Path(done[bundle]["model"]), dataset_dir, exported)
        return done[bundle]

    yield get
    for result in done.values():  # a run whose test was deselected or failed early
        if result["exported"]["proc"].poll() is None:
            result["exported"]["proc"].kill()
            result["exported"]["proc"].wait()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_is_the_zoo_format_and_lists_the_packages_the_code_imports(bundle):
    import torch
    from monai.bundle import ConfigParser

    export = export_module()
    # test_contract's bundles/resdce_copy may exist meanwhile (another xdist worker): it is a user's own bundle
    assert [n for n in export.bundle_names() if not n.endswith("_copy")] == sorted(BUNDLES)
    meta = zoo_checks(ROOT / "bundles" / bundle, weights=False)
    required = export.required_packages(bundle)
    assert sorted(meta["required_packages_version"], key=str.lower) == list(required)
    assert {"nibabel", "pytorch-ignite", "scipy", "SimpleITK", "tqdm"} <= set(required)
    assert all(re.fullmatch(r"\d+(\.\d+)+\S*", v) for v in meta["required_packages_version"].values())
    fmt = meta["network_data_format"]
    parser = ConfigParser()
    parser.read_config(infer_files(ROOT / "bundles" / bundle / "configs"))
    parser["network_size"] = "small"
    assert fmt["inputs"]["image"]["num_channels"] == parser.get_parsed_content("network_def#in_channels")
    assert fmt["inputs"]["image"]["dtype"] == "float32" and "post_processed_outputs" in fmt
    # every diffusion network is told its step, iterU-Net its target time; Pix2Pix's generator takes the image alone
    assert set(fmt["inputs"]) - {"image"} == set(EXPECTED_IO[bundle][2])
    assert torch.__version__.startswith(meta["pytorch_version"].split("+")[0])


EXPECTED_IO = {  # (input channels, output channels, extra forward arguments)
    "resdce": (6, 3, ["timesteps"]),
    "dcediff": (6, 2, ["timesteps"]),
    "ressrdiff": (2, 1, ["timesteps"]),
    "iterunet": (2, 1, ["time"]),
    "d3m": (5, 4, ["alpha_bar", "timesteps"]),
    "pix2pix": (3, 3, []),
}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_matches_network_data_format(bundle):
    got = check_network(ROOT / "bundles" / bundle / "configs")
    cin, cout, extra = EXPECTED_IO[bundle]
    assert got["input"][1] == cin and got["output"][1] == cout and got["extra"] == extra


@pytest.mark.parametrize("bundle", BUNDLES)
def test_config_workflow_train_and_infer(bundle, trained, phantoms):
    result = trained(bundle)
    assert result["train"] == [] and result["infer"] == []
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    dataset_dir, reference = phantoms / DATA[bundle][0], DATA[bundle][1]
    assert check_outputs(meta, Path(result["eval"]), dataset_dir, reference)


def test_export_refuses_what_it_cannot_do(tmp_path):
    export = export_module()
    with pytest.raises(SystemExit, match="unknown bundle 'nosuch'.*resdce"):
        export.main(["nosuch", "--out", str(tmp_path / "a"), "--weights", "x.pt"])
    with pytest.raises(SystemExit, match=f"--weights {re.escape(str(tmp_path / 'none.pt'))}: no such file"):
        export.main(["resdce", "--out", str(tmp_path / "a"), "--weights", str(tmp_path / "none.pt")])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt: not a readable checkpoint"):
        export.main(["resdce", "--out", str(tmp_path / "a"), "--weights", str(tmp_path / "bad.pt")])
    with pytest.raises(SystemExit, match="--weights PATH .* or --weights_url"):
        export.main(["resdce", "--out", str(tmp_path / "a")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit, match="full: exists and is not an empty folder"):
        export.main(["resdce", "--out", str(tmp_path / "full"), "--weights_url", "https://example.org/m.pt"])
    assert not (tmp_path / "a").exists()


def test_export_with_a_weights_url_writes_large_files(tmp_path, trained):
    import hashlib

    export = export_module()
    model = Path(trained("resdce")["model"])
    out = export.export("resdce", tmp_path / "url", weights=model, weights_url="https://example.org/resdce.pt")
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    assert (out / "large_files.yml").read_text() == (
        'large_files:\n  - path: "models/model.pt"\n    url: "https://example.org/resdce.pt"\n'
        f'    hash_val: "{md5}"\n    hash_type: "md5"\n'
    )
    assert not (out / "models").exists()  # the URL is where models/model.pt comes from
    zoo_checks(out)
    out = export.export("resdce", tmp_path / "hash", weights_url="https://example.org/r.pt", weights_hash="ab12")
    assert 'hash_val: "ab12"\n    hash_type: "md5"' in (out / "large_files.yml").read_text()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_exported_bundle_runs_without_this_repository(bundle, trained, phantoms):
    export = export_module()
    model = Path(trained(bundle)["model"])
    run = trained(bundle)["exported"]
    out = run["out"]
    # the zoo's layout and checks; the vendored code is exactly what the import walk found
    meta = zoo_checks(out)
    assert (out / "models" / "model.pt").read_bytes() == model.read_bytes()
    modules, _ = export.walk(bundle)
    vendored = sorted(
        ".".join(p.relative_to(out / "scripts").with_suffix("").parts).removesuffix(".__init__")
        for p in (out / "scripts").rglob("*.py")
        if p != out / "scripts" / "__init__.py"
    )
    assert vendored == modules and "common.bundle" in modules and "common.phantoms" not in modules
    for path in (out / "scripts").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) common\b", path.read_text(), re.M), path
    for path in (out / "configs").glob("*.json"):
        code = "\n".join(export.code_strings(json.loads(path.read_text())))
        assert not re.search(r"(?<![\w.])common\b", code.replace("scripts.common", "")), path
    # that Python cannot import this repository's package
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import common"], cwd=out, env=isolated_env(out), capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'common'" in probe.stderr
    # the exported bundle trained and inferred (with its own models/model.pt) from its own folder there
    assert run["proc"].wait(timeout=600) == 0, run["log"].read_text()[-8000:]
    result = json.loads(run["result"].read_text())
    assert result["common"] is None
    assert Path(result["vendored"]) == out / "scripts" / "common" / "__init__.py"
    assert result["train"] == [] and result["infer"] == []
    cin, cout, extra = EXPECTED_IO[bundle]
    assert result["network"]["input"][1] == cin and result["network"]["output"][1] == cout
    assert result["network"]["extra"] == extra
    assert Path(result["model"]).is_file()  # trained in the exported copy, into its own output folder
    assert check_outputs(meta, Path(result["eval"]), phantoms / DATA[bundle][0], DATA[bundle][1])


def test_exported_bundle_runs_from_any_working_directory(tmp_path):
    """``python -m monai.bundle run`` of an exported bundle from another folder (the bundle not on PYTHONPATH):
    the vendored ``scripts.common`` is found (MONAI puts the bundle folder on sys.path when the workflow runs;
    the export has no ``initialize`` that would import it earlier) and the run goes as far as from inside the
    folder: here to the bundle's own one-line error for its missing weights, naming its models/model.pt."""
    out = export_module().export("ressrdiff", tmp_path / "ressrdiff", weights_url="https://example.org/sr.pt")
    config = json.loads((out / "configs" / "inference.json").read_text())
    assert "initialize" not in config and config["evaluating"][0] == "$scripts.common.errors.install()"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site_packages), OMP_NUM_THREADS="1")
    env.pop("GADOFREE_DEBUG", None)
    volume = tmp_path / "t2w.nii.gz"
    volume.write_bytes(b"")
    lines = {}
    for cwd in (elsewhere, out):
        cmd = [sys.executable, "-S", "-m", "monai.bundle", "run", "evaluating"]
        cmd += ["--config_file", str(out / "configs" / "inference.json"), "--input_file", str(volume)]
        cmd += ["--output_dir", str(tmp_path / "sr_out")]
        run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1, run.stderr[-3000:]
        assert "No module named 'scripts'" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
        lines[cwd] = [x for x in run.stderr.splitlines() if x.startswith("error:")]
    assert lines[elsewhere] == lines[out] and len(lines[out]) == 1
    assert f"no trained weights at {out / 'models' / 'model.pt'}" in lines[out][0]
    assert volume.read_bytes() == b""
