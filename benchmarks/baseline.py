"""A plain-Python evaluation of the YAML rule set: the engine benchmark's baseline and
the differential-test oracle (tests/unit/test_differential.py). It reads the same RuleSet
the engine compiles, but evaluates the condition trees directly, without durable-rules.
It is not used by the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from engine.features import Fact, Features
from engine.ruleset import All, Any, Condition, Factor, Leaf, RuleSet

_HOLDS = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


@dataclass(frozen=True)
class BaselineResult:
    group: str
    group_rule: str
    status: str
    criteria: dict[str, str]
    recommendations: tuple[str, ...]


def factor_state(factor: Factor, fact: Fact) -> str:
    """A factor's state from a fact's value (exact, or a lower bound) and upper bound."""
    if factor.operator == "is_true":
        return "unknown" if fact.value is None else "present" if fact.value else "absent"
    t = factor.threshold
    holds = _HOLDS[factor.operator]
    low = None if fact.value is None else Decimal(fact.value)
    hi, strict = fact.upper
    hi = None if hi is None else Decimal(hi)
    upward = factor.operator in (">=", ">")
    if low is not None and holds(low, t) == upward:  # the value proves present (up) / absent (down)
        return "present" if upward else "absent"
    if hi is not None and ((strict and hi <= t) or (not strict and holds(hi, t) != upward)):
        return "absent" if upward else "present"
    return "unknown"


def holds(cond: Condition, states: dict[str, str]) -> bool:
    if isinstance(cond, Leaf):
        return states[cond.fact] in cond.states
    if isinstance(cond, All):
        return all(holds(c, states) for c in cond.items)
    assert isinstance(cond, Any)
    return any(holds(c, states) for c in cond.items)


def base_states(features: Features) -> dict[str, str]:
    lr, tr, adj = features.liver_recurrence, features.technical_resectability, features.adjuvant_chemotherapy
    return {
        "liver_recurrence": {True: "present", False: "absent"}.get(lr.value, "unknown"),
        "technical_resectability": tr.value if tr.value is not None else "not-assessed",
        "adjuvant_chemotherapy": {True: "given", False: "not-given"}.get(adj.value, "unknown"),
        "prior_liver_resection": "recorded" if features.prior_liver_resection.value is True else "not-recorded",
        "imaging_measurements": "stale" if features.imaging_measurements.value is False else "current",
    }


def evaluate(rs: RuleSet, features: Features) -> BaselineResult:
    states = base_states(features)
    criteria = {fid: factor_state(f, getattr(features, f.feature)) for fid, f in rs.factors.items()}
    states.update(criteria)
    matching = [g for g, cond in zip(rs.groups, rs.group_conditions) if holds(cond, states)]
    if len(matching) != 1:
        raise AssertionError(f"baseline: {len(matching)} group rules match {states}")
    group = matching[0]
    status = "final" if holds(rs.final_when, states) else "preliminary"
    decided = {**states, "group": group.id}
    recs = tuple(r.rule for r, cond in zip(rs.recommendations, rs.recommendation_conditions) if holds(cond, decided))
    return BaselineResult(group.id, group.rule, status, criteria, recs)
