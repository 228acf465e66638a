"""Inbox file problems: one line, exit 2, no traceback; an existing file is never
re-initialised; nothing is acknowledged that was not stored (issue 13, part 3)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from clm_stratify.cli import main
from clm_stratify.service.inbox import Inbox, InboxError
from clm_stratify.service.inbox_file import APPLICATION_ID
from fhir_adapters.fhir.reference import PatientRef

SERVE = ["serve", "--fhir-url", "http://127.0.0.1:9/fhir"]


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", "s" * 32)


def refused(capsys, path: Path, words: str) -> None:
    """``inbox`` and ``serve`` both refuse ``path`` with one line holding ``words``."""
    for argv in (["inbox", "--inbox", str(path)], [*SERVE, "--inbox", str(path)]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (argv, captured.err)
        assert "Traceback" not in captured.err + captured.out


def test_a_zero_byte_file_is_refused_and_left_as_it_was(tmp_path, capsys):
    path = tmp_path / "inbox.sqlite"
    path.touch()
    refused(capsys, path, "empty (0 bytes)")
    assert path.stat().st_size == 0 and not (tmp_path / "inbox.sqlite-wal").exists()


def test_a_file_of_another_program_is_refused(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to have a header of a hundred bytes " * 3)
    refused(capsys, text, "not an SQLite database file")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE patients (id TEXT)")
    db.close()
    refused(capsys, other, "something else: patients")
    with sqlite3.connect(other) as db:   # untouched: no inbox table appeared
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["patients"]
    db.close()


def _inbox_with_rows(path: Path, n: int) -> None:
    box = Inbox(path)
    for i in range(n):
        box.resolve(box.accept('{"style": "rest-hook-empty", "kind": "empty"}' + " " * 300), {PatientRef(f"p{i}")})
    box._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()


def test_a_truncated_inbox_is_refused(tmp_path, capsys):
    path = tmp_path / "inbox.sqlite"
    _inbox_with_rows(path, 300)
    size = path.stat().st_size
    assert size > 40_000
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    refused(capsys, path, "damaged")
    with open(path, "r+b") as f:
        f.truncate(50)
    refused(capsys, path, "truncated (50 bytes)")


def test_a_missing_directory_is_named_and_not_created(tmp_path, capsys):
    path = tmp_path / "no-such-dir" / "inbox.sqlite"
    assert main([*SERVE, "--inbox", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the directory" in err and "does not exist" in err and err.count("\n") == 1
    assert not path.parent.exists()
    assert main(["inbox", "--inbox", str(path)]) == 2
    assert "no inbox there" in capsys.readouterr().err


def test_an_inbox_of_an_earlier_release_is_opened_and_brought_up_to_date(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:   # the 0.1 layout: no application id, no first_received_at
        db.executescript("""
            CREATE TABLE notification (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,
                body TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'new', attempts INTEGER NOT NULL DEFAULT 0,
                next_at REAL NOT NULL, last_error TEXT);
            CREATE TABLE work (id INTEGER PRIMARY KEY AUTOINCREMENT, patient TEXT NOT NULL, state TEXT NOT NULL,
                due_at REAL NOT NULL, lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0,
                notifications INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL, updated_at REAL NOT NULL,
                last_error TEXT, result TEXT);
            INSERT INTO work (patient, state, due_at, created_at, updated_at) VALUES ('p1', 'pending', 0, 0, 0);
        """)
    db.close()
    box = Inbox(path)
    item = box.take()
    assert item.patient == PatientRef("p1") and item.first_received_at is None
    assert box.done(item, "unchanged") is None   # latency unknown for a row of an earlier release
    assert box._db().execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def _without_override(argv: list[str]) -> list[str] | None:
    """``argv`` run so that file modes apply: root ignores them (CAP_DAC_OVERRIDE), so as
    root it runs without that capability (``setpriv``), still as the owner of the files."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", *argv] if setpriv else None


def test_read_only_file_and_directory(tmp_path):
    base = tmp_path / "ro"
    base.mkdir()
    path = base / "inbox.sqlite"
    _inbox_with_rows(path, 3)
    closed = tmp_path / "closed"
    closed.mkdir()
    os.chmod(path, 0o444)
    os.chmod(base, 0o555)
    os.chmod(closed, 0o000)
    env = {**os.environ, "CLM_SUBSCRIPTION_SECRET": "s" * 32}
    try:
        for argv, words in ((["inbox", "--inbox", str(path)], "read-only"),
                            ([*SERVE, "--inbox", str(path)], "read-only"),
                            ([*SERVE, "--inbox", str(base / "new.sqlite")], "is not writable"),
                            ([*SERVE, "--inbox", str(closed / "new.sqlite")], "cannot reach")):
            cmd = _without_override([sys.executable, "-m", "clm_stratify", *argv])
            if cmd is None:
                pytest.skip("running as root without setpriv: file modes cannot be tested")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
            assert proc.returncode == 2, (argv, proc.stderr)
            assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
            assert words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    finally:
        os.chmod(closed, 0o755)
        os.chmod(base, 0o755)
        os.chmod(path, 0o644)


def test_a_full_inbox_answers_503_and_stores_nothing(tmp_path):
    """The inbox capped at its size (SQLite's own 'database or disk is full', not a mock):
    the receiver says 503 with Retry-After and /healthz says why; nothing is stored."""
    from starlette.testclient import TestClient

    from clm_stratify.service.receiver import ReceiverConfig, create_app

    path = tmp_path / "inbox.sqlite"
    Inbox(path).close()
    box = Inbox(path, max_bytes=64 * 1024)
    body = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "size"},
            "subject": {"reference": "Patient/p1"}, "note": [{"text": "x" * 2000}]}
    headers = {"X-CLM-Subscription-Secret": "s" * 32, "Content-Type": "application/fhir+json"}
    with TestClient(create_app(box, ReceiverConfig(secret="s" * 32))) as http:
        codes = []
        for _ in range(200):   # bounded: 64 kB fill up long before
            codes.append(http.post("/notify/Observation/o1", json=body, headers=headers).status_code)
            if codes[-1] != 200:
                break
        assert codes[-1] == 503 and set(codes[:-1]) == {200}, codes
        stored = box.depth().get("notifications_new", 0)
        assert stored == len(codes) - 1
        r = http.post("/notify/Observation/o1", json=body, headers=headers)
        assert r.status_code == 503 and r.headers["Retry-After"] == "30"
        assert box.depth().get("notifications_new", 0) == stored
        health = http.get("/healthz")
        assert health.status_code == 503
        assert any("cannot be written" in reason and "full" in reason for reason in health.json()["reasons"])
        metrics = http.get("/metrics").text
        assert 'clm_notifications_rejected_total{status="503"} 2.0' in metrics


def test_inbox_command_refuses_a_directory(tmp_path, capsys):
    refused(capsys, tmp_path, "is a directory")
    with pytest.raises(InboxError):
        Inbox(tmp_path)


def test_a_refused_file_of_another_program_is_left_byte_for_byte(tmp_path, capsys):
    """Adversary: the refusal came after the file had been switched to WAL mode."""
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE patients (id TEXT)")
    db.close()
    before = other.read_bytes()
    refused(capsys, other, "something else")
    assert other.read_bytes() == before and not Path(f"{other}-wal").exists()


def test_a_write_ahead_log_without_its_inbox_file_is_not_overwritten(tmp_path, capsys):
    """Adversary: most of a running inbox's data is in its -wal file; a new inbox created
    beside it replaced it."""
    path = tmp_path / "inbox.sqlite"
    Path(f"{path}-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 4096)
    assert main([*SERVE, "--inbox", str(path)]) == 2
    assert "write-ahead log" in capsys.readouterr().err
    assert not path.exists() and Path(f"{path}-wal").stat().st_size == 4100


def test_another_name_for_the_same_inbox_meets_the_same_lock(tmp_path):
    """Adversary: the lock was PATH.lock, so a symbolic or hard link started a second receiver."""
    path = tmp_path / "inbox.sqlite"
    serving = Inbox(path)
    serving.claim()
    (tmp_path / "soft.sqlite").symlink_to(path)
    os.link(path, tmp_path / "hard.sqlite")
    for other in ("soft.sqlite", "hard.sqlite"):
        with pytest.raises(InboxError, match="already served"):
            Inbox(tmp_path / other, serve=True).claim()
    serving.close()


@pytest.mark.parametrize("option", [["--workers", "0"], ["--max-attempts", "0"], ["--port", "70000"],
                                    ["--coalesce", "nan"], ["--max-body", "0"], ["--inbox-max-mb", "0"]])
def test_serve_refuses_options_that_make_a_receiver_that_never_works(tmp_path, capsys, option):
    assert main([*SERVE, "--inbox", str(tmp_path / "i.sqlite"), *option]) == 2
    assert option[0] in capsys.readouterr().err
    assert not (tmp_path / "i.sqlite").exists()


def test_a_dangling_symbolic_link_is_refused_and_nothing_created(tmp_path, capsys):
    """Review: the inbox was created at the link's target, where `inbox` then found nothing."""
    (tmp_path / "target-dir").mkdir()
    for target in (tmp_path / "target-dir" / "inbox.sqlite", Path("/nonexistent/clm/inbox.sqlite")):
        link = tmp_path / "link.sqlite"
        link.symlink_to(target)
        refused(capsys, link, f"a symbolic link to {target}, which does not exist")
        assert not target.exists() and list((tmp_path / "target-dir").iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link.sqlite", "target-dir"]
        link.unlink()


def _wal_mode_file_without_tables(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA user_version = 7")
    db.close()


def test_a_refused_file_leaves_no_write_ahead_log_or_shared_memory_file(tmp_path, capsys):
    """Review: opening a refused truncated or tableless file left -wal/-shm files beside it."""
    truncated = tmp_path / "inbox.sqlite"
    _inbox_with_rows(truncated, 300)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    tableless = tmp_path / "tableless.sqlite"
    _wal_mode_file_without_tables(tableless)
    refused(capsys, truncated, "damaged")
    refused(capsys, tableless, "no tables")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inbox.sqlite", "tableless.sqlite"]


def test_sidecars_that_were_there_before_are_left(tmp_path, capsys):
    tableless = tmp_path / "tableless.sqlite"
    _wal_mode_file_without_tables(tableless)
    for suffix in ("-wal", "-shm"):
        Path(f"{tableless}{suffix}").write_bytes(b"")
    refused(capsys, tableless, "no tables")
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["tableless.sqlite", "tableless.sqlite-shm", "tableless.sqlite-wal"]


def test_a_damaged_page_is_named_on_one_line(tmp_path, capsys):
    """Review: the quick_check text ("*** in database main ***" NEWLINE "Page 6: ...") made two lines."""
    path = tmp_path / "inbox.sqlite"
    _inbox_with_rows(path, 300)
    data = bytearray(path.read_bytes())
    data[4096 * 5:4096 * 5 + 200] = b"\xff" * 200   # page 6: a btree page of the inbox
    path.write_bytes(bytes(data))
    refused(capsys, path, "the inbox is damaged: *** in database main *** Page 6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inbox.sqlite"]


def test_an_inbox_of_release_two_gets_the_event_digest_and_dead_time_columns(tmp_path):
    path = tmp_path / "v2.sqlite"
    box = Inbox(path)
    box.resolve(box.accept("{}"), set(), events=("Subscription/s", [(1, "a1")]))
    box.close()
    with sqlite3.connect(path) as db:   # back to the layout of schema version 2
        db.executescript("""
            CREATE TABLE old_seen (subscription TEXT NOT NULL, event_number INTEGER NOT NULL,
                PRIMARY KEY (subscription, event_number));
            INSERT INTO old_seen SELECT subscription, event_number FROM seen_event;
            DROP TABLE seen_event; ALTER TABLE old_seen RENAME TO seen_event;
            ALTER TABLE notification DROP COLUMN dead_at; PRAGMA user_version = 2;""")
    db.close()
    box = Inbox(path, max_attempts=1)
    assert box.seen_events("Subscription/s", [1]) == {1: None}   # kept: a duplicate as before
    box.resolve(box.accept("{}"), set(), events=("Subscription/s", [(1, "a1"), (2, "a2")]))
    assert box.seen_events("Subscription/s", [1, 2]) == {1: "a1", 2: "a2"}
    nid = box.accept("{}")
    box.notification_failed(nid, "boom")
    assert box.dead_letters()[0]["at"] is not None
    assert box._db().execute("PRAGMA user_version").fetchone()[0] == 3
