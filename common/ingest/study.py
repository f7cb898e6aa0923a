"""A study's series sorted into roles, and the DCE time points in time order.

:func:`classify_study` applies the rules (:mod:`common.ingest.rules`) to the scanned series
(:func:`common.ingest.series.scan_study`), drops localizers and other planes, checks each
candidate's geometry, picks one series per role where several match (logging the choice), and
orders the DCE time points (``TT=<t>s`` in the description, else TriggerTime, else acquisition or
content time). Everything it found, chose and ignored goes into :attr:`StudySelection.report`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.ingest.adc import AdcPlan, plan_adc_fit
from common.ingest.errors import IngestError
from common.ingest.rules import Rules
from common.ingest.series import DicomSeries, Frame, SeriesGeometry, check_series, geometry_key, normal_angle_deg

log = logging.getLogger(__name__)

_TT_RE = re.compile(r"TT\s*=?\s*(\d+(?:\.\d+)?)\s*s", re.IGNORECASE)
AXIAL = np.array([0.0, 0.0, 1.0])


def parse_tt(description: str) -> float | None:
    """The ``TT=<t>s`` time (seconds) of a Siemens TWIST series description, or None."""
    m = _TT_RE.search(description or "")
    return float(m.group(1)) if m else None


@dataclass
class DceTimePoint:
    series: DicomSeries
    geom: SeriesGeometry
    frame: Frame
    time_s: float


@dataclass
class StudySelection:
    """The outcome of :func:`classify_study`.

    Attributes:
        patient: patient/case id.
        roles: role -> chosen series (single-series roles).
        geoms: role -> checked geometry of the chosen series.
        dce: time points in time order.
        time_source: where the DCE times came from.
        report: per-series records (folder, description, role, status, reason) for the manifest.
        choices: the choices made where several series matched a role.
        missing: optional roles with no series.
        adc_plan: when the ADC is fitted from the DWI (no ADC series, or ``adc_source="dwi"``): the
            DWI volumes to fit (:func:`common.ingest.adc.plan_adc_fit`); ``roles["adc"]`` is then the
            lowest-b DWI series. None when the scanner's ADC series is used.
    """

    patient: str
    roles: dict[str, DicomSeries]
    geoms: dict[str, SeriesGeometry]
    dce: list[DceTimePoint]
    time_source: str
    report: list[dict[str, Any]] = field(default_factory=list)
    choices: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    study_uid: str = ""
    adc_plan: AdcPlan | None = None

    @property
    def times_s(self) -> np.ndarray:
        return np.array([tp.time_s for tp in self.dce], dtype=np.float64)


def _describe(s: DicomSeries) -> str:
    return f"{s.number} {s.description!r} ({s.label})"


ADC_SOURCES = ("auto", "scanner", "dwi")


def classify_study(
    series: list[DicomSeries],
    rules: Rules,
    patient: str,
    adc_source: str = "auto",
    adc_min_b: float = 50.0,
    adc_max_b: float | None = None,
) -> StudySelection:
    """Assign roles to the scanned series of one patient (see the module docstring).

    The ADC: ``adc_source="auto"`` uses the scanner's ADC series and, when the study has none, plans
    its fit from the ``dwi`` series with b-values in ``[adc_min_b, adc_max_b]`` (s/mm^2;
    :func:`common.ingest.adc.plan_adc_fit`); ``"scanner"`` never fits; ``"dwi"`` always fits (the ADC
    series is ignored).

    Raises:
        IngestError: no DCE, a missing required role, a broken DCE time point, or a broken series
            that is the only candidate of a required role (a broken optional series is skipped with a
            warning and listed as missing); no ADC series and no DWI with two b-values to fit one from,
            a DWI with a single b-value or b-values missing from the tags.
    """
    if adc_source not in ADC_SOURCES:
        raise IngestError(f"unknown adc_source {adc_source!r} (known: {ADC_SOURCES})", patient)
    report: dict[int, dict[str, Any]] = {}
    all_series = list(series)

    def note(s: DicomSeries, role: str | None, status: str, reason: str) -> None:
        rec = s.summary()
        rec.update(role=role, status=status, reason=reason)
        report[id(s)] = rec

    # 1) pick one study when the patient folder holds several (the one with the most DCE matches)
    dce_rule = rules.role("dce")
    studies: dict[str, list[DicomSeries]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    if len(studies) > 1:

        def score(item):
            uid, ss = item
            return (sum(1 for s in ss if rules.classify(s.description, s.image_type)[0] == "dce"), len(ss))

        study_uid = max(studies.items(), key=score)[0]
        for uid, ss in studies.items():
            if uid != study_uid and uid:
                for s in ss:
                    note(
                        s,
                        None,
                        "ignored",
                        f"ignored: belongs to another study ({uid}); using the study with the most DCE series",
                    )
        series = [s for s in series if s.study_uid in (study_uid, "")]
        log.info("patient %s: %d studies found, using %s", patient, len(studies), study_uid)
    else:
        study_uid = next(iter(studies)) if studies else ""

    # 2) role by rule
    cands: dict[str, list[DicomSeries]] = {}
    for s in series:
        if not s.headers:
            names = ", ".join(n for n, _ in s.unreadable[:3])
            note(
                s,
                None,
                "ignored",
                f"ignored: no readable DICOM file ({names}): {s.unreadable[0][1] if s.unreadable else ''}",
            )
            continue
        role, why = rules.classify(s.description, s.image_type)
        if role is None:
            note(s, None, "ignored", why)
            continue
        cands.setdefault(role, []).append(s)
        note(s, role, "candidate", why)

    # 3) DCE: check every time point series, keep one grid, order in time
    dce_series = cands.get("dce", [])
    if not dce_series:
        raise IngestError(
            f"no DCE series found (rule 'dce' patterns {list(dce_rule.description)}); series seen: "
            + "; ".join(_describe(s) for s in series[:40]),
            patient,
        )
    checked: list[tuple[DicomSeries, SeriesGeometry]] = [(s, check_series(s, patient)) for s in dce_series]
    groups: dict[tuple, list[tuple[DicomSeries, SeriesGeometry]]] = {}
    for s, g in checked:
        groups.setdefault(geometry_key(g), []).append((s, g))
    best = max(groups.values(), key=lambda v: (sum(len(g.frames) for _, g in v), -min(s.number or 0 for s, _ in v)))
    stems = {_TT_RE.sub("", s.description).strip() for s, _ in best}
    bg = best[0][1]
    for v in groups.values():
        if v is not best:
            for s, g in v:
                if _TT_RE.sub("", s.description).strip() in stems:
                    raise IngestError(
                        f"DCE time point lies on another grid than the other {len(best)} time point series "
                        f"({g.cols}x{g.rows}x{len(g.positions)} vs {bg.cols}x{bg.rows}x{len(bg.positions)} voxels, "
                        f"first slice at {g.positions[0]:.2f} vs {bg.positions[0]:.2f} mm along the normal): a slice may be missing",
                        patient,
                        s.label,
                    )
                note(s, "dce", "ignored", "ignored: DCE series on another grid than the main dynamic series")
                log.warning(
                    "patient %s: DCE series %s ignored: on another grid than the main dynamic series",
                    patient,
                    _describe(s),
                )
    dce, time_source = _order_dce(best, patient)
    for s, _ in best:
        report[id(s)]["status"] = "chosen"
    ref_normal = best[0][1].normal
    dce_flip = next((s.flip_angle for s, _ in best if s.flip_angle is not None), None)

    # 4) the other roles: orientation, geometry check, then the prefer rule
    roles: dict[str, DicomSeries] = {}
    geoms: dict[str, SeriesGeometry] = {"dce": best[0][1]}
    choices: list[dict[str, Any]] = []
    missing: list[str] = []
    adc_plan: AdcPlan | None = None

    def in_plane(s: DicomSeries, role: str) -> bool:
        n = s.normal()
        ang = normal_angle_deg(n, ref_normal) if n is not None else 0.0
        if ang > rules.max_normal_angle_deg:
            note(
                s,
                role,
                "ignored",
                f"ignored: slice normal {ang:.1f} deg from the DCE normal (limit {rules.max_normal_angle_deg:g})",
            )
            return False
        return True

    for rule in rules.roles:
        if rule.role in ("dce", "dwi"):
            continue
        if rule.role == "adc" and adc_source == "dwi":
            for s in cands.get("adc", []):
                note(s, "adc", "ignored", "ignored: adc_source='dwi' (the ADC is fitted from the DWI)")
            cands["adc"] = []
        ok: list[tuple[DicomSeries, SeriesGeometry]] = []
        errors: list[IngestError] = []
        for s in cands.get(rule.role, []):
            n = s.normal()
            ang = normal_angle_deg(n, ref_normal) if n is not None else 0.0
            if ang > rules.max_normal_angle_deg:
                note(
                    s,
                    rule.role,
                    "ignored",
                    f"ignored: slice normal {ang:.1f} deg from the DCE normal (limit {rules.max_normal_angle_deg:g})",
                )
                continue
            try:
                g = check_series(s, patient)
            except IngestError as e:
                errors.append(e)
                note(s, rule.role, "ignored", f"ignored: {e.problem}")
                continue
            if len(g.frames) > 1:
                log.info(
                    "patient %s: %s has %d images per position; using the first", patient, _describe(s), len(g.frames)
                )
            ok.append((s, g))
        if not ok and rule.role == "adc" and adc_source != "scanner" and not errors:
            dwi = [s for s in cands.get("dwi", []) if in_plane(s, "dwi")]
            if dwi:
                adc_plan = plan_adc_fit(dwi, patient, adc_min_b, adc_max_b)
                first = adc_plan.images[0]
                roles["adc"], geoms["adc"] = first.series, first.geom
                for s in adc_plan.series:
                    bs = sorted({im.b for im in adc_plan.images if im.series is s})
                    report[id(s)]["status"] = "chosen"
                    report[id(s)]["reason"] += f"; the ADC is fitted from it (b = {bs})"
                for s in dwi:
                    if report[id(s)]["status"] != "chosen":
                        report[id(s)]["status"] = "ignored"
                        report[id(s)]["reason"] = "ignored: no b-value in the ADC fit range"
                log.info("patient %s: no ADC series; the ADC is fitted from the DWI b = %s", patient, adc_plan.b_used)
                continue
            if adc_source == "dwi":
                dwi_rule = rules.role("dwi")
                raise IngestError(
                    "adc_source='dwi' but no DWI series found (rule 'dwi' patterns "
                    f"{list(dwi_rule.description) if dwi_rule else []})",
                    patient,
                )
        if not ok:
            if errors and rule.role in rules.required:
                raise errors[0]
            if errors:  # an optional series (e.g. the high-b DWI) that is broken does not cost the study
                log.warning(
                    "patient %s: optional %s series skipped: %s", patient, rule.role, "; ".join(str(e) for e in errors)
                )
                missing.append(rule.role)
                continue
            if rule.role in rules.required:
                seen = [r for r in report.values() if r["role"] == rule.role]
                why = (
                    "; ".join(f"{r['folder']}: {r['reason']}" for r in seen)
                ) or f"no series description matches {list(rule.description)}"
                if rule.role == "adc" and adc_source != "scanner":
                    highb = [s for s in cands.get("dwi_highb", []) if s.headers]
                    if highb:  # the only diffusion series holds one b-value: say so, naming it
                        s = highb[0]
                        b = next((h.b_value for h in s.headers if h.b_value is not None), s.b_value)
                        raise IngestError(
                            "no adc series found and no multi-b DWI series to fit one from; this DWI series holds a "
                            f"single b-value ({'unknown' if b is None else f'{b:g}'} s/mm^2): an ADC needs at least two",
                            patient,
                            s.label,
                        )
                    why += "; no DWI series with two or more b-values to fit one from either"
                raise IngestError(f"no {rule.role} series found (required by the rules {rules.source}): {why}", patient)
            missing.append(rule.role)
            continue
        chosen, why = prefer_series(rule.prefer, ok, ref_normal, dce_flip)
        roles[rule.role] = chosen[0]
        geoms[rule.role] = chosen[1]
        report[id(chosen[0])]["status"] = "chosen"
        others = [s for s, _ in ok if s is not chosen[0]]
        for s in others:
            report[id(s)]["status"] = "ignored"
            report[id(s)]["reason"] = f"ignored: another {rule.role} series was chosen ({why})"
        if others:
            log.info(
                "patient %s: %s: chose %s over %s: %s",
                patient,
                rule.role,
                _describe(chosen[0]),
                ", ".join(_describe(s) for s in others),
                why,
            )
            choices.append(
                {
                    "role": rule.role,
                    "rule": rule.prefer,
                    "chosen": chosen[0].label,
                    "candidates": [s.label for s, _ in ok],
                    "why": why,
                }
            )
    for s in cands.get("dwi", []):
        if report[id(s)]["status"] == "candidate":
            report[id(s)]["status"] = "ignored"
            report[id(s)]["reason"] = (
                "ignored: the study's ADC series is used (the DWI is read only to fit a missing ADC)"
            )
    rep = [
        report[id(s)]
        for s in sorted(all_series, key=lambda s: (s.number if s.number is not None else 10**9, s.label))
        if id(s) in report
    ]
    return StudySelection(
        patient=patient,
        roles=roles,
        geoms=geoms,
        dce=dce,
        time_source=time_source,
        report=rep,
        choices=choices,
        missing=missing,
        study_uid=study_uid,
        adc_plan=adc_plan,
    )


def prefer_series(
    rule: str,
    ok: list[tuple[DicomSeries, SeriesGeometry]],
    ref_normal: np.ndarray | None = None,
    dce_flip: float | None = None,
):
    """Pick one ``(series, geometry)`` by the named rule (:data:`common.ingest.rules.PREFER_RULES`); returns it
    and a sentence saying why. ``ref_normal`` (the DCE plane) breaks slice-count ties where given;
    ``dce_flip`` serves ``flip_angle_closest_to_dce``."""
    if len(ok) == 1:
        return ok[0], "only candidate"

    def slices_key(item):
        s, g = item
        angle = normal_angle_deg(g.normal, ref_normal) if ref_normal is not None else 0.0
        return (-len(g.positions), angle, -(s.number or 0))

    if rule == "flip_angle_closest_to_dce" and dce_flip is not None and any(s.flip_angle is not None for s, _ in ok):
        best = min(
            ok,
            key=lambda it: (
                abs((it[0].flip_angle if it[0].flip_angle is not None else 1e9) - dce_flip),
                slices_key(it),
            ),
        )
        return best, f"flip angle {best[0].flip_angle:g} deg closest to the DCE's {dce_flip:g} deg"
    if rule == "highest_b" and any(s.b_value is not None for s, _ in ok):
        best = min(ok, key=lambda it: (-(it[0].b_value or -1), slices_key(it)))
        return best, f"highest b-value ({best[0].b_value:g})"
    if rule == "first":
        best = min(ok, key=lambda it: it[0].number or 0)
        return best, "first series number"
    if rule == "last":
        best = max(ok, key=lambda it: it[0].number or 0)
        return best, "last series number"
    best = min(ok, key=slices_key)
    plane = ", closest to the DCE plane" if ref_normal is not None else ""
    return best, f"most slices ({len(best[1].positions)}){plane}, latest series number"


def _order_dce(items: list[tuple[DicomSeries, SeriesGeometry]], patient: str) -> tuple[list[DceTimePoint], str]:
    """DCE time points in time order with times in seconds, and the source of the times."""
    pts: list[tuple[DicomSeries, SeriesGeometry, Frame]] = [(s, g, f) for s, g in items for f in g.frames]
    one_per_series = all(len(g.frames) == 1 for _, g in items)
    tts = [parse_tt(s.description) for s, _, _ in pts]
    trig = [f.trigger_time_ms for _, _, f in pts]
    acq = [f.acq_time_s for _, _, f in pts]
    cont = [f.content_time_s for _, _, f in pts]
    if one_per_series and all(t is not None for t in tts) and len(set(tts)) == len(tts):
        times, source = np.array(tts, float), "SeriesDescription TT=<t>s (seconds from the start of the dynamic series)"
    elif all(t is not None for t in trig) and len(set(trig)) == len(trig):
        times, source = np.array(trig, float) / 1000.0, "TriggerTime (seconds from the start of the dynamic series)"
    elif all(t is not None for t in acq) and len(set(acq)) == len(acq):
        a = np.array(acq, float)
        times, source = a - a.min(), "AcquisitionTime (seconds from the first time point)"
    elif all(t is not None for t in cont) and len(set(cont)) == len(cont):
        c = np.array(cont, float)
        times, source = c - c.min(), "ContentTime (seconds from the first time point)"
    else:
        if len(pts) < 2:
            raise IngestError(f"the DCE has a single time point ({pts[0][0].label}); at least 2 are needed", patient)
        raise IngestError(
            "cannot order the DCE time points: no distinct TT=<t>s in the descriptions, TriggerTime, AcquisitionTime or ContentTime",
            patient,
        )
    if len(pts) < 2:
        raise IngestError(f"the DCE has a single time point ({pts[0][0].label}); at least 2 are needed", patient)
    order = np.argsort(times, kind="stable")
    out = [DceTimePoint(pts[i][0], pts[i][1], pts[i][2], float(times[i])) for i in order]
    log.info(
        "patient %s: %d DCE time points, %.1f..%.1f s (%s)", patient, len(out), out[0].time_s, out[-1].time_s, source
    )
    return out, source
