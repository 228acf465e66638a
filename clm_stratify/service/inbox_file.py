"""The inbox file: its layout, and opening it without ever losing what it holds.

A new inbox is created only where no file exists. An existing file is opened only if it
is an inbox (SQLite, stamped with this project's ``application_id``, or an inbox of an
earlier release: the ``notification`` and ``work`` tables), and is checked
(``PRAGMA quick_check``) before use. Anything else is an :class:`InboxError` with one
line naming the file and what is wrong: a 0-byte file (pending work gone, or the wrong
path), a file of another program, a truncated or damaged database, a read-only file or
directory, a missing directory. The file is never re-initialised over.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "empty.sqlite"), "w").close()
    >>> check_file(os.path.join(d, "empty.sqlite"), create=True)
    Traceback (most recent call last):
    ...
    clm_stratify.service.inbox_file.InboxError: ...empty.sqlite: the file is empty (0 bytes), not an inbox; ...

A refused file is left as it was: the ``-wal``/``-shm`` files that opening it created are
removed again (:func:`sidecars`), never ones that were there before. While a receiver
serves the inbox, the file at its path must stay the file it opened (:func:`moved`).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

APPLICATION_ID = 0x434C4D49   # "CLMI" in PRAGMA application_id
SCHEMA_VERSION = 3            # PRAGMA user_version; 2 added work.first_received_at,
                              # 3 seen_event.about and notification.dead_at
SQLITE_HEADER = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE IF NOT EXISTS notification (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    body TEXT NOT NULL,               -- the parsed Notification (JSON)
    state TEXT NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'resolved', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    dead_at REAL                      -- when it became a dead letter
);
CREATE INDEX IF NOT EXISTS notification_new ON notification (state, next_at);
CREATE TABLE IF NOT EXISTS work (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    patient TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'dead')),
    due_at REAL NOT NULL,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,   -- evaluations started (counted when leased)
    notifications INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT,
    result TEXT,
    first_received_at REAL                 -- the earliest notification this row answers
);
CREATE UNIQUE INDEX IF NOT EXISTS work_one_pending ON work (patient) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS work_due ON work (state, due_at);
CREATE TABLE IF NOT EXISTS seen_event (
    subscription TEXT NOT NULL,
    event_number INTEGER NOT NULL,
    about TEXT,                       -- what the event was about (event_about); NULL: an earlier release
    PRIMARY KEY (subscription, event_number)
);
CREATE TABLE IF NOT EXISTS subscription_state (
    subscription TEXT PRIMARY KEY,
    last_event INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# Columns added after the first release: (table, column, type), added to an older inbox.
_ADDED = (("work", "first_received_at", "REAL"), ("seen_event", "about", "TEXT"), ("notification", "dead_at", "REAL"))


class InboxError(Exception):
    """The inbox file cannot be used; the message is one line naming the file."""


class InboxGone(sqlite3.OperationalError):
    """The inbox file was removed or replaced while served: what is written now is written to
    a file nobody will read again. An ``sqlite3.Error``, so the receiver answers 503 (not
    stored) as for any other storage failure."""


def event_about(*parts: str | None) -> str:
    """A short digest of what a notification event is about (its focus, the focus's version,
    its timestamp, its patient: what a delivery of the same event repeats), kept with its
    event number: the same number about something else is a new event (the server's count
    started again), not a duplicate delivery. No identifier in clear.

    >>> event_about("Observation/f30", None, "Patient/p1") == event_about("Observation/f30", None, "Patient/p1")
    True
    >>> event_about("Observation/f30", None, None) == event_about("Observation/f32", None, None)
    False
    """
    return hashlib.sha256("|".join(p or "" for p in parts).encode()).hexdigest()[:16]


def _id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def identity(path: str | Path) -> list[tuple[int, int] | None]:
    """(device, inode) of the inbox file at ``path`` (a symbolic link followed), then of
    its ``-wal`` and ``-shm`` files (None while they do not exist yet)."""
    st = os.stat(path)
    return [(st.st_dev, st.st_ino), _id(f"{path}-wal"), _id(f"{path}-shm")]


def moved(path: str | Path, opened: list[tuple[int, int] | None]) -> str | None:
    """Why the inbox at ``path`` is no longer the one opened (``opened``: its :func:`identity`),
    or None. The ``-wal`` holds every commit not yet checkpointed: removed under a running
    receiver, what it acknowledged would be gone with it. A sidecar first seen now is
    recorded in ``opened``."""
    try:
        if identity(path)[0] != opened[0]:
            return f"the inbox file {path} was removed or replaced"
    except OSError:
        return f"the inbox file {path} was removed or replaced"
    for i, suffix in ((1, "-wal"), (2, "-shm")):
        now = _id(f"{path}{suffix}")
        if opened[i] is None:
            opened[i] = now
        elif now != opened[i]:
            return f"the inbox's {suffix[1:].upper()} file {path}{suffix} was removed or replaced"
    return None


def lock(path: str):
    """An exclusive ``flock`` on the inbox file (held while the returned file is open)."""
    import fcntl

    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InboxError(f"{path}: cannot open the inbox to lock it: {exc.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InboxError(f"{path} is already served by another receiver process") from None
    return f


def sidecars(path: str | Path) -> set[Path]:
    """The ``-wal`` and ``-shm`` files of the inbox at ``path`` that exist now."""
    return {s for s in (Path(f"{path}-wal"), Path(f"{path}-shm")) if s.exists()}


def remove_sidecars(path: str | Path, before: set[Path]) -> None:
    """Remove the ``-wal``/``-shm`` files of ``path`` that were not there ``before``."""
    for s in sidecars(path) - before:
        try:
            s.unlink()
        except OSError:
            pass


def check_file(path: str | Path, *, create: bool) -> bool:
    """Whether a new inbox is to be created at ``path`` (nothing there), after checking
    that an existing file looks like an SQLite database; raises :class:`InboxError`."""
    p = Path(path)
    try:
        exists, is_dir, dangling = p.exists(), p.is_dir(), p.is_symlink() and not p.exists()
    except OSError as exc:   # a directory on the way that may not be searched
        raise InboxError(f"{p}: cannot reach the inbox: {exc.strerror}") from None
    if dangling:   # SQLite would create the inbox at the target, where `inbox` then finds nothing
        raise InboxError(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist; refusing to create "
                         f"an inbox through it: name the file itself")
    if is_dir:
        raise InboxError(f"{p}: is a directory, not an inbox file")
    if not exists:
        if not create:
            raise InboxError(f"{p}: no inbox there")
        wal = Path(f"{p}-wal")
        if wal.exists() and wal.stat().st_size > 0:   # its data may all be in the write-ahead log
            raise InboxError(f"{p}: the inbox file is missing but its write-ahead log {wal.name} is there "
                             f"(it may hold the inbox's data); refusing to create a new inbox over it")
        parent = p.parent
        if not parent.is_dir():
            raise InboxError(f"{p}: cannot create the inbox: the directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InboxError(f"{p}: cannot create the inbox: the directory {parent} is not writable")
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        raise InboxError(f"{p}: cannot read the inbox: {exc.strerror}") from None
    if not head:
        raise InboxError(f"{p}: the file is empty (0 bytes), not an inbox; refusing to initialise it over "
                         f"what may have been pending work: move it away, or name a new file")
    if not head.startswith(SQLITE_HEADER):
        raise InboxError(f"{p}: not an inbox (not an SQLite database file)")
    if len(head) < 100:
        raise InboxError(f"{p}: the inbox is truncated ({len(head)} bytes)")
    return False


def identify(path: str | Path) -> None:
    """Before an existing file is opened for writing (which would switch it to WAL mode):
    read-only, it must be an inbox; raises :class:`InboxError`, the file left untouched."""
    try:
        db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InboxError(f"{path}: {describe(exc)}") from None
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise InboxError(f"{path}: {describe(exc)}") from None
    finally:
        db.close()
    if app_id != APPLICATION_ID and not (app_id == 0 and {"notification", "work"} <= tables):
        what = ", ".join(sorted(tables)[:8]) or "no tables"
        raise InboxError(f"{path}: not an inbox (an SQLite database of something else: {what})")


def prepare(db: sqlite3.Connection, path: str | Path, *, new: bool) -> None:
    """Create the schema in a new inbox, or check and bring an existing one up to date."""
    try:
        if new:
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id != APPLICATION_ID and not (app_id == 0 and {"notification", "work"} <= tables):
            what = ", ".join(sorted(tables)[:8]) or "no tables"
            raise InboxError(f"{path}: not an inbox (an SQLite database of something else: {what})")
        check = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":   # e.g. "*** in database main ***\nPage 6: ...": one line
            raise InboxError(f"{path}: the inbox is damaged: {' '.join(str(check).split())}")
        db.executescript(SCHEMA)                    # tables or indexes an earlier release lacked
        for table, column, kind in _ADDED:          # columns an earlier release lacked
            if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if app_id != APPLICATION_ID:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        raise InboxError(f"{path}: {describe(exc)}") from None


def describe(exc: sqlite3.Error) -> str:
    """One line for an SQLite error, in words an operator can act on."""
    text = " ".join(str(exc).split())
    if "readonly" in text or "read-only" in text:
        return f"the inbox is read-only ({text}); the receiver must be able to write it and its directory"
    if "unable to open" in text:
        return f"cannot open the inbox ({text}): check the file and directory permissions"
    if "malformed" in text or "not a database" in text:
        return f"the inbox is damaged ({text})"
    return text


def storable_text(error: str, limit: int = 2000) -> str:
    """An error message as it can be stored: valid UTF-8 (a lone surrogate from a hostile
    body is escaped, not a reason for the store to fail), at most ``limit`` characters."""
    return error.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]
