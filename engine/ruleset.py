"""The rule set file (``rules/resectability.yaml``) as validated, typed data.

A condition in the file is a small tree::

    {fact: state}                  the fact is in that state
    {fact: [state, state]}         the fact is in one of those states
    {all: [cond, ...]}             every condition holds
    {any: [cond, ...]}             at least one holds
    {fact_a: s, fact_b: t}         shorthand for all

    >>> parse_condition({"all": [{"liver_recurrence": "present"},
    ...                          {"tumour_count_ge_4": ["absent", "unknown"]}]},
    ...                 {"liver_recurrence": LIVER_STATES,
    ...                  "tumour_count_ge_4": FACTOR_STATES})
    All(items=(Leaf(fact='liver_recurrence', states=('present',)), Leaf(fact='tumour_count_ge_4', states=('absent', 'unknown'))))
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any as AnyType, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from engine.features import BOOLEAN_FEATURES, NUMERIC_FEATURES
from engine.filekind import WrongKindOfFileError, looks_like_terminology, top_level
from engine.yamlfile import DeclarativeFileError, load_model

GroupId = Literal["resectable", "borderline-resectable", "unresectable", "indeterminate"]
GROUP_IDS: tuple[str, ...] = GroupId.__args__  # type: ignore[attr-defined]

FACTOR_STATES = ("present", "absent", "unknown")
LIVER_STATES = ("present", "absent", "unknown")
TECHNICAL_STATES = ("resectable", "unresectable", "not-assessed", "in-doubt")
ADJUVANT_STATES = ("given", "not-given", "unknown")
RESECTION_STATES = ("recorded", "not-recorded")
IMAGING_STATES = ("current", "stale")

# The facts every condition may test besides the factors, and their states.
BASE_FACTS: dict[str, tuple[str, ...]] = {
    "liver_recurrence": LIVER_STATES,
    "technical_resectability": TECHNICAL_STATES,
    "adjuvant_chemotherapy": ADJUVANT_STATES,
    "prior_liver_resection": RESECTION_STATES,
    "imaging_measurements": IMAGING_STATES,
}
# States of a base fact that mean something is missing from the record (named in results).
MISSING_STATES = ("unknown", "not-assessed", "in-doubt", "not-recorded", "stale")


# --------------------------------------------------------------------------- conditions
class Leaf(BaseModel):
    model_config = ConfigDict(frozen=True)
    fact: str
    states: tuple[str, ...]


class All(BaseModel):
    model_config = ConfigDict(frozen=True)
    items: tuple["Condition", ...]


class Any(BaseModel):
    model_config = ConfigDict(frozen=True)
    items: tuple["Condition", ...]


Condition = Union[Leaf, All, Any]
All.model_rebuild()
Any.model_rebuild()


def parse_condition(raw: AnyType, domains: Mapping[str, tuple[str, ...]], path: str = "") -> Condition:
    """Turn the YAML form of a condition into a tree, checking facts and states.

    Raises ValueError whose message starts with the sub-path of the bad part.
    """
    where = path or "(condition)"
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: a condition is a non-empty mapping, found {raw!r}")
    parts: list[Condition] = []
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise ValueError(f"{sub}: expected a non-empty list of conditions")
            items = tuple(parse_condition(v, domains, f"{sub}[{i}]") for i, v in enumerate(value))
            parts.append(All(items=items) if key == "all" else Any(items=items))
            continue
        if key not in domains:
            raise ValueError(f"{sub}: unknown fact {key!r}; known facts: {', '.join(sorted(domains))}")
        states = value if isinstance(value, list) else [value]
        if not states:
            raise ValueError(f"{sub}: expected a state or a list of states")
        for s in states:
            if s not in domains[key]:
                raise ValueError(f"{sub}: {s!r} is not a state of {key}; "
                                 f"states: {', '.join(domains[key])}")
        parts.append(Leaf(fact=key, states=tuple(dict.fromkeys(states))))
    return parts[0] if len(parts) == 1 else All(items=tuple(parts))


def holds(cond: Condition, states: Mapping[str, object]) -> bool:
    """Whether a condition holds for the given fact states (plain Python).

    >>> holds(Leaf(fact="liver_recurrence", states=("present",)), {"liver_recurrence": "present"})
    True
    """
    if isinstance(cond, Leaf):
        return states.get(cond.fact) in cond.states
    if isinstance(cond, All):
        return all(holds(c, states) for c in cond.items)
    return any(holds(c, states) for c in cond.items)


def negate(cond: Condition, domains: Mapping[str, tuple[str, ...]]) -> Condition:
    """The condition's complement, without a negation operator (De Morgan over states).

    durable-rules loops on negation-only rules, so the engine never emits one: the
    complement of ``{fact: [a]}`` is ``{fact: [every other state]}``.
    """
    if isinstance(cond, Leaf):
        rest = tuple(s for s in domains[cond.fact] if s not in cond.states)
        if not rest:
            raise ValueError(f"condition on {cond.fact} covers every state; its complement is empty")
        return Leaf(fact=cond.fact, states=rest)
    if isinstance(cond, All):
        return Any(items=tuple(negate(c, domains) for c in cond.items))
    return All(items=tuple(negate(c, domains) for c in cond.items))


# --------------------------------------------------------------------------- the file
class Citation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str = Field(min_length=1)
    doi: str = Field(pattern=r"^10\.\d{4,9}/\S+$")
    pmid: str = Field(pattern=r"^\d+$")


class Cohort(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = Field(min_length=1)
    caveat: str = Field(min_length=1)


class Factor(BaseModel):
    """A prognostic factor: a threshold on a numeric feature, or a boolean feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str = Field(min_length=1)
    feature: str
    operator: Literal[">=", ">", "<=", "<", "is_true"]
    threshold: Decimal | None = None
    unit: str | None = None
    p_value: str | None = None

    @model_validator(mode="after")
    def _operator_fits_feature(self) -> "Factor":
        if self.feature in NUMERIC_FEATURES:
            if self.operator == "is_true":
                raise ValueError(f"feature {self.feature} is numeric: use >=, >, <= or <")
            if self.threshold is None or not self.threshold.is_finite() or self.threshold < 0:
                raise ValueError("a numeric factor needs a threshold: a finite number >= 0")
            if self.threshold != self.threshold.quantize(Decimal("0.001")):
                raise ValueError("a threshold may have at most 3 decimals")
        elif self.feature in BOOLEAN_FEATURES:
            if self.operator != "is_true" or self.threshold is not None:
                raise ValueError(f"feature {self.feature} is true/false: use operator is_true "
                                 "and no threshold")
        else:
            raise ValueError(f"unknown feature {self.feature!r}; features: "
                             f"{', '.join(NUMERIC_FEATURES + BOOLEAN_FEATURES)}")
        return self


class GroupRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: GroupId
    rule: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    when: AnyType
    reason: str = Field(min_length=1)


Percent = Annotated[Decimal, Field(ge=0, le=100)]


class Survival(BaseModel):
    """Cohort 5-year overall survival per group, in percent (cohort estimates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    outcome: str = Field(min_length=1)
    horizon_years: int = Field(gt=0)
    five_year_os_percent: dict[GroupId, Percent]
    p_value: str = Field(min_length=1)


class Status(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    final_when: AnyType
    preliminary_note: str = Field(min_length=1)


class Assessment(BaseModel):
    """Which patients get an assessment written at all (the others: ``no-recurrence``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    write_when: AnyType
    not_written_reason: str = Field(min_length=1)


class Recommendation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rule: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    when: AnyType
    text: str = Field(min_length=1)


class RuleSet(BaseModel):
    """Validated content of a rule set file. Conditions are parsed into trees."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Written to FHIR servers (RiskAssessment.method, identifier value): at most 64 characters.
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    title: str = Field(min_length=1)
    citation: Citation
    interpretation: str = Field(min_length=1)
    cohort: Cohort
    factors: dict[str, Factor] = Field(min_length=1)
    groups: list[GroupRule] = Field(min_length=1)
    group_labels: dict[GroupId, str]
    fact_labels: dict[str, str]
    survival: Survival
    status: Status
    assessment: Assessment
    recommendations: list[Recommendation] = Field(default_factory=list)
    missing_fact_texts: dict[str, str]
    # How urgently a result asks for attention where it is shown at the point of care (a
    # CDS Hooks card's indicator), per group and status.
    card_indicators: dict[GroupId, dict[Literal["final", "preliminary"], Literal["info", "warning", "critical"]]]

    _group_conditions: tuple = PrivateAttr(default=())
    _final_when: AnyType = PrivateAttr(default=None)
    _write_when: AnyType = PrivateAttr(default=None)
    _recommendation_conditions: tuple = PrivateAttr(default=())

    @field_validator("group_labels")
    @classmethod
    def _every_group_labelled(cls, v: dict[str, str]) -> dict[str, str]:
        missing = [g for g in GROUP_IDS if not (v.get(g) or "").strip()]
        if missing:
            raise ValueError(f"no label for {', '.join(missing)}")
        return v

    @field_validator("card_indicators")
    @classmethod
    def _every_group_indicated(cls, v: dict) -> dict:
        missing = [f"{g} {s}" for g in GROUP_IDS for s in ("final", "preliminary") if s not in v.get(g, {})]
        if missing:
            raise ValueError(f"no indicator for {', '.join(missing)}")
        return v

    @field_validator("fact_labels")
    @classmethod
    def _every_fact_labelled(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(BASE_FACTS))
        missing = [f for f in BASE_FACTS if not (v.get(f) or "").strip()]
        if unknown or missing:
            raise ValueError("; ".join(filter(None, [unknown and f"unknown facts: {', '.join(unknown)}",
                                                    missing and f"no label for {', '.join(missing)}"])))
        return v

    @field_validator("factors")
    @classmethod
    def _factor_ids(cls, v: dict[str, Factor]) -> dict[str, Factor]:
        for fid in v:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", fid):
                raise ValueError(f"factor id {fid!r}: letters, digits and _ only, starting with a letter")
            if fid in BASE_FACTS or fid in ("group", "all", "any", "sid", "fid", "kind"):
                raise ValueError(f"factor id {fid!r} is reserved")
        return v

    @model_validator(mode="after")
    def _conditions(self) -> "RuleSet":
        base = {**BASE_FACTS, **{f: FACTOR_STATES for f in self.factors}}
        with_group = {**base, "group": GROUP_IDS}
        parsed_groups = []
        for i, g in enumerate(self.groups):
            parsed_groups.append(parse_condition(g.when, base, f"groups[{i}].when"))
        rule_ids = [g.rule for g in self.groups] + [r.rule for r in self.recommendations]
        dupes = sorted({r for r in rule_ids if rule_ids.count(r) > 1})
        if dupes:
            raise ValueError(f"rule ids must be unique: {', '.join(dupes)}")
        final_when = parse_condition(self.status.final_when, base, "status.final_when")
        write_when = parse_condition(self.assessment.write_when, base, "assessment.write_when")
        recs = [parse_condition(r.when, with_group, f"recommendations[{i}].when")
                for i, r in enumerate(self.recommendations)]
        missing = [k for k in list(base) if k not in self.missing_fact_texts]
        if missing:
            raise ValueError(f"missing_fact_texts: no text for {', '.join(missing)}")
        self._group_conditions = tuple(parsed_groups)
        self._final_when = final_when
        self._write_when = write_when
        self._recommendation_conditions = tuple(recs)
        return self

    # Parsed trees (set by the validator above).
    @property
    def group_conditions(self) -> tuple[Condition, ...]:
        return self._group_conditions

    @property
    def final_when(self) -> Condition:
        return self._final_when

    @property
    def write_when(self) -> Condition:
        return self._write_when

    @property
    def recommendation_conditions(self) -> tuple[Condition, ...]:
        return self._recommendation_conditions

    @property
    def fact_domains(self) -> dict[str, tuple[str, ...]]:
        return {**BASE_FACTS, **{f: FACTOR_STATES for f in self.factors}}

    def survival_percent(self, group: str) -> Decimal | None:
        return self.survival.five_year_os_percent.get(group)

    @property
    def sha256(self) -> str:
        """Hash of the validated content (stable across YAML formatting)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def load_ruleset(path: Path | str | None = None) -> RuleSet:
    """Load and validate a rule set file (the project's default when ``path`` is None).
    A terminology file given as a rule set is named as such (:class:`WrongKindOfFileError`)
    instead of with every field it lacks."""
    from rules import DEFAULT_RULESET

    try:
        return load_model(path or DEFAULT_RULESET, RuleSet)
    except DeclarativeFileError:
        if path is not None and looks_like_terminology(top_level(path)):
            raise WrongKindOfFileError(path, "is a terminology file, not a rule set: "
                                             "give it with --terminology") from None
        raise
