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

Every group, status and factor state comes from durable-rules firing; what the engine
makes of the rules that fired (the group's texts, the recommendations, the next stage's
fact) is a function of those rules and the posted facts only, so it is prepared once per
combination and reused (engine/lookup.py). The traced parts of a result (``criteria``,
``facts``, ``missing``) are built from the features and the fired rules when first read.
``Engine(..., reuse_firings=True)`` also asks durable-rules only once per distinct
posted fact (exact; off by default). engine/reference.py keeps the earlier path.
"""

from __future__ import annotations

import itertools
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any as AnyType, Literal, Sequence

from dataclasses import dataclass, fields

from engine.compile import FEATURES_KIND, STATES_KIND, CompiledRuleset, compile_ruleset, post_value
from engine.coverage import RulesetInconsistentError, check_coverage
from engine.durable_session import DurableRuleset
from engine.features import Fact, Features
from engine.lookup import AfterFactors, ReusedFirings, StageTables, bounded_put
from engine.ruleset import BASE_FACTS, MISSING_STATES, GroupId, RuleSet, load_ruleset


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
    # The value's bounds, as in :class:`engine.features.Fact`: ``lower_bound`` the value is
    # only a lower bound; ``at_most`` an upper bound (``at_most_strict``: "less than").
    lower_bound: bool = False
    at_most: Decimal | None = None
    at_most_strict: bool = False


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


_TRACED = ("criteria", "facts", "missing")


@dataclass(frozen=True)
class Classification:
    """The engine's answer with everything needed to explain it.

    The engine builds the traced fields (``criteria``, ``facts``, ``missing``) when one
    of them is first read, from the features and the rules that fired, exactly as it
    would have built them at once (tests/unit/test_engine_lazy.py); they are then kept.
    Reading them from several threads at once is safe: all readers get the same objects.
    Not a slots class: the traced fields live in the instance dict once built."""

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

    def __getattr__(self, name: str) -> AnyType:
        # Only called for attributes not set yet: the traced fields of an engine result.
        if name in _TRACED:
            d = self.__dict__
            source = d.get("_trace_with")
            if source is not None:
                build, decided = source
                # setdefault is atomic: concurrent first readers all keep the first trace built.
                trace = d.setdefault("_trace", build(d["_features"], decided))
                for field, value in zip(_TRACED, trace):
                    d.setdefault(field, value)
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __reduce__(self) -> tuple:
        # copy, deepcopy and pickle see the fields only (the traced ones built), never the engine.
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

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


_SHARED_VALUE_TYPES = (type(None), bool, int, str)  # Criterion values shared between results


class Engine:
    """A compiled rule set, registered once with durable_rules; thread-safe.

    ``reuse_firings=True``: each stage asks durable-rules once per distinct posted fact
    and answers repeats with the rules it fired then (:class:`engine.lookup.ReusedFirings`)."""

    _default: "Engine | None" = None
    _default_lock = threading.Lock()

    def __init__(self, ruleset: RuleSet, check_coverage: bool = True, reuse_firings: bool = False):
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
        # Reused between classifications (see classify_many); every entry is immutable.
        self._tables = StageTables(self)
        stages = (self._factors, self._decision, self._recommend)
        # reuse_firings: durable-rules is asked once per distinct posted fact (exact; see ReusedFirings).
        self._fire = tuple(ReusedFirings(s.fire_fragments).fire_fragments if reuse_firings else s.fire_fragments
                           for s in stages)
        self._factor_features = tuple((fid, f.feature) for fid, f in ruleset.factors.items())
        self._criteria: dict[tuple, Criterion] = {}
        self._missing_facts: dict[tuple, MissingFact] = {}
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
        """Classify many patients; each stage asserts ``batch`` facts per engine call.

        Every stage is fired through durable-rules for every patient. The facts posted
        (checked JSON fragments) and what the engine makes of the rules that fired are
        looked up by what determines them; the traced parts of each result are built
        when first read (see :class:`Classification`)."""
        out: list[Classification] = []
        new, set_dict, cls, tables = object.__new__, object.__setattr__, Classification, self._tables
        fire1, fire2, fire3 = self._fire
        for start in range(0, len(features), batch):
            chunk = features[start:start + batch]
            records = [f.__dict__ for f in chunk]  # a pydantic model's field values
            fired1 = fire1(list(map(tables.stage1_fragment, records)))
            after1 = list(map(tables.after_factors, chunk, records, fired1))
            fired2 = fire2([a.fragment for a in after1])
            after2 = [a.decided.get(r) or tables.after_decision(f, a, r) for f, a, r in zip(chunk, after1, fired2)]
            fired3 = fire3([a.fragment for a in after2])
            for f, record, a, r in zip(chunk, records, after2, fired3):
                d = (a.outcomes.get(r) or tables.outcome(f, a, r)).copy()
                d["patient"] = record["patient"]
                d["warnings"] = record["warnings"]
                d["_features"] = f
                result = new(cls)
                set_dict(result, "__dict__", d)
                out.append(result)
        return out

    def _trace(self, features: Features, node: AfterFactors) -> tuple[dict, dict, tuple]:
        """The traced fields of a result (criteria, facts, missing), as
        :func:`engine.reference.interpret` builds them. Criterion and MissingFact objects
        are immutable and shared between results where everything they hold is the same."""
        criteria = {fid: self._criterion(fid, state, getattr(features, feature), rule)
                    for (fid, feature), (state, rule) in zip(self._factor_features, node.factors)}
        facts = {name: self._criterion(name, state, getattr(features, name), None)
                 for name, state in zip(BASE_FACTS, node.base)}
        missing = []
        for name, c in (("liver_recurrence", facts["liver_recurrence"]), *criteria.items(),
                        *((n, facts[n]) for n in BASE_FACTS if n != "liver_recurrence")):
            if c.state in MISSING_STATES or (name == "liver_recurrence" and c.state != "present"):
                key = (name, c.note)
                m = self._missing_facts.get(key)
                if m is None:
                    m = MissingFact(fact=name, text=self._missing_texts[name], detail=c.note)
                    bounded_put(self._missing_facts, key, m)
                missing.append(m)
        return criteria, facts, tuple(missing)

    def _criterion(self, name: str, state: str, f: Fact, rule: str | None) -> Criterion:
        value, refs, note = f.value, f.refs, f.note
        # Shared where they repeat (no evidence: unknown or default facts) and equal keys
        # mean identical criteria (a Decimal's digits are more than its value).
        key = ((name, state, type(value), value, note, f.lower_bound, f.at_most_strict)
               if not refs and type(value) in _SHARED_VALUE_TYPES and f.at_most is None else None)
        c = self._criteria.get(key) if key else None
        if c is None:
            factor = self.ruleset.factors.get(name) if rule is not None else None
            if factor is not None:
                c = Criterion(id=name, label=factor.label, state=state, value=value, operator=factor.operator,
                              threshold=factor.threshold, unit=factor.unit, refs=refs, note=note, rule=rule,
                              lower_bound=f.lower_bound, at_most=f.at_most, at_most_strict=f.at_most_strict)
            else:
                c = Criterion(id=name, label=self.ruleset.fact_labels[name], state=state, value=value,
                              operator=None, threshold=None, unit=None, refs=refs, note=note, rule=None,
                              lower_bound=f.lower_bound, at_most=f.at_most, at_most_strict=f.at_most_strict)
            if key:
                bounded_put(self._criteria, key, c)
        return c

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

    # ------------------------------------------------------------------ load-time check
    def check_coverage(self) -> int:
        """Fire every combination of states through durable_rules (see
        :func:`engine.coverage.check_coverage`). Returns the number of combinations."""
        return check_coverage(self)
