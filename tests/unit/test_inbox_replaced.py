"""The inbox file removed or replaced while a receiver serves it (issue 13, review):
nothing is acknowledged that lands in a file nobody will read again, and /healthz says
why. The app in process on a real inbox file; the files are removed and moved for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from clm_stratify.service.health import Health
from clm_stratify.service.inbox import Inbox, InboxError
from clm_stratify.service.receiver import ReceiverConfig, create_app

SECRET = "s" * 32
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
OBSERVATION = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "size"},
               "subject": {"reference": "Patient/p1"}}
REASON = "was removed or replaced"


def serving(path: Path) -> tuple[Inbox, TestClient]:
    box = Inbox(path, serve=True)
    box.claim()
    return box, TestClient(create_app(box, ReceiverConfig(secret=SECRET), Health(box, lambda: None)))


def notify(http: TestClient) -> int:
    return http.put("/notify/Observation/o1", json=OBSERVATION, headers=HEADERS).status_code


def test_a_deleted_inbox_file_gets_503_and_a_second_receiver_then_owns_the_path(tmp_path):
    path = tmp_path / "inbox.sqlite"
    box, http = serving(path)
    with http:
        assert notify(http) == 200 and http.get("/healthz").status_code == 200
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        r = http.put("/notify/Observation/o1", json=OBSERVATION, headers=HEADERS)
        assert r.status_code == 503 and r.headers["Retry-After"] == "30", r.text   # not acknowledged
        health = http.get("/healthz")
        assert health.status_code == 503
        assert any(f"the inbox file {path} {REASON}" in reason for reason in health.json()["reasons"])
        assert notify(http) == 503   # every later one too
        # A second receiver on the path gets the new file; what it acknowledges is in the file at the path.
        second, http2 = serving(path)
        with http2:
            assert notify(http2) == 200 and http2.get("/healthz").status_code == 200
        assert Inbox(path, create=False).depth() == {"notifications_new": 1}
        second.close()
    box.close()


def test_an_inbox_file_replaced_by_another_gets_503(tmp_path):
    path = tmp_path / "inbox.sqlite"
    other = tmp_path / "other.sqlite"
    Inbox(other).close()
    box, http = serving(path)
    with http:
        assert notify(http) == 200
        # (its -wal emptied first: the -wal at the path would be applied to whatever file is moved there)
        box._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.replace(other, path)   # another inbox moved over the served one (mv other.sqlite inbox.sqlite)
        assert notify(http) == 503
        assert any(REASON in reason for reason in http.get("/healthz").json()["reasons"])
    assert Inbox(path, create=False).depth() == {}   # nothing went into the file now at the path (nor its -wal)
    box.close()


def test_a_symbolic_link_pointed_elsewhere_is_a_replacement(tmp_path):
    (tmp_path / "a.sqlite").touch()
    Inbox(tmp_path / "b.sqlite").close()
    (tmp_path / "a.sqlite").unlink()
    Inbox(tmp_path / "a.sqlite").close()
    link = tmp_path / "inbox.sqlite"
    link.symlink_to(tmp_path / "a.sqlite")
    box = Inbox(link)
    assert box.replaced() is None
    box.accept("{}")
    link.unlink()
    link.symlink_to(tmp_path / "b.sqlite")
    assert REASON in box.replaced()
    with pytest.raises(InboxError, match=REASON):   # claimed only as the file it opened
        box.claim()
    box.close()


@pytest.mark.parametrize("sidecars", [("-wal", "-shm"), ("-wal",)])
def test_a_deleted_write_ahead_log_gets_503_before_anything_more_is_acknowledged(tmp_path, sidecars):
    """The -wal holds every commit not yet checkpointed: removed under a running receiver,
    what it acknowledged is gone with it (adversarial review: 200s went on, then the inbox
    had no tables). Now nothing more is acknowledged, and /healthz says why."""
    path = tmp_path / "inbox.sqlite"
    box, http = serving(path)
    with http:
        assert notify(http) == 200
        for suffix in sidecars:
            Path(f"{path}{suffix}").unlink()
        assert notify(http) == 503
        health = http.get("/healthz")
        assert health.status_code == 503
        assert any(f"{path}-wal {REASON}" in reason for reason in health.json()["reasons"]), health.json()
    box.close()
