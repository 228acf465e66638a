"""A population's data through FHIR Bulk Data ``$export``, spooled to disk by patient.

``Patient/$export`` (``_type`` limited to what the mapping reads, ``_typeFilter`` to
the watched codes where the terminology allows) is kicked off once, polled at the
server's ``Retry-After``, and each NDJSON file is streamed line by line into a
temporary SQLite spool keyed by patient. The pipeline then reads the spool a chunk of
patients at a time, so memory does not grow with the number of patients.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode

from fhir_adapters.fhir.codec import loads
from fhir_adapters.fhir.client import FhirClient, FhirError, dumps
from fhir_adapters.fhir.transport import retry_after
from fhir_adapters.fhir.reference import PatientIdentity, PatientRef, patient_of, plain_ref
from fhir_adapters.sources.record import MAPPED_TYPES, PatientRecord
from fhir_adapters.terminology import Terminology



class Spool:
    """Resources on disk, by patient (a temporary SQLite file, removed on close)."""

    def __init__(self, directory: str | None = None, base: str | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="clm-spool-", dir=directory)
        self.path = Path(self._dir.name) / "spool.sqlite"
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE r (patient TEXT, body TEXT)")
        self.base = base
        self.count = 0
        self._have: set[str] = set()
        self._wanted: set[str] = set()

    def add(self, resource: dict) -> None:
        owner = patient_of(resource, self.base)
        self.db.execute("INSERT INTO r VALUES (?, ?)", (owner.id if owner else None, dumps(resource)))
        self.count += 1
        self._have.add(f"{resource.get('resourceType')}/{resource.get('id')}")
        refs = [(resource.get("medicationReference") or {}).get("reference")]
        refs += [f.get("reference") for f in resource.get("focus", []) if isinstance(f, dict)]
        for ref in map(plain_ref, refs):
            if ref and ref.split("/")[0] in ("Medication", "BodyStructure"):
                self._wanted.add(ref)

    def missing_references(self) -> list[str]:
        """Medications and focus BodyStructures referenced but not exported."""
        return sorted(self._wanted - self._have)

    def patients(self) -> list[PatientRef]:
        rows = self.db.execute("SELECT DISTINCT patient FROM r WHERE patient IS NOT NULL ORDER BY patient")
        return [PatientRef(p) for (p,) in rows]

    def records(self, patients: list[PatientRef]) -> Iterator[tuple[PatientRef, PatientRecord]]:
        """(patient, record) for each patient. Resources that name no patient by a literal
        reference (Medication, and any that cannot be attributed) go to every record,
        which names the unattributable ones."""
        shared = [loads(b) for (b,) in self.db.execute("SELECT body FROM r WHERE patient IS NULL")]
        for ref in patients:
            rows = self.db.execute("SELECT body FROM r WHERE patient = ?", (ref.id,))
            own = [loads(b) for (b,) in rows]
            patient = next((r for r in own if r.get("resourceType") == "Patient"), None)
            identity = PatientIdentity.of_patient(patient, patient_id=ref.id, bases=[self.base] if self.base else [])
            yield ref, PatientRecord.from_resources(own + shared, identity)

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def finish(self) -> None:
        """Index by patient once everything is in (faster than indexing while inserting)."""
        self.db.execute("CREATE INDEX IF NOT EXISTS r_patient ON r (patient)")
        self.db.commit()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_to_spool(client: FhirClient, terminology: Terminology, spool: Spool, *, max_wait: float = 3600.0,
                    max_poll_interval: float = 30.0) -> int:
    """Run ``Patient/$export`` and stream its NDJSON into ``spool``; returns the count."""
    from fhir_adapters.sources.pull import token_list

    params = {"_type": ",".join(MAPPED_TYPES), "_outputFormat": "application/fhir+ndjson"}
    t = terminology
    codes = token_list(t.tumour_size_observation, t.longest_dimension, t.technical_resectability_observation)
    categories = token_list(t.radiology_report_category)
    # _typeFilter is itself a comma-separated list of queries: commas inside one query
    # are percent-encoded.
    filters = ([f"Observation?{urlencode({'code': codes}, safe='|:/')}"] if codes else []) + (
        [f"DiagnosticReport?{urlencode({'category': categories}, safe='|:/')}"] if categories else [])
    if filters:
        params["_typeFilter"] = ",".join(filters)
    kick = client.request("GET", "Patient/$export", params=params,
                          headers={"Prefer": "respond-async", "Accept": "application/fhir+json"})
    status_url = kick.headers.get("Content-Location")
    if kick.status_code != 202 or not status_url:
        raise FhirError(f"$export kick-off answered {kick.status_code} without a status URL", url=client.base_url)
    deadline = time.monotonic() + max_wait
    try:
        while True:
            poll = client.request("GET", status_url, headers={"Accept": "application/json"})
            if poll.status_code == 200:
                manifest = loads(poll.content)
                break
            if time.monotonic() > deadline:
                raise FhirError(f"$export not complete after {max_wait:.0f} s", url=client.base_url)
            wait = retry_after(poll.headers)
            time.sleep(min(max_poll_interval, 1.0 if wait is None else wait))
        if manifest.get("error"):
            errors = ", ".join(e.get("url", "?") for e in manifest["error"])
            raise FhirError(f"$export reported errors ({errors})", url=client.base_url)
        for output in manifest.get("output", []):
            with client.request("GET", output["url"], headers={"Accept": "application/fhir+ndjson"},
                                stream=True) as resp:
                for line in resp.iter_lines():
                    if line.strip():
                        spool.add(loads(line))
        missing = spool.missing_references()
        for start in range(0, len(missing), 100):  # e.g. BodyStructure is not in every export
            by_type: dict[str, list[str]] = {}
            for ref in missing[start:start + 100]:
                rtype, rid = ref.split("/", 1)
                by_type.setdefault(rtype, []).append(rid)
            for rtype, ids in by_type.items():
                for resource in client.search(rtype, {"_id": ",".join(ids), "_count": "100"}):
                    spool.add(resource)
        spool.finish()
        return spool.count
    finally:
        try:
            client.request("DELETE", status_url, headers={"Accept": "application/json"})
        except FhirError:
            pass  # the server cleans up expired jobs itself
