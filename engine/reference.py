"""The engine's reference path: the classification as the engine computed it before
the fast path of :meth:`engine.classify.Engine.classify_many` (kept as its oracle).

Plain dict facts, each checked and serialised per fact (``DurableRuleset.fire_many``),
and every result built at once, nothing reused between classifications. The fast path
must give the same results field by field (tests/unit/test_engine_lazy.py);
``python -m benchmarks.bench_engine`` measures both in the same run.
"""

from __future__ import annotations

from typing import Sequence

from engine.classify import Classification, Criterion, Engine, MissingFact, _fact_state
from engine.compile import DECIDED_KIND
from engine.features import Fact, Features
from engine.ruleset import BASE_FACTS, MISSING_STATES, holds


def classify_many_eager(engine: Engine, features: Sequence[Features], batch: int = 200) -> list[Classification]:
    """The reference path: plain dict facts (each checked and serialised per fact)
    and every result built at once, nothing reused. Same results as
    :meth:`Engine.classify_many` (tests/unit/test_engine_lazy.py)."""
    out: list[Classification] = []
    for start in range(0, len(features), batch):
        chunk = features[start:start + batch]
        fired = engine._factors.fire_many([engine.features_fact(f) for f in chunk])
        states = [engine._states(f, rules) for f, rules in zip(chunk, fired)]
        for rules, more in zip(fired, engine._decision.fire_many(states)):
            rules.extend(more)
        groups = [engine._groups[engine._one(rules, "group.", "group", f)] for f, rules in zip(chunk, fired)]
        decided = [{**st, "kind": DECIDED_KIND, "group": g.id} for st, g in zip(states, groups)]
        for rules, more in zip(fired, engine._recommend.fire_many(decided)):
            rules.extend(more)
        out += [interpret(engine, f, rules) for f, rules in zip(chunk, fired)]
    return out


def interpret(engine: Engine, features: Features, fired: list[str]) -> Classification:
    """The Classification for ``fired``, built without re-validation (every value
    here is already typed)."""
    rs = engine.ruleset
    by = engine._by_prefix(fired)
    criteria: dict[str, Criterion] = {}
    for fid, factor in rs.factors.items():
        rule = engine._one(by, f"factor.{fid}.", f"state of factor {fid}", features)
        f: Fact = getattr(features, factor.feature)
        criteria[fid] = Criterion(
            id=fid, label=factor.label, state=rule.rsplit(".", 1)[1], value=f.value, operator=factor.operator,
            threshold=factor.threshold, unit=factor.unit, refs=f.refs, note=f.note, rule=rule,
            lower_bound=f.lower_bound, at_most=f.at_most, at_most_strict=f.at_most_strict)
    facts = {}
    for name in BASE_FACTS:
        f = getattr(features, name)
        facts[name] = Criterion(
            id=name, label=rs.fact_labels[name], state=_fact_state(name, f), value=f.value, operator=None,
            threshold=None, unit=None, refs=f.refs, note=f.note, rule=None,
            lower_bound=f.lower_bound, at_most=f.at_most, at_most_strict=f.at_most_strict)
    g = engine._groups[engine._one(by, "group.", "group", features)]
    status = engine._one(by, "status.", "status", features)[len("status."):]
    fired_recs = set(by.get("recommendation.", ()))
    recs = tuple(engine._recommendations[n] for n in engine.compiled.recommendation_rule_names if n in fired_recs)
    missing = []
    for name, c in (("liver_recurrence", facts["liver_recurrence"]), *criteria.items(),
                    *((n, facts[n]) for n in BASE_FACTS if n != "liver_recurrence")):
        if c.state in MISSING_STATES or (name == "liver_recurrence" and c.state != "present"):
            missing.append(MissingFact(fact=name, text=engine._missing_texts[name], detail=c.note))
    states = {**{n: c.state for n, c in facts.items()}, **{n: c.state for n, c in criteria.items()}}
    return Classification(
        patient=features.patient, group=g.id, group_label=rs.group_labels[g.id], group_rule=g.rule,
        reason=engine._reasons[g.rule],
        status=status, status_note=None if status == "final" else engine._preliminary_note,
        criteria=criteria, facts=facts, missing=tuple(missing), recommendations=recs,
        rules_fired=tuple(fired), cohort_survival=engine._survival.get(g.id), ruleset=engine.ref,
        warnings=features.warnings, assessed=holds(rs.write_when, states),
        not_assessed_reason=None if holds(rs.write_when, states) else engine._not_written)
