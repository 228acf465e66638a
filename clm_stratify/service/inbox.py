"""The durable inbox of the Subscription receiver: SQLite in WAL mode.

Two queues, both surviving a crash or a SIGKILL:

* ``notification``: every accepted notification, stored (and fsynced) *before* the
  receiver answers 2xx. A resolver turns it into patients.
* ``work``: one row per patient to evaluate. Notifications for a patient that is
  already waiting are merged into its row (coalescing: one report, one evaluation).
  A worker leases a row; a lease that expires (the worker died) makes the row
  available again. After ``max_attempts`` failures a row (or a notification) goes to
  the dead-letter state, which ``clm-stratify inbox`` lists and replays.

Also kept here: backport event numbers already seen, each with what the event was about
(a duplicate delivery is dropped; the same number about something else is not), the last
event count per subscription (gaps are noticed), and the ``_lastUpdated`` watermark
for notifications without payload.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clm_stratify.service.inbox_view import OperatorView
from clm_stratify.service.inbox_file import (InboxError, InboxGone, check_file, describe, identify, identity,
                                             lock, moved, prepare, remove_sidecars, sidecars, storable_text as _text)
from fhir_adapters.fhir.reference import PatientRef

__all__ = ["Inbox", "InboxError", "InboxGone", "WorkItem"]


# Before a running row is dropped because its patient is pending again: add its
# notification count to the pending row, so every notification stays counted once.
_MERGE_RUNNING_INTO_PENDING = (
    "UPDATE work SET notifications = notifications + (SELECT coalesce(sum(r.notifications), 0) FROM work r "
    "WHERE r.patient = work.patient AND r.state = 'running' {expired}), "
    "first_received_at = min(coalesce(first_received_at, 1e300), coalesce((SELECT min(r.first_received_at) "
    "FROM work r WHERE r.patient = work.patient AND r.state = 'running' {expired}), 1e300)) WHERE state = 'pending'")
# (1e300 stands for "none": SQLite's min() of a NULL is NULL; _nulled() maps it back.)
_NULL_FIRST_RECEIVED = "UPDATE work SET first_received_at = NULL WHERE first_received_at >= 1e300"


@dataclass(frozen=True)
class WorkItem:
    id: int
    patient: PatientRef
    attempts: int          # evaluations started, this one included
    notifications: int
    first_received_at: float | None = None


class Inbox(OperatorView):
    """Thread-safe access to one inbox file (one connection per thread).

    ``create``: make a new inbox when no file is at ``path`` (the receiver); otherwise an
    existing inbox is required (the ``inbox`` command). ``max_bytes``: the file may not
    grow past this (SQLite's ``max_page_count``): a flood of notifications then gets 503
    from the receiver instead of filling the disk. Raises :class:`InboxError`.
    """

    def __init__(self, path: Path | str, *, lease_seconds: float = 900.0, max_attempts: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0, create: bool = True,
                 max_bytes: int | None = None, serve: bool = False):
        self.path = str(path)
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_bytes = max_bytes
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.wakeup = threading.Event()
        new = check_file(self.path, create=create)
        self._lock_file = None
        if not new and serve:   # before SQLite opens it: another name for a served inbox is refused here
            self._lock_file = lock(self.path)
        before = sidecars(self.path)
        try:
            if not new:
                identify(self.path)
            try:
                db = self._db()
            except sqlite3.Error as exc:
                raise InboxError(f"{self.path}: {describe(exc)}") from None
            prepare(db, self.path, new=new)
            self._identity = identity(self.path)   # what `replaced` compares with
        except (InboxError, OSError) as exc:   # a refused file is left as it was: no -wal/-shm of ours
            self.close()
            if self._lock_file is not None:
                self._lock_file.close()
            remove_sidecars(self.path, before)
            if isinstance(exc, InboxError):
                raise
            raise InboxError(f"{self.path}: cannot open the inbox: {exc.strerror}") from None

    # ------------------------------------------------------------------ plumbing
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if hasattr(self, "_identity"):   # (connecting to a removed path would create a new file there)
                self._unmoved()
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA busy_timeout=30000")
                db.execute("PRAGMA journal_mode=WAL")
                # A 2xx means the notification is on disk; the worker's: relax_durability
                db.execute(f"PRAGMA synchronous={'NORMAL' if getattr(self._local, 'relaxed', False) else 'FULL'}")
            except sqlite3.Error:
                db.close()
                raise
            self._local.db = db
        return db

    def relax_durability(self) -> None:
        """The worker's commits are not synced one by one (``synchronous=NORMAL``): only a
        power cut can lose them, which means evaluating again (idempotent)."""
        self._local.relaxed = True
        db = getattr(self._local, "db", None)
        if db is not None:
            db.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        # One writer at a time inside this process: threads queue on a Python lock
        # (woken at once) instead of in SQLite's busy handler, which sleeps in steps of
        # up to 100 ms and made accept() latency spike under load (docs/reliability.md).
        # busy_timeout still covers other processes (the `inbox` command).
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._unmoved()   # never write into the -wal now next to another file: it would be applied to it
                yield db
            except BaseException:
                if db.in_transaction:   # SQLite may already have rolled back (disk full, I/O error)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def claim(self) -> None:   # (``serve=True`` at construction takes the lock earlier)
        """Become the one process serving this inbox: an exclusive ``flock`` on the inbox
        file itself, so another name for it (a symbolic or hard link) meets the same lock;
        released when the process ends, even by SIGKILL. (SQLite's own locks are POSIX
        record locks, independent of it.) Rows leased by a previous process are taken back
        at once: their evaluations died with it."""
        if self._lock_file is None:
            self._lock_file = lock(self.path)
        gone = self.replaced()
        if gone:
            raise InboxError(f"{gone} while it was being opened")
        now = time.time()
        try:
            self._take_back(now)
        except sqlite3.Error as exc:
            raise InboxError(f"{self.path}: {describe(exc)}") from None

    def _take_back(self, now: float) -> None:
        with self._tx() as db:
            # A running row whose patient is already waiting again is merged into the
            # waiting row (its notifications are counted there, not dropped).
            db.execute(_MERGE_RUNNING_INTO_PENDING.format(expired=""))
            db.execute(_NULL_FIRST_RECEIVED)
            db.execute("DELETE FROM work WHERE state = 'running' AND EXISTS "
                       "(SELECT 1 FROM work w2 WHERE w2.patient = work.patient AND w2.state = 'pending')")
            db.execute("UPDATE work SET state = 'pending', lease_until = NULL, due_at = min(due_at, ?) "
                       "WHERE state = 'running'", (now,))
            db.execute("UPDATE work SET due_at = ? WHERE state = 'pending' AND due_at > ?", (now, now))
            db.execute("UPDATE notification SET next_at = ? WHERE state = 'new' AND next_at > ?", (now, now))

    def replaced(self) -> str | None:
        """Why the file at ``path`` is no longer the inbox opened here (removed, or another
        file in its place: what is written here would be lost, and a second receiver could
        serve the path), or None. One ``stat``; checked at each store and by ``/healthz``."""
        return moved(self.path, self._identity)

    def _unmoved(self) -> None:
        gone = self.replaced()
        if gone:
            raise InboxGone(gone)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def _delay(self, attempts: int) -> float:
        return min(self.max_backoff, self.backoff * 2 ** max(0, attempts - 1))

    # ------------------------------------------------------------------ notifications
    def accept(self, notification_json: str) -> int:
        """Store an accepted notification; returns its id. Called before answering 2xx."""
        now = time.time()
        if self.max_bytes and not getattr(self._local, "capped", False):
            # The cap holds new notifications back, never the work on those already
            # accepted (the worker's connections are not capped).
            db = self._db()
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {max(2, int(self.max_bytes) // page)}")
            self._local.capped = True
        with self._tx() as db:
            cur = db.execute("INSERT INTO notification (received_at, body, next_at) VALUES (?, ?, ?)",
                             (now, notification_json, now))
        self._unmoved()   # again after the commit: a file removed before it is never acknowledged
        self.wakeup.set()
        return int(cur.lastrowid)

    def next_notification(self, skip: frozenset[int] = frozenset()) -> tuple[int, str, int, float] | None:
        """The oldest due notification to resolve: (id, body, attempts, received_at)."""
        due = self.next_notifications(1, skip)
        return due[0] if due else None

    def next_notifications(self, limit: int, skip: frozenset[int] = frozenset()) -> list[tuple[int, str, int, float]]:
        """Up to ``limit`` due notifications in the order they are due (arrival order,
        a retried one at its retry time): (id, body, attempts, received_at). ``skip``: ids
        whose failure could not be recorded. Ordered along the (state, next_at) index, so
        picking the next one does not sort the whole backlog."""
        exclude = f" AND id NOT IN ({','.join(str(int(i)) for i in sorted(skip))})" if skip else ""
        rows = self._db().execute(
            "SELECT id, body, attempts, received_at FROM notification WHERE state = 'new' AND next_at <= ?"
            f"{exclude} ORDER BY next_at, id LIMIT ?", (time.time(), int(limit))).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def resolve(self, notification_id: int, patients: set[PatientRef], *, coalesce: float = 0.0,
                received_at: float | None = None,
                events: tuple[str, list[tuple[int, str]]] | None = None, last_event: tuple[str, int] | None = None,
                watermark: str | None = None, reset: str | None = None) -> None:
        """Atomically: mark the notification resolved, queue its patients (merged into
        a waiting row for the same patient), record its event numbers (with what each
        was about, :func:`~clm_stratify.service.inbox_file.event_about`) and watermark.
        ``reset``: a subscription whose event count went back: its numbers are forgotten."""
        now = time.time()
        with self._tx() as db:
            if reset:
                db.execute("DELETE FROM seen_event WHERE subscription = ?", (reset,))
                db.execute("DELETE FROM subscription_state WHERE subscription = ?", (reset,))
            for patient in sorted(patients):  # stored by id: one row per patient
                db.execute(
                    "INSERT INTO work (patient, state, due_at, created_at, updated_at, first_received_at) "
                    "VALUES (?, 'pending', ?, ?, ?, ?) "
                    "ON CONFLICT (patient) WHERE state = 'pending' DO UPDATE SET "
                    "notifications = notifications + 1, updated_at = excluded.updated_at, "
                    "first_received_at = coalesce(min(first_received_at, excluded.first_received_at), "
                    "first_received_at, excluded.first_received_at)",
                    (patient.id, now + coalesce, now, now, received_at))
            if events:
                db.executemany("INSERT INTO seen_event VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                               "about = coalesce(about, excluded.about)", [(events[0], *e) for e in events[1]])
            if last_event:
                db.execute("INSERT INTO subscription_state VALUES (?, ?, ?) ON CONFLICT (subscription) "
                           "DO UPDATE SET last_event = max(last_event, excluded.last_event), "
                           "updated_at = excluded.updated_at", (*last_event, now))
            if watermark:
                db.execute("INSERT INTO kv VALUES ('watermark', ?) ON CONFLICT (key) DO UPDATE SET "
                           "value = max(value, excluded.value)", (watermark,))
            db.execute("UPDATE notification SET state = 'resolved', last_error = NULL WHERE id = ?",
                       (notification_id,))
        if patients:
            self.wakeup.set()

    def notification_failed(self, notification_id: int, error: str, *, count: bool = True) -> str:
        """Count a failed resolution: retried with backoff, or dead after ``max_attempts``
        (``count`` False: the FHIR server could not be reached, the try is not counted).
        Returns the new state ('new' or 'dead')."""
        with self._tx() as db:
            attempts = db.execute("SELECT attempts FROM notification WHERE id = ?",
                                  (notification_id,)).fetchone()[0] + (1 if count else 0)
            state = "dead" if attempts >= self.max_attempts else "new"
            now = time.time()
            db.execute("UPDATE notification SET attempts = ?, state = ?, next_at = ?, last_error = ?, dead_at = ? "
                       "WHERE id = ?", (attempts, state, now + self._delay(attempts), _text(error),
                                        now if state == "dead" else None, notification_id))
        return state

    # ------------------------------------------------------------------ events and watermark
    def seen_events(self, subscription: str, numbers: list[int]) -> dict[int, str | None]:
        """The numbers among ``numbers`` already seen, each with what it was about (None:
        recorded by an earlier release)."""
        if not numbers:
            return {}
        marks = ",".join("?" * len(numbers))
        rows = self._db().execute(
            f"SELECT event_number, about FROM seen_event WHERE subscription = ? AND event_number IN ({marks})",
            (subscription, *numbers)).fetchall()
        return {r[0]: r[1] for r in rows}

    def last_event(self, subscription: str) -> int | None:
        row = self._db().execute("SELECT last_event FROM subscription_state WHERE subscription = ?",
                                 (subscription,)).fetchone()
        return row[0] if row else None

    def watermark(self) -> str | None:
        row = self._db().execute("SELECT value FROM kv WHERE key = 'watermark'").fetchone()
        return row[0] if row else None

    def set_watermark_if_absent(self, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO kv VALUES ('watermark', ?)", (value,))

    # ------------------------------------------------------------------ patient work
    def take(self) -> WorkItem | None:
        """Lease the next due patient that no other worker is evaluating.

        The attempt is counted when the row is leased, not when it fails: an evaluation
        that never reports back (the process died, a thread hung past its lease) still
        counts, and a row that has started ``max_attempts`` evaluations is dead-lettered
        here instead of being leased again."""
        now = time.time()
        with self._tx() as db:
            # Leases that expired (the worker died): the patient is evaluated again.
            db.execute(_MERGE_RUNNING_INTO_PENDING.format(expired="AND r.lease_until < ?"), (now, now))
            db.execute(_NULL_FIRST_RECEIVED)
            db.execute("DELETE FROM work WHERE state = 'running' AND lease_until < ? AND EXISTS "
                       "(SELECT 1 FROM work w2 WHERE w2.patient = work.patient AND w2.state = 'pending')", (now,))
            db.execute("UPDATE work SET state = 'pending', lease_until = NULL "
                       "WHERE state = 'running' AND lease_until < ? "
                       "AND NOT EXISTS (SELECT 1 FROM work w2 WHERE w2.patient = work.patient AND w2.state = 'pending')",
                       (now,))
            for _ in range(1000):  # bounded: each pass dead-letters one unusable row or returns
                row = db.execute(
                    "SELECT id, patient, attempts, notifications, first_received_at FROM work w "
                    "WHERE state = 'pending' AND due_at <= ? "
                    "AND NOT EXISTS (SELECT 1 FROM work r WHERE r.patient = w.patient AND r.state = 'running' "
                    "AND r.lease_until >= ?) ORDER BY due_at, id LIMIT 1", (now, now)).fetchone()
                if row is None:
                    return None
                try:
                    patient = PatientRef(row[1])
                except ValueError as exc:  # written by an older version: never evaluable, never retried
                    db.execute("UPDATE work SET state = 'dead', updated_at = ?, last_error = ? WHERE id = ?",
                               (now, _text(f"stored patient is not usable: {exc}"), row[0]))
                    continue
                if row[2] >= self.max_attempts:   # its evaluations started and never reported back
                    db.execute("UPDATE work SET state = 'dead', updated_at = ?, last_error = ? WHERE id = ?",
                               (now, f"{row[2]} evaluations started and none finished (the process died or "
                                     f"an evaluation hung past its lease)", row[0]))
                    continue
                db.execute("UPDATE work SET state = 'running', attempts = attempts + 1, lease_until = ?, "
                           "updated_at = ? WHERE id = ?", (now + self.lease_seconds, now, row[0]))
                return WorkItem(row[0], patient, row[2] + 1, row[3], row[4])
        return None

    def done(self, item: WorkItem, result: str) -> float | None:
        """Mark the evaluation done; returns the seconds since the earliest notification
        it answers (None when unknown: rows of an earlier release)."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE work SET state = 'done', lease_until = NULL, updated_at = ?, result = ?, "
                       "last_error = NULL WHERE id = ?", (now, _text(result), item.id))
            db.execute("INSERT INTO kv VALUES ('last_processed', ?) ON CONFLICT (key) DO UPDATE SET value = "
                       "excluded.value", (json.dumps({"at": now, "work_id": item.id, "result": _text(result)}),))
        return now - item.first_received_at if item.first_received_at is not None else None

    def postpone(self, item: WorkItem, error: str, delay: float) -> None:
        """The evaluation could not be tried (the FHIR server cannot be reached): not
        counted against the item; due again after ``delay`` seconds."""
        now = time.time()
        with self._tx() as db:
            waiting = db.execute("SELECT id FROM work WHERE patient = ? AND state = 'pending'",
                                 (item.patient.id,)).fetchone()
            if waiting:
                db.execute("UPDATE work SET notifications = notifications + ?, first_received_at = "
                           "coalesce(min(first_received_at, ?), first_received_at, ?) WHERE id = ?",
                           (item.notifications, item.first_received_at, item.first_received_at, waiting[0]))
                db.execute("DELETE FROM work WHERE id = ?", (item.id,))
            else:
                db.execute("UPDATE work SET state = 'pending', attempts = max(0, attempts - 1), due_at = ?, "
                           "lease_until = NULL, updated_at = ?, last_error = ? WHERE id = ?",
                           (now + delay, now, _text(error), item.id))

    def failed(self, item: WorkItem, error: str) -> str:
        """Record a failure: retry later with backoff, or dead-letter (the attempt was
        counted by :meth:`take`). Returns the new state."""
        attempts = item.attempts
        now = time.time()
        error = _text(error)
        with self._tx() as db:
            if attempts >= self.max_attempts:
                db.execute("UPDATE work SET state = 'dead', attempts = ?, lease_until = NULL, updated_at = ?, "
                           "last_error = ? WHERE id = ?", (attempts, now, error, item.id))
                return "dead"
            waiting = db.execute("SELECT id FROM work WHERE patient = ? AND state = 'pending'",
                                 (item.patient.id,)).fetchone()
            if waiting:  # a newer notification is already queued for this patient: merge into it
                db.execute("UPDATE work SET attempts = max(attempts, ?), notifications = notifications + ?, "
                           "first_received_at = coalesce(min(first_received_at, ?), first_received_at, ?) "
                           "WHERE id = ?", (attempts, item.notifications, item.first_received_at,
                                            item.first_received_at, waiting[0]))
                db.execute("DELETE FROM work WHERE id = ?", (item.id,))
            else:
                db.execute("UPDATE work SET state = 'pending', attempts = ?, due_at = ?, lease_until = NULL, "
                           "updated_at = ?, last_error = ? WHERE id = ?",
                           (attempts, now + self._delay(attempts), now, error, item.id))
        return "pending"
