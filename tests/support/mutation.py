"""Damaged copies of the fixture Bundles for the fuzz tests (tests/unit/test_properties.py
in-process, tests/unit/test_fuzz_input.py through the CLI)."""

from __future__ import annotations

import copy
from decimal import Decimal

from hypothesis import strategies as st

from fhir_adapters.sources.bundle import loads
from fixtures import FIXTURES_DIR


def _fixture_bundles() -> list[tuple[str, dict]]:
    return [(p.name, loads(p.read_bytes())) for p in sorted(FIXTURES_DIR.glob("[0-9][0-9]-*.json"))]


FIXTURE_BUNDLES = _fixture_bundles()

weird_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "", " ", "abc", "50", "5.0", "cm", "[in_i]",
                     "2024-13-45", "2024-05", "2024", "0000-00-00", "Patient/other", "\u00e9\u6f22\U0001f600",
                     "\x00", "resectable", "entered-in-error", "refuted"]),
    st.text(max_size=12),
    st.just([]), st.just({}), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["coding", "system", "code", "reference", "value"]), st.text(max_size=5),
                    max_size=2),
)


def _paths(node, path=()):
    """Every (container path, key) in a JSON tree."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(path + (k,))
            out += _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append(path + (i,))
            out += _paths(v, path + (i,))
    return out


def _parent(root, path):
    node = root
    for k in path[:-1]:
        node = node[k]
    return node


def mutate(data: dict, draw) -> dict:
    """A copy of ``data`` with 1 to 6 random damages (dropped keys, weird values, odd units,
    extreme numbers); ``draw`` is hypothesis' ``data.draw``."""
    doc = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 6))):
        paths = _paths(doc)
        if not paths:
            break
        # mostly inside a resource (entry/i/resource/...), sometimes the Bundle structure
        deep = [p for p in paths if len(p) >= 4]
        path = draw(st.sampled_from(deep if deep and draw(st.integers(0, 9)) < 9 else paths))
        parent = _parent(doc, path)
        key = path[-1]
        op = draw(st.sampled_from(["drop", "replace", "replace", "unit", "number"]))
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(weird_values)
        elif op == "unit":
            if isinstance(parent, dict) and "code" in parent and "value" in parent:
                parent["code"] = draw(st.sampled_from(["in", "[in_i]", "km", "um", "", "MM", "mm2", "\u339c"]))
            else:
                parent[key] = draw(weird_values)
        else:
            parent[key] = draw(st.sampled_from([Decimal("1e300"), Decimal("-1e300"), Decimal("-1e-300"), 10**25,
                                                Decimal("49.99999999999999999999999"), 0, -0.0]))
    return doc
