"""Mapping benchmark: raw R4 JSON of a patient -> features, patients per second, and the
share of the time spent validating the resources with the fhir.resources R4B models.

    python -m benchmarks.bench_mapping            # 5 000 patients (the 37 fixtures, renamed)
    python -m benchmarks.bench_mapping --n 1000
"""

from __future__ import annotations

import argparse
import json
import time

from fhir_adapters.fhir.codec import loads
from fhir_adapters.sources.bundle import record_from_bundle
from fhir_adapters.fhir.load import fixture_bundles
from fhir_adapters.features.mapping import FeatureMapper
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR


def renamed(bundle: dict, suffix: str) -> bytes:
    """The bundle as raw JSON with every id and reference made unique."""
    text = json.dumps(bundle, default=str)
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

    t_parse = t_validate = t_map = 0.0
    for blob in raw:
        t = time.perf_counter()
        data = loads(blob)
        t_parse += time.perf_counter() - t
        t = time.perf_counter()
        record = record_from_bundle(data)  # validates every resource with the R4B models
        t_validate += time.perf_counter() - t
        t = time.perf_counter()
        mapper.map(record)
        t_map += time.perf_counter() - t
    total = t_parse + t_validate + t_map
    print(f"{args.n} patients, {resources:.1f} resources each on average")
    print(f"raw R4 JSON -> features: {args.n / total:.0f} patients/s ({total / args.n * 1e3:.2f} ms per patient)")
    print(f"  JSON parsing (decimals exact): {t_parse / total:6.1%}")
    print(f"  R4B model validation:          {t_validate / total:6.1%}")
    print(f"  mapping to features:           {t_map / total:6.1%}")


if __name__ == "__main__":
    main()
