"""Authentication for :class:`fhir_adapters.fhir.client.FhirClient`: static bearer tokens and SMART Backend Services.

::

    from fhir_adapters.fhir.auth import BearerToken, SmartBackendServices, load_private_key
    from fhir_adapters.fhir.client import FhirClient

    FhirClient("https://fhir.example.org/r4", BearerToken("t0k"))

    auth = SmartBackendServices("clm-stratify", load_private_key("/etc/clm/key.pem"),
                                base_url="https://fhir.example.org/r4", kid="key-2026")
    FhirClient("https://fhir.example.org/r4", auth)

SMART Backend Services (``client_credentials`` with a ``private_key_jwt`` assertion):

* The token endpoint is taken from ``token_url`` or discovered from
  ``{base_url}/.well-known/smart-configuration`` (``token_endpoint``) on first use.
* Each token request carries a fresh assertion signed with the private key: claims
  ``iss = sub = client_id``, ``aud = token_url`` (exactly; servers compare it
  literally), ``iat``, ``exp = now + 300 s`` (the SMART maximum), a random ``jti``
  (servers reject replays); header ``kid`` when given.
* The access token is cached until 60 s before ``expires_in`` (half the lifetime for
  tokens shorter than 2 minutes), shared by all threads (one fetch at a time).
  :meth:`SmartBackendServices.invalidate` drops it; ``FhirClient`` calls it on a 401
  and retries once.
* Errors from the token endpoint raise :class:`AuthError` (a ``FhirError``) carrying
  the endpoint's ``error`` / ``error_description``. The assertion, the private key and
  tokens never appear in messages, ``repr`` or logs.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import requests
import requests.auth
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fhir_adapters.fhir.errors import FhirError, operation_outcome_text
from fhir_adapters.fhir.transport import strip_query

__all__ = ["AuthError", "BearerToken", "PrivateKeyError", "SmartBackendServices", "load_private_key"]

log = logging.getLogger("clm_stratify.auth")

DEFAULT_SCOPE = "system/*.read system/RiskAssessment.write system/Provenance.write"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ALGORITHMS = {"RS256": rsa.RSAPrivateKey, "RS384": rsa.RSAPrivateKey, "RS512": rsa.RSAPrivateKey,
               "ES256": ec.EllipticCurvePrivateKey, "ES384": ec.EllipticCurvePrivateKey,
               "ES512": ec.EllipticCurvePrivateKey}


class AuthError(FhirError):
    """Getting an access token failed (token endpoint error, discovery failure, bad reply).

    ``outcome`` holds the endpoint's ``error: error_description``.
    """


class PrivateKeyError(ValueError):
    """The private key file is missing, unreadable, encrypted or not a PEM private key."""


def load_private_key(path: str | os.PathLike[str]) -> bytes:
    """Read a PEM private key file (PKCS#8 or traditional RSA/EC, unencrypted) and check it parses.

    Logs a warning when the file is readable by group or others.

    >>> load_private_key("/nonexistent/key.pem")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    fhir_adapters.fhir.auth.PrivateKeyError: private key file /nonexistent/key.pem does not exist
    """
    p = Path(path)
    if not p.is_file():
        raise PrivateKeyError(f"private key file {p} does not exist" if not p.exists()
                              else f"private key path {p} is not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PrivateKeyError(f"cannot read private key file {p}: {exc.strerror}") from None
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise PrivateKeyError(f"{p} is not a PEM private key (expected '-----BEGIN PRIVATE KEY-----')")
    _parse_key(data, where=str(p))
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key file %s is accessible by group/others (mode %o); chmod 600 it",
                    p, stat.S_IMODE(mode))
    return data


def _parse_key(pem: str | bytes, where: str = "private_key") -> Any:
    data = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise PrivateKeyError(f"{where}: the PEM private key is encrypted; provide an unencrypted key "
                              "(protect it with file permissions or a secret store)") from None
    except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise PrivateKeyError(f"{where}: not a valid PEM private key ({type(exc).__name__})") from None


_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]*)*")


def _redact(text: str, assertion: str, limit: int = 300) -> str:
    """Endpoint text safe for messages: the assertion and anything JWT-like removed, one line, truncated.

    >>> _redact("bad: eyJhbGciOi.eyJzdWIi.c2ln  here", "x")
    'bad: [jwt] here'
    """
    text = _JWT.sub("[jwt]", text.replace(assertion, "[assertion]"))
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


class BearerToken(requests.auth.AuthBase):
    """A static bearer token: ``Authorization: Bearer <token>``. ``repr`` hides the token.

    >>> BearerToken("s3cret")
    BearerToken(token=***)
    """

    def __init__(self, token: str) -> None:
        if not token or any(c in token for c in "\r\n"):
            raise ValueError("bearer token must be a non-empty single-line string")
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "BearerToken(token=***)"

    __str__ = __repr__


class SmartBackendServices(requests.auth.AuthBase):
    """SMART Backend Services (``client_credentials`` + ``private_key_jwt``) as a ``requests`` auth.

    Args:
        client_id: the registered client id (also ``iss`` and ``sub`` of the assertion).
        private_key: PEM private key (RSA for RS*, EC for ES*).
        token_url: token endpoint; discovered from ``base_url`` when None.
        base_url: FHIR base used for discovery (``/.well-known/smart-configuration``).
        scope: requested scopes.
        algorithm: JWS algorithm of the assertion (RS384 or ES384 per SMART; RS256/ES256 accepted).
        kid: key id put in the assertion header (lets the server pick the key from a JWKS).
        session: session for the token endpoint (a new one by default).
        timeout: token endpoint timeout in seconds.

    Attributes:
        token_requests: how many token requests were sent (for tests and diagnostics).

    >>> auth = SmartBackendServices("clm-stratify", pem, token_url="https://auth.example.org/token")
    ... # doctest: +SKIP
    >>> auth                                                          # doctest: +SKIP
    SmartBackendServices(client_id='clm-stratify', token_url='https://auth.example.org/token', ...)
    """

    def __init__(self, client_id: str, private_key: str | bytes, *, token_url: str | None = None,
                 base_url: str | None = None, scope: str = DEFAULT_SCOPE, algorithm: str = "RS384",
                 kid: str | None = None, session: requests.Session | None = None,
                 timeout: float | tuple[float, float] = 10) -> None:
        if not client_id:
            raise ValueError("client_id is required")
        if token_url is None and base_url is None:
            raise ValueError("give token_url or base_url (for SMART discovery)")
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"unsupported algorithm {algorithm!r}; use one of {sorted(_ALGORITHMS)}")
        key = _parse_key(private_key)
        if not isinstance(key, _ALGORITHMS[algorithm]):
            raise PrivateKeyError(f"algorithm {algorithm} needs an {'RSA' if algorithm[0] == 'R' else 'EC'} "
                                  f"key, got {type(key).__name__.lstrip('_')}")
        self.client_id = client_id
        self.token_url = token_url
        self.base_url = base_url.rstrip("/") if base_url else None
        self.scope = scope
        self.algorithm = algorithm
        self.kid = kid
        self.timeout = timeout
        self.token_requests = 0
        self._key = key
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0  # time.monotonic() after which the cached token is not used

    def __repr__(self) -> str:
        return (f"SmartBackendServices(client_id={self.client_id!r}, token_url={self.token_url!r}, "
                f"scope={self.scope!r}, algorithm={self.algorithm!r}, kid={self.kid!r})")

    __str__ = __repr__

    # ---------------- requests auth hook

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.access_token()}"
        return r

    def invalidate(self) -> None:
        """Forget the cached token (the next request fetches a new one)."""
        with self._lock:
            self._token = None
            self._expires_at = 0.0

    def access_token(self) -> str:
        """A valid access token: the cached one, or a new one from the token endpoint."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._token, lifetime = self._fetch_token()
                margin = 60.0 if lifetime >= 120 else lifetime / 2
                self._expires_at = time.monotonic() + lifetime - margin
            return self._token

    # ---------------- token endpoint

    def discover(self) -> str:
        """Find the token endpoint from ``{base_url}/.well-known/smart-configuration``."""
        assert self.base_url is not None
        url = f"{self.base_url}/.well-known/smart-configuration"
        try:
            resp = self._session.get(url, headers={"Accept": "application/json"}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise AuthError(f"SMART discovery failed: GET {url}: {type(exc).__name__}",
                            url=url, method="GET") from None
        endpoint = None
        if resp.status_code == 200:
            try:
                endpoint = resp.json().get("token_endpoint")
            except (ValueError, AttributeError):
                endpoint = None
        if not isinstance(endpoint, str) or not endpoint.lower().startswith(("http://", "https://")):
            raise AuthError(f"SMART discovery failed: GET {url} -> HTTP {resp.status_code} without a "
                            "token_endpoint; pass token_url explicitly",
                            status=resp.status_code, url=url, method="GET")
        return endpoint

    def _assertion(self, token_url: str) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url,
                  "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
        headers = {"kid": self.kid} if self.kid else None
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def _fetch_token(self) -> tuple[str, float]:
        if self.token_url is None:
            self.token_url = self.discover()
        url = self.token_url
        safe_url = strip_query(url)
        assertion = self._assertion(url)
        form = {"grant_type": "client_credentials", "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
        self.token_requests += 1
        try:
            resp = self._session.post(url, data=form, headers={"Accept": "application/json"},
                                      timeout=self.timeout)
        except requests.RequestException as exc:
            raise AuthError(f"token endpoint {safe_url} unreachable: {type(exc).__name__}",
                            url=safe_url, method="POST") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
            detail = operation_outcome_text(body) if isinstance(body, dict) else ""
            if not detail:
                detail = resp.text if resp.status_code != 200 else "no access_token in reply"
            detail = _redact(detail, assertion)
            raise AuthError(f"token request to {safe_url} failed: HTTP {resp.status_code}: {detail}",
                            status=resp.status_code, url=safe_url, outcome=detail, method="POST")
        token_type = str(body.get("token_type", "bearer"))
        if token_type.lower() != "bearer":
            raise AuthError(f"token endpoint {safe_url} returned token_type {token_type!r}, expected bearer",
                            status=resp.status_code, url=safe_url, method="POST")
        try:
            lifetime = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        log.debug("access token from %s for %s (expires in %.0f s)", safe_url, self.client_id, lifetime)
        return str(body["access_token"]), lifetime
