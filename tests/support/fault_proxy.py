"""A loopback fault-injecting HTTP proxy for the reliability tests.

It sits between clm-stratify and a real SEKMET FHIR server and, per request, either
forwards it or makes one of the faults below happen for real on the TCP connection::

    with FaultProxy(server.root_url, seed=7, shares={"503": 0.1, "reset": 0.1}, max_faults=20) as proxy:
        main(["run", "--fhir-url", proxy.base_url, "--all"])
        proxy.faults            # Counter({'503': 3, 'reset': 2})

Faults (the keys of ``shares``):

* ``"500"``, ``"503"``: that status with an OperationOutcome; the request is not forwarded.
* ``"429"``: 429 with ``Retry-After: <retry_after>``; not forwarded.
* ``"reset"``: the client connection is reset (RST) before anything is forwarded.
* ``"delay"``: nothing is answered for ``delay`` seconds (past the client's read
  timeout), then the connection is closed; not forwarded.
* ``"lost-reply"``: the request **is** forwarded and processed by the server, then the
  client connection is reset instead of relaying the reply (a write that succeeded
  while its answer was lost).

Choices come from a seeded :class:`random.Random` (reproducible for one request order),
and at most ``max_faults`` faults are injected in total (after that the proxy is
transparent), so every test loop that retries is bounded. ``script`` (a callable
``(method, path, body) -> fault or None``) overrides the random choice, and
``after_forward`` (``(method, path, body, status) -> None``) runs after a reply was
relayed (the server-kill test kills SEKMET there). When the upstream refuses the
connection (the server is dead), the client connection is reset, as a load balancer
in front of a dead server would.

SEKMET writes its own base URL into ``Location`` headers, ``fullUrl``s and ``next``
links; the proxy rewrites the upstream origin to its own in replies (and back in
request bodies), so a client talking to the proxy stays on the proxy. With ``tls``
(an ``ssl.SSLContext``) the proxy serves HTTPS (the TLS verification tests).

Only 127.0.0.1. Standard library only.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

FAULTS = ("500", "503", "429", "reset", "delay", "lost-reply")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te",
        "trailer", "upgrade", "content-encoding"}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, shares: dict[str, float] | None = None,
                 max_faults: int | None = None, delay: float = 2.0, retry_after: int = 1,
                 script: Callable[[str, str, bytes], str | None] | None = None,
                 after_forward: Callable[[str, str, bytes, int], None] | None = None,
                 tls: ssl.SSLContext | None = None, upstream_timeout: float = 60.0) -> None:
        u = urlsplit(upstream)
        assert u.hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.upstream_origin = f"{u.scheme}://{u.hostname}:{u.port}".encode()
        self.shares = dict(shares or {})
        unknown = set(self.shares) - set(FAULTS)
        assert not unknown, f"unknown faults {unknown}"
        self.max_faults = max_faults
        self.delay = delay
        self.retry_after = retry_after
        self.script = script
        self.after_forward = after_forward
        self.tls = tls
        self.upstream_timeout = upstream_timeout
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.forwarded = 0
        self.faults: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []   # (method, path, what happened)
        self.enabled = True
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def root_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/fhir"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ decisions
    def decide(self, method: str, path: str, body: bytes) -> str | None:
        with self.lock:
            self.requests += 1
            if not self.enabled:
                return None
            if self.max_faults is not None and sum(self.faults.values()) >= self.max_faults:
                return None
            fault = self.script(method, path, body) if self.script else None
            if fault is None and self.shares:
                x = self.rng.random()
                for name, share in self.shares.items():
                    if x < share:
                        fault = name
                        break
                    x -= share
            if fault is not None:
                self.faults[fault] += 1
            return fault

    def rewrite_reply(self, data: bytes) -> bytes:
        return data.replace(self.upstream_origin, self.root_url.encode())

    def rewrite_request(self, data: bytes) -> bytes:
        return data.replace(self.root_url.encode(), self.upstream_origin)


def is_transaction(body: bytes) -> bool:
    """True for a FHIR transaction Bundle (the RiskAssessment + Provenance write)."""
    head = body[:200].replace(b" ", b"")
    if b'"resourceType":"Bundle"' not in head and b"transaction" not in body[:4000]:
        return False
    try:
        return json.loads(body).get("type") == "transaction"
    except (ValueError, AttributeError):
        return False


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def _reset(self) -> None:
        """Close the client connection with a TCP RST (no reply at all)."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def _answer(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "transient", "diagnostics": text}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        p = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        method, path = self.command, self.path
        fault = p.decide(method, path, body)
        p.log.append((method, path.split("?")[0], fault or "forward"))
        if fault == "500":
            return self._answer(500, "injected internal error")
        if fault == "503":
            return self._answer(503, "injected: service unavailable")
        if fault == "429":
            return self._answer(429, "injected: too many requests", {"Retry-After": str(p.retry_after)})
        if fault == "reset":
            return self._reset()
        if fault == "delay":
            time.sleep(p.delay)
            return self._reset()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
        headers["Host"] = f"{p.upstream_host}:{p.upstream_port}"
        data = p.rewrite_request(body)
        if data:
            headers["Content-Length"] = str(len(data))
        try:
            conn = http.client.HTTPConnection(p.upstream_host, p.upstream_port, timeout=p.upstream_timeout)
            conn.request(method, path, body=data or None, headers=headers)
            resp = conn.getresponse()
            reply = resp.read()
            status, reply_headers = resp.status, resp.getheaders()
            conn.close()
        except OSError:
            with p.lock:
                p.log.append((method, path.split("?")[0], "upstream down: reset"))
            return self._reset()
        with p.lock:
            p.forwarded += 1
        if fault == "lost-reply":
            self._reset()
        else:
            reply = p.rewrite_reply(reply)
            self.send_response(status)
            for k, v in reply_headers:
                if k.lower() not in _HOP:
                    self.send_header(k, p.rewrite_reply(v.encode("latin-1")).decode("latin-1"))
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            try:
                self.wfile.write(reply)
                self.wfile.flush()
            except OSError:
                pass
        if p.after_forward is not None:
            p.after_forward(method, path, body, status)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle
