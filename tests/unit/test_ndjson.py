"""NDJSON lines of a population: owner, joined shared resources, the prefilter, bad lines
(fhir_adapters/sources/ndjson.py). The JVM side is proven equal in
tests/integration/test_spark.py."""

from __future__ import annotations

import gzip
import json

import pytest

from fhir_adapters.sources.ndjson import BadLine, Prefilter, lines_of, ndjson_files, read_line
from fhir_adapters.terminology import load_terminology

PRE = Prefilter.of(load_terminology())
TUMOUR = {"coding": [{"system": "http://loinc.org", "code": "21889-1"}]}


def info(resource, base=None, line=None):
    return read_line(line or json.dumps(resource), PRE, base)[1]


@pytest.mark.parametrize("reference, base, owner", [
    ("Patient/p1", None, "p1"),
    ("Patient/p1/_history/3", None, "p1"),
    ("https://h.org/fhir/Patient/p1", None, "p1"),
    ("https://h.org/fhir/Patient/p1", "https://h.org/fhir/", "p1"),
    ("https://other.org/fhir/Patient/p1", "https://h.org/fhir", None),
    ("Patient/p1\n", None, None),            # not a reference (Python's $ would have taken it)
    ("Group/g1", None, None),
    ("urn:uuid:0b1c", None, None),
    ("#p", None, None),
    ("Patient/bad id", None, None),
])
def test_owner_follows_the_attribution_rules(reference, base, owner):
    obs = {"resourceType": "Observation", "id": "o", "code": TUMOUR, "subject": {"reference": reference}}
    assert info(obs, base).owner == owner


def test_owner_of_patient_and_of_the_patient_element():
    assert info({"resourceType": "Patient", "id": "p9"}).owner == "p9"
    assert info({"resourceType": "Patient", "id": 9}).owner is None            # not a string id
    assert info({"resourceType": "BodyStructure", "id": "b", "patient": {"reference": "Patient/p2"}}).owner == "p2"
    # subject present (even null) is the subject element: patient is not looked at
    assert info({"resourceType": "Condition", "subject": None, "patient": {"reference": "Patient/p2"}}).owner is None
    assert info({"resourceType": "Condition", "subject": {"identifier": {"value": "MRN-1"}}}).owner is None


def test_shared_resources_are_joined_by_reference():
    med = info({"resourceType": "Medication", "id": "m1"})
    assert (med.owner, med.joined, med.broadcast) == (None, "Medication/m1", False)
    admin = info({"resourceType": "MedicationAdministration", "subject": {"reference": "Patient/p"},
                  "medicationReference": {"reference": "https://h/fhir/Medication/m1/_history/2"}})
    assert admin.wants == ("Medication/m1",)
    obs = info({"resourceType": "Observation", "code": TUMOUR, "subject": {"reference": "Patient/p"},
                "focus": [{"reference": "BodyStructure/b1"}, {"reference": "BodyStructure/b1"}, "junk",
                          {"reference": "Condition/c"}]})
    assert obs.wants == ("BodyStructure/b1",)
    body = info({"resourceType": "BodyStructure", "id": "b1", "patient": {"reference": "Patient/p"}})
    assert (body.owner, body.joined) == ("p", "BodyStructure/b1")


def test_unowned_resources_are_broadcast_unless_about_no_patient():
    assert info({"resourceType": "Observation", "code": TUMOUR, "subject": {"display": "x"}}).broadcast
    assert not info({"resourceType": "Medication", "id": "m"}).broadcast
    assert not info({"resourceType": "Encounter", "subject": {"display": "x"}}).kept


@pytest.mark.parametrize("code, kept", [
    ("21889-1", True), ("2188.9-1", True), ("33728-7", True), ("2345-7", False)])
def test_prefilter_keeps_every_observation_that_may_carry_a_mapped_code(code, kept):
    obs = {"resourceType": "Observation", "subject": {"reference": "Patient/p"},
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]}}
    assert info(obs).kept is kept


def test_prefilter_is_conservative_with_escapes_and_non_ascii():
    line = '{"resourceType":"Observation","code":{"coding":[{"code":"\\u0032\\u0031889-1"}]}}'
    assert info(None, line=line).kept                      # "21889-1" spelled with escapes
    assert info({"resourceType": "Observation", "note": [{"text": "Größe"}],
                 "code": {"coding": [{"code": "2345-7"}]}}).kept
    assert info({"resourceType": "Condition"}).kept        # types without a code list are kept whole


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "not a FHIR resource"),
    ('{"id": "x"}', "not a FHIR resource"),
    ('{"resourceType": 5}', "not a FHIR resource"),
    ('{"resourceType": "Patient", "id": "\ufffd"}', r"U\+FFFD"),
])
def test_bad_lines_are_named(line, problem):
    with pytest.raises(BadLine, match=problem):
        read_line(line, PRE)


def test_blank_lines_are_skipped():
    assert read_line("  \t\r", PRE) is None


def test_files_split_on_newline_only_and_gzip(tmp_path):
    (tmp_path / "a.ndjson").write_bytes(b'{"resourceType":"Patient","id":"a"}\r\n\n{"resourceType":"Patient",\r"id":"b"}')
    with gzip.open(tmp_path / "b.ndjson.gz", "wb") as fh:
        fh.write(b'{"resourceType":"Patient","id":"c"}\n\xff\n')
    files = ndjson_files(tmp_path)
    assert [f.name for f in files] == ["a.ndjson", "b.ndjson.gz"]
    assert [n for n, _ in lines_of(files[0])] == [1, 2, 3]
    assert read_line(dict(lines_of(files[0]))[3], PRE)[1].owner == "b"   # a bare \r is JSON whitespace
    bad = dict(lines_of(files[1]))[2]
    with pytest.raises(BadLine, match="U\\+FFFD"):
        read_line(bad, PRE)


def test_sources_that_are_not_ndjson_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no NDJSON files"):
        ndjson_files(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not an NDJSON file that is read"):
        ndjson_files(tmp_path / "x.json")
    with pytest.raises(ValueError, match="1 entry would not be read: x.json"):
        ndjson_files(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        ndjson_files(tmp_path / "missing")
