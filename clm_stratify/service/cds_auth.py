"""Who may call the CDS Hooks service: the CDS client's signed JWT (CDS Hooks 2.0,
"Trusting CDS Clients").

Every call (discovery too) carries ``Authorization: Bearer <JWT>``. The JWT is checked
against the JWK Set of its issuer, registered out of band (``--cds-client ISS=JWKS_FILE``):

* header: ``typ`` JWT, ``kid`` naming a key of that issuer's set, ``alg`` asymmetric
  (RS/ES/PS 256/384/512; never ``none`` or HMAC, as the spec requires);
* payload: ``iss`` a trusted issuer, ``aud`` the URL called (``<public URL>/cds-services``
  or ``/cds-services/<id>``), ``exp`` in the future, ``iat`` not in the future, ``jti``
  not seen before (kept until its ``exp``; a replayed token is refused);
* ``exp`` and ``iat`` integers (the spec: "Expiration time integer"; a string, a
  fraction or a boolean is refused), and the token short-lived: ``exp`` at most
  :data:`MAX_LIFETIME` (5 minutes, the lifetime the spec's examples and SMART's client
  assertions use) plus :data:`LIFETIME_LEEWAY` after ``iat`` and after now. A token valid
  for years is a stolen token's licence, and it would keep its ``jti`` in memory as long.

A ``jku`` header is accepted but never fetched (Epic and other EHRs send one; fetching it
would make the service call a URL a request names): the issuer's JWK Set is registered
out of band, as the spec allows. Anything else is a 401 with the reason.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt

ALGORITHMS = ("RS384", "ES384", "RS256", "ES256", "RS512", "ES512", "PS256", "PS384", "PS512")
LEEWAY = 30            # seconds of clock skew allowed on exp / iat
MAX_LIFETIME = 300     # seconds a JWT may live (exp after iat, and after now)
LIFETIME_LEEWAY = 60   # seconds allowed beyond MAX_LIFETIME (clock skew, slow networks)
MAX_SEEN = 100_000     # jti kept at most (oldest dropped first once expired)


class AuthFailed(Exception):
    """The call is not from a trusted CDS client (HTTP 401)."""


def load_jwks(path: str | Path) -> jwt.PyJWKSet:
    """A JWK Set file (``{"keys": [...]}``); ValueError naming the file when unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        keys = jwt.PyJWKSet.from_dict(data)
    except (OSError, ValueError, jwt.PyJWKSetError, jwt.InvalidKeyError) as exc:
        raise ValueError(f"{path}: not a usable JWK Set ({exc})") from None
    for key in keys.keys:
        if key.key_type not in ("RSA", "EC"):
            raise ValueError(f"{path}: key {key.key_id!r} is {key.key_type}: only RSA and EC public keys are trusted")
    return keys


@dataclass
class JwtVerifier:
    """Checks the CDS client's JWT of one call."""

    clients: dict[str, jwt.PyJWKSet]                  # iss -> its JWK Set
    _seen: dict[str, float] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def verify(self, authorization: str | None, audience: str) -> dict:
        """The JWT's claims, or :class:`AuthFailed` saying why not."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthFailed("no Authorization: Bearer <JWT> header")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthFailed(f"the bearer token is not a JWT ({exc})") from None
        for claim in ("exp", "iat"):
            value = unverified.get(claim)
            if claim in unverified and (not isinstance(value, int) or isinstance(value, bool)):
                raise AuthFailed(f"JWT refused: {claim} is {type(value).__name__} {value!r}, not an integer "
                                 "(seconds since the epoch)")
        if header.get("typ") not in ("JWT", None) or header.get("alg") not in ALGORITHMS:
            raise AuthFailed(f"JWT alg {header.get('alg')!r} is not accepted (one of {', '.join(ALGORITHMS)})")
        iss = unverified.get("iss")
        keys = self.clients.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise AuthFailed(f"JWT issuer {iss!r} is not a registered CDS client")
        kid = header.get("kid")
        key = next((k for k in keys.keys if k.key_id == kid), None)
        if key is None:
            raise AuthFailed(f"JWT kid {kid!r} is not a key registered for {iss}"
                             + (" (jku is never fetched: register the client's JWK Set)" if header.get("jku") else ""))
        try:
            claims = jwt.decode(token, key.key, algorithms=[header["alg"]], audience=audience, issuer=iss,
                                leeway=LEEWAY, options={"require": ["iss", "aud", "exp", "iat", "jti"]})
        except jwt.PyJWTError as exc:
            raise AuthFailed(f"JWT refused: {exc}") from None
        now = time.time()
        if claims["iat"] > now + LEEWAY:
            raise AuthFailed("JWT refused: issued in the future (iat)")
        lifetime = claims["exp"] - min(claims["iat"], now)
        if lifetime > MAX_LIFETIME + LIFETIME_LEEWAY:
            raise AuthFailed(f"JWT refused: exp is {int(lifetime)} s after iat or now; a CDS client's JWT is "
                             f"short-lived (at most {MAX_LIFETIME} s)")
        self._not_replayed(str(claims["jti"]), float(claims["exp"]))
        return claims

    def _not_replayed(self, jti: str, exp: float) -> None:
        now = time.time()
        with self._lock:
            if jti in self._seen:
                raise AuthFailed("JWT refused: its jti was already used (replay)")
            if len(self._seen) >= MAX_SEEN:
                for old in [j for j, e in self._seen.items() if e + LEEWAY < now]:
                    del self._seen[old]
                if len(self._seen) >= MAX_SEEN:
                    raise AuthFailed("JWT refused: too many unexpired tokens in use")
            self._seen[jti] = exp
