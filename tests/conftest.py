"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration is marked ``integration`` (``-m 'not integration'``
    runs the fast part alone)."""
    for item in items:
        if "integration" in item.path.parts and "tests" in item.path.parts:
            item.add_marker(pytest.mark.integration)

from fhir_adapters.fhir.local_server import LocalFhirServer, find_sekmet_command


def _not_in_unit_tests(request: pytest.FixtureRequest) -> None:
    if UNIT in Path(str(request.node.path)).resolve().parents:
        pytest.fail("a test under tests/unit asked for a FHIR server process: move it to tests/integration")


@pytest.fixture(scope="session")
def fhir_server(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFhirServer]:
    """One SEKMET FHIR server on 127.0.0.1 for the whole test session (skipped if SEKMET is not installed)."""
    _not_in_unit_tests(request)
    cmd = find_sekmet_command()
    if cmd[0] == sys.executable and importlib.util.find_spec("sekmet") is None:
        pytest.skip("SEKMET is not installed (pip install 'sekmet-fhir==0.1.1' or set SEKMET_EXECUTABLE)")
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("sekmet")) as server:
        yield server


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFhirServer]:
    """A SEKMET server loaded with the fixture patients, one per test module (the
    modules change its data)."""
    _not_in_unit_tests(request)
    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.load import fixture_bundles, load_bundles
    from fixtures import FIXTURES_DIR

    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("loaded")) as srv:
        with FhirClient(srv.base_url) as c:
            load_bundles(c, fixture_bundles(FIXTURES_DIR))
        yield srv


@pytest.fixture
def make_server(request: pytest.FixtureRequest, tmp_path: Path):
    """Start SEKMET servers loaded with the fixtures (``prefixes``: copies, see
    tests/support/fixture_data.py); all stopped at the end."""
    _not_in_unit_tests(request)
    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.load import load_bundles
    from tests.support.fixture_data import bundles

    servers: list[LocalFhirServer] = []

    def start(prefixes: tuple[str, ...] = ("f",)) -> LocalFhirServer:
        srv = LocalFhirServer(data_dir=tmp_path / f"sekmet{len(servers)}")
        servers.append(srv)
        srv.start()
        with FhirClient(srv.base_url) as c:
            load_bundles(c, bundles(prefixes))
        return srv

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture(scope="session")
def medplum_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Medplum's FHIR engine on 127.0.0.1 (empty), the second real FHIR server (tests/support/medplum_server.py)."""
    _not_in_unit_tests(request)
    from tests.support.medplum_server import MedplumServer

    with MedplumServer(tmp_path_factory.mktemp("medplum")) as srv:
        yield srv


@pytest.fixture(scope="module")
def medplum_loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A Medplum server of its own loaded with the fixture patients (ids assigned by the
    server: ``loaded.ids`` maps ``Patient/f01-pat`` to its id there), one per test module."""
    _not_in_unit_tests(request)
    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.load import fixture_bundles, load_bundles
    from fixtures import FIXTURES_DIR
    from tests.support.medplum_server import MedplumServer

    with MedplumServer(tmp_path_factory.mktemp("medplum-loaded")) as srv:
        with FhirClient(srv.base_url) as c:
            srv.loaded = load_bundles(c, fixture_bundles(FIXTURES_DIR))
        yield srv


@pytest.fixture
def client(server: LocalFhirServer):
    from fhir_adapters.fhir.client import FhirClient

    with FhirClient(server.base_url) as c:
        yield c


@pytest.fixture(scope="module")
def rsa_key():
    """An RSA private key for SMART Backend Services client assertions."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def pem(rsa_key) -> bytes:
    from tests.support.keys import pem_of

    return pem_of(rsa_key)
