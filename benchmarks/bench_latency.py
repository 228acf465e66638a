"""Notification latency: from the FHIR server's 201 for a new tumour-size Observation to
the updated RiskAssessment being readable, with ``clm-stratify serve`` subscribed to a
real SEKMET server (criteria rest-hook with payload).

    python -m benchmarks.bench_latency                 # 10 per second for 60 s
    python -m benchmarks.bench_latency --rate 10 --seconds 20

Each Observation goes to its own patient and changes that patient's group (20 mm ->
a 5x mm lesion on a later date), so "readable" means the RiskAssessment carries the new
group. Prints p50 / p95 / p99, and how many were lost (no update within the timeout) or
duplicated (more than one RiskAssessment, or more versions than updates).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from clm_stratify.cli import main as cli
from fhir_adapters.project import TAG_SYSTEM
from fhir_adapters.writeback.resources import assessment_id
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.local_server import LocalFhirServer
from tests.support.receiver_process import SECRET, Receiver

from benchmarks.bench_population import LOINC, SNOMED, UCUM, load

RULESET = ("clm-recurrence-resectability", "1.0.0")


def observation(pid: str, i: int) -> dict:
    return {"resourceType": "Observation", "id": f"lat-{i}", "status": "final",
            "subject": {"reference": f"Patient/{pid}"}, "code": {"coding": [{"system": LOINC, "code": "21889-1"}]},
            "effectiveDateTime": "2026-11-20", "bodySite": {"coding": [{"system": SNOMED, "code": "10200004"}]},
            "component": [{"code": {"coding": [{"system": LOINC, "code": "33728-7"}]},
                           "valueQuantity": {"value": 55, "unit": "mm", "system": UCUM, "code": "mm"}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10.0, help="Observations per second")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=30.0, help="after this an update counts as lost")
    args = ap.parse_args()
    n = int(args.rate * args.seconds)
    os.environ["CLM_SUBSCRIPTION_SECRET"] = SECRET
    with tempfile.TemporaryDirectory() as tmp, LocalFhirServer(data_dir=Path(tmp) / "fhir") as server:
        client = FhirClient(server.base_url)
        load(client, n)
        engine_ids = {f"bench-{i}": assessment_id(f"Patient/bench-{i}", RULESET[0]) for i in range(n)}
        assert cli(["run", "--fhir-url", server.base_url, "--all"]) == 0  # current assessments first
        with Receiver(server.base_url, Path(tmp) / "inbox.sqlite") as receiver:
            assert cli(["subscribe", "--fhir-url", server.base_url, "--endpoint", receiver.endpoint]) == 0
            created: dict[int, float] = {}
            seen: dict[int, float] = {}
            done = threading.Event()

            def watch() -> None:
                with FhirClient(server.base_url) as c:
                    while not done.is_set() or len(seen) < len(created):
                        for i, t0 in list(created.items()):
                            if i in seen:
                                continue
                            ra = c.read("RiskAssessment", engine_ids[f"bench-{i}"])
                            basis = {b["reference"].split("/_history/")[0] for b in (ra or {}).get("basis", [])}
                            if f"Observation/lat-{i}" in basis:
                                seen[i] = time.perf_counter()
                            elif time.perf_counter() - t0 > args.timeout:
                                seen[i] = float("nan")
                        time.sleep(0.01)
                        if done.is_set() and all(i in seen for i in created):
                            break

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            start = time.perf_counter()
            with FhirClient(server.base_url) as c:
                for i in range(n):
                    due = start + i / args.rate
                    time.sleep(max(0.0, due - time.perf_counter()))
                    c.update(observation(f"bench-{i}", i))
                    created[i] = time.perf_counter()  # the server answered 201
            done.set()
            watcher.join(args.timeout + 30)
            health = receiver.wait_idle(60)
            cli(["subscribe", "--fhir-url", server.base_url, "--remove"])
        latencies = [seen[i] - created[i] for i in created if seen.get(i) == seen.get(i)]
        lost = sum(1 for i in created if seen.get(i) != seen.get(i) or i not in seen)
        ras = list(client.search("RiskAssessment", {"_tag": f"{TAG_SYSTEM}|clm-stratify", "_count": "1000"}))
        per_patient: dict[str, int] = {}
        for ra in ras:
            per_patient[ra["subject"]["reference"]] = per_patient.get(ra["subject"]["reference"], 0) + 1
        duplicated = sum(c - 1 for c in per_patient.values() if c > 1)
        extra_versions = sum(1 for ra in ras if int(ra["meta"]["versionId"]) > 2)
        q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
        print(f"{n} Observations at {args.rate}/s for {args.seconds:.0f} s")
        print(f"latency 201 -> RiskAssessment updated: p50 {q[49] * 1000:.0f} ms, p95 {q[94] * 1000:.0f} ms, "
              f"p99 {q[98] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        print(f"lost {lost}, duplicated RiskAssessments {duplicated}, assessments with more versions than "
              f"updates {extra_versions}; receiver dead letters {health['dead_letters']}")


if __name__ == "__main__":
    main()
