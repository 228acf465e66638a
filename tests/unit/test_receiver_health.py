"""Honest health, metrics and poison isolation of the receiver, in process (issue 13,
parts 1 and 4). The FHIR server here is a closed loopback port (a real refusal); the
end-to-end versions with SEKMET are in tests/integration/test_receiver_robustness.py."""

from __future__ import annotations

import re
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from clm_stratify.pipeline import Rules, Stratifier
from clm_stratify.service.health import Health
from clm_stratify.service.inbox import Inbox
from clm_stratify.service.metrics import Metrics
from clm_stratify.service.notifications import parse_notification
from clm_stratify.service.receiver import ReceiverConfig, create_app
from clm_stratify.service.worker import Worker
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.reference import PatientRef

SECRET = "s" * 32
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def observation(pid: str = "p1", oid: str = "o1") -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "size"},
            "subject": {"reference": f"Patient/{pid}"}}


@pytest.fixture
def dead_fhir():
    with FhirClient(f"http://127.0.0.1:{closed_port()}/fhir", retries=0) as client:
        yield client


def app_for(box: Inbox, probe, **health_args) -> tuple[TestClient, Health, Metrics]:
    health = Health(box, probe, **health_args)
    metrics = Metrics(box, health)
    return TestClient(create_app(box, ReceiverConfig(secret=SECRET), health, metrics)), health, metrics


def test_healthz_ok_then_degraded_by_dead_letters_with_iso_times(tmp_path):
    box = Inbox(tmp_path / "inbox.sqlite", max_attempts=1)
    http, health, _ = app_for(box, lambda: None)
    with http:
        r = http.get("/healthz")
        body = r.json()
        assert r.status_code == 200 and body["status"] == "ok" and body["reasons"] == []
        assert ISO.match(body["checked_at"]) and ISO.match(body["fhir_server"]["checked_at"])
        box.resolve(box.accept("{}"), {PatientRef("p1")})
        box.failed(box.take(), "boom")   # max_attempts 1: a dead letter
        r = http.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "degraded"
        assert r.json()["dead_letters"] == 1 and "1 dead letter(s)" in r.json()["reasons"][0]


def test_healthz_degraded_when_the_fhir_server_cannot_be_reached(tmp_path, dead_fhir):
    box = Inbox(tmp_path / "inbox.sqlite")
    http, health, _ = app_for(box, lambda: dead_fhir.ping(timeout=1), probe_every=0.0)
    with http:
        r = http.get("/healthz")
        assert r.status_code == 503
        assert r.json()["fhir_server"]["reachable"] is False
        assert any("FHIR server cannot be reached" in x and "connection refused" in x for x in r.json()["reasons"])
        metrics = http.get("/metrics").text
        assert "clm_fhir_server_up 0.0" in metrics


def test_healthz_degraded_when_the_worker_keeps_failing(tmp_path, dead_fhir):
    """Three evaluations in a row fail (the FHIR server refuses): degraded, with the reason,
    and no patient id in what /healthz says (it needs no credentials)."""
    box = Inbox(tmp_path / "inbox.sqlite", backoff=0.0)
    http, health, metrics = app_for(box, lambda: None)
    worker = Worker(box, Stratifier(dead_fhir, Rules.load()), coalesce=0, health=health, metrics=metrics)
    for pid in ("pa-1", "pa-2", "pa-3"):
        box.resolve(box.accept("{}"), {PatientRef(pid)})
    for _ in range(3):
        assert worker.process_one()
    with http:
        r = http.get("/healthz")
    assert r.status_code == 503
    assert any("the last 3 evaluations failed" in x for x in r.json()["reasons"]), r.json()
    assert "pa-1" not in r.text and "pa-2" not in r.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    assert samples[("clm_evaluations_total", (("action", "failed"), ("group", "none")))] == 3
    assert samples[("clm_worker_consecutive_failures", (("kind", "evaluation"),))] == 3


def test_metrics_count_notifications_queue_and_latency(tmp_path):
    box = Inbox(tmp_path / "inbox.sqlite")
    http, health, metrics = app_for(box, lambda: None)
    with http:
        for i in range(3):
            assert http.put(f"/notify/Observation/o{i}", json=observation(oid=f"o{i}"), headers=HEADERS).status_code == 200
        assert http.post("/notify", content=b"{", headers=HEADERS).status_code == 400
        text = http.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("clm_notifications_received_total", (("kind", "resource"), ("style", "rest-hook")))] == 3
    assert samples[("clm_notifications_rejected_total", (("status", "400"),))] == 1
    assert samples[("clm_queue_depth", (("queue", "notifications"),))] == 3
    # latency: from the notification's arrival to the end of the evaluation
    nid, body, _, received = box.next_notification()
    box.resolve(nid, {PatientRef("p1")}, received_at=received)
    time.sleep(0.05)
    item = box.take()
    latency = box.done(item, "created RiskAssessment/x borderline")
    assert 0.05 <= latency < 30
    metrics.evaluation("created", "borderline", latency)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    assert samples[("clm_notification_to_write_seconds_count", (("action", "created"),))] == 1
    metrics.evaluation("unchanged", "borderline", latency)   # found current: its own series, not a write
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}
    assert samples[("clm_notification_to_write_seconds_count", (("action", "created"),))] == 1
    assert samples[("clm_notification_to_write_seconds_count", (("action", "unchanged"),))] == 1
    assert samples[("clm_evaluations_total", (("action", "created"), ("group", "borderline")))] == 1


def test_a_poison_notification_is_dead_lettered_and_the_next_one_goes_through(tmp_path, dead_fhir):
    """The attack of issue 13: a stored heartbeat whose event count is 2^63 (as an
    earlier release stored it), then a valid notification. The valid one is resolved at
    once; the poison one fails on its own, with backoff, and ends as a dead letter that
    the `inbox` command lists."""
    box = Inbox(tmp_path / "inbox.sqlite", backoff=0.0, max_attempts=3)
    poison = box.accept('{"style": "backport-r4", "kind": "heartbeat", "subscription": "Subscription/s1", '
                        f'"events_since_start": {2 ** 63}, "events": []}}')
    box.accept(parse_notification(observation("p7"), path="Observation/o1").model_dump_json())
    worker = Worker(box, Stratifier(dead_fhir, Rules.load()), coalesce=0)
    for _ in range(10):   # bounded
        worker.resolve_one()
    assert box.take().patient == PatientRef("p7")
    dead = box.dead_letters()
    assert [(d["kind"], d["id"], d["attempts"]) for d in dead] == [("notification", poison, 3)]
    assert box.next_notification() is None   # nothing left to spin on


def test_an_evaluation_that_never_reports_back_counts_as_an_attempt(tmp_path):
    """A worker that dies mid-evaluation (lease expires) uses up an attempt: after
    max_attempts such deaths the row is a dead letter, not leased forever."""
    box = Inbox(tmp_path / "inbox.sqlite", max_attempts=2, lease_seconds=0.0)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    assert box.take().attempts == 1
    time.sleep(0.01)
    assert box.take().attempts == 2
    time.sleep(0.01)
    assert box.take() is None
    assert "2 evaluations started and none finished" in box.dead_letters()[0]["error"]


def test_a_failure_text_with_a_lone_surrogate_is_stored(tmp_path):
    """The error text of a hostile record cannot make recording the failure fail
    (which would leave the item to be retried forever)."""
    box = Inbox(tmp_path / "inbox.sqlite")
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    assert box.failed(box.take(), "bad value \ud800 here") == "pending"
    assert "\\ud800" in box.retrying()[0]["error"]


def test_an_unreachable_fhir_server_is_not_counted_against_the_items(tmp_path, dead_fhir):
    """Adversary: an outage of ~80 s turned every waiting notification into a dead letter.
    When the server cannot be reached at all, the evaluation is postponed, not counted."""
    box = Inbox(tmp_path / "inbox.sqlite", max_attempts=1)
    health = Health(box, lambda: dead_fhir.ping(timeout=1))
    worker = Worker(box, Stratifier(dead_fhir, Rules.load()), coalesce=0, health=health)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    assert worker.process_one()
    assert box.dead_letters() == []
    assert [(r["attempts"], "unavailable" in r["error"]) for r in box.retrying()] == [(0, True)]


def test_healthz_names_no_assessment_and_drops_failing_once_idle(tmp_path):
    """Adversary: last_processed carried the RiskAssessment id (a hash of the patient id:
    brute-forced back to the patient); and after the operator dropped the dead letters an
    idle receiver stayed 'failing'."""
    box = Inbox(tmp_path / "inbox.sqlite", max_attempts=1)
    clock = [1000.0]
    health = Health(box, lambda: None, clock=lambda: clock[0])
    for _ in range(3):
        health.failed("evaluation", "x")
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    box.failed(box.take(), "boom")
    assert any("worker is failing" in r for r in health.report()[1]["reasons"])
    box.drop()
    clock[0] += 120
    status, body = health.report()
    assert status == 200 and body["status"] == "ok", body


def test_an_inbox_that_cannot_be_read_has_an_unknown_depth_never_zero(tmp_path, monkeypatch):
    """/healthz said ``inbox_depth: 0`` when the inbox could not be read: anything waiting
    for it (an operator, a test's wait for idle) took that for "nothing waiting". The depth
    is null then, and the reason says why. Mock: a read failing while the receiver runs
    (a lock held past the 30 s busy timeout) cannot be made to happen on demand with a real
    SQLite file; the failure is injected at the inbox's own read."""
    import sqlite3

    box = Inbox(tmp_path / "inbox.sqlite")
    box.accept("{}")
    http, _, _ = app_for(box, lambda: None)
    with http:
        assert http.get("/healthz").json()["inbox_depth"] == 1

        def locked():
            raise sqlite3.OperationalError("database is locked")
        monkeypatch.setattr(box, "depth", locked)
        r = http.get("/healthz")
        assert r.status_code == 503 and r.json()["inbox_depth"] is None
        assert "the inbox cannot be read: database is locked" in r.json()["reasons"]
