"""Workers of the receiver: notifications -> patients -> RiskAssessments.

* The **resolver** takes each stored notification and finds the patients it concerns:
  the patient named in the notification, else the focus resource's subject (one read),
  else, for a notification without payload or after missed events, every patient with
  a watched resource updated since the watermark. Duplicate backport events (the same
  event number about the same resource) are dropped; a gap in the event numbers, or a
  number seen before about something else (the server's count started again), triggers
  that re-query.
* The **evaluators** take one patient at a time and run the pipeline
  (:meth:`clm_stratify.pipeline.Stratifier.patient`); a failure is retried with
  backoff and, after the inbox's ``max_attempts``, dead-lettered. A patient the server
  does not have (``not-found``: deleted) is done at once, with that result stored.

Poison isolation: whatever goes wrong while resolving or evaluating an item (an
exception of any kind, a FHIR error, an evaluation that never finishes) counts against
that item only; the loops go on with the next one. When even the failure cannot be
recorded (the inbox file fails), the item is set aside in memory and the receiver
reports itself degraded (:mod:`clm_stratify.service.health`). Each finished
evaluation is one INFO line: work-item id, action, group, status, notification count
and latency; no patient identifier.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
import logging
import sqlite3
import threading
import time

from clm_stratify.service.inbox import Inbox
from clm_stratify.service.inbox_file import event_about
from clm_stratify.pipeline import Stratifier
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.fhir.reference import PatientRef
from clm_stratify.service.health import Health
from clm_stratify.service.metrics import Metrics
from clm_stratify.service.notifications import Notification
from clm_stratify.service.privacy import public_error, redact
from fhir_adapters.sources.pull import changed_patients_since, patient_of_focus
from fhir_adapters.writeback.writer import WriteNotIdempotent

log = logging.getLogger("clm_stratify.service.worker")

# Re-queries overlap the watermark by this much: the server's clock and commit order
# are not ours, and evaluating a patient twice is harmless (the write is idempotent).
WATERMARK_OVERLAP = dt.timedelta(seconds=2)


RESOLVE_BATCH = 100    # notifications fetched per query by the resolver
BACKLOG_PAUSE = 0.02   # seconds an evaluator waits before each evaluation while the resolver has a backlog
SET_ASIDE_RETRY = 60.0  # seconds before notifications set aside (inbox failing) are tried again
OUTAGE_RETRY = 15.0    # seconds before an evaluation postponed by a FHIR outage is tried again
PRUNE_EVERY = 3600.0   # seconds between deletions of finished inbox rows
REFUSALS = (401, 403, 407)   # statuses that may refuse the receiver itself (see _credentials_refused)

def _minus_overlap(instant: str) -> str:
    try:
        t = dt.datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return instant
    return (t - WATERMARK_OVERLAP).isoformat()


class Worker:
    def __init__(self, inbox: Inbox, stratifier: Stratifier, *, evaluators: int = 2, coalesce: float = 0.15,
                 poll: float = 0.1, health: Health | None = None, metrics: Metrics | None = None,
                 keep: float = 7 * 86400.0):
        self.inbox = inbox
        self.health = health or Health(inbox, lambda: None)
        self.metrics = metrics
        self._set_aside: set[int] = set()   # notifications whose failure could not be recorded
        self._set_aside_at = 0.0
        self._due: deque = deque()           # notifications fetched, to resolve in order (resolver thread only)
        self._backlog = False                # the last fetch was a full batch: more are waiting
        self.keep = keep                     # seconds finished rows stay in the inbox
        self._pruned_at = float("-inf")
        self.stratifier = stratifier
        self.client = stratifier.client
        self.evaluators = evaluators
        self.coalesce = coalesce
        self.poll = poll
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ resolving
    def _patient_of_focus(self, focus: str) -> PatientRef | None:
        return patient_of_focus(self.client, focus)  # a deleted focus: its patient from its history

    def _requery(self) -> tuple[set[PatientRef], str | None]:
        since = self.inbox.watermark() or (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).isoformat()
        return changed_patients_since(self.client, self.stratifier.rules.terminology, _minus_overlap(since))

    def resolve(self, notification_id: int, body: str, received_at: float | None = None) -> None:
        """Turn one stored notification into queued patients (or nothing)."""
        n = Notification.model_validate_json(body)
        patients: set[PatientRef] = set()
        watermark = None
        events = None
        last_event = None
        requery = n.kind == "empty"
        sub = n.subscription or "(unknown subscription)"
        reset = False
        if n.events_since_start is not None:
            known = self.inbox.last_event(sub)
            if known is not None and n.events_since_start < known:
                log.warning("the event count of %s went back (server count %s, last seen %s: the subscription was "
                            "reset or recreated): its event numbers start again; re-querying",
                            sub, n.events_since_start, known)
                reset = requery = True
        if n.kind in ("heartbeat", "handshake", "query-status") and n.events_since_start is not None:
            last = self.inbox.last_event(sub)
            if n.kind != "handshake" and n.events_since_start > (last or 0):
                log.warning("events missed on %s (server count %s, last seen %s): re-querying",
                            sub, n.events_since_start, last)
                requery = True
            last_event = (sub, n.events_since_start)
        pending = list(n.events)
        if n.kind == "event-notification":
            numbers = [e.number for e in n.events if e.number is not None]
            about = {e.number: event_about(e.focus, e.version, e.timestamp, e.patient and e.patient.reference)
                     for e in n.events}
            seen = {} if reset else self.inbox.seen_events(sub, numbers)
            if any(seen[k] not in (None, about[k]) for k in seen):   # None: recorded by an earlier release
                # The same number about something else: the server's count started again
                # (eventsSinceSubscriptionStart is optional, so this may be the only sign).
                log.warning("event numbers of %s seen before about other resources: the subscription was reset or "
                            "recreated; its event numbers start again; re-querying", sub)
                reset = requery = True
                seen = {}
            for number in sorted(seen):
                log.debug("notification %s: event %s of %s already seen: a duplicate delivery, dropped",
                          notification_id, number, sub)
            pending = [e for e in n.events if e.number is None or e.number not in seen]
            last = None if reset else self.inbox.last_event(sub)
            new_numbers = sorted(e.number for e in pending if e.number is not None)
            if new_numbers and new_numbers[0] > (last or 0) + 1:
                log.warning("gap in events of %s (last seen %s, got %s): re-querying", sub, last, new_numbers[0])
                requery = True
            events = (sub, [(k, about[k]) for k in numbers])
            top = max([*numbers, n.events_since_start or 0], default=0)
            last_event = (sub, top) if top else None
        for e in pending:
            patient = e.patient or (self._patient_of_focus(e.focus) if e.focus else None)
            if patient:
                patients.add(patient)
            elif e.focus is None:
                requery = True  # an empty payload: find what changed
            else:
                log.warning("notification %s: %s names no patient by a literal reference (unattributable, "
                            "or deleted); no patient re-classified for it", notification_id, e.focus)
        if requery:
            found, watermark = self._requery()
            patients |= found
        self.inbox.resolve(notification_id, patients, coalesce=self.coalesce, received_at=received_at,
                           events=events, last_event=last_event, watermark=watermark,
                           reset=sub if reset else None)

    def resolve_one(self) -> bool:
        if self._set_aside and time.monotonic() - self._set_aside_at > SET_ASIDE_RETRY:
            self._set_aside.clear()   # try them again: the inbox may take writes again
        if time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            pruned = self.inbox.prune(self.keep)
            if pruned:
                log.info("inbox: %d finished row(s) older than %.0f h deleted", pruned, self.keep / 3600)
        if not self._due:
            self._due.extend(self.inbox.next_notifications(RESOLVE_BATCH, frozenset(self._set_aside)))
            self._backlog = len(self._due) == RESOLVE_BATCH
        if not self._due:
            return False
        nid, body, _, received_at = self._due.popleft()
        try:
            self.resolve(nid, body, received_at)
        except Exception as exc:  # anything: counted against this notification, retried with backoff, then dead
            expected = isinstance(exc, FhirError)
            error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            shown = public_error(error, exc)
            (log.warning if expected else log.error)("notification %s %s: %s", nid,
                                                     "not resolved yet" if expected else "cannot be resolved", shown)
            log.debug("notification %s: %s", nid, redact(error))
            self.health.failed("resolution", shown)
            counted = not (expected and (self._server_unreachable() or self._credentials_refused(exc)))
            try:
                state = self.inbox.notification_failed(nid, error, count=counted)
            except sqlite3.Error as store_exc:
                self._cannot_record("notification", nid, store_exc)
                return True
            if state == "dead":
                log.error("notification %s is a dead letter (see `clm-stratify inbox`)", nid)
                if self.metrics:
                    self.metrics.dead_lettered.labels(kind="notification").inc()
        else:
            self._succeeded("resolution")
        return True

    def _succeeded(self, kind: str) -> None:
        self.health.succeeded(kind)
        self.health.storage_ok()          # the inbox took a write again
        self._set_aside.clear()           # so the notifications set aside are tried again

    def _cannot_record(self, kind: str, item_id: int, exc: Exception) -> None:
        """The failure of an item could not be stored: set it aside (notifications; a
        patient row comes back when its lease expires, and its attempts were counted when
        it was leased) and say the inbox is failing."""
        if kind == "notification":
            self._set_aside.add(item_id)
            self._set_aside_at = time.monotonic()
        log.error("%s %s: its failure cannot be recorded in the inbox: %s", kind, item_id, exc)
        self.health.storage_failed(f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ evaluating
    def process_one(self) -> bool:
        if self._backlog:
            # Notifications are waiting to be resolved: let the resolver have the
            # interpreter first. Resolving is cheap, and each notification resolved
            # before the patient is evaluated is merged into that one evaluation.
            self._stop.wait(BACKLOG_PAUSE)
        item = self.inbox.take()
        if item is None:
            return False
        started = time.monotonic()
        group = None
        try:
            result = self.stratifier.patient(item.patient)
        except Exception as exc:  # a bug, or write-back stopped: counted against this item, retried
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, WriteNotIdempotent):
                self.health.write_back_stopped(redact(str(exc), item.patient.id))
            log.error("evaluation %s failed unexpectedly: %s", item.id, public_error(error, exc, item.patient.id))
            log.debug("evaluation %s traceback", item.id, exc_info=True)
            self._failed(item, error, exc)
            return True
        if result.action == "not-found":
            # The server has no such patient (deleted, or never there): trying again cannot
            # help, and a dead letter asks for a replay that cannot help either. Done, with
            # the reason stored (`clm-stratify inbox`, /healthz) and logged.
            log.warning("evaluation %s: the patient is not on the FHIR server (404/410, no data): nothing to "
                        "classify", item.id)
            try:
                self.inbox.done(item, "not-found")
            except sqlite3.Error as exc:
                self._cannot_record("evaluation", item.id, exc)
                return True
            if self.metrics:
                self.metrics.evaluation("not-found", None)
            return True
        if result.failed:
            self._failed(item, result.error or "failed", result.cause)
            return True
        group = result.group if result.action != "no-recurrence" else None   # no assessment, no group
        try:
            # Stored and shown by /healthz: no RiskAssessment id (derived from the patient id)
            latency = self.inbox.done(item, f"{result.action} {group or ''}".strip())
        except sqlite3.Error as exc:
            self._cannot_record("evaluation", item.id, exc)
            return True
        self._succeeded("evaluation")
        if self.metrics:
            self.metrics.evaluation(result.action, group, latency)
        log.info("evaluation %s: %s, group %s, status %s, %d notification(s), %.2f s evaluating%s", item.id,
                 result.action, group or "-", result.status if group else "-", item.notifications,
                 time.monotonic() - started, "" if latency is None else f", {latency:.2f} s after the first")
        return True

    def _server_unreachable(self) -> bool:
        """After a failure: is the FHIR server unreachable now (probed at once)? Then the
        failure is the outage's, not the item's: it is not counted against the item."""
        fhir = self.health.check_fhir(force=True)
        # no answer at all (refused, timeout, TLS); a server that answers with an error is reachable
        return fhir["reachable"] is False and ": HTTP " not in (fhir["error"] or "")

    def _credentials_refused(self, cause: BaseException | None) -> bool:
        """After a 401, 403 or 407: does the FHIR server (or a proxy in front of it) refuse the
        receiver itself, not this item? Only when an ordinary search that names no patient
        is refused too; else the refusal is this patient's (or this write's), counted."""
        if not isinstance(cause, FhirError) or cause.status not in REFUSALS:
            return False
        probe = self.stratifier.client.ping(path="Patient", params={"_summary": "count"})
        return probe is not None and probe.endswith(tuple(f"HTTP {s}" for s in REFUSALS))

    def _failed(self, item, error: str, cause: BaseException | None = None) -> None:
        shown = public_error(error, cause, item.patient.id)
        self.health.failed("evaluation", shown)
        if self.metrics:
            self.metrics.evaluation("failed", None)
        log.debug("evaluation %s: %s", item.id, redact(error, item.patient.id))
        outage = self._server_unreachable()
        if outage or self._credentials_refused(cause):
            try:
                self.inbox.postpone(item, error, OUTAGE_RETRY)
            except sqlite3.Error as exc:
                self._cannot_record("evaluation", item.id, exc)
                return
            log.warning("evaluation %s postponed %.0f s, not counted: %s", item.id, OUTAGE_RETRY,
                        "the FHIR server cannot be reached" if outage else
                        f"the FHIR server refuses the receiver's credentials ({shown})")
            return
        try:
            state = self.inbox.failed(item, error)
        except sqlite3.Error as exc:
            self._cannot_record("evaluation", item.id, exc)
            return
        (log.error if state == "dead" else log.warning)(
            "evaluation %s failed (attempt %d, %s): %s", item.id, item.attempts,
            "now a dead letter: see `clm-stratify inbox`" if state == "dead" else "will retry", shown)
        if state == "dead" and self.metrics:
            self.metrics.dead_lettered.labels(kind="patient").inc()

    # ------------------------------------------------------------------ threads
    def _loop(self, step) -> None:
        self.inbox.relax_durability()   # bookkeeping commits: see Inbox.relax_durability
        while not self._stop.is_set():
            try:
                busy = step()
            except Exception as exc:   # the inbox itself failing (take, next_notification)
                log.error("worker step failed: %s: %s", type(exc).__name__, redact(str(exc)))
                self.health.step_crashed(f"{type(exc).__name__}: {redact(str(exc))}")
                if isinstance(exc, sqlite3.Error):
                    self.health.storage_failed(f"{type(exc).__name__}: {exc}")
                self._stop.wait(1.0)   # not a hot loop on a failing inbox
                busy = False
            if not busy:
                self.inbox.wakeup.wait(self.poll)
                self.inbox.wakeup.clear()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._loop, args=(self.resolve_one,), name="resolver", daemon=True)]
        self._threads += [threading.Thread(target=self._loop, args=(self.process_one,), name=f"evaluator-{i}",
                                           daemon=True) for i in range(self.evaluators)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.wakeup.set()
        for t in self._threads:
            t.join(timeout)
