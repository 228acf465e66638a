"""A partial or slow Bulk Data ``$export`` download against a real SEKMET server.

SEKMET always serves its NDJSON files whole and never answers ``Retry-After: 0``, so in
every test here a loopback proxy in front of it stands in for a server (or network) fault
no real server here produces: a file cut short, a last line cut in half, a connection
dropped mid-file, a status endpoint that says "retry now" forever, a file sent in two
parts. Each test fails without the fix it names (fhir_adapters/sources/bulk.py, and the
transport's streamed content-type check).
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
import requests

from clm_stratify.cli import main
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.sources.bulk import Spool, export_to_spool
from fhir_adapters.terminology import load_terminology
from tests.support.http import LoopbackServer, read_body, send

pytestmark = pytest.mark.integration

FORWARDED = ("content-type", "accept", "prefer", "authorization")


class ExportProxy:
    """Forwards everything to ``upstream`` (its origin rewritten to the proxy's);
    ``fault(h, path, data) -> bool`` may answer a request itself (True) instead."""

    def __init__(self, upstream_base: str, fault) -> None:
        self.origin, self.path = re.match(r"(https?://[^/]+)(.*)", upstream_base).groups()
        self.fault = fault
        self.polls = 0
        self._session = requests.Session()
        self._server = LoopbackServer(self._handle, http11=True, name="export-proxy")
        self.base_url = self._server.url + self.path

    def _handle(self, h) -> None:
        body = read_body(h)
        headers = {k: v for k, v in h.headers.items() if k.lower() in FORWARDED}
        up = self._session.request(h.command, self.origin + h.path, data=body or None, headers=headers, timeout=60)
        data = up.content.replace(self.origin.encode(), self._server.url.encode())
        if self.fault(self, h, data):
            return
        extra = {k: v.replace(self.origin, self._server.url) for k, v in up.headers.items()
                 if k.lower() in ("content-location", "location", "retry-after", "etag")}
        send(h, up.status_code, data, ctype=up.headers.get("content-type"), headers=extra)

    def __enter__(self) -> "ExportProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        self._session.close()


def _ndjson(h, data: bytes) -> None:
    send(h, 200, data, ctype="application/fhir+ndjson")


def run_all(base_url: str, capsys) -> tuple[int, str]:
    """The exit code and standard error of a dry run, less the dry-run notice (checked here)."""
    code = main(["run", "--fhir-url", base_url, "--all", "--dry-run", "--format", "json"])
    err = capsys.readouterr().err
    assert err.startswith(f"DRY RUN: nothing will be written to {base_url}\n"), err
    return code, err.split("\n", 1)[1]


@pytest.mark.parametrize("rtype,keep", [("Condition", 40), ("Observation", 60)])
def test_a_file_shorter_than_the_manifest_count_fails_the_run(server, capsys, rtype, keep):
    """The proxy cuts one file at a line boundary (what a server killed mid-write or a
    proxy closing early gives): the manifest's ``count`` no longer matches. Without the
    count check the run exited 0 with patients missing or classified from partial records."""
    def cut(proxy, h, data):
        if f"{rtype}.ndjson" not in h.path:
            return False
        _ndjson(h, b"".join(data.splitlines(keepends=True)[:keep]))
        return True

    with ExportProxy(server.base_url, cut) as proxy:
        code, err = run_all(proxy.base_url, capsys)
    assert code == 3, err
    m = re.search(rf"{rtype}\.ndjson is incomplete: the manifest says (\d+) resources, received {keep}\b", err)
    assert m and int(m.group(1)) > keep, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_cut_last_line_is_an_error_naming_file_and_line(server, capsys):
    """The proxy ends the Observation file in the middle of line 61 (no newline, partial
    JSON). Without the fix: a JSONDecodeError traceback."""
    def cut(proxy, h, data):
        if "Observation.ndjson" not in h.path:
            return False
        lines = data.splitlines(keepends=True)
        _ndjson(h, b"".join(lines[:60]) + lines[60][:40])
        return True

    with ExportProxy(server.base_url, cut) as proxy:
        code, err = run_all(proxy.base_url, capsys)
    assert code == 3, err
    assert "Observation.ndjson: line 61: incomplete last line" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_connection_dropped_mid_file_is_server_unavailable(server, capsys):
    """The proxy announces the whole Observation file (Content-Length) and closes the
    connection half-way. Without the fix: a requests ChunkedEncodingError traceback."""
    def drop(proxy, h, data):
        if "Observation.ndjson" not in h.path:
            return False
        h.send_response(200)
        h.send_header("Content-Type", "application/fhir+ndjson")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:len(data) // 2])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
        return True

    with ExportProxy(server.base_url, drop) as proxy:
        code, err = run_all(proxy.base_url, capsys)
    assert code == 3, err
    assert err.startswith("error: FHIR server unavailable:") and "Observation.ndjson: connection lost" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_retry_after_zero_does_not_spin(server):
    """The proxy answers every status poll "202, Retry-After: 0". Without a floor on the
    poll interval the client polled thousands of times a second until ``max_wait``."""
    def busy(proxy, h, data):
        if "bulk-status" not in h.path or h.command != "GET":
            return False
        proxy.polls += 1
        send(h, 202, None, headers={"Retry-After": "0", "X-Progress": "in progress"})
        return True

    with ExportProxy(server.base_url, busy) as proxy, FhirClient(proxy.base_url) as client, Spool() as spool:
        started = time.monotonic()
        with pytest.raises(FhirError, match=r"\$export not complete after 3 s"):
            export_to_spool(client, load_terminology(), spool, max_wait=3)
        took = time.monotonic() - started
    assert 3 <= took < 10
    assert 2 <= proxy.polls <= 6, proxy.polls


def test_ndjson_is_spooled_while_it_arrives(server):
    """The proxy sends the Observation file in two parts (the resources but the last,
    padded with 64 KiB of blank lines so a whole read chunk is there, then a pause, then
    the last line) and only sends the rest once the first Observation is in the spool.
    Without the fix the transport's content-type check read the whole body first, so the
    proxy waited out its pause."""
    first_in = threading.Event()
    waited_out: list[bool] = []

    def two_parts(proxy, h, data):
        if "Observation.ndjson" not in h.path:
            return False
        lines = data.splitlines(keepends=True)
        head, tail = b"".join(lines[:-1]) + b"\n" * 65536, lines[-1]
        h.send_response(200)
        h.send_header("Content-Type", "application/fhir+ndjson")
        h.send_header("Content-Length", str(len(head) + len(tail)))
        h.end_headers()
        h.wfile.write(head)
        h.wfile.flush()
        waited_out.append(not first_in.wait(8))
        h.wfile.write(tail)
        return True

    class Watching(Spool):
        def add(self, resource: dict) -> None:
            super().add(resource)
            if resource.get("resourceType") == "Observation":
                first_in.set()

    with ExportProxy(server.base_url, two_parts) as proxy, FhirClient(proxy.base_url) as client, \
            Watching() as spool:
        assert export_to_spool(client, load_terminology(), spool) > 0
    assert waited_out == [False]
