"""Mapping benchmark: raw R4 JSON of a patient -> features, patients per second, with
fhir.resources' full R4B models (before) and with the fast models of what the mapping
reads (after, the default), and the share of each step.

    python -m benchmarks.bench_mapping            # 5 000 patients (the fixtures, renamed)
    python -m benchmarks.bench_mapping --n 1000

Both paths run on the same raw JSON and the same mapping code, alternating in blocks of
100 patients (a busy machine slows both alike), and must give the same features
(checked, not timed). The fixtures are written with their decimals as JSON numbers (a
decimal written as a string is unreadable, so it would measure the refusal path).
"""

from __future__ import annotations

import argparse
import time

from fhir_adapters.fhir.codec import dumps, loads
from fhir_adapters.sources.bundle import record_from_bundle
from fhir_adapters.fhir.load import fixture_bundles
from fhir_adapters.features.mapping import FeatureMapper
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR

BLOCK = 100


def renamed(bundle: dict, suffix: str) -> bytes:
    """The bundle as raw JSON (decimals as the exact JSON numbers) with every id and
    reference made unique."""
    text = dumps(bundle)
    for entry in bundle["entry"]:
        rid = entry["resource"]["id"]
        text = text.replace(f'"{rid}"', f'"{rid}-{suffix}"').replace(f'/{rid}"', f'/{rid}-{suffix}"')
    return text.encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    bundles = fixture_bundles(FIXTURES_DIR)
    raw = [renamed(bundles[i % len(bundles)], str(i)) for i in range(args.n)]
    mapper = FeatureMapper(load_terminology())
    resources = sum(len(loads(r)["entry"]) for r in raw[: len(bundles)]) / len(bundles)

    times = {full: [0.0, 0.0, 0.0] for full in (True, False)}   # parse, validate, map
    for start in range(0, args.n, BLOCK):
        block = raw[start:start + BLOCK]
        out: dict[bool, list] = {}
        for full in (True, False):
            step, out[full] = times[full], []
            for blob in block:
                t0 = time.perf_counter()
                data = loads(blob)
                t1 = time.perf_counter()
                record = record_from_bundle(data, full_models=full)
                t2 = time.perf_counter()
                out[full].append(mapper.map(record))
                t3 = time.perf_counter()
                step[0] += t1 - t0
                step[1] += t2 - t1
                step[2] += t3 - t2
        for before, after in zip(out[True], out[False]):
            if before != after:
                raise SystemExit(f"the fast models and the R4B models disagree on {before.patient}")

    print(f"{args.n} patients, {resources:.1f} resources each on average; raw R4 JSON -> features")
    rate = {}
    for full, label in ((True, "before: fhir.resources R4B models"),
                        (False, "after: fast models of what the mapping reads")):
        parse, validate, mapping = times[full]
        total = parse + validate + mapping
        rate[full] = args.n / total
        print(f"{label}: {rate[full]:.0f} patients/s ({total / args.n * 1e6:.0f} us per patient; "
              f"validation + mapping {args.n / (validate + mapping):.0f} patients/s)")
        print(f"  JSON parsing (decimals exact): {parse / total:6.1%}  ({parse / args.n * 1e6:5.0f} us)")
        print(f"  validation (record):           {validate / total:6.1%}  ({validate / args.n * 1e6:5.0f} us)")
        print(f"  mapping to features:           {mapping / total:6.1%}  ({mapping / args.n * 1e6:5.0f} us)")
    v_full, v_fast = times[True][1] + times[True][2], times[False][1] + times[False][2]
    print(f"after / before: {rate[False] / rate[True]:.1f}x end to end, {v_full / v_fast:.1f}x validation + mapping")


if __name__ == "__main__":
    main()
