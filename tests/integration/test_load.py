"""Bounded load test of the receiver on loopback (slow).

A sender with 8 threads posts real rest-hook notifications (``PUT /notify/Observation/{id}``
with the resource of an existing patient) to a `clm-stratify serve` process at a paced
240 per second for 30 s (at most 7 200 requests), while SEKMET serves the evaluations.
Every 12th request is a poison message: refused at the door (an event count of 2^63, a
``notificationEvent`` that is an object, a lone surrogate in an id, a body that is not
JSON: 400 expected), or accepted: a notification for a patient the server does not have
(done as not-found, never retried), or for a patient whose every read the server answers
with 500 (retried, then a dead letter). The 500s come from a fault proxy in front of
SEKMET, in a process of its own (no real server fails for one patient only); it passes
every other request through.
``/healthz`` is sampled every second for the inbox
depth. Afterwards the inbox file is read: every accepted (2xx) notification must be
stored and resolved (lost = 0) and counted in exactly one evaluation of its patient
(duplicated = 0); no request got a 5xx; the failing ones are dead letters, the unknown
ones done as not-found, and every real patient's evaluations are done.

Run: ``python -m pytest -m slow tests/integration/test_load.py -s`` (figures printed; see docs/reliability.md).
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
import time
from collections import Counter

import pytest
import requests

from fhir_adapters.fhir.client import dumps
from tests.support.fixture_data import tumour_observations
from tests.support.fault_proxy import FaultProxy
from tests.support.receiver_process import SECRET, Receiver, inbox_rows, patient_of

pytestmark = [pytest.mark.slow, pytest.mark.integration]
RATE, SECONDS, THREADS, POISON_EVERY = 240, 30, 16, 12
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}


def _heartbeat(events: str) -> dict:
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "type", "valueCode": "heartbeat"},
            {"name": "events-since-subscription-start", "valueString": events}]}}]}


def _poison(n: int) -> tuple[str, bytes, int]:
    """(URL path under /notify, body, the status expected) of the n-th poison message."""
    g = n // 6 % 5   # ghosts 0..4 and broken patients 0..4 in turn

    def about(pid: str) -> dict:
        return {"resourceType": "Observation", "id": pid, "status": "final", "code": {"text": "size"},
                "subject": {"reference": f"Patient/{pid}"}}
    ghost, broken = about(f"ghost-{g}"), about(f"broken-{g}")
    r5 = {"resourceType": "Bundle", "type": "subscription-notification", "entry": [{"resource": {
        "resourceType": "SubscriptionStatus", "type": "event-notification", "notificationEvent": {"eventNumber": 1}}}]}
    surrogate = {"resourceType": "Observation", "id": "x\ud800", "status": "final", "code": {"text": "size"}}
    kinds = [("", json.dumps(_heartbeat(str(2 ** 63))).encode(), 400),
             ("", json.dumps(r5).encode(), 400),
             ("", json.dumps(surrogate).encode(), 400),
             ("", b"{not json", 400),
             (f"/Observation/{ghost['id']}", dumps(ghost).encode(), 200),
             (f"/Observation/{broken['id']}", dumps(broken).encode(), 200)]
    return kinds[n % len(kinds)]


def _broken_patient(method: str, path: str, body: bytes) -> str | None:
    """The fault proxy's script: 500 for any request about a ``broken-`` patient."""
    return "500" if "broken-" in path or b"broken-" in body else None


def _run_proxy(upstream: str, conn) -> None:
    """In its own process: the fault proxy until told to stop; then how many 500s it gave."""
    with FaultProxy(upstream, script=_broken_patient) as proxy:
        conn.send(proxy.base_url)
        conn.recv()
        conn.send(proxy.faults["500"])


class _ProxyProcess:
    """The fault proxy in a process of its own (in the test's process it would compete for
    the interpreter with the sender threads and slow every evaluation down)."""

    def __init__(self, upstream: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_run_proxy, args=(upstream, child), daemon=True)
        self.faults: int | None = None

    def __enter__(self) -> "_ProxyProcess":
        self._proc.start()
        assert self._conn.poll(60), "the proxy process did not start"
        self.base_url = self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        self.faults = self._conn.recv() if self._conn.poll(30) else None
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


def _histogram_quantiles(metrics: str) -> tuple[float, float]:
    """The upper bounds of the buckets holding the median and the 99th percentile of
    ``clm_notification_to_write_seconds``, from the receiver's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    per_le: Counter = Counter()   # summed over the actions (written, or found current)
    for f in text_string_to_metric_families(metrics):
        for s in f.samples:
            if s.name == "clm_notification_to_write_seconds_bucket":
                per_le[float(s.labels["le"])] += s.value
    buckets = sorted(per_le.items())
    total = buckets[-1][1]
    return tuple(next(le for le, n in buckets if n >= q * total) for q in (0.5, 0.99))


def test_receiver_sustains_200_notifications_per_second_with_poison_mixed_in(make_server, tmp_path):
    server = make_server()
    bodies = [(obs["id"], dumps(obs).encode()) for _, obs in sorted(tumour_observations().items())]
    inbox = tmp_path / "inbox.sqlite"
    accepted = Counter()
    refused = Counter()
    poison_status: Counter = Counter()
    depth: list[tuple[float, int]] = []
    latencies: list[float] = []
    lock = threading.Lock()
    with _ProxyProcess(server.root_url) as proxy, \
            Receiver(proxy.base_url, inbox, None, "--max-attempts", "2", "--log-level", "warning") as receiver:
        start = time.monotonic() + 0.2
        stop = start + SECONDS

        def sender(k: int) -> None:
            session = requests.Session()
            n = 0
            while True:
                due = start + (n * THREADS + k) / RATE
                if due >= stop:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                i = n * THREADS + k
                n += 1
                if i % POISON_EVERY == POISON_EVERY - 1:
                    path, body, expected = _poison(i // POISON_EVERY)
                    try:
                        status = session.post(f"{receiver.url}/notify{path}", data=body, headers=HEADERS,
                                              timeout=10).status_code
                    except requests.RequestException:
                        status = 0
                    with lock:
                        poison_status[(expected, status)] += 1
                    continue
                oid, body = bodies[i % len(bodies)]
                t0 = time.monotonic()
                try:
                    r = session.put(f"{receiver.url}/notify/Observation/{oid}", data=body, headers=HEADERS, timeout=10)
                    ok = r.status_code == 200
                except requests.RequestException:
                    ok = False
                with lock:
                    (accepted if ok else refused)[oid] += 1
                    latencies.append(time.monotonic() - t0)

        def sampler() -> None:
            while time.monotonic() < stop + 1:
                try:
                    depth.append((time.monotonic() - start, receiver.health()["inbox_depth"]))
                except requests.RequestException:
                    pass
                time.sleep(1)

        threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(THREADS)]
        threads.append(threading.Thread(target=sampler, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 30)
        sent_for = time.monotonic() - start
        drain_start = time.monotonic()
        receiver.wait_idle(180)
        drained = time.monotonic() - drain_start
        write_latency = _histogram_quantiles(requests.get(f"{receiver.url}/metrics", timeout=10).text)
    notes, work = inbox_rows(inbox)
    n_accepted = sum(accepted.values())
    poison_accepted = poison_status[(200, 200)]
    resolved = [n for n in notes if n[1] == "resolved"]
    lost = n_accepted + poison_accepted - len(resolved)
    counted = sum(n for _, _, _, n in work)
    per_patient = Counter(patient_of(b) for _, _, b in notes)
    per_patient_counted = Counter()
    for _, p, _, n in work:
        per_patient_counted[p] += n
    duplicated = sum(max(0, per_patient_counted[p] - per_patient[p]) for p in per_patient_counted)
    evaluations = len([w for w in work if w[2] == "done"])
    lat = sorted(latencies)
    figures = {
        "sent": n_accepted + sum(refused.values()), "accepted": n_accepted, "refused": sum(refused.values()),
        "stored": len(notes), "processed": len(resolved), "lost": lost, "duplicated": duplicated,
        "evaluations": evaluations, "patients": len(per_patient),
        "throughput_per_s": round(n_accepted / sent_for, 1),
        "poison (expected, got)": dict(poison_status),
        "latency_ms_p50": round(lat[len(lat) // 2] * 1e3, 1), "latency_ms_p99": round(lat[int(len(lat) * 0.99)] * 1e3, 1),
        "max_depth": max(d for _, d in depth), "drain_s": round(drained, 1),
        "notification_to_write_s (p50, p99 bucket bounds)": write_latency,
        "depth_over_time": [d for _, d in depth],
    }
    print("\nLOAD FIGURES", figures)
    assert lost == 0 and duplicated == 0
    assert counted == len(notes) and len(notes) >= n_accepted
    assert figures["throughput_per_s"] >= 200, figures
    assert all(expected == got for expected, got in poison_status), poison_status   # no 5xx, no 200 for poison
    assert {w[2] for w in work if not w[1].startswith(("ghost-", "broken-"))} == {"done"}
    assert {w[1] for w in work if w[2] == "dead"} == {f"broken-{i}" for i in range(5)}
    assert proxy.faults
    db = sqlite3.connect(inbox)
    try:
        ghosts = set(db.execute("SELECT patient, state, result FROM work WHERE patient LIKE 'ghost-%'"))
    finally:
        db.close()
    assert ghosts == {(f"ghost-{i}", "done", "not-found") for i in range(5)}
