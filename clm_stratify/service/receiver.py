"""The HTTP side of the Subscription receiver (FastAPI). It only checks and stores.

Routes:

* ``POST /notify``: a backport / R5 notification Bundle, a resource (criteria
  rest-hook ``post-endpoint`` style), or an empty body (no payload).
* ``PUT|POST /notify/{type}/{id}``: a criteria rest-hook with the resource as body
  (HAPI / SEKMET style).
* ``DELETE /notify/{type}/{id}``, no body: that resource was deleted (HAPI's rest-hook
  with payload); stored as a ``deletion`` event whose focus is the resource, and the
  worker finds its patient in the resource's history. A DELETE with a body is a 400.
* ``GET /healthz``: ``ok`` (200) or ``degraded`` (503) with reasons, inbox depth,
  dead letters, the last processed evaluation, the FHIR server's reachability
  (:mod:`clm_stratify.service.health`).
* ``GET /metrics``: Prometheus metrics (:mod:`clm_stratify.service.metrics`).

Order of checks, each answered with an OperationOutcome and nothing stored:
401 (secret header missing or wrong, compared in constant time), 413 (body over the
limit), 415 (a ``Content-Encoding`` other than identity; content type not JSON), 401
(HMAC-SHA256 signature of the body as received, the empty body of a DELETE too, when
configured), 400 (malformed JSON, NaN and Infinity included, or not a notification).
Any other path or method (a trailing slash too: no redirect) is a 404 or 405, also as
an OperationOutcome. Then the notification is
stored in the inbox (fsynced) and the answer is 200. When the inbox cannot store it,
the answer is 503 with ``Retry-After`` (the sender keeps it and sends it again):
never a 2xx for what is not on disk.
"""

from __future__ import annotations

import decimal
import hashlib
import hmac
import json
import logging
import sqlite3
from dataclasses import dataclass

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clm_stratify.service.health import Health
from clm_stratify.service.inbox import Inbox
from clm_stratify.service.metrics import Metrics
from clm_stratify.service.notifications import NotificationError, parse_notification

log = logging.getLogger("clm_stratify.service.receiver")

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
SECRET_HEADER = "X-CLM-Subscription-Secret"


@dataclass(frozen=True)
class ReceiverConfig:
    secret: str
    secret_header: str = SECRET_HEADER
    hmac_secret: str | None = None
    hmac_header: str = "X-Signature"
    max_body: int = 1_000_000


def operation_outcome(status: int, code: str, text: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"resourceType": "OperationOutcome",
                         "issue": [{"severity": "error" if status >= 400 else "information",
                                    "code": code, "diagnostics": text}]},
                        status_code=status, media_type="application/fhir+json", headers=headers)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(body: bytes):
    """The body's JSON (decimals exact, as :func:`fhir_adapters.fhir.codec.loads`), refusing
    what RFC 8259 does not allow and Python's parser does: NaN, Infinity, -Infinity."""
    return json.loads(body, parse_float=decimal.Decimal, parse_constant=_no_constant)


def create_app(inbox: Inbox, config: ReceiverConfig, health: Health | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    if not config.secret:
        raise ValueError("the receiver needs a subscription secret")
    app = FastAPI(title="clm-stratify Subscription receiver", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)   # (a redirect would be built from the client's Host header)
    secret = config.secret.encode()
    health = health or Health(inbox, lambda: None)
    metrics = metrics or Metrics(inbox, health)

    async def receive(request: Request, path: str | None, deleted: bool = False) -> Response:
        response = await _receive(request, path, deleted)
        if response.status_code != 200:
            metrics.rejected.labels(status=str(response.status_code)).inc()
        return response

    async def _receive(request: Request, path: str | None, deleted: bool) -> Response:
        given = request.headers.get(config.secret_header, "").encode()
        if not hmac.compare_digest(given, secret):
            return operation_outcome(401, "security", f"missing or wrong {config.secret_header} header")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body):
            return operation_outcome(413, "too-costly", f"body over {config.max_body} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_body:
                    return operation_outcome(413, "too-costly", f"body over {config.max_body} bytes")
        except ClientDisconnect:   # gone (or cut off by the request deadline) before the body was whole
            log.warning("a client disconnected before its notification had arrived whole: nothing stored")
            return operation_outcome(400, "incomplete", "the body did not arrive whole")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return operation_outcome(415, "not-supported", f"content encoding {encoding[:60]!r} is not supported: "
                                     "send the body uncompressed (identity)")
        if body.strip():
            mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if mime not in JSON_TYPES:
                return operation_outcome(415, "not-supported", f"content type {mime or '(none)'} is not FHIR JSON")
        if config.hmac_secret is not None:
            expected = hmac.new(config.hmac_secret.encode(), bytes(body), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(request.headers.get(config.hmac_header, "").lower().encode(), expected.encode()):
                return operation_outcome(401, "security", f"missing or wrong {config.hmac_header} signature")
        parsed = None
        if body.strip():
            try:
                parsed = read_json(bytes(body))
            except RecursionError:
                return operation_outcome(400, "structure", "body is not valid JSON: nested too deeply")
            except (ValueError, UnicodeDecodeError) as exc:   # (a position or one byte: no content quoted)
                return operation_outcome(400, "structure", f"body is not valid JSON: {exc}")
        try:
            notification = parse_notification(parsed, path, deleted)
        except NotificationError as exc:
            return operation_outcome(400, "invalid", str(exc))
        except RecursionError:
            return operation_outcome(400, "structure", "body nested too deeply")
        except Exception as exc:   # a parser bug must not become a 5xx for a body we cannot read
            log.error("notification refused, the parser failed: %s", type(exc).__name__)
            return operation_outcome(400, "invalid", "the body is not a notification this receiver can read")
        try:
            stored = notification.model_dump_json()
        except Exception:   # e.g. a string the parser kept that cannot be written as UTF-8
            return operation_outcome(400, "invalid", "the notification holds text that is not valid Unicode")
        try:
            nid = await run_in_threadpool(inbox.accept, stored)
        except sqlite3.Error as exc:
            log.error("notification not stored, the inbox failed: %s", exc)
            health.storage_failed(f"{type(exc).__name__}: {exc}")
            return operation_outcome(503, "transient", "the receiver cannot store notifications now; "
                                     "nothing was accepted: send it again later", headers={"Retry-After": "30"})
        health.storage_ok()
        metrics.received.labels(style=notification.style, kind=notification.kind).inc()
        return operation_outcome(200, "informational", f"accepted as notification {nid} ({notification.kind})")

    @app.post("/notify")
    async def notify(request: Request) -> Response:
        return await receive(request, None)

    @app.api_route("/notify/{rtype}/{rid}", methods=["PUT", "POST", "DELETE"])   # (one route: one Allow)
    async def notify_resource(rtype: str, rid: str, request: Request) -> Response:
        return await receive(request, f"{rtype}/{rid}", deleted=request.method == "DELETE")

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        """A path or method no route takes: an OperationOutcome, not FastAPI's ``{"detail": ...}``
        (405 keeps its ``Allow``)."""
        if exc.status_code == 404:
            return operation_outcome(404, "not-found", f"nothing at {request.url.path[:200]} (the receiver takes "
                                     "POST /notify, PUT|POST|DELETE /notify/{type}/{id}, GET /healthz, GET /metrics)")
        return operation_outcome(exc.status_code, "not-supported" if exc.status_code == 405 else "exception",
                                 f"{request.method} {request.url.path[:200]}: {exc.detail}", headers=exc.headers)

    @app.get("/healthz")
    async def healthz() -> Response:
        status, body = await run_in_threadpool(health.report)   # the probe may wait on the network
        return Response(json.dumps(body), status_code=status, media_type="application/json")

    @app.get("/metrics")
    async def prometheus() -> Response:
        data = await run_in_threadpool(metrics.exposition)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return app
