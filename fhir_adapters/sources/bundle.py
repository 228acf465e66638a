"""Read a FHIR Bundle (file or parsed JSON) and take one patient's record from it.

JSON numbers are read as Decimal so sizes such as 49.9 mm or 0.05 m stay exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from fhir_adapters.fhir.codec import loads
from fhir_adapters.sources.record import PatientRecord, add_distinct
from fhir_adapters.fhir.reference import PatientIdentity, patient_of, plain_ref

ACCEPTED_BUNDLE_TYPES = ("collection", "searchset", "transaction", "batch", "document", "history")


class BundleError(ValueError):
    """The input is not a usable single-patient Bundle; the message says why and where."""


def read_bundle_file(path: Path | str, patient_id: str | None = None) -> PatientRecord:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{p}: file not found") from None
    except OSError as exc:
        raise BundleError(f"{p}: cannot be read ({exc.strerror})") from None
    try:
        data = loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BundleError(f"{p}: not valid JSON{where}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise BundleError(f"{p}: not usable JSON: {str(exc)[:120]}") from None
    except RecursionError:
        raise BundleError(f"{p}: JSON nested too deeply") from None
    return record_from_bundle(data, str(p), patient_id)


def _the_patient(patients: list[tuple[dict, str | None, str | None]], subjects: Callable[[], set[str]],
                 patient_id: str | None, source: str) -> tuple[dict | None, str | None, str | None]:
    """(Patient resource, its fullUrl, its id) of the patient the Bundle is about; ``subjects()``
    gives the Patient references the resources' subjects name (asked only when needed)."""
    def pid(r: dict) -> str | None:
        return r.get("id") if isinstance(r.get("id"), str) else None

    for p in patients:
        twins = [q for q in patients if pid(q[0]) and pid(q[0]) == pid(p[0]) and q[0] != p[0]]
        if twins:
            raise BundleError(f"{source}: holds Patient/{pid(p[0])} {len(twins) + 1} times with different content; "
                              "which one is the patient cannot be told")
    if patient_id is not None:
        chosen = [p for p in patients if pid(p[0]) == patient_id]
        if chosen:
            return chosen[0][0], chosen[0][1], patient_id
        if f"Patient/{patient_id}" in subjects():
            return None, None, patient_id
        raise BundleError(f"{source}: holds no Patient/{patient_id} and no resource about it")
    if len(patients) > 1:
        matches = [p for p in patients if p[2] == "match"]
        if len(matches) == 1:
            patients = matches
    if len(patients) == 1:
        return patients[0][0], patients[0][1], pid(patients[0][0])
    everyone = sorted({f"Patient/{pid(r)}" if pid(r) else (url or "Patient/(no id)") for r, url, _ in patients}
                      | subjects())
    if len(everyone) > 1:
        raise BundleError(f"{source}: holds several patients ({', '.join(everyone)}); "
                          "name the one to classify with --patient ID")
    if not everyone:
        raise BundleError(f"{source}: holds no Patient and no resource with a Patient subject")
    return None, None, everyone[0].split("/", 1)[1]


def record_from_bundle(data: Any, source: str = "bundle", patient_id: str | None = None,
                       full_models: bool = False) -> PatientRecord:
    """The record of one patient in a parsed Bundle (``patient_id``, or the Bundle's only
    Patient); other patients' resources are named and ignored. BundleError if the
    input is not a Bundle or does not say which patient it is about. ``full_models``:
    validate with fhir.resources' full R4B models (the reference) instead of the fast ones."""
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a FHIR Bundle object, found a JSON {type(data).__name__}")
    rtype = data.get("resourceType")
    if rtype != "Bundle":
        raise BundleError(f"{source}: expected resourceType 'Bundle', found {rtype!r}")
    btype = data.get("type")
    if btype not in ACCEPTED_BUNDLE_TYPES:
        raise BundleError(f"{source}: Bundle.type {btype!r} is not one of {', '.join(ACCEPTED_BUNDLE_TYPES)}")
    entries = data.get("entry", [])
    if not isinstance(entries, list):
        raise BundleError(f"{source}: Bundle.entry must be a list")
    resources: list[tuple[dict, str | None]] = []
    patients: list[tuple[dict, str | None, str | None]] = []
    seen: set[str] = set()  # history: the newest entry of each resource comes first
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BundleError(f"{source}: Bundle.entry[{i}] is not an object")
        request = entry.get("request")
        if btype == "history":
            key = _history_key(entry)
            if key in seen:
                continue  # an older version
            if key:
                seen.add(key)
        if isinstance(request, dict) and request.get("method") == "DELETE":
            continue
        resource = entry.get("resource")
        if resource is None:
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise BundleError(f"{source}: Bundle.entry[{i}].resource has no resourceType")
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        resources.append((resource, full_url))
        if resource["resourceType"] == "Patient":
            mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
            patients.append((resource, full_url, mode))

    def subjects() -> set[str]:
        return {s.reference for s in (patient_of(r) for r, _ in resources) if s}

    patient, patient_url, pid = _the_patient(patients, subjects, patient_id, source)
    others = frozenset(url for r, url, _ in patients if url and r is not patient)
    identity = PatientIdentity.of_patient(patient, patient_id=pid, full_url=patient_url, other_patients=others)
    record = PatientRecord(identity, full_models=full_models)
    add_distinct(record, resources)
    return record


def _history_key(entry: dict) -> str | None:
    """``Type/id`` of a history entry, from its resource or its request URL."""
    resource = entry.get("resource")
    if isinstance(resource, dict) and isinstance(resource.get("id"), str):
        return f"{resource.get('resourceType')}/{resource['id']}"
    request = entry.get("request")
    url = request.get("url") if isinstance(request, dict) else None
    return plain_ref(url.split("?")[0]) if isinstance(url, str) else None
