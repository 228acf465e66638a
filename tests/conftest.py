"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator

import pytest

from fhir_adapters.local_server import LocalFhirServer, find_sekmet_command


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFhirServer]:
    """One SEKMET FHIR server on 127.0.0.1 for the whole test session (skipped if SEKMET is not installed)."""
    cmd = find_sekmet_command()
    if cmd[0] == sys.executable and importlib.util.find_spec("sekmet") is None:
        pytest.skip("SEKMET is not installed (pip install 'sekmet-fhir==0.1.1' or set SEKMET_EXECUTABLE)")
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("sekmet")) as server:
        yield server
