"""FHIR JSON in and out, with exact decimals.

* **Exact decimals.** Replies are parsed with ``parse_float=decimal.Decimal`` and bodies
  are written by :func:`dumps`, which writes a ``Decimal`` as the exact JSON number
  (``Decimal("49.9")`` -> ``49.9``; ``0.05`` stays ``0.05``). Use :func:`loads` on a raw
  :class:`requests.Response` from :meth:`FhirClient.request` to keep that property.
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["loads", "dumps"]


def loads(data: str | bytes) -> Any:
    """Parse JSON keeping decimals exact.

    >>> loads('{"value": 49.9, "n": 2}')
    {'value': Decimal('49.9'), 'n': 2}
    """
    if isinstance(data, str):
        return _DECODER.decode(data)   # one decoder, not one per call
    return json.loads(data, parse_float=decimal.Decimal)


_DECODER = json.JSONDecoder(parse_float=decimal.Decimal)


def dumps(obj: Any) -> str:
    """Serialise to compact JSON, writing :class:`decimal.Decimal` as the exact number.
    (The C encoder does the work; an object it cannot write exactly, such as
    ``Decimal("49.90")``, is written by the exact encoder. Keys that are not strings are
    written as the C encoder writes them, e.g. ``1`` as ``"1"``.)

    ``float`` is written with ``repr`` (shortest round-trip form). NaN and infinities
    are rejected (JSON has no such numbers).

    >>> dumps({"value": decimal.Decimal("49.9"), "p": 0.05, "s": "é", "ok": True})
    '{"value":49.9,"p":0.05,"s":"é","ok":true}'
    """
    try:
        return _FAST.encode(obj)   # C encoder; a Decimal whose float prints the same goes as that float
    except _NotExact:
        pass
    parts: list[str] = []
    _encode(obj, parts.append)
    return "".join(parts)


class _NotExact(Exception):
    """The fast path cannot write this object exactly (the exact encoder below does)."""


def _exact_float(o: Any) -> Any:
    """For the C encoder: a finite Decimal as a float when the float's shortest form is
    the Decimal's text (``Decimal("0.673")``); anything else goes to the exact encoder
    (``Decimal("49.90")``, non-dict mappings, keys that are not strings)."""
    if isinstance(o, decimal.Decimal) and o.is_finite():
        text = str(o)
        if o.as_tuple().exponent == 0 and int.__repr__(int(o)) == text:
            return int(o)          # Decimal("49")
        f = float(o)
        if float.__repr__(f) == text:
            return f               # Decimal("0.673")
    raise _NotExact


_FAST = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_exact_float,
                         check_circular=False)


def _encode(o: Any, out: Any) -> None:
    if o is None:
        out("null")
    elif o is True:
        out("true")
    elif o is False:
        out("false")
    elif isinstance(o, str):
        out(json.dumps(o, ensure_ascii=False))
    elif isinstance(o, int):
        out(int.__repr__(o))
    elif isinstance(o, decimal.Decimal):
        if not o.is_finite():
            raise ValueError(f"cannot write {o} as a JSON number")
        out(str(o))
    elif isinstance(o, float):
        if not math.isfinite(o):
            raise ValueError(f"cannot write {o} as a JSON number")
        out(float.__repr__(o))
    elif isinstance(o, Mapping):
        out("{")
        for i, (k, v) in enumerate(o.items()):
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be str, not {type(k).__name__}")
            if i:
                out(",")
            out(json.dumps(k, ensure_ascii=False))
            out(":")
            _encode(v, out)
        out("}")
    elif isinstance(o, (list, tuple)):
        out("[")
        for i, v in enumerate(o):
            if i:
                out(",")
            _encode(v, out)
        out("]")
    else:
        raise TypeError(f"cannot serialise {type(o).__name__} to JSON")
