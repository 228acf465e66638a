"""Every trigger of rules/terminology.yaml end to end on SEKMET: the real ``subscribe``
command creates the Subscriptions, SEKMET fires them (criteria rest-hook, full payload) at a
real ``serve`` process, and the receiver evaluates the patient (a work row done for them,
their first RiskAssessment written). Plus the deletion of a resource an assessment used:
SEKMET never notifies a delete, so the notification another server would send (a backport
event whose focus is the deleted resource; or an empty rest-hook POST) is posted to the
receiver, which finds the patient in the resource's history and re-evaluates."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import requests

from clm_stratify.cli import main
from engine.ruleset import load_ruleset
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.writeback.resources import assessment_id
from tests.support.resources import tumour_size
from tests.support.receiver_process import wait_until, SECRET, Receiver, inbox_rows

pytestmark = pytest.mark.integration
RULESET_ID = load_ruleset().id
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
V2 = "http://terminology.hl7.org/CodeSystem/v2-0074"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
WAIT = 20.0


@pytest.fixture(scope="module")
def listening(server, tmp_path_factory):
    """A receiver, and our Subscriptions for it on the module's SEKMET (``subscribe``, criteria
    style, full payload); removed afterwards."""
    before = os.environ.get("CLM_SUBSCRIPTION_SECRET")
    os.environ["CLM_SUBSCRIPTION_SECRET"] = SECRET
    try:
        with Receiver(server.base_url, tmp_path_factory.mktemp("triggers") / "inbox.sqlite", None,
                      "--coalesce", "0") as receiver:
            assert main(["subscribe", "--fhir-url", server.base_url, "--endpoint", receiver.endpoint]) == 0
            try:
                yield receiver
            finally:
                assert main(["subscribe", "--fhir-url", server.base_url, "--remove"]) == 0
    finally:
        if before is None:
            os.environ.pop("CLM_SUBSCRIPTION_SECRET", None)
        else:
            os.environ["CLM_SUBSCRIPTION_SECRET"] = before


# --------------------------------------------------------------------------- what the receiver did
def foci(receiver: Receiver) -> list[str]:
    """The focus of every event of every stored notification."""
    notes, _ = inbox_rows(receiver.inbox)
    return [e.get("focus") for _, _, body in notes for e in json.loads(body).get("events") or []]


def done(receiver: Receiver, pid: str) -> int:
    _, work = inbox_rows(receiver.inbox)
    return sum(1 for _, patient, state, _ in work if patient == pid and state == "done")




def assessment(client: FhirClient, pid: str) -> dict | None:
    return client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET_ID))


def group_of(client: FhirClient, pid: str) -> str | None:
    ra = assessment(client, pid)
    return ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] if ra else None


# --------------------------------------------------------------------------- resources of a real feed
def report(pid: str, rid: str, system: str, code: str) -> dict:
    return {"resourceType": "DiagnosticReport", "id": rid, "status": "final",
            "category": [{"coding": [{"system": system, "code": code}]}],
            "code": {"text": "CT abdomen with contrast"}, "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": "2023-05-20", "issued": "2023-05-20T16:00:00Z",
            "conclusion": "Recurrent liver metastases."}


def imaging_study(pid: str, rid: str, modality: str) -> dict:
    uid = "2.25." + str(int(hashlib.sha256(rid.encode()).hexdigest()[:16], 16))
    return {"resourceType": "ImagingStudy", "id": rid, "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
            "subject": {"reference": f"Patient/{pid}"}, "started": "2023-05-20T09:00:00Z",
            "series": [{"uid": f"{uid}.1", "modality": {"system": DCM, "code": modality}}]}


def procedure(pid: str, rid: str, system: str, code: str, day: str) -> dict:
    return {"resourceType": "Procedure", "id": rid, "status": "completed",
            "code": {"coding": [{"system": system, "code": code}]},
            "subject": {"reference": f"Patient/{pid}"}, "performedDateTime": day}


def medication(rtype: str, pid: str, rid: str) -> dict:
    res = {"resourceType": rtype, "id": rid, "status": "completed",
           "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                     "code": "32592", "display": "oxaliplatin"}]},
           "subject": {"reference": f"Patient/{pid}"}}
    res["effectiveDateTime" if rtype == "MedicationAdministration" else "effectivePeriod"] = (
        "2022-05-02" if rtype == "MedicationAdministration" else {"start": "2022-05-02", "end": "2022-10-30"})
    return res




# --------------------------------------------------------------------------- each trigger
NEW_TRIGGERS = [
    ("f01-pat", lambda pid: report(pid, "trig-dr-rad", V2, "RAD")),                 # v2-0074 RAD
    ("f02-pat", lambda pid: report(pid, "trig-dr-ct", V2, "CT")),                   # v2-0074 CT
    ("f04-pat", lambda pid: imaging_study(pid, "trig-imaging-ct", "CT")),
    ("f06-pat", lambda pid: procedure(pid, "trig-repeat-hepatectomy", SCT, "174431000",   # wedge resection
                                      "2022-11-15")),
    ("f22-pat", lambda pid: procedure(pid, "trig-chemotherapy", SCT, "367336001", "2022-06-01")),
    ("f23-pat", lambda pid: medication("MedicationAdministration", pid, "trig-med-admin")),
    ("f25-pat", lambda pid: medication("MedicationStatement", pid, "trig-med-statement")),
]


def test_subscribe_creates_one_subscription_per_trigger(server, listening):
    with FhirClient(server.base_url) as c:
        subs = [s for s in c.search("Subscription", {"_count": "100"})
                if s["channel"]["endpoint"] == listening.endpoint]
    criteria = sorted(s["criteria"].split("?")[0] for s in subs)
    assert criteria == ["Condition", "DiagnosticReport", "ImagingStudy", "MedicationAdministration",
                        "MedicationStatement", "Observation", "Procedure"]
    assert all(s["status"] == "active" for s in subs), [(s["criteria"], s.get("error")) for s in subs]


@pytest.mark.parametrize("pid, build", NEW_TRIGGERS, ids=["report-RAD", "report-CT", "imaging-study",
                                                          "repeat-hepatectomy", "chemotherapy-procedure",
                                                          "medication-administration", "medication-statement"])
def test_each_trigger_evaluates_its_patient(server, client, listening, pid, build):
    resource = build(pid)
    focus = f"{resource['resourceType']}/{resource['id']}"
    assert assessment(client, pid) is None                       # never assessed on this server
    before = done(listening, pid)
    client.update(resource)
    wait_until(f"SEKMET notified the receiver of {focus}", lambda: focus in foci(listening))
    wait_until(f"{pid} evaluated after {focus}", lambda: done(listening, pid) > before)
    ra = assessment(client, pid)                                 # first assessed by that evaluation
    assert ra is not None and ra["subject"]["reference"] == f"Patient/{pid}"


def test_resources_outside_the_trigger_lists_notify_nothing(server, client, listening):
    pid = "f24-pat"
    client.update(report(pid, "trig-dr-lab", V2, "LAB"))                   # a laboratory report
    client.update(imaging_study(pid, "trig-imaging-xc", "XC"))              # an external-camera photo
    marker = imaging_study(pid, "trig-imaging-mr", "MR")                    # then one that triggers
    client.update(marker)
    wait_until("the MR study was notified", lambda: "ImagingStudy/trig-imaging-mr" in foci(listening))
    listening.wait_idle()
    time.sleep(0.5)
    seen = foci(listening)
    assert "DiagnosticReport/trig-dr-lab" not in seen and "ImagingStudy/trig-imaging-xc" not in seen


# --------------------------------------------------------------------------- deletion
def backport_event(base: str, focus: str, number: int) -> bytes:
    """What a backport (R4) server sends for a delete event: the deleted resource as focus,
    no patient in the notification, no payload."""
    return json.dumps({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/deletes"}},
            {"name": "topic", "valueCanonical": "http://example.org/SubscriptionTopic/tumour-size-deleted"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(number)},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": str(number)},
                {"name": "focus", "valueReference": {"reference": f"{base}/{focus}"}}]}]}}]}).encode()


def made_borderline_by(client: FhirClient, listening: Receiver, pid: str, oid: str) -> None:
    """A 60 mm lesion measured later (notified, evaluated): borderline, and the Observation is
    in the assessment's basis."""
    assert main(["run", "--fhir-url", client.base_url, "--patient", pid]) == 0
    assert group_of(client, pid) == "resectable"
    client.update(tumour_size(pid, 60, id=oid, day="2026-11-01"))
    wait_until(f"{pid} borderline", lambda: group_of(client, pid) == "borderline-resectable")
    basis = [b["reference"] for b in assessment(client, pid)["basis"]]
    assert any(b.split("/_history/")[0] == f"Observation/{oid}" for b in basis), basis
    listening.wait_idle()


def deleted_unnoticed(client: FhirClient, listening: Receiver, pid: str, oid: str) -> None:
    """Delete the Observation on SEKMET: it notifies nothing (its engine skips deletes)."""
    notified = foci(listening).count(f"Observation/{oid}")
    assert client.delete("Observation", oid) in (200, 204)
    assert client.read("Observation", oid) is None
    time.sleep(1.0)
    assert foci(listening).count(f"Observation/{oid}") == notified
    assert group_of(client, pid) == "borderline-resectable"


def test_deleting_a_basis_resource_re_evaluates_the_patient_from_a_backport_event(server, client, listening):
    pid, oid = "f53-pat", "trig-del-60mm"
    made_borderline_by(client, listening, pid, oid)
    deleted_unnoticed(client, listening, pid, oid)
    r = requests.post(listening.endpoint, data=backport_event(server.base_url, f"Observation/{oid}", 1),
                      headers=HEADERS, timeout=10)
    assert r.status_code == 200, r.text
    wait_until(f"{pid} re-evaluated without the deleted lesion", lambda: group_of(client, pid) == "resectable")
    basis = [b["reference"] for b in assessment(client, pid)["basis"]]
    assert not any(b.startswith(f"Observation/{oid}") for b in basis)


def test_an_empty_notification_after_a_deletion_re_evaluates_the_patient(server, client, listening):
    pid, oid = "f54-pat", "trig-del-empty-60mm"
    made_borderline_by(client, listening, pid, oid)
    # a first empty notification moves the receiver's watermark past everything written so far
    # (without one, its first re-query looks 5 minutes back: at every patient loaded for the module)
    assert requests.post(listening.endpoint, data=b"", headers=HEADERS, timeout=10).status_code == 200
    listening.wait_idle(timeout=120)
    deleted_unnoticed(client, listening, pid, oid)
    r = requests.post(listening.endpoint, data=b"", headers=HEADERS, timeout=10)    # rest-hook, no payload
    assert r.status_code == 200, r.text
    wait_until(f"{pid} re-evaluated after the re-query", lambda: group_of(client, pid) == "resectable")
