"""A loopback FHIR proxy in front of a real SEKMET that changes exactly the behaviours
it is asked to (one "quirk" each), so tests can make real-world server quirks happen::

    with QuirkyFhirServer(sekmet.base_url, {"no-total"}) as proxy:
        FhirClient(proxy.base_url).search(...)      # searchsets without Bundle.total

Quirks (:data:`QUIRKS`):

* ``no-total``: drop ``Bundle.total`` from every searchset (also inside batch replies).
* ``long-next-links``: replace each searchset ``next``/``previous`` link by
  ``<base>?_getpages=<~3 kB opaque token>``; the proxy maps the token back to SEKMET's
  offset link (HAPI-style paging).
* ``application-json``: answer ``Content-Type: application/json`` instead of
  ``application/fhir+json``.
* ``409-for-412``: a 412 to a request carrying ``If-Match`` becomes 409 (older servers'
  version conflicts).
* ``ignore-strict``: drop ``Prefer: handling=strict`` (unknown parameters stay ignored).
* ``silent-ignore-patient``: ``GET Observation?patient=..`` loses its ``patient``
  parameter, and the searchset its warning entries (a parameter silently ignored).
* ``no-batch``: ``batch`` leaves the CapabilityStatement and a batch Bundle gets 400.
* ``ignore-if-match``: drop ``If-Match`` (a stale update is accepted: a real defect).
* ``reject-riskassessment``: a write of a RiskAssessment (alone or in a transaction)
  gets 422 with an OperationOutcome (a server that cannot store them).

Only 127.0.0.1; every request to SEKMET has a timeout; :meth:`stop` shuts the listener
down and joins its thread.
"""

from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests

from fhir_adapters.fhir.client import dumps, loads
from tests.support.http import LoopbackServer, operation_outcome, read_body, send

QUIRKS = frozenset({"no-total", "long-next-links", "application-json", "409-for-412", "ignore-strict",
                    "silent-ignore-patient", "no-batch", "ignore-if-match", "reject-riskassessment"})
_FORWARDED = ("Content-Type", "Accept", "If-Match", "If-None-Exist", "If-None-Match", "Prefer", "Authorization")
_RETURNED = ("Location", "ETag", "Last-Modified", "Content-Location")


class QuirkyFhirServer:
    """``http://127.0.0.1:<port>/fhir`` proxying to ``upstream`` with ``quirks`` applied."""

    def __init__(self, upstream: str, quirks: set[str] | frozenset[str] = frozenset(), timeout: float = 30.0):
        unknown = set(quirks) - QUIRKS
        if unknown:
            raise ValueError(f"unknown quirks: {sorted(unknown)}")
        self.upstream = upstream.rstrip("/")
        self.quirks = frozenset(quirks)
        self.timeout = timeout
        self.tokens: dict[str, str] = {}       # long-next-links: token -> upstream URL
        self.requests_seen = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: LoopbackServer | None = None

    # ---------------- lifecycle
    @property
    def base_url(self) -> str:
        assert self._server is not None, "not started"
        return f"{self._server.url}/fhir"

    def start(self) -> "QuirkyFhirServer":
        # headers and body are written separately: TCP_NODELAY, no 40 ms stalls
        self._server = LoopbackServer(self._handle, methods=("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"),
                                      http11=True, nodelay=True, name="quirky-fhir")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> "QuirkyFhirServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------- proxying
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False
        return s

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests_seen += 1
        mine = self.base_url
        body = read_body(h)
        parts = urlsplit(h.path)
        rest = parts.path[len("/fhir"):] if parts.path.startswith("/fhir") else parts.path
        query = parse_qsl(parts.query, keep_blank_values=True)
        headers = {k: h.headers[k] for k in _FORWARDED if h.headers.get(k)}
        method = h.command

        if "ignore-strict" in self.quirks and "handling=strict" in headers.get("Prefer", ""):
            headers.pop("Prefer")
        if "ignore-if-match" in self.quirks:
            headers.pop("If-Match", None)
        silent = False
        if ("silent-ignore-patient" in self.quirks and method == "GET" and rest.strip("/") == "Observation"
                and any(k == "patient" for k, _ in query)):
            query = [(k, v) for k, v in query if k != "patient"]
            silent = True
        url = self.upstream + rest + (f"?{urlencode(query)}" if query else "")
        token = dict(query).get("_getpages") if "long-next-links" in self.quirks and rest in ("", "/") else None
        if token is not None:
            url = self.tokens.get(token, "")
            if not url:
                return self._reply(h, 410, operation_outcome("not-found", "unknown or expired _getpages token"))
        if body:
            body = body.replace(mine.encode(), self.upstream.encode())
            parsed = _json(body)
            if "no-batch" in self.quirks and isinstance(parsed, dict) and parsed.get("type") == "batch":
                return self._reply(h, 400, operation_outcome("not-supported", "batch is not supported by this server"))
            if "reject-riskassessment" in self.quirks and _writes_riskassessment(method, rest, parsed):
                return self._reply(h, 422, operation_outcome(
                    "business-rule", "RiskAssessment is not accepted by this server (test quirk)"))
        try:
            resp = self._session().request(method, url, data=body or None, headers=headers, timeout=self.timeout,
                                           allow_redirects=False)
        except requests.RequestException as exc:
            return self._reply(h, 502, operation_outcome("transient", f"upstream: {type(exc).__name__}"))

        status = resp.status_code
        if "409-for-412" in self.quirks and status == 412 and h.headers.get("If-Match"):
            status = 409
        content = resp.content.replace(self.upstream.encode(), mine.encode())
        parsed = _json(content) if content else None
        if isinstance(parsed, (dict, list)):
            changed = self._alter(parsed, silent)
            if changed:
                content = dumps(parsed).encode()
        out_headers = {k: resp.headers[k].replace(self.upstream, mine) for k in _RETURNED if resp.headers.get(k)}
        ctype = resp.headers.get("Content-Type", "")
        if ctype and "application-json" in self.quirks and "fhir+json" in ctype:
            ctype = "application/json; charset=utf-8"
        if ctype:
            out_headers["Content-Type"] = ctype
        send(h, status, content, ctype=None, headers=out_headers)

    def _alter(self, node: Any, silent: bool) -> bool:
        """Apply the body quirks to every Bundle in ``node`` (in place); True if changed."""
        changed = False
        if isinstance(node, list):
            return any([self._alter(x, silent) for x in node])
        if not isinstance(node, dict):
            return False
        if node.get("resourceType") == "CapabilityStatement" and "no-batch" in self.quirks:
            for rest in node.get("rest") or []:
                rest["interaction"] = [i for i in rest.get("interaction") or [] if i.get("code") != "batch"]
            changed = True
        if node.get("resourceType") == "Bundle":
            if node.get("type") == "searchset":
                if "no-total" in self.quirks and "total" in node:
                    node.pop("total")
                    changed = True
                if "long-next-links" in self.quirks:
                    for link in node.get("link") or []:
                        if link.get("relation") in ("next", "previous", "prev") and link.get("url"):
                            token = secrets.token_urlsafe(2250)  # ~3 kB, opaque
                            with self._lock:
                                self.tokens[token] = link["url"].replace(self.base_url, self.upstream)
                            link["url"] = f"{self.base_url}?_getpages={token}"
                            changed = True
                if silent and node.get("entry"):
                    node["entry"] = [e for e in node["entry"] if (e.get("search") or {}).get("mode") != "outcome"]
                    changed = True
            for entry in node.get("entry") or []:
                changed |= self._alter(entry.get("resource"), silent)
        return changed

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        send(h, status, body, ctype="application/fhir+json")


def _json(data: bytes) -> Any:
    try:
        return loads(data)  # exact decimals, written back unchanged by dumps
    except ValueError:
        return None


def _writes_riskassessment(method: str, path: str, body: Any) -> bool:
    if method in ("PUT", "POST") and path.strip("/").startswith("RiskAssessment"):
        return True
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        return any((e.get("resource") or {}).get("resourceType") == "RiskAssessment"
                   and (e.get("request") or {}).get("method") in ("PUT", "POST") for e in body.get("entry") or [])
    return False
