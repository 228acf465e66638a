"""Bounded load test of the receiver on loopback (slow).

A sender with 4 threads posts real rest-hook notifications (``PUT /notify/Observation/{id}``
with the resource of an existing patient) to a `clm-stratify serve` process at a paced
220 per second for 30 s (at most 6 600 requests), while SEKMET serves the evaluations.
``/healthz`` is sampled every second for the inbox depth. Afterwards the inbox file is
read: every accepted (2xx) notification must be stored and resolved (lost = 0) and
counted in exactly one evaluation of its patient (duplicated = 0).

Run: ``python -m pytest -m slow tests/integration/test_load.py -s`` (figures printed; see docs/reliability.md).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import requests

from fhir_adapters.fhir.client import dumps
from tests.support.fixture_data import tumour_observations
from tests.support.receiver_process import SECRET, Receiver, inbox_rows, patient_of

pytestmark = [pytest.mark.slow, pytest.mark.integration]
RATE, SECONDS, THREADS = 220, 30, 4
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}


def test_receiver_sustains_200_notifications_per_second(make_server, tmp_path):
    server = make_server()
    observations = tumour_observations()
    bodies = [(obs["id"], dumps(obs).encode()) for _, obs in sorted(observations.items())]
    inbox = tmp_path / "inbox.sqlite"
    accepted = Counter()
    refused = Counter()
    depth: list[tuple[float, int]] = []
    latencies: list[float] = []
    lock = threading.Lock()
    with Receiver(server.base_url, inbox) as receiver:
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
                oid, body = bodies[(n * THREADS + k) % len(bodies)]
                t0 = time.monotonic()
                try:
                    r = session.put(f"{receiver.url}/notify/Observation/{oid}", data=body, headers=HEADERS, timeout=10)
                    ok = r.status_code == 200
                except requests.RequestException:
                    ok = False
                with lock:
                    (accepted if ok else refused)[oid] += 1
                    latencies.append(time.monotonic() - t0)
                n += 1

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
    notes, work = inbox_rows(inbox)
    n_accepted = sum(accepted.values())
    resolved = [n for n in notes if n[1] == "resolved"]
    lost = n_accepted - len(resolved)
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
        "latency_ms_p50": round(lat[len(lat) // 2] * 1e3, 1), "latency_ms_p99": round(lat[int(len(lat) * 0.99)] * 1e3, 1),
        "max_depth": max(d for _, d in depth), "drain_s": round(drained, 1),
        "depth_over_time": [d for _, d in depth],
    }
    print("\nLOAD FIGURES", figures)
    assert lost == 0 and duplicated == 0
    assert counted == len(notes) and len(notes) >= n_accepted
    assert figures["throughput_per_s"] >= 200, figures
    assert {w[2] for w in work} == {"done"}
