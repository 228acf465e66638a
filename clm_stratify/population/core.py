"""The one population core: whole-patient records in, one output row per patient and kind
out. A pure function of the records, the rule set and the terminology (and the run's
timestamp, stamped on the assessments), used alike by the local path
(:mod:`clm_stratify.population.local`) and by Spark (:mod:`clm_stratify.population.spark`),
so the two cannot drift.

A record is a patient id and the NDJSON lines that belong to it (its own, and the shared
resources they reference), plus the lines no patient can be shown to own (they go to
every record as unattributable, see :mod:`fhir_adapters.sources.ndjson`).

Output kinds (each a directory of NDJSON files under the run's ``OUT``):

==================  ==========================================================
``classifications`` the engine's JSON result (README, "JSON output"), every patient
``features``        the mapped features (exact decimals), for re-stratification
``assessments``     a ``collection`` Bundle per assessed patient: the RiskAssessment
                    and its Provenance, written later by ``clm-stratify write-back``
``failures``        ``{"patient", "error"}``: a patient the core could not classify
==================  ==========================================================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from clm_stratify.pipeline import Rules
from engine.classify import Classification, Engine
from engine.features import NUMERIC_FEATURES as NUMBER_FACTS, Fact, Features
from engine.ruleset import RuleSet
from fhir_adapters.fhir.codec import dumps, loads
from fhir_adapters.fhir.reference import PatientIdentity, PatientRef
from fhir_adapters.features.mapping import FeatureMapper
from fhir_adapters.sources.ndjson import parse_line
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology
from fhir_adapters.writeback.resources import build_provenance, build_risk_assessment

KINDS = ("classifications", "features", "assessments", "failures")
#: How many patients are classified per engine call.
BATCH = 200


@dataclass(frozen=True)
class CoreConfig:
    """Everything a worker needs, as plain data (sent once to every Spark worker)."""

    ruleset: dict             # RuleSet.model_dump(mode="json")
    terminology: dict         # Terminology.model_dump(mode="json")
    occurrence: str           # the run's time: RiskAssessment.occurrenceDateTime, Provenance.recorded
    base: str | None = None   # the FHIR base the files came from (absolute references on it are local)

    @classmethod
    def of(cls, rules: Rules, occurrence: str, base: str | None = None) -> "CoreConfig":
        return cls(rules.engine.ruleset.model_dump(mode="json"), rules.terminology.model_dump(mode="json"),
                   occurrence, base.rstrip("/") if base else None)


@dataclass(frozen=True)
class Row:
    """One output line: its patient, kind, group (classifications only) and text."""

    patient: str
    kind: str
    group: str | None
    text: str


_rules_cache: dict[tuple[str, str], tuple[Rules, FeatureMapper]] = {}
_rules_lock = threading.Lock()


def rules_of(config: CoreConfig) -> tuple[Rules, FeatureMapper]:
    """The engine and mapper of a config, built once per process (durable-rules
    registration and the rule set's coverage check are not repeated per partition)."""
    key = (dumps(config.ruleset), dumps(config.terminology))
    with _rules_lock:
        hit = _rules_cache.get(key)
        if hit is None:
            terminology = Terminology.model_validate(config.terminology)
            rules = Rules(Engine(RuleSet.model_validate(config.ruleset)), terminology)
            hit = _rules_cache[key] = (rules, FeatureMapper(terminology))
        return hit


def classify_records(records: Iterable[tuple[str, list[str]]], config: CoreConfig,
                     broadcast: list[str] = ()) -> Iterator[Row]:
    """Rows for each ``(patient id, lines)`` record (see the module docstring)."""
    rules, mapper = rules_of(config)
    shared = [r for r in map(parse_line, sorted(set(broadcast))) if r is not None]
    batch: list[tuple[str, Features]] = []
    for pid, lines in records:
        try:
            batch.append((pid, _features(pid, lines, shared, mapper, config)))
        except Exception as exc:   # one patient's failure is that patient's row, never the partition's
            yield _failure(pid, exc)
        if len(batch) >= BATCH:
            yield from _classified(batch, rules.engine, config)
            batch = []
    if batch:
        yield from _classified(batch, rules.engine, config)


def classify_features(features: Iterable[Features], config: CoreConfig) -> Iterator[Row]:
    """Rows for features mapped earlier (re-stratification: no NDJSON, no mapping)."""
    rules, _ = rules_of(config)
    batch: list[tuple[str, Features]] = []
    for f in features:
        batch.append((_pid(f.patient), f))
        if len(batch) >= BATCH:
            yield from _classified(batch, rules.engine, config)
            batch = []
    if batch:
        yield from _classified(batch, rules.engine, config)


def _pid(reference: str | None) -> str:
    return (reference or "").removeprefix("Patient/")


def _features(pid: str, lines: list[str], shared: list[dict], mapper: FeatureMapper, config: CoreConfig) -> Features:
    own = [r for r in map(parse_line, sorted(set(lines))) if r is not None]
    patient = next((r for r in own if r["resourceType"] == "Patient" and r.get("id") == pid), None)
    identity = PatientIdentity.of_patient(patient, patient_id=pid, bases=[config.base] if config.base else [])
    features = mapper.map(PatientRecord.from_resources(own + shared, identity))
    reference = f"Patient/{pid}"
    return features if features.patient == reference else features.model_copy(update={"patient": reference})


def _classified(batch: list[tuple[str, Features]], engine: Engine, config: CoreConfig) -> Iterator[Row]:
    try:
        results = engine.classify_many([f for _, f in batch])
    except Exception:
        results = None   # find the patient it was: one at a time
    for i, (pid, features) in enumerate(batch):
        try:
            result = results[i] if results is not None else engine.classify(features)
            rows = _rows(pid, features, result, config)
        except Exception as exc:
            yield _failure(pid, exc)
            continue
        yield from rows


def _rows(pid: str, features: Features, result: Classification, config: CoreConfig) -> list[Row]:
    group = result.group if result.assessed else "no-recurrence"
    rows = [Row(pid, "classifications", group, dumps(result.to_json())),
            Row(pid, "features", None, features_line(features))]
    if result.assessed:
        ra = build_risk_assessment(result, occurrence=config.occurrence, check=False)
        provenance = build_provenance(ra, result, activity="CREATE", recorded=config.occurrence, check=False)
        rows.append(Row(pid, "assessments", None, dumps({
            "resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": ra}, {"resource": provenance}]})))
    return rows


def features_line(features: Features) -> str:
    """One ``features`` line: decimals as exact JSON numbers (``49.90`` stays ``49.90``)."""
    return dumps(features.model_dump())


_FACT_KEYS = frozenset(Fact.model_fields)
_FEATURE_KEYS = frozenset(Features.model_fields)


def features_of(line: str) -> Features:
    """A ``features`` line read back (decimals exact); pydantic.ValidationError or
    ValueError when it is not one. Strict: every field present as written (a missing
    ``lower_bound`` must not become an exact value), numbers as JSON numbers, the patient
    a ``Patient/<id>``."""
    data = loads(line)
    if not isinstance(data, dict) or set(data) != _FEATURE_KEYS:
        missing = sorted(_FEATURE_KEYS - set(data)) if isinstance(data, dict) else []
        raise ValueError(f"not the features of one patient (fields missing: {', '.join(missing) or 'none'}; "
                         f"unknown: {', '.join(sorted(set(data) - _FEATURE_KEYS)) if isinstance(data, dict) else '-'})")
    patient = data["patient"]
    if not isinstance(patient, str) or not patient.startswith("Patient/"):
        raise ValueError(f"patient: {patient!r} is not a Patient/<id> reference")
    PatientRef.parse(patient)
    for name in _FEATURE_KEYS - {"patient", "warnings"}:
        fact = data[name]
        if not isinstance(fact, dict) or set(fact) != _FACT_KEYS:
            raise ValueError(f"{name}: every fact has exactly {', '.join(sorted(_FACT_KEYS))}")
        if isinstance(fact["at_most"], str) or isinstance(fact["value"], str) and name in NUMBER_FACTS:
            raise ValueError(f"{name}: a number is written as a JSON number")
    return Features.model_validate(data)


def _failure(pid: str, exc: Exception) -> Row:
    return Row(pid, "failures", "failed", dumps({"patient": f"Patient/{pid}",
                                                 "error": f"{type(exc).__name__}: {exc}"[:2000]}))
