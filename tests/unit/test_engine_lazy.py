"""The engine's fast path (``Engine.classify_many``: checked facts and what follows from
the fired rules looked up, traces built when first read) against its reference path
(``engine.reference.classify_many_eager``: dict facts, every result built at once).

The results must be the same field by field, however and in whatever order they are
read, from any thread; and the Classification API must not change."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading
from decimal import Decimal

import pytest

from benchmarks.generate import feature_sets
from engine import lookup
from engine.classify import Classification, Engine, RulesetInconsistentError
from engine.durable_session import FactTypeError
from engine.features import Fact, Features
from engine.reference import classify_many_eager
from engine.ruleset import load_ruleset
from tests.unit.test_differential import varied_features

FIELDS = ["patient", "group", "group_label", "group_rule", "reason", "status", "status_note", "criteria", "facts",
          "missing", "recommendations", "rules_fired", "cohort_survival", "ruleset", "warnings", "assessed",
          "not_assessed_reason"]


def same(lazy: Classification, eager: Classification) -> None:
    assert type(lazy) is type(eager) is Classification
    for name in FIELDS:
        assert getattr(lazy, name) == getattr(eager, name), name
        assert type(getattr(lazy, name)) is type(getattr(eager, name)), name
    assert lazy.to_json() == eager.to_json()
    assert lazy == eager and repr(lazy) == repr(eager)
    assert lazy.criteria_values() == eager.criteria_values() and lazy.evidence_refs() == eager.evidence_refs()


def test_fast_path_equals_reference_path_on_many_inputs():
    engine = Engine(load_ruleset())  # empty lookup tables: they fill while classifying
    features = feature_sets(3000, seed=5, unknown_share=0.3) + varied_features(9000, seed=3)
    for lazy, eager in zip(engine.classify_many(features), classify_many_eager(engine, features)):
        same(lazy, eager)


def test_each_traced_field_may_be_read_first():
    engine = Engine.default()
    features = varied_features(300, seed=8)
    eager = classify_many_eager(engine, features)
    for first in ("missing", "facts", "criteria", "to_json", "eq", "repr", "asdict"):
        for lazy, ref in zip(engine.classify_many(features), eager):
            if first == "to_json":
                assert lazy.to_json() == ref.to_json()
            elif first == "eq":
                assert lazy == ref
            elif first == "repr":
                assert repr(lazy) == repr(ref)
            elif first == "asdict":
                assert dataclasses.asdict(lazy) == dataclasses.asdict(ref)
            else:
                assert getattr(lazy, first) == getattr(ref, first)
            same(lazy, ref)


def test_batch_size_and_one_at_a_time_give_the_same_results():
    engine = Engine.default()
    features = varied_features(500, seed=21)
    whole = [r.to_json() for r in engine.classify_many(features)]
    assert [r.to_json() for r in engine.classify_many(features, batch=7)] == whole
    assert [engine.classify(f).to_json() for f in features[:100]] == whole[:100]


def test_a_trace_is_built_once_and_every_thread_reads_the_same_objects():
    engine = Engine.default()
    results = engine.classify_many(varied_features(400, seed=4))
    seen: list[list[tuple[int, int, int]]] = []
    start = threading.Barrier(8)

    def read():
        start.wait()
        seen.append([(id(r.criteria), id(r.facts), id(r.missing)) for r in results])

    threads = [threading.Thread(target=read) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(seen) == 8 and all(s == seen[0] for s in seen)
    assert all(r.criteria is r.criteria and r.missing is r.missing for r in results)


def test_classification_api_is_unchanged():
    engine = Engine.default()
    f = varied_features(1, seed=1)[0]
    lazy, eager = engine.classify(f), classify_many_eager(engine, [f])[0]
    assert dataclasses.is_dataclass(Classification)
    assert [x.name for x in dataclasses.fields(Classification)] == FIELDS
    for r in (lazy, eager):
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.group = "resectable"  # type: ignore[misc]
        with pytest.raises(TypeError):  # a frozen dataclass holding dicts: unhashable, as before
            hash(r)
        with pytest.raises(AttributeError):
            r.no_such_field
    assert dataclasses.replace(lazy, patient="Patient/other") == dataclasses.replace(eager, patient="Patient/other")
    for clone in (copy.copy(lazy), copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        same(clone, eager)
        assert "_trace_with" not in vars(clone)  # a copy holds its fields, never the engine
    # The result classes the engine shares between results stay immutable.
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.criteria["tumour_count_ge_4"].state = "absent"  # type: ignore[misc]


def test_results_of_two_engines_compare_by_their_fields():
    f = varied_features(50, seed=2)
    a, b = Engine(load_ruleset()).classify_many(f), Engine(load_ruleset()).classify_many(f)
    assert a == b
    assert a[0] != dataclasses.replace(a[0], group_rule="other")


def test_equal_values_of_other_types_are_never_mixed_up():
    """The lookup keys hold each value's type: ``1 == True`` and ``Decimal("50") ==
    Decimal("50.0")``, but a bool is refused where a number is declared, and the digits
    are part of the result."""
    engine = Engine(load_ruleset())
    base = dict(liver_recurrence=Fact[bool](value=True), extrahepatic_disease=Fact[bool](value=False))
    one = Features(**base, tumour_count=Fact[int](value=1), largest_diameter_mm=Fact(value=Decimal("50")))
    engine.classify(one)
    sneaked = Features.model_construct(**{**dict(one), "tumour_count": Fact[int].model_construct(value=True)})
    with pytest.raises(FactTypeError, match="tumour_count"):
        engine.classify(sneaked)
    with pytest.raises(FactTypeError, match="tumour_count"):
        classify_many_eager(engine, [sneaked])
    digits = Features(**{**dict(one), "largest_diameter_mm": Fact(value=Decimal("50.0"))})
    lazy = engine.classify_many([one, digits, one])
    assert [r.to_json()["evidence"]["largest_ge_50mm"]["value"] for r in lazy] == ["50", "50.0", "50"]
    for r, ref in zip(lazy, classify_many_eager(engine, [one, digits, one])):
        same(r, ref)


def test_lookup_tables_are_bounded(monkeypatch):
    monkeypatch.setattr(lookup, "CACHE_LIMIT", 5)
    engine = Engine(load_ruleset())
    features = varied_features(1500, seed=9)
    for lazy, eager in zip(engine.classify_many(features), classify_many_eager(engine, features)):
        same(lazy, eager)
    tables = engine._tables
    assert max(len(tables._stage1), len(tables._feature_fragments), len(tables._after_factors),
               len(engine._criteria), len(engine._missing_facts)) <= 5


def test_each_stage_posts_every_field_its_rules_test():
    """The engine posts only the fields some rule of a stage tests (the reference path
    posts every field; the test above shows the same rules fire)."""
    compiled = Engine.default().compiled

    def named(node) -> set[str]:
        if isinstance(node, dict):
            out = set()
            for key, value in node.items():
                if not key.startswith("$") and key not in ("all", "any", "m"):
                    out.add(key)
                out |= named(value)
            return out
        if isinstance(node, list):
            return set().union(*map(named, node)) if node else set()
        return set()

    for stage in (compiled.factors, compiled.decision, compiled.recommendations):
        assert set().union(*map(named, stage.rules.values())) <= set(stage.tested) <= set(stage.fields)
    assert "adjuvant_chemotherapy" not in compiled.decision.tested  # no group or status rule tests it


def test_an_inconsistent_rule_set_fails_the_same_way_on_both_paths(tmp_path):
    import yaml
    from rules import DEFAULT_RULESET

    data = yaml.safe_load(DEFAULT_RULESET.read_text())
    data["groups"] = [g for g in data["groups"] if g["rule"] != "G5-technical-in-doubt"]
    path = tmp_path / "gap.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    engine = Engine(load_ruleset(path), check_coverage=False)
    gap = Features(liver_recurrence=Fact[bool](value=True), tumour_count=Fact[int](value=1),
                   extrahepatic_disease=Fact[bool](value=False), technical_resectability=Fact(value="in-doubt"))
    with pytest.raises(RulesetInconsistentError, match="exactly one group rule to fire, got none") as fast:
        engine.classify_many([gap])
    with pytest.raises(RulesetInconsistentError) as reference:
        classify_many_eager(engine, [gap])
    assert str(fast.value) == str(reference.value)


def test_reused_firings_give_the_same_results_and_ask_durable_once_per_distinct_fact(monkeypatch):
    from engine import durable_session

    features = varied_features(3000, seed=12) * 2 + feature_sets(2000, seed=13, unknown_share=0.3)
    reusing = Engine(load_ruleset(), reuse_firings=True)
    plain = Engine.default()
    for a, b in zip(reusing.classify_many(features), plain.classify_many(features)):
        assert a.to_json() == b.to_json() and a == b  # rules_fired in the same order too
    real, asserted = durable_session._engine, []

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def assert_facts(handle, payload):
            asserted.append(payload.count('{"id":'))
            return real.assert_facts(handle, payload)

    monkeypatch.setattr(durable_session, "_engine", Counting())
    again = reusing.classify_many(features)  # every fact was posted before: durable is not asked again
    assert asserted == []
    fresh = varied_features(200, seed=14)
    fresh_results = reusing.classify_many(fresh)
    assert 0 < sum(asserted) < 3 * len(fresh)  # only the facts not posted before are fired
    for a, b in zip(fresh_results, plain.classify_many(fresh)):
        assert a.to_json() == b.to_json()
    assert [r.to_json() for r in again[:500]] == [r.to_json() for r in plain.classify_many(features[:500])]
