"""The one place that talks to durable_rules 2.0.28, with a guard for each sharp edge.

durable_rules is a C engine with a thin Python host. Observed in this project
(tests/unit/test_durable_guards.py proves each guard):

* **1024 live sessions per ruleset.** Each session id (``sid``) holds state until it
  is deleted; past about 1021 live sessions ``assert_fact`` raises MemoryError.
  -> every evaluation uses a fresh sid and deletes its state in ``finally``.
* **Not thread-safe.** Concurrent calls crash the process; the stock ``Host`` also
  starts timer threads that call into the C engine every 0.2 s.
  -> a host that starts no background threads, and one process-wide lock.
* **Action exceptions are swallowed** by durable's Python host (they end up as text in
  the session state), and the host costs ~65 us per action in bookkeeping (a state
  JSON dump and update per action).
  -> :meth:`DurableRuleset.fire` drives durable's C engine itself (assert, then each
  pending action in turn): every rule that fires is recorded, callbacks run in our
  loop, and their exceptions reach the caller. The Python host is used only to
  register rulesets.
* **Strings and booleans match numeric tests.** ``True`` satisfies ``n < 10`` and
  ``"abc"`` satisfies ``n >= 4``. Its JSON parser also fails on numbers written with
  an exponent (``1e-05``: error 204).
  -> every posted field is checked against its declared type first; numbers must be
  finite and plain (no exponent in their JSON form).
* **Negation-only rules loop forever**, a rule that only tests ``$nex`` (field
  missing) hangs, and ``$nex`` directly inside ``$or`` crashes the process (SIGSEGV).
  -> negation-only rules and ``$nex`` / ``$ex`` anywhere are refused when the ruleset
  is registered; callers post explicit ``<field>_known`` flags instead.
* **A ruleset name cannot be registered twice.** -> each registration gets a new,
  unique name, so a reloaded rule set never collides with the old one.
* **Events are consumed by one rule** (a second matching rule does not fire).
  -> facts are asserted instead, so every matching rule fires.
* **A rule fires once per satisfied branch of an ``$or``** (three true branches,
  three firings on one fact). -> each rule is reported, and its callback run, once
  per fact.
* **A fact no rule matches raises** MessageNotHandledException. -> returns no rules.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
from typing import Callable, Literal, Mapping, Sequence

import durable.engine as _durable
import durable_rules_engine as _engine

FieldType = Literal["number", "bool", "string"]
Action = Callable[[dict], None]


class FactTypeError(TypeError):
    """A field about to be posted does not have its declared type."""


class RuleActionError(RuntimeError):
    """An action raised inside durable_rules (which would otherwise swallow it)."""


class RulesetDefinitionError(ValueError):
    """A ruleset durable_rules cannot run safely."""


class _ThreadlessHost(_durable.Host):
    """durable's Host without its dispatch/timer threads (they call into the C engine
    concurrently with ours; this project uses neither timers nor queued actions)."""

    def _run(self) -> None:  # noqa: D401 - overrides the thread starter
        return None


_HOST = _ThreadlessHost()
_LOCK = threading.Lock()
_NAMES = itertools.count(1)
_SIDS = itertools.count(1)
_FACT_ID = "fid"  # which fact of a batch a fired rule matched (the engine echoes the fact)
_FACT_ID_RE = re.compile(r'"fid":\s*(\d+)')


def _is_negation(term: Mapping) -> bool:
    return all(key.endswith("$not") for key in term)


def _uses_existence_test(node: object) -> bool:
    if isinstance(node, dict):
        return any(k in ("$nex", "$ex") or _uses_existence_test(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_uses_existence_test(v) for v in node)
    return False


def check_definition(rules: Mapping[str, Mapping]) -> None:
    """Refuse rules durable_rules cannot run safely (negation-only, $nex/$ex, empty)."""
    for name, rule in rules.items():
        if _uses_existence_test(rule):
            raise RulesetDefinitionError(
                f"rule {name!r} tests whether a field exists ($nex/$ex); durable_rules 2.0.28 "
                "hangs or crashes on such rules: post an explicit <field>_known flag")
        terms = list(rule.get("all", [])) + list(rule.get("any", []))
        if not terms:
            raise RulesetDefinitionError(f"rule {name!r} has no condition")
        if all(_is_negation(t) for t in terms):
            raise RulesetDefinitionError(
                f"rule {name!r} has only negated conditions; durable_rules 2.0.28 loops "
                "forever on such rules: add a positive condition")


def _plain_number(value: object) -> bool:
    if type(value) is int:
        return abs(value) < 2**53
    if type(value) is float:
        return math.isfinite(value) and "e" not in repr(value).lower()
    return False  # bool, str, Decimal, None...


def _check_value(field: str, kind: FieldType, value: object) -> None:
    if kind == "number":
        ok = _plain_number(value)
    elif kind == "bool":
        ok = type(value) is bool
    else:
        ok = type(value) is str
    if not ok:
        what = f"{type(value).__name__} {value!r}"[:80]
        raise FactTypeError(f"field {field!r} must be a {kind}"
                            + (" written without an exponent" if kind == "number" and type(value) is float else "")
                            + f", got {what}")


class DurableRuleset:
    """A ruleset registered once with durable_rules; :meth:`fire` evaluates one fact.

    ``rules`` is durable's JSON form without ``run``; ``fields`` declares every field a
    fact may carry and its type; ``actions`` optionally maps a rule name to a callback
    run with the matched fact (all rules are recorded either way).
    """

    def __init__(self, name_hint: str, rules: Mapping[str, Mapping], fields: Mapping[str, FieldType],
                 actions: Mapping[str, Action] | None = None):
        check_definition(rules)
        unknown_actions = set(actions or {}) - set(rules)
        if unknown_actions:
            raise RulesetDefinitionError(f"actions for unknown rules: {sorted(unknown_actions)}")
        self.fields = dict(fields)
        self.rule_names = tuple(rules)
        self._actions = dict(actions or {})
        # durable's host wants a callable per rule; fire() never lets the host run them.
        definition = {name: {**rule, "run": _never_called} for name, rule in rules.items()}
        with _LOCK:
            self.name = f"{name_hint}.{next(_NAMES)}"
            _HOST.register_rulesets({self.name: definition})
            self._handle = _HOST.get_ruleset(self.name)._handle

    def validate_fact(self, fact: Mapping[str, object]) -> None:
        """Raise FactTypeError unless every field is declared and of its declared type."""
        for field, value in fact.items():
            if field not in self.fields or field in ("sid", _FACT_ID):
                raise FactTypeError(f"field {field!r} is not declared for this ruleset")
            _check_value(field, self.fields[field], value)

    def fire(self, fact: Mapping[str, object]) -> list[str]:
        """Assert ``fact`` in a fresh session; return the names of the rules that fired,
        each once, in firing order. See :meth:`fire_many`."""
        return self.fire_many([fact])[0]

    def fire_many(self, facts: Sequence[Mapping[str, object]]) -> list[list[str]]:
        """Assert ``facts`` together in one fresh session (one call into the engine);
        return, for each fact, the rules that fired on it, each once, in firing order.

        Every rule here tests a single fact, so facts sharing a session cannot match
        each other. The session's state is always deleted. An exception raised by a
        callback is re-raised here as RuleActionError.
        """
        for fact in facts:
            self.validate_fact(fact)
        fired: list[list[str]] = [[] for _ in facts]
        matched: list[tuple[str, str]] = []
        if not facts:
            return fired
        with _LOCK:
            sid = str(next(_SIDS))
            failed = True
            try:
                payload = json.dumps([{**fact, "sid": sid, _FACT_ID: i} for i, fact in enumerate(facts)])
                status, state = _engine.assert_facts(self._handle, payload)
                if status not in (0, 1):  # 0: actions pending, 1: no rule matched
                    raise RuleActionError(f"durable_rules answered {status} to facts of ruleset {self.name}")
                pending = _engine.start_action_for_state(self._handle, state) if status == 0 else None
                message = pending[1] if pending else None
                while message:
                    name = message[2:message.index('"', 2)]  # {"<rule name>":{"m":{... "fid": n ...}}}
                    rules = fired[int(_FACT_ID_RE.search(message).group(1))]
                    if name not in rules:  # a rule fires once per true branch of an $or
                        rules.append(name)
                        if name in self._actions:
                            matched.append((name, message))
                    message = _engine.complete_and_start_action(self._handle, state)
                failed = False
            finally:
                try:
                    _engine.delete_state(self._handle, sid)
                except Exception:
                    if not failed:  # else keep the original error, not this follow-on one
                        raise
        for name, message in matched:  # callbacks run outside the engine and the lock
            fact = {k: v for k, v in json.loads(message)[name]["m"].items() if k not in ("sid", _FACT_ID)}
            try:
                self._actions[name](fact)
            except Exception as exc:
                raise RuleActionError(f"the action of rule {name!r} in ruleset {self.name} failed: {exc!r}") from exc
        return fired


def _never_called(c) -> None:  # pragma: no cover - fire() drives the engine itself
    raise RuleActionError("durable's host ran an action: rules must be fired through DurableRuleset.fire")
