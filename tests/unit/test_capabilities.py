"""``ServerCapabilities.parse`` reads any JSON a server sends as its CapabilityStatement
without raising: malformed parts are ignored and named in ``problems``, and the
well-formed parts around them are still read."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fhir_adapters.fhir.capabilities import ResourceCapabilities, ServerCapabilities
from fhir_adapters.fhir.load import client_ids_allowed
from fhir_adapters.writeback.strategy import choose

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value (what json.loads can return).
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)


def shaped(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right shape, sometimes any JSON value at all."""
    return st.one_of(good, json_values)


def listed(element: st.SearchStrategy) -> st.SearchStrategy:
    return shaped(st.lists(shaped(element), max_size=4))


codes = listed(st.fixed_dictionaries({"code": shaped(st.sampled_from(["batch", "transaction", "read", "delete"]))}))
resource_entry = st.fixed_dictionaries({}, optional={
    "type": shaped(st.sampled_from(["Patient", "RiskAssessment", "Observation"])),
    "interaction": codes,
    "searchParam": listed(st.fixed_dictionaries({"name": shaped(st.sampled_from(["patient", "identifier"]))})),
    "operation": listed(st.fixed_dictionaries({"name": shaped(st.just("export"))})),
    "updateCreate": shaped(st.sampled_from([True, False, "true"])),
    "conditionalCreate": json_values, "conditionalUpdate": json_values,
})
rest_entry = st.fixed_dictionaries({}, optional={
    "mode": shaped(st.sampled_from(["server", "client"])), "interaction": codes,
    "operation": listed(st.fixed_dictionaries({"name": shaped(st.just("export"))})),
    "resource": listed(resource_entry),
})
statements = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "resourceType": shaped(st.just("CapabilityStatement")),
    "fhirVersion": shaped(st.just("4.0.1")),
    "software": shaped(st.fixed_dictionaries({}, optional={"name": json_values, "version": json_values})),
    "rest": listed(rest_entry),
}))

GOOD_RESOURCE = {"type": "RiskAssessment", "updateCreate": True, "conditionalCreate": True,
                 "searchParam": [{"name": "identifier"}, {"name": "patient"}],
                 "interaction": [{"code": "read"}, {"code": "search-type"}]}


def check_shape(caps: ServerCapabilities) -> None:
    assert isinstance(caps.fhir_version, str) and isinstance(caps.software, str)
    assert all(isinstance(x, str) for x in caps.system_interactions | caps.system_operations)
    assert all(isinstance(t, str) and isinstance(r, ResourceCapabilities) for t, r in caps.resources.items())
    assert all(isinstance(x, str) for r in caps.resources.values()
               for x in r.interactions | r.search_params | r.operations)
    assert isinstance(caps.problems, tuple) and all(isinstance(p, str) and p for p in caps.problems)
    # what the program asks of it works too
    caps.batch, caps.export, caps.missing_search("RiskAssessment", ["patient"])
    caps.missing_interaction(["Patient", "RiskAssessment"], "delete")
    client_ids_allowed(caps, ["Patient", "Observation"])
    choose(caps)


@SETTINGS
@given(statements)
@example({"rest": {}})
@example({"rest": [{"interaction": 5, "resource": 5}]})
@example({"rest": [{"resource": [{"type": "Patient", "searchParam": "x", "interaction": {"code": "read"}}]}]})
@example({"rest": [5, "x", None, [1]]})
@example({"software": "SEKMET", "fhirVersion": ["4.0.1"]})
@example([1, 2])
def test_parse_never_raises_on_any_json(statement):
    # what a server can send is JSON: round-trip it so the value is exactly what json.loads gives
    statement = json.loads(json.dumps(statement))
    check_shape(ServerCapabilities.parse(statement))


@SETTINGS
@given(statements, st.integers(0, 4))
def test_a_good_resource_entry_is_read_whatever_sits_beside_it(noise, where):
    """Garbage around a well-formed RiskAssessment entry never hides it."""
    noise = json.loads(json.dumps(noise))
    rest = noise.get("rest") if isinstance(noise, dict) and isinstance(noise.get("rest"), list) else []
    entries = [e for e in rest if isinstance(e, dict) and e.get("mode", "server") == "server"
               and isinstance(e.get("resource"), list)]
    entry = {"mode": "server", "resource": list(entries[0]["resource"]) if entries else []}
    entry["resource"].insert(min(where, len(entry["resource"])), GOOD_RESOURCE)
    statement = {**(noise if isinstance(noise, dict) else {}), "rest": [*rest, entry]}
    caps = ServerCapabilities.parse(statement)
    check_shape(caps)
    ra = caps.resource("RiskAssessment")
    assert ra is not None and ra.update_create and ra.conditional_create
    assert {"identifier", "patient"} <= ra.search_params and {"read", "search-type"} <= ra.interactions


@pytest.mark.parametrize("statement, problem", [
    ({"rest": {}}, "rest is an object, not an array: ignored"),
    ({"rest": [{"interaction": 5}]}, "rest[0].interaction is a number, not an array: ignored"),
    ({"rest": [{"resource": 5}]}, "rest[0].resource is a number, not an array: ignored"),
    ({"rest": [{"resource": ["Patient"]}]}, "rest[0].resource[0] is a string, not an object: ignored"),
    ({"rest": [{"resource": [{"type": "Patient", "searchParam": "x"}]}]},
     "rest[0].resource(Patient).searchParam is a string, not an array: ignored"),
    ({"rest": [{"resource": [{"type": "Patient", "interaction": [{"code": 7}]}]}]},
     "rest[0].resource(Patient).interaction.code is a number, not a string: ignored"),
    ({"rest": [{"resource": [{"type": 5}]}]}, "rest[0].resource.type is a number, not a resource type: "
                                              "the entry is ignored"),
    ({"rest": [{"mode": ["server"]}]}, "rest[0].mode is an array, not a string: the entry is ignored"),
    ({"software": "SEKMET"}, "software is a string, not an object: ignored"),
    ({"fhirVersion": {"v": 4}}, "fhirVersion is an object, not a string: ignored"),
    ({"resourceType": "OperationOutcome"}, "resourceType is 'OperationOutcome', not 'CapabilityStatement'"),
    ("<html>", "the CapabilityStatement is a string, not an object: ignored"),
    ([], "the CapabilityStatement is an array, not an object: ignored"),
])
def test_each_malformed_part_is_ignored_and_named(statement, problem):
    caps = ServerCapabilities.parse(statement)
    assert problem in caps.problems, caps.problems
    check_shape(caps)


def test_malformed_parts_do_not_hide_the_good_ones():
    caps = ServerCapabilities.parse({
        "fhirVersion": "4.0.1", "software": {"name": "X", "version": 3},
        "rest": [5, {"mode": "server", "interaction": [{"code": "batch"}, "transaction", {"code": None}],
                     "resource": [7, {"type": "Patient", "updateCreate": "true", "interaction": 5},
                                  {"type": "Patient", "searchParam": [{"name": "identifier"}, {"name": 3}]}]}]})
    assert caps.fhir_version == "4.0.1" and caps.software == "X 3"
    assert caps.batch and caps.system_interactions == {"batch"}
    patient = caps.resource("Patient")
    assert patient.update_create and patient.search_params == {"identifier"} and patient.interactions == set()
    assert len(caps.problems) == 5, caps.problems


def test_a_well_formed_statement_has_no_problems_and_none_is_not_one():
    caps = ServerCapabilities.parse({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
                                     "software": {"name": "S", "version": "1"},
                                     "rest": [{"mode": "server", "interaction": [{"code": "batch"}],
                                               "resource": [GOOD_RESOURCE]},
                                              {"mode": "client", "resource": "anything"}]})
    assert caps.problems == () and caps.software == "S 1" and caps.batch
    assert ServerCapabilities.parse(None).problems == ()
    assert ServerCapabilities.parse({}).fhir_version == "(not stated)"
