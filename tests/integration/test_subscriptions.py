"""Event-driven stratification: real SEKMET notifications to a real receiver process."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import time

import pytest
import requests

from engine.ruleset import load_ruleset
from clm_stratify.cli import main
from fhir_adapters.writeback.resources import assessment_id
from fhir_adapters.fhir.client import FhirClient, dumps
from fhir_adapters.terminology import load_terminology
from tests.support.receiver_process import SECRET, Receiver
from tests.support.resources import tumour_size

pytestmark = pytest.mark.integration
RULESET = (load_ruleset().id, load_ruleset().version)  # the default rule set, as written back
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}


@pytest.fixture
def receiver(server, tmp_path):
    with Receiver(server.base_url, tmp_path / "inbox.sqlite") as r:
        yield r


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", SECRET)


def group_of(client: FhirClient, pid: str) -> str | None:
    ra = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET[0]))
    return ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] if ra else None


def wait_for_group(client: FhirClient, pid: str, group: str, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if group_of(client, pid) == group:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"Patient/{pid} is {group_of(client, pid)}, not {group}, after {timeout}s")




def subscribe(server, receiver, *extra) -> None:
    code = main(["subscribe", "--fhir-url", server.base_url, "--endpoint", receiver.endpoint, *extra])
    assert code == 0


def unsubscribe(server) -> None:
    assert main(["subscribe", "--fhir-url", server.base_url, "--remove"]) == 0


@pytest.mark.parametrize("pid, payload", [("f06-pat", "resource"), ("f01-pat", "none")])
def test_criteria_subscription_turns_assessment_borderline(server, client, receiver, pid, payload, capsys):
    assert main(["run", "--fhir-url", server.base_url, "--patient", pid]) == 0
    assert group_of(client, pid) == "resectable"
    subscribe(server, receiver, "--payload", payload)
    out = capsys.readouterr().out
    assert out.count(": active") == len(load_terminology().triggers), out   # one per trigger
    try:
        client.update(tumour_size(pid, 60, id=f"{pid}-new-60mm", day="2026-11-01"))
        wait_for_group(client, pid, "borderline-resectable")
    finally:
        unsubscribe(server)
    health = receiver.wait_idle()
    assert health["dead_letters"] == 0


def test_backport_subscription_turns_assessment_borderline(server, client, receiver, capsys):
    from sekmet.subscriptions.backport import topic_basic

    topic = topic_basic("clm-tumor-size", "Tumour size", "Tumour size measured", "Observation", "true",
                        [("patient", "Observation"), ("code", "Observation")])
    client.update(topic)
    url = next(e["valueUri"] for e in topic["extension"] if e["url"].endswith(".url"))
    pid = "f04-pat"
    assert main(["run", "--fhir-url", server.base_url, "--patient", pid]) == 0
    assert group_of(client, pid) == "resectable"
    subscribe(server, receiver, "--style", "backport", "--topic", f"{url}=Observation",
              "--payload-content", "id-only")
    assert ": active" in capsys.readouterr().out  # the handshake reached the receiver
    try:
        client.update(tumour_size(pid, 55, id=f"{pid}-new-55mm", day="2026-11-01"))
        wait_for_group(client, pid, "borderline-resectable")
    finally:
        unsubscribe(server)


def post(receiver, path: str = "/notify", body: bytes | None = b"", headers: dict | None = None,
         method: str = "POST") -> requests.Response:
    return requests.request(method, receiver.url + path, data=body, headers=headers or HEADERS, timeout=10)


def test_same_notification_twice_leaves_one_assessment_version(server, client, receiver):
    pid = "f02-pat"
    obs = tumour_size(pid, 58, id=f"{pid}-twice", day="2026-11-01")
    _, stored = client.update(obs)
    body = dumps(stored).encode()
    assert post(receiver, f"/notify/Observation/{obs['id']}", body, method="PUT").status_code == 200
    wait_for_group(client, pid, "borderline-resectable")
    receiver.wait_idle()
    first = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET[0]))
    assert post(receiver, f"/notify/Observation/{obs['id']}", body, method="PUT").status_code == 200
    receiver.wait_idle()
    again = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET[0]))
    assert again["meta"]["versionId"] == first["meta"]["versionId"]
    # This patient's own evaluations, oldest first (the receiver's last_processed may be
    # another patient's: a late delivery of an earlier test's subscription can re-query).
    # Both notifications must have been evaluated (bounded wait: a notification accepted
    # and never evaluated would be a lost notification, shown with the whole inbox).
    deadline = time.monotonic() + 30
    while True:
        db = sqlite3.connect(receiver.inbox)
        try:
            results = [r for (r,) in db.execute("SELECT result FROM work WHERE patient = ? AND state = 'done' "
                                                "ORDER BY id", (pid,))]
            rows = db.execute("SELECT id, patient, state, notifications, result FROM work ORDER BY id").fetchall()
            notes = db.execute("SELECT id, state, substr(body, 1, 120) FROM notification ORDER BY id").fetchall()
        finally:
            db.close()
        if len(results) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(results) >= 2 and results[-1].startswith("unchanged"), (results, rows, notes, receiver.health())
    assert any(r.startswith(("created", "updated")) for r in results[:-1]), results
    ras = list(client.search("RiskAssessment", {"_tag": "https://clm-stratify.org/fhir/CodeSystem/tag|clm-stratify",
                                                "_count": "500"}))
    assert len([r for r in ras if r["subject"]["reference"] == f"Patient/{pid}"]) == 1


def test_duplicate_backport_event_is_dropped_and_a_gap_requeries(server, client, receiver):
    def bundle(number: int, since: int, focus: str | None) -> bytes:
        event = [{"name": "event-number", "valueString": str(number)}]
        if focus:
            event.append({"name": "focus", "valueReference": {"reference": f"{server.base_url}/{focus}"}})
        return json.dumps({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
            "resourceType": "Parameters", "parameter": [
                {"name": "subscription", "valueReference": {"reference": f"{server.base_url}/Subscription/s-test"}},
                {"name": "type", "valueCode": "event-notification"},
                {"name": "events-since-subscription-start", "valueString": str(since)},
                {"name": "notification-event", "part": event}]}}]}).encode()

    _, obs = client.update(tumour_size("f23-pat", 70, id="f23-gap", day="2026-11-01"))
    assert post(receiver, body=bundle(1, 1, "Observation/f23-gap")).status_code == 200
    wait_for_group(client, "f23-pat", "borderline-resectable")
    receiver.wait_idle()
    work_before = receiver.health()["counts"].get("work_done", 0)
    assert post(receiver, body=bundle(1, 1, "Observation/f23-gap")).status_code == 200  # duplicate
    receiver.wait_idle()
    assert receiver.health()["counts"].get("work_done", 0) == work_before
    # event 5 after 1: events 2-4 were missed, so the receiver re-queries what changed
    client.update(tumour_size("f24-pat", 65, id="f24-missed", day="2026-11-01"))
    assert post(receiver, body=bundle(5, 5, None)).status_code == 200
    wait_for_group(client, "f24-pat", "borderline-resectable")
    # Adversary: the server's count went back (the subscription was recreated): events 1
    # and 2 again are new events, not duplicates of the old 1 and 2.
    receiver.wait_idle()
    assert group_of(client, "f27-pat") == "resectable"
    client.update(tumour_size("f27-pat", 66, id="f27-after-reset", day="2026-11-01"))
    assert post(receiver, body=bundle(1, 1, "Observation/f27-after-reset")).status_code == 200
    wait_for_group(client, "f27-pat", "borderline-resectable")
    assert "the event count of" in receiver.log.read_text()


def test_killed_receiver_loses_nothing(server, client, tmp_path):
    pid = "f25-pat"
    _, stored = client.update(tumour_size(pid, 66, id=f"{pid}-kill", day="2026-11-01"))
    inbox = tmp_path / "kill.sqlite"
    receiver = Receiver(server.base_url, inbox).start()
    try:
        server.stop()  # the FHIR server is down: notifications wait in the inbox
        r = post(receiver, f"/notify/Observation/{stored['id']}", dumps(stored).encode(), method="PUT")
        assert r.status_code == 200
        time.sleep(0.5)
        assert receiver.health()["inbox_depth"] >= 1
        receiver.kill()
    finally:
        receiver.kill()
        if not server.running:
            server.start()
    assert group_of(client, pid) != "borderline-resectable"
    with Receiver(server.base_url, inbox, receiver.port) as again:
        wait_for_group(client, pid, "borderline-resectable", timeout=60)
        again.wait_idle(60)


# --------------------------------------------------------------------------- hostile input
@pytest.mark.parametrize("headers, body, status", [
    ({"Content-Type": "application/fhir+json"}, b"{}", 401),
    ({"X-CLM-Subscription-Secret": "wrong-secret-wrong-secret", "Content-Type": "application/fhir+json"}, b"{}", 401),
    ({**HEADERS, "Content-Type": "text/plain"}, b"hello", 415),
    (HEADERS, b"{not json", 400),
    (HEADERS, b'{"resourceType": "Bundle", "type": "collection"}', 400),
    (HEADERS, b'{"hello": "world"}', 400),
    (HEADERS, b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters", "parameter": [{"name": "type", "valueCode": "bogus"}]}}]}', 400),
    (HEADERS, b"x" * 1_000_001, 413),
])
def test_bad_notifications_are_refused_and_not_stored(receiver, headers, body, status):
    before = receiver.health()["counts"]
    r = post(receiver, body=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert receiver.health()["counts"] == before


def test_resource_path_must_match_body(receiver):
    body = json.dumps({"resourceType": "Observation", "id": "a", "status": "final", "code": {}}).encode()
    r = post(receiver, "/notify/Observation/b", body, method="PUT")
    assert r.status_code == 400 and "Observation/b" in r.text


def test_hmac_signature_when_configured(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLM_HMAC", "hmac-key-for-tests")
    os.environ["CLM_HMAC"] = "hmac-key-for-tests"
    with Receiver(server.base_url, tmp_path / "h.sqlite", None, "--hmac-secret-env", "CLM_HMAC") as r:
        body = b""
        assert post(r, body=body).status_code == 401
        sig = hmac.new(b"hmac-key-for-tests", body, hashlib.sha256).hexdigest()
        assert post(r, body=body, headers={**HEADERS, "X-Signature": sig}).status_code == 200


def test_healthz_reports_depth_and_last_processed(server, client, receiver):
    _, obs = client.update(tumour_size("f26-pat", 30, id="f26-health", day="2026-11-01"))
    assert post(receiver, "/notify/Observation/f26-health", dumps(obs).encode(), method="PUT").status_code == 200
    health = receiver.wait_idle()
    assert health["status"] == "ok" and health["inbox_depth"] == 0
    assert health["last_processed"]["result"].startswith(("created", "updated", "unchanged"))


def test_serve_refuses_to_start_without_a_secret(server, monkeypatch, capsys):
    monkeypatch.delenv("CLM_SUBSCRIPTION_SECRET")
    assert main(["serve", "--fhir-url", server.base_url]) == 2
    assert "CLM_SUBSCRIPTION_SECRET" in capsys.readouterr().err


def test_receiver_starts_and_stores_while_the_fhir_server_is_down(tmp_path):
    from fhir_adapters.fhir.local_server import free_port
    down = f"http://127.0.0.1:{free_port()}/fhir"
    with Receiver(down, tmp_path / "down.sqlite") as r:
        body = json.dumps({"resourceType": "Observation", "id": "o1", "status": "final", "code": {},
                           "subject": {"reference": "Patient/p1"}}).encode()
        assert post(r, "/notify/Observation/o1", body, method="PUT").status_code == 200
        assert r.health()["inbox_depth"] >= 1
