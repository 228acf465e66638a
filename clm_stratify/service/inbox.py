"""The durable inbox of the Subscription receiver: SQLite in WAL mode.

Two queues, both surviving a crash or a SIGKILL:

* ``notification``: every accepted notification, stored (and fsynced) *before* the
  receiver answers 2xx. A resolver turns it into patients.
* ``work``: one row per patient to evaluate. Notifications for a patient that is
  already waiting are merged into its row (coalescing: one report, one evaluation).
  A worker leases a row; a lease that expires (the worker died) makes the row
  available again. After ``max_attempts`` failures a row (or a notification) goes to
  the dead-letter state, which ``clm-stratify inbox`` lists and replays.

Also kept here: backport event numbers already seen (duplicates are dropped), the last
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

from fhir_adapters.fhir.reference import PatientRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS notification (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    body TEXT NOT NULL,               -- the parsed Notification (JSON)
    state TEXT NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'resolved', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS notification_new ON notification (state, next_at);
CREATE TABLE IF NOT EXISTS work (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    patient TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'dead')),
    due_at REAL NOT NULL,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    notifications INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT,
    result TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS work_one_pending ON work (patient) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS work_due ON work (state, due_at);
CREATE TABLE IF NOT EXISTS seen_event (
    subscription TEXT NOT NULL,
    event_number INTEGER NOT NULL,
    PRIMARY KEY (subscription, event_number)
);
CREATE TABLE IF NOT EXISTS subscription_state (
    subscription TEXT PRIMARY KEY,
    last_event INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Before a running row is dropped because its patient is pending again: add its
# notification count to the pending row, so every notification stays counted once.
_MERGE_RUNNING_INTO_PENDING = (
    "UPDATE work SET notifications = notifications + (SELECT coalesce(sum(r.notifications), 0) FROM work r "
    "WHERE r.patient = work.patient AND r.state = 'running' {expired}) WHERE state = 'pending'")


@dataclass(frozen=True)
class WorkItem:
    id: int
    patient: PatientRef
    attempts: int
    notifications: int


class Inbox:
    """Thread-safe access to one inbox file (one connection per thread)."""

    def __init__(self, path: Path | str, *, lease_seconds: float = 60.0, max_attempts: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0):
        self.path = str(path)
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.wakeup = threading.Event()
        self._db().executescript(SCHEMA)

    # ------------------------------------------------------------------ plumbing
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")   # a 2xx means the notification is on disk
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

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
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def claim(self) -> None:
        """Become the one process serving this inbox (an exclusive lock on ``PATH.lock``,
        released when the process ends, even by SIGKILL). Rows leased by a previous
        process are taken back at once: their evaluations died with it."""
        import fcntl

        self._lock_file = open(self.path + ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{self.path} is already served by another receiver process") from None
        now = time.time()
        with self._tx() as db:
            # A running row whose patient is already waiting again is merged into the
            # waiting row (its notifications are counted there, not dropped).
            db.execute(_MERGE_RUNNING_INTO_PENDING.format(expired=""))
            db.execute("DELETE FROM work WHERE state = 'running' AND EXISTS "
                       "(SELECT 1 FROM work w2 WHERE w2.patient = work.patient AND w2.state = 'pending')")
            db.execute("UPDATE work SET state = 'pending', lease_until = NULL, due_at = min(due_at, ?) "
                       "WHERE state = 'running'", (now,))
            db.execute("UPDATE work SET due_at = ? WHERE state = 'pending' AND due_at > ?", (now, now))
            db.execute("UPDATE notification SET next_at = ? WHERE state = 'new' AND next_at > ?", (now, now))

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
        with self._tx() as db:
            cur = db.execute("INSERT INTO notification (received_at, body, next_at) VALUES (?, ?, ?)",
                             (now, notification_json, now))
        self.wakeup.set()
        return int(cur.lastrowid)

    def next_notification(self) -> tuple[int, str, int] | None:
        """The oldest due notification to resolve: (id, body, attempts)."""
        row = self._db().execute(
            "SELECT id, body, attempts FROM notification WHERE state = 'new' AND next_at <= ? "
            "ORDER BY id LIMIT 1", (time.time(),)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def resolve(self, notification_id: int, patients: set[PatientRef], *, coalesce: float = 0.0,
                events: tuple[str, list[int]] | None = None, last_event: tuple[str, int] | None = None,
                watermark: str | None = None) -> None:
        """Atomically: mark the notification resolved, queue its patients (merged into
        a waiting row for the same patient), record its event numbers and watermark."""
        now = time.time()
        with self._tx() as db:
            for patient in sorted(patients):  # stored by id: one row per patient
                db.execute(
                    "INSERT INTO work (patient, state, due_at, created_at, updated_at) "
                    "VALUES (?, 'pending', ?, ?, ?) "
                    "ON CONFLICT (patient) WHERE state = 'pending' DO UPDATE SET "
                    "notifications = notifications + 1, updated_at = excluded.updated_at",
                    (patient.id, now + coalesce, now, now))
            if events:
                db.executemany("INSERT OR IGNORE INTO seen_event VALUES (?, ?)",
                               [(events[0], n) for n in events[1]])
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

    def notification_failed(self, notification_id: int, error: str) -> None:
        with self._tx() as db:
            attempts = db.execute("SELECT attempts FROM notification WHERE id = ?",
                                  (notification_id,)).fetchone()[0] + 1
            state = "dead" if attempts >= self.max_attempts else "new"
            db.execute("UPDATE notification SET attempts = ?, state = ?, next_at = ?, last_error = ? WHERE id = ?",
                       (attempts, state, time.time() + self._delay(attempts), error[:2000], notification_id))

    # ------------------------------------------------------------------ events and watermark
    def seen_events(self, subscription: str, numbers: list[int]) -> set[int]:
        if not numbers:
            return set()
        marks = ",".join("?" * len(numbers))
        rows = self._db().execute(
            f"SELECT event_number FROM seen_event WHERE subscription = ? AND event_number IN ({marks})",
            (subscription, *numbers)).fetchall()
        return {r[0] for r in rows}

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
        """Lease the next due patient that no other worker is evaluating."""
        now = time.time()
        with self._tx() as db:
            # Leases that expired (the worker died): the patient is evaluated again.
            db.execute(_MERGE_RUNNING_INTO_PENDING.format(expired="AND r.lease_until < ?"), (now,))
            db.execute("DELETE FROM work WHERE state = 'running' AND lease_until < ? AND EXISTS "
                       "(SELECT 1 FROM work w2 WHERE w2.patient = work.patient AND w2.state = 'pending')", (now,))
            db.execute("UPDATE work SET state = 'pending', lease_until = NULL "
                       "WHERE state = 'running' AND lease_until < ? "
                       "AND NOT EXISTS (SELECT 1 FROM work w2 WHERE w2.patient = work.patient AND w2.state = 'pending')",
                       (now,))
            for _ in range(1000):  # bounded: each pass dead-letters one unusable row or returns
                row = db.execute(
                    "SELECT id, patient, attempts, notifications FROM work w WHERE state = 'pending' AND due_at <= ? "
                    "AND NOT EXISTS (SELECT 1 FROM work r WHERE r.patient = w.patient AND r.state = 'running' "
                    "AND r.lease_until >= ?) ORDER BY due_at, id LIMIT 1", (now, now)).fetchone()
                if row is None:
                    return None
                try:
                    patient = PatientRef(row[1])
                except ValueError as exc:  # written by an older version: never evaluable, never retried
                    db.execute("UPDATE work SET state = 'dead', updated_at = ?, last_error = ? WHERE id = ?",
                               (now, f"stored patient is not usable: {exc}", row[0]))
                    continue
                db.execute("UPDATE work SET state = 'running', lease_until = ?, updated_at = ? WHERE id = ?",
                           (now + self.lease_seconds, now, row[0]))
                return WorkItem(row[0], patient, row[2], row[3])
        return None

    def done(self, item: WorkItem, result: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE work SET state = 'done', lease_until = NULL, updated_at = ?, result = ?, "
                       "last_error = NULL WHERE id = ?", (time.time(), result, item.id))
            db.execute("INSERT INTO kv VALUES ('last_processed', ?) ON CONFLICT (key) DO UPDATE SET value = "
                       "excluded.value", (json.dumps({"at": time.time(), "work_id": item.id, "result": result}),))

    def failed(self, item: WorkItem, error: str) -> str:
        """Record a failure: retry later with backoff, or dead-letter. Returns the new state."""
        attempts = item.attempts + 1
        now = time.time()
        with self._tx() as db:
            if attempts >= self.max_attempts:
                db.execute("UPDATE work SET state = 'dead', attempts = ?, lease_until = NULL, updated_at = ?, "
                           "last_error = ? WHERE id = ?", (attempts, now, error[:2000], item.id))
                return "dead"
            waiting = db.execute("SELECT id FROM work WHERE patient = ? AND state = 'pending'",
                                 (item.patient.id,)).fetchone()
            if waiting:  # a newer notification is already queued for this patient: merge into it
                db.execute("UPDATE work SET attempts = max(attempts, ?), notifications = notifications + ? "
                           "WHERE id = ?", (attempts, item.notifications, waiting[0]))
                db.execute("DELETE FROM work WHERE id = ?", (item.id,))
            else:
                db.execute("UPDATE work SET state = 'pending', attempts = ?, due_at = ?, lease_until = NULL, "
                           "updated_at = ?, last_error = ? WHERE id = ?",
                           (attempts, now + self._delay(attempts), now, error[:2000], item.id))
        return "pending"

    # ------------------------------------------------------------------ operator view
    def depth(self) -> dict[str, int]:
        db = self._db()
        counts = {f"work_{s}": n for s, n in db.execute("SELECT state, count(*) FROM work GROUP BY state")}
        counts.update({f"notifications_{s}": n for s, n in
                       db.execute("SELECT state, count(*) FROM notification GROUP BY state")})
        return counts

    def last_processed(self) -> dict | None:
        row = self._db().execute("SELECT value FROM kv WHERE key = 'last_processed'").fetchone()
        return json.loads(row[0]) if row else None

    def dead_letters(self) -> list[dict]:
        db = self._db()
        rows = [{"kind": "patient", "id": r[0], "patient": r[1], "attempts": r[2], "error": r[3], "at": r[4]}
                for r in db.execute("SELECT id, patient, attempts, last_error, updated_at FROM work "
                                    "WHERE state = 'dead' ORDER BY id")]
        rows += [{"kind": "notification", "id": r[0], "patient": None, "attempts": r[1], "error": r[2], "at": r[3]}
                 for r in db.execute("SELECT id, attempts, last_error, received_at FROM notification "
                                     "WHERE state = 'dead' ORDER BY id")]
        return rows

    def replay(self, kind: str | None = None, item_id: int | None = None) -> int:
        """Move dead letters back to the queue (all, or one by kind and id)."""
        now = time.time()
        n = 0
        with self._tx() as db:
            if kind in (None, "patient"):
                rows = db.execute("SELECT id, patient FROM work WHERE state = 'dead'" +
                                  (" AND id = ?" if item_id is not None else ""),
                                  (() if item_id is None else (item_id,))).fetchall()
                for wid, patient in rows:
                    if db.execute("SELECT 1 FROM work WHERE patient = ? AND state = 'pending'", (patient,)).fetchone():
                        db.execute("UPDATE work SET state = 'done', result = 'replayed into a waiting item' "
                                   "WHERE id = ?", (wid,))
                    else:
                        db.execute("UPDATE work SET state = 'pending', attempts = 0, due_at = ?, updated_at = ? "
                                   "WHERE id = ?", (now, now, wid))
                    n += 1
            if kind in (None, "notification"):
                cur = db.execute("UPDATE notification SET state = 'new', attempts = 0, next_at = ? WHERE state = 'dead'"
                                 + (" AND id = ?" if item_id is not None else ""),
                                 (now,) if item_id is None else (now, item_id))
                n += cur.rowcount
        self.wakeup.set()
        return n
