"""The population path on one machine: NDJSON files -> a SQLite spool keyed by patient
-> whole-patient records -> the core (:mod:`clm_stratify.population.core`) -> ``OUT``.

Every line is keyed in Python (:func:`fhir_adapters.sources.ndjson.read_line`); lines the
mapping cannot use are dropped before the spool. Patients are then read back in id order,
``CHUNK`` at a time, and classified in this process or in ``workers`` processes, each
chunk writing its own part files (``OUT/<kind>/part-NNNNN.ndjson``).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import sqlite3
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from clm_stratify.population.core import KINDS, CoreConfig, Row, classify_records
from clm_stratify.population.output import InputError, Summary, part_name
from fhir_adapters.sources.ndjson import BadLine, Prefilter, lines_of, ndjson_files, read_line
from fhir_adapters.terminology import Terminology

#: Patients per chunk (one part file per kind and chunk).
CHUNK = 5000
#: Lines no patient can be shown to own go to every record; more than this is refused.
MAX_BROADCAST = 10_000
#: Unreadable lines named in the error (all are counted).
SHOWN_ERRORS = 20


class LineSpool:
    """Kept lines by owner, shared lines by reference, and who wants which (SQLite)."""

    def __init__(self, directory: str | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="clm-population-", dir=directory)
        self.db = sqlite3.connect(Path(self._dir.name) / "spool.sqlite")
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript("CREATE TABLE own (owner TEXT, line TEXT); CREATE TABLE shared (ref TEXT, line TEXT);"
                              "CREATE TABLE want (owner TEXT, ref TEXT, UNIQUE (owner, ref));")

    def records(self) -> Iterator[tuple[str, list[str]]]:
        """(patient id, lines) in patient id order: its own lines and the shared ones its
        lines reference."""
        self.db.executescript("CREATE INDEX shared_ref ON shared (ref);")
        rows = self.db.execute("SELECT owner, line FROM own UNION ALL SELECT w.owner, s.line FROM want w "
                               "JOIN shared s ON s.ref = w.ref ORDER BY 1")
        for owner, group in itertools.groupby(rows, key=lambda r: r[0]):
            yield owner, [line for _, line in group]

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


def gather(sources: list[str], terminology: Terminology, spool: LineSpool, summary: Summary,
           base: str | None = None) -> list[str]:
    """Read every line of ``sources`` into ``spool``; returns the broadcast lines.
    :class:`InputError` when any line is unreadable (all are counted, the first named)."""
    prefilter = Prefilter.of(terminology)
    broadcast: list[str] = []
    errors: list[str] = []
    bad = 0
    files = [f for s in sources for f in ndjson_files(s)]
    summary.inputs = [str(f) for f in files]
    db = spool.db
    for path in files:
        own, shared, want = [], [], []
        for lineno, line in lines_of(path):
            try:
                read = read_line(line, prefilter, base)
            except BadLine as exc:
                bad += 1
                if len(errors) < SHOWN_ERRORS:
                    errors.append(f"{path}:{lineno}: {exc}")
                continue
            if read is None:
                continue
            summary.lines_read += 1
            _, info = read
            if not info.kept:
                continue
            summary.lines_kept += 1
            if info.owner is not None:
                own.append((info.owner, line))
                want.extend((info.owner, ref) for ref in info.wants)
            if info.joined is not None:
                shared.append((info.joined, line))
            if info.broadcast:
                broadcast.append(line)
                if len(broadcast) > MAX_BROADCAST:
                    raise InputError(f"more than {MAX_BROADCAST} resources name no patient by a literal reference "
                                     f"(e.g. {path}:{lineno}); each would go to every patient's record: check how "
                                     "the export names its patients (--base for absolute references)")
            if len(own) >= 10_000:
                _flush(db, own, shared, want)
        _flush(db, own, shared, want)
    if bad:
        more = f" (and {bad - len(errors)} more)" if bad > len(errors) else ""
        raise InputError(f"{bad} unreadable line(s); nothing was classified:\n  " + "\n  ".join(errors) + more)
    summary.broadcast = len(broadcast)
    return broadcast


def _flush(db: sqlite3.Connection, own: list, shared: list, want: list) -> None:
    db.executemany("INSERT INTO own VALUES (?, ?)", own)
    db.executemany("INSERT INTO shared VALUES (?, ?)", shared)
    db.executemany("INSERT OR IGNORE INTO want VALUES (?, ?)", want)
    own.clear(), shared.clear(), want.clear()


def write_chunk(out: Path, index: int, rows: Iterator[Row]) -> dict[str, dict]:
    """Write one chunk's rows to its part files; returns counts per kind and group."""
    handles: dict[str, object] = {}
    counts: dict[str, dict] = {}
    try:
        for row in rows:
            fh = handles.get(row.kind)
            if fh is None:
                fh = handles[row.kind] = open(out / row.kind / part_name(index), "w", encoding="utf-8")
            fh.write(row.text + "\n")
            by = counts.setdefault(row.kind, {})
            key = row.group or ""
            by[key] = by.get(key, 0) + 1
            if row.kind == "failures":
                counts.setdefault("_failed", {})[row.patient] = row.text
    finally:
        for fh in handles.values():
            fh.close()
    return counts


def _chunk_job(args: tuple) -> dict[str, dict]:
    out, index, records, config, broadcast = args
    return write_chunk(out, index, classify_records(records, config, broadcast))


def run_local(sources: list[str], out: Path, config: CoreConfig, terminology: Terminology, *, workers: int = 1,
              spool_dir: str | None = None, progress: Callable[[int], None] | None = None) -> Summary:
    """Classify every patient of ``sources`` into ``out`` (which the caller created empty)."""
    summary = Summary(engine="local" if workers == 1 else f"local, {workers} processes")
    for kind in KINDS:
        (out / kind).mkdir(parents=True, exist_ok=True)
    spool = LineSpool(spool_dir)
    try:
        broadcast = gather(sources, terminology, spool, summary, config.base)
        chunks = ((out, i, chunk, config, broadcast) for i, chunk in enumerate(batched(spool.records(), CHUNK)))
        if workers == 1:
            for job in chunks:
                summary.add(_chunk_job(job))
                if progress:
                    progress(summary.patients)
        else:
            # The spool is read here, in this thread (SQLite); at most 2 chunks per process in flight.
            pool = multiprocessing.get_context("spawn").Pool(workers)
            try:
                running: collections.deque = collections.deque()
                for job in chunks:
                    running.append(pool.apply_async(_chunk_job, (job,)))
                    while len(running) >= 2 * workers or (running and running[0].ready()):
                        summary.add(running.popleft().get())
                        if progress:
                            progress(summary.patients)
                while running:
                    summary.add(running.popleft().get())
                pool.close()
            finally:
                pool.terminate()
                pool.join()
    finally:
        spool.close()
    return summary


def batched(items: Iterator, n: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(items, n))
        if not chunk:
            return
        yield chunk
