"""Differential test: the fast models of what the mapping reads
(fhir_adapters/sources/models.py) against fhir.resources' full R4B models, the reference.

On the fixtures, on generated records and on hypothesis-damaged resources, both paths
must give the same features (``Features.model_dump()``), and each resource the same
reading: the same elements the mapping reads, with the same Python values (compared
through the fast models' structure, :func:`projection`), or the same refusal with the
same message. The differences are exactly the documented ones, asserted as such:

* a resource invalid **only in an element the mapping does not read** is read by the
  fast models, unreadable for the R4B models (:func:`reads` says which elements are
  read): ``test_invalid_only_where_the_mapping_does_not_read``;
* what fhir.resources reads laxly where FHIR JSON has another type, a number for a
  boolean (``1`` is True) or for a dateTime (a Unix time), is unreadable on the fast
  path: ``test_what_the_reference_reads_laxly_is_unreadable``.

What the fast models do not decide (valid R4 they do not model) is read by the R4B models
(``test_what_the_fast_models_do_not_decide_the_reference_does``).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from decimal import Decimal
from typing import Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from fhir.resources.R4B.observation import Observation
from pydantic import BaseModel

from fhir_adapters.features.mapping import map_features
from fhir_adapters.sources import models
from fhir_adapters.sources.bundle import BundleError, record_from_bundle
from fhir_adapters.sources.record import MAPPED_TYPES, PatientRecord, read_resource, read_with_full_models
from tests.support.mutation import FIXTURE_BUNDLES, weird_values
from tests.support.resources import (hepatectomy, liver_met, patient, technical, terminology, tumour_size,
                                     via_json)
from tests.unit.test_properties import build, patients

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAX_READING = re.compile(r"a number where FHIR requires a (boolean|dateTime string|instant string)")


# ----------------------------------------------------------------------------- comparing readings
def read_fields(cls: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """The elements a fast model reads (its attributes without ``x_``), with the fast
    model of each complex one."""
    out: dict[str, type[BaseModel] | None] = {}
    for name, info in cls.model_fields.items():
        if name.startswith("x_") or name == "resourceType":
            continue
        t = next((a for a in get_args(info.annotation) if a is not type(None)), info.annotation)
        if get_origin(t) is list:
            t = get_args(t)[0]
        out[name] = t if isinstance(t, type) and issubclass(t, BaseModel) else None
    return out


def value(v: Any) -> Any:
    """A primitive as a comparable value: its type and exact text."""
    if isinstance(v, Decimal):
        return "decimal", str(v)
    if isinstance(v, dt.datetime):
        return "datetime", v.isoformat()
    if isinstance(v, dt.date):
        return "date", v.isoformat()
    return type(v).__name__, v


def projection(obj: Any, cls: type[BaseModel]) -> Any:
    """What the mapping can read of a model (fast or R4B), through the fast model ``cls``."""
    if obj is None:
        return None
    if isinstance(obj, list):
        return [projection(o, cls) for o in obj]
    return {name: projection(getattr(obj, name), nested) if nested else value(getattr(obj, name))
            for name, nested in read_fields(cls).items()}


def reads(rtype: str, path: tuple) -> bool:
    """Whether an element at ``path`` (keys and list indices) is one the mapping reads:
    every name on the way is read by the fast models."""
    cls: type[BaseModel] | None = models.MODELS[rtype]
    for key in path:
        if isinstance(key, int):
            continue
        if cls is None:
            return False
        fields = read_fields(cls)
        if key not in fields:
            return False
        cls = fields[key]
    return True


def both(rtype: str, raw: dict) -> tuple[tuple[Any, str], tuple[Any, str]]:
    return read_with_full_models(rtype, copy.deepcopy(raw)), read_resource(rtype, copy.deepcopy(raw))


def assert_same_reading(rtype: str, raw: dict, path: tuple = ()) -> str:
    """The two paths read ``raw`` alike, or differ only as documented; which it was."""
    (full, full_problem), (fast, fast_problem) = both(rtype, raw)
    cls = models.MODELS[rtype]
    if full is not None and fast is not None:
        assert projection(fast, cls) == projection(full, cls), raw
        return "same"
    if full is None and fast is None:
        assert fast_problem == full_problem, (fast_problem, full_problem)   # the R4B models' message
        return "both unreadable"
    if fast is not None:
        assert path and not reads(rtype, path), f"{rtype} {path}: the R4B models refuse it ({full_problem}): {raw}"
        return "unread element"
    assert LAX_READING.search(fast_problem), (fast_problem, raw)
    return "strict"


def features(resources_or_bundle: Any, full: bool) -> Any:
    data = copy.deepcopy(resources_or_bundle)
    if isinstance(data, dict):
        try:
            rec = record_from_bundle(data, full_models=full)
        except BundleError as exc:
            return str(exc)
    else:
        rec = PatientRecord.from_resources(data, full_models=full)
    return map_features(rec, terminology()).model_dump()


# ----------------------------------------------------------------------------- the fixtures
@pytest.mark.parametrize("name, bundle", FIXTURE_BUNDLES, ids=[n for n, _ in FIXTURE_BUNDLES])
def test_fixtures_give_the_same_features_and_readings(name, bundle):
    assert features(bundle, full=True) == features(bundle, full=False)
    for entry in bundle["entry"]:
        r = entry.get("resource") or {}
        if r.get("resourceType") in MAPPED_TYPES:
            assert assert_same_reading(r["resourceType"], r) in ("same", "both unreadable")


@SETTINGS
@given(spec=patients)
def test_generated_records_give_the_same_features(spec):
    resources = build(spec)
    assert features(resources, full=True) == features(resources, full=False)


# ----------------------------------------------------------------------------- the documented differences
P = "p1"


def base() -> list[dict]:
    return [patient(P), hepatectomy(P), liver_met(P), tumour_size(P, 20, id="ok")]


def with_element(resource: dict, path: tuple, v: Any) -> dict:
    raw = copy.deepcopy(resource)
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = v
    return raw


UNREAD = [   # (resource, path, value): invalid R4, but only where the mapping does not read
    (patient(P), ("birthDate",), "1961-13-01"),
    (patient(P), ("active",), "true"),                                 # strict reading holds where it is read
    (tumour_size(P, 30, id="t"), ("note",), [{"text": 5}]),
    (tumour_size(P, 30, id="t"), ("category",), [{"coding": [{"code": " imaging"}]}]),
    (tumour_size(P, 30, id="t"), ("code", "coding", 0, "display"), 5),  # inside a read element
    (tumour_size(P, 30, id="t"), ("contained",), [{"resourceType": "Patient", "birthDate": "x"}]),
    (tumour_size(P, 30, id="t"), ("extension",), [{"url": 5}]),
    (tumour_size(P, 30, id="t"), ("interpretation",), "not a list"),
    (liver_met(P), ("identifier",), [{"value": 7}]),
    (hepatectomy(P), ("performer",), {"actor": "x"}),
]


@pytest.mark.parametrize("resource, path, v", UNREAD, ids=[f"{r['resourceType']}.{'.'.join(map(str, p))}"
                                                          for r, p, _ in UNREAD])
def test_invalid_only_where_the_mapping_does_not_read(resource, path, v):
    """The one difference in what is read: the R4B models refuse the resource, the fast
    models read it (they do not validate what the mapping does not read)."""
    raw = via_json([with_element(resource, path, v)])[0]
    rtype = raw["resourceType"]
    assert not reads(rtype, path)
    assert assert_same_reading(rtype, raw, path) == "unread element"
    others = [r for r in base() if r["id"] != raw["id"]]
    full, fast = (features(via_json([*others, raw]), full=f) for f in (True, False))
    ref = f"{rtype}/{raw['id']}"
    assert any(w.startswith(f"{ref} is not valid FHIR R4") for w in full["warnings"])
    assert not any(w.startswith(f"{ref} is not valid FHIR R4") for w in fast["warnings"])


def test_what_the_reference_reads_laxly_is_unreadable():
    """The other difference: fhir.resources reads a JSON number as a boolean (1 is True)
    or as a dateTime (a Unix time); the fast models refuse it, as they refuse a string
    for a number (which fhir.resources reads too, and the record then refuses)."""
    judged = via_json(base()) + [{**technical(P, True, id="tech"), "valueBoolean": 1}]
    full, fast = features(judged, full=True), features(judged, full=False)
    assert full["technical_resectability"]["value"] == "resectable"
    assert fast["technical_resectability"]["value"] == "in-doubt"
    assert "Observation/tech is not valid FHIR R4 and was not used: valueBoolean: a number where FHIR requires " \
           "a boolean" in fast["warnings"]

    dated = via_json(base()) + [{**tumour_size(P, 60, id="unix"), "effectiveDateTime": 1715000000}]
    full, fast = features(dated, full=True), features(dated, full=False)
    assert full["largest_diameter_mm"]["value"] == 60
    assert fast["largest_diameter_mm"]["value"] == 20 and fast["largest_diameter_mm"]["lower_bound"]
    assert any(w.startswith("Observation/unix is not valid FHIR R4 and was not used: effectiveDateTime: a number")
               for w in fast["warnings"])

    for literal in ("18", "true"):   # strings for numbers: unreadable on both paths, with the same message
        sized = via_json(base()) + [tumour_size(P, value=literal, id="s")]
        assert features(sized, full=True) == features(sized, full=False)


@pytest.mark.parametrize("path, v", [
    (("_status",), {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                   "valueCode": "unknown"}]}),                # status given only as an extension
    (("status__ext",), {"extension": [{"url": "x", "valueCode": "unknown"}]}),  # an R4B name besides the JSON one
    (("code", "coding", 0, "extension"), [{"url": "x", "valueString": "y"}]),  # an element the fast models skip
    (("code", "resourceType"), "CodeableConcept"),
])
def test_what_the_fast_models_do_not_decide_the_reference_does(path, v):
    raw = with_element(via_json([tumour_size(P, 30, id="t")])[0], path, v)
    if path == ("_status",):
        del raw["status"]
    assert isinstance(models.read("Observation", raw), models.NotRead)
    model, problem = read_resource("Observation", raw)
    assert isinstance(model, Observation) and problem == ""     # the R4B model, read as ever
    assert assert_same_reading("Observation", raw) == "same"


def test_a_misspelt_element_is_unreadable_never_silently_absent():
    """A pathology measurement whose ``specimen`` is misspelt must not become a liver lesion."""
    raw = {**via_json([tumour_size(P, 60, id="path", specimen="s1")])[0]}
    raw["specimn"] = raw.pop("specimen")
    assert assert_same_reading("Observation", raw) == "both unreadable"
    assert features(via_json(base()) + [raw], full=False)["largest_diameter_mm"]["value"] == 20


# ----------------------------------------------------------------------------- damaged resources
RESOURCES = [(name, i, e["resource"]) for name, b in FIXTURE_BUNDLES for i, e in enumerate(b["entry"])
             if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") in MAPPED_TYPES]
EXTRA_NAMES = ["foo", "valueString", "valueInteger", "effectivePeriod", "onsetString", "_status", "extension",
               "fhir_comments", "resourceType", "status__ext", "text", "note", "identifier", "display", "userSelected",
               "id", "coding", "value", "start", "reference", "versionId"]
DATE_STRINGS = ["2024-05-01", "2024-02-30", "2024-05", "2024", "2024-13", "0000", "2024-05-01T10:00:00Z",
                "2024-05-01T10:00:00", "2024-05-01T24:00:00Z", "2016-12-31T23:59:60Z", "2016-12-31T23:59:60+14:00",
                "2024-02-30T10:00:00Z", "2024-05-01T10:00:00.123456789-05:00", "2024-05-01T10:00:00+14:30",
                "2024-05-01 10:00:00Z", " 2024-05-01", "1700000000"]
TEXTS = ["", " ", "a", " a", "a ", "a  b", "a b", "\t", "a\nb", "\x0b", "\u00a0", "x\x00", "Patient/p1", "#c",
         "urn:uuid:1", "final", "entered-in-error", "mm", "<", "ad", "http://snomed.info/sct", "a" * 300]
damage = st.one_of(
    st.sampled_from(DATE_STRINGS + TEXTS),
    st.sampled_from([1, 0, 1.0, 1700000000, 1.5, "18", "true", "false", -0.0, True, False, None, Decimal("1E+2"),
                     Decimal("NaN"), 10**30]),
    st.sampled_from([[], {}, [None], [{}], {"x": 1}, [{"coding": "x"}], {"coding": [{"code": " a"}]},
                     {"reference": 5}, {"value": "5"}, {"extension": []}, {"resourceType": "CodeableConcept"}]),
    weird_values)


def paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out += paths(v, path + (k,))
    return out


def damaged(resource: dict, draw: Any) -> tuple[dict, tuple]:
    """A copy of ``resource`` with one damage, and where."""
    raw = copy.deepcopy(resource)
    candidates = [p for p in paths(raw) if p[0] != "resourceType"]
    path = draw(st.sampled_from(candidates))
    node = raw
    for k in path[:-1]:
        node = node[k]
    op = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "wrap"]))
    if op == "drop":
        del node[path[-1]]
    elif op == "add" and (isinstance(node[path[-1]], dict) or isinstance(node, dict)):
        inside = isinstance(node[path[-1]], dict)
        target, where = (node[path[-1]], path) if inside else (node, path[:-1])
        name = draw(st.sampled_from(EXTRA_NAMES))
        target[name] = draw(damage)
        path = where + (name,)
    elif op == "wrap":
        v = node[path[-1]]
        node[path[-1]] = v[0] if isinstance(v, list) and v else [v]
    else:   # replace (or add where there is no object)
        node[path[-1]] = draw(damage)
    return raw, path


@SETTINGS
@given(item=st.sampled_from(RESOURCES), data=st.data())
def test_damaged_resources_read_alike_or_as_documented(item, data):
    name, index, resource = item
    raw, path = damaged(resource, data.draw)
    how = assert_same_reading(resource["resourceType"], raw, path)
    if how in ("same", "both unreadable"):
        bundle = dict(FIXTURE_BUNDLES[[n for n, _ in FIXTURE_BUNDLES].index(name)][1])
        bundle["entry"] = [*bundle["entry"][:index], {**bundle["entry"][index], "resource": raw},
                           *bundle["entry"][index + 1:]]
        assert features(bundle, full=True) == features(bundle, full=False)


# ----------------------------------------------------------------------------- primitives
def observation(**elements: Any) -> dict:
    return {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "size"},
            "subject": {"reference": "Patient/p1"}, **elements}


DATETIME, INSTANT = models._DATETIME, models._INSTANT   # fhir.resources' regexes


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(st.from_regex(f"^(?:{DATETIME})$", fullmatch=True), st.sampled_from(DATE_STRINGS),
                     st.text(max_size=30)))
@example(text="2016-12-31T23:59:60Z")
@example(text="2024-02-29")
@example(text="2023-02-29")
def test_date_times_read_alike(text):
    assert assert_same_reading("Observation", observation(effectiveDateTime=text)) != "unread element"
    assert assert_same_reading("Observation", observation(effectivePeriod={"start": text})) != "unread element"
    assert assert_same_reading("Condition", {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
                                             "recordedDate": text}) != "unread element"


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.from_regex(f"^(?:{INSTANT})$", fullmatch=True), st.sampled_from(DATE_STRINGS)))
def test_instants_read_alike(text):
    report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT"},
              "subject": {"reference": "Patient/p1"}, "issued": text}
    assert assert_same_reading("DiagnosticReport", report) != "unread element"
    assert assert_same_reading("Observation", observation(effectiveInstant=text)) != "unread element"


@settings(max_examples=300, deadline=None)
@given(v=st.one_of(st.integers(-10**20, 10**20), st.decimals(), st.floats(), st.booleans(), st.text(max_size=8),
                   st.none(), st.just([]), st.just({})))
def test_decimals_and_booleans_read_alike(v):
    assert assert_same_reading("Observation", observation(valueQuantity={"value": v, "unit": "mm"})) != "unread element"
    assert assert_same_reading("Observation", observation(valueBoolean=v)) != "unread element"


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.sampled_from(TEXTS), st.text(max_size=6), st.text(" \t\n\r\x0b\x0cab", max_size=5)))
def test_strings_codes_uris_and_ids_read_alike(text):
    coded = {"coding": [{"system": "http://loinc.org", "code": text}], "text": text}
    quantity = {"value": 3, "unit": text, "system": "http://unitsofmeasure.org", "code": text, "comparator": text}
    for raw in (observation(code=coded), observation(valueQuantity=quantity), observation(id=text),
                observation(status=text), observation(meta={"versionId": text}),
                observation(subject={"reference": text, "display": text}),
                observation(focus=[{"reference": text, "type": text}]),
                observation(code={"coding": [{"system": text, "code": "x"}]})):
        assert assert_same_reading("Observation", raw) != "unread element"


@pytest.mark.parametrize("v", [dt.date(2024, 5, 1), dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone.utc),
                               dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
                               dt.datetime(2024, 5, 1, 10), Decimal("2024"), 1.5e9])
def test_python_dates_read_alike(v):
    """What a Python caller (not JSON) may put in a resource: date and datetime objects."""
    for raw in (observation(effectiveDateTime=v), observation(effectivePeriod={"end": v}),
                observation(effectiveInstant=v)):
        assert assert_same_reading("Observation", raw) in ("same", "both unreadable", "strict")
