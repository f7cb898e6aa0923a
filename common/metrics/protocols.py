"""Evaluation protocols: ours (one for every bundle) and each paper's, as a table in Python.

A protocol fixes how a synthesised volume is scored and which statistics are reported:

* ``scoring``: ``volume`` -- one row per case (metrics over the whole 3D volume; mean +- std over
  cases) or ``slice`` -- one row per scored 2D axial slice (mean +- std over all scored slices of all
  test cases; which slices count: :func:`common.handlers.metrics.scored_slices`).
* ``statistics``: ``wilcoxon`` (paired Wilcoxon signed-rank test of the model against each baseline)
  or ``kruskal_dunn`` (Shapiro-Wilk per method, then Kruskal-Wallis + Dunn/Bonferroni, or one-way
  ANOVA + Tukey HSD when every method's values are normal; :func:`common.metrics.stats.group_comparison`).
* ``normalisation``: always ours (the target phase's [0.5, 99.5] percentiles mapped to [0, 1] per
  case, :func:`common.handlers.metrics.channel_ranges`); the table says what each paper states and
  where it differs.

``protocol="ours"`` (the default of every evaluation) gives volume scoring and paired Wilcoxon, the
basis of our own comparison tables; ``protocol="paper"`` looks the bundle up in :data:`PAPER_PROTOCOLS`,
so a config passes only ``protocol`` (and the bundle name). What a paper does not state is said in its
``notes``, and ours is kept there.
"""

from __future__ import annotations

from typing import Mapping

__all__ = ["OURS", "PAPER_PROTOCOLS", "PROTOCOLS", "SCORINGS", "resolve_protocol"]

SCORINGS = ("volume", "slice")
PROTOCOLS = ("ours", "paper")

OURS: Mapping[str, str] = {
    "scoring": "volume",
    "statistics": "wilcoxon",
    "normalisation": "ours: per case and phase, the target's [0.5, 99.5] percentiles mapped to [0, 1]",
    "notes": "one row per case; mean +- std over cases; paired Wilcoxon of the model against each baseline",
}

PAPER_PROTOCOLS: dict[str, dict[str, str]] = {
    "resdce": {
        "scoring": "slice",
        "statistics": "wilcoxon",
        "normalisation": "not stated in a form we can reproduce: ours kept",
        "notes": "metrics per 2D slice over all test slices (as DCE-diff); slices without body excluded "
        "(scored_slices); paired Wilcoxon, per slice",
    },
    "dcediff": {
        "scoring": "slice",
        "statistics": "wilcoxon",
        "normalisation": "not stated in a form we can reproduce: ours kept",
        "notes": "the paper scores 1,104 test images (per 2D slice); slices without body excluded "
        "(scored_slices); phases: middle and last time point (--phase_rule dcediff_paper); paired Wilcoxon",
    },
    "ressrdiff": {
        "scoring": "slice",
        "statistics": "kruskal_dunn",
        "normalisation": "not stated in a form we can reproduce: ours kept",
        "notes": "the paper scores 2,668 test slices (per 2D slice); slices without body excluded "
        "(scored_slices); Shapiro-Wilk, then Kruskal-Wallis + Dunn with Bonferroni (one-way ANOVA + "
        "Tukey HSD when all methods are normal)",
    },
    "d3m": {
        "scoring": "volume",
        "statistics": "wilcoxon",
        "normalisation": "the paper clips each contrast to its [0.5, 99.5] percentiles (the bundle's "
        "pre-processing, clip=True); the scoring range is ours",
        "notes": "the paper reports per-subject figures on the BraSyn data and does not state per-slice "
        "scoring: volume scoring and paired Wilcoxon (ours) kept",
    },
    "iterunet": {
        "scoring": "volume",
        "statistics": "wilcoxon",
        "normalisation": "image metrics: ours; lesion metrics (enh_err, SCC, DTW) on TI-normalised "
        "intensities (common.metrics.kinetic.tinorm_stats), as the paper",
        "notes": "per case (image metrics) and per lesion (kinetic metrics); paired Wilcoxon",
    },
}


def resolve_protocol(
    protocol: str = "ours",
    bundle: str | None = None,
    scoring: str | None = None,
    statistics: str | None = None,
) -> dict[str, str]:
    """The protocol a report uses: ``{"protocol", "bundle", "scoring", "statistics", "normalisation", "notes"}``.

    Args:
        protocol: ``ours`` (:data:`OURS`) or ``paper`` (``PAPER_PROTOCOLS[bundle]``).
        bundle: the bundle name (``resdce``, ``dcediff``, ``ressrdiff``, ``d3m``, ``iterunet``); needed
            with ``protocol="paper"``.
        scoring, statistics: explicit choices that override the protocol's (``None``: the protocol's).

    Raises:
        ValueError naming the option and the allowed values.
    """
    from common.metrics.stats import STATISTICS

    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "paper":
        if bundle not in PAPER_PROTOCOLS:
            raise ValueError(
                f"--protocol paper needs the bundle's name, one of {sorted(PAPER_PROTOCOLS)}; got {bundle!r}"
            )
        base = PAPER_PROTOCOLS[bundle]
    else:
        base = OURS
    out = {"protocol": protocol, "bundle": bundle or "", **base}
    if scoring is not None:
        out["scoring"] = scoring
    if statistics is not None:
        out["statistics"] = statistics
    if out["scoring"] not in SCORINGS:
        raise ValueError(f"--scoring: expected one of {list(SCORINGS)}, got {out['scoring']!r}")
    if out["statistics"] not in STATISTICS:
        raise ValueError(f"--statistics: expected one of {list(STATISTICS)}, got {out['statistics']!r}")
    return out
