"""Features in, classification out: the rule set fired by durable_rules, with its trace.

    >>> from engine.features import Features, Fact
    >>> engine = Engine.default()
    >>> result = engine.classify(Features(
    ...     liver_recurrence=Fact[bool](value=True, refs=("Condition/c1",)),
    ...     tumour_count=Fact[int](value=4, refs=("Observation/o1",)),
    ...     largest_diameter_mm=Fact(value=12),
    ...     extrahepatic_disease=Fact[bool](value=False)))
    >>> result.group, result.status, result.criteria_values()
    ('borderline-resectable', 'preliminary', {'tumour_count_ge_4': True, 'largest_ge_50mm': False, 'extrahepatic_disease': False})
"""

from __future__ import annotations

import itertools
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any as AnyType, Literal, Sequence

from dataclasses import dataclass, fields

from engine.compile import (DECIDED_KIND, FEATURES_KIND, STATES_KIND, CompiledRuleset, compile_ruleset,
                            post_value, representative_value)
from engine.durable_session import DurableRuleset
from engine.features import Fact, Features
from engine.ruleset import (BASE_FACTS, FACTOR_STATES, MISSING_STATES, GroupId, RuleSet, holds,
                            load_ruleset)


class RulesetInconsistentError(RuntimeError):
    """The rule set did not produce exactly one group / status / factor state."""


@dataclass(frozen=True, slots=True)
class Criterion:
    """One fact or factor as the engine saw it, with its evidence.

    The result types are plain frozen dataclasses: they are built from values that are
    already validated (Features, RuleSet), millions of times in a population run;
    :meth:`Classification.to_json` is their documented boundary."""

    id: str
    label: str
    state: str
    value: AnyType = None
    operator: str | None = None
    threshold: Decimal | None = None
    unit: str | None = None
    refs: tuple[str, ...] = ()
    note: str | None = None
    rule: str | None = None  # the durable rule that decided the state (factors only)


@dataclass(frozen=True, slots=True)
class MissingFact:
    fact: str
    text: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Recommendation:
    rule: str
    text: str


@dataclass(frozen=True, slots=True)
class CohortSurvival:
    group: str
    five_year_os_percent: Decimal
    p_value: str | None
    caveat: str
    outcome: str
    horizon_years: int


@dataclass(frozen=True, slots=True)
class RulesetRef:
    id: str
    version: str
    sha256: str
    title: str
    doi: str
    pmid: str
    citation: str


@dataclass(frozen=True, slots=True)
class Classification:
    """The engine's answer with everything needed to explain it."""

    patient: str | None
    group: GroupId
    group_label: str
    group_rule: str
    reason: str
    status: Literal["final", "preliminary"]
    status_note: str | None
    criteria: dict[str, Criterion]       # the prognostic factors, in rule-set order
    facts: dict[str, Criterion]          # liver recurrence, technical resectability, adjuvant chemo
    missing: tuple[MissingFact, ...]
    recommendations: tuple[Recommendation, ...]
    rules_fired: tuple[str, ...]
    cohort_survival: CohortSurvival | None
    ruleset: RulesetRef
    warnings: tuple[str, ...]
    assessed: bool = True                 # False: the rule set writes no assessment (no recurrence)
    not_assessed_reason: str | None = None

    def criteria_values(self) -> dict[str, bool | None]:
        """Each factor as true (present) / false (absent) / None (unknown)."""
        return {k: {"present": True, "absent": False}.get(c.state) for k, c in self.criteria.items()}

    def evidence_refs(self) -> tuple[str, ...]:
        """Every resource reference behind any fact, without duplicates, in order."""
        refs = itertools.chain.from_iterable(c.refs for c in (*self.criteria.values(), *self.facts.values()))
        return tuple(dict.fromkeys(refs))

    def to_json(self) -> dict:
        """The documented JSON output (README, 'JSON output')."""
        return {
            "patient": self.patient,
            "group": self.group,
            "group_label": self.group_label,
            "status": self.status,
            "reason": self.reason,
            "criteria": self.criteria_values(),
            "evidence": {k: _json(c) for k, c in {**self.criteria, **self.facts}.items()},
            "missing": [_json(m) for m in self.missing],
            "recommendations": [_json(r) for r in self.recommendations],
            "cohort_survival": _json(self.cohort_survival) if self.cohort_survival else None,
            "rules_fired": list(self.rules_fired),
            "group_rule": self.group_rule,
            "status_note": self.status_note,
            "ruleset": _json(self.ruleset),
            "warnings": list(self.warnings),
            "assessed": self.assessed,
            "not_assessed_reason": self.not_assessed_reason,
        }


def _json_value(v: AnyType) -> AnyType:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return v


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _json(obj: AnyType) -> dict:
    """A result dataclass as JSON-ready data (decimals as exact strings). Its fields hold
    immutable scalars and tuples only, so no deep copy (``dataclasses.asdict``) is needed."""
    names = _FIELD_NAMES.get(type(obj))
    if names is None:
        names = _FIELD_NAMES[type(obj)] = tuple(f.name for f in fields(obj))
    return {k: _json_value(getattr(obj, k)) for k in names}


def _fact_state(fact: str, f: Fact) -> str:
    if fact == "technical_resectability":
        return f.value if f.known else "not-assessed"
    if fact == "adjuvant_chemotherapy":
        return {True: "given", False: "not-given"}.get(f.value, "unknown")
    if fact == "prior_liver_resection":
        return "recorded" if f.value is True else "not-recorded"
    if fact == "imaging_measurements":
        return "stale" if f.value is False else "current"
    return {True: "present", False: "absent"}.get(f.value, "unknown")




class Engine:
    """A compiled rule set, registered once with durable_rules; thread-safe."""

    _default: "Engine | None" = None
    _default_lock = threading.Lock()

    def __init__(self, ruleset: RuleSet, check_coverage: bool = True):
        self.ruleset = ruleset
        self.compiled: CompiledRuleset = compile_ruleset(ruleset)
        c = self.compiled
        self._factors = DurableRuleset(f"{ruleset.id}.factors", c.factors.rules, c.factors.fields)
        self._decision = DurableRuleset(f"{ruleset.id}.decision", c.decision.rules, c.decision.fields)
        self._recommend = DurableRuleset(f"{ruleset.id}.recommendations", c.recommendations.rules,
                                         c.recommendations.fields)
        self.ref = RulesetRef(id=ruleset.id, version=ruleset.version, sha256=ruleset.sha256,
                              title=ruleset.title, doi=ruleset.citation.doi,
                              pmid=ruleset.citation.pmid, citation=ruleset.citation.text.strip())
        # What the result quotes, prepared once.
        self._groups = dict(zip(c.group_rule_names, ruleset.groups))
        self._reasons = {g.rule: g.reason.strip() for g in ruleset.groups}
        self._recommendations = {name: Recommendation(rule=r.rule, text=r.text.strip())
                                 for name, r in zip(c.recommendation_rule_names, ruleset.recommendations)}
        self._missing_texts = {k: v.strip() for k, v in ruleset.missing_fact_texts.items()}
        self._preliminary_note = ruleset.status.preliminary_note.strip()
        self._not_written = ruleset.assessment.not_written_reason.strip()
        self._survival = {
            g: CohortSurvival(group=g, five_year_os_percent=pct, p_value=ruleset.survival.p_value,
                              caveat=ruleset.cohort.caveat.strip(), outcome=ruleset.survival.outcome,
                              horizon_years=ruleset.survival.horizon_years)
            for g, pct in ruleset.survival.five_year_os_percent.items()}
        if check_coverage:
            self.check_coverage()

    @classmethod
    def from_file(cls, path: Path | str | None = None) -> "Engine":
        return cls(load_ruleset(path))

    @classmethod
    def default(cls) -> "Engine":
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls.from_file()
            return cls._default

    # ------------------------------------------------------------------ evaluation
    def features_fact(self, features: Features) -> dict[str, object]:
        """Stage 1 fact: each factor's feature, with its known flag."""
        fact: dict[str, object] = {"kind": FEATURES_KIND}
        for factor in self.ruleset.factors.values():
            f: Fact = getattr(features, factor.feature)
            post_value(fact, factor.feature, f.value, f.lower_bound, factor.operator, f.at_most, f.at_most_strict)
        return fact

    def classify(self, features: Features) -> Classification:
        return self.classify_many([features])[0]

    def classify_many(self, features: Sequence[Features], batch: int = 200) -> list[Classification]:
        """Classify many patients; each stage asserts ``batch`` facts per engine call."""
        out: list[Classification] = []
        for start in range(0, len(features), batch):
            chunk = features[start:start + batch]
            fired = self._factors.fire_many([self.features_fact(f) for f in chunk])
            states = [self._states(f, rules) for f, rules in zip(chunk, fired)]
            for rules, more in zip(fired, self._decision.fire_many(states)):
                rules.extend(more)
            groups = [self._groups[self._one(rules, "group.", "group", f)] for f, rules in zip(chunk, fired)]
            decided = [{**st, "kind": DECIDED_KIND, "group": g.id} for st, g in zip(states, groups)]
            for rules, more in zip(fired, self._recommend.fire_many(decided)):
                rules.extend(more)
            out += [self._interpret(f, rules) for f, rules in zip(chunk, fired)]
        return out

    def _states(self, features: Features, fired: list[str]) -> dict[str, object]:
        """Stage 2 fact: the state of every fact (factor states from stage 1's rules)."""
        states: dict[str, object] = {"kind": STATES_KIND}
        for name in BASE_FACTS:
            states[name] = _fact_state(name, getattr(features, name))
        by = self._by_prefix(fired)
        for fid in self.ruleset.factors:
            states[fid] = self._one(by, f"factor.{fid}.", f"state of factor {fid}", features).rsplit(".", 1)[1]
        return states

    @staticmethod
    def _by_prefix(fired: list[str]) -> dict[str, list[str]]:
        """Fired rules keyed by what they decide: ``factor.<id>.``, ``group.``, ``status.``."""
        out: dict[str, list[str]] = {}
        for r in fired:
            kind, _, rest = r.partition(".")
            key = f"factor.{rest.partition('.')[0]}." if kind == "factor" else f"{kind}."
            out.setdefault(key, []).append(r)
        return out

    def _one(self, fired: list[str] | dict[str, list[str]], prefix: str, what: str, features: Features) -> str:
        hits = (fired if isinstance(fired, dict) else self._by_prefix(fired)).get(prefix, [])
        if len(hits) != 1:
            raise RulesetInconsistentError(
                f"rule set {self.ruleset.id} {self.ruleset.version}: expected exactly one {what} rule "
                f"to fire, got {hits or 'none'} for features {self.features_fact(features)}")
        return hits[0]

    def _interpret(self, features: Features, fired: list[str]) -> Classification:
        """The Classification for ``fired``, built without re-validation (every value
        here is already typed)."""
        rs = self.ruleset
        by = self._by_prefix(fired)
        criteria: dict[str, Criterion] = {}
        for fid, factor in rs.factors.items():
            rule = self._one(by, f"factor.{fid}.", f"state of factor {fid}", features)
            f: Fact = getattr(features, factor.feature)
            criteria[fid] = Criterion(
                id=fid, label=factor.label, state=rule.rsplit(".", 1)[1], value=f.value, operator=factor.operator,
                threshold=factor.threshold, unit=factor.unit, refs=f.refs, note=f.note, rule=rule)
        facts = {}
        for name in BASE_FACTS:
            f = getattr(features, name)
            facts[name] = Criterion(
                id=name, label=rs.fact_labels[name], state=_fact_state(name, f), value=f.value, operator=None,
                threshold=None, unit=None, refs=f.refs, note=f.note, rule=None)
        g = self._groups[self._one(by, "group.", "group", features)]
        status = self._one(by, "status.", "status", features)[len("status."):]
        fired_recs = set(by.get("recommendation.", ()))
        recs = tuple(self._recommendations[n] for n in self.compiled.recommendation_rule_names if n in fired_recs)
        missing = []
        for name, c in (("liver_recurrence", facts["liver_recurrence"]), *criteria.items(),
                        *((n, facts[n]) for n in BASE_FACTS if n != "liver_recurrence")):
            if c.state in MISSING_STATES or (name == "liver_recurrence" and c.state != "present"):
                missing.append(MissingFact(fact=name, text=self._missing_texts[name], detail=c.note))
        states = {**{n: c.state for n, c in facts.items()}, **{n: c.state for n, c in criteria.items()}}
        return Classification(
            patient=features.patient, group=g.id, group_label=rs.group_labels[g.id], group_rule=g.rule,
            reason=self._reasons[g.rule],
            status=status, status_note=None if status == "final" else self._preliminary_note,
            criteria=criteria, facts=facts, missing=tuple(missing), recommendations=recs,
            rules_fired=tuple(fired), cohort_survival=self._survival.get(g.id), ruleset=self.ref,
            warnings=features.warnings, assessed=holds(rs.write_when, states),
            not_assessed_reason=None if holds(rs.write_when, states) else self._not_written)

    # ------------------------------------------------------------------ load-time check
    def check_coverage(self) -> int:
        """Fire every combination of states through durable_rules: each factor's rules
        must give exactly its state, and the group and status rules exactly one rule
        for every combination of fact states. Returns the number of combinations."""
        rs = self.ruleset
        fids = list(rs.factors)
        for states in itertools.product(FACTOR_STATES, repeat=len(fids)):
            fact: dict[str, object] = {"kind": FEATURES_KIND}
            for fid, state in zip(fids, states):
                post_value(fact, rs.factors[fid].feature, representative_value(rs, fid, state))
            fired = self._factors.fire(fact)
            expected = sorted(f"factor.{fid}.{state}" for fid, state in zip(fids, states))
            if sorted(fired) != expected:
                raise RulesetInconsistentError(
                    f"rule set {rs.id} {rs.version}: factor rules fired {sorted(fired)} for {fact}, "
                    f"expected {expected}")
        # A lower bound at the threshold proves a ">=" factor; below it, it decides nothing.
        # An upper bound below the threshold (or at it, when the bound is excluded) proves
        # it absent; above it, nothing. (Mirrored for "<=" / "<" factors.)
        for fid, factor in rs.factors.items():
            if factor.operator == "is_true":
                continue
            upward = factor.operator in (">=", ">")
            t = factor.threshold
            step = Decimal(1) if factor.feature == "tumour_count" else Decimal("0.1")
            cases = [  # (lower bound, upper bound, upper strict, expected state)
                (representative_value(rs, fid, "present"), None, False, "present" if upward else "unknown"),
                (representative_value(rs, fid, "absent"), None, False, "unknown" if upward else "absent"),
                (None, t, True, "absent" if upward else "present"),
                (None, t + step, True, "unknown"),
                (None, t - step, False, "absent" if upward else "present"),
                (None, t + step, False, "unknown"),
            ]
            if factor.feature == "tumour_count":
                cases = [c for c in cases if c[1] is None]
            for low, high, strict, expect in cases:
                fact = {"kind": FEATURES_KIND}
                for other in rs.factors.values():
                    post_value(fact, other.feature, None)
                post_value(fact, factor.feature, low, lower_bound=True, operator=factor.operator,
                           at_most=high, at_most_strict=strict)
                hits = [r for r in self._factors.fire(fact) if r.startswith(f"factor.{fid}.")]
                if hits != [f"factor.{fid}.{expect}"]:
                    raise RulesetInconsistentError(
                        f"rule set {rs.id} {rs.version}: bounds {fact} gave {hits}, expected {expect}")
        domains = rs.fact_domains
        names = list(domains)
        n = 0
        for states in itertools.product(*(domains[f] for f in names)):
            fired = self._decision.fire({"kind": STATES_KIND, **dict(zip(names, states))})
            for prefix in ("group.", "status."):
                hits = [r for r in fired if r.startswith(prefix)]
                if len(hits) != 1:
                    combo = ", ".join(f"{k}={s}" for k, s in zip(names, states))
                    raise RulesetInconsistentError(
                        f"rule set {rs.id} {rs.version}: for {combo} the {prefix.rstrip('.')} rules "
                        f"that fire are {hits or 'none'}; exactly one must")
            n += 1
        return n
