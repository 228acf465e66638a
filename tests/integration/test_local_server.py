"""Integration tests for fhir_adapters.fhir.local_server (a real SEKMET process on loopback)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_adapters.fhir.local_server import LocalFhirServer, SekmetStartError

pytestmark = pytest.mark.integration

JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}


@pytest.fixture
def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # never send loopback traffic through an HTTP(S)_PROXY
    return s


@pytest.fixture
def own_server(fhir_server: LocalFhirServer, tmp_path: Path):
    """A private server for tests that stop, kill or restart it (needs fhir_server only to skip consistently)."""
    server = LocalFhirServer(data_dir=tmp_path)
    try:
        yield server.start()
    finally:
        server.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses of the LISTEN sockets of a process, from /proc (hex ip:port as in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                found.add(cols[1])
    return found


def test_starts_and_answers_metadata(fhir_server: LocalFhirServer, session: requests.Session) -> None:
    assert fhir_server.base_url == f"http://127.0.0.1:{fhir_server.port}/fhir"
    assert fhir_server.pid is not None
    assert fhir_server.db_path.is_file()
    r = session.get(f"{fhir_server.base_url}/metadata", headers=JSON, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["implementation"]["url"] == fhir_server.base_url


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_binds_only_to_loopback(fhir_server: LocalFhirServer) -> None:
    assert fhir_server.pid is not None
    listening = _listening_addresses(fhir_server.pid)
    port_hex = f"{fhir_server.port:04X}"
    assert listening == {f"0100007F:{port_hex}"}, listening  # 127.0.0.1:<port>, nothing else


def test_stop_leaves_no_process(own_server: LocalFhirServer) -> None:
    pid, port = own_server.pid, own_server.port
    assert pid is not None
    own_server.stop()
    assert own_server.pid is None
    assert _process_gone(pid)
    assert not _port_open(port)
    own_server.stop()  # idempotent


def test_restart_keeps_port_and_data(own_server: LocalFhirServer, session: requests.Session) -> None:
    port, old_pid = own_server.port, own_server.pid
    patient = {"resourceType": "Patient", "name": [{"family": "Restart"}]}
    r = session.post(f"{own_server.base_url}/Patient", json=patient, headers=JSON, timeout=10)
    assert r.status_code == 201
    pid_ = r.json()["id"]
    own_server.restart()
    assert own_server.port == port
    assert own_server.pid not in (None, old_pid)
    r = session.get(f"{own_server.base_url}/Patient/{pid_}", headers=JSON, timeout=10)
    assert r.status_code == 200
    assert r.json()["name"][0]["family"] == "Restart"


def test_kill_and_start_again(own_server: LocalFhirServer, session: requests.Session) -> None:
    r = session.put(f"{own_server.base_url}/Patient/kill-test-1",
                    json={"resourceType": "Patient", "id": "kill-test-1"}, headers=JSON, timeout=10)
    assert r.status_code == 201
    pid = own_server.pid
    assert pid is not None
    own_server.kill()
    assert own_server.pid is None and _process_gone(pid)
    assert not _port_open(own_server.port)
    with pytest.raises(requests.ConnectionError):
        session.get(f"{own_server.base_url}/metadata", timeout=2)
    own_server.start()  # committed data survives SIGKILL (SQLite WAL)
    assert session.get(f"{own_server.base_url}/Patient/kill-test-1", headers=JSON, timeout=10).status_code == 200


def test_temporary_data_dir_removed(fhir_server: LocalFhirServer, session: requests.Session) -> None:
    with LocalFhirServer() as server:
        data_dir, pid = server.data_dir, server.pid
        assert session.get(f"{server.base_url}/metadata", timeout=10).status_code == 200
        assert (data_dir / "sekmet.log").is_file()
    assert pid is not None and _process_gone(pid)
    assert not data_dir.exists()


def test_start_failure_reports_log(fhir_server: LocalFhirServer, tmp_path: Path) -> None:
    with socket.socket() as blocker:  # occupy the port so uvicorn cannot bind it
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = LocalFhirServer(data_dir=tmp_path, port=blocker.getsockname()[1], startup_timeout=20)
        started = time.monotonic()
        with pytest.raises(SekmetStartError) as err:
            server.start()
        assert time.monotonic() - started < 20
    assert "sekmet.log" in str(err.value)
    assert server.pid is None


def test_smart_backend_services(fhir_server: LocalFhirServer, tmp_path: Path, session: requests.Session) -> None:
    jwt = pytest.importorskip("jwt")
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    import json
    import uuid

    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "k1", "alg": "RS384", "use": "sig"}
    with LocalFhirServer(data_dir=tmp_path, smart_clients={"clm-stratify": {"keys": [jwk]}}) as server:
        assert session.get(f"{server.base_url}/metadata", timeout=10).status_code == 200  # stays open
        assert session.get(f"{server.base_url}/Patient", headers=JSON, timeout=10).status_code == 401
        conf = session.get(f"{server.base_url}/.well-known/smart-configuration", timeout=10).json()
        assert conf["token_endpoint"] == server.token_url
        now = int(time.time())
        assertion = jwt.encode({"iss": "clm-stratify", "sub": "clm-stratify", "aud": server.token_url,
                                "exp": now + 240, "jti": uuid.uuid4().hex}, key, algorithm="RS384",
                               headers={"kid": "k1"})
        r = session.post(server.token_url, timeout=10, data={
            "grant_type": "client_credentials", "scope": "system/*.read system/RiskAssessment.write",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion})
        assert r.status_code == 200, r.text
        auth = {**JSON, "Authorization": f"Bearer {r.json()['access_token']}"}
        assert session.get(f"{server.base_url}/Patient", headers=auth, timeout=10).status_code == 200
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
        assert session.post(f"{server.base_url}/Observation", json=obs, headers=auth, timeout=10).status_code == 403
