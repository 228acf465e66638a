"""Differential test: the durable-rules engine and a plain-Python evaluation of the same
YAML rule set (benchmarks/baseline.py) agree on every generated input."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from benchmarks.baseline import evaluate
from benchmarks.generate import feature_sets, random_features
from engine.classify import Engine


def agree(engine: Engine, features) -> None:
    results = engine.classify_many(features)
    for f, r in zip(features, results):
        b = evaluate(engine.ruleset, f)
        assert (r.group, r.group_rule, r.status) == (b.group, b.group_rule, b.status), f
        assert {k: c.state for k, c in r.criteria.items()} == b.criteria, f
        assert tuple(rec.rule for rec in r.recommendations) == b.recommendations, f


def test_engine_and_baseline_agree_on_20000_generated_inputs():
    agree(Engine.default(), feature_sets(20_000, seed=7, unknown_share=0.3))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), share=st.floats(0, 1))
def test_engine_and_baseline_agree_hypothesis(seed, share):
    import random
    rng = random.Random(seed)
    agree(Engine.default(), [random_features(rng, share) for _ in range(20)])
