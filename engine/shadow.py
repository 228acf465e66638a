"""Shadow runs: the same features classified with the current and a new rule set, and
what would change. Pure: features and engines in, a :class:`ShadowDiff` out; nothing is
read or written (``clm-stratify rules diff`` gathers the features and prints the diff).

A patient's *state* is its group, or ``no-recurrence`` when the rule set writes no
assessment for it (its own row and column of the transition matrix). A patient *moves*
when its state changes; a change of status alone (final <-> preliminary) is listed apart.

    >>> from engine.classify import Engine
    >>> from engine.features import Fact, Features
    >>> current = Engine.default()
    >>> f = Features(patient="Patient/a", liver_recurrence=Fact[bool](value=True), tumour_count=Fact[int](value=1),
    ...              largest_diameter_mm=Fact(value=45), extrahepatic_disease=Fact[bool](value=False),
    ...              prior_liver_resection=Fact[bool](value=True))
    >>> diff = shadow_run([f], current, current)
    >>> diff.moved, diff.unchanged, diff.notes[0]
    ((), 1, 'identical rule sets (same sha256): nothing can move')
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence

from engine.classify import Classification, Engine, RulesetRef
from engine.features import Fact, Features
from engine.ruleset import GROUP_IDS, Factor, RuleSet

NO_RECURRENCE = "no-recurrence"
#: Rows and columns of the transition matrix, in this order.
STATES: tuple[str, ...] = (*GROUP_IDS, NO_RECURRENCE)


@dataclass(frozen=True)
class FactorChange:
    """A factor whose state differs between the two rule sets for one patient."""

    factor: str
    label: str
    before: str                 # present | absent | unknown | "-" (the rule set has no such factor)
    after: str
    test_before: str | None     # ">= 50 mm": how the rule set tests it
    test_after: str | None
    value: str                  # what the features say ("49.9 mm", "at least 49.0 mm", "< 50 mm")


@dataclass(frozen=True)
class Move:
    """One patient whose state or status differs."""

    patient: str
    before: str                 # a group or no-recurrence
    before_status: str
    before_rule: str
    after: str
    after_status: str
    after_rule: str
    changes: tuple[FactorChange, ...]

    def to_json(self) -> dict:
        return {"patient": self.patient,
                "from": {"group": self.before, "status": self.before_status, "group_rule": self.before_rule},
                "to": {"group": self.after, "status": self.after_status, "group_rule": self.after_rule},
                "factors": [{"factor": c.factor, "label": c.label, "from": c.before, "to": c.after,
                             "test_from": c.test_before, "test_to": c.test_after, "value": c.value}
                            for c in self.changes]}


@dataclass(frozen=True)
class ShadowDiff:
    """What a new rule set would change, patient by patient, on the same features."""

    current: RulesetRef
    new: RulesetRef
    patients: int
    matrix: dict[str, dict[str, int]]     # current state -> new state -> patients
    moved: tuple[Move, ...]
    status_changed: tuple[Move, ...]
    notes: tuple[str, ...]

    @property
    def unchanged(self) -> int:
        return self.patients - len(self.moved) - len(self.status_changed)

    @property
    def changed(self) -> bool:
        return bool(self.moved or self.status_changed)

    def to_json(self) -> dict:
        ref = lambda r: {"id": r.id, "version": r.version, "sha256": r.sha256}  # noqa: E731
        return {"current": ref(self.current), "new": ref(self.new), "patients": self.patients,
                "states": list(STATES), "matrix": self.matrix, "moved": [m.to_json() for m in self.moved],
                "status_changed": [m.to_json() for m in self.status_changed], "unchanged": self.unchanged,
                "notes": list(self.notes)}


def state_of(result: Classification) -> str:
    """The group, or ``no-recurrence`` when no assessment would be written."""
    return result.group if result.assessed else NO_RECURRENCE


def pair_notes(current: RuleSet, new: RuleSet) -> tuple[str, ...]:
    """What the two rule sets as a pair mean for the assessments they would write."""
    notes = []
    if current.sha256 == new.sha256:
        notes.append("identical rule sets (same sha256): nothing can move")
    elif current.version == new.version and current.id == new.id:
        notes.append(f"warning: both rule sets are {new.id} {new.version} but differ: bump the new one's version "
                     "(an assessment names the rule set by id and version)")
    if current.id != new.id:
        notes.append(f"warning: the new rule set has another id ({new.id}, current {current.id}): its assessments "
                     f"would be written beside the current ones (identifier {new.id}/Patient/<id>), not replace them")
    return tuple(notes)


def shadow_run(features: Sequence[Features], current: Engine, new: Engine) -> ShadowDiff:
    """Classify ``features`` (mapped once) with both engines and compare."""
    before = current.classify_many(features)
    after = new.classify_many(features)
    return compare(features, before, after, current, new)


def compare(features: Sequence[Features], before: Sequence[Classification], after: Sequence[Classification],
            current: Engine, new: Engine) -> ShadowDiff:
    """The diff of two classifications of the same features (in the same order)."""
    if not len(features) == len(before) == len(after):
        raise ValueError("compare: features and both classifications must be of the same patients")
    matrix = {row: {col: 0 for col in STATES} for row in STATES}
    moved: list[Move] = []
    status_changed: list[Move] = []
    for f, b, a in zip(features, before, after):
        sb, sa = state_of(b), state_of(a)
        matrix[sb][sa] += 1
        if sb != sa or b.status != a.status:
            move = Move(patient=f.patient or "(no patient)", before=sb, before_status=b.status,
                        before_rule=b.group_rule, after=sa, after_status=a.status, after_rule=a.group_rule,
                        changes=_factor_changes(f, b, a, current.ruleset, new.ruleset))
            (moved if sb != sa else status_changed).append(move)
    return ShadowDiff(current=current.ref, new=new.ref, patients=len(features), matrix=matrix, moved=tuple(moved),
                      status_changed=tuple(status_changed), notes=pair_notes(current.ruleset, new.ruleset))


def _factor_changes(features: Features, before: Classification, after: Classification,
                    old: RuleSet, new: RuleSet) -> tuple[FactorChange, ...]:
    changes = []
    for fid in dict.fromkeys([*old.factors, *new.factors]):
        cb, ca = before.criteria.get(fid), after.criteria.get(fid)
        sb, sa = cb.state if cb else "-", ca.state if ca else "-"
        if sb == sa:
            continue
        fo, fn = old.factors.get(fid), new.factors.get(fid)
        factor = fn or fo
        changes.append(FactorChange(factor=fid, label=factor.label, before=sb, after=sa, test_before=_test(fo),
                                    test_after=_test(fn), value=describe(getattr(features, factor.feature), factor)))
    return tuple(changes)


def _test(factor: Factor | None) -> str | None:
    if factor is None:
        return None
    if factor.operator == "is_true":
        return "is true"
    return f"{factor.operator} {factor.threshold}" + (f" {factor.unit}" if factor.unit else "")


def describe(fact: Fact, factor: Factor) -> str:
    """What a fact says, with its bounds, in the factor's unit.

    >>> f = Factor(label="size", feature="largest_diameter_mm", operator=">=", threshold=50, unit="mm")
    >>> describe(Fact(value=Decimal("49.9")), f), describe(Fact(value=Decimal("49.0"), lower_bound=True), f)
    ('49.9 mm', 'at least 49.0 mm')
    >>> describe(Fact(at_most=Decimal(50), at_most_strict=True), f), describe(Fact(), f)
    ('< 50 mm', 'unknown')
    """
    unit = f" {factor.unit}" if factor.unit else ""
    if isinstance(fact.value, bool) or (fact.value is None and factor.operator == "is_true"):
        return {True: "yes", False: "no"}.get(fact.value, "unknown")
    parts = []
    if fact.value is not None:
        parts.append(f"at least {fact.value}{unit}" if fact.lower_bound else f"{fact.value}{unit}")
    if fact.at_most is not None:
        parts.append(f"{'<' if fact.at_most_strict else '<='} {_plain(fact.at_most)}{unit}")
    return ", ".join(parts) or "unknown"


def _plain(d: Decimal) -> str:
    """A bound as written without an exponent (``5E+1`` -> ``50``)."""
    return format(d, "f") if isinstance(d, Decimal) else str(d)
