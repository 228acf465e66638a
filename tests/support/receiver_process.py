"""Run ``clm-stratify serve`` as a real process on 127.0.0.1 for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import requests

SECRET = "test-subscription-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    def __init__(self, fhir_url: str, inbox: Path, port: int | None = None, *extra: str):
        self.fhir_url, self.inbox = fhir_url, inbox
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = inbox.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.url}/notify"

    def start(self) -> "Receiver":
        env = {**os.environ, "CLM_SUBSCRIPTION_SECRET": SECRET}
        cmd = [sys.executable, "-m", "clm_stratify", "serve", "--fhir-url", self.fhir_url,
               "--port", str(self.port), "--inbox", str(self.inbox), *self.extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited: {self.log.read_text()[-2000:]}")
            try:
                r = requests.get(f"{self.url}/healthz", timeout=5)
                if r.status_code in (200, 503) and "status" in r.json():   # up (ok or degraded)
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"receiver did not start: {self.log.read_text()[-2000:]}")

    def health(self) -> dict:
        return requests.get(f"{self.url}/healthz", timeout=5).json()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Until nothing is waiting in the inbox (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if h["inbox_depth"] == 0:
                return h
            time.sleep(0.1)
        raise AssertionError(f"inbox still busy after {timeout}s: {self.health()}")


def inbox_rows(path: Path) -> tuple[list[tuple], list[tuple]]:
    """The receiver inbox's ``(id, state, body)`` notifications and ``(id, patient, state,
    notifications)`` work rows."""
    db = sqlite3.connect(path)
    try:
        notes = db.execute("SELECT id, state, body FROM notification ORDER BY id").fetchall()
        work = db.execute("SELECT id, patient, state, notifications FROM work ORDER BY id").fetchall()
    finally:
        db.close()
    return notes, work


def patient_of(body: str) -> str:
    """The patient id a stored notification body is about."""
    return json.loads(body)["events"][0]["patient"].split("/", 1)[1]


def wait_until(what: str, check, timeout: float = 30.0):
    """``check()``'s first truthy value, polled every 0.1 s; AssertionError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")
