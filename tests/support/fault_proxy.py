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
import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import urlsplit

from tests.support.http import LoopbackServer, operation_outcome, read_body, reset_connection, send

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
        self._server: LoopbackServer | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    @property
    def root_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/fhir"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FaultProxy":
        self._server = LoopbackServer(self._handle, http11=True, tls=self.tls, name="fault-proxy")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

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

    # ------------------------------------------------------------------ serving
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = read_body(h)
        method, path = h.command, h.path
        fault = self.decide(method, path, body)
        self.log.append((method, path.split("?")[0], fault or "forward"))
        if fault == "500":
            return _answer(h, 500, "injected internal error")
        if fault == "503":
            return _answer(h, 503, "injected: service unavailable")
        if fault == "429":
            return _answer(h, 429, "injected: too many requests", {"Retry-After": str(self.retry_after)})
        if fault == "reset":
            return reset_connection(h)
        if fault == "delay":
            time.sleep(self.delay)
            return reset_connection(h)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
        headers["Host"] = f"{self.upstream_host}:{self.upstream_port}"
        data = self.rewrite_request(body)
        if data:
            headers["Content-Length"] = str(len(data))
        try:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
            conn.request(method, path, body=data or None, headers=headers)
            resp = conn.getresponse()
            reply = resp.read()
            status, reply_headers = resp.status, resp.getheaders()
            conn.close()
        except OSError:
            with self.lock:
                self.log.append((method, path.split("?")[0], "upstream down: reset"))
            return reset_connection(h)
        with self.lock:
            self.forwarded += 1
        if fault == "lost-reply":
            reset_connection(h)
        else:
            relayed = [(k, self.rewrite_reply(v.encode("latin-1")).decode("latin-1"))
                       for k, v in reply_headers if k.lower() not in _HOP]
            try:
                send(h, status, self.rewrite_reply(reply), ctype=None, headers=relayed)
                h.wfile.flush()
            except OSError:
                pass
        if self.after_forward is not None:
            self.after_forward(method, path, body, status)


def is_transaction(body: bytes) -> bool:
    """True for a FHIR transaction Bundle (the RiskAssessment + Provenance write)."""
    head = body[:200].replace(b" ", b"")
    if b'"resourceType":"Bundle"' not in head and b"transaction" not in body[:4000]:
        return False
    try:
        return json.loads(body).get("type") == "transaction"
    except (ValueError, AttributeError):
        return False


def _answer(h: BaseHTTPRequestHandler, status: int, text: str, extra: dict[str, str] | None = None) -> None:
    send(h, status, operation_outcome("transient", text), ctype="application/fhir+json", headers=extra)
