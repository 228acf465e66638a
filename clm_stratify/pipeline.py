"""From a FHIR server to a RiskAssessment: pull -> map -> classify -> write back.

This is the whole path of one patient (and of one Subscription notification, which
resolves to a patient and calls :meth:`Stratifier.patient`):

1. ``fhir_adapters.sources.pull``      fetch the patient's resources (one batch round trip)
2. ``fhir_adapters.features.mapping``   resources -> typed features
3. ``engine.classify``         features -> classification (durable-rules)
4. ``fhir_adapters.writeback.writer`` RiskAssessment + Provenance, idempotent

A patient with no liver recurrence in the record gets no RiskAssessment
(``no-recurrence``); one whose recurrence is unconfirmed gets an indeterminate one.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from engine.classify import Classification, Engine
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.features.mapping import map_features
from fhir_adapters.sources.bulk import Spool, export_to_spool
from fhir_adapters.sources.pull import (fetch_patient, fetch_population, mentions_metastasis, patient_record,
                                patients_with_liver_metastasis)
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology
from fhir_adapters.writeback.writer import AssessmentWriter, WriteResult


@dataclass
class PatientOutcome:
    patient_id: str
    action: str                       # created | updated | unchanged | would-create | would-update | no-recurrence | failed
    group: str | None = None
    status: str | None = None
    risk_assessment: str | None = None
    error: str | None = None
    classification: Classification | None = None
    written: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.action == "failed"


@dataclass
class RunSummary:
    outcomes: list[PatientOutcome] = field(default_factory=list)

    @property
    def groups(self) -> Counter:
        return Counter(o.group for o in self.outcomes if o.group)

    @property
    def actions(self) -> Counter:
        return Counter(o.action for o in self.outcomes)

    @property
    def failures(self) -> list[PatientOutcome]:
        return [o for o in self.outcomes if o.failed]


class Stratifier:
    """Classifies patients on one FHIR server and writes their RiskAssessments."""

    def __init__(self, client: FhirClient, engine: Engine, terminology: Terminology, *,
                 dry_run: bool = False, writer: AssessmentWriter | None = None):
        self.client = client
        self.engine = engine
        self.terminology = terminology
        self.dry_run = dry_run
        self.writer = writer or AssessmentWriter(client)
        self.last_source: str | None = None   # how the last population run read its data
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, patient_id: str) -> threading.Lock:
        """One writer per patient at a time (conditional writes can race on some servers)."""
        with self._locks_guard:
            return self._locks.setdefault(patient_id, threading.Lock())

    def _features(self, patient_id: str, record: PatientRecord):
        features = map_features(record, self.terminology)
        if features.patient != f"Patient/{patient_id}":
            features = features.model_copy(update={"patient": f"Patient/{patient_id}"})
        return features

    def classify_record(self, patient_id: str, record: PatientRecord) -> Classification:
        return self.engine.classify(self._features(patient_id, record))

    def classify_records(self, records: list[tuple[str, PatientRecord]]) -> list[Classification]:
        """Many patients through the engine in one batch per stage."""
        return self.engine.classify_many([self._features(pid, record) for pid, record in records])

    def patient(self, patient_id: str) -> PatientOutcome:
        """Pull, classify and write one patient. FHIR errors become a failed outcome."""
        with self._lock(patient_id):
            try:
                resources = fetch_patient(self.client, patient_id, self.terminology)
                if not resources:
                    return PatientOutcome(patient_id, "failed", error=f"Patient/{patient_id}: no such patient "
                                                                       "and no data on the server")
                result = self.classify_record(patient_id, patient_record(self.client, patient_id, resources))
                if not result.assessed:
                    return _outcome(patient_id, result, None)
                return _outcome(patient_id, result, self.writer.write(result, dry_run=self.dry_run))
            except FhirError as exc:
                return PatientOutcome(patient_id, "failed", error=str(exc))

    def population(self, patient_ids: list[str] | None = None, *, chunk: int = 100,
                   progress: Callable[[int, int], None] | None = None, bulk: bool | None = None) -> RunSummary:
        """Every patient with a liver-metastasis Condition (or ``patient_ids``).

        With Bulk Data ``$export`` on the server (``bulk`` None: when the
        CapabilityStatement offers it), the cohort's data comes in one export, spooled
        to disk; otherwise ``chunk`` patients per search. Either way the patients are
        classified and written ``chunk`` at a time (one read batch and one transaction
        per chunk); a failure is reported per patient and the others go on.
        """
        if patient_ids is None and (bulk if bulk is not None else self.client.capabilities().export):
            with Spool(base=self.client.base_url) as spool:
                export_to_spool(self.client, self.terminology, spool)
                self.last_source = "bulk-export"
                ids = spool.patients()  # every exported patient; the cohort is filtered as it streams
                cohort = ((pid, record) for pid, record in spool.records(ids)
                          if mentions_metastasis(record, self.terminology))
                return self._run(cohort, len(ids), chunk, progress)
        ids = patient_ids if patient_ids is not None else patients_with_liver_metastasis(self.client, self.terminology)
        self.last_source = "search"
        return self._run(fetch_population(self.client, ids, self.terminology, chunk), len(ids), chunk, progress)

    def _run(self, records: Iterable[tuple[str, PatientRecord | FhirError]], total: int, chunk: int,
             progress: Callable[[int, int], None] | None) -> RunSummary:
        summary = RunSummary()
        done = 0
        for batch in _chunks(records, chunk):
            to_write: list[tuple[str, Classification]] = []
            readable = [(pid, record) for pid, record in batch if not isinstance(record, FhirError)]
            for pid, record in batch:
                if isinstance(record, FhirError):
                    summary.outcomes.append(PatientOutcome(pid, "failed", error=str(record)))
            for (pid, _), result in zip(readable, self.classify_records(readable)):
                if not result.assessed:
                    summary.outcomes.append(_outcome(pid, result, None))
                else:
                    to_write.append((pid, result))
            if to_write:
                try:
                    written = self.writer.write_many([r for _, r in to_write], dry_run=self.dry_run)
                except FhirError as exc:
                    written = [WriteResult(r.patient, "failed", error=str(exc)) for _, r in to_write]
                for (pid, result), w in zip(to_write, written):
                    summary.outcomes.append(_outcome(pid, result, w))
            done += len(batch)
            if progress:
                progress(min(done, total), total)
        if progress and done < total:
            progress(total, total)  # the cohort was smaller than the export
        return summary


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _outcome(patient_id: str, result: Classification, write: WriteResult | None) -> PatientOutcome:
    if write is None:
        return PatientOutcome(patient_id, "no-recurrence", result.group, result.status, classification=result)
    return PatientOutcome(patient_id, write.action, result.group, result.status, write.risk_assessment,
                          write.error, result, write.resources)
