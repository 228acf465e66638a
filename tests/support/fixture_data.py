"""The fixture patients as test data for the integration tests: copies of the fixture
Bundles under other id prefixes, the patients that get a RiskAssessment, and one
tumour-size Observation per such patient (a notification's payload)."""

from __future__ import annotations

import functools
import json
import re

from engine.classify import Engine
from fhir_adapters.features.mapping import map_features
from fhir_adapters.fhir.client import loads
from fhir_adapters.fhir.reference import patient_of as patient_reference
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR


def _fixture_texts() -> list[str]:
    return [p.read_text() for p in sorted(FIXTURES_DIR.glob("[0-9][0-9]-*.json"))]


def bundles(prefixes: tuple[str, ...] = ("f",)) -> list[dict]:
    """The 37 fixture Bundles, once per prefix: ``g`` turns ``f05-pat`` into ``g05-pat``
    (every id and reference), so the population can span several chunks of 50."""
    out = []
    for prefix in prefixes:
        for text in _fixture_texts():
            out.append(loads(re.sub(r'(?<=["/])f(\d\d)-', prefix + r"\1-", text)))
    return out


@functools.cache
def _candidates() -> tuple[str, ...]:
    """Fixture patients with a liver recurrence (present or unconfirmed): they get an RA."""
    engine, terminology = Engine.default(), load_terminology()
    out = []
    for path in sorted(FIXTURES_DIR.glob("[0-9][0-9]-*.json")):
        r = engine.classify(map_features(read_bundle_file(path), terminology))
        if r.facts["liver_recurrence"].state != "absent":
            out.append(r.patient.split("/", 1)[1])
    return tuple(out)


def candidates(prefixes: tuple[str, ...] = ("f",)) -> set[str]:
    return {prefix + pid[1:] for prefix in prefixes for pid in _candidates()}


def tumour_observations() -> dict[str, dict]:
    """One tumour-size Observation per candidate patient (a notification's payload)."""
    out: dict[str, dict] = {}
    for b in bundles():
        for e in b["entry"]:
            r = e["resource"]
            if r["resourceType"] == "Observation" and "21889-1" in json.dumps(r.get("code")) or \
                    r["resourceType"] == "Observation" and "33728-7" in json.dumps(r.get("code")):
                pid = str(patient_reference(r) or "/").split("/", 1)[1]
                if pid in candidates() and pid not in out:
                    out[pid] = r
    return out
