"""The HTTP server's own guards: slow or idle clients cannot hold connections open.

uvicorn closes a keep-alive connection that stays idle after a response, but it waits
forever for the headers and body of a request that has begun: a client that opens
connections and sends a few header bytes (or none, or a body one byte at a time) keeps
each of them, and a few thousand of them use up the process's file descriptors (every
request then fails, ``/healthz`` included). :func:`serve` runs the app with

* a **request deadline**: from a connection's first byte (or from its opening, or from
  the end of its previous response), the whole request, headers and body, must arrive
  within ``request_timeout`` seconds, else the connection is closed (nothing was stored:
  the app had not been given a complete body);
* a **connection cap** (``limit_concurrency``): beyond it, requests get 503 at once
  rather than taking more of the process's resources.

A request the app is still working on is never cut: the deadline covers reading only.
"""

from __future__ import annotations

import asyncio

REQUEST_TIMEOUT = 20.0      # seconds to receive one request's headers and body
MAX_CONNECTIONS = 512       # open connections (and requests in progress) before 503s


def guarded_protocol(base: type[asyncio.Protocol] | None = None,
                     request_timeout: float = REQUEST_TIMEOUT) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools or h11, as uvicorn would choose) with the
    request deadline. Works on the attributes both share: ``loop``, ``transport``,
    ``cycle`` (set once a request's headers are complete) and ``cycle.more_body``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    class Guarded(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _waiting_for: object = None

        def connection_made(self, transport) -> None:   # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._idle() and (self._deadline is None or self._waiting_for is not self.cycle):
                self._arm()   # the first bytes of a new request: its deadline starts
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            """No request is being read or answered."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._waiting_for = self.cycle   # the request before the one now awaited
            self._deadline = self.loop.call_later(request_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport is None or self.transport.is_closing():
                return
            reading = self.cycle is not self._waiting_for and self.cycle is not None
            if reading and not self.cycle.more_body:
                return                      # the request arrived in time; the app has it
            self.transport.close()   # connection_lost tells the app's receive() of the disconnect

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def serve(app, *, host: str, port: int, request_timeout: float = REQUEST_TIMEOUT,
          max_connections: int = MAX_CONNECTIONS) -> None:
    """Run ``app`` with uvicorn and the guards above (blocks until the server stops)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                http=guarded_protocol(request_timeout=request_timeout), limit_concurrency=max_connections,
                timeout_keep_alive=5)
