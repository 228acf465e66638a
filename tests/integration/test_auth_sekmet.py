"""SMART Backend Services and bearer tokens against a real SEKMET server that requires them."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fhir_adapters.fhir.auth import AuthError, BearerToken, SmartBackendServices
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.local_server import LocalFhirServer
from tests.support.keys import CLIENT_ID, pem_of as _pem


@pytest.fixture(scope="module")
def smart_server(fhir_server: LocalFhirServer, rsa_key: rsa.RSAPrivateKey,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFhirServer]:
    """SEKMET requiring SMART Backend Services tokens (needs fhir_server only to skip consistently)."""
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    jwk.update(kid="clm-1", alg="RS384", use="sig")
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("sekmet-smart"),
                         smart_clients={CLIENT_ID: {"keys": [jwk]}}, smart_scopes="system/*.*") as server:
        yield server


@pytest.mark.integration
def test_smart_token_is_fetched_once_and_reused(smart_server: LocalFhirServer, pem: bytes) -> None:
    auth = SmartBackendServices(CLIENT_ID, pem, base_url=smart_server.base_url, kid="clm-1",
                                scope="system/*.read system/*.write")
    fhir = FhirClient(smart_server.base_url, auth, retries=0)
    rid = f"clm-{uuid.uuid4().hex[:12]}"
    assert fhir.update({"resourceType": "RiskAssessment", "id": rid, "status": "final",
                        "subject": {"reference": "Patient/p1"}})[0] == 201
    assert fhir.read("RiskAssessment", rid)["id"] == rid  # type: ignore[index]
    assert list(fhir.search("Observation", {"patient": "p1"})) == []
    out = fhir.batch([{"request": {"method": "GET", "url": "Observation?patient=p1"}}])
    assert out[0]["response"]["status"] == "200 OK"
    assert auth.token_url == smart_server.token_url  # discovered
    assert auth.token_requests == 1 and fhir.round_trips == 4


@pytest.mark.integration
def test_smart_401_refreshes_once(smart_server: LocalFhirServer, pem: bytes) -> None:
    auth = SmartBackendServices(CLIENT_ID, pem, token_url=smart_server.token_url)
    fhir = FhirClient(smart_server.base_url, auth, retries=0)
    fhir.read("Patient", "nobody")
    auth._token = "not-a-valid-token"  # as if the server had rotated its signing secret
    assert fhir.read("Patient", "nobody") is None
    assert auth.token_requests == 2 and fhir.round_trips == 3


@pytest.mark.integration
def test_smart_without_auth_is_401(smart_server: LocalFhirServer) -> None:
    fhir = FhirClient(smart_server.base_url, retries=0)
    assert fhir.capabilities().fhir_version == "4.0.1"  # /metadata stays open
    with pytest.raises(FhirError) as ei:
        fhir.read("Patient", "p1")
    assert ei.value.status == 401 and type(ei.value) is FhirError


@pytest.mark.integration
def test_smart_wrong_key_gives_auth_error(smart_server: LocalFhirServer) -> None:
    other = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    auth = SmartBackendServices(CLIENT_ID, other, token_url=smart_server.token_url)
    fhir = FhirClient(smart_server.base_url, auth, retries=0)
    with pytest.raises(AuthError) as ei:
        fhir.read("Patient", "p1")
    e = ei.value
    assert e.status == 401 and "invalid_client" in e.outcome and "verification failed" in str(e)
    assert "eyJ" not in str(e) and "PRIVATE" not in str(e) and "MII" not in str(e)
    assert fhir.round_trips == 1  # the request never left: token first


@pytest.mark.integration
def test_smart_logs_no_ids_or_tokens(smart_server: LocalFhirServer, pem: bytes,
                                     caplog: pytest.LogCaptureFixture) -> None:
    auth = SmartBackendServices(CLIENT_ID, pem, token_url=smart_server.token_url)
    fhir = FhirClient(smart_server.base_url, auth, retries=0)
    with caplog.at_level(logging.INFO):
        list(fhir.search("Observation", {"patient": "secret-id"}))
        auth._token = "stale-token"
        list(fhir.search("Observation", {"patient": "secret-id"}))  # 401 -> refresh (one WARNING)
    token = auth.access_token()
    assert "refreshing" in caplog.text
    for secret in ("secret-id", token, "stale-token", "Bearer", "eyJ"):
        assert secret not in caplog.text


@pytest.mark.integration
def test_static_bearer_token(fhir_server: LocalFhirServer, tmp_path: Path) -> None:
    with LocalFhirServer(data_dir=tmp_path, settings={"server_auth": {"types": ["bearer"], "tokens": ["t0k"]}}) \
            as server:
        ok = FhirClient(server.base_url, BearerToken("t0k"), retries=0)
        assert ok.read("Patient", "nobody") is None
        assert ok.create({"resourceType": "Patient"})[0] == 201
        with pytest.raises(FhirError) as ei:
            FhirClient(server.base_url, BearerToken("wrong"), retries=0).read("Patient", "nobody")
        assert ei.value.status == 401
