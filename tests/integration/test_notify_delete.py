"""A deletion delivered as HAPI FHIR's rest-hook sends it (``DELETE {endpoint}/{type}/{id}``,
no body), end to end: a real ``serve`` process, SEKMET as the FHIR server. The basis
Observation of a borderline assessment is deleted on SEKMET (which notifies nothing of a
delete itself), the DELETE is sent to the receiver, which finds the patient in the
Observation's history and re-evaluates: the assessment goes back to resectable."""

from __future__ import annotations

import json

import pytest
import requests

from clm_stratify.cli import main
from engine.ruleset import load_ruleset
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.writeback.resources import assessment_id
from tests.support.receiver_process import SECRET, Receiver, inbox_rows, wait_until
from tests.support.resources import tumour_size

pytestmark = pytest.mark.integration
RULESET_ID = load_ruleset().id


def group_of(client: FhirClient, pid: str) -> str | None:
    ra = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET_ID))
    return ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] if ra else None


def basis_of(client: FhirClient, pid: str) -> list[str]:
    ra = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET_ID))
    return [b["reference"].split("/_history/")[0] for b in ra["basis"]]


def done_for(receiver: Receiver, pid: str) -> int:
    _, work = inbox_rows(receiver.inbox)
    return sum(1 for _, patient, state, _ in work if patient == pid and state == "done")


def test_a_delete_delivery_re_evaluates_the_patient_of_the_deleted_observation(server, client, tmp_path):
    pid, oid = "f53-pat", "del-hook-60mm"
    assert main(["run", "--fhir-url", server.base_url, "--patient", pid]) == 0
    assert group_of(client, pid) == "resectable"
    client.update(tumour_size(pid, 60, id=oid, day="2026-11-01"))            # a later 60 mm lesion
    assert main(["run", "--fhir-url", server.base_url, "--patient", pid]) == 0
    assert group_of(client, pid) == "borderline-resectable"
    assert f"Observation/{oid}" in basis_of(client, pid)
    assert client.delete("Observation", oid) in (200, 204)
    assert client.read("Observation", oid) is None

    with Receiver(server.base_url, tmp_path / "inbox.sqlite", None, "--coalesce", "0") as receiver:
        url = f"{receiver.endpoint}/Observation/{oid}"
        refused = requests.delete(url, timeout=10)                                 # no secret
        assert refused.status_code == 401, refused.text
        r = requests.delete(url, headers={"X-CLM-Subscription-Secret": SECRET}, timeout=10)   # HAPI: no body
        assert r.status_code == 200, r.text
        wait_until(f"{pid} re-evaluated after the DELETE", lambda: done_for(receiver, pid) >= 1)
        receiver.wait_idle()
        notes, _ = inbox_rows(receiver.inbox)
        assert [(json.loads(body)["kind"], json.loads(body)["events"][0]["focus"]) for _, _, body in notes] == \
            [("deletion", f"Observation/{oid}")]
        assert "Traceback" not in receiver.log.read_text()
    assert group_of(client, pid) == "resectable"
    assert f"Observation/{oid}" not in basis_of(client, pid)
