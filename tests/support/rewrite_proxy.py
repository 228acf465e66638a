"""A loopback proxy that changes one behaviour of a real FHIR server, for the few server
behaviours no real server on this machine shows (each test that uses it says which).

    with RewriteProxy(medplum.base_url, request=drop_offset) as proxy:
        main(["run", "--fhir-url", proxy.base_url, "--all"])

``request(method, path_and_query) -> path_and_query`` rewrites what is forwarded;
``reply(method, path_and_query, status, body) -> (status, body)`` rewrites the JSON answer
(``body`` None when it was not JSON); ``answer(method, path_and_query, request_body) ->
(status, body) | None`` answers a request itself, without forwarding it (None: forward).
The upstream's own origin in replies is rewritten to the proxy's. Only 127.0.0.1; standard library and ``requests``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit

import requests

from tests.support.http import LoopbackServer, read_body, send

RequestRewrite = Callable[[str, str], str]
ReplyRewrite = Callable[[str, str, int, object], tuple[int, object]]
Answer = Callable[[str, str, bytes], "tuple[int, object] | None"]


class RewriteProxy:
    def __init__(self, upstream_base: str, *, request: RequestRewrite | None = None,
                 reply: ReplyRewrite | None = None, answer: Answer | None = None) -> None:
        parts = urlsplit(upstream_base)
        self.upstream_origin = f"{parts.scheme}://{parts.netloc}"
        self.path = parts.path.rstrip("/")
        self.rewrite_request = request or (lambda method, pq: pq)
        self.rewrite_reply = reply or (lambda method, pq, status, body: (status, body))
        self.answer = answer or (lambda method, pq, body: None)
        self.requests: list[tuple[str, str]] = []
        self._session = requests.Session()
        self._server = LoopbackServer(self._handle, http11=True, name="rewrite-proxy")

    @property
    def base_url(self) -> str:
        return f"{self._server.url}{self.path}"

    def _handle(self, h) -> None:
        body = read_body(h)
        pq = self.rewrite_request(h.command, h.path)
        self.requests.append((h.command, pq))
        own = self.answer(h.command, pq, body)
        if own is not None:
            send(h, own[0], own[1])
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("content-type", "accept", "if-match",
                                                                       "if-none-exist", "prefer", "authorization")}
        up = self._session.request(h.command, self.upstream_origin + pq, data=body or None, headers=headers,
                                   timeout=60)
        text = up.content.decode("utf-8", errors="replace").replace(self.upstream_origin, self._server.url)
        try:
            parsed: object = json.loads(text) if text else None
        except ValueError:
            parsed = None
        status, out = self.rewrite_reply(h.command, pq, up.status_code, parsed)
        extra = {k: v.replace(self.upstream_origin, self._server.url) for k, v in up.headers.items()
                 if k.lower() in ("location", "etag", "last-modified")}
        send(h, status, out if out is not None or parsed is not None else text, headers=extra)

    def close(self) -> None:
        self._server.close()
        self._session.close()

    def __enter__(self) -> RewriteProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
