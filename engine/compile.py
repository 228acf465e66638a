"""Compile a :class:`RuleSet` into durable_rules' JSON form, in three stages.

A classification fires three small rulesets, each on one fact:

1. **factors**: the patient's features against the thresholds. Each feature is
   posted with a ``<feature>_known`` flag and, when known, its value (exact, or a lower
   bound), and a numeric one also with its upper bound ``<feature>_hi`` (the exact value,
   or a bound such as ``< 30 mm``) and the flags ``_hi_known`` and ``_hi_strict``; so
   "unknown" is ``{<feature>_known: false}``, a lower bound proves ``>= t`` but not
   ``< t``, an upper bound the reverse. (durable_rules' own test for a missing field,
   ``$nex``, hangs or crashes the process in some positions; it is never used.)
   Rules ``factor.<factor id>.<state>``.
2. **decision**: the state of every fact (``present`` / ``absent`` / ``unknown``...)
   against the group rules and the status rule. Rules ``group.<rule id>``,
   ``status.final``, ``status.preliminary``.
3. **recommendations**: the states plus the group. Rules ``recommendation.<rule id>``.

Every rule is anchored on ``kind``, a constant equality. Staging keeps each rule small
(durable_rules refuses large expressions with error 113).

    >>> from engine.ruleset import load_ruleset
    >>> compiled = compile_ruleset(load_ruleset())
    >>> compiled.factors.rules["factor.tumour_count_ge_4.present"]
    {'all': [{'m': {'$and': [{'kind': 'clm-features'}, {'tumour_count_known': True}, {'$gte': {'tumour_count': 4}}]}}]}
    >>> compiled.factors.rules["factor.largest_ge_50mm.absent"]
    {'all': [{'m': {'$and': [{'kind': 'clm-features'}, {'largest_diameter_mm_hi_known': True}, {'$or': [{'$and': [{'largest_diameter_mm_hi_strict': True}, {'$lte': {'largest_diameter_mm_hi': 50}}]}, {'$and': [{'largest_diameter_mm_hi_strict': False}, {'$lt': {'largest_diameter_mm_hi': 50}}]}]}]}}]}
    >>> sorted(compiled.factors.rules["factor.largest_ge_50mm.unknown"]["all"][0]["m"]["$and"][1]["$or"][0])
    ['largest_diameter_mm_known']
    >>> compiled.decision.rules["status.final"]["all"][0]["m"]["$and"][1]["$and"][0]
    {'liver_recurrence': 'present'}
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from engine.durable_session import FactTypeError, FieldType
from engine.features import BOOLEAN_FEATURES, NUMERIC_FEATURES
from engine.ruleset import FACTOR_STATES, All, Condition, Factor, Leaf, RuleSet, negate

FEATURES_KIND = "clm-features"
STATES_KIND = "clm-states"
DECIDED_KIND = "clm-decided"

# The feature fields posted in stage 1, by type. Each also gets a <field>_known flag.
FEATURE_FIELDS: dict[str, FieldType] = {
    **{f: "number" for f in NUMERIC_FEATURES},
    **{f: "bool" for f in BOOLEAN_FEATURES},
}

_OPS = {">=": "$gte", ">": "$gt", "<=": "$lte", "<": "$lt"}
_COMPLEMENT = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


def json_number(d: Decimal) -> int | float:
    """A Decimal as the JSON number durable compares (exact for integers)."""
    return int(d) if d == d.to_integral_value() else float(d)


# Thresholds may have at most this many decimals; feature values are rounded to the same
# step *towards the side that keeps the comparison exact* before they become floats, so
# 49.99999999999999999 mm stays below 50 (a plain float() would make it 50.0).
THRESHOLD_STEP = Decimal("0.001")


def exact_for(value: Decimal, operator: str | None) -> int | float:
    """``value`` as a JSON number whose comparison with any threshold that is a multiple
    of THRESHOLD_STEP gives the same answer as the exact decimal.

    >>> exact_for(Decimal("49.99999999999999999"), ">=")
    49.999
    >>> exact_for(Decimal("50.0000000000000001"), ">")
    50.001
    """
    if not value.is_finite() or value.adjusted() >= 12:
        raise FactTypeError(f"value {value} is too large to compare exactly (at most 12 integer digits)")
    rounding = ROUND_CEILING if operator in (">", "<=") else ROUND_FLOOR
    return json_number(value.quantize(THRESHOLD_STEP, rounding=rounding))


def post_value(fact: dict[str, object], field: str, value: object | None, lower_bound: bool = False,
               operator: str | None = None, at_most: object | None = None, at_most_strict: bool = False) -> None:
    """Put a feature into a stage-1 fact: its flags, its value when known, and its
    upper bound (the exact value itself, or ``at_most``) when one is known."""
    fact[f"{field}_known"] = value is not None
    if value is not None:
        fact[field] = exact_for(value, operator) if isinstance(value, Decimal) else value
    if field not in NUMERIC_FEATURES:
        return
    hi, strict = (value, False) if value is not None and not lower_bound else (at_most, at_most_strict)
    fact[f"{field}_hi_known"] = hi is not None
    fact[f"{field}_hi_strict"] = bool(strict)
    if hi is not None:
        fact[f"{field}_hi"] = exact_for(hi, "<=" if strict else operator) if isinstance(hi, Decimal) else hi


def _factor_state(factor: Factor, state: str) -> list[dict]:
    """Terms (anded) that put the factor in ``state``.

    A numeric feature is posted as its value (exact, or only a lower bound) and its
    upper bound (the exact value, or a bound such as ``< 30 mm``; ``_hi_strict`` when
    the bound itself is excluded). For ``>=``/``>`` the value can prove the factor
    present and only the upper bound can prove it absent; for ``<=``/``<`` the other
    way round. Whatever neither proves is unknown.
    """
    f = factor.feature
    known = {f"{f}_known": True}
    if factor.operator == "is_true":
        return [{f"{f}_known": False}] if state == "unknown" else [known, {f: state == "present"}]
    t = json_number(factor.threshold)
    hi = f"{f}_hi"
    holds = {_OPS[factor.operator]: {f: t}}
    fails = {_OPS[_COMPLEMENT[factor.operator]]: {f: t}}
    upward = factor.operator in (">=", ">")
    # The upper bound proves "value < t" (upward: absent) or "value <= t"/"< t" (downward: present).
    bound_op = _COMPLEMENT[factor.operator] if upward else factor.operator
    other_op = factor.operator if upward else _COMPLEMENT[factor.operator]
    by_bound = {"$or": [{"$and": [{f"{hi}_strict": True}, {"$lte": {hi: t}}]},
                        {"$and": [{f"{hi}_strict": False}, {_OPS[bound_op]: {hi: t}}]}]}
    not_by_bound = {"$or": [{f"{hi}_known": False},
                            {"$and": [{f"{hi}_known": True}, {f"{hi}_strict": True}, {"$gt": {hi: t}}]},
                            {"$and": [{f"{hi}_known": True}, {f"{hi}_strict": False}, {_OPS[other_op]: {hi: t}}]}]}
    by_value = [known, holds if upward else fails]
    not_by_value = {"$or": [{f"{f}_known": False}, {"$and": [known, fails if upward else holds]}]}
    if state == ("present" if upward else "absent"):
        return by_value
    if state == ("absent" if upward else "present"):
        return [{f"{hi}_known": True}, by_bound]
    return [not_by_value, not_by_bound]


def condition_expr(cond: Condition) -> dict:
    """A condition tree over fact states as a durable expression (equalities only)."""
    if isinstance(cond, Leaf):
        terms = [{cond.fact: s} for s in cond.states]
    else:
        terms = [condition_expr(c) for c in cond.items]
    if len(terms) == 1:
        return terms[0]
    return {"$and": terms} if isinstance(cond, All) else {"$or": terms}


def _rule(kind: str, *terms: dict) -> dict:
    return {"all": [{"m": {"$and": [{"kind": kind}, *terms]}}]}


@dataclass(frozen=True)
class Stage:
    rules: dict[str, dict]
    fields: dict[str, FieldType]
    # The fields some rule of the stage tests, in ``fields`` order: a fact needs no other
    # (a rule cannot match on a field it does not name), so the engine posts only these.
    tested: tuple[str, ...] = ()


def condition_facts(cond: Condition) -> set[str]:
    """The facts a condition tree tests."""
    if isinstance(cond, Leaf):
        return {cond.fact}
    return set().union(*(condition_facts(c) for c in cond.items))


def _tested(fields: dict[str, FieldType], *conditions: Condition) -> tuple[str, ...]:
    named = {"kind"}.union(*(condition_facts(c) for c in conditions))
    return tuple(f for f in fields if f in named)


@dataclass(frozen=True)
class CompiledRuleset:
    factors: Stage
    decision: Stage
    recommendations: Stage
    group_rule_names: tuple[str, ...]
    recommendation_rule_names: tuple[str, ...]


def compile_ruleset(rs: RuleSet) -> CompiledRuleset:
    factor_rules = {
        f"factor.{fid}.{state}": _rule(FEATURES_KIND, *_factor_state(factor, state))
        for fid, factor in rs.factors.items() for state in FACTOR_STATES
    }
    factor_fields: dict[str, FieldType] = {"kind": "string"}
    for factor in rs.factors.values():
        factor_fields[factor.feature] = FEATURE_FIELDS[factor.feature]
        factor_fields[f"{factor.feature}_known"] = "bool"
        if factor.operator != "is_true":
            factor_fields[f"{factor.feature}_hi"] = FEATURE_FIELDS[factor.feature]
            factor_fields[f"{factor.feature}_hi_known"] = "bool"
            factor_fields[f"{factor.feature}_hi_strict"] = "bool"

    state_fields: dict[str, FieldType] = {"kind": "string", **{f: "string" for f in rs.fact_domains}}
    decision_rules = {}
    group_names = []
    for g, cond in zip(rs.groups, rs.group_conditions):
        name = f"group.{g.rule}"
        decision_rules[name] = _rule(STATES_KIND, condition_expr(cond))
        group_names.append(name)
    decision_rules["status.final"] = _rule(STATES_KIND, condition_expr(rs.final_when))
    decision_rules["status.preliminary"] = _rule(
        STATES_KIND, condition_expr(negate(rs.final_when, rs.fact_domains)))

    rec_rules = {}
    for r, cond in zip(rs.recommendations, rs.recommendation_conditions):
        rec_rules[f"recommendation.{r.rule}"] = _rule(DECIDED_KIND, condition_expr(cond))
    rec_fields: dict[str, FieldType] = {**state_fields, "group": "string"}
    return CompiledRuleset(
        factors=Stage(factor_rules, factor_fields, tuple(factor_fields)),
        decision=Stage(decision_rules, state_fields,
                       _tested(state_fields, *rs.group_conditions, rs.final_when)),
        recommendations=Stage(rec_rules, rec_fields, _tested(rec_fields, *rs.recommendation_conditions)),
        group_rule_names=tuple(group_names),
        recommendation_rule_names=tuple(rec_rules),
    )


def representative_value(rs: RuleSet, factor_id: str, state: str) -> Decimal | bool | None:
    """A feature value that puts a factor in ``state`` (None: unknown). Used to check
    that the factor rules give exactly one state for every state."""
    factor = rs.factors[factor_id]
    if state == "unknown":
        return None
    if factor.operator == "is_true":
        return state == "present"
    t = factor.threshold
    step = Decimal(1) if factor.feature == "tumour_count" else Decimal("0.1")
    below, above = t - step, t + step
    present = {">=": t, ">": above, "<=": t, "<": below}[factor.operator]
    absent = {">=": below, ">": t, "<=": above, "<": t}[factor.operator]
    return present if state == "present" else absent
