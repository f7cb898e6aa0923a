"""Series-to-role rules: which DICOM series is the T2w, the ADC, the DCE, ...

The rules live in a JSON file a user can copy and edit (:data:`DEFAULT_RULES_PATH`, passed to the
ingest as ``rules=``/``--rules``). Layout::

    {
      "ignore":   {"description": [patterns...], "max_normal_angle_deg": 30},
      "required": ["dce", "t1_pre", ...],
      "roles": {
        "<role>": {"description": [patterns...], "exclude": [patterns...],
                   "image_type": ["ADC"], "image_type_any": false,
                   "case_sensitive": false, "prefer": "most_slices", "multi": false},
        ...
      }
    }

Patterns are shell-style (:mod:`fnmatch`) on ``SeriesDescription``. A series goes to the *first*
role (in file order) that matches it. ``prefer`` names the rule that picks one series when several
match a single-series role (see :data:`PREFER_RULES`); ``multi`` roles (the DCE, the multi-b ``dwi``)
keep every match. The ``dwi`` series (one holding several b-values, or one per b-value) are read only
when the study has no ``adc`` series: the ADC is then fitted from them (:mod:`common.ingest.adc`).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.ingest.errors import IngestError

DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.json")
#: the brain study rules (T1, T1c, T2, FLAIR) of :mod:`common.ingest.brain`, in the same format.
BRAIN_RULES_PATH = Path(__file__).with_name("brain_rules.json")

ROLES = ("t2w", "adc", "dwi_highb", "dwi", "pd", "t1_pre", "dce")
#: roles of a brain study (:func:`load_brain_rules`): T1 is the reference grid.
BRAIN_ROLES = ("t1", "t1c", "t2", "flair")
PREFER_RULES = ("most_slices", "flip_angle_closest_to_dce", "highest_b", "first", "last")


def _match(text: str, patterns: Sequence[str], case_sensitive: bool) -> str | None:
    """The first pattern of ``patterns`` that matches ``text`` (or None)."""
    for p in patterns:
        if case_sensitive:
            if fnmatch.fnmatchcase(text, p):
                return p
        elif fnmatch.fnmatchcase(text.lower(), p.lower()):
            return p
    return None


@dataclass(frozen=True)
class RoleRule:
    """How one role is recognised (see the module docstring)."""

    role: str
    description: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()
    image_type_any: bool = False
    case_sensitive: bool = False
    prefer: str = "most_slices"
    multi: bool = False

    def matches(self, description: str, image_type: Sequence[str] = ()) -> str | None:
        """Why this rule matches a series (a short text), or None when it does not."""
        description = description or ""
        if self.exclude and _match(description, self.exclude, self.case_sensitive):
            return None
        by_desc = _match(description, self.description, self.case_sensitive) if self.description else None
        words = {str(w).upper() for w in image_type}
        by_type = bool(self.image_type) and all(w.upper() in words for w in self.image_type)
        if self.image_type_any:
            if by_desc:
                return f"description matches {by_desc!r}"
            if by_type:
                return f"ImageType contains {list(self.image_type)}"
            return None
        if self.description and not by_desc:
            return None
        if self.image_type and not by_type:
            return None
        if not self.description and not self.image_type:
            return None
        parts = []
        if by_desc:
            parts.append(f"description matches {by_desc!r}")
        if by_type:
            parts.append(f"ImageType contains {list(self.image_type)}")
        return " and ".join(parts)


@dataclass(frozen=True)
class Rules:
    """Parsed rules (see :func:`load_rules`)."""

    roles: tuple[RoleRule, ...]
    ignore_description: tuple[str, ...] = ()
    max_normal_angle_deg: float = 30.0
    required: tuple[str, ...] = ("dce", "t1_pre")
    source: str = "<dict>"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def role(self, name: str) -> RoleRule | None:
        for r in self.roles:
            if r.role == name:
                return r
        return None

    def ignored_by(self, description: str) -> str | None:
        """The ignore pattern a description matches (case-insensitive), or None."""
        return _match(description or "", self.ignore_description, False)

    def classify(self, description: str, image_type: Sequence[str] = ()) -> tuple[str | None, str]:
        """``(role, reason)`` for a series; ``role`` is None when it is ignored or matches nothing."""
        pat = self.ignored_by(description)
        if pat:
            return None, f"ignored: description matches ignore pattern {pat!r}"
        for r in self.roles:
            why = r.matches(description, image_type)
            if why:
                return r.role, why
        return None, "ignored: no role rule matches its description"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw) if self.raw else {"source": self.source}


def load_rules(
    rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None,
    known_roles: Sequence[str] = ROLES,
    reference_role: str = "dce",
    default: str | os.PathLike = DEFAULT_RULES_PATH,
) -> Rules:
    """Read rules from a JSON path, a dict, or the packaged defaults (None: ``default``).

    ``known_roles`` are the role names a rules file may use and ``reference_role`` the one it must
    define (it gives the grid): the prostate DCE study by default, :func:`load_brain_rules` for a brain study.

    Raises:
        IngestError: on a missing/invalid file or an unknown role / prefer rule.
    """
    if isinstance(rules, Rules):
        return rules
    if rules is None:
        rules = default
    if isinstance(rules, Mapping):
        raw, source = dict(rules), "<dict>"
    else:
        path = Path(rules)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise IngestError(f"rules file {path} not found") from e
        except (OSError, json.JSONDecodeError) as e:
            raise IngestError(f"rules file {path}: cannot read JSON ({e})") from e
        source = str(path)
    if not isinstance(raw.get("roles"), Mapping) or not raw["roles"]:
        raise IngestError(f"rules {source}: needs a non-empty 'roles' mapping")
    roles = []
    for name, spec in raw["roles"].items():
        if name not in known_roles:
            raise IngestError(f"rules {source}: unknown role {name!r} (known: {', '.join(known_roles)})")
        spec = dict(spec or {})
        prefer = spec.get("prefer", "most_slices")
        if prefer not in PREFER_RULES:
            raise IngestError(
                f"rules {source}: role {name!r} has unknown prefer rule {prefer!r} (known: {PREFER_RULES})"
            )
        unknown = set(spec) - {
            "description",
            "exclude",
            "image_type",
            "image_type_any",
            "case_sensitive",
            "prefer",
            "multi",
            "_comment",
        }
        if unknown:
            raise IngestError(f"rules {source}: role {name!r} has unknown keys {sorted(unknown)}")
        as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v or ())  # noqa: E731
        roles.append(
            RoleRule(
                role=name,
                description=as_tuple(spec.get("description")),
                exclude=as_tuple(spec.get("exclude")),
                image_type=as_tuple(spec.get("image_type")),
                image_type_any=bool(spec.get("image_type_any", False)),
                case_sensitive=bool(spec.get("case_sensitive", False)),
                prefer=prefer,
                multi=bool(spec.get("multi", name == "dce")),
            )
        )
    if not any(r.role == reference_role for r in roles):
        raise IngestError(f"rules {source}: a {reference_role!r} role is required (it defines the reference grid)")
    ignore = dict(raw.get("ignore") or {})
    required = tuple(raw.get("required", ("dce", "t1_pre") if reference_role == "dce" else (reference_role,)))
    bad = [r for r in required if r not in known_roles]
    if bad:
        raise IngestError(f"rules {source}: unknown required roles {bad}")
    desc = ignore.get("description", ())
    return Rules(
        roles=tuple(roles),
        ignore_description=(desc,) if isinstance(desc, str) else tuple(desc),
        max_normal_angle_deg=float(ignore.get("max_normal_angle_deg", 30.0)),
        required=required,
        source=source,
        raw=raw,
    )


def load_brain_rules(rules: str | os.PathLike | Mapping[str, Any] | Rules | None = None) -> Rules:
    """The series-to-role rules of a brain study (roles :data:`BRAIN_ROLES`, reference ``t1``):
    ``rules`` as in :func:`load_rules`, default :data:`BRAIN_RULES_PATH`."""
    return load_rules(rules, known_roles=BRAIN_ROLES, reference_role="t1", default=BRAIN_RULES_PATH)
