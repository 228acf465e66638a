"""What the engine makes of the rules durable-rules fired, prepared once per combination.

:meth:`engine.classify.Engine.classify_many` fires the three stages through
durable-rules for every patient. Between the stages, and after the last, it needs what
follows from the rules that fired: the next stage's fact, then the group's texts, the
recommendations, whether an assessment is written. Those are functions of the fired
rules and of the few feature values the facts are made of, so :class:`StageTables`
makes each of them once (with the engine's own methods, as the reference path does) and
looks it up after:

* the stage-1 fact (a checked :class:`~engine.durable_session.Fragment`), by the values
  and flags of the features it is made of, with their types (``1 == True`` and
  ``Decimal(1) == 1``, but each is posted differently or refused);
* the stage-2 fact and every fact's state, by the base facts' values and the factor
  rules that fired;
* the stage-3 fact, by those and the decision rules that fired;
* the eager fields of a result, by those and the recommendation rules that fired.

Every key holds everything its value is computed from, so a lookup gives what computing
would; tests/unit/test_engine_lazy.py compares the results with the reference path's.
Nothing that durable-rules decides is looked up: the lookups start from what it fired
(except with :class:`ReusedFirings`, which an engine uses only when asked to).
Each table is bounded (:data:`CACHE_LIMIT` entries, then it starts again empty); the
tables are shared by threads (a dict read or write is atomic; an entry is complete
before it is stored).
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any

from engine.compile import DECIDED_KIND, FEATURES_KIND, post_value
from engine.durable_session import Fragment
from engine.features import Fact, Features
from engine.ruleset import BASE_FACTS, holds

if TYPE_CHECKING:  # pragma: no cover
    from engine.classify import Engine

CACHE_LIMIT = 100_000  # entries per table; past it the table starts again empty

_FACT_BOUNDS = itemgetter("value", "lower_bound", "at_most", "at_most_strict")  # of a Fact's field values
# The base facts of a Features' field values, in the order after_factors keys them on.
_BASE_FACTS_OF = itemgetter("liver_recurrence", "technical_resectability", "adjuvant_chemotherapy",
                            "prior_liver_resection", "imaging_measurements")
if set(BASE_FACTS) != {"liver_recurrence", "technical_resectability", "adjuvant_chemotherapy",
                       "prior_liver_resection", "imaging_measurements"}:  # pragma: no cover
    raise ImportError("engine.lookup keys stage-2 facts on the five base facts it knows (after_factors)")


def bounded_put(table: dict, key: Any, value: Any) -> None:
    if len(table) >= CACHE_LIMIT:
        table.clear()
    table[key] = value


class AfterFactors:
    """Stage 1's answer for one combination of base-fact values and fired factor rules:
    every fact's state, the stage-2 fact, and what stage 2 answered to it (by its rules)."""

    __slots__ = ("fired", "base", "factors", "states", "fragment", "decided")

    def __init__(self, fired: tuple[str, ...], base: tuple[str, ...], factors: tuple[tuple[str, str], ...],
                 states: dict[str, object], fragment: Fragment):
        self.fired = fired            # the factor rules that fired, in firing order
        self.base = base              # the base facts' states, in BASE_FACTS order
        self.factors = factors        # (state, rule) per factor, in rule-set order
        self.states = states          # the stage-2 fact as a dict (every fact's state)
        self.fragment = fragment      # the stage-2 fact as posted (the fields the rules test)
        self.decided: dict[tuple[str, ...], AfterDecision] = {}


class AfterDecision:
    """Stage 2's answer to an :class:`AfterFactors`: the stage-3 fact, and the eager
    fields of a result by the rules stage 3 fires."""

    __slots__ = ("factors", "fired", "fragment", "outcomes")

    def __init__(self, factors: AfterFactors, fired: tuple[str, ...], fragment: Fragment):
        self.factors = factors
        self.fired = fired
        self.fragment = fragment
        self.outcomes: dict[tuple[str, ...], dict[str, Any]] = {}


class StageTables:
    """The lookup tables of one :class:`~engine.classify.Engine`."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        rs = engine.ruleset
        # Each feature once, with the operator of the last factor on it (as features_fact posts it).
        self.feature_plan = tuple({f.feature: f.operator for f in rs.factors.values()}.items())
        get = itemgetter(*(feature for feature, _ in self.feature_plan))
        self._feature_facts = get if len(self.feature_plan) > 1 else (lambda record: (get(record),))
        self._kind = engine._factors.fragment({"kind": FEATURES_KIND})
        self._feature_fragments: dict[tuple, Fragment] = {}
        self._stage1: dict[tuple, Fragment] = {}
        self._after_factors: dict[tuple, AfterFactors] = {}

    def stage1_fragment(self, record: dict[str, Any]) -> Fragment:
        """The stage-1 fact (:meth:`Engine.features_fact`) of the features whose field
        values are ``record`` (``Features.__dict__``), as a checked fragment."""
        key: tuple = ()
        facts = self._feature_facts(record)
        for f in facts:
            v, lower, at_most, strict = _FACT_BOUNDS(f.__dict__)
            key += (v, type(v), lower, at_most, type(at_most), strict)
        fragment = self._stage1.get(key)
        if fragment is None:
            parts = [self._feature_fragment(feature, operator, f)
                     for (feature, operator), f in zip(self.feature_plan, facts)]
            fragment = self.engine._factors.join(self._kind, *parts)
            if float not in key:  # -0.0 == 0.0, but is posted as "-0.0"
                bounded_put(self._stage1, key, fragment)
        return fragment

    def _feature_fragment(self, feature: str, operator: str, f: Fact) -> Fragment:
        v, at_most = f.value, f.at_most
        key = (feature, v, type(v), f.lower_bound, at_most, type(at_most), f.at_most_strict)
        fragment = self._feature_fragments.get(key)
        if fragment is None:
            posted: dict[str, object] = {}
            post_value(posted, feature, v, f.lower_bound, operator, at_most, f.at_most_strict)
            fragment = self.engine._factors.fragment(posted)
            if float not in key:
                bounded_put(self._feature_fragments, key, fragment)
        return fragment

    def after_factors(self, features: Features, record: dict[str, Any], fired: tuple[str, ...]) -> AfterFactors:
        """What stage 1 decided, with the stage-2 fact (as :meth:`Engine._states` makes
        it), looked up by the base facts' values and the rules that fired."""
        lr, tr, adj, plr, im = _BASE_FACTS_OF(record)
        tr = tr.value
        key = (lr.value, tr, type(tr), adj.value, plr.value is True, im.value is False, fired)
        node = self._after_factors.get(key)
        if node is None:
            e = self.engine
            states = e._states(features, list(fired))
            by = e._by_prefix(list(fired))
            rules = tuple(e._one(by, f"factor.{fid}.", f"state of factor {fid}", features) for fid in e.ruleset.factors)
            node = AfterFactors(
                fired=fired, base=tuple(states[name] for name in BASE_FACTS),
                factors=tuple(zip((r.rsplit(".", 1)[1] for r in rules), rules)),
                states=states, fragment=e._decision.fragment({k: states[k] for k in e.compiled.decision.tested}))
            bounded_put(self._after_factors, key, node)
        return node

    def after_decision(self, features: Features, node: AfterFactors, fired: tuple[str, ...]) -> AfterDecision:
        """What stage 2 decided (the group) and the stage-3 fact, kept in ``node``."""
        e = self.engine
        g = e._groups[e._one(list(fired), "group.", "group", features)]
        decided = {**node.states, "kind": DECIDED_KIND, "group": g.id}
        fragment = e._recommend.fragment({k: decided[k] for k in e.compiled.recommendations.tested})
        after = AfterDecision(factors=node, fired=fired, fragment=fragment)
        node.decided[fired] = after
        return after

    def outcome(self, features: Features, node: AfterDecision, fired3: tuple[str, ...]) -> dict[str, Any]:
        """The eager fields of a result for these fired rules, as
        :func:`engine.reference.interpret` makes them (checked on the rules of all three
        stages), kept in ``node``."""
        e, rs = self.engine, self.engine.ruleset
        fired = [*node.factors.fired, *node.fired, *fired3]
        by = e._by_prefix(fired)
        for fid in rs.factors:
            e._one(by, f"factor.{fid}.", f"state of factor {fid}", features)
        g = e._groups[e._one(by, "group.", "group", features)]
        status = e._one(by, "status.", "status", features)[len("status."):]
        fired_recs = set(by.get("recommendation.", ()))
        recs = tuple(e._recommendations[n] for n in e.compiled.recommendation_rule_names if n in fired_recs)
        states = {**dict(zip(BASE_FACTS, node.factors.base)),
                  **{fid: state for fid, (state, _) in zip(rs.factors, node.factors.factors)}}
        assessed = holds(rs.write_when, states)
        eager = {
            "group": g.id, "group_label": rs.group_labels[g.id], "group_rule": g.rule,
            "reason": e._reasons[g.rule], "status": status,
            "status_note": None if status == "final" else e._preliminary_note,
            "recommendations": recs, "rules_fired": tuple(fired), "cohort_survival": e._survival.get(g.id),
            "ruleset": e.ref, "assessed": assessed, "not_assessed_reason": None if assessed else e._not_written,
            # Builds criteria, facts and missing from the features when one of them is read.
            "_trace_with": (e._trace, node.factors)}
        node.outcomes[fired3] = eager
        return eager


class ReusedFirings:
    """``fire_fragments`` of one ruleset that asks durable-rules once per distinct posted
    fact and answers repeats from its table (``Engine(..., reuse_firings=True)``).

    Exact: every rule of the engine's rulesets tests a single fact, a batch's facts never
    meet, and each fact is posted to a fresh session, so the rules durable fires for a
    fact, and their order, depend on the posted text only (its id and sid are tested by
    no rule). tests/unit/test_engine_lazy.py compares the results with and without."""

    def __init__(self, fire_fragments):
        self._fire = fire_fragments
        self._fired: dict[Fragment, tuple[str, ...]] = {}

    def fire_fragments(self, facts: list[Fragment]) -> list[tuple[str, ...]]:
        known = self._fired
        out = list(map(known.get, facts))
        if None in out:
            todo = list(dict.fromkeys(f for f, r in zip(facts, out) if r is None))
            new = dict(zip(todo, self._fire(todo)))
            out = [new[f] if r is None else r for f, r in zip(facts, out)]
            for f, r in new.items():
                bounded_put(known, f, r)
        return out
