"""Export one bundle of this repository as a self-contained MONAI Model Zoo bundle.

Usage::

    python scripts/export_bundle.py resdce --out dist/resdce --weights models/model.pt
    python scripts/export_bundle.py resdce --out dist/resdce --weights_url https://.../model.pt \\
        [--weights models/model.pt | --weights_hash HEX [--hash_type md5]]

The exported folder is what the Model Zoo expects: ``configs/`` (every config of the bundle, its
``common`` references rewritten to the vendored package ``scripts.common``), ``docs/``, ``LICENSE``,
``scripts/common/...`` (only the modules of ``common/`` the configs reach, found by walking their
imports, copied verbatim with the ``from common...`` imports rewritten; generated at export time,
never edited by hand) and ``models/model.pt`` (``--weights``) or ``large_files.yml``
(``--weights_url``; the md5 of ``--weights`` when both are given, or ``--weights_hash``). With both,
the weights are not copied: the URL is where that file will be downloaded from.

``python -m monai.bundle run`` puts the bundle folder (the parent of the configs' folder) on ``sys.path``
when the workflow runs (``ConfigWorkflow.run``), after ``initialize``, and MONAI evaluates a config's
``$import`` statements at its first resolved expression; so an exported config has no ``initialize``
(:func:`defer_initialize`: its expressions open the run lists ``training`` / ``evaluating``) and
``$import scripts.common`` finds the vendored copy from any working directory. ``bundle_root`` is the
folder holding that ``scripts`` package, wherever the bundle lies.

The docs' Markdown files are rewritten for the exported folder (:func:`rewrite_docs`): the bundle's own
paths (``bundles/<b>/configs/...``) become relative to it, ``.venv/bin/python`` becomes ``python``, the
vendored code is named ``scripts/common/...`` / ``scripts.common...``, and what lives only in this
repository (``scripts/make_phantoms.py``, ``data/...``, ``tests/...``, ``make demo``, other bundles)
is prefixed with ``$REPO/`` (``make -C $REPO``), explained by a note under the title.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

from common.bundle import WORKFLOW_FILES, find_bundles
from common.bundle import bundle_dir as _bundle_dir

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
PACKAGE = "common"
#: the vendored package: ``<bundle>/scripts/common`` (the zoo's bundles import ``scripts.xxx``)
VENDORED = f"scripts.{PACKAGE}"
#: what ``bundle_root`` becomes in an exported bundle: the folder of its own ``scripts`` package
EXPORTED_BUNDLE_ROOT = "$os.path.dirname(os.path.dirname(os.path.abspath(scripts.__file__)))"
#: where the export puts the weights (the zoo's name), and the inference default that points there
WEIGHTS = "models/model.pt"
EXPORTED_CKPT_PATH = "$os.path.join(@bundle_root, 'models', 'model.pt')"
#: base requirements of a bundle (``monai_version`` / ``pytorch_version`` / ``numpy_version``)
BASE_PACKAGES = {"monai", "torch", "numpy"}
#: third-party packages that MONAI components named in the configs import lazily
COMPONENT_PACKAGES = {
    "NibabelReader": "nibabel",
    "TensorBoardStatsHandler": "tensorboard",
    "SupervisedTrainer": "pytorch-ignite",
    "SupervisedEvaluator": "pytorch-ignite",
}
#: ``python -m monai.bundle run`` (the command every bundle's card gives) needs fire
CLI_PACKAGES = {"fire"}
_REF = re.compile(rf"(?<![\w.]){PACKAGE}(?:\.\w+)*")
_FROM_IMPORT = re.compile(rf"^(\s*)from {PACKAGE}(\.|\s)", re.M)


def bundle_names() -> list[str]:
    return [p.name for p in find_bundles(BUNDLES)]


def bundle_dir(name: str) -> Path:
    """A bundle folder of ``bundles/`` by name, or any bundle folder by path."""
    try:
        return _bundle_dir(name)
    except FileNotFoundError as e:
        raise SystemExit(f"unknown bundle {name!r}: {e}") from None


def flatten(files: list[Path]) -> dict:
    """One standalone config of stacked config ``files`` (later files override earlier ones, ``+`` keys
    append, ``a#b`` keys set nested values: as ``monai.bundle`` stacks them), for tools that read one file."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(f) for f in files])


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _config_files(bundle: Path) -> list[Path]:
    return sorted((bundle / "configs").glob("*.json"))


def _is_code(key, value: str) -> bool:
    """Config strings that name Python code: expressions (``$...``) and ``_target_`` values."""
    return value.startswith("$") or key == "_target_"


def code_strings(node, key=None):
    if isinstance(node, str):
        if _is_code(key, node):
            yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from code_strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from code_strings(v, key)


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _longest_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:n])):
            return ".".join(parts[:n])
    return None


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules of ``common`` imported by ``module``, top-level names of the other imports)."""
    path = _module_file(module)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    ours, others = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
            candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module.split(".")[0] != PACKAGE:
                candidates = [node.module]
        else:
            continue
        for name in candidates:
            if name.split(".")[0] != PACKAGE:
                others.add(name.split(".")[0])
            elif _module_file(name):
                ours.add(name)
    return ours, others


def walk(bundle: str | Path) -> tuple[list[str], set[str]]:
    """The modules of ``common`` a bundle's configs reach (with their parent packages), sorted, and
    the top-level names of everything else those modules and the configs import."""
    bundle = Path(bundle) if isinstance(bundle, Path) else bundle_dir(bundle)
    todo, others = set(), set()
    for cfg in _config_files(bundle):
        for s in code_strings(json.loads(cfg.read_text())):
            for ref in _REF.findall(s):
                mod = _longest_module(ref)
                if mod is None:
                    raise SystemExit(f"{cfg}: {ref!r} names no module of {ROOT / PACKAGE}")
                todo.add(mod)
            for m in re.finditer(r"^\$\s*(?:import|from)\s+(\w+)", s):
                if m.group(1) != PACKAGE:
                    others.add(m.group(1))
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo.update(".".join(parts[:n]) for n in range(1, len(parts)))
        ours, theirs = _imports(mod)
        todo.update(ours - seen)
        others |= theirs
    return sorted(seen), others


def required_packages(bundle: str | Path) -> dict[str, str]:
    """Distribution name -> installed version of every third-party package the bundle needs (the
    imports of the configs and of the ``common`` modules they reach, the packages of the MONAI
    components the configs name, and fire for the command line), MONAI / torch / numpy excepted."""
    bundle = Path(bundle) if isinstance(bundle, Path) else bundle_dir(bundle)
    _, tops = walk(bundle)
    dists = importlib.metadata.packages_distributions()
    names = set(CLI_PACKAGES)
    for top in tops - set(sys.stdlib_module_names) - {"__future__"}:
        if top not in dists:
            raise SystemExit(f"{bundle}: the code imports {top!r}, which is not installed in {sys.prefix}")
        # the import name where it is the distribution's (SimpleITK, not simpleitk)
        names.update(top if d.lower() == top.lower() else d for d in dists[top])
    text = "\n".join(p.read_text() for p in _config_files(bundle))
    names.update(pkg for comp, pkg in COMPONENT_PACKAGES.items() if f'"{comp}"' in text)
    names -= BASE_PACKAGES
    return {n: importlib.metadata.version(n) for n in sorted(names, key=str.lower)}


def rewrite_config(node, key=None):
    """A config with every reference to ``common`` in its code strings pointing at ``scripts.common``
    and ``bundle_root`` set to the folder of that vendored package."""
    if isinstance(node, dict):
        return {
            k: EXPORTED_BUNDLE_ROOT if k == "bundle_root" and key is None else rewrite_config(v, k)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [rewrite_config(v, key) for v in node]
    if isinstance(node, str) and _is_code(key, node):
        if re.fullmatch(rf"\$\s*import\s+{PACKAGE}\s*", node):  # MONAI binds the name an import names
            return "$import scripts"
        return _REF.sub(lambda m: f"scripts.{m.group(0)}", node)
    return node


#: the workflow lists ``monai.bundle run`` runs after putting the bundle folder on ``sys.path``
RUN_LISTS = ("training", "evaluating")


def defer_initialize(config: dict, initialize: list[str]) -> dict:
    """``config`` without ``initialize`` and with ``initialize`` (the train config's, rewritten) at the start of
    each of its :data:`RUN_LISTS`: MONAI runs ``initialize`` before it puts the bundle folder on ``sys.path``,
    and resolving any expression first evaluates every ``$import`` of the config (``scripts.common``), so an
    ``initialize`` would fail with "No module named 'scripts'" outside the bundle folder."""
    config = {k: v for k, v in config.items() if k != "initialize"}
    for key in RUN_LISTS:
        if isinstance(config.get(key), list):
            config[key] = [*initialize, *config[key]]
    return config


def rewrite_module(source: str, path: Path) -> str:
    out = _FROM_IMPORT.sub(lambda m: f"{m.group(1)}from {VENDORED}{m.group(2)}", source)
    for node in ast.walk(ast.parse(out)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n.split(".")[0] == PACKAGE for n in names):
            raise SystemExit(f"{path}:{node.lineno}: an import of {PACKAGE} the export cannot rewrite")
    return out


#: repository-only things the exported docs may name (top-level folders and files of this repository)
REPO_PATHS = ("scripts", "tests", "data", "demo_output", "bundles", "common")
_NOT_PATH = r"(?<![\w./$@-])"
DOCS_NOTE = (
    "> Exported from the gadofree-bundles repository by `scripts/export_bundle.py`. The commands run from "
    "any folder (`python -m monai.bundle run` puts this folder on `sys.path`; the code the configs use is the "
    "generated copy in `scripts/common/`); relative paths (`--dataset_dir`, `--output_dir`) are the working "
    "folder's. `$REPO` stands for a checkout of gadofree-bundles, needed only for "
    "what is prefixed with it (data preparation, benchmarks, tests): `export REPO=/path/to/gadofree-bundles`. "
    "The default `dataset_dir` is `../../data/...` from this folder (the repository's layout: `dist/<bundle>` "
    "inside a checkout); elsewhere pass `--dataset_dir`.\n"
)


def rewrite_docs(text: str, name: str, modules: list[str]) -> str:
    """A bundle's Markdown doc rewritten for the exported folder (module docstring).

    Args:
        text: the doc as written in this repository (``bundles/<name>/docs/*.md``).
        name: the bundle's name.
        modules: the vendored modules (:func:`walk`); other ``common`` modules stay repository-only.
    """
    vendored = set(modules)
    # the bundle's own files: relative to the exported folder
    text = re.sub(rf"{_NOT_PATH}bundles/{re.escape(name)}/(?=[\w.-])", "", text)
    text = re.sub(rf"{_NOT_PATH}bundles/{re.escape(name)}/?(?![\w.-])", ".", text)
    text = re.sub(rf"{_NOT_PATH}\.venv/bin/(\w+)", r"\1", text)

    def path(m: re.Match) -> str:
        rel = m.group(0)
        if rel.startswith(f"scripts/{PACKAGE}/"):  # already the vendored copy
            return rel
        if rel.startswith(f"{PACKAGE}/"):
            mod = rel.removesuffix(".py").removesuffix("/").replace("/", ".")
            if mod in vendored:
                return f"scripts/{rel}"
        return f"$REPO/{rel}"

    tops = "|".join(REPO_PATHS)
    text = re.sub(rf"{_NOT_PATH}(?:{tops})/[\w./-]*", path, text)

    def dotted(m: re.Match) -> str:
        mod = _longest_module(m.group(0))
        return f"scripts.{m.group(0)}" if mod in vendored else m.group(0)

    text = re.sub(rf"{_NOT_PATH}{PACKAGE}(?:\.\w+)+", dotted, text)
    text = re.sub(rf"{_NOT_PATH}make (?=[a-z])", "make -C $REPO ", text)
    return text


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_weights(path: Path) -> None:
    import torch

    if not path.is_file():
        raise SystemExit(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"--weights {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise SystemExit(f"--weights {path}: not a checkpoint (a dict of state dicts), a {type(state).__name__}")


def _check_record(bundle: Path, path: Path, overrides: dict | None = None) -> None:
    """The settings recorded with the weights (``checkpoint_record``) against the bundle's inference
    config (with ``overrides``, e.g. the task of a multi-task bundle): weights of another bundle, or
    trained with settings the export would not reproduce, are refused in one line naming the file and
    the settings (:func:`common.bundle.check_checkpoint`)."""
    from common.bundle import bundle_config, check_checkpoint, workflow_files

    parser = bundle_config(
        workflow_files(bundle, "infer"), {"ckpt_path": str(path), "device": "cpu", **(overrides or {})}
    )
    if "checkpoint_record" not in parser.get("", {}):
        return
    try:
        check_checkpoint(path, parser.get_parsed_content("checkpoint_record"))
    except (ValueError, KeyError) as e:
        raise SystemExit(f"--weights {path}: {e}") from None


def export(
    name: str,
    out: str | Path,
    weights: str | Path | None = None,
    weights_url: str | None = None,
    weights_hash: str | None = None,
    hash_type: str = "md5",
    task: str | None = None,
) -> Path:
    """Write bundle ``name`` as a self-contained Model Zoo bundle to ``out`` (a new or empty folder).

    A bundle with several tasks (its contract's ``tasks``) is exported in ``task``, else the task its
    ``--weights`` record, else its default: the exported configs' ``<task_id>`` default is that task."""
    from common.bundle import read_contract, recorded_setting

    src = bundle_dir(name)
    contract = read_contract(src)
    if contract.tasks:
        recorded = recorded_setting(weights, contract.task_id) if weights is not None else None
        try:
            contract = read_contract(src, task or recorded or contract.task)
        except ValueError as e:
            raise SystemExit(f"--task: {e}") from None
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out}: exists and is not an empty folder")
    if weights is None and weights_url is None:
        raise SystemExit("give --weights PATH (copied to models/model.pt) or --weights_url URL (large_files.yml)")
    if weights_hash and weights is not None:
        raise SystemExit("--weights_hash is for --weights_url alone (with --weights the md5 is computed)")
    weights = Path(weights).resolve() if weights is not None else None
    if weights is not None:
        _check_weights(weights)
        _check_record(src, weights, contract.overrides)
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    missing = sorted(set(required_packages(src)) - set(meta.get("required_packages_version", {})))
    if missing:
        raise SystemExit(f"{src / 'configs' / 'metadata.json'}: required_packages_version lacks {missing}")

    out.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir()
    stacked = {files[-1]: files for files in WORKFLOW_FILES.values() if len(files) > 1}
    initialize = rewrite_config(json.loads((src / "configs" / "train.json").read_text())).get("initialize", [])
    for f in sorted((src / "configs").iterdir()):
        if f.suffix == ".json" and f.name not in ("metadata.json", "contract.json"):
            if f.name == "inference.json":  # standalone, as the Model Zoo, MONAI Label and MONAI Deploy read it
                config = flatten([src / "configs" / n for n in stacked.get(f.name, (f.name,))])
            else:
                config = json.loads(f.read_text())
            config = defer_initialize(rewrite_config(config), initialize)
            config.update({k: v for k, v in contract.overrides.items() if k in config})  # the exported task
            if f.name == "inference.json":  # e.g. iterunet's models/recursive/model.pt
                config["ckpt_path"] = EXPORTED_CKPT_PATH
            text = json.dumps(config, indent=4) + "\n"
            (out / "configs" / f.name).write_text(text)
        else:
            shutil.copy2(f, out / "configs" / f.name)
    shutil.copytree(src / "docs", out / "docs")
    shutil.copy2(src / "LICENSE", out / "LICENSE")
    modules, _ = walk(src)
    for doc in sorted((out / "docs").rglob("*.md")):
        text = rewrite_docs(doc.read_text(), src.name, modules)
        if doc.name == "README.md":  # the note under the title
            head, sep, rest = text.partition("\n")
            text = f"{head}\n\n{DOCS_NOTE}{sep}{rest}" if head.startswith("#") else DOCS_NOTE + "\n" + text
        doc.write_text(text)
    (out / "scripts").mkdir()
    (out / "scripts" / "__init__.py").write_text(
        f'"""Generated by scripts/export_bundle.py from gadofree-bundles: the modules of {PACKAGE}/ this bundle uses."""\n\n'
        f"from . import {PACKAGE}  # noqa: F401  (configs call scripts.{PACKAGE}.<module>...)\n"
    )
    for mod in modules:
        path = _module_file(mod)
        dest = out / "scripts" / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(rewrite_module(path.read_text(), path))
        if path.name == "__init__.py":  # package data (e.g. JSON rule files) travels with its package
            for data in path.parent.iterdir():
                if data.is_file() and data.suffix not in (".py", ".pyc"):
                    shutil.copy2(data, dest.parent / data.name)
    if weights_url:
        value = _md5(weights) if weights is not None else (weights_hash or "")
        kind = "md5" if weights is not None else (hash_type if weights_hash else "")
        (out / "large_files.yml").write_text(
            "large_files:\n"
            f'  - path: "{WEIGHTS}"\n    url: {json.dumps(weights_url)}\n'
            f"    hash_val: {json.dumps(value)}\n    hash_type: {json.dumps(kind)}\n"
        )
    else:
        (out / WEIGHTS).parent.mkdir()
        shutil.copy2(weights, out / WEIGHTS)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help=f"one of {', '.join(bundle_names())}")
    ap.add_argument("--out", required=True, help="new or empty output folder")
    ap.add_argument("--weights", help="trained checkpoint (e.g. <output_dir>/model.pt) -> models/model.pt")
    ap.add_argument("--weights_url", help="download URL of the weights -> large_files.yml (nothing is downloaded)")
    ap.add_argument("--weights_hash", help="hash of the file at --weights_url, when --weights is not given")
    ap.add_argument("--hash_type", default="md5", help="type of --weights_hash (md5, sha256, ...)")
    ap.add_argument("--task", help="a multi-task bundle's task (default: the one --weights record, else its default)")
    a = ap.parse_args(argv)
    out = export(a.bundle, a.out, a.weights, a.weights_url, a.weights_hash, a.hash_type, a.task)
    print(f"exported {a.bundle} to {out}")


if __name__ == "__main__":
    from common.errors import install as install_error_hook

    install_error_hook()  # a user error ends with one line
    main()
