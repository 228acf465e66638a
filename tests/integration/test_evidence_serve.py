"""The evidence fixtures through the Subscription receiver (`serve`): a notification about
one of the patient's resources re-classifies the patient on the server, and the written
RiskAssessment says what `classify` says of the same record (group, status, or no
assessment at all), with the same warnings in its note."""

from __future__ import annotations

import json

import pytest
import requests
import yaml

from clm_stratify.cli import main
from engine.ruleset import load_ruleset
from fhir_adapters.writeback.resources import assessment_id
from fhir_adapters.fhir.client import dumps
from fhir_adapters.fhir.reference import PatientRef, patient_of
from fixtures import FIXTURES_DIR
from tests.support.receiver_process import SECRET, Receiver

pytestmark = pytest.mark.integration
RULESET = (load_ruleset().id, load_ruleset().version)
EXPECTED = yaml.safe_load((FIXTURES_DIR / "expected.yaml").read_text())
# The fixtures written for the evidence rules: they name the warning they must give.
EVIDENCE = sorted(name for name, want in EXPECTED.items() if want.get("warnings_contain") or "assessed" in want)


def classify_json(path, capsys) -> dict:
    assert main(["classify", "--bundle", str(path), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def notified_resource(bundle: dict) -> dict:
    """A resource of the bundle's patient that a FHIR server would notify about."""
    patient = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] in ("Condition", "Observation") and patient_of(r) == PatientRef(patient):
            return r
    raise AssertionError("no notifiable resource")


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", SECRET)


def test_evidence_fixtures_through_serve_match_classify(server, client, tmp_path, capsys):
    assert len(EVIDENCE) >= 10, EVIDENCE
    with Receiver(server.base_url, tmp_path / "inbox.sqlite", None, "--coalesce", "0") as receiver:
        for name in EVIDENCE:
            resource = notified_resource(json.loads((FIXTURES_DIR / name).read_text()))
            r = requests.put(f"{receiver.url}/notify/{resource['resourceType']}/{resource['id']}",
                             data=dumps(resource).encode(), timeout=10,
                             headers={"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"})
            assert r.status_code == 200, (name, r.text)
        receiver.wait_idle(timeout=120)
    for name in EVIDENCE:
        want = classify_json(FIXTURES_DIR / name, capsys)
        ra = client.read("RiskAssessment", assessment_id(want["patient"], RULESET[0]))
        if not want["assessed"]:
            assert ra is None, name
            continue
        assert ra is not None, name
        assert ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == want["group"], name
        assert ra["status"] == want["status"], name
        notes = " ".join(n["text"] for n in ra.get("note", []))
        needles = EXPECTED[name].get("warnings_contain", [])
        # A server's patient search never returns a resource that names no patient (or
        # another patient) by reference, so the receiver cannot see, or name, those.
        if not {"unattributable", "belongs to"} & set(needles):
            for needle in needles:
                assert needle in notes, (name, needle)

