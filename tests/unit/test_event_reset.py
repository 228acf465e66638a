"""Backport/R5 event numbers after the server's count started again (issue 13, review):
``eventsSinceSubscriptionStart`` is optional, so "event 1 again" may be the only sign of a
recreated subscription. The same number about another resource is a new event (evaluated,
and what changed is re-queried); a delivery of the same event again is still dropped.

Real inbox file, the real worker; the FHIR server is a loopback HTTP server answering
every search with an empty Bundle and counting the requests (the re-query)."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from clm_stratify.pipeline import Rules, Stratifier
from clm_stratify.service.inbox import Inbox
from clm_stratify.service.notifications import parse_notification
from clm_stratify.service.worker import Worker
from fhir_adapters.fhir.client import FhirClient
from tests.support.http import LoopbackServer, send

SUB = "Subscription/rs1"


def r5(number: int, focus: str, patient: str, since: int | None = None) -> str:
    """An R5 event-notification (id-only, the patient in additionalContext), as stored."""
    status = {"resourceType": "SubscriptionStatus", "type": "event-notification", "status": "active",
              "subscription": {"reference": f"http://127.0.0.1/fhir/{SUB}"},
              "notificationEvent": [{"eventNumber": number,
                                     "focus": {"reference": f"http://127.0.0.1/fhir/Observation/{focus}"},
                                     "additionalContext": [{"reference": f"Patient/{patient}"}]}]}
    if since is not None:
        status["eventsSinceSubscriptionStart"] = since
    bundle = {"resourceType": "Bundle", "type": "subscription-notification", "entry": [{"resource": status}]}
    return parse_notification(bundle).model_dump_json()


@pytest.fixture
def fhir():
    """(client, list of the paths requested)."""
    requests: list[str] = []

    def handle(h) -> None:
        requests.append(h.path)
        send(h, 200, {"resourceType": "Bundle", "type": "history" if "_history" in h.path else "searchset",
                      "total": 0, "entry": []})

    with LoopbackServer(handle) as server, FhirClient(f"{server.url}/fhir", retries=0) as client:
        yield client, requests


def deliver(box: Inbox, worker: Worker, body: str) -> list[str]:
    """Store and resolve one notification; the patients it queued (their work done)."""
    box.accept(body)
    assert worker.resolve_one()
    queued = []
    for _ in range(20):   # bounded
        item = box.take()
        if item is None:
            break
        queued.append(item.patient.id)
        box.done(item, "unchanged")
    assert box.depth().get("notifications_new", 0) == 0 and not box.dead_letters()   # resolved, not failed
    return sorted(queued)


def test_a_reset_count_without_events_since_start_is_evaluated_and_requeried(tmp_path, fhir, caplog):
    client, requests = fhir
    caplog.set_level(logging.DEBUG, logger="clm_stratify.service.worker")
    box = Inbox(tmp_path / "inbox.sqlite", backoff=0.0)
    worker = Worker(box, Stratifier(client, Rules.load()), coalesce=0)
    assert deliver(box, worker, r5(1, "f30", "pa", since=1)) == ["pa"]
    assert deliver(box, worker, r5(2, "f31", "pb", since=2)) == ["pb"]
    assert deliver(box, worker, r5(2, "f31", "pb", since=2)) == []           # a duplicate delivery
    assert requests == []
    caplog.clear()
    # The subscription was recreated: event 1 again, about f32 now, and no count to tell.
    assert deliver(box, worker, r5(1, "f32", "pc")) == ["pc"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and SUB in warnings[0] and "reset" in warnings[0], warnings
    assert not any(p in r.getMessage() for r in caplog.records for p in ("pa", "pb", "pc"))   # no patient id
    assert any("Observation?" in path or "Observation/_history" in path for path in requests)   # re-queried
    assert deliver(box, worker, r5(2, "f33", "pd")) == ["pd"]
    # The new events are remembered: a delivery of the same event again is dropped, with a DEBUG line.
    caplog.clear()
    asked = len(requests)
    assert deliver(box, worker, r5(2, "f33", "pd")) == []
    assert len(requests) == asked
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("event 2 of Subscription/rs1 already seen" in m for m in debug), debug
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_numbers_recorded_by_an_earlier_release_still_drop_duplicates(tmp_path, fhir):
    """A seen_event row without ``about`` (an inbox of an earlier release) cannot tell: the
    event is treated as before, a duplicate, and not as a reset."""
    client, requests = fhir
    path = tmp_path / "inbox.sqlite"
    box = Inbox(path)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO seen_event (subscription, event_number) VALUES (?, 1)", (SUB,))
    db.close()
    worker = Worker(box, Stratifier(client, Rules.load()), coalesce=0)
    assert deliver(box, worker, r5(1, "f30", "pa", since=1)) == []
    assert requests == []
    assert deliver(box, worker, r5(2, "f31", "pb", since=2)) == ["pb"]
