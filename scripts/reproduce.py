"""Reproduce one paper with one command: ingest, train with the paper's budget, score with the paper's
protocol, and write our figures beside the published ones.

Each bundle that reproduces a paper holds ``docs/paper_results.json`` (the data this script reads; it
names no bundle itself): the paper's id (``--paper``), its dataset and the layouts of ``--data`` it
accepts (with the ingest a DICOM layout needs), the protocol, the budgets (``paper``: the paper's
iterations, batch and network; ``smoke``: a few iterations of the small network for a CPU or CI), the
methods of its results table (the bundle itself, other bundles such as DCE-diff or Pix2Pix run as
baselines with the same budget, trivial baselines the bundles score, rows we do not implement) and the
published figures (table, page, metric, value +- std; ``null`` where the value must still be copied
from the paper). Training and scoring reuse ``scripts/compare.py`` (``train_method``,
``evaluate_method``, ``build_table``)::

    python scripts/reproduce.py --paper <id> --data <dataset root> [--budget paper|smoke] [--out DIR] [--device cuda]
    python scripts/reproduce.py --paper <id> --data <TCIA DICOM root> --ingest_<option> <value>   # ingest options
    python scripts/reproduce.py --list_papers                                                         # the papers

Writes ``<out>/reproduction.md`` and ``<out>/reproduction.json`` (published vs ours, the full table of
our methods and baselines, the differences that remain), ``<out>/data/`` (the ingest's output, when the
data needed one) and ``<out>/<budget>/<method>/{models,eval}``. A rerun continues where the last one
stopped: a finished ingest (its marker), a finished training (``model.pt`` with the budget's
iterations) and a finished evaluation (its marker, same weights and settings) are skipped; an
unfinished training resumes from its newest checkpoint (the bundles' ``resume``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import fire

from common.bundle import INGEST_KINDS, find_bundles
from common.errors import DEBUG_ENV
from common.errors import install as install_error_hook
from common.io import atomic_path, output_folder, save_json
from common.metrics import read_case_csv, summarize
from common.metrics.protocols import PAPER_PROTOCOLS
from scripts import compare as C

PAPER_FILE = Path("docs") / "paper_results.json"
BUDGETS = ("paper", "smoke")
#: the ingest script of each ingest kind (``common.bundle.INGEST_KINDS``); each has ``main(src, out, **options)``
INGEST_SCRIPTS = {
    "prostate": "scripts.prepare_prostatex",
    "brain": "scripts.prepare_brain",
    "breast": "scripts.prepare_breast",
}
INGEST_MARKER = ".reproduce_ingest.json"
EVAL_MARKER = ".reproduce_eval.json"
#: figures derived from a run rather than read from a metrics file
DERIVED = ("n_scored", "speedup", "parameters_M")
METHOD_KINDS = ("method", "baseline", "trivial baseline", "ablation")
#: the training ids every bundle has (the baseline bundles too): a budget's common ``train`` settings; the
#: others go to ``budget.<name>.methods.<id>``, so a baseline bundle is never handed a setting it lacks
COMMON_BUDGET_IDS = (
    "num_iterations",
    "epoch_length",
    "batch_size",
    "patch_size",
    "seed",
    "lr",
    "network_size",
    "num_workers",
    "val_interval",
)


class ReproduceError(ValueError):
    """Bad input or a paper file that cannot be used: the message names the option or the file."""


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


# ---------------------------------------------------------------- the papers' data files


def find_papers() -> dict[str, Path]:
    """``{paper id: its paper_results.json}`` for every bundle that has one (:func:`find_bundles`)."""
    found = {}
    for b in find_bundles():
        path = b / PAPER_FILE
        if path.is_file():
            try:
                found[str(json.loads(path.read_text())["paper"])] = path
            except (ValueError, KeyError, TypeError):
                raise ReproduceError(f"{path}: not valid JSON with a 'paper' id") from None
    return found


def _need(cond: bool, source: str, what: str) -> None:
    if not cond:
        raise ReproduceError(f"{source}: {what}")


def check_paper_results(spec: Any, source: str = "paper_results.json") -> dict:
    """Check a ``paper_results.json`` against its schema (the keys this script reads); returns it.

    Top level: ``paper`` (id), ``title``, ``dataset`` (``name``, ``where``, ``layouts``: a list of
    ``{"name", "match"[, "ingest", "ingest_options", "overrides"]}``), ``protocol`` (``paper`` or
    ``ours``), ``budget`` (``paper`` and ``smoke``: ``{"train": {...}, "methods": {id: {...}}}``),
    ``methods`` (``{"id", "name", "kind"[, "bundle", "train", "stages", "not_comparable"]}``, ``kind`` one
    of :data:`METHOD_KINDS`; ``not_comparable``: why the bundle cannot be scored on this paper's targets,
    so it is listed as not run), ``results`` (``{"table", "page", "method", "metric", "value", "std"[, "phase",
    "region", "file", "note"]}``; ``value`` a number or ``null`` with a ``note``), ``differences`` (list).

    Raises:
        ReproduceError naming the file and the first problem.
    """
    _need(isinstance(spec, dict), source, "expected a JSON object")
    for key, typ in (("paper", str), ("title", str), ("dataset", dict), ("protocol", str), ("budget", dict)):
        _need(isinstance(spec.get(key), typ), source, f"'{key}' missing or not a {typ.__name__}")
    for key in ("methods", "results", "differences"):
        _need(isinstance(spec.get(key), list), source, f"'{key}' missing or not a list")
    _need(spec["protocol"] in ("paper", "ours"), source, "'protocol' must be 'paper' or 'ours'")
    ds = spec["dataset"]
    for key in ("name", "where"):
        _need(isinstance(ds.get(key), str), source, f"dataset.{key} missing")
    _need(isinstance(ds.get("layouts"), list) and ds["layouts"], source, "dataset.layouts: a non-empty list")
    for i, lay in enumerate(ds["layouts"]):
        _need(isinstance(lay, dict) and {"name", "match"} <= set(lay), source, f"dataset.layouts[{i}]: name and match")
        _need(
            isinstance(lay["match"], str) or (isinstance(lay["match"], list) and lay["match"]),
            source,
            f"dataset.layouts[{i}].match: a glob or a list of globs",
        )
        _need(lay.get("ingest") in (None, *INGEST_KINDS), source, f"dataset.layouts[{i}].ingest: one of {INGEST_KINDS}")
    for b in BUDGETS:
        bud = spec["budget"].get(b)
        _need(isinstance(bud, dict) and isinstance(bud.get("train"), dict), source, f"budget.{b}.train missing")
        other = [k for k in bud["train"] if k not in COMMON_BUDGET_IDS]
        _need(
            not other,
            source,
            f"budget.{b}.train.{other[0] if other else ''}: not a setting every bundle has; put it in budget.{b}.methods.<id>",
        )
    ids = []
    for i, m in enumerate(spec["methods"]):
        _need(isinstance(m, dict) and {"id", "name", "kind"} <= set(m), source, f"methods[{i}]: id, name and kind")
        _need(m["kind"] in METHOD_KINDS, source, f"methods[{i}].kind: one of {METHOD_KINDS}")
        _need(m["id"] not in ids, source, f"methods[{i}].id {m['id']!r} twice")
        ids.append(m["id"])
    _need(
        sum(m["kind"] == "method" and "bundle" in m for m in spec["methods"]) == 1,
        source,
        "one method of kind 'method' with a bundle",
    )
    for i, r in enumerate(spec["results"]):
        where = f"results[{i}]"
        _need(isinstance(r, dict), source, f"{where}: an object")
        for key in ("table", "method", "metric"):
            _need(isinstance(r.get(key), str), source, f"{where}.{key} missing")
        _need(
            "page" in r and (r["page"] is None or isinstance(r["page"], int)), source, f"{where}.page: a number or null"
        )
        _need(r["method"] in ids, source, f"{where}.method {r['method']!r} is not a methods id")
        for key in ("value", "std"):
            v = r.get(key)
            _need(
                key in r and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))),
                source,
                f"{where}.{key}: a number or null",
            )
        if r["value"] is None:
            _need(bool(r.get("note")), source, f"{where}: a null value needs a note saying where to copy it from")
    return spec


def load_paper(paper: str) -> tuple[dict, Path]:
    """The checked spec of ``paper`` and the bundle folder that holds it."""
    papers = find_papers()
    if paper not in papers:
        raise ReproduceError(
            f"--paper {paper!r}: one of {', '.join(sorted(papers)) or '(no bundle has ' + str(PAPER_FILE) + ')'}"
        )
    path = papers[paper]
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReproduceError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return check_paper_results(spec, str(path)), path.parents[1]


# ---------------------------------------------------------------- data: layout and ingest


def _patterns(lay: Mapping) -> list[str]:
    return [lay["match"]] if isinstance(lay["match"], str) else list(lay["match"])


def _matches(folder: Path, lay: Mapping) -> bool:
    """Every pattern of the layout's ``match`` (a file name or glob below ``folder``, or a list of them) exists."""
    return all(next(iter(folder.glob(p)), None) is not None for p in _patterns(lay))


def detect_layout(data: Path, layouts: Sequence[Mapping], option: str = "--data") -> dict:
    """The first of ``layouts`` whose ``match`` (file names or globs below ``data``) all exist."""
    for lay in layouts:
        if _matches(data, lay):
            return dict(lay)
    expected = "; ".join(f"{lay['name']} ({' + '.join(_patterns(lay))})" for lay in layouts)
    raise ReproduceError(f"{option} {data}: not a layout this paper reads; expected one of: {expected}")


def run_ingest(kind: str, src: Path, out: Path, options: Mapping) -> Path:
    """The ingest of ``kind`` (:data:`INGEST_SCRIPTS`) from ``src`` into ``out``, once: a rerun with the same
    source and options finds its marker and skips it."""
    marker = out / INGEST_MARKER
    key = {"kind": kind, "src": str(src), "options": {k: options[k] for k in sorted(options)}}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        log(f"ingest ({kind}): skipped, done before -> {out}")
        return out
    log(f"ingest ({kind}): {src} -> {out} (options {json.dumps(dict(options))})")
    t0 = time.perf_counter()
    script = importlib.import_module(INGEST_SCRIPTS[kind])
    try:
        script.main(str(src), str(out), **options)
    except SystemExit as e:  # the prostate ingest exits 1 when no case could be prepared
        raise ReproduceError(f"--data {src}: the {kind} ingest prepared no case (see {out / 'skipped.json'})") from e
    except TypeError as e:
        raise ReproduceError(f"--ingest_*: {e}") from None
    save_json(key, marker)
    log(f"ingest ({kind}): done in {time.perf_counter() - t0:.0f} s")
    return out


def prepare_data(spec: Mapping, data: Path, out: Path, ingest_options: Mapping, budget: str = "paper") -> dict:
    """Where the bundles read the data and how: ``{"dataset_dir", "layout", "overrides", "ingest"}``. The
    ingest options are the layout's, then the budget's (``ingest_options``: e.g. a small crop for ``smoke``),
    then the user's ``--ingest_<option>``."""
    layouts = spec["dataset"]["layouts"]
    lay = detect_layout(data, layouts)
    log(f"data: {data} is {lay['name']} (found {' + '.join(_patterns(lay))})")
    res = {"source": str(data), "dataset_dir": data, "layout": lay["name"], "overrides": dict(lay.get("overrides", {}))}
    if lay.get("ingest"):
        options = {
            **lay.get("ingest_options", {}),
            **spec["budget"][budget].get("ingest_options", {}).get(lay["ingest"], {}),
            **ingest_options,
        }
        dataset = run_ingest(lay["ingest"], data, out / "data", options)
        after = detect_layout(dataset, [x for x in layouts if not x.get("ingest")], option="the ingest's output")
        res.update(dataset_dir=dataset, ingest=lay["ingest"], overrides=dict(after.get("overrides", {})))
        res["layout"] = f"{lay['name']} -> {after['name']}"
    elif ingest_options:
        raise ReproduceError(f"--ingest_{next(iter(ingest_options))}: {data} needs no ingest ({lay['name']})")
    return res


def split_sections(dataset_dir: Path) -> tuple[dict, list[str]]:
    """Overrides that point empty datalist sections at one that has cases (one prepared study lands in
    ``training``), and notes saying so; nothing when the dataset has no ``datalist.json``."""
    path = dataset_dir / "datalist.json"
    if not path.is_file():
        return {}, []
    sections = json.loads(path.read_text())
    full = [k for k in ("test", "validation", "training") if sections.get(k)]
    overrides, notes = {}, []
    for key, section in (("datalist_section", "test"), ("val_section", "validation")):
        if not sections.get(section) and full:
            overrides[key] = full[0]
            notes.append(
                f"{path} has no {section} case: {section} uses the {full[0]} section "
                f"({len(sections[full[0]])} case(s)){'; the scores are not held-out figures' if section == 'test' else ''}"
            )
    return overrides, notes


# ---------------------------------------------------------------- methods: train and evaluate


def _ids(bundle: str) -> tuple[Any, Any]:
    return C._parser(bundle, "train"), C._parser(bundle, "evaluate")


def _defined(bundle: str, overrides: Mapping) -> dict:
    """The overrides that are config ids of the bundle's training or evaluation (layout settings such as
    ``volume_pattern`` reach the bundles that have them)."""
    train_p, eval_p = _ids(bundle)
    return {k: v for k, v in overrides.items() if k in train_p or k in eval_p}


def plan_methods(spec: Mapping, budget: str, available: Sequence[str], with_ablations: bool) -> list[dict]:
    """Every method of the paper's table with its status: ``run`` (a bundle we have), ``baseline`` (scored
    by the bundles' evaluation), ``not implemented`` or ``not run`` (an ablation without ``--with_ablations``,
    or a bundle that cannot be scored on the paper's targets: ``not_comparable``), with ``why`` where not run."""
    plans = []
    for m in spec["methods"]:
        p = dict(m)
        bundle = m.get("bundle")
        if m["kind"] == "trivial baseline":
            p["status"] = "baseline"
        elif bundle and bundle in available and m.get("not_comparable"):
            p["status"], p["why"] = "not run", m["not_comparable"]
        elif bundle and bundle in available and m["kind"] == "ablation" and not with_ablations:
            p["status"], p["why"] = "not run", "an ablation: pass --with_ablations true to train and score it"
        elif bundle and bundle in available:
            p["status"] = "run"
        else:
            p["status"] = "not implemented"
            p["why"] = m.get("why") or (f"no bundle {bundle!r} in bundles/" if bundle else "no implementation here")
        p["budget"] = dict(spec["budget"][budget].get("methods", {}).get(m["id"], {}))
        plans.append(p)
    return plans


def train_stages(
    plan: Mapping, dataset_dir: Path, runs: Path, common: Mapping, own: Mapping, source: str
) -> tuple[Path, float | None, dict]:
    """Train the method's stages in order (``stages``: ``[{"name", "train": {...}}]``; one stage by default;
    ``"@previous"`` is the previous stage's weights). A stage whose ``model.pt`` holds the budget's
    iterations is skipped; an unfinished one resumes from its newest checkpoint."""
    bundle = plan["bundle"]
    stages = plan.get("stages") or [{"name": "train", "train": {}}]
    ckpt, seconds, previous, infer_o = None, 0.0, None, {}
    for i, stage in enumerate(stages):
        stage_own = {**own, **plan.get("train", {}), **stage.get("train", {})}
        stage_own = {k: (str(previous) if v == "@previous" else v) for k, v in stage_own.items()}
        train_o, infer_o = C.split_overrides(bundle, common, stage_own, source)
        models = runs / plan["id"] / (stage["name"] if len(stages) > 1 else "models")
        target = int(train_o.get("num_iterations", 0)) or None
        done = models / "model.pt"
        what = f"{plan['id']} stage {i + 1}/{len(stages)} ({stage['name']})"
        if done.is_file() and target is not None and C.trained_iterations(done) == target:
            log(f"train {what}: skipped, trained before ({target} iterations) -> {done}")
            ckpt = done
        else:
            if (models / "checkpoints").is_dir():
                log(f"train {what}: resuming from the newest checkpoint in {models / 'checkpoints'}")
            log(f"train {what}: {bundle}, {json.dumps(train_o)}")
            ckpt, dt = C.train_method(bundle, dataset_dir, models, {**train_o, "resume": True})
            seconds = (seconds or 0.0) + dt
        previous = ckpt
    return ckpt, (seconds or None), infer_o


def evaluate_once(bundle: str, dataset_dir: Path, ckpt: Path, out: Path, overrides: Mapping) -> dict:
    """:func:`scripts.compare.evaluate_method` unless a marker says this evaluation (same weights, same
    settings) is done; returns its info."""
    key = {"ckpt": str(ckpt), "ckpt_mtime_ns": ckpt.stat().st_mtime_ns, "dataset_dir": str(dataset_dir)}
    key["overrides"] = json.loads(json.dumps(dict(overrides), default=str))
    marker = out / EVAL_MARKER
    if marker.is_file() and (out / "metrics.csv").is_file():
        stored = json.loads(marker.read_text())
        if stored.get("key") == key:
            log(f"evaluate {out}: skipped, done before with these weights and settings")
            return stored["info"]
    info = C.evaluate_method(bundle, dataset_dir, ckpt, out, overrides)
    save_json({"key": key, "info": info}, marker)
    return info


def protocol_overrides(spec: Mapping, bundle: str) -> tuple[dict, str]:
    """``{"protocol": "paper"}`` where the bundle's evaluation has the setting (it maps ``paper`` to its
    paper's protocol, :data:`PAPER_PROTOCOLS`, or, for a baseline bundle, to the protocol of the task's
    paper), and what the report says about it."""
    if spec["protocol"] != "paper":
        return {}, "ours (the paper file asks for it)"
    name = Path(bundle).name
    pp = PAPER_PROTOCOLS.get(name)
    if "protocol" in C._parser(bundle, "evaluate"):
        what = (
            f"scoring {pp['scoring']}, statistics {pp['statistics']}; {pp['normalisation']}"
            if pp
            else "as its evaluate.json maps it"
        )
        return {"protocol": "paper"}, f"paper ({what})"
    if pp:
        return {}, f"the paper's protocol is ours for this bundle: {pp['notes']}"
    return {}, "ours (volume scoring): the bundle states no paper protocol"


def _rename(rows: list[dict], bundle: str, mid: str) -> list[dict]:
    """A bundle's own rows carry its folder name as ``method`` (with a variant's suffix, e.g.
    ``<bundle>_no_mssdm``, and ``_first_draw``); the report names them by the method's id. Baseline rows
    keep their names."""

    def name(m: Any) -> Any:
        if m != bundle and not str(m).startswith(f"{bundle}_"):
            return m
        return f"{mid}_first_draw" if str(m).endswith("_first_draw") else mid

    return [{**r, "method": name(r.get("method"))} for r in rows]


# ---------------------------------------------------------------- published vs ours


def _fmt(v: float | None, std: float | None = None, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    f = ".2f" if metric in ("psnr", "speedup", "parameters_M") else (".0f" if metric.startswith("n_") else ".3g")
    return f"{v:{f}}" + (f" ± {std:{f}}" if std is not None and not math.isnan(std) else "")


def count_parameters(ckpt: Path) -> float | None:
    """Millions of parameters in a bundle's ``model.pt`` (the tensors of its ``model`` entry)."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a foreign file: the count is just not known
        return None
    model = state.get("model", state) if isinstance(state, dict) else {}
    return sum(t.numel() for t in model.values() if hasattr(t, "numel")) / 1e6


def our_figure(r: Mapping, pooled: Mapping[str, list[dict]], runs: Mapping[str, dict]) -> dict:
    """Our mean, std and n for a published row: the rows of ``r['file']`` (default ``metrics.csv``) of the
    method, phase and region, or a figure derived from the run (:data:`DERIVED`)."""
    metric, mid = r["metric"], r["method"]
    if metric == "speedup":
        a, b = runs.get(mid, {}).get("info"), runs.get(r.get("over", ""), {}).get("info")
        if not a or not b:
            return {"mean": None, "std": None, "n": 0}
        return {"mean": b["s_per_volume"] / a["s_per_volume"], "std": None, "n": a["n_test_cases"]}
    if metric == "parameters_M":
        ckpt = runs.get(mid, {}).get("ckpt")
        return {"mean": count_parameters(Path(ckpt)) if ckpt else None, "std": None, "n": 1 if ckpt else 0}
    rows = [
        x
        for x in pooled.get(r.get("file", "metrics.csv"), [])
        if x.get("method") == mid
        and (r.get("phase") is None or x.get("phase") == r["phase"])
        and (r.get("region") is None or x.get("region") == r["region"])
    ]
    if metric.startswith("n_"):
        return {"mean": float(len(rows)) if rows else None, "std": None, "n": len(rows)}
    if not rows or not any(metric in x for x in rows):
        return {"mean": None, "std": None, "n": 0}
    s = summarize(rows, [metric])[metric]
    return {"mean": s["mean"], "std": s["std"] if s["n"] > 1 else None, "n": s["n"]}


def side_by_side(spec: Mapping, pooled: Mapping, runs: Mapping, plans: Sequence[Mapping]) -> list[dict]:
    status = {p["id"]: p for p in plans}
    out = []
    for r in spec["results"]:
        ours = our_figure(r, pooled, runs)
        p = status[r["method"]]
        if ours["mean"] is None:
            state = p["status"] if p["status"] in ("not implemented", "not run") else "no figure from this run"
        else:
            state = "scored"
        diff = None
        if ours["mean"] is not None and r["value"] is not None:
            diff = ours["mean"] - r["value"]
        out.append({**r, "method_name": p["name"], "ours": ours, "ours_status": state, "difference": diff})
    return out


def markdown(report: Mapping, table_md: str) -> str:
    lines = [f"# Reproduction: {report['title']}", ""]
    lines += [f"- {h}" for h in report["header"]]
    lines += ["", "## Published beside ours", ""]
    head = "| table | page | method | phase | region | metric | published | ours (mean ± std) | n | note |"
    lines += [head, "|" + "---|" * 10]
    for r in report["results"]:
        pub = _fmt(r["value"], r["std"], r["metric"]) if r["value"] is not None else "null (copy from the paper)"
        ours = (
            _fmt(r["ours"]["mean"], r["ours"]["std"], r["metric"])
            if r["ours"]["mean"] is not None
            else r["ours_status"]
        )
        lines.append(
            f"| {r['table']} | {r['page'] if r['page'] is not None else '—'} | {r['method_name']} | "
            f"{r.get('phase') or '—'} | {r.get('region') or '—'} | {r['metric']} | {pub} | {ours} | {r['ours']['n']} | "
            f"{(r.get('note') or '').replace('|', '/')} |"
        )
    lines += ["", "## Methods of the paper's table", ""]
    for m in report["methods"]:
        why = f" ({m['why']})" if m.get("why") else ""
        lines.append(f"- {m['name']} (`{m['id']}`, {m['kind']}): {m['status']}{why}")
    lines += ["", "## Differences that remain", ""]
    lines += [f"- {d}" for d in report["differences"]]
    lines += ["", "## Our full table (every method and baseline scored here)", "", table_md]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def main(
    paper: str | None = None,
    data: str | None = None,
    budget: str = "smoke",
    out: str | None = None,
    device: str | None = None,
    with_ablations: bool = False,
    list_papers: bool = False,
    **ingest: Any,
) -> dict:
    """Reproduce ``paper`` on ``data`` (see the module docstring).

    Args:
        paper: the paper's id (``--list_papers`` shows them): the ``paper`` of a bundle's docs/paper_results.json.
        data: the dataset root: a prepared folder (``datalist.json``), a folder of volumes, or DICOM studies
            (then the ingest runs first); the paper file lists the layouts it reads.
        budget: ``paper`` (the paper's iterations, batch and network; a GPU) or ``smoke`` (a few iterations
            of the small network, few sampling steps; a CPU or CI).
        out: output folder (default ``reproduce_output/<paper>``).
        device: passed to every bundle (default: theirs, CUDA when present).
        with_ablations: also train and score the paper's ablations that the bundles implement.
        list_papers: print the papers and their results files, do nothing else.
        ingest: ``--ingest_<option> <value>``: options of the ingest (e.g. ``--ingest_lesion_mask masks/``).
    """
    t_start = time.time()
    papers = find_papers()
    if list_papers:
        for pid, path in sorted(papers.items()):
            print(f"{pid}: {json.loads(path.read_text())['title']} ({path})")
        return {"papers": {k: str(v) for k, v in papers.items()}}
    if not paper:
        raise ReproduceError(f"--paper: name one of {', '.join(sorted(papers))}")
    bad = [k for k in ingest if not k.startswith("ingest_")]
    if bad:
        raise ReproduceError(f"--{bad[0]}: not an option (ingest options are --ingest_<option>)")
    if budget not in BUDGETS:
        raise ReproduceError(f"--budget {budget!r}: one of {', '.join(BUDGETS)}")
    if not data:
        raise ReproduceError("--data: the dataset root is needed (a prepared folder or DICOM studies)")
    spec, home = load_paper(str(paper))
    if not Path(data).expanduser().is_dir():  # before any folder is made
        raise ReproduceError(f"--data {data}: no such folder")
    out_dir = Path(out or f"reproduce_output/{paper}").expanduser().resolve()
    output_folder(out_dir, "out")
    log(f"{spec['title']}: budget {budget}, out {out_dir}")

    # 1. data
    prepared = prepare_data(
        spec, Path(data).expanduser().resolve(), out_dir, {k[7:]: v for k, v in ingest.items()}, budget
    )
    dataset_dir = Path(prepared["dataset_dir"])
    section_o, notes = split_sections(dataset_dir)

    # 2. train and evaluate every method we have, with one budget
    available = [b.name for b in find_bundles()]
    plans = plan_methods(spec, budget, available, bool(with_ablations))
    bud = spec["budget"][budget]
    common = dict(bud["train"])
    dev = {"device": device} if device else {}
    runs_dir = out_dir / budget
    source = f"{home / PAPER_FILE} budget.{budget}"
    runs: dict[str, dict] = {}
    protocols = {}
    rows_by_method: dict[str, list[dict]] = {}
    pooled: dict[str, list[dict]] = {}
    files = sorted({r.get("file", "metrics.csv") for r in spec["results"]} | {"metrics.csv"})
    todo = [p for p in plans if p["status"] == "run"]
    for n, plan in enumerate(todo, 1):
        bundle = plan["bundle"]
        log(f"method {n}/{len(todo)}: {plan['name']} ({bundle})")
        own = {**_defined(bundle, {**prepared["overrides"], **section_o}), **plan["budget"], **dev}
        ckpt, train_s, infer_o = train_stages(plan, dataset_dir, runs_dir, {**common}, own, source)
        proto_o, protocols[plan["id"]] = protocol_overrides(spec, bundle)
        # inference keeps the network the checkpoint recorded
        infer_o = {k: v for k, v in {**infer_o, **proto_o, **dev}.items() if k != "network_size"}
        eval_dir = runs_dir / plan["id"] / "eval"
        info = evaluate_once(bundle, dataset_dir, ckpt, eval_dir, infer_o)
        info.update(train_iterations=C.trained_iterations(ckpt), train_s=train_s, ckpt=str(ckpt))
        runs[plan["id"]] = {"info": info, "ckpt": str(ckpt), "eval": str(eval_dir)}
        for f in files:
            if (eval_dir / f).is_file():
                rows = _rename(read_case_csv(eval_dir / f), bundle, plan["id"])
                have = {x["method"] for x in pooled.get(f, [])}
                pooled.setdefault(f, []).extend(x for x in rows if x["method"] == plan["id"] or x["method"] not in have)
        rows_by_method[plan["id"]] = _rename(read_case_csv(eval_dir / "metrics.csv"), bundle, plan["id"])

    # 3. the tables
    rows_by_method, phase_notes = C.restrict_to_shared_phases(rows_by_method)
    sources = {m: runs[m]["eval"] + "/metrics.csv" for m in rows_by_method}
    notes += C.check_same_targets(rows_by_method, sources) + phase_notes
    table = C.build_table(rows_by_method, {m: C._row_info(runs[m]["info"]) for m in rows_by_method})
    results = side_by_side(spec, pooled, runs, plans)
    split = spec["dataset"].get("split") or {}
    main_id = next(p["id"] for p in plans if p["kind"] == "method")
    cases = sorted({str(r["case"]) for r in rows_by_method.get(main_id, []) if r.get("method") == main_id})
    header = [
        f"paper: {spec['title']} ({spec.get('reference', '')}); results file {home / PAPER_FILE}",
        f"dataset: {spec['dataset']['name']}; read from `{prepared['source']}` as {prepared['layout']}"
        + (f"; ingest `{prepared['ingest']}` -> `{dataset_dir}`" if prepared.get("ingest") else ""),
        "split: " + (split.get("note") or "ours: the datalist's seeded split (the paper states none we can apply)"),
        f"scored case(s): {len(cases)}: {', '.join(cases)}",
        f"budget `{budget}`: {json.dumps(common)}"
        + (
            f"; per method {json.dumps({p['id']: p['budget'] for p in todo if p['budget']})}"
            if any(p["budget"] for p in todo)
            else ""
        ),
        f"run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node() or 'this machine'}, device "
        + ", ".join(sorted({str(r["info"]["device"]) for r in runs.values()})),
        *[f"protocol of {m}: {p}" for m, p in protocols.items()],
        *notes,
    ]
    differences = list(spec["differences"])
    if budget == "smoke":
        differences.insert(
            0,
            "smoke budget: a few iterations of the small network and few sampling steps; the figures test the pipeline, not the method",
        )
    if not split.get("stated"):
        differences.append("split: ours (seeded by case), not the paper's case list")
    differences += [
        f"{p['name']}: {p['status']} ({p['why']})" for p in plans if p["status"] in ("not implemented", "not run")
    ]
    missing = [r for r in results if r["value"] is None]
    if missing:
        tables = ", ".join(dict.fromkeys(r["table"] for r in missing))
        differences.append(
            f"{len(missing)} of {len(results)} published values are not in the bundle docs yet (null in "
            f"{home / PAPER_FILE}): copy them from the paper's {tables}"
        )
    report = {
        "paper": spec["paper"],
        "title": spec["title"],
        "budget": budget,
        "budget_settings": bud,
        "data": {k: str(v) for k, v in prepared.items() if k != "overrides"} | {"overrides": prepared["overrides"]},
        "header": header,
        "methods": [
            {k: p.get(k) for k in ("id", "name", "kind", "bundle", "status", "why")}
            | ({"run": runs[p["id"]]} if p["id"] in runs else {})
            for p in plans
        ],
        "results": results,
        "differences": differences,
        "table": table,
        "seconds": time.time() - t_start,
    }
    table_md = C.markdown(table, []).strip() if table else "(no method was run)"
    text = markdown(report, table_md)
    with atomic_path(out_dir / "reproduction.md") as tmp:
        tmp.write_text(text)
    save_json(report, out_dir / "reproduction.json")
    print(text)
    log(f"written {out_dir / 'reproduction.md'} and reproduction.json in {time.time() - t_start:.0f} s")
    return report


def cli() -> None:
    """The command line: this script's own checks (bad data, options, paper files) end in one line, as the
    bundles' (the error hook shortens those raised in ``common``); exit status 1."""
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    try:
        fire.Fire(main, serialize=lambda result: None)
    except (ReproduceError, C.CompareError) as e:
        if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
