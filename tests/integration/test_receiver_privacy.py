"""What the receiver says when the FHIR server refuses (issue 13, adversarial review):

* a server's error diagnostics can hold a patient's name and record number: they never
  reach `/healthz` (no credentials needed) or the INFO/WARNING/ERROR log, and are kept
  for the operator in the inbox (`clm-stratify inbox`);
* a server that refuses the receiver's credentials (401 on every read) is the server's
  failure, not each item's: nothing is dead-lettered, `/healthz` says why, and the work is
  done once the server accepts the receiver again; a 403 for one patient only is that
  patient's failure (retried, then a dead letter) while the others are evaluated.

Real SEKMET and a real `serve` process. No real server can be made to answer one
patient's reads with a name in its diagnostics, or 401 to a receiver without an
authorisation server, so a loopback proxy (tests/support/rewrite_proxy.py) rewrites
those answers; everything else is SEKMET's own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from fhir_adapters.fhir.client import FhirClient, dumps
from tests.support.fixture_data import tumour_observations
from tests.support.receiver_process import SECRET, Receiver, inbox_rows, wait_until
from tests.support.rewrite_proxy import RewriteProxy

HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
NAME = "Eriksen, Liv, MRN-CLM-0005"


def _notify(receiver: Receiver, obs: dict) -> None:
    r = requests.put(f"{receiver.endpoint}/Observation/{obs['id']}", data=dumps(obs).encode(), headers=HEADERS,
                     timeout=10)
    assert r.status_code == 200, r.text


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def _about(pid: str, pq: str, body: bytes) -> bool:
    """A request (a read, a search or a batch of them) about patient ``pid``."""
    text = pq + body.decode("utf-8", "replace")
    return any(form in text for form in (f"Patient/{pid}", f"Patient%2F{pid}", f"={pid}&", f"={pid}\"")) or \
        pq.split("?")[0].endswith(f"/{pid}")


def test_server_diagnostics_with_a_name_stay_out_of_healthz_and_logs(make_server, tmp_path):
    server = make_server()
    pid, obs = sorted(tumour_observations().items())[0]

    def name_in_diagnostics(method, pq, body):
        if _about(pid, pq, body):
            return 400, _outcome("processing", f"Resource Patient/{pid} ({NAME}) is not known")
        return None

    inbox = tmp_path / "inbox.sqlite"
    with RewriteProxy(server.base_url, answer=name_in_diagnostics) as proxy, \
            Receiver(proxy.base_url, inbox, None, "--max-attempts", "2", "--log-level", "info") as receiver:
        _notify(receiver, obs)
        wait_until("the patient's dead letter", lambda: any(s == "dead" for _, _, s, _ in inbox_rows(inbox)[1]), 60)
        health = requests.get(f"{receiver.url}/healthz", timeout=5)
        assert health.status_code == 503
        assert "HTTP 400" in health.text                      # what failed is said ...
        assert NAME not in health.text and "Eriksen" not in health.text and pid not in health.text  # ... not who
    log = receiver.log.read_text()
    assert "HTTP 400" in log
    assert "Eriksen" not in log and "MRN-CLM" not in log and pid not in log
    listing = subprocess.run([sys.executable, "-m", "clm_stratify", "inbox", "--inbox", str(inbox)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and NAME in listing.stdout   # the operator's own view keeps the diagnostics


def test_refused_credentials_dead_letter_nothing_and_the_work_is_done_once_accepted(make_server, tmp_path):
    server = make_server()
    observations = dict(sorted(tumour_observations().items())[:3])
    refusing = {"on": True}

    def expired_token(method, pq, body):
        if refusing["on"] and "/metadata" not in pq:   # the capability statement stays public, as it usually is
            return 401, _outcome("login", "token expired")
        return None

    inbox = tmp_path / "inbox.sqlite"
    with RewriteProxy(server.base_url, answer=expired_token) as proxy, \
            Receiver(proxy.base_url, inbox, None, "--max-attempts", "2", "--health-interval", "0.2") as receiver:
        for obs in observations.values():
            _notify(receiver, obs)
        health = wait_until("the receiver degraded by the refusals", lambda: (
            (h := receiver.health())["status"] == "degraded" and "HTTP 401" in json.dumps(h["reasons"]) and h), 60)
        assert health["dead_letters"] == 0
        _, work = inbox_rows(inbox)
        assert {s for _, _, s, _ in work} <= {"pending", "running"}    # postponed, not counted
        assert "refuses the receiver's credentials" in receiver.log.read_text()
        refusing["on"] = False                                         # the token is renewed
        wait_until("every patient evaluated", lambda: {s for _, _, s, _ in inbox_rows(inbox)[1]} == {"done"}, 60)
        assert receiver.health()["dead_letters"] == 0
    with FhirClient(server.base_url) as client:
        subjects = [ra["subject"]["reference"] for ra in client.search("RiskAssessment", {"_count": "500"})]
    assert sorted(subjects) == sorted(f"Patient/{pid}" for pid in observations)   # one each, once


@pytest.mark.parametrize("status", [401, 403, 407])
def test_a_refusal_for_one_patient_is_that_patients_failure_only(make_server, tmp_path, status):
    """Not the receiver's credentials (a search naming no patient goes through): counted
    against that patient, a dead letter after its attempts, the others done; never
    postponed forever out of sight (adversarial review: a 401 for one patient was)."""
    server = make_server()
    items = sorted(tumour_observations().items())[:3]
    barred = items[0][0]

    def consent_barred(method, pq, body):
        if _about(barred, pq, body):
            return status, _outcome("forbidden", "access to this record is restricted")
        return None

    inbox = tmp_path / "inbox.sqlite"
    with RewriteProxy(server.base_url, answer=consent_barred) as proxy, \
            Receiver(proxy.base_url, inbox, None, "--max-attempts", "2") as receiver:
        for _, obs in items:
            _notify(receiver, obs)
        wait_until("every item finished", lambda: len(inbox_rows(inbox)[1]) == 3 and
                   {s for _, _, s, _ in inbox_rows(inbox)[1]} <= {"done", "dead"}, 60)
        states = {p: s for _, p, s, _ in inbox_rows(inbox)[1]}
    assert states == {barred: "dead", items[1][0]: "done", items[2][0]: "done"}
