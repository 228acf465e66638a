"""Run a private SEKMET FHIR R4 server (PyPI ``sekmet-fhir==0.1.1``) as a child process.

Used by the integration tests, the demo and the benchmarks::

    with LocalFhirServer(data_dir=tmp_path) as server:
        requests.get(f"{server.base_url}/metadata")

What the class does, and why (see ``docs/sekmet-notes.md`` for the checked facts):

* SEKMET reads a settings file (``--config``; YAML, so the JSON we write is fine).
  We write ``<data_dir>/settings.yaml`` with ``host: 127.0.0.1``, a free port, a
  ``base_url`` that matches it (SEKMET puts ``base_url`` in ``Location`` headers,
  ``fullUrl``s, ``next`` links and checks it as the token audience), the database
  file, ``data_dir`` (bulk-export NDJSON goes to ``<data_dir>/bulk``), the
  workflow simulator off, no peers and inbound auth ``none`` (or ``smart``).
* Inherited ``SEKMET_DB`` / ``SEKMET_PORT`` / ``SEKMET_BASE_URL`` /
  ``SEKMET_PUBLIC_URL`` / ``SEKMET_CONFIG`` variables would override the file, so
  they are removed from the child's environment; the child also runs with
  ``cwd=data_dir`` so nothing lands in the caller's working directory.
* stdout/stderr go to ``<data_dir>/sekmet.log`` (a file, never a pipe).
* SEKMET's traffic log (every request and response body) and subscription
  state are tables inside the same SQLite file.

Only the standard library and ``requests`` are used.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

__all__ = ["LocalFhirServer", "SekmetStartError", "find_sekmet_command", "free_port"]

_STRIPPED_ENV = ("SEKMET_DB", "SEKMET_PORT", "SEKMET_BASE_URL", "SEKMET_PUBLIC_URL", "SEKMET_CONFIG")
_PR_SET_PDEATHSIG = 1


class SekmetStartError(RuntimeError):
    """The server process exited or did not answer ``/metadata`` in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_sekmet_command() -> list[str]:
    """The command that runs the ``sekmet`` CLI.

    Order: ``$SEKMET_EXECUTABLE``; ``sekmet`` next to ``sys.executable`` (the active
    venv); ``sekmet`` on ``PATH``; else ``python -c`` importing ``sekmet.cli`` (the
    package has no ``__main__``, so ``python -m sekmet`` does not work).
    """
    explicit = os.environ.get("SEKMET_EXECUTABLE")
    if explicit:
        return [explicit]
    beside = Path(sys.executable).with_name("sekmet")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("sekmet")
    if on_path:
        return [on_path]
    return [sys.executable, "-c", "import sys; from sekmet.cli import app; sys.argv[0] = 'sekmet'; app()"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server if the process (thread) that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class LocalFhirServer:
    """A SEKMET server on ``127.0.0.1:<free port>`` with its own SQLite file.

    Args:
        data_dir: directory for ``settings.yaml``, ``sekmet.db``, ``sekmet.log`` and
            bulk-export files. Default: a temporary directory removed on ``close()``.
        port: TCP port; default a free ephemeral port (kept across restarts).
        smart_clients: ``{client_id: jwks}`` to register SMART Backend Services
            clients (``private_key_jwt``, RS384/ES384/RS256/ES256). When given, the
            server requires a bearer token on ``/fhir`` (``/metadata`` stays open);
            tokens come from :attr:`token_url` (``client_credentials``).
        smart_scopes: scopes granted to every registered client (SMART v1 or v2).
        settings: extra SEKMET settings merged over ours, e.g.
            ``{"validation": {"inbound": "warn"}, "log_inbound": False}``.
        startup_timeout: seconds to wait for ``GET /metadata`` to answer 200.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.
        die_with_parent: ask Linux to SIGTERM the server if the thread that
            started it dies (keeps crashed test runs from leaking servers).
            Turn it off when starting from a short-lived thread.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        smart_clients: Mapping[str, Mapping[str, Any]] | None = None,
        smart_scopes: str = "system/*.*",
        settings: Mapping[str, Any] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        die_with_parent: bool = True,
        public_url: str | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="sekmet-")).resolve()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.smart_clients = {k: dict(v) for k, v in (smart_clients or {}).items()}
        self.smart_scopes = smart_scopes
        self.extra_settings = dict(settings or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        # The FHIR base the server names in its absolute URLs when it is reached through
        # something else (a loopback latency or fault proxy); default: its own address.
        self.public_url = public_url.rstrip("/") if public_url else None
        self._proc: subprocess.Popen[bytes] | None = None

    # ---------------- paths and URLs ----------------

    @property
    def root_url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:53211``."""
        return f"http://{self.host}:{self.port}"

    @property
    def direct_url(self) -> str:
        """FHIR base on the server's own port, e.g. ``http://127.0.0.1:53211/fhir``."""
        return f"{self.root_url}/fhir"

    @property
    def base_url(self) -> str:
        """FHIR base clients use (``public_url`` when given; no trailing slash)."""
        return self.public_url or self.direct_url

    @property
    def token_url(self) -> str:
        """SMART token endpoint; the client assertion ``aud`` must be exactly this."""
        return f"{self.root_url}/auth/token"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "sekmet.db"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "sekmet.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "settings.yaml"

    @property
    def pid(self) -> int | None:
        """PID of the running server, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # ---------------- settings ----------------

    def sekmet_settings(self) -> dict[str, Any]:
        """The settings written to ``settings.yaml`` (JSON is valid YAML)."""
        auth: dict[str, Any] = {"types": ["none"]}
        if self.smart_clients:
            auth = {
                "types": ["smart"],
                "smart_clients": [
                    {"client_id": cid, "jwks": jwks, "scopes": self.smart_scopes}
                    for cid, jwks in self.smart_clients.items()
                ],
                "enforce_scopes": True,
            }
        base: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "base_url": self.base_url,
            "data_dir": str(self.data_dir),
            "db_path": str(self.db_path),
            "own_private_key_path": str(self.data_dir / "keys" / "sekmet_private.pem"),
            "simulator": {"enabled": False},
            "server_auth": auth,
            "peers": {},
        }
        return _merge(base, self.extra_settings)

    # ---------------- lifecycle ----------------

    def start(self) -> LocalFhirServer:
        """Start the server (no-op if running) and wait until ``/metadata`` answers 200."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.sekmet_settings(), indent=2))
        env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [*find_sekmet_command(), "serve", "--config", str(self.config_path),
               "--host", self.host, "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent and sys.platform == "linux" else None,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise SekmetStartError(
                    f"SEKMET exited with code {self._proc.returncode} during startup\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.direct_url}/metadata", timeout=2,
                                 headers={"Accept": "application/fhir+json"})
                if r.status_code == 200 and r.json().get("implementation", {}).get("url") == self.base_url:
                    return
                last_error = f"HTTP {r.status_code} (or a different server on port {self.port})"
            except (requests.RequestException, ValueError) as e:
                last_error = repr(e)
            time.sleep(0.1)
        raise SekmetStartError(
            f"SEKMET did not answer {self.base_url}/metadata within {self.startup_timeout:.0f} s "
            f"(last: {last_error})\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server, wait up to ``stop_timeout``, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout)
            except ProcessLookupError:
                pass
        proc.wait(timeout=self.stop_timeout)  # reap
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash; SQLite WAL keeps committed data)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=self.stop_timeout)
        self._proc = None

    def restart(self) -> LocalFhirServer:
        """Stop (if running) and start again on the same port with the same database."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server; remove ``data_dir`` if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalFhirServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---------------- diagnostics ----------------

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of ``sekmet.log`` (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "--- sekmet.log (tail) ---\n" + "\n".join(text[-lines:])

    def __repr__(self) -> str:
        return f"LocalFhirServer(base_url={self.base_url!r}, pid={self.pid}, data_dir={str(self.data_dir)!r})"
