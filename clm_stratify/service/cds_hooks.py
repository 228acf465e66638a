"""A CDS Hooks 2.0 service: the classification inside the EHR at the point of care.

Routes (an :class:`~fastapi.APIRouter`, mounted by ``serve --cds-hooks`` next to
``/notify`` and by ``clm-stratify cds-hooks`` alone):

* ``GET /cds-services``: discovery, one ``patient-view`` service (:data:`SERVICE_ID`)
  with its prefetch templates (:mod:`clm_stratify.service.cds_prefetch`).
* ``POST /cds-services/{id}``: the call; ``{"cards": [...]}`` (:mod:`clm_stratify.service.cds_cards`).
* ``POST /cds-services/{id}/feedback``: what the clinician did with a card, checked and
  counted (:mod:`clm_stratify.service.cds_feedback`); 200 with no body.
* ``HEAD /cds-services``: as GET, without the body.
* anything else under ``/cds-services``: 404 (no such service or path), or 405 with
  ``Allow`` (a GET on our service, a POST on discovery), as an OperationOutcome like
  every other refusal; in the service alone (``create_cds_app``) every other path too.

Order of checks, each answered with an OperationOutcome saying why: 401 (the CDS
client's JWT, :mod:`clm_stratify.service.cds_auth`; every route, discovery too, unless
the sandbox mode ``--cds-no-auth`` was asked for), 404 (no such service or path), 405 (a
method the route does not take, with ``Allow``), 413 (body over the limit), 415 (not
JSON), 400 (malformed JSON, a request the spec does not allow, a malformed prefetch or
feedback), 412 (the data the mapping needs is neither prefetched nor
obtainable from the client's FHIR server), 500 (a fault of the service).

The FHIR server of a request is called only when it is one of the configured servers
(``--fhir-url`` and ``--cds-fhir-server``), with the request's ``fhirAuthorization``
token, or with no token when the request gives none (the spec makes it optional: an open
sandbox server), and never the service's own credentials: a request cannot make the
service call an arbitrary URL, nor see more than its user may. The service reads and never writes (a
chart opening writes nothing); the rule set is taken once per call, so a SIGHUP reload
never gives a call the engine of one version and the terminology of another.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clm_stratify.pipeline import Rules, evaluate
from clm_stratify.service.privacy import public_error, redact
from clm_stratify.service.cds_auth import AuthFailed, JwtVerifier
from clm_stratify.service.cds_cards import UNKNOWN, OnServer, cards
from clm_stratify.service.cds_feedback import counts, parse_feedback
from clm_stratify.service.cds_prefetch import ASSESSMENT_KEY, CdsError, Gathered, Prefetch, discovery_prefetch
from clm_stratify.service.receiver import operation_outcome
from engine.classify import Classification
from fhir_adapters.fhir.auth import BearerToken
from fhir_adapters.fhir.capabilities import CapabilitiesCache
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.codec import loads
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.writeback.resources import build_risk_assessment, says_same_clinically
from fhir_adapters.writeback.strategy import is_ours
from fhir_adapters.writeback.writer import AssessmentWriter

log = logging.getLogger("clm_stratify.service.cds_hooks")

SERVICE_ID = "clm-resectability"
HOOK = "patient-view"
TITLE = "Recurrent colorectal liver metastases: resectability group"
DESCRIPTION = ("Classifies a recurrence of colorectal liver metastases as resectable, borderline resectable, "
               "unresectable or indeterminate (Kobayashi et al., Ann Surg Oncol 2024) from the patient's FHIR "
               "data, and shows the group, its factors, missing facts and recommendations.")
USAGE = ("Needs the prefetch below, or fhirServer (with fhirAuthorization unless the server is open; read "
         "access to the patient's Patient, Observation, Condition, Procedure, MedicationAdministration, MedicationStatement, "
         "DiagnosticReport, Medication, BodyStructure and RiskAssessment). Answers 412 when neither gives "
         "the whole record.")


@dataclass(frozen=True)
class CdsConfig:
    """How the service is reached and what it may call."""

    public_url: str                        # the base URL CDS clients call (the JWT's aud)
    verifier: JwtVerifier | None           # None: sandbox mode, no authentication
    fhir_servers: tuple[str, ...] = ()     # FHIR base URLs a request's fhirServer may name
    max_body: int = 5_000_000
    verify_tls: bool | str = True
    cors_origins: tuple[str, ...] = ()     # browser-based CDS clients allowed to call (CORS)
    timeout: tuple[float, float] = (5.0, 20.0)
    # The allowed servers' CapabilityStatements (the write strategy that finds the current
    # assessment needs them): read once per server and 10 minutes, not at every chart opening.
    capabilities: CapabilitiesCache = field(default_factory=CapabilitiesCache, compare=False)

    def allowed(self, fhir_server: str) -> bool:
        return fhir_server.rstrip("/") in {s.rstrip("/") for s in self.fhir_servers}


# --------------------------------------------------------------------------- the request
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)   # the spec allows extensions


class FhirAuthorization(_Open):
    access_token: StrictStr
    token_type: StrictStr
    expires_in: StrictInt
    scope: StrictStr
    subject: StrictStr
    patient: StrictStr | None = None


class PatientViewContext(_Open):
    userId: StrictStr
    patientId: StrictStr
    encounterId: StrictStr | None = None


class HookRequest(_Open):
    hook: StrictStr
    hookInstance: StrictStr
    fhirServer: StrictStr | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: PatientViewContext
    prefetch: dict[str, Any] | None = None


def parse_request(body: Any) -> HookRequest:
    """The request, checked against the spec and the ``patient-view`` hook; :class:`CdsError` 400."""
    if not isinstance(body, dict):
        raise CdsError(400, "the request body is not a JSON object")
    try:
        req = HookRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise CdsError(400, f"not a CDS Hooks request: {problems}") from None
    if req.hook != HOOK:
        raise CdsError(400, f"hook {req.hook!r}: this service answers {HOOK} only")
    if not req.hookInstance.strip():
        raise CdsError(400, "hookInstance is empty")
    if req.fhirAuthorization is not None:
        if not req.fhirServer:
            raise CdsError(400, "fhirAuthorization without fhirServer (the spec requires fhirServer with it)")
        if req.fhirAuthorization.token_type.lower() != "bearer":
            raise CdsError(400, f"fhirAuthorization.token_type {req.fhirAuthorization.token_type!r}: must be Bearer")
        if req.fhirAuthorization.patient not in (None, req.context.patientId):
            raise CdsError(400, "fhirAuthorization.patient names another patient than context.patientId")
    if req.fhirServer is not None and not req.fhirServer.lower().startswith(("http://", "https://")):
        raise CdsError(400, f"fhirServer {req.fhirServer!r} is not an http(s) URL")
    try:
        PatientRef(req.context.patientId)
    except ValueError as exc:
        raise CdsError(400, f"context.patientId: {exc}") from None
    return req


# --------------------------------------------------------------------------- answering
def _client(config: CdsConfig, req: HookRequest) -> tuple[FhirClient | None, str]:
    """The CDS client's FHIR server with its token (none when the request gives no
    ``fhirAuthorization``: an open server, never the service's own credentials), or None
    and why there is none."""
    if not req.fhirServer:
        return None, "the request gives no fhirServer to fetch it from"
    if not config.allowed(req.fhirServer):
        return None, (f"fhirServer {req.fhirServer} is not one this service may call "
                      "(--fhir-url / --cds-fhir-server)")
    auth = BearerToken(req.fhirAuthorization.access_token) if req.fhirAuthorization is not None else None
    client = FhirClient(req.fhirServer, auth, verify=config.verify_tls,
                        timeout=config.timeout, retries=1, backoff=0.2, max_backoff=2.0)
    caps = config.capabilities.get(req.fhirServer)
    if caps is not None:
        client.use_capabilities(caps)
    return client, ""


def assessment_on_server(result: Classification, req: HookRequest, client: FhirClient | None,
                         gathered: Gathered) -> OnServer:
    """The RiskAssessment on the client's FHIR server against ``result`` (:class:`OnServer`).

    From the ``assessment`` prefetch when it is the whole answer, else the writer's own
    lookup on the FHIR server (:meth:`WriteStrategy.find_current`: one way to find an
    assessment); only one carrying our identifier and subject counts. No FHIR server, a
    cut or refused search, or duplicates: ``unknown``, never "not written yet". ``same``
    when it says the same clinically (:func:`says_same_clinically`: this call's warnings
    about what the prefetch could not see are the card's caveats, not a difference)."""
    if not result.assessed:
        return UNKNOWN
    ra = build_risk_assessment(result, check=False)
    if gathered.assessments is not None:
        ours = [c for c in gathered.assessments if is_ours(c, ra)]
        if len(ours) > 1:
            return OnServer("unknown", why=f"the assessment prefetch holds {len(ours)} assessments of ours")
        found = ours[0] if ours else None
    elif client is not None:
        try:
            found = AssessmentWriter(client).strategy.find_current(ra)
        except FhirError as exc:
            log.warning("the current RiskAssessment could not be looked up: %s", public_error(str(exc), exc))
            return OnServer("unknown", why=str(exc))
    else:
        return OnServer("unknown", why=gathered.assessments_why)
    if found is None:
        return OnServer("none")
    url = _url_of(found, req)
    if says_same_clinically(found, ra):
        return OnServer("same", url)
    return OnServer("differs", url, says=_says(found))


_ABSOLUTE = re.compile(r"https?://[^\s/?#]+/\S*", re.IGNORECASE)


def _url_of(found: dict, req: HookRequest) -> str | None:
    """Where the assessment is: on the named fhirServer by its id; with no fhirServer, the
    ``fullUrl`` of its entry in the ``assessment`` prefetch when that is an absolute
    http(s) URL; else None (the card then says it cannot link it)."""
    if req.fhirServer:
        ra_id = found.get("id")
        return f"{req.fhirServer.rstrip('/')}/RiskAssessment/{ra_id}" if isinstance(ra_id, str) else None
    bundle = (req.prefetch or {}).get(ASSESSMENT_KEY)
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and e.get("resource") == found:
            full = e.get("fullUrl")
            return full if isinstance(full, str) and _ABSOLUTE.fullmatch(full) else None
    return None


def _says(ra: dict) -> str:
    """``<group label> (<status>)`` of a RiskAssessment read from the server."""
    prediction = (ra.get("prediction") or [{}])[0] if isinstance(ra.get("prediction"), list) else {}
    risk = prediction.get("qualitativeRisk") if isinstance(prediction, dict) else None
    risk = risk if isinstance(risk, dict) else {}
    codings = [c for c in risk.get("coding") or [] if isinstance(c, dict)]
    label = risk.get("text") or next((c.get("display") or c.get("code") for c in codings), None) or "no group"
    return f"{label} ({ra.get('status') or 'no status'})"


def answer(config: CdsConfig, rules: Rules, req: HookRequest) -> tuple[dict, Gathered]:
    """The response to one checked request, and where its data came from."""
    patient = PatientRef(req.context.patientId)
    client, why = _client(config, req)
    try:
        prefetch = Prefetch(rules.terminology, patient, req.prefetch, client, why)
        gathered = prefetch.gather()
        result = evaluate(prefetch.record(req.fhirServer), rules, patient)
        return cards(result, rules.engine.ruleset, assessment_on_server(result, req, client, gathered)), gathered
    finally:
        if client is not None:
            if client.known_capabilities is not None:
                config.capabilities.put(req.fhirServer, client.known_capabilities)
            client.close()


def discovery(rules: Rules) -> dict:
    return {"services": [{"hook": HOOK, "id": SERVICE_ID, "title": TITLE, "description": DESCRIPTION,
                          "prefetch": discovery_prefetch(rules.terminology, rules.engine.ref.id),
                          "usageRequirements": USAGE}]}


def _error(exc: CdsError | AuthFailed) -> JSONResponse:
    if isinstance(exc, AuthFailed):
        return operation_outcome(401, "security", str(exc), headers={"WWW-Authenticate": "Bearer"})
    code = {400: "invalid", 404: "not-found", 412: "incomplete", 413: "too-costly", 415: "not-supported"}
    return operation_outcome(exc.status, code.get(exc.status, "exception"), str(exc))


def cds_router(config: CdsConfig, rules_of: Callable[[], Rules]) -> APIRouter:
    """The CDS Hooks routes; ``rules_of()`` gives the rule set in force (read once per call)."""
    router = APIRouter()
    base = config.public_url.rstrip("/")

    def authenticate(request: Request, path: str) -> None:
        if config.verifier is not None:
            config.verifier.verify(request.headers.get("authorization"), f"{base}{path}")

    @router.api_route("/cds-services", methods=["GET", "HEAD"])
    async def discover(request: Request) -> Response:
        try:
            authenticate(request, "/cds-services")
        except AuthFailed as exc:
            return _error(exc)
        found = JSONResponse(discovery(rules_of()))
        return found if request.method == "GET" else Response(headers=dict(found.headers))   # HEAD: no body

    @router.post("/cds-services/{service_id}")
    async def call(service_id: str, request: Request) -> Response:
        started = time.monotonic()
        try:
            authenticate(request, f"/cds-services/{service_id}")
            if service_id != SERVICE_ID:
                raise CdsError(404, f"no CDS service {service_id!r} here (GET /cds-services lists {SERVICE_ID})")
            req = parse_request(await _body(request, config.max_body))
            rules = rules_of()
            response, gathered = await run_in_threadpool(answer, config, rules, req)
        except (CdsError, AuthFailed) as exc:
            # No patient identifiers in the log: the reasons of 400 and 404 may quote the request.
            status = 401 if isinstance(exc, AuthFailed) else exc.status
            # 412 quotes what the FHIR server said (it may name the patient): at DEBUG only.
            log.info("CDS call refused: %s%s", status, f" {exc}" if status == 401 else "")
            log.debug("CDS call refused: %s %s", status, redact(str(exc)))
            return _error(exc)
        except Exception:   # a fault of ours: 500, logged without patient data
            log.exception("CDS call failed")
            return operation_outcome(500, "exception", "the service failed; nothing was classified")
        log.info("CDS %s: %d card(s) in %.0f ms; prefetched %d, fetched %d", HOOK, len(response["cards"]),
                 (time.monotonic() - started) * 1000, len(gathered.from_prefetch), len(gathered.from_server))
        return JSONResponse(response)

    @router.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request) -> Response:
        try:
            authenticate(request, f"/cds-services/{service_id}/feedback")
            if service_id != SERVICE_ID:
                raise CdsError(404, f"no CDS service {service_id!r} here (GET /cds-services lists {SERVICE_ID})")
            received = parse_feedback(await _body(request, config.max_body))
        except (CdsError, AuthFailed) as exc:
            log.info("CDS feedback refused: %s", 401 if isinstance(exc, AuthFailed) else exc.status)
            return _error(exc)
        log.info("CDS feedback: %s", counts(received))
        return Response(status_code=200)

    @router.api_route("/cds-services/{rest:path}", methods=_METHODS)
    @router.api_route("/cds-services", methods=[m for m in _METHODS if m not in ("GET", "HEAD")])
    async def other(request: Request) -> Response:
        """Everything else under /cds-services: 404 or 405, as an OperationOutcome."""
        path = request.url.path
        try:
            authenticate(request, path)
        except AuthFailed as exc:
            return _error(exc)
        allowed = ("GET, HEAD" if path.rstrip("/") == "/cds-services" else
                   "POST" if re.fullmatch(rf"/cds-services/{re.escape(SERVICE_ID)}(/feedback)?", path) else None)
        if allowed is None or request.method in allowed.split(", "):   # e.g. GET /cds-services/ (a slash)
            return _error(CdsError(404, f"nothing at {path} (GET /cds-services lists the services)"))
        return operation_outcome(405, "not-supported", f"{request.method} {path}: allowed here: {allowed}",
                                 headers={"Allow": allowed})

    return router


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


async def _body(request: Request, limit: int) -> Any:
    mime = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise CdsError(415, f"content type {mime}: a CDS Hooks request is application/json")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise CdsError(413, f"request body over {limit} bytes")
    try:
        return loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CdsError(400, "the request body is not valid JSON") from None


def mount(app: FastAPI, config: CdsConfig, rules_of: Callable[[], Rules]) -> None:
    """The CDS Hooks routes on ``app``, with CORS for the browser-based CDS clients of
    ``config.cors_origins`` (the spec: "CDS Services and browser-based CDS Clients will
    require CORS support"; the sandbox at sandbox.cds-hooks.org is one). Only the listed
    origins, only GET and POST, only the Authorization and Content-Type headers; a
    preflight is answered before authentication, a call is not."""
    app.include_router(cds_router(config, rules_of))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)


def create_cds_app(config: CdsConfig, rules_of: Callable[[], Rules]) -> FastAPI:
    """The service alone (``clm-stratify cds-hooks``): the routes and ``GET /healthz``."""
    app = FastAPI(title="clm-stratify CDS Hooks service", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, config, rules_of)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        """Paths and methods no route takes (``/favicon.ico``): an OperationOutcome, not
        FastAPI's ``{"detail": ...}``; 405 keeps its ``Allow``."""
        if exc.status_code == 404:
            return _error(CdsError(404, f"nothing at {request.url.path} (GET /cds-services lists the services)"))
        return operation_outcome(exc.status_code, "not-supported" if exc.status_code == 405 else "exception",
                                 f"{request.method} {request.url.path}: {exc.detail}", headers=exc.headers)

    return app
