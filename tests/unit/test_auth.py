"""Tests for fhir_adapters.fhir.auth: BearerToken, SmartBackendServices, load_private_key.

The SMART tests run against a real SEKMET server that requires SMART Backend Services
tokens; a scripted loopback token endpoint covers caching, threads and error texts."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_adapters.fhir.auth import (
    AuthError, BearerToken, PrivateKeyError, SmartBackendServices, load_private_key,
)
from fhir_adapters.fhir.client import FhirError
from tests.support.http import LoopbackServer, read_body, send
from tests.support.keys import CLIENT_ID, pem_of as _pem



# --------------------------------------------------------------------------- scripted token endpoint

class TokenEndpoint:
    """A loopback token endpoint: ``reply(form) -> (status, body)``; records the forms it got."""

    def __init__(self, reply: Callable[[dict[str, str]], tuple[int, object]]) -> None:
        self.reply = reply
        self.forms: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.server = LoopbackServer(self._handle, methods=["POST"])  # GET (discovery) gets 501
        self.url = f"{self.server.url}/auth/token"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        form = {k: v[0] for k, v in parse_qs(read_body(h).decode()).items()}
        with self._lock:
            self.forms.append(form)
        time.sleep(0.05)  # widen the window for concurrent callers
        status, body = self.reply(form)
        send(h, status, body, ctype="text/plain" if isinstance(body, str) else "application/json")

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def token_endpoint() -> Iterator[Callable[..., TokenEndpoint]]:
    started: list[TokenEndpoint] = []

    def start(reply: Callable[[dict[str, str]], tuple[int, object]]) -> TokenEndpoint:
        started.append(TokenEndpoint(reply))
        return started[-1]

    yield start
    for t in started:
        t.close()


def _ok(form: dict[str, str]) -> tuple[int, object]:
    return 200, {"access_token": f"tok-{uuid.uuid4().hex}", "token_type": "bearer", "expires_in": 3600,
                 "scope": form.get("scope", "")}


# --------------------------------------------------------------------------- unit tests

def test_bearer_token_sets_header_and_hides_it() -> None:
    auth = BearerToken("s3cret-value")
    r = auth(requests.Request("GET", "http://127.0.0.1/fhir/metadata").prepare())
    assert r.headers["Authorization"] == "Bearer s3cret-value"
    assert "s3cret" not in repr(auth) and "s3cret" not in str(auth)
    with pytest.raises(ValueError):
        BearerToken("a\r\nX-Evil: 1")


def test_load_private_key(tmp_path: Path, pem: bytes, rsa_key: rsa.RSAPrivateKey,
                          caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "key.pem"
    good.write_bytes(pem)
    good.chmod(0o600)
    assert load_private_key(good) == pem
    with pytest.raises(PrivateKeyError, match="does not exist"):
        load_private_key(tmp_path / "missing.pem")
    notpem = tmp_path / "cert.txt"
    notpem.write_text("hello")
    with pytest.raises(PrivateKeyError, match="not a PEM private key"):
        load_private_key(notpem)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PrivateKeyError, match="not a valid PEM private key"):
        load_private_key(broken)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(_pem(rsa_key, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(PrivateKeyError, match="encrypted"):
        load_private_key(encrypted)
    good.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="clm_stratify.auth"):
        load_private_key(good)
    assert "chmod 600" in caplog.text and "PRIVATE" not in caplog.text


def test_constructor_checks(pem: bytes) -> None:
    with pytest.raises(ValueError, match="token_url or base_url"):
        SmartBackendServices(CLIENT_ID, pem)
    with pytest.raises(ValueError, match="unsupported algorithm"):
        SmartBackendServices(CLIENT_ID, pem, token_url="http://127.0.0.1:1/t", algorithm="HS256")
    with pytest.raises(PrivateKeyError, match="EC"):
        SmartBackendServices(CLIENT_ID, pem, token_url="http://127.0.0.1:1/t", algorithm="ES384")
    auth = SmartBackendServices(CLIENT_ID, pem.decode(), token_url="http://127.0.0.1:1/t", kid="k1")
    text = repr(auth)
    assert CLIENT_ID in text and "PRIVATE" not in text and "MII" not in text


def test_assertion_claims_and_caching(token_endpoint, pem: bytes, rsa_key: rsa.RSAPrivateKey) -> None:
    ep = token_endpoint(_ok)
    auth = SmartBackendServices(CLIENT_ID, pem, token_url=ep.url, kid="key-1", scope="system/*.read")
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(auth.access_token())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(set(tokens)) == 1 and len(tokens) == 8
    assert auth.token_requests == 1 and len(ep.forms) == 1
    form = ep.forms[0]
    assert form["grant_type"] == "client_credentials" and form["scope"] == "system/*.read"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = form["client_assertion"]
    assert jwt.get_unverified_header(assertion)["kid"] == "key-1"
    assert jwt.get_unverified_header(assertion)["alg"] == "RS384"
    claims = jwt.decode(assertion, rsa_key.public_key(), algorithms=["RS384"], audience=ep.url)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["exp"] <= time.time() + 300 and claims["exp"] > time.time() + 200
    auth.invalidate()
    assert auth.access_token() != tokens[0]
    second = jwt.decode(ep.forms[1]["client_assertion"], rsa_key.public_key(), algorithms=["RS384"],
                        audience=ep.url)
    assert second["jti"] != claims["jti"]


def test_short_lived_tokens_are_refreshed(token_endpoint, pem: bytes) -> None:
    ep = token_endpoint(lambda form: (200, {"access_token": uuid.uuid4().hex, "token_type": "Bearer",
                                            "expires_in": 0.2}))
    auth = SmartBackendServices(CLIENT_ID, pem, token_url=ep.url)
    first = auth.access_token()
    assert auth.access_token() == first
    time.sleep(0.15)  # past half the lifetime
    assert auth.access_token() != first and auth.token_requests == 2


def test_ec_key_signs_es384(token_endpoint) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    ep = token_endpoint(_ok)
    SmartBackendServices(CLIENT_ID, _pem(key), token_url=ep.url, algorithm="ES384").access_token()
    jwt.decode(ep.forms[0]["client_assertion"], key.public_key(), algorithms=["ES384"], audience=ep.url)


def test_token_errors_do_not_leak_secrets(token_endpoint, pem: bytes) -> None:
    # A careless endpoint that echoes the whole form (assertion included) in a text/plain 400.
    ep = token_endpoint(lambda form: (400, "bad request: " + json.dumps(form)))
    auth = SmartBackendServices(CLIENT_ID, pem, token_url=ep.url)
    with pytest.raises(AuthError) as ei:
        auth.access_token()
    assertion = ep.forms[0]["client_assertion"]
    assert assertion not in str(ei.value) and assertion[:40] not in str(ei.value)
    assert "[assertion]" in str(ei.value) and ei.value.status == 400
    ep2 = token_endpoint(lambda form: (401, {"error": "invalid_client", "error_description": "Unknown key"}))
    with pytest.raises(AuthError, match="invalid_client: Unknown key") as ei2:
        SmartBackendServices(CLIENT_ID, pem, token_url=ep2.url).access_token()
    assert ei2.value.outcome == "invalid_client: Unknown key" and isinstance(ei2.value, FhirError)


def test_discovery_failure_is_clear(token_endpoint, pem: bytes) -> None:
    ep = token_endpoint(_ok)  # answers POST only: GET .well-known gives 501
    base = ep.url.rsplit("/auth/token", 1)[0] + "/fhir"
    with pytest.raises(AuthError, match="SMART discovery failed.*token_url"):
        SmartBackendServices(CLIENT_ID, pem, base_url=base).access_token()
