"""The HTTP side of the Subscription receiver (FastAPI). It only checks and stores.

Routes:

* ``POST /notify``: a backport / R5 notification Bundle, a resource (criteria
  rest-hook ``post-endpoint`` style), or an empty body (no payload).
* ``PUT|POST /notify/{type}/{id}``: a criteria rest-hook with the resource as body
  (HAPI / SEKMET style).
* ``GET /healthz``: inbox depth and the last processed evaluation.

Order of checks, each answered with an OperationOutcome and nothing stored:
401 (secret header missing or wrong, compared in constant time), 413 (body over the
limit), 415 (content type not JSON), 401 (HMAC-SHA256 body signature, when
configured), 400 (malformed JSON, or not a notification). Then the notification is
stored in the inbox (fsynced) and the answer is 200.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from clm_stratify.service.inbox import Inbox
from fhir_adapters.fhir.codec import loads
from clm_stratify.service.notifications import NotificationError, parse_notification

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
SECRET_HEADER = "X-CLM-Subscription-Secret"


@dataclass(frozen=True)
class ReceiverConfig:
    secret: str
    secret_header: str = SECRET_HEADER
    hmac_secret: str | None = None
    hmac_header: str = "X-Signature"
    max_body: int = 1_000_000


def operation_outcome(status: int, code: str, text: str) -> JSONResponse:
    return JSONResponse({"resourceType": "OperationOutcome",
                         "issue": [{"severity": "error" if status >= 400 else "information",
                                    "code": code, "diagnostics": text}]},
                        status_code=status, media_type="application/fhir+json")


def create_app(inbox: Inbox, config: ReceiverConfig) -> FastAPI:
    if not config.secret:
        raise ValueError("the receiver needs a subscription secret")
    app = FastAPI(title="clm-stratify Subscription receiver", docs_url=None, redoc_url=None, openapi_url=None)
    secret = config.secret.encode()

    async def receive(request: Request, path: str | None) -> Response:
        given = request.headers.get(config.secret_header, "").encode()
        if not hmac.compare_digest(given, secret):
            return operation_outcome(401, "security", f"missing or wrong {config.secret_header} header")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body):
            return operation_outcome(413, "too-costly", f"body over {config.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body:
                return operation_outcome(413, "too-costly", f"body over {config.max_body} bytes")
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
                parsed = loads(bytes(body))
            except (ValueError, UnicodeDecodeError, RecursionError):
                return operation_outcome(400, "structure", "body is not valid JSON")
        try:
            notification = parse_notification(parsed, path)
        except NotificationError as exc:
            return operation_outcome(400, "invalid", str(exc))
        except RecursionError:
            return operation_outcome(400, "structure", "body nested too deeply")
        nid = await run_in_threadpool(inbox.accept, notification.model_dump_json())
        return operation_outcome(200, "informational", f"accepted as notification {nid} ({notification.kind})")

    @app.post("/notify")
    async def notify(request: Request) -> Response:
        return await receive(request, None)

    @app.api_route("/notify/{rtype}/{rid}", methods=["PUT", "POST"])
    async def notify_resource(rtype: str, rid: str, request: Request) -> Response:
        return await receive(request, f"{rtype}/{rid}")

    @app.get("/healthz")
    async def healthz() -> Response:
        depth = inbox.depth()
        waiting = (depth.get("notifications_new", 0) + depth.get("work_pending", 0) + depth.get("work_running", 0))
        return Response(json.dumps({"status": "ok", "inbox_depth": waiting, "counts": depth,
                                    "dead_letters": depth.get("work_dead", 0) + depth.get("notifications_dead", 0),
                                    "last_processed": inbox.last_processed()}),
                        media_type="application/json")

    return app
