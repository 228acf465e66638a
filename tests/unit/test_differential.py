"""Differential test: the durable-rules engine and a plain-Python evaluation of the same
YAML rule set (benchmarks/baseline.py) agree on every generated input."""

from __future__ import annotations

import random
from decimal import Decimal

from hypothesis import given, settings, strategies as st

from benchmarks.baseline import evaluate
from benchmarks.generate import feature_sets, random_features
from engine.classify import Engine
from engine.features import Fact, Features


def varied_features(n: int, seed: int) -> list[Features]:
    """The benchmark generator's inputs, plus what it never varies: a recorded prior
    resection (so resectable and final results occur), stale imaging, every technical
    judgement, upper bounds, Decimal digits, evidence references, notes and warnings."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        f = random_features(rng, rng.choice((0.0, 0.05, 0.3, 0.8)))
        update: dict[str, object] = {}
        if rng.random() < 0.7:
            update["prior_liver_resection"] = Fact[bool](value=rng.choice((True, True, None)),
                                                         refs=rng.choice(((), ("Procedure/h1",))))
        if rng.random() < 0.3:
            update["imaging_measurements"] = Fact[bool](value=rng.choice((True, False)),
                                                        note=rng.choice((None, "newer report")))
        if rng.random() < 0.3:
            update["technical_resectability"] = Fact(
                value=rng.choice(("resectable", "unresectable", "in-doubt", None)),
                refs=rng.choice(((), ("Observation/t1",), ("Observation/t1", "Observation/t2"))),
                note=rng.choice((None, "conflicting")))
        if rng.random() < 0.25:
            value = rng.choice((None, *map(Decimal, ("30", "50", "50.0", "49.999", "4E+1"))))
            update["largest_diameter_mm"] = Fact(
                value=value, lower_bound=value is not None and rng.random() < 0.5,
                at_most=bound(rng, value, (Decimal("30"), Decimal("50"), Decimal("50.0"), Decimal("80"))),
                at_most_strict=rng.random() < 0.5, refs=rng.choice(((), ("Observation/o1",))),
                note=rng.choice((None, "one measurement unreadable")))
        if rng.random() < 0.15:
            value = rng.choice((None, 0, 1, 3, 4, 9))
            update["tumour_count"] = Fact[int](value=value, lower_bound=value is not None and rng.random() < 0.5,
                                               at_most=bound(rng, value, (Decimal(3), Decimal(4), Decimal(12))),
                                               at_most_strict=rng.random() < 0.5)
        if rng.random() < 0.1:
            update["warnings"] = ("a data warning",)
        out.append(Features(**{**dict(f), **update}) if update else f)
    return out


def bound(rng: random.Random, value, choices):
    """An upper bound that does not contradict ``value`` (None where the value is exact
    and known: it is its own upper bound)."""
    return rng.choice((None, *(c for c in choices if value is None or c > value)))


def agree(engine: Engine, features) -> None:
    results = engine.classify_many(features)
    for f, r in zip(features, results):
        b = evaluate(engine.ruleset, f)
        assert (r.group, r.group_rule, r.status) == (b.group, b.group_rule, b.status), f
        assert {k: c.state for k, c in r.criteria.items()} == b.criteria, f
        assert tuple(rec.rule for rec in r.recommendations) == b.recommendations, f


def test_engine_and_baseline_agree_on_20000_generated_inputs():
    agree(Engine.default(), feature_sets(20_000, seed=7, unknown_share=0.3))


def test_engine_and_baseline_agree_on_10000_varied_inputs():
    """Every group and both statuses (the benchmark generator never records the prior
    resection, so it never makes a resectable or a final result)."""
    features = varied_features(10_000, seed=11)
    agree(Engine.default(), features)
    outcomes = {(r.group, r.status) for r in Engine.default().classify_many(features)}
    assert {("resectable", "final"), ("borderline-resectable", "final"), ("unresectable", "final"),
            ("indeterminate", "preliminary")} <= outcomes


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0, 1))
def test_engine_and_baseline_agree_hypothesis(seed, share):
    rng = random.Random(seed)
    agree(Engine.default(), [random_features(rng, share) for _ in range(20)])


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_engine_and_baseline_agree_on_varied_inputs_hypothesis(seed):
    agree(Engine.default(), varied_features(20, seed))
