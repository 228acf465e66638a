"""Records shaped unlike the fixtures (found by an adversarial review): each once gave a
wrong "resectable" or a wrong "final"."""

from __future__ import annotations

import copy

import pytest

from engine.classify import Engine
from fhir_adapters.sources.bundle import BundleError, record_from_bundle
from fhir_adapters.features.mapping import map_features
from tests.support.resources import (LOINC, body_structure, bundle, classify, classify_bundle, concept, extrahepatic,
                                     hepatectomy,
                           liver_met, patient, technical, terminology, tumour_size)

P = "p1"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"


def base() -> list[dict]:
    return [patient(P), hepatectomy(P), liver_met(P)]


def report(rid: str, day: str, results: list[str], category: bool = True) -> dict:
    r = {"resourceType": "DiagnosticReport", "id": rid, "status": "final", "code": concept(LOINC, "24627-2"),
         "subject": {"reference": f"Patient/{P}"}, "effectiveDateTime": day,
         "result": [{"reference": f"Observation/{o}"} for o in results]}
    if category:
        r["category"] = [concept(V2_0074, "RAD")]
    return r


def test_observations_without_ids_are_each_a_lesion():
    obs = [tumour_size(P, 20 + i) for i in range(4)]
    for o in obs:
        del o["id"]
    data = bundle(*base(), *obs)
    for e in data["entry"]:
        if "id" not in e["resource"]:
            del e["fullUrl"]
    c = classify_bundle(data)
    assert c.criteria_values()["tumour_count_ge_4"] is True and c.group == "borderline-resectable"


def test_different_resources_under_one_id_are_distrusted_not_merged():
    obs = [tumour_size(P, 20 + i, id="o1") for i in range(4)]
    data = bundle(*base(), *obs)
    for i, e in enumerate(data["entry"]):
        e["fullUrl"] = f"urn:uuid:00000000-0000-0000-0000-{i:012d}"
    c = classify_bundle(data)
    assert c.group == "indeterminate"
    assert any("share the id Observation/o1" in w for w in c.warnings)


def test_one_examination_is_one_study_however_its_reports_split_it():
    obs = [tumour_size(P, 20, day="2024-05-01T10:00:00Z", id=f"o{i}") for i in range(4)]
    c = classify(*base(), *obs, report("r1", "2024-05-01T10:00:00Z", ["o0", "o1"]),
                 report("r2", "2024-05-01T10:00:00Z", ["o2", "o3"]))
    assert c.criteria_values()["tumour_count_ge_4"] is True


def test_every_longest_dimension_reading_counts():
    o = tumour_size(P, 18)
    o["component"].append(copy.deepcopy(o["component"][0]))
    o["component"][1]["valueQuantity"]["value"] = 60
    assert classify(*base(), o).criteria_values()["largest_ge_50mm"] is True


@pytest.mark.parametrize("day", ["2024-05", "2024", "2024-04-30"])
def test_a_judgement_not_certainly_after_the_latest_imaging_is_stale(day):
    c = classify(*base(), tumour_size(P, 20, day="2024-05-20"), technical(P, "resectable", day))
    assert c.status == "preliminary" and c.facts["technical_resectability"].state == "not-assessed"
    assert any("stale" in w for w in c.warnings)


def test_a_measurement_newer_than_its_report_date_still_makes_the_judgement_stale():
    a, b = tumour_size(P, 20, day="2024-01-10", id="oa"), tumour_size(P, 20, day="2024-09-01", id="ob")
    c = classify(*base(), a, b, report("r", "2024-01-10", ["oa", "ob"]), technical(P, "resectable", "2024-06-01"))
    assert c.status == "preliminary"


def test_history_bundles_use_the_newest_version_and_honour_deletes():
    tech = technical(P, "resectable", "2024-05-20", id="tech")
    withdrawn = {**copy.deepcopy(tech), "status": "entered-in-error"}
    data = bundle(*base(), tumour_size(P, 20), type="history")
    data["entry"].insert(0, {"resource": withdrawn, "request": {"method": "PUT", "url": "Observation/tech"}})
    data["entry"].append({"resource": tech, "request": {"method": "PUT", "url": "Observation/tech"}})
    assert classify_bundle(data).status == "preliminary"
    deleted = bundle(*base(), tumour_size(P, 20), type="history")
    deleted["entry"].insert(0, {"request": {"method": "DELETE", "url": "Observation/tech"}})
    deleted["entry"].append({"resource": tech, "request": {"method": "PUT", "url": "Observation/tech"}})
    assert classify_bundle(deleted).status == "preliminary"


def test_the_same_patient_twice_with_different_content_is_an_error():
    other = {**patient(P), "identifier": [{"system": "https://example.org/mrn", "value": "MRN-2"}]}
    with pytest.raises(BundleError, match="Patient/p1 2 times"):
        record_from_bundle(bundle(*base(), other))


@pytest.mark.parametrize("day", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"])
def test_dates_at_the_edges_of_the_calendar_are_unplaceable_not_a_crash(day):
    c = classify(*base(), tumour_size(P, 20, day=day))
    assert c.group == "indeterminate"


def test_a_comparator_that_r4_does_not_have_is_unreadable():
    o = tumour_size(P, value=30, comparator="ad")
    f = map_features(record_from_bundle(bundle(*base(), o)), terminology())
    assert f.largest_diameter_mm.value is None
    assert Engine.default().classify(f).group == "indeterminate"


def test_a_reference_to_another_patient_with_this_patients_identifier_casts_doubt():
    me = {**patient(P), "identifier": [{"system": "https://example.org/mrn", "value": "MRN-1"}]}
    lung = liver_met(P, code="94391008", id="lung")
    lung["subject"] = {"reference": "Patient/p2", "identifier": {"system": "https://example.org/mrn", "value": "MRN-1"}}
    c = classify(me, hepatectomy(P), liver_met(P), tumour_size(P, 20), lung)
    assert c.criteria_values()["extrahepatic_disease"] is None and c.group == "indeterminate"


def test_body_structure_identity_is_used_across_studies():
    bs = [body_structure(P, id=f"bs-{i}") for i in range(3)]
    old = [tumour_size(P, 20, day="2024-05-01", focus=f"bs-{i}") for i in range(3)]
    new = [tumour_size(P, 20, day="2024-08-01", focus=f"bs-{i}") for i in range(3)]
    assert classify(*base(), *bs, *old, *new).group == "resectable"


def test_imaging_before_the_condition_onset_still_makes_an_older_judgement_stale():
    """Found by the monotonicity property: with no resection recorded, a measurement
    before the liver-recurrence Condition's onset is not counted, but it is still liver
    imaging; a technical judgement older than it must not decide the group (it did:
    "unresectable" from a 2023 judgement despite 2024 imaging)."""
    res = [patient(P), liver_met(P, onset="2024-05-10"), tumour_size(P, 30, day="2024-01-15", id="early"),
           technical(P, "unresectable", "2023-01-01", id="old")]
    f = map_features(record_from_bundle(bundle(*res)), terminology())
    assert f.technical_resectability.value is None
    assert "older than the latest imaging" in f.technical_resectability.note


@pytest.mark.parametrize("said, group, state", [("unresectable", "indeterminate", "in-doubt"),
                                                ("resectable", "resectable", "not-assessed")])
def test_an_unattributable_technical_judgement_keeps_the_result_from_resectable(said, group, state):
    """Found by the distrust property on fixture 14: a technical-resectability
    Observation naming the patient by identifier only was ignored, and small disease
    became "resectable" although the judgement says "unresectable". One that says
    "resectable" cannot hide anything: ignored (not assessed, preliminary)."""
    tech = technical(P, said, "2024-06-01", id="tech")
    tech["subject"] = {"identifier": {"system": "urn:mrn", "value": "123"}}
    res = [*base(), tumour_size(P, 20, id="l1"), tech]
    c = classify_bundle(bundle(*res))
    assert c.group == group and c.status == "preliminary"
    assert c.facts["technical_resectability"].state == state
    assert any("Observation/tech" in w for w in c.warnings)


def test_an_upper_bound_beyond_any_plausible_size_proves_nothing_and_does_not_crash():
    """Found in review (fuzz): ``< 1e11 mm`` reached the engine as a number it cannot
    compare exactly (FactTypeError). It says nothing about the 5 cm boundary."""
    obs = tumour_size(P, comparator="<", value=100000000000, id="huge")
    c = classify_bundle(bundle(*base(), obs, technical(P, "resectable")))
    assert c.criteria["largest_ge_50mm"].state == "unknown"
    assert c.group != "resectable"
    assert any("beyond the plausible range" in w for w in c.warnings)


def test_without_measurements_a_newer_imaging_report_still_makes_a_judgement_stale():
    """Found in review: with no measured study, imaging reports were not looked at, so a
    technical judgement older than a newer text-only CT report stayed current (and with
    extrahepatic disease present the result could be final)."""
    res = [*base(), extrahepatic(P), technical(P, "resectable", "2024-05-20", id="old"),
           report("ct-new", "2024-07-01", [])]
    c = classify_bundle(bundle(*res))
    assert c.facts["technical_resectability"].state == "not-assessed"
    assert c.status == "preliminary"


def test_a_focus_on_another_server_is_not_the_local_lesion_of_that_id():
    """Fixture 46 (a lesion not accounted for: indeterminate) with the unaccounted lesion's
    focus written as an absolute URL on another server that ends in the local lesion's id:
    it must stay another lesion, never "measured again"."""
    import json

    from fhir_adapters.sources.bundle import record_from_bundle
    from fixtures import FIXTURES_DIR

    data = json.loads((FIXTURES_DIR / "46-lesion-not-accounted-for.json").read_text())
    expected = classify_bundle(copy.deepcopy(data)).group
    for e in data["entry"]:
        if e["resource"].get("id") == "f46-ct-lesB":
            e["resource"]["focus"] = [{"reference": "http://other.org/fhir/BodyStructure/f46-lesion-a"}]
    assert expected == "indeterminate"
    assert classify_bundle(data).group == "indeterminate"
    record = record_from_bundle(data)
    assert record.canonical("http://other.org/fhir/BodyStructure/a/_history/2") == "http://other.org/fhir/BodyStructure/a"
