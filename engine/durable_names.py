"""Short field names for a durable-rules ruleset (engine/durable_session.py).

durable-rules parses, hashes, copies and echoes every field name of every fact it is
given, so :class:`~engine.durable_session.DurableRuleset` posts fields under short names
(``a``, ``b``, ..., ``aa``, ...) and registers its rules with the same names. Only rules
in the forms the compiled rule sets use are rewritten (equality, ``$lt`` ``$lte`` ``$gt``
``$gte`` ``$neq`` on a declared field with a constant, ``$and`` / ``$or`` of those, in
``all`` / ``any`` terms); a ruleset with any other form keeps every name as it is.

    >>> names, rules = short_field_names(["kind", "n"], {"r": {"all": [{"m": {"$and": [
    ...     {"kind": "t"}, {"$gte": {"n": 4}}]}}]}})
    >>> names, rules
    ({'kind': 'a', 'n': 'b'}, {'r': {'all': [{'m': {'$and': [{'a': 't'}, {'$gte': {'b': 4}}]}}]}})
    >>> short_field_names(["n"], {"r": {"all": [{"m": {"$mt": {"n": "x.*"}}}]}})[0]
    {'n': 'n'}
"""

from __future__ import annotations

import itertools
import string
from typing import Collection, Iterable, Iterator, Mapping


class _NotShortened(Exception):
    pass


_COMPARISONS = frozenset(("$lt", "$lte", "$gt", "$gte", "$neq"))


def _short_names(reserved: Collection[str]) -> Iterator[str]:
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_letters, repeat=length):
            name = "".join(letters)
            if name not in reserved:
                yield name


def _short_expression(expr: object, names: Mapping[str, str]) -> dict:
    if not isinstance(expr, dict) or len(expr) != 1:
        raise _NotShortened
    (key, value), = expr.items()
    if key in ("$and", "$or") and isinstance(value, list):
        return {key: [_short_expression(v, names) for v in value]}
    if key in _COMPARISONS and isinstance(value, dict) and len(value) == 1:
        (field, constant), = value.items()
        if field in names and type(constant) in (int, float, str):
            return {key: {names[field]: constant}}
    elif key in names and type(value) in (str, int, float, bool):  # equality
        return {names[key]: value}
    raise _NotShortened


def short_field_names(fields: Iterable[str], rules: Mapping[str, Mapping], reserved: Collection[str] = ()
                      ) -> tuple[dict[str, str], dict[str, Mapping]]:
    """Short names for the fields, and the rules written with them. A rule in a form
    this does not know (anything but equality, the comparisons, $and and $or over
    declared fields and constants) keeps every name as it is."""
    fields = list(fields)
    names = dict(zip(fields, _short_names(reserved)))
    try:
        short = {}
        for name, rule in rules.items():
            out = dict(rule)
            for join in ("all", "any"):
                if join in rule:
                    terms = rule[join]
                    if not isinstance(terms, list) or not all(isinstance(t, dict) and len(t) == 1 for t in terms):
                        raise _NotShortened
                    out[join] = [{alias: _short_expression(expr, names)} for t in terms for alias, expr in t.items()]
            short[name] = out
        return names, short
    except _NotShortened:
        return {f: f for f in fields}, dict(rules)
