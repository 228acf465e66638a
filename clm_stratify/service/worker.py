"""Workers of the receiver: notifications -> patients -> RiskAssessments.

* The **resolver** takes each stored notification and finds the patients it concerns:
  the patient named in the notification, else the focus resource's subject (one read),
  else, for a notification without payload or after missed events, every patient with
  a watched resource updated since the watermark. Duplicate backport events (by event
  number) are dropped; a gap in the event numbers triggers that re-query.
* The **evaluators** take one patient at a time and run the pipeline
  (:meth:`clm_stratify.pipeline.Stratifier.patient`); a failure is retried with
  backoff and, after the inbox's ``max_attempts``, dead-lettered.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading

from clm_stratify.service.inbox import Inbox
from clm_stratify.pipeline import Stratifier
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.fhir.reference import PatientRef, patient_of
from clm_stratify.service.notifications import Notification
from fhir_adapters.sources.pull import changed_patients_since

log = logging.getLogger("clm_stratify.service.worker")

# Re-queries overlap the watermark by this much: the server's clock and commit order
# are not ours, and evaluating a patient twice is harmless (the write is idempotent).
WATERMARK_OVERLAP = dt.timedelta(seconds=2)


_PATIENT_REF = re.compile(r"Patient/[A-Za-z0-9\-.]+")


def redact(text: str, patient: str | None = None) -> str:
    """``text`` for the log: patient references (and the patient's bare id) replaced.

    Logs name the work item or notification id instead: a patient's logical id is an
    identifier (README: logs hold no patient identifiers).

    >>> redact("GET /fhir/Patient/p-17: no such patient (p-17)", "p-17")
    'GET /fhir/Patient/[redacted]: no such patient ([redacted])'
    """
    text = _PATIENT_REF.sub("Patient/[redacted]", text)
    if patient:
        bare = patient.split("/", 1)[-1]
        text = re.sub(rf"(?<![A-Za-z0-9\-.]){re.escape(bare)}(?![A-Za-z0-9\-.])", "[redacted]", text)
    return text


def _minus_overlap(instant: str) -> str:
    try:
        t = dt.datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return instant
    return (t - WATERMARK_OVERLAP).isoformat()


class Worker:
    def __init__(self, inbox: Inbox, stratifier: Stratifier, *, evaluators: int = 2, coalesce: float = 0.15,
                 poll: float = 0.1):
        self.inbox = inbox
        self.stratifier = stratifier
        self.client = stratifier.client
        self.evaluators = evaluators
        self.coalesce = coalesce
        self.poll = poll
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ resolving
    def _patient_of_focus(self, focus: str) -> PatientRef | None:
        rtype, _, rid = focus.partition("/")
        if rtype == "Patient":
            try:
                return PatientRef(rid)
            except ValueError:
                return None
        resource = self.client.read(rtype, rid)
        if resource is None:
            return None
        return patient_of(resource, self.client.base_url)

    def _requery(self) -> tuple[set[PatientRef], str | None]:
        since = self.inbox.watermark() or (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).isoformat()
        return changed_patients_since(self.client, self.stratifier.rules.terminology, _minus_overlap(since))

    def resolve(self, notification_id: int, body: str) -> None:
        """Turn one stored notification into queued patients (or nothing)."""
        n = Notification.model_validate_json(body)
        patients: set[PatientRef] = set()
        watermark = None
        events = None
        last_event = None
        requery = n.kind == "empty"
        sub = n.subscription or "(unknown subscription)"
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
            seen = self.inbox.seen_events(sub, numbers)
            pending = [e for e in n.events if e.number is None or e.number not in seen]
            last = self.inbox.last_event(sub)
            new_numbers = sorted(e.number for e in pending if e.number is not None)
            if new_numbers and new_numbers[0] > (last or 0) + 1:
                log.warning("gap in events of %s (last seen %s, got %s): re-querying", sub, last, new_numbers[0])
                requery = True
            events = (sub, numbers)
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
        self.inbox.resolve(notification_id, patients, coalesce=self.coalesce, events=events,
                           last_event=last_event, watermark=watermark)

    def resolve_one(self) -> bool:
        item = self.inbox.next_notification()
        if item is None:
            return False
        nid, body, _ = item
        try:
            self.resolve(nid, body)
        except FhirError as exc:
            log.warning("notification %s not resolved yet: %s", nid, redact(str(exc)))
            self.inbox.notification_failed(nid, str(exc))
        except Exception as exc:  # a poison message: counted, retried with backoff, then dead-lettered
            log.error("notification %s cannot be resolved: %s: %s", nid, type(exc).__name__, redact(str(exc)))
            self.inbox.notification_failed(nid, f"{type(exc).__name__}: {exc}")
        return True

    # ------------------------------------------------------------------ evaluating
    def process_one(self) -> bool:
        item = self.inbox.take()
        if item is None:
            return False
        try:
            result = self.stratifier.patient(item.patient)
        except Exception as exc:  # a bug must not kill the worker; the item is retried
            log.error("evaluation %s failed unexpectedly: %s: %s", item.id, type(exc).__name__,
                      redact(str(exc), item.patient.id))
            log.debug("evaluation %s traceback", item.id, exc_info=True)
            self.inbox.failed(item, f"{type(exc).__name__}: {exc}")
            return True
        if result.failed:
            state = self.inbox.failed(item, result.error or "failed")
            log.warning("evaluation %s failed (%s): %s", item.id, state, redact(result.error or "failed", item.patient.id))
        else:
            self.inbox.done(item, f"{result.action} {result.risk_assessment or ''} {result.group or ''}".strip())
        return True

    # ------------------------------------------------------------------ threads
    def _loop(self, step) -> None:
        while not self._stop.is_set():
            try:
                busy = step()
            except Exception:
                log.exception("worker step failed")
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
