"""One loopback HTTP server for tests, and the reply helpers its handlers share::

    with LoopbackServer(lambda h: send(h, 200, {"ok": True})) as srv:
        requests.get(srv.url + "/anything")

``handle(h)`` gets the :class:`BaseHTTPRequestHandler` of every request (any method) and
answers it with :func:`send`, :func:`reset_connection` or the handler's own methods.
The server binds 127.0.0.1 port 0, serves from a daemon thread, and :meth:`close` shuts
it down and joins the thread (bounded). Errors of the network kind (resets, broken pipes,
client timeouts) in a handler are expected and not printed; other exceptions are.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handle = Callable[[BaseHTTPRequestHandler], None]
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class LoopbackServer:
    """``handle`` on ``http://127.0.0.1:<port>`` (``https`` with ``tls``), started at once.

    ``methods``: the ones ``handle`` gets (any other is answered 501 by the standard library);
    ``http11``: keep-alive connections (HTTP/1.1) instead of one request per connection;
    ``nodelay``: TCP_NODELAY on accepted connections (no Nagle stalls between headers and body).
    """

    def __init__(self, handle: Handle, *, methods: Iterable[str] = METHODS, http11: bool = False,
                 nodelay: bool = False, tls: ssl.SSLContext | None = None, name: str = "loopback-http") -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if http11 else "HTTP/1.0"
            disable_nagle_algorithm = nodelay

            def finish(self) -> None:
                try:
                    super().finish()
                except (OSError, ValueError):  # the connection was reset on purpose
                    pass

            def log_message(self, *args: object) -> None:  # quiet
                pass

        for method in methods:
            setattr(Handler, f"do_{method}", lambda h: handle(h))
        self._httpd: ThreadingHTTPServer | None = _Server(("127.0.0.1", 0), Handler)
        self.tls = tls
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port: int = self._httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            self._thread.join(timeout=5)

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # resets and client timeouts are expected here
            super().handle_error(request, client_address)


# --------------------------------------------------------------------------- replies

def read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body (by ``Content-Length``; empty without one)."""
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def send(h: BaseHTTPRequestHandler, status: int, body: object = None, *,
         ctype: str | None = "application/fhir+json; charset=utf-8",
         headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
    """Answer ``status`` with ``body``: None (empty), bytes or str (as they are), anything
    else as JSON. ``Content-Type: ctype`` only with a body (and a ``ctype``); ``headers``
    after it; ``Content-Length`` always; no body bytes to a HEAD."""
    data = body if isinstance(body, bytes) else b"" if body is None else \
        body.encode() if isinstance(body, str) else json.dumps(body).encode()
    h.send_response(status)
    if data and ctype:
        h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers.items() if isinstance(headers, Mapping) else headers or ()):
        h.send_header(k, v)
    h.end_headers()
    if data and h.command != "HEAD":
        h.wfile.write(data)


def operation_outcome(code: str, text: str) -> dict:
    """A one-issue error OperationOutcome."""
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def reset_connection(h: BaseHTTPRequestHandler) -> None:
    """Abort the client connection with a TCP RST (no reply at all)."""
    try:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        h.connection.close()
    except OSError:
        pass
    h.close_connection = True
