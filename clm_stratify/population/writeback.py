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
from fhir_adapters.writeback.resources import validated
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


def _chunks(out: Path, summary: WriteBackSummary) -> Iterator[tuple[str, list[Prepared]]]:
    """(chunk key, prepared assessments); a line that is not a valid assessment is a
    failure of its patient."""
    chunk: list[Prepared] = []
    key = None
    for path, n, line in read_lines(out, "assessments"):
        if key is None:
            key = f"{path.name}:{n}"
        try:
            chunk.append(_prepared(line))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            summary.failed.append((_patient_hint(line), f"{path.name}:{n}: not a valid assessment ({str(exc)[:300]})"))
        if len(chunk) >= CHUNK:
            yield key, chunk
            chunk, key = [], None
    if chunk:
        yield key, chunk


def _prepared(line: str) -> Prepared:
    from fhir_adapters.fhir.codec import loads

    bundle = loads(line)
    ra, provenance = (e["resource"] for e in bundle["entry"])
    if ra.get("resourceType") != "RiskAssessment" or provenance.get("resourceType") != "Provenance":
        raise ValueError("expected a Bundle of a RiskAssessment and its Provenance")
    validated(ra)
    validated(provenance)
    return Prepared(ra["subject"]["reference"], ra, provenance)


def _patient_hint(line: str) -> str:
    marker = '"subject":{"reference":"'
    at = line.find(marker)
    return line[at + len(marker):].split('"', 1)[0] if at >= 0 else "(unknown patient)"


def write_back(out: Path, make_client: Callable[[], FhirClient], *, max_writers: int = 4, dry_run: bool = False,
               progress: Callable[[WriteBackSummary], None] | None = None) -> WriteBackSummary:
    """Write every assessment of a finished run (see the module docstring)."""
    read_manifest(out)
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
            for key, chunk in _chunks(out, summary):
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
