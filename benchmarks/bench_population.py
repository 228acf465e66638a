"""Population benchmark: stratify N synthetic patients on a real SEKMET FHIR server.

    python -m benchmarks.bench_population                  # N = 1000 on loopback, 200 through the proxy
    python -m benchmarks.bench_population --n 10000        # the large run
    python -m benchmarks.bench_population --n 200 --proxy-n 100

(a) a naive client: one search per resource type per patient, one transaction per patient;
(b) the project's population path (``Stratifier.population``: Bulk Data $export when the
    server offers it, else searches covering many patients, transactions of 100 patients).
Both use the same client, mapping and engine, and write real RiskAssessments (each run
under its own rule-set version, so every run writes). Measured on loopback and through
a loopback proxy adding 20 ms each way (a remote server). Prints wall time, patients/s,
HTTP round trips per patient, the ratio (b)/(a), and this process's CPU time against the
wall time (SEKMET runs in its own process).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass

from clm_stratify.pipeline import Rules, Stratifier
from engine.classify import Engine
from engine.ruleset import load_ruleset
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.local_server import LocalFhirServer, free_port
from fhir_adapters.features.mapping import map_features
from fhir_adapters.sources.pull import Searches, _subject
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import load_terminology
from fhir_adapters.writeback.writer import AssessmentWriter

from benchmarks.bench_engine import rss_mib
from benchmarks.latency_proxy import LatencyProxy

SNOMED, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"


def synthetic_patient(i: int, rng: random.Random) -> list[dict]:
    pid = f"bench-{i}"
    ref = {"reference": f"Patient/{pid}"}
    out = [
        {"resourceType": "Patient", "id": pid, "gender": rng.choice(["female", "male"])},
        {"resourceType": "Condition", "id": f"{pid}-lm", "subject": ref, "onsetDateTime": "2024-03-01",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "active"}]},
         "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                            "code": "confirmed"}]},
         "code": {"coding": [{"system": SNOMED, "code": "94381002"}]}},
        {"resourceType": "Procedure", "id": f"{pid}-hx", "status": "completed", "subject": ref,
         "code": {"coding": [{"system": SNOMED, "code": "107963000"}]}, "performedDateTime": "2022-03-10"},
    ]
    for k in range(rng.randint(1, 6)):
        out.append({"resourceType": "Observation", "id": f"{pid}-ts{k}", "status": "final", "subject": ref,
                    "code": {"coding": [{"system": LOINC, "code": "21889-1"}]}, "effectiveDateTime": "2024-03-05",
                    "bodySite": {"coding": [{"system": SNOMED, "code": "10200004"}]},
                    "component": [{"code": {"coding": [{"system": LOINC, "code": "33728-7"}]},
                                   "valueQuantity": {"value": rng.randint(8, 80), "unit": "mm", "system": UCUM,
                                                     "code": "mm"}}]})
    if rng.random() < 0.2:
        out.append({"resourceType": "Condition", "id": f"{pid}-ehd", "subject": ref,
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                   "code": "active"}]},
                    "code": {"coding": [{"system": SNOMED, "code": "94391008"}]}})
    return out


def load(client: FhirClient, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    batch: list[dict] = []
    for i in range(n):
        batch += synthetic_patient(i, rng)
        if len(batch) >= 400 or i == n - 1:
            client.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                                for r in batch])
            batch = []


def engine_version(tag: str) -> Engine:
    """The default rule set under its own version: every run writes fresh assessments."""
    rs = load_ruleset()
    return Engine(type(rs).model_validate({**rs.model_dump(mode="json"), "version": f"9.{tag}.0"}))


def naive(client: FhirClient, engine: Engine, terminology) -> int:
    """One search per resource type per patient, one write per patient."""
    writer = AssessmentWriter(client)
    patients = {(_subject(c) or "").split("/", 1)[1]
                for c in client.search("Condition", Searches(terminology).recurrence_conditions())}
    for pid in sorted(patients):
        resources = [client.read("Patient", pid)]
        for rtype in ("Observation", "Condition", "Procedure", "MedicationAdministration", "MedicationStatement"):
            resources += list(client.search(rtype, {"patient": pid}))
        features = map_features(PatientRecord.from_resources([r for r in resources if r]), terminology)
        writer.write(engine.classify(features))
    return len(patients)


def project(client: FhirClient, engine: Engine, terminology) -> int:
    summary = Stratifier(client, Rules(engine, terminology)).population()
    assert not summary.failures, summary.failures[:3]
    return len(summary.results)


@dataclass
class Run:
    label: str
    patients: int
    wall: float
    cpu: float
    round_trips: int
    rss_mib: float

    def line(self) -> str:
        return (f"{self.label:34s} {self.patients:6d} patients {self.wall:8.2f} s {self.patients / self.wall:8.1f} "
                f"patients/s {self.round_trips / self.patients:7.3f} round trips/patient  "
                f"own CPU {self.cpu / self.wall:5.1%} of wall, RSS {self.rss_mib:.0f} MiB")


def measure(label: str, base_url: str, fn, tag: str, terminology) -> Run:
    engine = engine_version(tag)
    with FhirClient(base_url) as client:
        client.capabilities()
        client.round_trips = 0
        w, c = time.perf_counter(), time.process_time()
        n = fn(client, engine, terminology)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        return Run(label, n, wall, cpu, client.round_trips, rss_mib())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="patients on loopback (default 1000)")
    ap.add_argument("--proxy-n", type=int, default=200,
                    help="patients through the 20 ms proxy (default 200: the naive client needs ~7 round trips "
                         "of 40 ms per patient)")
    ap.add_argument("--delay", type=float, default=0.020, help="proxy delay each way, seconds")
    args = ap.parse_args()
    terminology = load_terminology()
    runs = []
    for label, n, delay in (("loopback", args.n, 0.0), (f"proxy {args.delay * 1000:.0f} ms each way", args.proxy_n, args.delay)):
        server_port, proxy_port = free_port(), free_port()
        # Behind the proxy the server names the proxy's address in its absolute URLs
        # (next links, $export status and files), as a remote server names its own.
        public = f"http://127.0.0.1:{proxy_port}/fhir" if delay else None
        with tempfile.TemporaryDirectory() as tmp, LatencyProxy("127.0.0.1", server_port, delay, proxy_port), \
                LocalFhirServer(data_dir=tmp, port=server_port, public_url=public) as server:
            base = server.base_url
            with FhirClient(base) as c:
                t = time.perf_counter()
                load(c, n)
                print(f"[{label}] loaded {n} synthetic patients in {time.perf_counter() - t:.1f} s")
            a = measure(f"(a) naive, {label}", base, naive, f"{len(runs)}1", terminology)
            b = measure(f"(b) project, {label}", base, project, f"{len(runs)}2", terminology)
            for r in (a, b):
                print(r.line())
            print(f"ratio (b)/(a) speed on {label}: {a.wall / b.wall:.1f}x faster; round trips "
                  f"{b.round_trips / b.patients:.3f} vs {a.round_trips / a.patients:.3f} per patient")
            runs += [a, b]


if __name__ == "__main__":
    main()
