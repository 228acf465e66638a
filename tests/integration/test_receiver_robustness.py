"""Issue 13 end to end: a real `serve` process, a real SEKMET, a real inbox file.

* The poison notification of the issue (a backport heartbeat whose event count is 2^63)
  is refused at the door (400); stored as an earlier release stored it, it fails on its
  own and becomes a dead letter while a valid notification behind it is written within
  a few seconds; `inbox` lists it, `inbox --drop` gives it up, and /healthz goes from
  degraded back to ok.
* /healthz is degraded when the FHIR server goes away, and `serve` warns at start when
  it cannot reach it.
* One INFO line per evaluation with no patient identifier; `--log-level warning` drops it.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import requests

from clm_stratify.cli import main
from engine.ruleset import load_ruleset
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.writeback.resources import assessment_id
from tests.support.receiver_process import SECRET, Receiver, free_port, wait_until
from tests.support.resources import tumour_size

HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
RULESET = load_ruleset().id


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", SECRET)


def heartbeat(events: int) -> dict:
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "topic", "valueCanonical": "http://example.org/topic"},
            {"name": "type", "valueCode": "heartbeat"},
            {"name": "events-since-subscription-start", "valueString": str(events)}]}}]}




def group_of(client: FhirClient, pid: str) -> str | None:
    ra = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET))
    return ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] if ra else None




def test_poison_notification_then_a_valid_one(server, client, tmp_path, capsys):
    inbox = tmp_path / "inbox.sqlite"
    assert main(["run", "--fhir-url", server.base_url, "--patient", "f06-pat"]) == 0
    assert group_of(client, "f06-pat") == "resectable"
    capsys.readouterr()
    with Receiver(server.base_url, inbox, None, "--max-attempts", "3") as receiver:
        r = requests.post(receiver.endpoint, data=json.dumps(heartbeat(2 ** 63)), headers=HEADERS, timeout=10)
        assert r.status_code == 400 and "9223372036854775808" in r.text, r.text
        assert receiver.health()["counts"].get("notifications_new", 0) == 0
    # Stored the way an earlier release stored it (it said 200 to that body).
    with sqlite3.connect(inbox) as db:
        poison = db.execute(
            "INSERT INTO notification (received_at, body, next_at) VALUES (?, ?, ?)",
            (time.time(), json.dumps({"style": "backport-r4", "kind": "heartbeat", "subscription": "Subscription/s1",
                                      "events_since_start": 2 ** 63, "events": []}), 0)).lastrowid
    db.close()
    with Receiver(server.base_url, inbox, None, "--max-attempts", "3") as receiver:
        obs = tumour_size("f06-pat", 61.0, id="f06-robust-size", day="2026-11-01")
        client.update(obs)
        sent = time.monotonic()
        r = requests.put(f"{receiver.endpoint}/Observation/{obs['id']}", data=json.dumps(obs), headers=HEADERS,
                         timeout=10)
        assert r.status_code == 200
        wait_until("the valid notification written", lambda: group_of(client, "f06-pat") == "borderline-resectable", 10)
        assert time.monotonic() - sent < 5
        dead = wait_until("the poison dead-lettered", lambda: _dead(inbox), 15)
        assert dead == [("notification", poison, 3)]
        health = requests.get(f"{receiver.url}/healthz", timeout=10)
        assert health.status_code == 503 and "1 dead letter(s)" in health.json()["reasons"][0]
        assert main(["inbox", "--inbox", str(inbox)]) == 0
        listed = capsys.readouterr().out
        assert f"notification:{poison} after 3 attempts" in listed, listed
        assert main(["inbox", "--inbox", str(inbox), "--drop", f"notification:{poison}"]) == 0
        assert "dropped 1 item(s)" in capsys.readouterr().out
        health = requests.get(f"{receiver.url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.json()
    log = receiver.log.read_text()
    assert "Traceback" not in log
    assert all(x[:4].isdigit() or x.startswith("clm-stratify receiver on") for x in log.splitlines()), log
    line = [x for x in log.splitlines() if "INFO clm_stratify.service.worker: evaluation" in x]
    assert len(line) == 1 and "updated, group borderline-resectable" in line[0], log
    assert "f06" not in line[0]


def _dead(inbox) -> list[tuple]:
    with sqlite3.connect(inbox) as db:
        rows = db.execute("SELECT 'notification', id, attempts FROM notification WHERE state = 'dead'").fetchall()
    db.close()
    return [tuple(r) for r in rows]


def test_healthz_degraded_when_the_fhir_server_goes_away(make_server, tmp_path):
    server = make_server()
    with Receiver(server.base_url, tmp_path / "inbox.sqlite", None, "--health-interval", "0.2") as receiver:
        assert requests.get(f"{receiver.url}/healthz", timeout=10).status_code == 200
        server.stop()
        r = wait_until("degraded after the server stopped", lambda: (lambda x: [x] if x.status_code == 503 else None)(
            requests.get(f"{receiver.url}/healthz", timeout=10)), 10)[0]   # (a 503 Response is falsy)
        assert r.json()["fhir_server"]["reachable"] is False
        assert any("FHIR server cannot be reached" in x for x in r.json()["reasons"])
        assert "clm_fhir_server_up 0.0" in requests.get(f"{receiver.url}/metrics", timeout=10).text


def test_serve_warns_at_start_when_the_fhir_server_cannot_be_reached(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/fhir"
    with Receiver(dead, tmp_path / "inbox.sqlite", None, "--log-level", "warning") as receiver:
        r = requests.get(f"{receiver.url}/healthz", timeout=10)
        assert r.status_code == 503 and r.json()["fhir_server"]["reachable"] is False
        # it still accepts and stores: evaluated once the server is back
        body = tumour_size("p1", 10, id="o1", day="2026-11-01")
        assert requests.put(f"{receiver.endpoint}/Observation/o1", data=json.dumps(body), headers=HEADERS,
                            timeout=10).status_code == 200
    log = receiver.log.read_text()
    assert "warning: the FHIR server cannot be reached" in log and "connection refused" in log
    assert " INFO " not in log
