"""Triggers: the ``triggers`` section of rules/terminology.yaml (validated at load), the
searches and Subscriptions built from it, and how a deleted resource still leads to its
patient (instance history) and is found by a re-query (type history with ``_since``).
No server: a scripted client stands in for it; the same paths end to end on SEKMET are in
tests/integration/test_triggers.py."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from clm_stratify.service.subscriptions import backport_subscriptions, criteria_subscriptions
from engine.yamlfile import DeclarativeFileError
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.sources import history
from fhir_adapters.sources.pull import Searches, changed_patients_since, patient_of_focus
from fhir_adapters.terminology import DEFAULT_TERMINOLOGY, load_terminology

V2 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def edited(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(DEFAULT_TERMINOLOGY.read_text())
    edit(data)
    out = tmp_path / "terminology.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def trigger(data: dict, resource: str) -> dict:
    return next(t for t in data["triggers"] if t["resource"] == resource)


# --------------------------------------------------------------------------- the searches
def test_every_trigger_is_a_watched_search_and_the_old_ones_are_unchanged():
    watched = Searches(load_terminology()).watched()
    assert [rtype for rtype, _ in watched] == ["Observation", "Condition", "DiagnosticReport", "ImagingStudy",
                                               "Procedure", "MedicationAdministration", "MedicationStatement"]
    by_type = dict(watched)
    assert by_type["Observation"] == {"code": "http://loinc.org|21889-1,http://loinc.org|33728-7,"
                                              "https://clm-stratify.org/fhir/CodeSystem/clm-observation|"
                                              "technical-resectability"}
    assert by_type["Condition"] == {}                          # ICD-10 prefixes: every Condition
    reports = by_type["DiagnosticReport"]["category"].split(",")
    assert {"http://loinc.org|LP29684-5", f"{V2}|RAD", f"{V2}|CT", f"{V2}|NMR"} <= set(reports)
    assert by_type["ImagingStudy"] == {"modality": ",".join(f"{DCM}|{m}" for m in ("CT", "MR", "PT", "US", "NM"))}
    assert by_type["Procedure"] == {}                          # OPS prefix 5-502: every Procedure
    assert by_type["MedicationAdministration"] == by_type["MedicationStatement"] == {}


def test_procedure_trigger_is_a_code_search_once_no_listed_code_is_a_prefix(tmp_path):
    path = edited(tmp_path, lambda d: d["hepatectomy_procedure"]["codes"].__setitem__(
        slice(None), [c for c in d["hepatectomy_procedure"]["codes"] if "prefix" not in c]))
    codes = dict(Searches(load_terminology(path)).watched())["Procedure"]["code"].split(",")
    assert "http://snomed.info/sct|107963000" in codes            # a resection (hepatectomy_procedure)
    assert "http://www.ama-assn.org/go/cpt|47120" in codes
    assert "http://snomed.info/sct|367336001" in codes            # chemotherapy (chemotherapy_procedure)
    assert "http://www.ama-assn.org/go/cpt|96413" in codes


def test_a_site_adds_a_trigger_by_naming_a_list(tmp_path):
    path = edited(tmp_path, lambda d: d["triggers"].append(
        {"resource": "MedicationRequest", "parameter": "code", "code_lists": ["chemotherapy_procedure"],
         "description": "a site's own"}))
    assert ("MedicationRequest", {"code": ",".join(
        f"{c.system}|{c.code}" for c in load_terminology(path).chemotherapy_procedure.codes)}) \
        in Searches(load_terminology(path)).watched()


def test_one_subscription_per_trigger():
    t = load_terminology()
    subs = criteria_subscriptions(t, "http://127.0.0.1:1/notify", "X-S", "s" * 20)
    criteria = [s["criteria"] for s in subs]
    assert len(subs) == len(t.triggers) == 7
    assert criteria[1] == "Condition" and "Procedure" in criteria and "MedicationStatement" in criteria
    assert any(c.startswith("ImagingStudy?modality=") and f"{DCM}|CT" in c for c in criteria)
    assert any(c.startswith("DiagnosticReport?category=") and f"{V2}|RAD" in c for c in criteria)
    [bp] = backport_subscriptions(t, "http://127.0.0.1:1/notify", "X-S", "s" * 20,
                                  [("http://example.org/topic/imaging", "ImagingStudy")])
    assert bp["_criteria"]["extension"][0]["valueString"].startswith("ImagingStudy?modality=")


# --------------------------------------------------------------------------- validation at load
@pytest.mark.parametrize("edit, message", [
    (lambda d: trigger(d, "Procedure")["code_lists"].append("hepatectomy_procedures"),
     r"triggers: Value error, \[4\]\.code_lists: unknown code list 'hepatectomy_procedures' \(known: .*"
     r"hepatectomy_procedure"),
    (lambda d: trigger(d, "Procedure")["code_lists"].append("length_units_to_mm"),   # not a code list
     r"\[4\]\.code_lists: unknown code list 'length_units_to_mm'"),
    (lambda d: d["triggers"].append({"resource": "Condition", "description": "again"}),
     r"\[7\]\.resource: Condition is listed twice"),
    (lambda d: trigger(d, "ImagingStudy").pop("code_lists"),
     r"triggers\[3\]: Value error, give both 'parameter' and 'code_lists'"),
    (lambda d: trigger(d, "ImagingStudy").__setitem__("resource", "imaging study"),
     r"triggers\[3\]\.resource: String should match pattern"),
    (lambda d: d.pop("triggers"), r"triggers: Field required"),
    (lambda d: d.__setitem__("triggers", []), r"triggers: Tuple should have at least 1 item"),
])
def test_bad_triggers_are_refused_naming_the_field(tmp_path, edit, message):
    with pytest.raises(DeclarativeFileError, match=message):
        load_terminology(edited(tmp_path, edit))


# --------------------------------------------------------------------------- deletions
class Reply:
    def __init__(self, body: dict):
        self.content = json.dumps(body).encode()


class ScriptedServer:
    """``read`` and ``request("GET", ...)`` of a FhirClient, from a dict of current
    resources and a list of history entries (newest first). ``history_status`` makes
    every history request fail with that status."""

    base_url = "http://fhir.test/r4"

    def __init__(self, current: dict[str, dict], entries: list[dict], history_status: int | None = None,
                 page: int = 2):
        self.current, self.entries, self.history_status, self.page = current, entries, history_status, page
        self.requests: list[str] = []

    def read(self, rtype: str, rid: str) -> dict | None:
        return self.current.get(f"{rtype}/{rid}")

    def search(self, rtype, params):
        return iter(())

    def request(self, method: str, url: str, params=None):
        self.requests.append(url if params is None else f"{url}?{'&'.join(f'{k}={v}' for k, v in params)}")
        if self.history_status:
            raise FhirError("refused", status=self.history_status, url=url)
        query = dict(params or parse_qsl(urlsplit(url).query))
        path = urlsplit(url).path.split("/r4/")[-1] if url.startswith("http") else url
        parts = path.split("/")
        rows = [e for e in self.entries if (e.get("request") or {}).get("url", "").split("/")[0] == parts[0]]
        if len(parts) == 3:                                   # instance history
            rows = [e for e in rows if (e.get("request") or {}).get("url", "") .endswith(f"/{parts[1]}")
                    or (e.get("resource") or {}).get("id") == parts[1]]
        offset = int(query.get("_offset", 0))
        bundle = {"resourceType": "Bundle", "type": "history", "entry": rows[offset:offset + self.page], "link": []}
        if offset + self.page < len(rows):                    # like SEKMET: the next link drops _since
            bundle["link"].append({"relation": "next", "url": f"{self.base_url}/{path}?_offset={offset + self.page}"})
        return Reply(bundle)


def version(rid: str, vid: str, when: str, patient: str | None, method: str = "PUT") -> dict:
    res = {"resourceType": "Observation", "id": rid, "meta": {"versionId": vid, "lastUpdated": when}}
    if patient:
        res["subject"] = {"reference": f"Patient/{patient}"}
    return {"resource": res, "request": {"method": method, "url": f"Observation/{rid}"},
            "response": {"status": "200 OK", "lastModified": when}}


def deletion(rid: str, when: str, rtype: str = "Observation") -> dict:
    return {"request": {"method": "DELETE", "url": f"{rtype}/{rid}"},
            "response": {"status": "204 No Content", "lastModified": when}}


def test_a_deleted_focus_names_the_patient_of_its_newest_version_with_one():
    server = ScriptedServer({}, [
        deletion("o1", "2026-01-03T00:00:00Z"),
        version("o1", "3", "2026-01-02T00:00:00Z", None),            # its last version names no one
        version("o1", "2", "2026-01-01T12:00:00Z", "newer"),
        version("o1", "1", "2026-01-01T00:00:00Z", "older"),
    ])
    assert patient_of_focus(server, "Observation/o1") == PatientRef("newer")
    assert server.requests[0].startswith("Observation/o1/_history")
    assert any("_offset=2" in r for r in server.requests)           # every page of the history was read


def test_a_focus_that_exists_is_read_not_looked_up_in_history():
    server = ScriptedServer({"Observation/o1": {"resourceType": "Observation", "id": "o1",
                                                "subject": {"reference": "Patient/now"}}}, [])
    assert patient_of_focus(server, "Observation/o1") == PatientRef("now")
    assert patient_of_focus(server, "Patient/p9") == PatientRef("p9")
    assert server.requests == []


@pytest.mark.parametrize("status", [403, 404, 405])
def test_no_history_served_means_no_patient(status):
    assert patient_of_focus(ScriptedServer({}, [], history_status=status), "Observation/o1") is None


def test_a_server_fault_on_history_is_raised_so_the_work_is_retried():
    with pytest.raises(FhirError):
        patient_of_focus(ScriptedServer({}, [], history_status=503), "Observation/o1")


def test_deleted_since_stops_at_the_first_older_entry_even_when_next_links_drop_since():
    server = ScriptedServer({}, [
        deletion("o3", "2026-01-05T00:00:00Z"),
        version("o4", "1", "2026-01-04T00:00:00Z", "p"),
        deletion("o2", "2026-01-03T00:00:00Z"),
        deletion("o1", "2026-01-01T00:00:00Z"),                   # before since: not wanted
        version("o0", "1", "2025-12-01T00:00:00Z", "p"),
    ])
    found = list(history.deleted_since(server, "Observation", "2026-01-02T00:00:00+00:00"))
    assert found == [("o3", "2026-01-05T00:00:00Z"), ("o2", "2026-01-03T00:00:00Z")]
    assert len(server.requests) == 2                              # the third page was never asked for
    assert "_since=2026-01-02T00:00:00+00:00" in server.requests[0]


def test_a_requery_finds_the_patient_of_a_deleted_watched_resource():
    server = ScriptedServer({}, [
        deletion("o1", "2026-01-03T00:00:00Z"),
        version("o1", "1", "2026-01-01T00:00:00Z", "gone"),
    ])
    patients, latest = changed_patients_since(server, load_terminology(), "2026-01-02T00:00:00+00:00")
    assert patients == {PatientRef("gone")} and latest == "2026-01-03T00:00:00Z"
    types = {r.split("/")[0] for r in server.requests if "/_history?" in r and "_since=" in r}
    assert types == {rtype for rtype, _ in Searches(load_terminology()).watched()}


def test_a_server_without_type_history_still_requeries_by_search():
    patients, latest = changed_patients_since(ScriptedServer({}, [], history_status=405), load_terminology(),
                                              "2026-01-02T00:00:00+00:00")
    assert patients == set() and latest is None
