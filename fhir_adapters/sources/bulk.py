"""A population's data through FHIR Bulk Data ``$export``, spooled to disk by patient.

``Patient/$export`` (``_type`` limited to what the mapping reads, ``_typeFilter`` to
the watched codes where the terminology allows) is kicked off once, polled at the
server's ``Retry-After`` (at least :data:`MIN_POLL_INTERVAL` apart), and each NDJSON file
is streamed line by line into a temporary SQLite spool keyed by patient.

A partial download fails the run rather than classifying from partial records: a file
with fewer resources than the manifest's ``count`` raises :class:`FhirTruncated`, a line
that is not a JSON object (a cut last line, say) raises :class:`FhirError` naming the
file and line, and a connection lost mid-file raises :class:`FhirServerUnavailable`.

The pipeline then reads the spool a chunk of patients at a time, so memory does not grow
with the number of patients.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode

import requests

from fhir_adapters.fhir.codec import loads
from fhir_adapters.fhir.client import FhirClient, dumps
from fhir_adapters.fhir.errors import FhirError, FhirServerUnavailable, FhirTruncated
from fhir_adapters.fhir.transport import retry_after, strip_query
from fhir_adapters.fhir.reference import PatientIdentity, PatientRef, patient_of, plain_ref
from fhir_adapters.sources.record import MAPPED_TYPES, PatientRecord
from fhir_adapters.terminology import Terminology

log = logging.getLogger("clm_stratify.bulk")

#: seconds between status polls at least, whatever ``Retry-After`` says (``0`` would spin).
MIN_POLL_INTERVAL = 1.0

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
                manifest = _manifest(poll)
                break
            if time.monotonic() > deadline:
                raise FhirError(f"$export not complete after {max_wait:.0f} s", url=client.base_url)
            wait = retry_after(poll.headers)
            time.sleep(max(MIN_POLL_INTERVAL, min(max_poll_interval, MIN_POLL_INTERVAL if wait is None else wait)))
        if manifest.get("error"):
            errors = ", ".join(e.get("url", "?") for e in manifest["error"])
            raise FhirError(f"$export reported errors ({errors})", url=client.base_url)
        for output in manifest.get("output") or []:
            _download(client, output, spool)
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


def _manifest(poll: requests.Response) -> dict:
    try:
        manifest = loads(poll.content)
    except ValueError as exc:
        raise FhirError(f"$export status {strip_query(poll.url)}: the manifest is not JSON ({exc})",
                        url=strip_query(poll.url), method="GET") from None
    if not isinstance(manifest, dict):
        raise FhirError(f"$export status {strip_query(poll.url)}: the manifest is not a JSON object",
                        url=strip_query(poll.url), method="GET")
    return manifest


def _download(client: FhirClient, output: object, spool: Spool) -> None:
    """Stream one manifest ``output`` file into ``spool``, checking it arrived whole."""
    url = output.get("url") if isinstance(output, dict) else None
    if not isinstance(url, str) or not url:
        raise FhirError(f"$export manifest output without a url: {output!r:.200}", url=client.base_url)
    name = strip_query(url)
    expected = output.get("count")
    received = 0
    with client.request("GET", url, headers={"Accept": "application/fhir+ndjson"}, stream=True) as resp:
        try:
            for lineno, line, terminated in _ndjson_lines(resp):
                if not line.strip():
                    continue
                try:
                    resource = loads(line)
                except ValueError as exc:
                    what = "incomplete last line (no newline; the file was cut?)" if not terminated \
                        else "invalid JSON"
                    raise FhirError(f"$export file {name}: line {lineno}: {what}: {exc}", url=name,
                                    method="GET") from None
                if not isinstance(resource, dict) or not resource.get("resourceType"):
                    raise FhirError(f"$export file {name}: line {lineno}: not a FHIR resource", url=name,
                                    method="GET")
                spool.add(resource)
                received += 1
        except requests.RequestException as exc:
            raise FhirServerUnavailable(
                f"FHIR server {client.base_url}: $export file {name}: connection lost after {received} "
                f"resources ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                url=name, method="GET") from None
    if isinstance(expected, int) and not isinstance(expected, bool):
        if received < expected:
            raise FhirTruncated(f"$export file {name} is incomplete: the manifest says {expected} resources, "
                                f"received {received}", url=name, method="GET")
        if received > expected:
            log.warning("$export file %s: %d resources received, the manifest says %d", name, received, expected)


def _ndjson_lines(resp: requests.Response, chunk_size: int = 1 << 16) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, ended by a newline) for each line of a streamed body."""
    lineno, pending = 0, []  # pending: the pieces of a line not yet ended
    for chunk in resp.iter_content(chunk_size):
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            lineno += 1
            yield lineno, b"".join(pending) + piece, True
            pending = []
        if rest:
            pending.append(rest)
    if pending:
        yield lineno + 1, b"".join(pending), False
