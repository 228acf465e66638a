"""The review's repro with real ``serve`` processes (issue 13): the inbox file of a running
receiver is deleted, a second receiver starts on the path, the first is killed. Nothing
the first acknowledged after the deletion may be lost: it answers 503 instead, and
/healthz says why. The FHIR server is a closed loopback port (notifications are stored
all the same)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.receiver_process import SECRET, Receiver, inbox_rows

OBSERVATION = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "size"},
               "subject": {"reference": "Patient/p1"}}


def closed_fhir() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/fhir"


def notify(receiver: Receiver) -> requests.Response:
    return requests.put(f"{receiver.endpoint}/Observation/o1", json=OBSERVATION, timeout=10,
                        headers={"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"})


def test_a_deleted_inbox_is_not_acknowledged_into_and_a_second_receiver_loses_nothing(tmp_path):
    fhir = closed_fhir()
    path = tmp_path / "inbox.sqlite"
    first = Receiver(fhir, path).start()
    second = Receiver(fhir, path)
    second.log = tmp_path / "second.log"
    try:
        assert notify(first).status_code == 200
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        r = notify(first)
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        health = requests.get(f"{first.url}/healthz", timeout=10)
        assert health.status_code == 503
        assert any(f"the inbox file {path} was removed or replaced" in reason
                   for reason in health.json()["reasons"]), health.text
        second.start()
        assert notify(second).status_code == 200
        first.kill()
        assert notify(second).status_code == 200
    finally:
        first.kill()
        second.stop()
    notes, _ = inbox_rows(path)
    assert len(notes) == 2   # every notification acknowledged after the deletion is in the inbox
    out = subprocess.run([sys.executable, "-m", "clm_stratify", "inbox", "--inbox", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "notifications_" in out.stdout, out.stderr
