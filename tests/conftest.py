"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator

import pytest

from fhir_adapters.fhir.local_server import LocalFhirServer, find_sekmet_command


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFhirServer]:
    """One SEKMET FHIR server on 127.0.0.1 for the whole test session (skipped if SEKMET is not installed)."""
    cmd = find_sekmet_command()
    if cmd[0] == sys.executable and importlib.util.find_spec("sekmet") is None:
        pytest.skip("SEKMET is not installed (pip install 'sekmet-fhir==0.1.1' or set SEKMET_EXECUTABLE)")
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("sekmet")) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFhirServer]:
    """A SEKMET server loaded with the fixture patients, one per test module (the
    modules change its data)."""
    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.load import fixture_bundles, load_bundles
    from fixtures import FIXTURES_DIR

    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("loaded")) as srv:
        with FhirClient(srv.base_url) as c:
            load_bundles(c, fixture_bundles(FIXTURES_DIR))
        yield srv


@pytest.fixture
def client(server: LocalFhirServer):
    from fhir_adapters.fhir.client import FhirClient

    with FhirClient(server.base_url) as c:
        yield c
