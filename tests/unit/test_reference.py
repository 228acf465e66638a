"""Whose resource is it: the one attribution rule (fhir_adapters/fhir/reference.py)."""

from __future__ import annotations

import pytest

from fhir_adapters.fhir.reference import PatientIdentity, PatientRef, Reference, patient_of

MRN = "https://example.org/mrn"
PATIENT = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": MRN, "value": "A1"}]}
ME = PatientIdentity.of_patient(PATIENT, full_url="urn:uuid:0000-p1", bases=["https://fhir.example.org/r4/"],
                                other_patients=["urn:uuid:0000-p2"])


def obs(subject) -> dict:
    r = {"resourceType": "Observation", "id": "o1"}
    if subject is not None:
        r["subject"] = subject
    return r


@pytest.mark.parametrize("subject, kind, why", [
    ({"reference": "Patient/p1"}, "own", None),
    ({"reference": "Patient/p1/_history/3"}, "own", None),
    ({"reference": "https://fhir.example.org/r4/Patient/p1"}, "own", None),
    ({"reference": "urn:uuid:0000-p1"}, "own", None),
    ({"reference": "Patient/p1", "identifier": {"system": MRN, "value": "A1"}}, "own", None),
    ({"reference": "Patient/p1", "identifier": {"system": MRN, "value": "B2"}}, "unattributable", "is not theirs"),
    ({"reference": "Patient/p2"}, "foreign", "Patient/p2"),
    ({"reference": "https://fhir.example.org/r4/Patient/p2"}, "foreign", "Patient/p2"),
    ({"reference": "urn:uuid:0000-p2"}, "foreign", "urn:uuid:0000-p2"),
    ({"identifier": {"system": MRN, "value": "B2"}}, "foreign", "identifier"),
    ({"reference": "https://other.example.org/fhir/Patient/p1"}, "unattributable", "another server"),
    ({"reference": "urn:uuid:ffff"}, "unattributable", "does not resolve"),
    ({"reference": "#p"}, "unattributable", "contained"),
    ({"reference": "Group/g1"}, "unattributable", "Group"),
    ({"identifier": {"system": MRN, "value": "A1"}}, "unattributable", "only by identifier"),
    ({"identifier": {"system": "urn:oid:1.2.3", "value": "999"}}, "unattributable", "only by identifier"),
    ({"display": "Jane Doe"}, "unattributable", "only by display"),
    ({}, "unattributable", "no reference"),
    ("Patient/p1", "unattributable", "not a Reference"),
    (None, "unattributable", "no subject"),
])
def test_attribution(subject, kind, why):
    a = ME.attribute(obs(subject))
    assert a.kind == kind
    if why:
        assert why in (a.why or "")


def test_shared_types_and_patients():
    assert ME.attribute({"resourceType": "Medication", "id": "m"}).kind == "own"
    assert ME.attribute(PATIENT).kind == "own"
    assert ME.attribute({"resourceType": "Patient", "id": "p2"}).kind == "foreign"


@pytest.mark.parametrize("resource, base, owner", [
    (obs({"reference": "Patient/p1"}), None, "Patient/p1"),
    (obs({"reference": "https://a.org/fhir/Patient/p1"}), "https://a.org/fhir/", "Patient/p1"),
    (obs({"reference": "https://b.org/fhir/Patient/p1"}), "https://a.org/fhir", None),
    (obs({"reference": "Group/g"}), None, None),
    (obs({"identifier": {"value": "A1"}}), None, None),
    (obs(None), None, None),
    ({"resourceType": "BodyStructure", "patient": {"reference": "Patient/p1"}}, None, "Patient/p1"),
    (PATIENT, None, "Patient/p1"),
])
def test_patient_of_groups_only_literal_references(resource, base, owner):
    assert patient_of(resource, base) == (PatientRef.parse(owner) if owner else None)


@pytest.mark.parametrize("text, kind, local", [
    ("Observation/a.b-1", "relative", "Observation/a.b-1"),
    ("http://x/fhir/Observation/1/_history/2", "absolute", "Observation/1"),
    ("urn:uuid:1", "urn", None), ("#x", "contained", None), ("not a ref", "unparsed", None),
    ("Observation/", "unparsed", None),
])
def test_reference_parse(text, kind, local):
    r = Reference.parse(text)
    assert (r.kind, r.local) == (kind, local)
