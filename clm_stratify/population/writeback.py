"""``clm-stratify write-back --from OUT``: a population run's assessments to a FHIR server,
as a separate, bounded and resumable step.

* **Idempotent**: every RiskAssessment has its deterministic id and identifier; each
  chunk of :data:`CHUNK` patients is written by :meth:`AssessmentWriter.write_many`,
  which reads the current assessments first and writes only what changed (a re-run writes
  nothing: ``unchanged``).
* **Bounded**: at most ``max_writers`` chunks in flight (one client and writer per
  thread), at most twice that many read ahead. The first chunk is written alone, so the
  server's idempotency is verified (:class:`WriteNotIdempotent`) before writers run in
  parallel.
* **Resumable**: each chunk written in full is recorded in a journal next to the run
  (``OUT/write-back/<server>.journal``); an interrupted write-back started again skips
  them. A chunk with a failed patient is not recorded, so the next run retries it.
* **Checked**: every RiskAssessment and Provenance is validated with the R4B models
  before it is sent; an invalid one fails that patient (named), never the others.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from clm_stratify.population.output import InputError, read_lines, read_manifest
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.project import IDENTIFIER_SYSTEM, TAG, TAG_SYSTEM
from fhir_adapters.writeback.resources import assessment_id, assessment_key, validated
from fhir_adapters.writeback.writer import AssessmentWriter, Prepared, WriteNotIdempotent, WriteResult

#: Patients per chunk: one read batch and one transaction each.
CHUNK = 100


@dataclass
class WriteBackSummary:
    actions: Counter = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (patient, error)
    skipped_chunks: int = 0   # written by an earlier, interrupted write-back
    chunks: int = 0


def journal_path(out: Path, base_url: str) -> Path:
    key = hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:16]
    return out / "write-back" / f"{key}.journal"


def _chunks(out: Path, summary: WriteBackSummary, ruleset: dict) -> Iterator[tuple[str, list[Prepared]]]:
    """(chunk key, prepared assessments); a line that is not a valid assessment of this
    run is a failure of its patient (named by file and line), never sent."""
    chunk: list[Prepared] = []
    key = None
    for path, n, line in read_lines(out, "assessments"):
        if key is None:
            key = f"{path.name}:{n}"
        try:
            chunk.append(_prepared(line, ruleset))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            summary.failed.append((_patient_hint(line), f"{path.name}:{n}: not a valid assessment of this run "
                                                        f"({str(exc)[:300]}); not written"))
        if len(chunk) >= CHUNK:
            yield key, chunk
            chunk, key = [], None
    if chunk:
        yield key, chunk


def _prepared(line: str, ruleset: dict) -> Prepared:
    """One line checked: a collection Bundle of a RiskAssessment and its Provenance, as
    this program builds them for this run's rule set: its id and identifier are those of
    its subject (an edited line cannot overwrite another patient's assessment), and both
    resources are valid R4."""
    from fhir_adapters.fhir.codec import loads
    from fhir_adapters.fhir.reference import PatientRef

    bundle = loads(line)
    entries = bundle.get("entry") if isinstance(bundle, dict) and bundle.get("type") == "collection" else None
    if not isinstance(entries, list) or len(entries) != 2 or not all(isinstance(e, dict) for e in entries):
        raise ValueError("expected a collection Bundle of a RiskAssessment and its Provenance")
    ra, provenance = (e.get("resource") for e in entries)
    if not isinstance(ra, dict) or ra.get("resourceType") != "RiskAssessment" or not isinstance(provenance, dict) \
            or provenance.get("resourceType") != "Provenance":
        raise ValueError("expected a RiskAssessment, then its Provenance")
    subject = (ra.get("subject") or {}).get("reference")
    if not isinstance(subject, str) or not subject.startswith("Patient/"):
        raise ValueError(f"subject {subject!r} is not a Patient/<id> reference")
    patient = PatientRef.parse(subject).reference
    coding = ((ra.get("method") or {}).get("coding") or [{}])[0]
    if (coding.get("code"), coding.get("version")) != (ruleset.get("id"), ruleset.get("version")):
        raise ValueError(f"rule set {coding.get('code')} {coding.get('version')}, not the run's "
                         f"{ruleset.get('id')} {ruleset.get('version')}")
    if ra.get("id") != assessment_id(patient, ruleset["id"]) or ra.get("identifier") != [
            {"system": IDENTIFIER_SYSTEM, "value": assessment_key(patient, ruleset["id"])}]:
        raise ValueError(f"its id or identifier is not the one of {patient}")
    if ra.get("status") not in ("preliminary", "final"):
        raise ValueError(f"status {ra.get('status')!r} (this program writes preliminary or final)")
    if {"system": TAG_SYSTEM, "code": TAG} not in ((ra.get("meta") or {}).get("tag") or []):
        raise ValueError("not tagged as written by this program")
    if provenance.get("target") != [{"reference": f"RiskAssessment/{ra['id']}"}]:
        raise ValueError("the Provenance does not target this RiskAssessment")
    validated(ra)
    validated(provenance)
    return Prepared(patient, ra, provenance)


def _patient_hint(line: str) -> str:
    marker = '"subject":{"reference":"'
    at = line.find(marker)
    return line[at + len(marker):].split('"', 1)[0][:80] if at >= 0 else "(unknown patient)"


def write_back(out: Path, make_client: Callable[[], FhirClient], *, max_writers: int = 4, dry_run: bool = False,
               progress: Callable[[WriteBackSummary], None] | None = None) -> WriteBackSummary:
    """Write every assessment of a finished run (see the module docstring)."""
    manifest = read_manifest(out)
    expected = ((manifest.get("counts") or {}).get("outputs") or {}).get("assessments", 0)
    found = sum(1 for _ in read_lines(out, "assessments"))
    if found != expected:
        raise InputError(f"{out}/assessments: {found} lines, the manifest says {expected}: the run's files were "
                         "changed or cut; nothing written")
    summary = WriteBackSummary()
    local = threading.local()
    clients: list[FhirClient] = []
    clients_lock = threading.Lock()

    def writer() -> AssessmentWriter:
        w = getattr(local, "writer", None)
        if w is None:
            client = make_client()
            with clients_lock:
                clients.append(client)
            w = local.writer = AssessmentWriter(client)
        return w

    def job(chunk: list[Prepared]) -> list[WriteResult]:
        return writer().write_many(chunk, dry_run=dry_run)

    probe = make_client()
    clients.append(probe)
    probe.capabilities()   # a server that cannot be used fails the command (FhirError), not every patient
    journal = journal_path(out, probe.base_url)
    done = set() if dry_run else _read_journal(journal)
    if not dry_run:
        journal.parent.mkdir(exist_ok=True)
    jlock = threading.Lock()

    def finish(key: str, results: list[WriteResult]) -> None:
        failed = [(r.patient, r.error or "failed") for r in results if r.action == "failed"]
        summary.actions.update(r.action for r in results)
        summary.failed.extend(failed)
        summary.chunks += 1
        if not failed and not dry_run:
            with jlock, open(journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"chunk": key, "patients": len(results)}) + "\n")
        if progress:
            progress(summary)

    try:
        def chunks_left() -> Iterator[tuple[str, list[Prepared]]]:
            for key, chunk in _chunks(out, summary, manifest.get("ruleset") or {}):
                if key in done:
                    summary.skipped_chunks += 1
                else:
                    yield key, chunk

        todo = chunks_left()
        first = next(todo, None)
        if first is not None:   # alone: the server's idempotency is verified before writers run in parallel
            finish(first[0], job(first[1]))
        with ThreadPoolExecutor(max_workers=max_writers, thread_name_prefix="write-back") as pool:
            running: dict[Future, str] = {}
            try:
                for key, chunk in todo:
                    while len(running) >= 2 * max_writers:
                        _collect(running, finish)
                    running[pool.submit(job, chunk)] = key
                while running:
                    _collect(running, finish)
            except BaseException:
                for f in running:
                    f.cancel()
                raise
    finally:
        for c in clients:
            c.close()
    return summary


def _collect(running: dict[Future, str], finish: Callable[[str, list[WriteResult]], None]) -> None:
    completed, _ = wait(list(running), return_when=FIRST_COMPLETED)
    for f in completed:
        key = running.pop(f)
        finish(key, f.result())   # WriteNotIdempotent propagates: every writer stops


def _read_journal(path: Path) -> set[str]:
    if not path.exists():
        return set()
    done = set()
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            done.add(json.loads(line)["chunk"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                continue   # a last line cut by an interruption: that chunk is written again (idempotent)
            raise InputError(f"{path}:{n}: not a write-back journal line; remove the file to start over") from None
    return done


__all__ = ["write_back", "WriteBackSummary", "WriteNotIdempotent", "journal_path"]
