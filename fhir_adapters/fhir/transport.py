"""The HTTP transport under :class:`fhir_adapters.fhir.client.FhirClient`.

:meth:`Transport.request` is the single place that sends: retries, back-off, error
mapping and logging live there and nowhere else.

Decisions (each one tested in ``tests/unit/test_client.py``):

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
  (:class:`fhir_adapters.fhir.auth.SmartBackendServices`), the cached token is dropped and the
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

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3.exceptions

from fhir_adapters.fhir.codec import dumps, loads
from fhir_adapters.fhir.errors import FhirConflict, FhirError, FhirServerUnavailable, operation_outcome_text
from fhir_adapters.project import VERSION

__all__ = ["Transport", "retry_after", "strip_query", "RETRY_STATUSES", "FHIR_JSON"]

log = logging.getLogger("clm_stratify.http")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: statuses meaning "the server did not process the request": safe to retry any method.
_REFUSED_STATUSES = frozenset({429, 503})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
FHIR_JSON = "application/fhir+json"


def _body_excerpt(resp: requests.Response, limit: int = 300) -> str:
    text = resp.content[:4000].decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _media_type(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _is_json_type(mime: str) -> bool:
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def strip_query(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme.lower())
    return p.scheme.lower(), (p.hostname or "").lower(), port


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), or None.

    >>> retry_after({"Retry-After": "7"}), retry_after({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"})
    (7.0, 0.0)
    >>> retry_after({"Retry-After": "soon"}) is None
    True
    """
    value = headers.get("Retry-After")
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


class Transport:
    """HTTP to one FHIR base URL over one pooled :class:`requests.Session`.

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
    """

    def __init__(self, base_url: str, auth: requests.auth.AuthBase | None = None, *,
                 timeout: float | tuple[float, float] = (5, 30), retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 30.0, verify: bool | str = True,
                 session: requests.Session | None = None,
                 user_agent: str = f"clm-stratify/{VERSION}") -> None:
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
        self._capabilities: Any = None   # FhirClient.capabilities() caches here
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

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, auth={self.auth!r})"

    # ---------------- the one place that sends

    def url(self, url_or_path: str) -> str:
        """Absolute URL for a path relative to ``base_url`` (checks absolute URLs stay on this server).

        >>> Transport("http://h:1/fhir").url("Patient/1")
        'http://h:1/fhir/Patient/1'
        """
        if url_or_path.lower().startswith(("http://", "https://")):
            if _origin(url_or_path) != _origin(self.base_url):
                raise FhirError(
                    f"refusing to send a request for {self.base_url} to another server: "
                    f"{strip_query(url_or_path)} (credentials would leave the FHIR server)",
                    url=strip_query(url_or_path))
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
        safe_url = strip_query(url)
        path = urlsplit(url).path
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS and not (method == "PUT" and "?" in url_or_path)
        hdrs = {"Accept": FHIR_JSON, "User-Agent": self.user_agent}
        data: bytes | None = None
        if json_body is not None:
            data = dumps(json_body).encode("utf-8")
            hdrs["Content-Type"] = FHIR_JSON
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
                self._check_content_type(resp, hdrs.get("Accept", ""), method, safe_url, stream)
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
                self._sleep_before_retry(method, path, f"HTTP {status}", tries, retry_after(resp.headers))
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
    def _check_content_type(resp: requests.Response, accept: str, method: str, safe_url: str,
                            stream: bool = False) -> None:
        # A streamed body is not read here (it may be large): its headers decide.
        if resp.headers.get("Content-Length") == "0" if stream else not resp.content:
            return
        mime = _media_type(resp)
        wanted = [a.split(";")[0].strip().lower() for a in accept.split(",") if a.strip()]
        wants_json = any(_is_json_type(w) for w in wanted) or not wanted
        if (wants_json and _is_json_type(mime)) or mime in wanted or "*/*" in wanted:
            return
        if stream:
            resp.close()
            raise FhirError(f"{method} {safe_url} -> HTTP {resp.status_code} with content type "
                            f"{mime or '(none)'!r}, expected {accept or FHIR_JSON}",
                            status=resp.status_code, url=safe_url, method=method)
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
            raise FhirError(f"{resp.request.method} {strip_query(resp.url)}: invalid JSON in reply: {exc}",
                            status=resp.status_code, url=strip_query(resp.url),
                            method=resp.request.method or "") from None
        return body
