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
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

APPLICATION_ID = 0x434C4D49   # "CLMI" in PRAGMA application_id
SCHEMA_VERSION = 2            # PRAGMA user_version; 2 added work.first_received_at
SQLITE_HEADER = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE IF NOT EXISTS notification (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    body TEXT NOT NULL,               -- the parsed Notification (JSON)
    state TEXT NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'resolved', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT
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
    PRIMARY KEY (subscription, event_number)
);
CREATE TABLE IF NOT EXISTS subscription_state (
    subscription TEXT PRIMARY KEY,
    last_event INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class InboxError(Exception):
    """The inbox file cannot be used; the message is one line naming the file."""


def check_file(path: str | Path, *, create: bool) -> bool:
    """Whether a new inbox is to be created at ``path`` (nothing there), after checking
    that an existing file looks like an SQLite database; raises :class:`InboxError`."""
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as exc:   # a directory on the way that may not be searched
        raise InboxError(f"{p}: cannot reach the inbox: {exc.strerror}") from None
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
        if check != "ok":
            raise InboxError(f"{path}: the inbox is damaged: {check}")
        columns = {r[1] for r in db.execute("PRAGMA table_info(work)")}
        if "first_received_at" not in columns:   # an inbox of an earlier release
            db.execute("ALTER TABLE work ADD COLUMN first_received_at REAL")
        db.executescript(SCHEMA)                    # tables or indexes an earlier release lacked
        if app_id != APPLICATION_ID:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        raise InboxError(f"{path}: {describe(exc)}") from None


def describe(exc: sqlite3.Error) -> str:
    """One line for an SQLite error, in words an operator can act on."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return f"the inbox is read-only ({text}); the receiver must be able to write it and its directory"
    if "unable to open" in text:
        return f"cannot open the inbox ({text}): check the file and directory permissions"
    if "malformed" in text or "not a database" in text:
        return f"the inbox is damaged ({text})"
    return text
