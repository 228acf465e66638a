"""Medplum's FHIR engine as a second real FHIR server on loopback (the tests' peer of SEKMET).

``tests/support/medplum/server.mjs`` serves ``@medplum/fhir-router`` (``FhirRouter`` over a
``MemoryRepository``, versions pinned in ``package.json`` / ``package-lock.json``) behind
a front as thin as Medplum's own server (see the file). Its npm packages are installed on
first use with ``npm ci`` (``.ci/run`` installs them up front), so the README's test
command works on a fresh machine with Node and npm.

What this server does unlike SEKMET (measured; ``docs/interop.md``): it assigns ids
(``updateCreate: false`` in its CapabilityStatement), never pages (no ``next`` link,
``Bundle.total`` given), splits token values on every ``|``, and stores Subscriptions
without ever notifying. Data lives in memory: a restart empties it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import requests

import sys

from fhir_adapters.fhir.local_server import _die_with_parent, free_port

PEER_DIR = Path(__file__).resolve().parent / "medplum"
_INSTALLED_MARK = PEER_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json"


class MedplumUnavailable(RuntimeError):
    """Node/npm is missing, the npm install failed, or the server did not start."""


def ensure_installed(timeout: float = 600.0) -> None:
    """``npm ci`` the pinned Medplum packages unless they are already installed."""
    if _INSTALLED_MARK.is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise MedplumUnavailable("npm is not installed: the Medplum test peer needs Node 20+ and npm")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEER_DIR,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not _INSTALLED_MARK.is_file():
        raise MedplumUnavailable(f"npm ci in {PEER_DIR} failed ({done.returncode}): {done.stderr[-2000:]}")


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise MedplumUnavailable("node is not installed: the Medplum test peer needs Node 20+")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = int(version.lstrip("v").split(".")[0] or 0)
    if major < 20:
        raise MedplumUnavailable(f"Node {version} is too old for Medplum 5 (20+ needed)")
    # Node 20 has WebSocket (used by @medplum/core) only behind a flag; Node 22+ has it by default.
    return [node, "--experimental-websocket"] if major < 22 else [node]


class MedplumServer:
    """A Medplum FHIR engine on ``127.0.0.1:<free port>``, base ``.../fhir/R4``."""

    def __init__(self, log_dir: Path, *, port: int | None = None, startup_timeout: float = 60.0) -> None:
        self.port = port or free_port()
        self.log_path = Path(log_dir) / "medplum.log"
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MedplumServer:
        ensure_installed()
        cmd = [*node_command(), str(PEER_DIR / "server.mjs"), "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, cwd=PEER_DIR, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "NODE_NO_WARNINGS": "1"},
                                          # SIGTERM the server if the process that started it dies
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MedplumUnavailable(f"the Medplum peer exited ({self._proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base_url}/metadata", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise MedplumUnavailable(f"the Medplum peer did not answer within {self.startup_timeout:.0f} s:\n"
                                 f"{self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    close = stop

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> MedplumServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
