"""The one place that talks to durable_rules 2.0.28, with a guard for each sharp edge.

durable_rules is a C engine with a thin Python host. Observed in this project
(tests/unit/test_durable_guards.py proves each guard):

* **1024 live sessions per ruleset.** Each session id (``sid``) holds state until it
  is deleted; past about 1021 live sessions ``assert_fact`` raises MemoryError.
  -> every evaluation deletes its session's state in ``finally``. A ruleset asserts
  into one sid again only after that delete succeeded (durable then keeps nothing of
  it); after any failure it takes a fresh sid, so no evaluation ever sees another's facts.
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
* **One unmatched fact makes the whole batch "not handled".** ``assert_facts`` answers
  1 when any fact of the batch matched no rule, while the other facts' actions are
  pending. -> the pending actions are read whatever the answer.
* **Deleting a session that started no action can abort the process** ("free():
  invalid pointer"): durable leaves a new session's action context uninitialised until
  an action starts, so a ruleset's first batch that matches nothing crashes.
  -> every new session id is primed first: a primer fact fires an internal rule in
  it, and the slot the next session reuses holds cleared pointers.

**Fast path.** A fact is posted as a :class:`Fragment`: its fields checked against
their declared types once, by :meth:`DurableRuleset.fragment`, and kept as compact JSON
text, so a caller that posts the same fields again (the engine: the same states, the
same measured value) reuses the checked text instead of checking and serialising a dict
per fact. Only fragments made by the ruleset itself can be posted to it
(:meth:`DurableRuleset.fire_fragments`); :meth:`DurableRuleset.fire_many` checks and
posts plain dicts through the same path. Each fact of a batch carries durable's own
``id``, its index in the batch, written first: durable echoes the fact in every action
it starts, so the head of the action message (``{"<rule>":{"m":{"id":"0042"``) names
the rule and the fact, and two equal facts of one batch stay two facts. Fields are
posted, and the rules registered, under short names (``a``, ``b``, ...): durable parses,
hashes, copies and echoes every field name of every fact (callers never see them).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from itertools import chain
from operator import itemgetter
from typing import Callable, Literal, Mapping, Sequence

import durable.engine as _durable
import durable_rules_engine as _engine

from engine.durable_names import short_field_names

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
_RESERVED = ("sid", "id", "primer_")  # fields the session posts itself
# Fired once on every new session id before it is used (see DurableRuleset._fresh_session).
_PRIMER_RULE = "durable_session.primer"
_PRIMER = {"all": [{"m": {"primer_": True}}]}
# Which fact of a batch a fired rule matched: durable's own fact id, the fact's index in
# the batch, posted first, so that every action message starts {"<rule>":{"m":{"id":"<i>",...
_ID_AFTER_NAME = '":{"m":{"id":"'
_MIN_ID_WIDTH = 4  # digits of the index (more for larger batches)
_MAX_HEADS = 50_000  # message heads remembered per ruleset
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds an encoder per call


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


def _check_rule_names(rules: Mapping[str, Mapping]) -> None:
    if _PRIMER_RULE in rules:
        raise RulesetDefinitionError(f"rule name {_PRIMER_RULE!r} is the session's own")
    for name in rules:
        if not name or any(ch in name for ch in '"\\') or not (name.isascii() and name.isprintable()):
            raise RulesetDefinitionError(f"rule name {name!r}: printable ASCII without quotes or backslashes "
                                         "(durable echoes names in its messages as they are registered)")


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


class Fragment(str):
    """Fields of a fact checked against their declared types, as compact JSON without
    braces under their posted names (``"a":"t","b":5``); made by :meth:`DurableRuleset.fragment`
    and :meth:`DurableRuleset.join` only. ``mask``: a bit per field it holds."""

    mask: int


class DurableRuleset:
    """A ruleset registered once with durable_rules; :meth:`fire` evaluates one fact.

    ``rules`` is durable's JSON form without ``run``; ``fields`` declares every field a
    fact may carry and its type; ``actions`` optionally maps a rule name to a callback
    run with the matched fact (all rules are recorded either way). ``short_names=False``
    posts fields under their own names (the same rules fire; for comparison and
    debugging).
    """

    def __init__(self, name_hint: str, rules: Mapping[str, Mapping], fields: Mapping[str, FieldType],
                 actions: Mapping[str, Action] | None = None, short_names: bool = True):
        check_definition(rules)
        _check_rule_names(rules)
        unknown_actions = set(actions or {}) - set(rules)
        if unknown_actions:
            raise RulesetDefinitionError(f"actions for unknown rules: {sorted(unknown_actions)}")
        self.fields = dict(fields)
        self._bits = {f: 1 << i for i, f in enumerate(self.fields)}
        # Fragments are instances of a class of this ruleset's own: fire_fragments posts no others.
        self._fragment_type = type("Fragment", (Fragment,), {})
        self._message_heads: dict[str, tuple[int, str]] = {}
        self._starts: dict[tuple[int, str], list[str]] = {}
        self._rule_set = frozenset(rules)
        self._longest_name = max(map(len, rules), default=0)
        # One session id at a time, deleted after every evaluation, replaced after any
        # failure; at least as long as the longest rule name is longer than the shortest
        # (a message head is read by a fixed-length prefix, see fire_fragments).
        self._sid_width = max(8, self._longest_name - min(map(len, rules), default=0))
        self.rule_names = tuple(rules)
        self._actions = dict(actions or {})
        # Fields are posted under short names (durable parses, hashes, copies and echoes
        # every field name of every fact): the rules are registered with the same names.
        self._posted_names, registered = (short_field_names(self.fields, rules, _RESERVED) if short_names
                                          else ({f: f for f in self.fields}, dict(rules)))
        self._field_names = {short: field for field, short in self._posted_names.items()}
        # durable's host wants a callable per rule; fire() never lets the host run them.
        definition = {name: {**rule, "run": _never_called}
                      for name, rule in {**registered, _PRIMER_RULE: _PRIMER}.items()}
        with _LOCK:
            self.name = f"{name_hint}.{next(_NAMES)}"
            _HOST.register_rulesets({self.name: definition})
            self._handle = _HOST.get_ruleset(self.name)._handle
            self._sid = self._fresh_session()

    def validate_fact(self, fact: Mapping[str, object]) -> None:
        """Raise FactTypeError unless every field is declared and of its declared type."""
        for field, value in fact.items():
            if field not in self.fields or field in _RESERVED:
                raise FactTypeError(f"field {field!r} is not declared for this ruleset")
            _check_value(field, self.fields[field], value)

    def fragment(self, fields: Mapping[str, object]) -> Fragment:
        """``fields`` (all or part of a fact) checked like :meth:`validate_fact`, as a
        :class:`Fragment` that :meth:`fire_fragments` posts (alone, or :meth:`join`-ed)."""
        self.validate_fact(fields)
        posted = self._posted_names
        text = _COMPACT_JSON({posted[k]: v for k, v in fields.items()})[1:-1]
        out = self._fragment_type(text)
        out.mask = sum(self._bits[f] for f in fields)
        return out

    def join(self, *parts: Fragment) -> Fragment:
        """One fragment holding the fields of ``parts``, which must not share a field."""
        mask = 0
        for p in parts:
            if type(p) is not self._fragment_type:
                raise FactTypeError(f"{type(p).__name__} {str(p)[:60]!r} was not made by ruleset {self.name}")
            if p.mask & mask:
                raise FactTypeError(f"fragments of ruleset {self.name} post a field twice: {[str(x) for x in parts]}")
            mask |= p.mask
        out = self._fragment_type(",".join(p for p in parts if p))
        out.mask = mask
        return out

    def fire(self, fact: Mapping[str, object]) -> list[str]:
        """Assert ``fact`` in a fresh session; return the names of the rules that fired,
        each once, in firing order. See :meth:`fire_many`."""
        return self.fire_many([fact])[0]

    def fire_many(self, facts: Sequence[Mapping[str, object]]) -> list[list[str]]:
        """Assert ``facts`` together in one fresh session (one call into the engine);
        return, for each fact, the rules that fired on it, each once, in firing order.
        Every field is checked first (:meth:`fragment`). See :meth:`fire_fragments`."""
        return list(map(list, self.fire_fragments([self.fragment(fact) for fact in facts])))

    def fire_fragments(self, facts: Sequence[Fragment]) -> list[tuple[str, ...]]:
        """Assert ``facts`` (one fragment per fact, made by this ruleset) together in one
        fresh session; return, for each fact, the rules that fired on it, each once, in
        firing order (a tuple per fact). Every rule here tests a single fact, so facts
        sharing a session cannot match each other. The session's state is always
        deleted. An exception raised by a callback is re-raised as RuleActionError."""
        n = len(facts)
        if not n:
            return []
        if set(map(type, facts)) != {self._fragment_type}:
            bad = next(f for f in facts if type(f) is not self._fragment_type)
            raise FactTypeError(f"{type(bad).__name__} {str(bad)[:60]!r} was not made by ruleset {self.name}: "
                                "post facts through fragment() or fire_many()")
        # Each fact as {"id":"<index, fixed width>","sid":"<sid>",<fields>}: durable echoes
        # it in every action it starts, so the head of an action message,
        # {"<rule>":{"m":{"id":"<index>", names the rule and the fact.
        width = max(_MIN_ID_WIDTH, len(str(n - 1)))
        handle, step = self._handle, _engine.complete_and_start_action
        messages: list[str] = []
        with _LOCK:
            sid = self._sid = self._sid or self._fresh_session()
            starts = self._fact_starts(width, n, sid)
            if "" in facts:
                payload = "".join([f"{start}{fact}}}" if fact else f"{start[:-1]}}}"
                                   for start, fact in zip(starts, facts)]) + "]"
            else:
                payload = "".join(chain.from_iterable(zip(starts, facts))) + "}]"
            failed = True
            try:
                status, state = _engine.assert_facts(handle, payload)
                if status not in (0, 1):  # 0: actions pending, 1: no rule matched
                    raise RuleActionError(f"durable_rules answered {status} to facts of ruleset {self.name}")
                # 1 says some fact matched no rule, not that none did: the others' actions are pending.
                pending = _engine.start_action_for_state(handle, state)
                message = pending[1] if pending else None
                while message:  # each action started: a rule that fired, with the fact it matched
                    messages.append(message)
                    message = step(handle, state)
                failed = False
            finally:
                deleted = False
                try:
                    _engine.delete_state(handle, sid)
                    deleted = True
                except Exception:
                    if not failed:  # else keep the original error, not this follow-on one
                        raise
                finally:
                    if failed or not deleted:  # a session that may hold facts is never asserted into again
                        self._sid = None
        # The first `cut` characters of a message hold its whole head (rule names have no
        # quotes, the index has a fixed width, and the sid after it is longer than the
        # longest name is longer than the shortest): equal heads are one rule firing again
        # on the same fact (once per true branch of an $or), reported once, in firing order.
        cut = 2 + self._longest_name + len(_ID_AFTER_NAME) + width
        heads = dict.fromkeys(map(itemgetter(slice(0, cut)), messages))
        known = self._message_heads
        hits = list(map(known.get, heads))
        if None in hits:
            hits = [hit or self._read_message_head(head, width) for head, hit in zip(heads, hits)]
        fired: list[list[str]] = [[] for _ in range(n)]
        for index, name in hits:
            fired[index].append(name)
        if self._actions:
            self._run_actions(messages, cut, width)
        return list(map(tuple, fired))

    def _fresh_session(self) -> str:
        """A new session id, its state slot primed (called holding the lock).

        durable keeps a session's action context (two pointers) in a pool slot that it
        does not clear when it creates the session: only starting an action sets them
        (and completing it frees and clears them). Deleting a session that never started
        an action frees whatever the slot held: the process aborts ("free(): invalid
        pointer") when a ruleset's first batch matches no rule. So before a new sid is
        used, a primer fact fires the primer rule in it, the session is deleted, and the
        slot (which the next session takes again) holds cleared pointers."""
        sid = f"{next(_SIDS):0{self._sid_width}d}"
        status, state = _engine.assert_facts(self._handle, f'[{{"id":"primer","sid":"{sid}","primer_":true}}]')
        started = _engine.start_action_for_state(self._handle, state) if status == 0 else None
        message = started[1] if started else None
        while message:
            message = _engine.complete_and_start_action(self._handle, state)
        _engine.delete_state(self._handle, sid)
        if not started:
            raise RuleActionError(f"durable_rules did not fire the primer rule of ruleset {self.name}")
        return sid

    def _fact_starts(self, width: int, n: int, sid: str) -> list[str]:
        """'[{"id":"0000","sid":"<sid>",', then '},{"id":"0001","sid":"<sid>",' ..."""
        starts = self._starts.get((width, sid))
        if starts is None or len(starts) < n:
            if len(self._starts) > 16:
                self._starts.clear()
            starts = [f'{"}," if i else "["}{{"id":"{i:0{width}d}","sid":"{sid}",' for i in range(max(n, 256))]
            self._starts[(width, sid)] = starts
        return starts  # zip() stops at the last fact

    def _read_message_head(self, head: str, width: int) -> tuple[int, str]:
        """(fact index, rule name) of the head of an action message; remembered."""
        end = head.find('"', 2)
        name = head[2:end]
        digits = head[end + len(_ID_AFTER_NAME):end + len(_ID_AFTER_NAME) + width]
        if (end < 2 or name not in self._rule_set or not head.startswith(_ID_AFTER_NAME, end)
                or len(digits) != width or not digits.isdigit()):
            raise RuleActionError(f"durable_rules started an action this ruleset cannot read: {head[:200]!r}")
        hit = (int(digits), name)
        if len(self._message_heads) < _MAX_HEADS:
            self._message_heads[head] = hit
        return hit

    def _run_actions(self, messages: list[str], cut: int, width: int) -> None:
        """Run the callbacks of the rules that fired, once per rule and fact, in firing
        order, outside the engine and its lock."""
        seen = set()
        for message in messages:
            index, name = self._read_message_head(message[:cut], width)
            if name in self._actions and (index, name) not in seen:
                seen.add((index, name))
                fact = {self._field_names[k]: v for k, v in json.loads(message)[name]["m"].items()
                        if k not in _RESERVED}
                try:
                    self._actions[name](fact)
                except Exception as exc:
                    raise RuleActionError(
                        f"the action of rule {name!r} in ruleset {self.name} failed: {exc!r}") from exc


def _never_called(c) -> None:  # pragma: no cover - fire() drives the engine itself
    raise RuleActionError("durable's host ran an action: rules must be fired through DurableRuleset.fire")
