"""Secrets and privacy: no token, secret or key in logs or messages; no patient
identifiers in INFO logs; TLS verification cannot be turned off silently.

Everything runs for real: SEKMET with a static bearer token or SMART Backend Services,
the receiver as a process (its whole log file is checked), and an HTTPS fault proxy
with a self-signed certificate for the TLS checks.

Run: ``python -m pytest tests/integration/test_secrets.py``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import ssl

import pytest
import requests

from clm_stratify.cli import main
from fhir_adapters.fhir.auth import BearerToken
from fhir_adapters.fhir.client import FhirClient, dumps
from fhir_adapters.fhir.load import load_bundles
from fhir_adapters.fhir.local_server import LocalFhirServer
from tests.support.fault_proxy import FaultProxy
from tests.support.fixture_data import bundles, tumour_observations
from tests.support.receiver_process import SECRET, Receiver

pytestmark = pytest.mark.integration
TOKEN = "tok-" + "7f3a9c" * 6
JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\.")
NAMES = ("Aldana", "Marta", "MRN-CLM-")


def _texts(caplog, capsys) -> str:
    out = capsys.readouterr()
    return "\n".join([caplog.text, out.out, out.err])


@pytest.fixture(scope="module")
def bearer_server(tmp_path_factory):
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("bearer"),
                         settings={"server_auth": {"types": ["bearer"], "tokens": [TOKEN]}}) as srv:
        with FhirClient(srv.base_url, BearerToken(TOKEN)) as c:
            load_bundles(c, bundles())
        yield srv


def test_bearer_token_never_in_logs_or_errors(bearer_server, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="clm_stratify")
    monkeypatch.setenv("CLM_FHIR_TOKEN", TOKEN)
    assert main(["run", "--fhir-url", bearer_server.base_url, "--all", "--auth", "bearer"]) == 0
    # through faults: the retry WARNING lines too
    with FaultProxy(bearer_server.root_url, seed=3, shares={"503": 0.3, "reset": 0.2}, max_faults=4) as proxy:
        main(["run", "--fhir-url", proxy.base_url, "--patient", "f05-pat", "--auth", "bearer",
              "--connect-timeout", "1", "--read-timeout", "2"])
    monkeypatch.setenv("CLM_FHIR_TOKEN", TOKEN + "-wrong")
    assert main(["run", "--fhir-url", bearer_server.base_url, "--patient", "f05-pat", "--auth", "bearer"]) in (1, 3)
    text = _texts(caplog, capsys)
    assert "401" in text and "clm_stratify.http" in caplog.text     # DEBUG lines were captured
    assert TOKEN not in text and "7f3a9c7f3a9c" not in text
    assert not logging.getLogger("urllib3").isEnabledFor(logging.DEBUG)


def test_smart_private_key_and_access_token_never_in_logs(tmp_path, caplog, capsys):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    caplog.set_level(logging.DEBUG, logger="clm_stratify")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    key_file = tmp_path / "clm.pem"
    key_file.write_bytes(pem)
    key_file.chmod(0o600)
    other = tmp_path / "other.pem"
    other.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="k1", alg="RS384", use="sig")
    with LocalFhirServer(data_dir=tmp_path / "srv", smart_clients={"clm": {"keys": [jwk]}}) as srv:
        from fhir_adapters.fhir.auth import SmartBackendServices
        with FhirClient(srv.base_url, SmartBackendServices("clm", pem, base_url=srv.base_url,
                                                           scope="system/*.*")) as c:
            load_bundles(c, bundles()[:6])
        argv = ["run", "--fhir-url", srv.base_url, "--patient", "f05-pat", "--auth", "smart",
                "--smart-client-id", "clm", "--smart-scope", "system/*.read system/*.write"]
        assert main(argv + ["--smart-key", str(key_file)]) == 0
        assert main(argv + ["--smart-key", str(other)]) in (1, 3)        # a key the server does not know
    text = _texts(caplog, capsys)
    body = b"".join(pem.splitlines()[1:-1]).decode()
    assert "BEGIN" not in text and body[:40] not in text and body[-40:] not in text
    assert not JWT.search(text), JWT.search(text).group(0)
    assert "401" in text or "invalid_client" in text                  # the failure was reported


@pytest.fixture(scope="module")
def fhir(tmp_path_factory):
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("plain")) as srv:
        with FhirClient(srv.base_url) as c:
            load_bundles(c, bundles())
        yield srv


def test_serve_log_holds_no_secret_and_no_patient_identifier(fhir, tmp_path, monkeypatch, caplog, capsys):
    """The receiver's whole log (stderr, INFO) after accepted, refused and failing
    notifications, HMAC on, a subscribe/remove round: no subscription secret, no HMAC
    key, no patient id, name or MRN, no urllib3 DEBUG line, no query string."""
    hmac_key = "hmac-key-" + "5e" * 12
    monkeypatch.setenv("CLM_HMAC", hmac_key)
    monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", SECRET)
    caplog.set_level(logging.DEBUG, logger="clm_stratify")
    observations = tumour_observations()
    ghost = {**observations["f01-pat"], "id": "ghost-obs", "subject": {"reference": "Patient/ghost-patient-4711"}}
    with Receiver(fhir.base_url, tmp_path / "inbox.sqlite", None, "--coalesce", "0",
                  "--max-attempts", "2") as receiver:
        import hashlib
        import hmac as hmac_mod
        for pid, obs in list(observations.items())[:8] + [("ghost-patient-4711", ghost)]:
            body = dumps(obs).encode()
            r = requests.put(f"{receiver.url}/notify/Observation/{obs['id']}", data=body, timeout=5,
                             headers={"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"})
            assert r.status_code == 200
            requests.put(f"{receiver.url}/notify/Observation/{obs['id']}", data=body, timeout=5,
                         headers={"X-CLM-Subscription-Secret": SECRET[:-1] + "x",
                                  "Content-Type": "application/fhir+json"})
        receiver.wait_idle(30)   # the ghost patient is not on the server: done as not-found
        assert main(["subscribe", "--fhir-url", fhir.base_url, "--endpoint", receiver.endpoint]) == 0
        assert main(["subscribe", "--fhir-url", fhir.base_url, "--remove"]) == 0
        assert hmac_key and hashlib and hmac_mod
    with Receiver(fhir.base_url, tmp_path / "h.sqlite", None, "--hmac-secret-env", "CLM_HMAC") as r2:
        requests.post(f"{r2.url}/notify", data=b"", headers={"X-CLM-Subscription-Secret": SECRET}, timeout=5)
    log = receiver.log.read_text() + r2.log.read_text()
    assert "evaluation" in log and "not on the FHIR server" in log   # the unknown patient was logged...
    assert "ghost-patient-4711" not in log                     # ...by work item, not by patient
    for pid in observations:
        assert pid not in log
    for name in NAMES:
        assert name not in log
    assert SECRET not in log and hmac_key not in log
    assert "urllib3" not in log and "patient=" not in log and " DEBUG " not in log
    text = _texts(caplog, capsys)
    assert SECRET not in text


def test_run_logs_at_info_hold_no_patient_identifier(fhir, caplog, capsys):
    """`run` at INFO (all loggers), through faults that make the client log retries."""
    caplog.set_level(logging.INFO)
    with FaultProxy(fhir.root_url, seed=9, shares={"503": 0.2, "reset": 0.2, "429": 0.1}, max_faults=6) as proxy:
        main(["run", "--fhir-url", proxy.base_url, "--all", "--connect-timeout", "1", "--read-timeout", "2"])
        main(["run", "--fhir-url", proxy.base_url, "--patient", "f07-pat", "--connect-timeout", "1",
              "--read-timeout", "2"])
    capsys.readouterr()
    assert "retry" in caplog.text
    for pid in tumour_observations():
        assert pid not in caplog.text
    for name in NAMES:
        assert name not in caplog.text


# --------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls_proxy(fhir, tmp_path_factory):
    """An HTTPS proxy with a self-signed certificate for 127.0.0.1 in front of SEKMET."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    with FaultProxy(fhir.root_url, tls=ctx) as proxy:
        yield proxy, d / "cert.pem"


def test_tls_is_verified_and_insecure_always_warns(tls_proxy, monkeypatch, capsys):
    proxy, cert = tls_proxy
    argv = ["run", "--fhir-url", proxy.base_url, "--patient", "f05-pat", "--dry-run"]
    # verification is on: a self-signed certificate is refused, even with the CA env variables emptied
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    code = main(argv)
    err = capsys.readouterr()
    assert code in (1, 3) and "TLS" in err.out + err.err and "CERTIFICATE_VERIFY_FAILED" in err.out + err.err
    assert "warning" not in err.err.lower()
    # --ca-bundle: trusted, no warning
    assert main(argv + ["--ca-bundle", str(cert)]) == 0
    assert "warning" not in capsys.readouterr().err.lower()
    # --insecure: works, and says so every run
    for _ in range(2):
        assert main(argv + ["--insecure"]) == 0
        err = capsys.readouterr().err
        assert "warning: TLS certificate verification is OFF (--insecure)" in err


def test_serve_with_insecure_warns(fhir, tmp_path):
    with Receiver(fhir.base_url, tmp_path / "inbox.sqlite", None, "--insecure") as receiver:
        pass
    assert "warning: TLS certificate verification is OFF" in receiver.log.read_text()
