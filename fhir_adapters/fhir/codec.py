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
    return json.loads(data, parse_float=decimal.Decimal)


def dumps(obj: Any) -> str:
    """Serialise to compact JSON, writing :class:`decimal.Decimal` as the exact number.

    ``float`` is written with ``repr`` (shortest round-trip form). NaN and infinities
    are rejected (JSON has no such numbers).

    >>> dumps({"value": decimal.Decimal("49.9"), "p": 0.05, "s": "é", "ok": True})
    '{"value":49.9,"p":0.05,"s":"é","ok":true}'
    """
    parts: list[str] = []
    _encode(obj, parts.append)
    return "".join(parts)


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
