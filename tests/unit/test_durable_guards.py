"""Each durable_rules 2.0.28 sharp edge, and the guard in engine/durable_session.py.

Every test here fails if its guard is removed: the "raw" tests show the sharp edge on
durable's own Host (so a future durable_rules release that fixes it is noticed), the
others show the wrapper holding.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from decimal import Decimal

import durable.engine as raw_durable
import pytest

from engine import durable_session
from engine.classify import Engine
from engine.durable_session import (DurableRuleset, FactTypeError, RuleActionError,
                                    RulesetDefinitionError)
from engine.features import Fact, Features
from engine.ruleset import load_ruleset

FIELDS = {"kind": "string", "n": "number", "flag": "bool"}
GE4 = {"all": [{"m": {"$and": [{"kind": "t"}, {"$gte": {"n": 4}}]}}]}


def features(count: int, size: str = "20", ehd: bool = False) -> Features:
    return Features(patient="Patient/x", liver_recurrence=Fact[bool](value=True),
                    tumour_count=Fact[int](value=count), largest_diameter_mm=Fact(value=Decimal(size)),
                    extrahepatic_disease=Fact[bool](value=ehd), prior_liver_resection=Fact[bool](value=True))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------- sessions
def test_raw_durable_fails_after_about_1024_live_sessions():
    """The sharp edge: sessions that are never deleted exhaust the ruleset."""
    host = durable_session._ThreadlessHost()
    name = "raw-sessions-probe"
    host.register_rulesets({name: {"r": {**GE4, "run": lambda c: None}}})
    with pytest.raises(MemoryError):
        for i in range(1100):
            host.assert_fact(name, {"sid": str(i), "kind": "t", "n": 5})


def test_more_than_1024_classifications_succeed():
    engine = Engine.default()
    groups = {engine.classify(features(count=i % 7)).group for i in range(2500)}
    assert groups == {"resectable", "borderline-resectable"}


def test_memory_is_flat_across_many_classifications():
    engine = Engine.default()
    for i in range(2000):  # warm-up: allocator pools, caches
        engine.classify(features(count=i % 7))
    before = _rss_kib()
    for i in range(10000):
        engine.classify(features(count=i % 7, size=str(40 + i % 20)))
    grown = _rss_kib() - before
    # Without delete_state each session keeps its facts (and fails at ~1021 sessions).
    assert grown < 4 * 1024, f"resident memory grew by {grown} KiB over 10 000 classifications"


@pytest.mark.slow
def test_100000_classifications():
    engine = Engine.default()
    for i in range(100_000):
        assert engine.classify(features(count=i % 7)).group in ("resectable", "borderline-resectable")


# --------------------------------------------------------------------------- threads
THREAD_SCRIPT = textwrap.dedent("""
    import threading, sys
    from decimal import Decimal
    from engine.classify import Engine
    from engine.features import Fact, Features
    engine = Engine.default()
    errors = []
    def work(seed):
        try:
            for i in range(400):
                n = (seed + i) % 8
                f = Features(liver_recurrence=Fact[bool](value=True), tumour_count=Fact[int](value=n),
                             largest_diameter_mm=Fact(value=Decimal(10)),
                             extrahepatic_disease=Fact[bool](value=False),
                             prior_liver_resection=Fact[bool](value=True))
                g = engine.classify(f).group
                want = "borderline-resectable" if n >= 4 else "resectable"
                if g != want:
                    errors.append((n, g))
        except BaseException as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("errors", errors[:5])
    sys.exit(1 if errors else 0)
""")


def test_concurrent_classifications_from_threads_are_serialised():
    """Run in a child process: without the lock durable_rules can crash the process."""
    proc = subprocess.run([sys.executable, "-c", THREAD_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-500:], proc.stderr[-1500:])


def test_stock_host_starts_threads_and_ours_does_not():
    before = {t.ident for t in threading.enumerate()}
    raw_durable.Host()
    started = [t for t in threading.enumerate() if t.ident not in before]
    assert started, "durable's stock Host starts its dispatch timers (the sharp edge)"
    before = {t.ident for t in threading.enumerate()}
    DurableRuleset("no-threads", {"r": GE4}, FIELDS)
    assert [t for t in threading.enumerate() if t.ident not in before] == []


# --------------------------------------------------------------------------- actions
def test_raw_durable_swallows_action_exceptions():
    host = durable_session._ThreadlessHost()
    name = "raw-exception-probe"

    def boom(c):
        raise ValueError("boom")

    host.register_rulesets({name: {"r": {**GE4, "run": boom}}})
    state = host.assert_fact(name, {"sid": "1", "kind": "t", "n": 5})  # no exception raised
    assert "boom" in state["exception"]


def test_action_exception_is_raised_to_the_caller():
    def boom(fact):
        raise ValueError(f"bad fact {fact['n']}")

    rs = DurableRuleset("raises", {"r": GE4}, FIELDS, actions={"r": boom})
    with pytest.raises(RuleActionError, match="bad fact 5") as info:
        rs.fire({"kind": "t", "n": 5})
    assert isinstance(info.value.__cause__, ValueError)
    assert rs.fire({"kind": "t", "n": 1}) == []  # the ruleset still works afterwards


# --------------------------------------------------------------------------- types
def test_raw_durable_matches_strings_and_booleans_against_numbers():
    host = durable_session._ThreadlessHost()
    name = "raw-types-probe"
    fired = []
    host.register_rulesets({name: {
        "ge4": {**GE4, "run": lambda c: fired.append("ge4")},
        "lt10": {"all": [{"m": {"$and": [{"kind": "t"}, {"$lt": {"n": 10}}]}}], "run": lambda c: fired.append("lt10")},
    }})
    host.assert_fact(name, {"sid": "1", "kind": "t", "n": "abc"})
    host.assert_fact(name, {"sid": "2", "kind": "t", "n": True})
    assert "ge4" in fired and "lt10" in fired


@pytest.mark.parametrize("value", ["10", "abc", True, False, None, float("nan"), float("inf"), [4], {"v": 4},
                                   1e-05, 1e300, 2**60, Decimal("5")])
def test_wrong_types_never_reach_a_numeric_rule(value):
    rs = DurableRuleset("typed", {"r": GE4}, FIELDS)
    with pytest.raises(FactTypeError, match="'n' must be a number"):
        rs.fire({"kind": "t", "n": value})


def test_raw_durable_cannot_read_numbers_with_an_exponent():
    host = durable_session._ThreadlessHost()
    host.register_rulesets({"raw-exp-probe": {"r": {**GE4, "run": lambda c: None}}})
    with pytest.raises(Exception):
        host.assert_fact("raw-exp-probe", {"sid": "1", "kind": "t", "n": 1e-05})


def test_classification_with_extreme_sizes_is_an_error_not_a_crash():
    from engine.compile import exact_for
    assert exact_for(Decimal("0.00001"), ">=") == 0  # floors to 0.000: a plain number for durable
    with pytest.raises(FactTypeError, match="too large"):
        Engine.default().classify(features(count=1, size="1E+400"))


def test_undeclared_fields_and_non_boolean_flags_are_refused():
    rs = DurableRuleset("typed2", {"r": GE4}, FIELDS)
    with pytest.raises(FactTypeError, match="not declared"):
        rs.fire({"kind": "t", "n": 5, "sid": "mine"})
    with pytest.raises(FactTypeError, match="'flag' must be a bool"):
        rs.fire({"kind": "t", "flag": 1})


def test_features_refuse_strings_and_booleans_for_numbers():
    with pytest.raises(ValueError):
        Features(tumour_count={"value": "10"})
    with pytest.raises(ValueError):
        Features(tumour_count={"value": True})
    with pytest.raises(ValueError):
        Features(largest_diameter_mm={"value": True})
    with pytest.raises(ValueError):
        Features(largest_diameter_mm={"value": "55"})


# --------------------------------------------------------------------------- rule shapes
def test_negation_only_rule_is_refused():
    with pytest.raises(RulesetDefinitionError, match="only negated"):
        DurableRuleset("neg", {"r": {"all": [{"m$not": {"n": 1}}]}}, FIELDS)


@pytest.mark.parametrize("expr", [{"$nex": {"n": 1}}, {"$and": [{"kind": "t"}, {"$or": [{"$nex": {"n": 1}}, {"n": 2}]}]},
                                  {"$ex": {"n": 1}}])
def test_existence_tests_are_refused(expr):
    """`$nex` alone hangs durable_rules; inside `$or` it crashes the process."""
    with pytest.raises(RulesetDefinitionError, match=r"\$nex/\$ex"):
        DurableRuleset("nex", {"r": {"all": [{"m": expr}]}}, FIELDS)


def test_compiled_rule_set_uses_no_existence_test_or_negation():
    engine = Engine.default()
    text = repr([engine.compiled.factors.rules, engine.compiled.decision.rules,
                 engine.compiled.recommendations.rules])
    assert "$nex" not in text and "$ex" not in text and "$not" not in text


def test_rule_with_several_true_or_branches_is_reported_once():
    calls = []
    rule = {"all": [{"m": {"$and": [{"kind": "t"}, {"$or": [{"$gte": {"n": 1}}, {"$gte": {"n": 2}}, {"$gte": {"n": 3}}]}]}}]}
    rs = DurableRuleset("or-once", {"r": rule}, FIELDS, actions={"r": lambda f: calls.append(f["n"])})
    assert rs.fire({"kind": "t", "n": 5}) == ["r"]
    assert calls == [5]


# --------------------------------------------------------------------------- names
def test_raw_durable_refuses_a_second_registration_of_a_name():
    host = durable_session._ThreadlessHost()
    host.register_rulesets({"dup-probe": {"r": {**GE4, "run": lambda c: None}}})
    with pytest.raises(Exception, match="already registered"):
        host.register_rulesets({"dup-probe": {"r": {**GE4, "run": lambda c: None}}})


def test_reloading_the_same_rule_set_registers_new_names():
    first, second = Engine(load_ruleset()), Engine(load_ruleset())
    assert first._factors.name != second._factors.name
    f = features(count=5)
    assert first.classify(f).group == second.classify(f).group == "borderline-resectable"


# --------------------------------------------------------------------------- the fast path
def test_only_fragments_the_ruleset_made_can_be_posted():
    rs = DurableRuleset("fragments", {"r": GE4}, FIELDS)
    other = DurableRuleset("fragments-other", {"r": GE4}, FIELDS)
    good = rs.fragment({"kind": "t", "n": 5})
    assert rs.fire_fragments([good, good]) == [("r",), ("r",)]
    for bad in ('"a":"t","b":5', other.fragment({"kind": "t", "n": 5})):
        with pytest.raises(FactTypeError, match="was not made by ruleset"):
            rs.fire_fragments([good, bad])
    with pytest.raises(FactTypeError, match="'n' must be a number"):
        rs.fragment({"kind": "t", "n": "5"})
    with pytest.raises(FactTypeError, match="not declared"):
        rs.fragment({"kind": "t", "n": 5, "id": "7"})
    with pytest.raises(FactTypeError, match="post a field twice"):
        rs.join(rs.fragment({"kind": "t"}), rs.fragment({"kind": "t", "n": 5}))
    with pytest.raises(FactTypeError, match="was not made by ruleset"):
        rs.join(rs.fragment({"kind": "t"}), other.fragment({"n": 5}))
    assert rs.fire_fragments([rs.join(rs.fragment({"kind": "t"}), rs.fragment({"n": 5}))]) == [("r",)]


def test_equal_facts_of_one_batch_stay_separate_facts():
    """Each fact carries its index as durable's id (without it, durable would hash equal
    facts to one id and keep only one of them)."""
    rs = DurableRuleset("equal-facts", {"r": GE4}, FIELDS)
    assert rs.fire_many([{"kind": "t", "n": 5}] * 3 + [{"kind": "t", "n": 1}]) == [["r"], ["r"], ["r"], []]


@pytest.mark.parametrize("width", [1, 4])
def test_fact_index_widths(monkeypatch, width):
    """Batches whose index needs more digits than the minimum width (1 digit here: 150
    facts need 3) are read right, and so are the same rules in batches of another width."""
    monkeypatch.setattr(durable_session, "_MIN_ID_WIDTH", width)
    rs = DurableRuleset("widths", {"r": GE4, "big": {"all": [{"m": {"$and": [{"kind": "t"}, {"$gte": {"n": 100}}]}}]}},
                        FIELDS)
    for size in (5, 150, 12):
        facts = [{"kind": "t", "n": 4 + (i * 37) % 120} for i in range(size)]
        assert rs.fire_many(facts) == [["r", "big"] if f["n"] >= 100 else ["r"] for f in facts]


def test_a_session_is_used_again_only_after_it_was_deleted(monkeypatch):
    rs = DurableRuleset("sessions", {"r": GE4}, FIELDS)
    assert rs.fire({"kind": "t", "n": 5}) == ["r"]
    sid = rs._sid
    assert rs.fire({"kind": "t", "n": 5}) == ["r"] and rs._sid == sid  # deleted: the same sid is empty again
    real = durable_session._engine

    class FailingDelete:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def delete_state(handle, session):
            raise RuntimeError("delete failed")

    monkeypatch.setattr(durable_session, "_engine", FailingDelete())
    with pytest.raises(RuntimeError, match="delete failed"):
        rs.fire({"kind": "t", "n": 5})
    monkeypatch.setattr(durable_session, "_engine", real)
    assert rs.fire_many([{"kind": "t", "n": 1}]) == [[]]  # in a new, primed session: no abort
    assert rs._sid != sid  # that session may still hold its fact: never asserted into again
    assert rs.fire_many([{"kind": "t", "n": 5}, {"kind": "t", "n": 1}]) == [["r"], []]


def test_raw_durable_answers_not_handled_for_a_batch_with_one_unmatched_fact():
    """The sharp edge: status 1 although the first fact's action is pending."""
    rs = DurableRuleset("mixed-probe", {"r": GE4}, FIELDS)
    sid = "mixed-1"
    payload = '[{"id":"0","sid":"mixed-1","a":"t","b":5},{"id":"1","sid":"mixed-1","a":"t","b":1}]'
    assert rs._posted_names == {"kind": "a", "n": "b", "flag": "c"}
    status, state = durable_session._engine.assert_facts(rs._handle, payload)
    pending = durable_session._engine.start_action_for_state(rs._handle, state)
    while durable_session._engine.complete_and_start_action(rs._handle, state):
        pass
    durable_session._engine.delete_state(rs._handle, sid)
    assert status == 1 and pending is not None
    assert rs.fire_many([{"kind": "t", "n": 5}, {"kind": "t", "n": 1}]) == [["r"], []]  # the guard


FIRST_BATCH_SCRIPT = textwrap.dedent("""
    from engine.durable_session import DurableRuleset
    GE4 = {"all": [{"m": {"$and": [{"kind": "t"}, {"$gte": {"n": 4}}]}}]}
    for i in range(20):
        rs = DurableRuleset("first", {"r": GE4}, {"kind": "string", "n": "number"})
        assert rs.fire_many([{"kind": "t", "n": 1}]) == [[]]
        assert rs.fire_many([{"kind": "t", "n": 5}, {"kind": "t", "n": 1}]) == [["r"], []]
    print("ok")
""")


def test_a_first_batch_that_matches_no_rule_does_not_abort_the_process():
    """Without the primed session, durable frees an uninitialised pointer when it
    deletes the session (run in a child process: that aborts it)."""
    proc = subprocess.run([sys.executable, "-c", FIRST_BATCH_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-1500:])


def test_short_field_names_fire_the_same_rules():
    """Fields are posted (and the rules registered) under short names; the same rules
    fire as with the fields' own names, on every stage of the compiled rule set."""
    import random

    from benchmarks.generate import feature_sets
    from engine.compile import DECIDED_KIND, STATES_KIND
    from engine.ruleset import GROUP_IDS

    engine = Engine.default()
    c, rng = engine.compiled, random.Random(3)
    domains = engine.ruleset.fact_domains
    states = [{"kind": STATES_KIND, **{f: rng.choice(d) for f, d in domains.items()}} for _ in range(300)]
    stages = [(c.factors, [engine.features_fact(f) for f in feature_sets(300, seed=2, unknown_share=0.3)]),
              (c.decision, states),
              (c.recommendations, [{**s, "kind": DECIDED_KIND, "group": rng.choice(GROUP_IDS)} for s in states])]
    for stage, facts in stages:
        short = DurableRuleset("short", stage.rules, stage.fields)
        plain = DurableRuleset("plain", stage.rules, stage.fields, short_names=False)
        assert set(short._posted_names.values()) != set(stage.fields)  # really shortened
        assert short.fire_many(facts) == plain.fire_many(facts)


def test_a_rule_form_the_shortener_does_not_know_keeps_every_name():
    rules = {"r": GE4, "u": {"all": [{"m": {"$and": [{"kind": "t"}, {"undeclared": 1}]}}]}}
    rs = DurableRuleset("unknown-form", rules, FIELDS)
    assert rs._posted_names == {f: f for f in FIELDS}
    assert rs.fire_many([{"kind": "t", "n": 5}, {"kind": "t", "n": 9}]) == [["r"], ["r"]]


@pytest.mark.parametrize("name", ['a"b', "a\\b", "caf\u00e9", "", "tab\there"])
def test_rule_names_durable_would_not_echo_verbatim_are_refused(name):
    with pytest.raises(RulesetDefinitionError, match="rule name"):
        DurableRuleset("names", {name: GE4}, FIELDS)
