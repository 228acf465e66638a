"""The receiver's SQLite inbox, on a real file."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from clm_stratify.cli import main
from clm_stratify.service.inbox import Inbox
from fhir_adapters.fhir.reference import PatientRef
from clm_stratify.service.notifications import NotificationError, parse_notification


def inbox(tmp_path, **kw) -> Inbox:
    return Inbox(tmp_path / "inbox.sqlite", **kw)


def test_notifications_for_one_patient_coalesce_into_one_evaluation(tmp_path):
    box = inbox(tmp_path)
    for _ in range(3):
        nid = box.accept("{}")
        box.resolve(nid, {PatientRef("p1")})
    box.resolve(box.accept("{}"), {PatientRef("p2")})
    first, second = box.take(), box.take()
    assert {first.patient.id, second.patient.id} == {"p1", "p2"}
    assert {first.patient.id: first.notifications, second.patient.id: second.notifications}["p1"] == 3
    assert box.take() is None


def test_a_patient_being_evaluated_is_not_taken_twice(tmp_path):
    box = inbox(tmp_path)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    item = box.take()
    box.resolve(box.accept("{}"), {PatientRef("p1")})  # arrives while p1 is running: queued, not run in parallel
    assert box.take() is None
    box.done(item, "created")
    assert box.take().patient == PatientRef("p1")


def test_expired_lease_makes_the_patient_available_again(tmp_path):
    box = inbox(tmp_path, lease_seconds=0.05)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    assert box.take().patient == PatientRef("p1")
    time.sleep(0.1)
    assert box.take().patient == PatientRef("p1")


def test_failures_back_off_then_dead_letter_and_replay(tmp_path, capsys):
    box = inbox(tmp_path, max_attempts=3, backoff=0.01, max_backoff=0.01)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    states = []
    for _ in range(3):
        item = None
        for _ in range(100):  # bounded wait for the backoff
            item = box.take()
            if item:
                break
            time.sleep(0.01)
        states.append(box.failed(item, "FHIR server unavailable"))
    assert states == ["pending", "pending", "dead"]
    assert box.take() is None
    assert main(["inbox", "--inbox", box.path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"patient:1 p1 after 3 attempts, dead since \S+Z: FHIR server unavailable", out)
    assert main(["inbox", "--inbox", box.path, "--replay", "patient:1"]) == 0
    assert box.take().patient == PatientRef("p1")


def test_notification_resolution_failures_dead_letter(tmp_path):
    box = inbox(tmp_path, max_attempts=2, backoff=0.0)
    nid = box.accept("{}")
    box.notification_failed(nid, "boom")
    box.notification_failed(nid, "boom")
    assert [d["kind"] for d in box.dead_letters()] == ["notification"]
    assert box.replay("notification", nid) == 1
    assert box.next_notification()[0] == nid


def test_seen_events_and_last_event(tmp_path):
    box = inbox(tmp_path)
    box.resolve(box.accept("{}"), set(), events=("Subscription/s", [(1, "a1"), (2, "a2")]),
                last_event=("Subscription/s", 2))
    assert box.seen_events("Subscription/s", [1, 2, 3]) == {1: "a1", 2: "a2"}
    assert box.last_event("Subscription/s") == 2
    box.resolve(box.accept("{}"), set(), last_event=("Subscription/s", 1))
    assert box.last_event("Subscription/s") == 2  # never goes back


def test_only_one_process_serves_an_inbox(tmp_path):
    box = inbox(tmp_path)
    box.claim()
    code = ("import sys; from clm_stratify.service.inbox import Inbox, InboxError\n"
            f"try:\n    Inbox({box.path!r}).claim()\nexcept InboxError as e:\n    print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "already served" in proc.stdout


def test_claim_takes_back_rows_of_a_dead_process(tmp_path):
    box = inbox(tmp_path, lease_seconds=3600)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    assert box.take().patient == PatientRef("p1")  # leased for an hour by a process that then died
    fresh = inbox(tmp_path, lease_seconds=3600)
    fresh.claim()
    assert fresh.take().patient == PatientRef("p1")


def test_inbox_command_on_a_missing_file(tmp_path, capsys):
    assert main(["inbox", "--inbox", str(tmp_path / "none.sqlite")]) == 2
    assert "no inbox there" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ({"resourceType": "Bundle", "type": "history", "entry": []}, "no status entry"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]},
     "Parameters or SubscriptionStatus"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters",
      "parameter": [{"name": "type", "valueCode": "event-notification"},
                    {"name": "events-since-subscription-start", "valueString": "x"}]}}]}, "not a whole number"),
    ({"resourceType": "Observation"}, "no resourceType or id"),
    ([1], "not a FHIR resource"),
])
def test_parser_refuses_what_is_not_a_notification(body, message):
    with pytest.raises(NotificationError, match=message):
        parse_notification(body)


def test_parser_reads_r4b_and_r5_subscription_status():
    status = {"resourceType": "SubscriptionStatus", "type": "event-notification", "eventsSinceSubscriptionStart": 7,
              "subscription": {"reference": "http://x/fhir/Subscription/s1"},
              "notificationEvent": [{"eventNumber": 7, "focus": {"reference": "http://x/fhir/Observation/o1"},
                                     "additionalContext": [{"reference": "Patient/p1"}]}]}
    full = {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "3"}, "subject": {"reference": "Patient/p1"}}
    for btype, style in (("history", "backport-r4b"), ("subscription-notification", "r5")):
        n = parse_notification({"resourceType": "Bundle", "type": btype,
                                "entry": [{"resource": status}, {"resource": full}]})
        assert (n.style, n.kind, n.subscription, n.events_since_start) == (style, "event-notification",
                                                                          "Subscription/s1", 7)
        assert (n.events[0].number, n.events[0].focus, n.events[0].patient, n.events[0].version) == \
            (7, "Observation/o1", PatientRef("p1"), "3")


def test_a_work_row_with_an_unusable_patient_is_dead_lettered_not_retried(tmp_path):
    """Found in review: a row written by an older version (any string as the patient)
    made take() raise after leasing it; the row came back after every lease."""
    import sqlite3

    box = inbox(tmp_path)
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    with sqlite3.connect(tmp_path / "inbox.sqlite") as db:
        db.execute("UPDATE work SET patient = 'a b', due_at = 0")
    box.resolve(box.accept("{}"), {PatientRef("p2")})
    assert box.take().patient == PatientRef("p2")
    dead = [r for r in box.dead_letters() if r["kind"] == "patient"]
    assert [(r["patient"], "not usable" in r["error"]) for r in dead] == [("a b", True)]


def test_a_notification_that_cannot_be_read_back_does_not_block_the_next(tmp_path):
    """Found in review: a stored notification that no longer validates (written by an
    older version) raised out of resolve_one on every poll, ahead of every later one."""
    from clm_stratify.pipeline import Rules, Stratifier
    from clm_stratify.service.worker import Worker
    from fhir_adapters.fhir.client import FhirClient

    box = inbox(tmp_path, backoff=0.0, max_attempts=2)
    bad = box.accept('{"style": "rest-hook", "kind": "resource", "events": [{"patient": "Patient/a b"}]}')
    good = parse_notification({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
                               "subject": {"reference": "Patient/p7"}}, path="Observation/o1")
    box.accept(good.model_dump_json())
    with FhirClient("http://127.0.0.1:9/fhir") as client:   # never contacted: both name their patient
        worker = Worker(box, Stratifier(client, Rules.load()), coalesce=0)
        for _ in range(4):
            worker.resolve_one()
    assert box.take().patient == PatientRef("p7")
    assert [r["id"] for r in box.dead_letters() if r["kind"] == "notification"] == [bad]


@pytest.mark.parametrize("argv, words", [
    (["--drop", "notification:99999999999999999999999"], "--drop notification:99999999999999999999999: no item"),
    (["--replay", "patient:9223372036854775808"], "--replay patient:9223372036854775808: no item"),
    (["--drop", "notification:\u0663"], "takes patient:ID or notification:ID"),   # ARABIC-INDIC DIGIT THREE
    (["--replay", "patient:\uff11"], "takes patient:ID or notification:ID"),       # FULLWIDTH DIGIT ONE
    (["--drop-all", "--replay-all"], "--replay-all and --drop-all cannot be combined"),
    (["--replay", "patient:1", "--drop", "patient:1"], "--replay and --drop cannot be combined"),
])
def test_inbox_command_refuses_ids_and_actions_it_cannot_honour(tmp_path, capsys, argv, words):
    """Review: an id >= 2^63 was an OverflowError traceback, 'notification:\u0663' was
    notification 3, and --drop-all --replay-all only replayed."""
    box = inbox(tmp_path, max_attempts=1)
    nid = box.accept("{}")
    box.notification_failed(nid, "boom")
    box.resolve(box.accept("{}"), {PatientRef("p1")})
    box.failed(box.take(), "boom")
    assert len(box.dead_letters()) == 2
    assert main(["inbox", "--inbox", box.path, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and words in captured.err and "Traceback" not in captured.err, captured.err
    assert len(box.dead_letters()) == 2   # nothing replayed or dropped
    assert main(["inbox", "--inbox", box.path, "--drop", "notification:0001"]) == 0   # ASCII digits: fine


def test_dead_letters_are_listed_at_the_time_they_became_dead(tmp_path, capsys):
    """Review: a dead notification was listed at the time it was received."""
    from clm_stratify.service.health import iso

    box = inbox(tmp_path, max_attempts=2, backoff=0.0)
    nid = box.accept("{}")
    received = box._db().execute("SELECT received_at FROM notification WHERE id = ?", (nid,)).fetchone()[0]
    box.notification_failed(nid, "boom")
    time.sleep(0.05)
    before = time.time()
    box.notification_failed(nid, "boom")
    [dead] = box.dead_letters()
    assert before <= dead["at"] <= time.time() and dead["at"] - received >= 0.05
    assert main(["inbox", "--inbox", box.path]) == 0
    assert f"notification:{nid} after 2 attempts, dead since {iso(dead['at'])}: boom" in capsys.readouterr().out
    box.replay("notification", nid)
    box.notification_failed(nid, "again")
    assert box.retrying()[0]["id"] == nid and box.dead_letters() == []


def test_accepted_notifications_are_synced_and_the_workers_bookkeeping_is_not(tmp_path):
    """A 2xx means the notification is on disk: the accepting connection commits with
    synchronous=FULL (2); a worker thread that relaxed its durability commits with NORMAL (1)."""
    import threading

    from clm_stratify.service.inbox import Inbox

    box = Inbox(tmp_path / "inbox.sqlite")
    box.accept('{"resourceType": "Bundle"}')
    modes = {"accepting": box._db().execute("PRAGMA synchronous").fetchone()[0]}

    def worker() -> None:
        box.relax_durability()
        box.next_notifications(1)
        modes["worker"] = box._db().execute("PRAGMA synchronous").fetchone()[0]

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert modes == {"accepting": 2, "worker": 1}
    box.close()
