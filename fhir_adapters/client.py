"""A small, careful FHIR R4 REST client (JSON only) built on ``requests``.

Everything goes through :meth:`FhirClient.request`, the single place that sends:
retries, back-off, error mapping and logging live there and nowhere else::

    from fhir_adapters.client import FhirClient, FhirConflict
    from fhir_adapters.auth import SmartBackendServices, load_private_key

    auth = SmartBackendServices("clm-stratify", load_private_key("key.pem"),
                                base_url="https://fhir.example.org/r4")
    fhir = FhirClient("https://fhir.example.org/r4", auth)
    fhir.capabilities()["fhirVersion"]                      # '4.0.1'
    for obs in fhir.search("Observation", {"patient": "p1", "_count": "100"}):
        ...                                                  # every page, next links followed verbatim
    status, body = fhir.update(risk_assessment, if_match='W/"3"')   # FhirConflict on 409/412

Decisions (each one tested in ``tests/test_client.py``):

* **Exact decimals.** Replies are parsed with ``parse_float=decimal.Decimal`` and bodies
  are written by :func:`dumps`, which writes a ``Decimal`` as the exact JSON number
  (``Decimal("49.9")`` -> ``49.9``; ``0.05`` stays ``0.05``). Use :func:`loads` on a raw
  :class:`requests.Response` from :meth:`FhirClient.request` to keep that property.
* **Retries.** Connection failures, timeouts and HTTP 429/502/503/504 are retried up to
  ``retries`` times (so ``retries + 1`` tries) with exponential back-off
  (``backoff * 2**n``, plus up to 10 % jitter, capped at ``max_backoff``). A
  ``Retry-After`` header (seconds or HTTP-date) replaces the computed delay (capped too).
  If it still fails: :class:`FhirServerUnavailable` naming the server, what happened
  and how many tries were made.
* **Non-idempotent requests are not blindly retried.** GET/HEAD/OPTIONS/DELETE and a PUT
  by id are idempotent and are retried on anything above. A POST (create, transaction,
  batch containing writes), a PATCH and a *conditional* PUT (``PUT Type?query``, whose
  search-then-write is not atomic on some servers) are retried only when the server
  cannot have processed them: connection refused / connect timeout (nothing was sent),
  429 and 503 (refused before processing) and 401 (refused; retried once after the
  token is refreshed). After a read timeout, a reset after sending, or 502/504 from a
  gateway, the outcome is **unknown** (the write may have happened): the client raises
  :class:`FhirServerUnavailable` saying so instead of risking a duplicate write. A batch
  of only GETs is retried like a GET. Callers that know better pass ``idempotent=True``.
* **401 refresh.** If the reply is 401 and ``auth`` has an ``invalidate()`` method
  (:class:`fhir_adapters.auth.SmartBackendServices`), the cached token is dropped and the
  request is sent once more.
* **Content types.** Replies must be ``application/fhir+json``, ``application/json`` or
  another ``application/*+json`` (any ``charset``). A 2xx reply with a body of another
  type (an HTML login page from a proxy, say) raises :class:`FhirError` naming the type.
* **Credentials stay on the server.** Absolute URLs (``next`` links included) must point
  at the same scheme, host and port as ``base_url``; otherwise :class:`FhirError` is
  raised rather than sending the ``Authorization`` header elsewhere.
* **Logging** (``logging.getLogger("clm_stratify.http")``): DEBUG one line per request
  (method, URL *path* without the query string - it can hold patient ids - status,
  duration); nothing per request at INFO; WARNING for each retry (method, path, reason,
  delay). Query strings, headers, tokens and bodies are never logged. Note that
  ``urllib3`` logs full URLs at DEBUG on its own logger; leave it at INFO or above.
* TLS verification is on by default; ``verify`` is passed through to ``requests``.
* Thread safety: one client may be shared by threads (the session pools up to 16
  connections per host). :attr:`FhirClient.last_search_warnings` is per client, so read
  it from the thread that ran the search, or use one client per thread.
"""

from __future__ import annotations

import decimal
import email.utils
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
import urllib3.exceptions

try:
    from clm_stratify import __version__ as _VERSION
except ImportError:  # pragma: no cover - the package is always installed with this module
    _VERSION = "0"

__all__ = [
    "FhirClient", "FhirError", "FhirServerUnavailable", "FhirConflict",
    "dumps", "loads", "operation_outcome_text",
]

log = logging.getLogger("clm_stratify.http")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: statuses meaning "the server did not process the request": safe to retry any method.
_REFUSED_STATUSES = frozenset({429, 503})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
_FHIR_JSON = "application/fhir+json"
_RTYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_RID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


# --------------------------------------------------------------------------- errors

class FhirError(Exception):
    """A FHIR request failed.

    Attributes:
        status: HTTP status, or None when no reply was received.
        url: the request URL **without** its query string.
        outcome: the OperationOutcome's ``issue[].diagnostics`` / ``details.text``
            joined with ``"; "`` (or an excerpt of a non-FHIR body).
        method: the HTTP method.

    >>> e = FhirError("boom", status=400, url="http://h/fhir/Observation", outcome="bad", method="GET")
    >>> (e.status, e.outcome, str(e))
    (400, 'bad', 'boom')
    """

    def __init__(self, message: str, *, status: int | None = None, url: str = "",
                 outcome: str = "", method: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url
        self.outcome = outcome
        self.method = method


class FhirServerUnavailable(FhirError):
    """The server could not be reached, or kept answering 429/502/503/504, after the retries.

    Also raised at once for a non-idempotent request whose outcome is unknown (read
    timeout, connection reset after sending, 502/504): the message says so.
    """


class FhirConflict(FhirError):
    """HTTP 409 or 412: version conflict (``If-Match``), or several matches for a conditional write."""


# --------------------------------------------------------------------------- JSON

def loads(data: str | bytes) -> Any:
    """Parse JSON keeping decimals exact.

    >>> loads('{"value": 49.9, "n": 2}')
    {'value': Decimal('49.9'), 'n': 2}
    """
    return json.loads(data, parse_float=decimal.Decimal)


def dumps(obj: Any) -> str:
    """Serialise to compact JSON, writing :class:`decimal.Decimal` as the exact number.

    ``float`` is written with ``repr`` (shortest round-trip form). NaN and infinities
    are rejected (JSON has no such numbers).

    >>> dumps({"value": decimal.Decimal("49.9"), "p": 0.05, "s": "é", "ok": True})
    '{"value":49.9,"p":0.05,"s":"é","ok":true}'
    """
    parts: list[str] = []
    _encode(obj, parts.append)
    return "".join(parts)


def _encode(o: Any, out: Any) -> None:
    if o is None:
        out("null")
    elif o is True:
        out("true")
    elif o is False:
        out("false")
    elif isinstance(o, str):
        out(json.dumps(o, ensure_ascii=False))
    elif isinstance(o, int):
        out(int.__repr__(o))
    elif isinstance(o, decimal.Decimal):
        if not o.is_finite():
            raise ValueError(f"cannot write {o} as a JSON number")
        out(str(o))
    elif isinstance(o, float):
        if not math.isfinite(o):
            raise ValueError(f"cannot write {o} as a JSON number")
        out(float.__repr__(o))
    elif isinstance(o, Mapping):
        out("{")
        for i, (k, v) in enumerate(o.items()):
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be str, not {type(k).__name__}")
            if i:
                out(",")
            out(json.dumps(k, ensure_ascii=False))
            out(":")
            _encode(v, out)
        out("}")
    elif isinstance(o, (list, tuple)):
        out("[")
        for i, v in enumerate(o):
            if i:
                out(",")
            _encode(v, out)
        out("]")
    else:
        raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def operation_outcome_text(body: Any) -> str:
    """The human text of an OperationOutcome: each issue's ``diagnostics`` and ``details.text``.

    Falls back to ``details.coding[].display`` / ``code``, and understands OAuth error
    bodies (``error`` / ``error_description``).

    >>> operation_outcome_text({"resourceType": "OperationOutcome", "issue": [
    ...     {"severity": "error", "code": "conflict", "diagnostics": "Version mismatch"}]})
    'Version mismatch'
    """
    if not isinstance(body, Mapping):
        return ""
    if "error" in body and body.get("resourceType") is None:
        return ": ".join(str(body[k]) for k in ("error", "error_description") if body.get(k))
    texts: list[str] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        found = [str(t) for t in (issue.get("diagnostics"), (issue.get("details") or {}).get("text")) if t]
        if not found:
            found = [str(c.get("display")) for c in (issue.get("details") or {}).get("coding") or []
                     if isinstance(c, Mapping) and c.get("display")]
        if not found and issue.get("code"):
            found = [str(issue["code"])]
        for t in found:
            if t not in texts:
                texts.append(t)
    return "; ".join(texts)


def _body_excerpt(resp: requests.Response, limit: int = 300) -> str:
    text = resp.content[:4000].decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _media_type(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _is_json_type(mime: str) -> bool:
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def _strip_query(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme.lower())
    return p.scheme.lower(), (p.hostname or "").lower(), port


def _retry_after(resp: requests.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _describe_exception(exc: requests.RequestException) -> tuple[str, bool]:
    """(what happened, True if the request certainly never reached the server)."""
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timeout", True
    if isinstance(exc, requests.ReadTimeout):
        return "read timeout (no reply in time)", False
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)  # urllib3 MaxRetryError -> its cause
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            text = str(reason)
            if "refused" in text.lower():
                return "connection refused", True
            return f"could not connect ({text.split(': ', 1)[-1]})", True
        if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
            return "connect timeout", True
        return f"connection broken ({_short(reason or exc)})", False
    return f"{type(exc).__name__} ({_short(exc)})", False


def _short(exc: object) -> str:
    """A one-line description of an exception without any query string."""
    return re.sub(r"\?\S*", "", " ".join(str(exc).split()))[:200]


# --------------------------------------------------------------------------- client

class FhirClient:
    """FHIR R4 REST client over one pooled :class:`requests.Session`.

    Args:
        base_url: FHIR base, e.g. ``http://127.0.0.1:8080/fhir`` (a trailing slash is removed).
        auth: a ``requests`` auth (``BearerToken``, ``SmartBackendServices``) or None.
        timeout: seconds, or ``(connect, read)``.
        retries: extra tries after the first (see the module docstring for what is retried).
        backoff: first back-off delay in seconds, doubled on each retry.
        max_backoff: cap for any single delay, ``Retry-After`` included.
        verify: TLS verification (``True``, ``False`` or a CA bundle path), passed through.
        session: a session to use instead of a new one (not closed by :meth:`close`).
        user_agent: the ``User-Agent`` header.

    >>> fhir = FhirClient("http://127.0.0.1:8080/fhir/", retries=2, backoff=0.1)
    >>> fhir.base_url
    'http://127.0.0.1:8080/fhir'
    """

    def __init__(self, base_url: str, auth: requests.auth.AuthBase | None = None, *,
                 timeout: float | tuple[float, float] = (5, 30), retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 30.0, verify: bool | str = True,
                 session: requests.Session | None = None,
                 user_agent: str = f"clm-stratify/{_VERSION}") -> None:
        if not base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url: str = base_url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.verify = verify
        self.user_agent = user_agent
        self.round_trips: int = 0
        self.last_search_warnings: list[str] = []
        self._lock = threading.Lock()
        self._capabilities: dict | None = None
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            if _origin(self.base_url)[1] in ("127.0.0.1", "localhost", "::1", "[::1]"):
                session.trust_env = False  # never route loopback traffic through an env proxy
        self.session = session

    # ---------------- lifecycle

    def close(self) -> None:
        """Close the session if this client created it."""
        if self._own_session:
            self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth!r})"

    # ---------------- the one place that sends

    def url(self, url_or_path: str) -> str:
        """Absolute URL for a path relative to ``base_url`` (checks absolute URLs stay on this server).

        >>> FhirClient("http://h:1/fhir").url("Patient/1")
        'http://h:1/fhir/Patient/1'
        """
        if url_or_path.lower().startswith(("http://", "https://")):
            if _origin(url_or_path) != _origin(self.base_url):
                raise FhirError(
                    f"refusing to send a request for {self.base_url} to another server: "
                    f"{_strip_query(url_or_path)} (credentials would leave the FHIR server)",
                    url=_strip_query(url_or_path))
            return url_or_path
        path = url_or_path.lstrip("/")
        return f"{self.base_url}/{path}" if path else self.base_url

    def request(self, method: str, url_or_path: str, *, params: Any = None, json_body: Any = None,
                headers: Mapping[str, str] | None = None,
                idempotent: bool | None = None, stream: bool = False) -> requests.Response:
        """Send one FHIR request with retries; return the 2xx response or raise.

        Args:
            method: HTTP method.
            url_or_path: a path relative to ``base_url`` (``"Patient/1"``, ``""`` for the
                base itself) or an absolute URL on the same server (a ``next`` link).
            params: query parameters (mapping or sequence of pairs), URL-encoded by requests.
            json_body: a JSON-able body, written with :func:`dumps`.
            headers: extra headers (they override the defaults; an ``Accept`` that is not
                JSON turns off the content-type check for replies of that type).
            idempotent: override the retry-safety derived from the method (see module doc).
            stream: do not read the body yet (large NDJSON files); the caller iterates it.

        Raises:
            FhirConflict: 409/412. FhirServerUnavailable: see the class.
            FhirError: any other non-2xx reply, or a 2xx reply that is not JSON.

        >>> fhir.request("GET", "Patient/1").status_code        # doctest: +SKIP
        200
        """
        method = method.upper()
        url = self.url(url_or_path)
        safe_url = _strip_query(url)
        path = urlsplit(url).path
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS and not (method == "PUT" and "?" in url_or_path)
        hdrs = {"Accept": _FHIR_JSON, "User-Agent": self.user_agent}
        data: bytes | None = None
        if json_body is not None:
            data = dumps(json_body).encode("utf-8")
            hdrs["Content-Type"] = _FHIR_JSON
        hdrs.update(headers or {})

        tries = 0
        refreshed = False
        while True:
            tries += 1
            with self._lock:
                self.round_trips += 1
            started = time.monotonic()
            try:
                resp = self.session.request(method, url, params=params, data=data, headers=hdrs,
                                            auth=self.auth, timeout=self.timeout, verify=self.verify,
                                            stream=stream)
            except requests.exceptions.SSLError as exc:
                raise FhirError(f"{method} {safe_url}: TLS error talking to {self.base_url}: {_short(exc)}",
                                url=safe_url, method=method) from None
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                what, nothing_sent = _describe_exception(exc)
                log.debug("%s %s -> %s after %.1f ms", method, path, what, (time.monotonic() - started) * 1e3)
                if not (idempotent or nothing_sent):
                    raise FhirServerUnavailable(
                        f"FHIR server {self.base_url}: {method} {path}: {what} after sending; the outcome "
                        f"is unknown (the server may have processed it); not retried because "
                        f"{method} is not idempotent ({tries} {'try' if tries == 1 else 'tries'})",
                        url=safe_url, method=method) from None
                if tries > self.retries:
                    raise FhirServerUnavailable(
                        f"FHIR server {self.base_url} unavailable: {method} {path}: {what} "
                        f"({tries} {'try' if tries == 1 else 'tries'})",
                        url=safe_url, method=method) from None
                self._sleep_before_retry(method, path, what, tries, None)
                continue

            status = resp.status_code
            log.debug("%s %s -> %d in %.1f ms", method, path, status, (time.monotonic() - started) * 1e3)
            if 200 <= status < 300:
                self._check_content_type(resp, hdrs.get("Accept", ""), method, safe_url)
                return resp
            if status == 401 and not refreshed and callable(getattr(self.auth, "invalidate", None)):
                refreshed = True
                log.warning("%s %s -> 401; refreshing the access token and retrying once", method, path)
                self.auth.invalidate()  # type: ignore[union-attr]
                continue
            if status in RETRY_STATUSES:
                outcome = self._outcome(resp)
                if not idempotent and status not in _REFUSED_STATUSES:
                    raise FhirServerUnavailable(
                        f"FHIR server {self.base_url}: {method} {path}: HTTP {status} from a gateway; the "
                        f"outcome is unknown (the server may have processed it); not retried because "
                        f"{method} is not idempotent: {outcome}",
                        status=status, url=safe_url, outcome=outcome, method=method)
                if tries > self.retries:
                    raise FhirServerUnavailable(
                        f"FHIR server {self.base_url} unavailable: {method} {path}: HTTP {status} "
                        f"({tries} {'try' if tries == 1 else 'tries'}): {outcome}",
                        status=status, url=safe_url, outcome=outcome, method=method)
                self._sleep_before_retry(method, path, f"HTTP {status}", tries, _retry_after(resp))
                continue
            outcome = self._outcome(resp)
            cls = FhirConflict if status in (409, 412) else FhirError
            raise cls(f"{method} {safe_url} -> HTTP {status}: {outcome or resp.reason}",
                      status=status, url=safe_url, outcome=outcome, method=method)

    def _sleep_before_retry(self, method: str, path: str, what: str, tries: int,
                            retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else self.backoff * (2 ** (tries - 1))
        delay = min(self.max_backoff, delay * (1 + random.uniform(0, 0.1)))
        log.warning("%s %s: %s; retry %d/%d in %.2f s", method, path, what, tries, self.retries, delay)
        time.sleep(delay)

    @staticmethod
    def _outcome(resp: requests.Response) -> str:
        if resp.content and _is_json_type(_media_type(resp)):
            try:
                text = operation_outcome_text(loads(resp.content))
            except ValueError:
                text = ""
            if text:
                return text
        return _body_excerpt(resp) if resp.content else ""

    @staticmethod
    def _check_content_type(resp: requests.Response, accept: str, method: str, safe_url: str) -> None:
        if not resp.content:
            return
        mime = _media_type(resp)
        wanted = [a.split(";")[0].strip().lower() for a in accept.split(",") if a.strip()]
        wants_json = any(_is_json_type(w) for w in wanted) or not wanted
        if (wants_json and _is_json_type(mime)) or mime in wanted or "*/*" in wanted:
            return
        raise FhirError(
            f"{method} {safe_url} -> HTTP {resp.status_code} with content type {mime or '(none)'!r}, "
            f"expected application/fhir+json: {_body_excerpt(resp, 120)}",
            status=resp.status_code, url=safe_url, outcome=_body_excerpt(resp), method=method)

    def _json(self, resp: requests.Response) -> dict | None:
        if not resp.content:
            return None
        try:
            body = loads(resp.content)
        except ValueError as exc:
            raise FhirError(f"{resp.request.method} {_strip_query(resp.url)}: invalid JSON in reply: {exc}",
                            status=resp.status_code, url=_strip_query(resp.url),
                            method=resp.request.method or "") from None
        return body

    # ---------------- interactions

    def capabilities(self, refresh: bool = False) -> dict:
        """The CapabilityStatement (``GET [base]/metadata``), cached after the first call.

        >>> fhir.capabilities()["fhirVersion"]                 # doctest: +SKIP
        '4.0.1'
        """
        if self._capabilities is None or refresh:
            self._capabilities = self._json(self.request("GET", "metadata")) or {}
        return self._capabilities

    def read(self, rtype: str, rid: str) -> dict | None:
        """``GET [type]/[id]``; None when the server answers 404 (unknown) or 410 (deleted).

        >>> fhir.read("Patient", "does-not-exist") is None      # doctest: +SKIP
        True
        """
        try:
            return self._json(self.request("GET", self._path(rtype, rid)))
        except FhirError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def search(self, rtype: str, params: Mapping[str, str] | Sequence[tuple[str, str]] = (), *,
               strict: bool = False) -> Iterator[dict]:
        """Yield the resources of a search across all pages.

        Entries with ``search.mode == "outcome"`` (server warnings such as an ignored
        unknown parameter) are not yielded; their text goes to
        :attr:`last_search_warnings` (reset when the iteration starts). ``match`` and
        ``include`` entries are both yielded. ``strict=True`` sends
        ``Prefer: handling=strict`` so that unknown parameters fail with a 400
        :class:`FhirError` instead. ``Bundle.total`` is never used.

        >>> [o["id"] for o in fhir.search("Observation", {"patient": "p1", "_count": "2"})]  # doctest: +SKIP
        ['o1', 'o2', 'o3']
        """
        for bundle in self.search_pages(rtype, params, strict=strict):
            for entry in bundle.get("entry") or []:
                if (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                if entry.get("resource") is not None:
                    yield entry["resource"]

    def search_pages(self, rtype: str, params: Mapping[str, str] | Sequence[tuple[str, str]] = (), *,
                     strict: bool = False) -> Iterator[dict]:
        """Yield the raw searchset Bundles of a search, page by page (see :meth:`search`)."""
        if not _RTYPE.fullmatch(rtype):
            raise ValueError(f"not a FHIR resource type: {rtype!r}")
        headers = {"Prefer": "handling=strict"} if strict else {}
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        self.last_search_warnings = []
        first = self._bundle(self.request("GET", rtype, params=pairs or None, headers=headers))
        yield from self._pages(first, headers)

    def follow_pages(self, bundle: dict) -> Iterator[dict]:
        """Yield ``bundle`` (a first searchset page, e.g. from a batch response) and the pages after it.

        >>> first = fhir.batch([{"request": {"method": "GET", "url": "Observation?patient=p1"}}])[0]
        ... # doctest: +SKIP
        >>> pages = list(fhir.follow_pages(first["resource"]))  # doctest: +SKIP
        """
        self.last_search_warnings = []
        yield from self._pages(bundle, {})

    def _pages(self, bundle: dict, headers: Mapping[str, str]) -> Iterator[dict]:
        seen: set[str] = set()
        while True:
            for entry in bundle.get("entry") or []:
                if (entry.get("search") or {}).get("mode") == "outcome":
                    text = operation_outcome_text(entry.get("resource"))
                    if text:
                        self.last_search_warnings.append(text)
            yield bundle
            nxt = next((link.get("url") for link in bundle.get("link") or []
                        if link.get("relation") == "next" and link.get("url")), None)
            if nxt is None:
                return
            if not nxt.lower().startswith(("http://", "https://")):
                nxt = urljoin(self.base_url + "/", nxt)  # a relative link: resolve, do not rebuild
            if nxt in seen:
                raise FhirError(f"the server sent the same next link twice (paging loop): {_strip_query(nxt)}",
                                url=_strip_query(nxt), method="GET")
            seen.add(nxt)
            bundle = self._bundle(self.request("GET", nxt, headers=headers))

    def _bundle(self, resp: requests.Response) -> dict:
        body = self._json(resp)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            kind = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            raise FhirError(f"{resp.request.method} {_strip_query(resp.url)}: expected a Bundle, got {kind}",
                            status=resp.status_code, url=_strip_query(resp.url),
                            outcome=operation_outcome_text(body), method=resp.request.method or "")
        return body

    def batch(self, requests: Sequence[dict]) -> list[dict]:
        """POST a ``batch`` Bundle; return the response entries in request order.

        Each entry's own ``response.status`` says whether it worked (a batch is not
        atomic). A batch of only GETs is retried like a GET.

        >>> fhir.batch([{"request": {"method": "GET", "url": "Observation?patient=p1"}},
        ...             {"request": {"method": "GET", "url": "Condition?patient=p1"}}])  # doctest: +SKIP
        [{'resource': {'resourceType': 'Bundle', 'type': 'searchset', ...}, 'response': {'status': '200 OK'}}, ...]
        """
        entries = list(requests)
        only_gets = all((e.get("request") or {}).get("method", "").upper() in ("GET", "HEAD") for e in entries)
        return self._bundle_post("batch", entries, idempotent=only_gets or None)

    def transaction(self, entries: Sequence[dict]) -> list[dict]:
        """POST a ``transaction`` Bundle (all or nothing); return the response entries.

        A failed transaction raises :class:`FhirError` (:class:`FhirConflict` for
        409/412) with the server's OperationOutcome text; nothing was stored.

        >>> fhir.transaction([
        ...     {"resource": ra, "request": {"method": "PUT", "url": "RiskAssessment/clm-1"}},
        ...     {"resource": prov, "request": {"method": "POST", "url": "Provenance"}}])  # doctest: +SKIP
        [{'response': {'status': '201 Created', ...}}, {'response': {'status': '201 Created', ...}}]
        """
        return self._bundle_post("transaction", list(entries), idempotent=None)

    def _bundle_post(self, kind: str, entries: list[dict], idempotent: bool | None) -> list[dict]:
        body = {"resourceType": "Bundle", "type": kind, "entry": entries}
        reply = self._bundle(self.request("POST", "", json_body=body, idempotent=idempotent))
        out = reply.get("entry") or []
        if len(out) != len(entries):
            raise FhirError(f"{kind}-response has {len(out)} entries for {len(entries)} requests",
                            url=self.base_url, method="POST")
        return out

    def update(self, resource: dict, *, if_match: str | None = None) -> tuple[int, dict | None]:
        """``PUT [type]/[id]`` (create-or-update by id); returns ``(200 or 201, body or None)``.

        ``if_match`` (e.g. ``'W/"3"'``) makes it version-aware: a mismatch raises
        :class:`FhirConflict` (412, or 409 on older servers).

        >>> fhir.update({"resourceType": "Patient", "id": "p1", "active": True})  # doctest: +SKIP
        (201, {'resourceType': 'Patient', 'id': 'p1', 'meta': {'versionId': '1', ...}, ...})
        """
        rtype, rid = resource.get("resourceType", ""), resource.get("id", "")
        headers = {"If-Match": if_match} if if_match else None
        resp = self.request("PUT", self._path(rtype, rid), json_body=resource, headers=headers)
        return resp.status_code, self._json(resp)

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> tuple[int, dict | None]:
        """``POST [type]``; returns ``(201, created)``, or ``(200, existing)`` for a matched conditional create.

        ``if_none_exist`` is the query part, e.g. ``"_id=clm-1"`` or ``"identifier=s|v"``;
        several matches raise :class:`FhirConflict` (412). Not retried after an unknown
        outcome (see the module docstring).

        >>> fhir.create(observation)                               # doctest: +SKIP
        (201, {'resourceType': 'Observation', 'id': '7f3c...', ...})
        """
        rtype = resource.get("resourceType", "")
        if not _RTYPE.fullmatch(str(rtype)):
            raise ValueError(f"not a FHIR resource type: {rtype!r}")
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        resp = self.request("POST", rtype, json_body=resource, headers=headers)
        return resp.status_code, self._json(resp)

    def delete(self, rtype: str, rid: str) -> int:
        """``DELETE [type]/[id]``; returns the status (404/410 are returned, not raised: already gone).

        >>> fhir.delete("RiskAssessment", "clm-1")                  # doctest: +SKIP
        200
        """
        try:
            return self.request("DELETE", self._path(rtype, rid)).status_code
        except FhirError as exc:
            if exc.status in (404, 410):
                return exc.status
            raise

    @staticmethod
    def _path(rtype: str, rid: str) -> str:
        """``Type/id`` after checking both (an id like ``../x`` or ``a?b`` must not reach the URL)."""
        if not _RTYPE.fullmatch(str(rtype)):
            raise ValueError(f"not a FHIR resource type: {rtype!r}")
        if not _RID.fullmatch(str(rid)):
            raise ValueError(f"not a valid FHIR id (1-64 of A-Z a-z 0-9 - .): {rid!r}")
        return f"{rtype}/{rid}"
