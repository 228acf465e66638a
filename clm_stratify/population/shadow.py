"""The inputs of a shadow run (``clm-stratify rules diff``): the features of a population,
mapped once, from Bundle files, from a FHIR server (read only), or from a population
run's ``OUT/features``. Nothing here writes: no RiskAssessment, no file.

A patient whose data cannot be read (a failed search) is a failure, never compared on a
partial record; a file that cannot be read stops the run (the caller's exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.features import Features
from fhir_adapters.features.mapping import map_features
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.sources.bundle import BundleError, read_bundle_file
from fhir_adapters.sources.pull import fetch_patient, fetch_population, patient_record, patients_with_liver_metastasis
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology

__all__ = ["ShadowInput", "from_bundles", "from_server", "from_features"]


@dataclass
class ShadowInput:
    """The features to classify twice, what they came from, and the patients that failed."""

    source: str
    features: list[Features] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)   # (patient, error)
    notes: list[str] = field(default_factory=list)


def _mapped(record: PatientRecord, terminology: Terminology, patient: str | None = None) -> Features:
    features = map_features(record, terminology)
    if patient is not None and features.patient != patient:
        features = features.model_copy(update={"patient": patient})
    return features


def bundle_files(paths: list[str]) -> list[Path]:
    """``--bundle``: each a file, or a directory of ``*.json`` Bundle files (not recursive)."""
    files: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = sorted(x for x in p.glob("*.json") if x.is_file())
            if not found:
                raise BundleError(f"{p}: no *.json Bundle files in this directory")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise BundleError(f"{p}: file not found")
    return list(dict.fromkeys(files))


def from_bundles(paths: list[str], terminology: Terminology) -> ShadowInput:
    """Each Bundle file one patient's record (as ``classify --bundle`` reads it). A file
    that cannot be read, or a patient in two files, raises BundleError naming it."""
    files = bundle_files(paths)
    result = ShadowInput(f"{', '.join(paths)} ({len(files)} Bundle file{'s' if len(files) != 1 else ''})")
    seen: dict[str, Path] = {}
    for path in files:
        features = _mapped(read_bundle_file(path), terminology)
        key = features.patient or str(path)
        if key in seen:
            raise BundleError(f"{path}: {key} is also in {seen[key]}: give each patient once")
        seen[key] = path
        result.features.append(features if features.patient else features.model_copy(update={"patient": key}))
    return result


def from_server(client: FhirClient, terminology: Terminology, patients: list[PatientRef] | None = None,
                chunk: int = 50) -> ShadowInput:
    """Every patient with a liver-metastasis Condition (``run --all``'s cohort, read by
    search, never by ``$export``, which starts a job on the server), or ``patients``.
    Reads only. FhirError from the cohort search propagates (the server cannot be used);
    a patient whose data fails to load is a failure."""
    who = "every patient with a liver-metastasis Condition" if patients is None else f"{len(patients)} patient(s)"
    result = ShadowInput(f"{client.base_url} ({who})")
    if patients is None:
        for ref, record in fetch_population(client, patients_with_liver_metastasis(client, terminology),
                                            terminology, chunk):
            if isinstance(record, FhirError):
                result.failures.append((ref.reference, str(record)))
            else:
                result.features.append(_mapped(record, terminology, ref.reference))
        return result
    for ref in patients:
        try:
            resources = fetch_patient(client, ref, terminology)
            if not resources:   # Patient/<id> answered 404 or 410, and no resource names it (as run says)
                result.failures.append((ref.reference, f"no patient {ref} on {client.base_url}"))
                continue
            result.features.append(_mapped(patient_record(client, ref, resources), terminology, ref.reference))
        except FhirError as exc:
            result.failures.append((ref.reference, str(exc)))
    return result


def from_features(path: str, terminology: Terminology) -> ShadowInput:
    """The features of a finished population run (``OUT`` or ``OUT/features``), read back
    exactly. Refused (InputError) when they were mapped with another terminology, or the
    files do not hold what the manifest says."""
    from clm_stratify.population import checked_features_run, stored_features

    run, manifest = checked_features_run(path, terminology)
    result = ShadowInput(f"{run}/features (population run of {manifest.get('created')})")
    result.features.extend(stored_features(run))
    ruleset = manifest.get("ruleset") or {}
    result.notes.append(f"the run was classified with {ruleset.get('id')} {ruleset.get('version')} "
                        f"(sha256 {str(ruleset.get('sha256'))[:12]})")
    return result
