"""Compare synthesis methods on one prepared dataset with one training budget: one table, one panel per case.

Each method is a bundle (``bundles/<method>``) run through its own configs: ``train.json`` with the
budget as overrides (same iterations, slices per step, crop, seed, lr), then ``inference.json`` +
``evaluate.json`` on the ``test`` section, which write ``metrics.csv`` (model and trivial baselines
per case, phase and region; :class:`common.handlers.SynthesisMetrics`). This script checks that all
methods were scored on the same targets, then writes ``comparison.md`` / ``.csv`` / ``.json`` (mean ±
std, n, a paired Wilcoxon p against the best method per phase and region; :mod:`common.metrics.stats`)
and ``<case>.png`` (inputs, each method's phase, the target, error maps; :mod:`common.visualize`)::

    python scripts/compare.py --dataset_dir data/phantoms/prostate/prepared --methods resdce,dcediff \\
        --out compare_output --budget scripts/compare_budget.json
    python scripts/compare.py ... --num_iterations 200 --batch_size 8 --patch_size 64 --seed 0
    python scripts/compare.py ... --ckpt resdce=run1/model.pt,dcediff=run2/model.pt   # no training

Budget file (JSON): common training settings (any id of every method's ``train.json``, e.g.
``num_iterations``, ``batch_size``, ``patch_size``, ``seed``, ``lr``, ``network_size``,
``num_workers``, ``val_interval``) and ``"methods": {"<method>": {...}}`` with per-method overrides;
each key goes to the method's training and/or inference config, whichever defines it (e.g.
``{"dcediff": {"sampler": "ddim", "num_inference_steps": 50, "warmup_steps": 20}}``). Command-line
values replace the file's common ones.

A bundle with several tasks (its contract's ``tasks``, e.g. a baseline for prostate DCE, brain T1c and
super-resolution) runs in the task whose outputs the other methods also write (``--methods d3m,<it>``:
its T1c task), or in ``--task``; the task goes to its configs as ``--<task_id> <task>``. The compared
phases are each method's ``target_keys`` (or ``target_key`` / ``output_name``; else its contract's
outputs), the panels' targets and inputs come from the first method's inference datalist.
"""

from __future__ import annotations

import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import fire

from common.bundle import (
    Contract,
    bundle_config,
    bundle_dir,
    find_bundles,
    read_contract,
    run_bundle,
    workflow_files,
)
from common.errors import install as install_error_hook
from common.io import atomic_path, output_folder, save_json
from common.metrics import format_table, paired_wilcoxon, read_case_csv, summarize, write_case_csv

METRICS = ("psnr", "ssim", "mae", "enh_rel_err", "enh_corr")
# direction of "better" per metric (for the best method); PSNR decides which method is the reference
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mae": False, "enh_rel_err": False, "enh_corr": True}
BEST_BY = "psnr"
REGION_ORDER = ("whole", "organ_mask", "lesion_mask")
TRAIN_KEYS = ("num_iterations", "batch_size", "patch_size", "seed", "lr")
TOLERANCE = 1e-6  # relative: baseline metrics of two methods on the same targets agree to float precision


class CompareError(ValueError):
    """A comparison that would not be fair or cannot run: the message names the file or setting."""


def log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


# ---------------------------------------------------------------- options


def parse_ckpt(ckpt: str | Mapping | None, methods: Sequence[str]) -> dict[str, Path]:
    """``"resdce=PATH,dcediff=PATH"`` (or a mapping) -> ``{method: Path}``; every file must exist."""
    if not ckpt:
        return {}
    if isinstance(ckpt, Mapping):
        pairs = list(ckpt.items())
    else:
        items = ckpt if isinstance(ckpt, (list, tuple)) else str(ckpt).split(",")
        pairs = []
        for item in items:
            if "=" not in str(item):
                raise CompareError(f"--ckpt {item!r}: expected METHOD=PATH (e.g. <bundle>=models/model.pt)")
            pairs.append(tuple(s.strip() for s in str(item).split("=", 1)))
    out = {}
    for m, p in pairs:
        if m not in methods:
            raise CompareError(f"--ckpt {m}={p}: {m!r} is not one of --methods {','.join(methods)}")
        path = Path(p).expanduser().resolve()
        if not path.is_file():
            raise CompareError(f"--ckpt {m}={p}: no such file")
        out[m] = path
    return out


def load_budget(budget: str | None, cli: Mapping[str, Any]) -> dict:
    """The budget file's settings with the command-line values (not None) over the common ones."""
    spec: dict = {}
    if budget:
        path = Path(budget)
        if not path.is_file():
            raise CompareError(f"--budget {budget}: no such file")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CompareError(f"--budget {budget}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("methods", {}), dict):
            raise CompareError(
                f'--budget {budget}: expected {{"num_iterations": ..., "methods": {{"<method>": {{...}}}}}}'
            )
    spec = dict(spec)
    per_method = dict(spec.pop("methods", {}))
    for k, v in cli.items():
        if v is not None:
            spec[k] = v
    if isinstance(spec.get("patch_size"), (int, float)):  # one number: a square crop
        spec["patch_size"] = [int(spec["patch_size"])] * 2
    return {"common": spec, "methods": per_method}


def _parser(method: str, workflow: str):
    """The bundle's config files of ``workflow`` (:data:`common.bundle.WORKFLOW_FILES`), parsed."""
    return bundle_config(workflow_files(method, workflow))


def split_overrides(
    method: str, common: Mapping, own: Mapping, source: str, task: Mapping | None = None
) -> tuple[dict, dict]:
    """``(training, inference)`` overrides of ``method``: the common budget goes to training (every key must
    be an id of its ``train.json``; also to inference where that config has it, e.g. ``seed``); each of the
    method's own keys goes to whichever of the two configs defines it (an id of neither is an error).
    ``task``: the overrides that select a multi-task bundle's task (:attr:`Contract.overrides`), to both."""
    train_p, infer_p = _parser(method, "train"), _parser(method, "evaluate")
    train, infer = dict(task or {}), dict(task or {})
    for k, v in common.items():
        if k not in train_p:
            raise CompareError(f"{source}: {k!r} is not a setting of bundles/{method}/configs/train.json")
        train[k] = v
        if k in infer_p and k not in ("output_dir", "ckpt_path"):
            infer[k] = v
    for k, v in own.items():
        if k not in train_p and k not in infer_p:
            raise CompareError(
                f"{source}: methods.{method}.{k} is a setting of neither bundles/{method}/configs/train.json "
                "nor its inference.json"
            )
        if k in train_p:
            train[k] = v
        if k in infer_p:
            infer[k] = v
    return train, infer


# ---------------------------------------------------------------- running the bundles


def train_method(method: str, dataset_dir: Path, models: Path, overrides: Mapping) -> tuple[Path, float]:
    args = {"dataset_dir": str(dataset_dir), "output_dir": str(models), "resume": False, **overrides}
    log(f"{method}: training ({', '.join(f'{k}={v}' for k, v in overrides.items())}) -> {models}")
    dt = run_bundle(workflow_files(method, "train"), args, workflow_type="train").seconds
    ckpt = models / "model.pt"
    if not ckpt.is_file():
        raise CompareError(f"{method}: training finished without writing {ckpt}")
    log(f"{method}: trained in {dt:.0f} s -> {ckpt}")
    return ckpt, dt


def evaluate_method(method: str, dataset_dir: Path, ckpt: Path, out: Path, overrides: Mapping) -> dict:
    """Inference + evaluation of the test section into ``out``; what the table says about the run."""
    args = {
        "dataset_dir": str(dataset_dir),
        "ckpt_path": str(ckpt),
        "output_dir": str(out),
        "datalist_section": "test",
        **overrides,
    }
    if (out / "metrics.csv").is_file():  # an earlier comparison's cases would be merged in: start clean
        (out / "metrics.csv").unlink()
    p = bundle_config(workflow_files(method, "evaluate"), args)
    n_cases = len(p.get_parsed_content("datalist"))
    info = {
        "sampler": sampler_name(method, p),
        "steps": int(p.get_parsed_content("num_inference_steps") or 1) if "num_inference_steps" in p else 1,
        "network_size": p.get_parsed_content("network_size"),
        "device": str(p.get_parsed_content("device")),
        "n_test_cases": n_cases,
    }
    log(f"{method}: synthesising {n_cases} test case(s), {info['sampler']} {info['steps']} steps -> {out}")
    dt = run_bundle(workflow_files(method, "evaluate"), args, workflow_type="infer").seconds
    info["inference_s"] = dt
    info["s_per_volume"] = dt / max(n_cases, 1)
    log(f"{method}: {dt:.1f} s for {n_cases} case(s) ({info['s_per_volume']:.1f} s per volume, scoring included)")
    if not (out / "metrics.csv").is_file():
        raise CompareError(f"{method}: the evaluation wrote no {out / 'metrics.csv'} (do the test cases have targets?)")
    return info


def choose_task(method: str, contracts: Mapping[str, Contract], task: str | None) -> Contract:
    """The contract ``method`` is compared in: its own for a bundle with one task; for a bundle with several
    (:attr:`Contract.tasks`), ``task`` when given, else the one task whose outputs every single-task method
    also writes (else its default task when no method has a single task). A ``CompareError`` names the
    tasks when none or several fit, or when ``task`` is not one of them."""
    own = read_contract(method)
    if not own.tasks:
        return own
    if task:
        if task not in own.tasks:
            raise CompareError(f"--task {task}: not a task of {method} ({', '.join(own.tasks)})")
        return read_contract(method, task)
    others = [c for m, c in contracts.items() if m != method and not c.tasks]
    if not others:
        return own

    def keys(c: Contract) -> set[str]:
        return {o.key for o in c.outputs if not o.label_map}

    fits = [t for t in own.tasks if all(keys(read_contract(method, t)) & keys(o) for o in others)]
    if len(fits) != 1:
        raise CompareError(
            f"{method}: {'no task' if not fits else 'several tasks (' + ', '.join(fits) + ')'} of "
            f"{', '.join(own.tasks)} writes the outputs of {', '.join(o.name for o in others)}; pass --task <task>"
        )
    return read_contract(method, fits[0])


def compared_targets(parser, contract: Contract) -> list[str]:
    """The outputs a method's (parsed, overridden) inference config synthesises and scores: its
    ``target_keys`` (or ``target_key`` / ``output_name``), else its contract's image outputs."""
    for key in ("target_keys", "target_key", "output_name"):
        if key in parser:
            value = parser.get_parsed_content(key)
            return [value] if isinstance(value, str) else list(value)
    return [o.key for o in contract.outputs if not o.label_map]


def sampler_name(method: str, parser) -> str:
    """The sampler a method's inference uses, as its contract names it (``sampler``: a name, or ``@<id>``
    of the config id that holds it, e.g. DDPM / DDIM, upper-cased)."""
    name = read_contract(method).sampler
    if name.startswith("@"):
        name = str(parser.get_parsed_content(name[1:])).upper() if name[1:] in parser else "?"
    return name


def trained_iterations(ckpt: Path) -> int | None:
    """Iterations of the run that wrote ``ckpt`` (its ``checkpoints/checkpoint_final.pt`` beside it), if known."""
    import torch

    final = ckpt.parent / "checkpoints" / "checkpoint_final.pt"
    if not final.is_file():
        return None
    try:
        return int(torch.load(final, map_location="cpu", weights_only=True)["trainer"]["iteration"])
    except Exception:  # noqa: BLE001 - a foreign file: the number is just not known
        return None


# ---------------------------------------------------------------- checking and tabulating


def _shared_phases(phases: Mapping[str, Sequence[str]]) -> list[str]:
    """The phases every method has (method -> its phases), in the first method's order."""
    first = next(iter(phases.values()))
    return [p for p in first if all(p in ps for ps in phases.values())]


def check_configured_targets(targets: Mapping[str, Sequence[str]]) -> list[str]:
    """Before any work: the phases (``target_keys``, method -> its parsed list, with the budget's
    overrides) that every method synthesises; the comparison is made on those. A ``CompareError``
    naming each method's phases when no phase is shared. Scores of a shared phase do not depend on
    the other phases a method synthesises (each phase is normalised by its own target,
    :func:`common.handlers.metrics.channel_ranges`), so e.g. a method with two phases compares with
    one with three on the two they share."""
    shared = _shared_phases(targets)
    if not shared:
        desc = "; ".join(f"{m}: {', '.join(t)}" for m, t in targets.items())
        raise CompareError(
            f"the methods are configured to synthesise no common phase (target_keys: {desc}); a comparison "
            'needs at least one, e.g. in the budget file: "methods": {"<method>": {"target_keys": ["dce_early", "dce_late"]}}'
        )
    return shared


def restrict_to_shared_phases(rows_by_method: Mapping[str, list[dict]]) -> tuple[dict[str, list[dict]], list[str]]:
    """Keep the rows of the phases that every method was scored on (the comparison's targets);
    returns the rows and a note per method naming the phases it scored that the table leaves out."""
    phases = {
        m: list(dict.fromkeys(r["phase"] for r in rows if r.get("method") == m)) for m, rows in rows_by_method.items()
    }
    shared = _shared_phases(phases)
    notes = [
        f"{m} also synthesised {', '.join(extra)}, not compared (not synthesised by every method)"
        for m, ps in phases.items()
        if (extra := [p for p in ps if p not in shared])
    ]
    return {m: [r for r in rows if r["phase"] in shared] for m, rows in rows_by_method.items()}, notes


def check_same_targets(rows_by_method: Mapping[str, list[dict]], sources: Mapping[str, str] | None = None) -> list[str]:
    """Refuse (``CompareError``) unless every method was scored on the same cases, phases and regions,
    and every trivial baseline two methods share has the same scores (the same arrays against the same
    targets). ``rows_by_method``: each method's metrics.csv rows (its own and its baselines'), restricted
    to the compared phases (:func:`restrict_to_shared_phases`); ``sources``: method -> file named in the
    messages. Returns notes for the table's header."""
    sources = sources or {m: f"{m} metrics" for m in rows_by_method}
    methods = list(rows_by_method)
    first = methods[0]

    def keyset(m: str, field: str) -> list:
        return sorted({str(r[field]) for r in rows_by_method[m] if r.get("method") == m})

    for field, what in (("case", "case ids"), ("phase", "phases"), ("region", "regions")):
        ref = keyset(first, field)
        for m in methods[1:]:
            got = keyset(m, field)
            if got != ref:
                only_a = [x for x in ref if x not in got]
                only_b = [x for x in got if x not in ref]
                raise CompareError(
                    f"the methods were not scored on the same {what}: {sources[first]} has "
                    f"{', '.join(ref)}, {sources[m]} has {', '.join(got)}"
                    + (f" (only {first}: {', '.join(only_a)})" if only_a else "")
                    + (f" (only {m}: {', '.join(only_b)})" if only_b else "")
                    + (
                        "; configure the bundles to read the same target_keys (e.g. in the budget: "
                        '"methods": {"<method>": {"target_keys": ["dce_onset", "dce_early", "dce_late"]}})'
                        if field == "phase"
                        else "; run every method on the same --dataset_dir and test section"
                    )
                )
    notes = []
    base_owner: dict[str, str] = {}
    for m in methods:
        for b in baseline_names(rows_by_method[m], m):
            if b not in base_owner:
                base_owner[b] = m
                continue
            a_rows = _index(rows_by_method[base_owner[b]], b)
            b_rows = _index(rows_by_method[m], b)
            if set(a_rows) != set(b_rows):
                raise CompareError(
                    f"baseline {b}: {sources[base_owner[b]]} and {sources[m]} scored different cases/phases/regions"
                )
            for key, ra in a_rows.items():
                for metric in METRICS:
                    va, vb = ra.get(metric), b_rows[key].get(metric)
                    if va is None and vb is None:
                        continue
                    if not _close(va, vb):
                        raise CompareError(
                            f"the methods were not scored on the same targets: baseline {b} (the same input for "
                            f"both) scores {metric} {va} in {sources[base_owner[b]]} but {vb} in {sources[m]} for "
                            f"case {key[0]}, {key[1]}, {key[2]}; check that the bundles read the same phases "
                            "(target_keys, phase_source, phase_rule) and scale them alike (target_scale_reference)"
                        )
            notes.append(
                f"baseline {b}: identical scores from {base_owner[b]} and {m} ({len(a_rows)} case × phase × region "
                "rows): the same targets; shown once"
            )
    return notes


def baseline_names(rows: Sequence[Mapping], method: str) -> list[str]:
    """The rows' methods other than ``method`` itself and its ``<method>_first_draw``."""
    return [m for m in dict.fromkeys(r["method"] for r in rows) if m not in (method, f"{method}_first_draw")]


def _index(rows: Sequence[Mapping], method: str) -> dict[tuple, Mapping]:
    return {(str(r["case"]), r["phase"], r["region"]): r for r in rows if r["method"] == method}


def _close(a, b) -> bool:
    if a is None or b is None:
        return False
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))


def _fmt(metric: str, s: Mapping) -> str:
    if s["n"] == 0 or math.isnan(s["mean"]):
        return ""
    f = ".2f" if metric == "psnr" else ".3f"
    return f"{s['mean']:{f}} ± {s['std']:{f}}"


def build_table(rows_by_method: Mapping[str, list[dict]], info: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One row per phase × region × (method, then each trivial baseline once, from the first method that
    has it): ``mean``/``std``/``n`` per metric (:func:`summarize`), ``p_<metric>``, the paired Wilcoxon p
    (:func:`paired_wilcoxon`) against the best method of that phase and region (highest mean PSNR among
    the methods, not the baselines), and the method's ``info`` (sampler, steps, iterations, s/volume)."""
    info = info or {}
    methods = list(rows_by_method)
    groups: dict[str, list[dict]] = {m: [r for r in rows_by_method[m] if r["method"] == m] for m in methods}
    origin: dict[str, str] = {m: m for m in methods}
    for m in methods:
        for b in baseline_names(rows_by_method[m], m):
            if b not in groups:
                groups[b], origin[b] = [r for r in rows_by_method[m] if r["method"] == b], m
    all_rows = [r for rs in groups.values() for r in rs]
    metrics = [k for k in METRICS if any(k in r for r in all_rows)]
    phases = list(dict.fromkeys(r["phase"] for r in all_rows))
    regions = sorted({r["region"] for r in all_rows}, key=lambda x: (REGION_ORDER + (x,)).index(x))
    table = []
    for phase in phases:
        for region in regions:
            sel = {
                name: sorted(
                    (r for r in rs if r["phase"] == phase and r["region"] == region), key=lambda r: str(r["case"])
                )
                for name, rs in groups.items()
            }
            sel = {k: v for k, v in sel.items() if v}
            if not sel:
                continue
            stats = {name: summarize(rs, metrics) for name, rs in sel.items()}
            cands = [m for m in methods if m in sel and not math.isnan(stats[m][BEST_BY]["mean"])]
            best = max(cands, key=lambda m: stats[m][BEST_BY]["mean"]) if cands else None
            for name, rs in sel.items():
                row: dict[str, Any] = {
                    "phase": phase,
                    "region": region,
                    "method": name,
                    "kind": "method" if name in methods else f"baseline (from {origin[name]})",
                    "n": max(s["n"] for s in stats[name].values()) if metrics else len(rs),
                }
                for k in metrics:
                    row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_n"] = (
                        stats[name][k]["mean"],
                        stats[name][k]["std"],
                        stats[name][k]["n"],
                    )
                tests = paired_wilcoxon(rs, sel[best], metrics) if best and name != best else {}
                for k in metrics:
                    row[f"p_{k}"] = tests[k]["pvalue"] if k in tests else float("nan")
                row["best"] = name == best
                row["vs"] = best or ""
                row.update({k: v for k, v in info.get(name, {}).items()})
                table.append(row)
    return table


def markdown(table: Sequence[Mapping], header: Sequence[str]) -> str:
    """The comparison table in the papers' layout (mean ± std per metric) with the header lines."""
    metrics = [k for k in METRICS if any(f"{k}_mean" in r for r in table)]
    show = []
    for r in table:
        row = {
            "phase": r["phase"],
            "region": r["region"],
            "method": f"**{r['method']}**" if r.get("best") else r["method"],
            "n": r["n"],
            **{k: _fmt(k, {"mean": r[f"{k}_mean"], "std": r[f"{k}_std"], "n": r[f"{k}_n"]}) for k in metrics},
        }
        for k in ("psnr", "ssim"):
            if k in metrics:
                p = r.get(f"p_{k}")
                row[f"p {k} vs best"] = "best" if r.get("best") else ("" if p is None or math.isnan(p) else f"{p:.3g}")
        row["sampler, steps"] = f"{r['sampler']}, {r['steps']}" if r.get("sampler") else "—"
        row["train it"] = r.get("train_iterations") if r.get("train_iterations") is not None else "—"
        row["s / volume"] = f"{r['s_per_volume']:.1f}" if r.get("s_per_volume") is not None else "—"
        show.append(row)
    return "\n".join(header) + "\n\n" + format_table(show) + "\n"


def write_panels(
    out: Path,
    entries: Mapping[str, Mapping],
    evals: Mapping[str, Path],
    cases: Sequence[str],
    phase: str,
    inputs: Sequence[str],
    target_key: str,
) -> list[Path]:
    """``<out>/<case>.png`` per case: the inputs, each method's ``phase``, the target and the error maps
    (:func:`common.visualize.synthesis_panel`), on the slice with the largest lesion (else organ) area.
    ``entries``: case id -> its inference datalist entry (series key -> file), where ``target_key`` is
    the phase's ground truth and ``inputs`` the series shown (those the entry has)."""
    import nibabel as nib
    import numpy as np

    from common.visualize import best_slice, synthesis_panel

    def load(path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))

    def file(entry: Mapping, key: str) -> str | None:
        value = entry.get(key)
        return value if isinstance(value, str) and Path(value).is_file() else None

    written = []
    for cid in cases:
        entry = entries.get(cid, {})
        if not file(entry, target_key):
            log(f"panel of {cid}: no {target_key} file in its datalist entry, not drawn")
            continue
        target = load(file(entry, target_key))
        mask = next((load(file(entry, k)) > 0.5 for k in ("lesion_mask", "organ_mask") if file(entry, k)), None)
        z = best_slice(target.shape, mask)
        outputs = {f"{m} {phase}": load(evals[m] / cid / f"{phase}.nii.gz")[..., z] for m in evals}
        shown = {k: load(file(entry, k))[..., z] for k in inputs if file(entry, k)}
        path = out / f"{cid}.png"
        synthesis_panel(
            path, shown, outputs, {k: target[..., z] for k in outputs}, title=f"{cid}, slice {z}: {', '.join(evals)}"
        )
        written.append(path)
    return written


# ---------------------------------------------------------------- the command


def main(
    dataset_dir: str = "data/phantoms/prostate/prepared",
    methods: str | Sequence[str] | None = None,
    out: str = "compare_output",
    budget: str | None = None,
    num_iterations: int | None = None,
    batch_size: int | None = None,
    patch_size: Any = None,
    seed: int | None = None,
    lr: float | None = None,
    network_size: str | None = None,
    ckpt: str | None = None,
    device: str | None = None,
    panel_phase: str = "dce_early",
    task: str | None = None,
) -> dict:
    """Train (or take ``--ckpt``), infer and score every method; write the comparison table and panels.

    Args:
        dataset_dir: prepared cases + datalist.json (every method reads them; scored on the ``test`` section).
        methods: bundle names, comma-separated (folders of ``bundles/``, or bundle folders); default: the
            methods of the ``--budget`` file.
        out: ``<out>/<method>/models``, ``<out>/<method>/eval``, ``<out>/comparison.{md,csv,json}``, ``<out>/<case>.png``.
        budget: JSON file of training settings (common) and per-method overrides (see the module docstring).
        num_iterations, batch_size, patch_size, seed, lr, network_size: common settings over the file's.
        ckpt: ``method=PATH,...``: weights to evaluate instead of training that method.
        device: passed to every bundle (default: theirs, CUDA when present).
        panel_phase: the phase the panels show (the first phase when the methods do not have it).
        task: the task of the methods that have several (their contract's ``tasks``); default: the one
            whose outputs the other methods write (:func:`choose_task`).
    """
    t_start = time.time()
    if methods is None and budget and Path(budget).is_file():
        try:
            methods = list(json.loads(Path(budget).read_text()).get("methods", {}))
        except (ValueError, AttributeError):
            methods = None  # load_budget names the problem
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods or []) if m.strip()]
    known = [p.name for p in find_bundles()]
    if not methods:
        raise CompareError(f"--methods: name at least one bundle (bundles: {', '.join(known)})")
    contracts: dict[str, Contract] = {}
    for m in methods:
        try:
            bundle_dir(m)
            contracts[m] = read_contract(m)
        except FileNotFoundError as e:
            raise CompareError(f"--methods: {e}") from None
    contracts = {m: choose_task(m, contracts, task) for m in methods}
    data = Path(dataset_dir).expanduser().resolve()
    if not data.is_dir():
        raise CompareError(f"--dataset_dir {dataset_dir}: no such folder (make the phantoms with `make phantoms`)")
    out_dir = Path(out).expanduser().resolve()
    output_folder(out_dir, "out")
    ckpts = parse_ckpt(ckpt, methods)
    spec = load_budget(
        budget,
        dict(
            num_iterations=num_iterations,
            batch_size=batch_size,
            patch_size=patch_size,
            seed=seed,
            lr=lr,
            network_size=network_size,
        ),
    )
    unknown = [m for m in spec["methods"] if m not in methods]
    if unknown:
        log(f"budget: settings for {', '.join(unknown)} ignored (not in --methods)")
    source = f"--budget {budget}" if budget else "the budget"
    dev = {"device": device} if device else {}
    plans = {}
    for m in methods:
        train_o, infer_o = split_overrides(
            m, spec["common"], spec["methods"].get(m, {}), source, contracts[m].overrides
        )
        plans[m] = ({**train_o, **dev}, {**infer_o, **dev})
    targets = {}
    for m in methods:
        p = _parser(m, "evaluate")
        for k, v in plans[m][1].items():
            p[k] = v
        targets[m] = compared_targets(p, contracts[m])
    shared = check_configured_targets(targets)
    tasks = [f"{m}: {c.task}" for m, c in contracts.items() if c.task]
    log(
        f"{len(methods)} method(s) on {data}: {', '.join(methods)}; compared on {', '.join(shared)}; "
        f"common budget {spec['common']}" + (f"; task {', '.join(tasks)}" if tasks else "")
    )

    info: dict[str, dict] = {}
    rows_by_method: dict[str, list[dict]] = {}
    evals: dict[str, Path] = {}
    for m in methods:
        train_o, infer_o = plans[m]
        if m in ckpts:
            weights, train_s = ckpts[m], None
            log(f"{m}: using the given weights {weights} (not trained here)")
        else:
            weights, train_s = train_method(m, data, out_dir / m / "models", train_o)
        evals[m] = out_dir / m / "eval"
        # inference keeps what the checkpoint recorded (network_size) unless the method's own settings say otherwise
        infer_o = {k: v for k, v in infer_o.items() if k != "network_size" or k in spec["methods"].get(m, {})}
        info[m] = evaluate_method(m, data, weights, evals[m], infer_o)
        info[m]["train_iterations"] = trained_iterations(weights)
        info[m]["train_s"] = train_s
        info[m]["ckpt"] = str(weights)
        info[m]["task"] = contracts[m].task
        rows_by_method[m] = read_case_csv(evals[m] / "metrics.csv")

    sources = {m: str(evals[m] / "metrics.csv") for m in methods}
    rows_by_method, notes = restrict_to_shared_phases(rows_by_method)
    notes = check_same_targets(rows_by_method, sources) + notes
    table = build_table(rows_by_method, {m: _row_info(info[m]) for m in methods})
    cases = sorted({str(r["case"]) for r in rows_by_method[methods[0]] if r["method"] == methods[0]})
    compared = list(dict.fromkeys(r["phase"] for r in rows_by_method[methods[0]]))
    header = _header(data, methods, info, cases, spec, notes)
    write_case_csv(table, out_dir / "comparison.csv")
    with atomic_path(out_dir / "comparison.md") as tmp:
        tmp.write_text(markdown(table, header))
    save_json(
        {"header": header, "methods": info, "budget": spec, "cases": cases, "table": table}, out_dir / "comparison.json"
    )
    phase = panel_phase if panel_phase in compared else compared[0]
    first = bundle_config(
        workflow_files(methods[0], "evaluate"),
        {"dataset_dir": str(data), "datalist_section": "test", **plans[methods[0]][1]},
    )
    entries = {str(e.get("id")): e for e in first.get_parsed_content("datalist")}
    target = (contracts[methods[0]].output(phase) or contracts[methods[0]].outputs[0]).target or phase
    if target.startswith("@"):
        target = str(first.get_parsed_content(target[1:]))
    inputs = list(dict.fromkeys(k for m in methods for k in contracts[m].input_keys))
    panels = write_panels(out_dir, entries, evals, cases, phase, inputs, target)
    print(markdown(table, header))
    log(f"table: {out_dir / 'comparison.md'} (.csv, .json); panels: {', '.join(str(p) for p in panels)}")
    log(f"done in {time.time() - t_start:.0f} s")
    return {"table": table, "methods": info, "cases": cases, "panels": [str(p) for p in panels], "notes": notes}


def _row_info(i: Mapping) -> dict:
    return {k: i.get(k) for k in ("sampler", "steps", "train_iterations", "s_per_volume")}


def _header(data: Path, methods, info, cases, spec, notes: Sequence[str]) -> list[str]:
    lines = [
        f"# Comparison: {', '.join(methods)}",
        "",
        f"- data: `{data}`, test section, {len(cases)} case(s): {', '.join(cases)}",
        f"- run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node() or 'this machine'}, "
        f"device {', '.join(sorted({i['device'] for i in info.values()}))}",
        f"- common training budget: {json.dumps(spec['common'])}",
    ]
    for m in methods:
        i = info[m]
        trained = f"{i['train_iterations']} iterations" if i["train_iterations"] is not None else "iterations unknown"
        how = f"trained here in {i['train_s']:.0f} s" if i["train_s"] is not None else f"given weights {i['ckpt']}"
        lines.append(
            f"- {m}: {i['sampler']} sampler, {i['steps']} steps, {i['network_size']} network, {trained} ({how}); "
            + (f"task {i['task']}; " if i.get("task") else "")
            + f"inference {i['s_per_volume']:.1f} s per volume ({i['inference_s']:.1f} s for {i['n_test_cases']} case(s), "
            f"loading and scoring included); overrides {json.dumps(spec['methods'].get(m, {}))}"
        )
    lines += [f"- {n}" for n in notes]
    lines.append(
        f"- mean ± std over cases (sample std); p: paired Wilcoxon signed-rank test against the best method "
        f"(bold; highest mean {BEST_BY.upper()} among the methods) of each phase and region; all metrics' p in comparison.csv"
    )
    if cases:
        lines.append(
            f"- with {len(cases)} paired case(s) the smallest two-sided p the exact test can give is "
            f"{min(1.0, 2 / 2 ** len(cases)):.3g}"
        )
    return lines


if __name__ == "__main__":
    install_error_hook()  # a user error ends with one line (GADOFREE_DEBUG=1: the traceback)
    fire.Fire(main, serialize=lambda result: None)  # the table is printed; the returned dict is for callers
