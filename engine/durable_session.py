"""The one place that talks to durable_rules 2.0.28, with a guard for each sharp edge.

durable_rules is a C engine with a thin Python host. Observed in this project
(tests/test_durable_guards.py proves each guard):

* **1024 live sessions per ruleset.** Each session id (``sid``) holds state until it
  is deleted; past about 1021 live sessions ``assert_fact`` raises MemoryError.
  -> every evaluation uses a fresh sid and deletes its state in ``finally``.
* **Not thread-safe.** Concurrent calls crash the process; the stock ``Host`` also
  starts timer threads that call into the C engine every 0.2 s.
  -> a host that starts no background threads, and one process-wide lock.
* **Action exceptions are swallowed.** They end up as text in the session state.
  -> actions are wrapped; any exception is re-raised to the caller after the call.
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
import math
import threading
from typing import Callable, Literal, Mapping

import durable.engine as _durable

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
        self._fired: list[str] | None = None
        self._errors: list[BaseException] = []
        definition = {name: {**rule, "run": self._make_action(name)} for name, rule in rules.items()}
        with _LOCK:
            self.name = f"{name_hint}.{next(_NAMES)}"
            _HOST.register_rulesets({self.name: definition})

    def _make_action(self, rule_name: str):
        def action(c) -> None:
            try:
                if self._fired is None:
                    raise RuleActionError(f"rule {rule_name!r} fired outside an evaluation")
                if rule_name in self._fired:  # another satisfied $or branch of the same rule
                    return
                self._fired.append(rule_name)
                callback = self._actions.get(rule_name)
                if callback is not None:
                    callback(dict(c.m._d))
            except BaseException as exc:  # durable would swallow it: keep it for the caller
                self._errors.append(exc)
        return action

    def validate_fact(self, fact: Mapping[str, object]) -> None:
        """Raise FactTypeError unless every field is declared and of its declared type."""
        for field, value in fact.items():
            if field not in self.fields:
                raise FactTypeError(f"field {field!r} is not declared for this ruleset")
            _check_value(field, self.fields[field], value)

    def fire(self, fact: Mapping[str, object]) -> list[str]:
        """Assert ``fact`` in a fresh session; return the names of the rules that fired.

        The session's state is always deleted. An exception raised by an action is
        re-raised here as RuleActionError.
        """
        self.validate_fact(fact)
        with _LOCK:
            sid = str(next(_SIDS))
            self._fired, self._errors = [], []
            failed = True
            try:
                state = _HOST.assert_fact(self.name, {**fact, "sid": sid})
                failed = False
            except _durable.MessageNotHandledException:
                state, failed = None, False
            finally:
                fired, errors = self._fired, self._errors
                self._fired, self._errors = None, []
                try:
                    _HOST.delete_state(self.name, sid)
                except Exception:
                    if not failed:  # else keep the original error, not this follow-on one
                        raise
        if errors:
            raise RuleActionError(f"an action of ruleset {self.name} failed: {errors[0]!r}") from errors[0]
        if isinstance(state, dict) and state.get("exception"):
            raise RuleActionError(f"durable_rules reported an action failure: {state['exception']}")
        return fired
