"""Per-case metric tables, summaries and paired tests.

A "row" is one case: a mapping such as ``{"case": "ProstateX-0001", "psnr": 31.2, "ssim": 0.91}``.
Numeric columns are the metrics; the case identifier column (default ``"case"``) and any non-numeric
column are carried along but never summarised. Missing values and NaN are left out of every statistic.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import f_oneway, kruskal, norm, rankdata, shapiro, tukey_hsd, wilcoxon

from common.io import atomic_path

__all__ = [
    "write_case_csv",
    "read_case_csv",
    "metric_names",
    "summarize",
    "summary_rows",
    "write_summary",
    "paired_wilcoxon",
    "kruskal_wallis",
    "dunn_test",
    "anova_tukey",
    "group_comparison",
    "STATISTICS",
    "format_table",
]

STATISTICS = ("wilcoxon", "kruskal_dunn")
"""Statistics a report can run: ``wilcoxon`` (paired Wilcoxon of the model against each baseline,
:func:`paired_wilcoxon`) or ``kruskal_dunn`` (Res-SRDiff's unpaired group comparison of all methods,
:func:`group_comparison`: Shapiro-Wilk, then Kruskal-Wallis + Dunn/Bonferroni, or one-way ANOVA +
Tukey HSD when every group is normal)."""


def _columns(rows: Iterable[Mapping]) -> list[str]:
    """Union of the keys of all rows, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(str(k), None)
    return list(cols)


def _number(v: Any) -> float | None:
    """``v`` as a float if it is numeric (numbers, numpy scalars, numeric strings); else None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, numbers.Number):
        return float(v)
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:  # numpy / torch scalar
        return _number(v.item())
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def write_case_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write one CSV row per case, atomically; the header is the union of all keys (first-seen order),
    a key missing from a row is an empty cell. Floats are written with full precision (``repr``)."""
    cols = _columns(rows)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            for r in rows:
                w.writerow(
                    {
                        str(k): (v.item() if hasattr(v, "item") and getattr(v, "size", 2) == 1 else v)
                        for k, v in r.items()
                    }
                )
    return Path(path)


def read_case_csv(path: str | os.PathLike, case_key: str = "case") -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_case_csv`; numeric cells become floats (except the
    ``case_key`` column, kept as text so "0001" stays "0001"), empty cells are dropped."""
    with open(path, newline="") as f:
        out = []
        for r in csv.DictReader(f):
            out.append(
                {k: (_number(v) if k != case_key and _number(v) is not None else v) for k, v in r.items() if v != ""}
            )
    return out


def metric_names(rows: Sequence[Mapping], case_key: str = "case") -> list[str]:
    """Columns (first-seen order) whose every present value is numeric, except ``case_key``."""
    names = []
    for c in _columns(rows):
        if c == case_key:
            continue
        vals = [r[c] for r in rows if c in r and r[c] is not None and r[c] != ""]
        if vals and all(_number(v) is not None for v in vals):
            names.append(c)
    return names


def _values(rows: Sequence[Mapping], metric: str) -> np.ndarray:
    v = np.array([_number(r.get(metric)) for r in rows if _number(r.get(metric)) is not None], dtype=np.float64)
    return v[np.isfinite(v)]


def summarize(
    rows: Sequence[Mapping], metrics: Sequence[str] | None = None, case_key: str = "case"
) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation (ddof=1; 0.0 for n = 1) and count per metric.

    Returns:
        ``{metric: {"mean": float, "std": float, "n": int}}`` (``nan`` mean/std when n = 0).
    """
    out = {}
    for m in metrics if metrics is not None else metric_names(rows, case_key):
        v = _values(rows, m)
        n = int(v.size)
        out[m] = {
            "mean": float(v.mean()) if n else float("nan"),
            "std": float(v.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan")),
            "n": n,
        }
    return out


def summary_rows(summary: Mapping[str, Mapping[str, float]], floatfmt: str = ".4g") -> list[dict[str, Any]]:
    """Summary as table rows ``{"metric", "mean", "std", "n", "mean ± std"}``."""
    return [
        {
            "metric": k,
            "mean": s["mean"],
            "std": s["std"],
            "n": s["n"],
            "mean ± std": f"{s['mean']:{floatfmt}} ± {s['std']:{floatfmt}}",
        }
        for k, s in summary.items()
    ]


def write_summary(summary: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Write a :func:`summarize` result atomically: ``.md`` -> markdown table, anything else -> CSV
    with columns ``metric, mean, std, n``."""
    path = Path(path)
    if path.suffix.lower() in (".md", ".markdown"):
        text = format_table(summary_rows(summary), columns=["metric", "mean ± std", "n"]) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "mean", "std", "n"])
        for k, s in summary.items():
            w.writerow([k, repr(float(s["mean"])), repr(float(s["std"])), int(s["n"])])
        text = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def paired_wilcoxon(
    rows_a: Sequence[Mapping],
    rows_b: Sequence[Mapping],
    metrics: Sequence[str] | None = None,
    case_key: str = "case",
    alternative: str = "two-sided",
) -> dict[str, dict[str, float]]:
    """Paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) of method A vs method B per metric.

    Cases are paired by ``case_key``; a case missing from either method, or with a missing/NaN value,
    is left out of that metric. With ``alternative="greater"`` the hypothesis is A > B.

    Returns:
        ``{metric: {"statistic": float, "pvalue": float, "n": int, "median_diff": float}}`` where
        ``median_diff`` is the median of A - B; ``nan`` statistic/p-value when fewer than one non-zero
        difference is available.
    """
    a_by = {str(r[case_key]): r for r in rows_a if case_key in r}
    b_by = {str(r[case_key]): r for r in rows_b if case_key in r}
    if not a_by or not b_by:
        raise ValueError(f"paired_wilcoxon: rows need a {case_key!r} column to pair cases")
    common = [c for c in a_by if c in b_by]
    if metrics is None:
        mb = set(metric_names(rows_b, case_key))
        metrics = [m for m in metric_names(rows_a, case_key) if m in mb]
    out = {}
    for m in metrics:
        pairs = [(_number(a_by[c].get(m)), _number(b_by[c].get(m))) for c in common]
        d = np.array(
            [a - b for a, b in pairs if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        )
        stat = p = float("nan")
        if d.size and np.any(d != 0):
            res = wilcoxon(d, alternative=alternative)
            stat, p = float(res.statistic), float(res.pvalue)
        out[m] = {
            "statistic": stat,
            "pvalue": p,
            "n": int(d.size),
            "median_diff": float(np.median(d)) if d.size else float("nan"),
        }
    return out


def _groups(groups: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Finite float64 values per group (NaN / missing left out), groups with no value dropped."""
    out = {}
    for name, vals in groups.items():
        v = np.array([x for x in (_number(x) for x in vals) if x is not None], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            out[str(name)] = v
    return out


def kruskal_wallis(groups: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Kruskal-Wallis H test (``scipy.stats.kruskal``, tie-corrected) of k >= 2 independent groups.

    .. math::

        H = \\frac{\\frac{12}{N(N+1)} \\sum_i R_i^2 / n_i - 3(N+1)}{1 - \\sum_s (t_s^3 - t_s)/(N^3 - N)}

    with R_i the rank sum of group i in the pooled sample of size N and t_s the size of each group of
    tied values; p from chi-squared with k - 1 degrees of freedom.

    Returns:
        ``{"statistic", "pvalue", "df", "n"}`` (``nan`` statistic/p-value with fewer than 2 groups or
        when all values are equal).
    """
    g = _groups(groups)
    n = int(sum(v.size for v in g.values()))
    stat = p = float("nan")
    if len(g) >= 2 and np.ptp(np.concatenate(list(g.values()))) > 0:
        res = kruskal(*g.values())
        stat, p = float(res.statistic), float(res.pvalue)
    return {"statistic": stat, "pvalue": p, "df": max(len(g) - 1, 0), "n": n}


def dunn_test(groups: Mapping[str, Sequence[float]], correction: str = "bonferroni") -> dict[str, dict[str, float]]:
    """Dunn's (1964) all-pairs test after Kruskal-Wallis, tie-corrected, Bonferroni-adjusted.

    All N values are ranked together (ties get their average rank); with mean rank
    :math:`\\bar R_i` and size :math:`n_i` of group i and :math:`t_s` the size of each group of tied
    values,

    .. math::

        z_{ij} = \\frac{\\bar R_i - \\bar R_j}
            {\\sqrt{\\Big(\\frac{N(N+1)}{12} - \\frac{\\sum_s (t_s^3 - t_s)}{12 (N-1)}\\Big)
            \\Big(\\frac{1}{n_i} + \\frac{1}{n_j}\\Big)}},
        \\qquad p_{ij} = 2\\,(1 - \\Phi(|z_{ij}|)),

    and the Bonferroni-adjusted ``p_adj = min(1, m p)`` with m = k(k-1)/2 comparisons
    (``correction="none"``: unadjusted). Two-sided. scipy has no Dunn test; this is the textbook
    formula (Dunn 1964; Zar, Biostatistical Analysis, 5th ed., sec. 11.5).

    Args:
        groups: name -> values (independent samples; NaN left out).

    Returns:
        ``{"A vs B": {"z", "pvalue", "pvalue_adj", "mean_rank_a", "mean_rank_b"}}`` for every pair in
        the groups' order (z > 0: A ranks higher).
    """
    if correction not in ("bonferroni", "none"):
        raise ValueError(f"dunn_test: correction must be 'bonferroni' or 'none', got {correction!r}")
    g = _groups(groups)
    names = list(g)
    pooled = np.concatenate([g[k] for k in names]) if names else np.zeros(0)
    n = pooled.size
    ranks = rankdata(pooled)
    bounds = np.cumsum([0] + [g[k].size for k in names])
    mean_rank = {k: float(ranks[bounds[i] : bounds[i + 1]].mean()) for i, k in enumerate(names)}
    _, ties = np.unique(pooled, return_counts=True)
    tie_term = float(np.sum(ties.astype(np.float64) ** 3 - ties)) / (12.0 * (n - 1)) if n > 1 else 0.0
    var = n * (n + 1) / 12.0 - tie_term
    m = len(names) * (len(names) - 1) // 2
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            se = math.sqrt(var * (1.0 / g[a].size + 1.0 / g[b].size)) if var > 0 else 0.0
            z = (mean_rank[a] - mean_rank[b]) / se if se > 0 else float("nan")
            p = float(2.0 * norm.sf(abs(z))) if math.isfinite(z) else float("nan")
            adj = min(1.0, p * m) if correction == "bonferroni" and math.isfinite(p) else p
            out[f"{a} vs {b}"] = {
                "z": float(z),
                "pvalue": p,
                "pvalue_adj": adj,
                "mean_rank_a": mean_rank[a],
                "mean_rank_b": mean_rank[b],
            }
    return out


def anova_tukey(groups: Mapping[str, Sequence[float]]) -> dict:
    """One-way ANOVA (``scipy.stats.f_oneway``) and Tukey's HSD (``scipy.stats.tukey_hsd``) of k >= 2
    groups: ``{"anova": {"statistic", "pvalue"}, "pairs": {"A vs B": {"diff", "pvalue"}}}`` with
    ``diff`` = mean(A) - mean(B) and the Tukey-adjusted p-value."""
    g = _groups(groups)
    names = list(g)
    out: dict = {"anova": {"statistic": float("nan"), "pvalue": float("nan")}, "pairs": {}}
    if len(names) < 2 or any(v.size < 2 for v in g.values()):
        return out
    a = f_oneway(*g.values())
    out["anova"] = {"statistic": float(a.statistic), "pvalue": float(a.pvalue)}
    t = tukey_hsd(*g.values())
    for i, x in enumerate(names):
        for j in range(i + 1, len(names)):
            out["pairs"][f"{x} vs {names[j]}"] = {
                "diff": float(g[x].mean() - g[names[j]].mean()),
                "pvalue": float(t.pvalue[i, j]),
            }
    return out


def group_comparison(groups: Mapping[str, Sequence[float]], alpha: float = 0.05) -> dict:
    """Res-SRDiff's statistics for one metric over k methods (independent groups).

    Shapiro-Wilk (``scipy.stats.shapiro``) on every group; when every group has n >= 3 and
    p >= ``alpha`` (normal), one-way ANOVA + Tukey HSD (:func:`anova_tukey`), otherwise Kruskal-Wallis
    (:func:`kruskal_wallis`) + Dunn with Bonferroni (:func:`dunn_test`).

    Returns:
        ``{"normal": bool, "shapiro": {group: p}, "test": "anova_tukey"|"kruskal_dunn",
        "omnibus": {"statistic", "pvalue"}, "pairs": {"A vs B": {..., "pvalue_adj"}}}``; every pair
        carries ``pvalue_adj`` (Tukey's or Bonferroni's adjusted p-value).
    """
    g = _groups(groups)
    sw = {}
    for k, v in g.items():
        sw[k] = float(shapiro(v).pvalue) if v.size >= 3 and np.ptp(v) > 0 else float("nan")
    normal = bool(g) and all(math.isfinite(p) and p >= alpha for p in sw.values())
    if normal and len(g) >= 2:
        at = anova_tukey(g)
        pairs = {k: {**v, "pvalue_adj": v["pvalue"]} for k, v in at["pairs"].items()}
        return {"normal": True, "shapiro": sw, "test": "anova_tukey", "omnibus": at["anova"], "pairs": pairs}
    kw = kruskal_wallis(g)
    return {
        "normal": normal,
        "shapiro": sw,
        "test": "kruskal_dunn",
        "omnibus": {"statistic": kw["statistic"], "pvalue": kw["pvalue"]},
        "pairs": dunn_test(g),
    }


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A compact markdown table, one row per mapping (e.g. model vs trivial baseline).

    Args:
        rows: mappings; the columns are the union of their keys (or ``columns``).
        columns: column order; missing cells are empty.
        floatfmt: format spec for floats (ints and strings are written as they are).

    Example::

        >>> print(format_table([{"method": "model", "psnr": 31.234}, {"method": "baseline", "psnr": 25.0}]))
        | method | psnr |
        |---|---|
        | model | 31.23 |
        | baseline | 25 |
    """
    cols = list(columns) if columns is not None else _columns(rows)

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (bool, np.bool_)) or isinstance(v, (int, np.integer)):
            return str(v)
        x = _number(v) if not isinstance(v, str) else None
        return format(x, floatfmt) if x is not None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
