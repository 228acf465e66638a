"""Read a FHIR Bundle (file or parsed JSON) holding one patient's resources.

JSON numbers are read as Decimal so sizes such as 49.9 mm or 0.05 m stay exact.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from fhir_adapters.record import PatientRecord

ACCEPTED_BUNDLE_TYPES = ("collection", "searchset", "transaction", "batch", "document", "history")


class BundleError(ValueError):
    """The input is not a usable single-patient Bundle; the message says why and where."""


def loads(text: str | bytes) -> Any:
    """Parse FHIR JSON with decimals kept exact."""
    return json.loads(text, parse_float=Decimal)


def read_bundle_file(path: Path | str) -> PatientRecord:
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
    return record_from_bundle(data, str(p))


def _subject_patient(resource: dict) -> str | None:
    for key in ("subject", "patient"):
        node = resource.get(key)
        if isinstance(node, dict) and isinstance(node.get("reference"), str):
            reference = node["reference"].split("/_history/")[0]
            parts = reference.rstrip("/").split("/")
            if len(parts) >= 2 and parts[-2] == "Patient":
                return f"Patient/{parts[-1]}"
    return None


def record_from_bundle(data: Any, source: str = "bundle") -> PatientRecord:
    """A PatientRecord from a parsed Bundle; BundleError if it is not one patient's Bundle."""
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
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BundleError(f"{source}: Bundle.entry[{i}] is not an object")
        request = entry.get("request")
        if isinstance(request, dict) and request.get("method") == "DELETE":
            continue
        resource = entry.get("resource")
        if resource is None:
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise BundleError(f"{source}: Bundle.entry[{i}].resource has no resourceType")
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        resources.append((resource, full_url))

    patients = {f"Patient/{r['id']}" if isinstance(r.get("id"), str) else (url or "Patient/(no id)")
                for r, url in resources if r["resourceType"] == "Patient"}
    subjects = {s for s in (_subject_patient(r) for r, _ in resources) if s}
    everyone = patients | subjects
    if len(everyone) > 1:
        raise BundleError(f"{source}: holds several patients ({', '.join(sorted(everyone))}); "
                          "classify expects one patient per Bundle")
    if not everyone:
        raise BundleError(f"{source}: holds no Patient and no resource with a Patient subject")
    record = PatientRecord()
    for resource, full_url in resources:
        record.add(resource, full_url)
    if record.patient is None:
        # No (readable) Patient resource: keep the subject so the result names the patient.
        record.subject = next(iter(everyone))
    return record
