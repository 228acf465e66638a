"""What the receiver says about itself: ``/healthz`` (ok or degraded, with reasons).

Degraded (HTTP 503, each reason one line) when:

* the FHIR server cannot be reached (a ``GET metadata`` probe, at most one every
  ``probe_every`` seconds, answered from the last result in between; the result of real
  traffic does not count: an idle receiver would never notice);
* the worker is failing: the last ``failing_after`` evaluations (or resolutions) in a
  row failed (and work is waiting, or the last failure was within a minute), or a worker
  loop step crashed within the last minute;
* the inbox cannot be read or written (storage errors while accepting or working), or
  its file was removed or replaced while served (nothing is accepted then);
* dead letters exist (work that will not be done until an operator replays or drops it);
* write-back was stopped because the server did not find what it had just written
  (every later write could be a duplicate).

Every time is ISO 8601 in UTC. Error texts come in already redacted (no patient
identifiers): ``/healthz`` needs no credentials.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from typing import Callable

CRASH_MEMORY = 60.0   # seconds a crashed worker step keeps the receiver degraded


def iso(t: float | None) -> str | None:
    """An epoch time as an ISO 8601 instant in UTC (milliseconds).

    >>> iso(0)
    '1970-01-01T00:00:00.000Z'
    """
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Health:
    """The receiver's state, fed by the worker and the HTTP side; :meth:`report` for ``/healthz``.

    ``probe``: one cheap request to the FHIR server; returns None when it answered, else
    a one-line reason.
    """

    def __init__(self, inbox, probe: Callable[[], str | None], *, probe_every: float = 10.0,
                 failing_after: int = 3, clock: Callable[[], float] = time.time):
        self.inbox = inbox
        self._probe = probe
        self.probe_every = probe_every
        self.failing_after = failing_after
        self._clock = clock
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self.fhir: dict = {"reachable": None, "checked_at": None, "error": None}
        self._fhir_checked = float("-inf")
        self.consecutive = {"evaluation": 0, "resolution": 0}
        self.last_failure: dict = {}
        self.last_success: dict = {}
        self.crash: tuple[float, str] | None = None
        self.storage: tuple[float, str] | None = None
        self.stopped: str | None = None

    # ------------------------------------------------------------------ fed by the worker
    def succeeded(self, kind: str) -> None:
        with self._lock:
            self.consecutive[kind] = 0
            self.last_success[kind] = self._clock()

    def failed(self, kind: str, error: str) -> None:
        with self._lock:
            self.consecutive[kind] += 1
            self.last_failure[kind] = (self._clock(), error[:300])

    def step_crashed(self, error: str) -> None:
        with self._lock:
            self.crash = (self._clock(), error[:300])

    def storage_failed(self, error: str) -> None:
        with self._lock:
            self.storage = (self._clock(), error[:300])

    def storage_ok(self) -> None:
        if self.storage is not None:
            with self._lock:
                self.storage = None

    def write_back_stopped(self, reason: str) -> None:
        with self._lock:
            self.stopped = reason[:500]

    # ------------------------------------------------------------------ the FHIR server
    def check_fhir(self, *, force: bool = False) -> dict:
        """The FHIR server's reachability, probed when the last result is older than ``probe_every``."""
        if force or self._clock() - self._fhir_checked >= self.probe_every:
            if self._probe_lock.acquire(blocking=False):   # one probe at a time; others get the last result
                try:
                    try:
                        error = self._probe()
                    except Exception as exc:   # the probe must never take /healthz down
                        error = f"{type(exc).__name__}: {exc}"
                    now = self._clock()
                    self.fhir = {"reachable": error is None, "checked_at": iso(now), "error": error}
                    self._fhir_checked = now
                finally:
                    self._probe_lock.release()
        return dict(self.fhir)

    # ------------------------------------------------------------------ the report
    def report(self) -> tuple[int, dict]:
        """(HTTP status, body) for ``/healthz``: 200 ok, 503 degraded with ``reasons``."""
        reasons: list[str] = []
        body: dict = {}
        readable = True
        try:
            depth = self.inbox.depth()
            last = self.inbox.last_processed()
        except sqlite3.Error as exc:
            depth, last, readable = {}, None, False
            reasons.append(f"the inbox cannot be read: {exc}")
        replaced = getattr(self.inbox, "replaced", None)   # one stat: the served file still at its path?
        gone = replaced() if replaced else None
        if gone:
            reasons.append(f"{gone}: notifications are not accepted (503); restart the receiver on the inbox")
        dead = depth.get("work_dead", 0) + depth.get("notifications_dead", 0)
        # An inbox that cannot be read has an unknown depth (null), never 0: "nothing waiting" would be a guess.
        waiting = (depth.get("notifications_new", 0) + depth.get("work_pending", 0) + depth.get("work_running", 0)
                   if readable else None)
        if dead:
            reasons.append(f"{dead} dead letter(s): list them with `clm-stratify inbox`, then replay or drop them")
        fhir = self.check_fhir()
        if fhir["reachable"] is False:
            reasons.append(f"the FHIR server cannot be reached: {fhir['error']}")
        now = self._clock()
        with self._lock:
            for kind, n in self.consecutive.items():
                # failing now: work is still waiting, or the last failure is recent (after an
                # operator dropped the dead letters, an idle receiver is not "failing")
                recent = now - self.last_failure[kind][0] < CRASH_MEMORY if kind in self.last_failure else False
                if n >= self.failing_after and (recent or waiting):
                    reasons.append(f"the worker is failing: the last {n} {kind}s failed "
                                   f"(latest: {self.last_failure[kind][1]})")
            if self.crash and now - self.crash[0] < CRASH_MEMORY:
                reasons.append(f"a worker step crashed at {iso(self.crash[0])}: {self.crash[1]}")
            if self.storage:
                reasons.append(f"the inbox cannot be written (since {iso(self.storage[0])}): {self.storage[1]}")
            if self.stopped:
                reasons.append(f"write-back stopped: {self.stopped}")
            worker = {"consecutive_failures": dict(self.consecutive),
                      "last_failure": {k: {"at": iso(t), "error": e} for k, (t, e) in self.last_failure.items()},
                      "last_success": {k: iso(t) for k, t in self.last_success.items()}}
        if last and isinstance(last.get("at"), (int, float)):
            last = {**last, "at": iso(last["at"])}
        body.update({
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "checked_at": iso(now),
            "inbox_depth": waiting,
            "counts": depth,
            "dead_letters": dead,
            "last_processed": last,
            "fhir_server": fhir,
            "worker": worker,
        })
        return (503 if reasons else 200), body
