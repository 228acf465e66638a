"""The one pipeline: fetch -> map -> classify -> write back. Every command uses it.

The whole path of one patient (and of one Subscription notification, which the
receiver's worker resolves to a patient and passes to :meth:`Stratifier.patient`):

1. fetch     ``fhir_adapters.sources.pull``        the patient's resources (one batch round trip)
2. map       ``fhir_adapters.features``            resources -> typed features
3. classify  ``engine.classify``                   features -> classification (durable-rules)
4. write     ``fhir_adapters.writeback.writer``    RiskAssessment + Provenance, idempotent

``classify`` on a Bundle file runs steps 2-3 (:func:`evaluate`); ``run``, ``demo``,
``serve`` and ``interop`` run all four through a :class:`Stratifier`.

The rule set and the terminology are one immutable :class:`Rules` pair: an evaluation
takes the pair once, at its start, so a reload (``serve`` on SIGHUP) can never give a
patient the engine of one version and the codes of another.

A patient with no liver recurrence in the record gets no RiskAssessment
(``no-recurrence``); one whose recurrence is unconfirmed gets an indeterminate one. A
patient the server does not have (``Patient/<id>`` answers 404 or 410 and no resource
names it) is ``not-found``: a failure, with an error saying so.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from engine.classify import Classification, Engine
from engine.features import Features
from fhir_adapters.features.mapping import map_features
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.sources.bulk import Spool, export_to_spool
from fhir_adapters.sources.pull import (fetch_patient, fetch_population, mentions_metastasis, patient_record,
                                        patients_with_liver_metastasis)
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology, load_terminology
from fhir_adapters.writeback.writer import AssessmentWriter, WriteNotIdempotent, WriteResult

__all__ = ["Rules", "evaluate", "Stratifier", "PatientResult", "RunSummary"]


@dataclass(frozen=True)
class Rules:
    """The rule set (compiled into an engine) and the terminology, used together."""

    engine: Engine
    terminology: Terminology

    @classmethod
    def load(cls, rules: str | Path | None = None, terminology: str | Path | None = None) -> "Rules":
        """Both files (None: the project's own), each checked; raises on the first bad one."""
        return cls(Engine.from_file(rules), load_terminology(terminology))


def evaluate(record: PatientRecord, rules: Rules, patient: PatientRef | None = None) -> Classification:
    """Map one patient's record and classify it (steps 2-3). ``patient`` names the
    result when the record was fetched for a known patient."""
    return rules.engine.classify(_features(record, rules, patient))


def _features(record: PatientRecord, rules: Rules, patient: PatientRef | None) -> Features:
    features = map_features(record, rules.terminology)
    if patient is not None and features.patient != patient.reference:
        features = features.model_copy(update={"patient": patient.reference})
    return features


@dataclass
class PatientResult:
    """What the pipeline did for one patient."""

    patient: PatientRef
    action: str                       # created | updated | unchanged | would-create | would-update | no-recurrence
                                      # | failed | not-found
    group: str | None = None
    status: str | None = None
    risk_assessment: str | None = None
    error: str | None = None
    classification: Classification | None = None
    written: list[dict] = field(default_factory=list)
    cause: Exception | None = field(default=None, repr=False, compare=False)   # the FhirError behind ``error``

    @property
    def failed(self) -> bool:
        return self.action in NOT_DONE

    @property
    def assessed(self) -> bool:
        """Classified and given (or, in a dry run, would be given) a RiskAssessment."""
        return self.action not in NOT_DONE and self.action != "no-recurrence"


# Actions of a patient that was not classified, or whose assessment was not written.
NOT_DONE = ("failed", "not-found")


@dataclass
class RunSummary:
    """The results of a run. Every patient is counted once: ``groups`` (assessed patients
    only) + ``no-recurrence`` + failures = :attr:`total`."""

    results: list[PatientResult] = field(default_factory=list)

    @property
    def groups(self) -> Counter:
        """Assessed patients per group (no-recurrence and failed patients are not in it)."""
        return Counter(r.group for r in self.results if r.assessed and r.group)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def actions(self) -> Counter:
        return Counter(r.action for r in self.results)

    @property
    def failures(self) -> list[PatientResult]:
        return [r for r in self.results if r.failed]


class Stratifier:
    """Classifies patients on one FHIR server and writes their RiskAssessments."""

    def __init__(self, client: FhirClient, rules: Rules, *, dry_run: bool = False,
                 writer: AssessmentWriter | None = None):
        self.client = client
        self.rules = rules                    # swapped whole by a reload, never in parts
        self.dry_run = dry_run
        self.writer = writer or AssessmentWriter(client)
        self.last_source: str | None = None   # how the last population run read its data
        self._locks: dict[PatientRef, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, patient: PatientRef) -> threading.Lock:
        """One writer per patient at a time (conditional writes can race on some servers)."""
        with self._locks_guard:
            return self._locks.setdefault(patient, threading.Lock())

    def patient(self, patient: PatientRef) -> PatientResult:
        """Fetch, map, classify and write one patient. FHIR errors become a failed result."""
        rules = self.rules
        with self._lock(patient):
            try:
                resources = fetch_patient(self.client, patient, rules.terminology)
                if not resources:   # Patient/<id> answered 404 or 410, and no resource names it
                    return PatientResult(patient, "not-found", error=f"no patient {patient} on {self.client.base_url}")
                result = evaluate(patient_record(self.client, patient, resources), rules, patient)
                if not result.assessed:
                    return _result(patient, result, None)
                return _result(patient, result, self.writer.write(result, dry_run=self.dry_run))
            except WriteNotIdempotent:
                raise   # every later write would be a duplicate: stop, do not report it per patient
            except FhirError as exc:
                return PatientResult(patient, "failed", error=str(exc), cause=exc)

    def population(self, patients: list[PatientRef] | None = None, *, chunk: int = 100,
                   progress: Callable[[int, int], None] | None = None, bulk: bool | None = None) -> RunSummary:
        """Every patient with a liver-metastasis Condition (or ``patients``).

        With Bulk Data ``$export`` on the server (``bulk`` None: when the
        CapabilityStatement offers it), the cohort's data comes in one export, spooled
        to disk; otherwise ``chunk`` patients per search. Either way the patients are
        classified and written ``chunk`` at a time (one read batch and one transaction
        per chunk); a failure is reported per patient and the others go on.
        ``progress(done, total)``: ``total`` is the cohort, the number of results.
        """
        rules = self.rules
        if patients is None and (bulk if bulk is not None else self.client.capabilities().export):
            with Spool(base=self.client.base_url) as spool:
                export_to_spool(self.client, rules.terminology, spool)
                self.last_source = "bulk-export"
                # The export holds every patient with a mapped resource; the cohort (a metastasis
                # Condition) is found first, so that progress counts what the run reports.
                cohort = [ref for ref, record in spool.records(spool.patients())
                          if mentions_metastasis(record, rules.terminology)]
                return self._run(rules, spool.records(cohort), len(cohort), chunk, progress)
        if patients is None:
            patients = patients_with_liver_metastasis(self.client, rules.terminology)
        self.last_source = "search"
        return self._run(rules, fetch_population(self.client, patients, rules.terminology, chunk), len(patients),
                         chunk, progress)

    def _run(self, rules: Rules, records: Iterable[tuple[PatientRef, PatientRecord | FhirError]], total: int,
             chunk: int, progress: Callable[[int, int], None] | None) -> RunSummary:
        summary = RunSummary()
        done = 0
        for batch in _chunks(records, chunk):
            to_write: list[tuple[PatientRef, Classification]] = []
            readable = [(ref, record) for ref, record in batch if not isinstance(record, FhirError)]
            for ref, record in batch:
                if isinstance(record, FhirError):
                    summary.results.append(PatientResult(ref, "failed", error=str(record)))
            features = [_features(record, rules, ref) for ref, record in readable]
            for (ref, _), result in zip(readable, rules.engine.classify_many(features)):
                if not result.assessed:
                    summary.results.append(_result(ref, result, None))
                else:
                    to_write.append((ref, result))
            if to_write:
                try:
                    written = self.writer.write_many([r for _, r in to_write], dry_run=self.dry_run)
                except WriteNotIdempotent:
                    raise
                except FhirError as exc:
                    written = [WriteResult(r.patient, "failed", error=str(exc)) for _, r in to_write]
                for (ref, result), w in zip(to_write, written):
                    summary.results.append(_result(ref, result, w))
            done += len(batch)
            if progress:
                progress(done, total)
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


def _result(patient: PatientRef, result: Classification, write: WriteResult | None) -> PatientResult:
    if write is None:
        return PatientResult(patient, "no-recurrence", result.group, result.status, classification=result)
    return PatientResult(patient, write.action, result.group, result.status, write.risk_assessment,
                         write.error, result, write.resources)
