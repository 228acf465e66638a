"""Population scale: per-core cost of the local path (before/after), Spark local[2]
against it (fixed and per-patient cost), and re-stratification from features.

    python -m benchmarks.bench_scale                      # 20 000 patients local, Spark at 2 000 and 20 000
    python -m benchmarks.bench_scale --n 50000 --spark-n 5000 50000
    python -m benchmarks.bench_scale --no-spark

All on one core unless said (the local path runs in this process; Spark local[2] uses
both cores). Figures are printed with the baseline measured in the same run:

(a) before: the path as it was before the scale work: every resource validated with the
    full fhir.resources R4B models, the RiskAssessment and Provenance validated as they
    are built, the exact pure-Python JSON encoder;
(b) after: the population core as it runs (fast typed models for what the mapping
    reads, the C JSON encoder, assessments validated at write-back);
(c) Spark local[2] on the same input, at two sizes: fixed cost = the intercept, per
    patient cost = the slope;
(d) re-stratification from features (no NDJSON, no mapping);
(e) write-back of the assessments to a SEKMET server on loopback (holding the same
    patients), with 1 and 4 writers, and once more (everything unchanged).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from clm_stratify.pipeline import Rules
from clm_stratify.population import restratify, run_population
from clm_stratify.population.core import CoreConfig, classify_records
from clm_stratify.population.local import LineSpool, gather
from clm_stratify.population.output import Summary
from fixtures.population import BASE, write_ndjson

WHEN = "2026-12-01T00:00:00+00:00"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def records_of(source: Path, rules: Rules) -> tuple[list, list, float]:
    """The whole-patient records of ``source`` (read once, kept in memory for the timing)."""
    spool = LineSpool()
    try:
        t = time.perf_counter()
        broadcast = gather([str(source)], rules.terminology, spool, Summary(), BASE)
        records = list(spool.records())
        return records, broadcast, time.perf_counter() - t
    finally:
        spool.close()


def before(records: list, rules: Rules) -> int:
    """(a): the pre-scale path, per patient (see the module docstring)."""
    from fhir_adapters.fhir import codec
    from fhir_adapters.fhir.reference import PatientIdentity
    from fhir_adapters.features.mapping import FeatureMapper
    from fhir_adapters.sources.record import PatientRecord, add_distinct
    from fhir_adapters.writeback.resources import build_provenance, build_risk_assessment

    mapper = FeatureMapper(rules.terminology)
    out = 0
    batch = []
    for pid, lines in records:
        resources = [codec.loads(line) for line in sorted(set(lines))]
        patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
        record = PatientRecord(PatientIdentity.of_patient(patient, patient_id=pid, bases=[BASE]), full_models=True)
        add_distinct(record, [(r, None) for r in resources])
        batch.append(mapper.map(record))
        if len(batch) == 200 or pid == records[-1][0]:
            for f, c in zip(batch, rules.engine.classify_many(batch)):
                text = _slow_dumps(codec, c.to_json()) + _slow_dumps(codec, f.model_dump())
                if c.assessed:
                    ra = build_risk_assessment(c, occurrence=WHEN)
                    text += _slow_dumps(codec, [ra, build_provenance(ra, c, activity="CREATE", recorded=WHEN)])
                out += len(text)
            batch = []
    return out


def _slow_dumps(codec, obj) -> str:
    parts: list[str] = []
    codec._encode(obj, parts.append)
    return "".join(parts)


def after(records: list, broadcast: list, config: CoreConfig) -> int:
    return sum(len(r.text) for r in classify_records(records, config, broadcast))


def write_back_figures(root: Path, rules: Rules, n: int) -> None:
    import random

    from clm_stratify.population.writeback import write_back
    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.local_server import LocalFhirServer
    from fixtures.population import MEDICATIONS, patient_resources

    src = root / f"wb-in-{n}"
    write_ndjson(src, n, seed=9)
    run_population([str(src)], str(root / f"wb-{n}"), rules, base=BASE, occurrence=WHEN)
    for writers in (1, 4):
        with LocalFhirServer(data_dir=root / f"wb-sekmet-{writers}") as srv:
            with FhirClient(srv.base_url) as c:
                rng = random.Random(9)
                batch = list(MEDICATIONS)
                for i in range(n):
                    batch += patient_resources(i, rng)
                for start in range(0, len(batch), 500):
                    c.transaction([{"resource": r, "request": {"method": "PUT",
                                                               "url": f"{r['resourceType']}/{r['id']}"}}
                                   for r in batch[start:start + 500]])
            for journal in (root / f"wb-{n}" / "write-back").glob("*") if (root / f"wb-{n}" / "write-back").exists() else []:
                journal.unlink()
            t, s = timed(write_back, root / f"wb-{n}", lambda: FhirClient(srv.base_url), max_writers=writers)
            written = sum(s.actions.values())
            print(f"(e) write-back, {writers} writer(s): {written} assessments in {t:.1f} s "
                  f"({written / t:.0f}/s; {dict(s.actions)})")
            for journal in (root / f"wb-{n}" / "write-back").glob("*"):
                journal.unlink()
            t2, s2 = timed(write_back, root / f"wb-{n}", lambda: FhirClient(srv.base_url), max_writers=writers)
            print(f"    again (nothing changed): {t2:.1f} s ({dict(s2.actions)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="patients for the local path (default 20 000)")
    ap.add_argument("--before-n", type=int, default=2_000, help="patients for the 'before' path (default 2 000)")
    ap.add_argument("--spark-n", type=int, nargs=2, default=(2_000, 20_000), metavar=("SMALL", "LARGE"))
    ap.add_argument("--no-spark", action="store_true")
    ap.add_argument("--write-back-n", type=int, default=2_000, help="patients for (e), 0 to skip (default 2 000)")
    args = ap.parse_args()
    rules = Rules.load()
    config = CoreConfig.of(rules, WHEN, BASE)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        counts = write_ndjson(root / "in", args.n, seed=3)
        print(f"input: {args.n} synthetic patients, {sum(counts.values())} resources "
              f"({sum(counts.values()) / args.n:.1f} per patient; laboratory Observations included)")
        records, broadcast, t_gather = records_of(root / "in", rules)
        classify_records(records[:50], config, broadcast).__next__()   # engine registration, caches
        n_before = min(args.before_n, len(records))
        t_a, _ = timed(before, records[:n_before], rules)
        t_b, _ = timed(after, records, broadcast, config)
        per_a, per_b = t_a / n_before, t_b / len(records)
        print(f"(a) before, records -> outputs:   {1 / per_a:8.0f} patients/s per core ({per_a * 1e6:7.0f} us/patient, "
              f"{n_before} patients)")
        print(f"(b) after,  records -> outputs:   {1 / per_b:8.0f} patients/s per core ({per_b * 1e6:7.0f} us/patient, "
              f"{len(records)} patients)")
        print(f"    ratio (b)/(a): {per_a / per_b:.1f}x")
        print(f"    reading NDJSON, keying and spooling: {t_gather / len(records) * 1e6:.0f} us/patient")
        t_local, summary = timed(run_population, [str(root / "in")], str(root / "local"), rules, base=BASE,
                                 occurrence=WHEN)
        print(f"(b) end to end, NDJSON -> OUT, one process: {args.n / t_local:8.0f} patients/s "
              f"({t_local:.1f} s; {t_local / args.n * 1e6:.0f} us/patient)")
        t_two, _ = timed(run_population, [str(root / "in")], str(root / "local2"), rules, base=BASE, workers=2,
                         occurrence=WHEN)
        print(f"    end to end, 2 processes:                   {args.n / t_two:8.0f} patients/s ({t_two:.1f} s)")
        t_re, _ = timed(restratify, str(root / "local" / "features"), str(root / "re"), rules, occurrence=WHEN)
        print(f"(d) re-stratification from features: {args.n / t_re:8.0f} patients/s ({t_re:.1f} s; "
              f"{t_re / args.n * 1e6:.0f} us/patient)  vs NDJSON end to end {t_local / t_re:.1f}x faster")
        if args.write_back_n:
            write_back_figures(root, rules, args.write_back_n)
        if args.no_spark:
            return
        small, large = args.spark_n
        warm = root / "spark-warm"
        write_ndjson(warm, 200, seed=4)
        t_warm, _ = timed(run_population, [str(warm)], str(root / "spark-warm-out"), rules, master="local[2]",
                          base=BASE, occurrence=WHEN)
        print(f"(c) Spark local[2] first run (JVM start, 200 patients): {t_warm:.1f} s (not counted below)")
        walls = []
        for n in (small, large):
            src = root / f"spark-in-{n}"
            write_ndjson(src, n, seed=3)
            t_spark, _ = timed(run_population, [str(src)], str(root / f"spark-{n}"), rules, master="local[2]",
                               base=BASE, occurrence=WHEN)
            t_loc, _ = timed(run_population, [str(src)], str(root / f"local-{n}"), rules, base=BASE, occurrence=WHEN)
            walls.append((n, t_spark, t_loc))
            print(f"(c) {n:6d} patients: Spark local[2] {t_spark:6.1f} s, local one process {t_loc:6.1f} s "
                  f"(ratio {t_loc / t_spark:.2f})")
        (n1, s1, _), (n2, s2, _) = walls
        slope = (s2 - s1) / (n2 - n1)
        print(f"    Spark local[2]: fixed cost {s1 - slope * n1:.1f} s, per patient {slope * 1e6:.0f} us "
              f"({1 / slope:.0f} patients/s on 2 cores)")


if __name__ == "__main__":
    main()
