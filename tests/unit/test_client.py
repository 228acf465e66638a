"""Tests for fhir_adapters.fhir.client: a scripted loopback HTTP server for the failure modes,
and the real SEKMET server (``fhir_server`` fixture) for the FHIR behaviour."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler

import pytest
import requests

from fhir_adapters.fhir.client import (
    FhirClient, FhirConflict, FhirError, FhirServerUnavailable, FhirTruncated, dumps, loads,
    operation_outcome_text,
)
from fhir_adapters.fhir.transport import retry_after
from fhir_adapters.fhir.local_server import free_port
from tests.support.http import LoopbackServer, read_body, reset_connection, send

FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": (2, 5)}


# --------------------------------------------------------------------------- scripted server

class Scripted:
    """A loopback HTTP/1.0 server; ``reply(handler, n)`` answers the n-th request (1-based)."""

    def __init__(self, reply: Callable[[BaseHTTPRequestHandler, int], None]) -> None:
        self.reply = reply
        self.calls: list[tuple[str, str, float, dict[str, str]]] = []  # (method, path+query, time, headers)
        self._lock = threading.Lock()
        self.server = LoopbackServer(self._handle, methods=("GET", "POST", "PUT", "DELETE"))
        self.base_url = f"{self.server.url}/fhir"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        read_body(h)
        with self._lock:
            self.calls.append((h.command, h.path, time.monotonic(), dict(h.headers)))
            n = len(self.calls)
        self.reply(h, n)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(reply: Callable[[BaseHTTPRequestHandler, int], None]) -> Scripted:
        servers.append(Scripted(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


PATIENT = {"resourceType": "Patient", "id": "p1"}
OO_503 = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient",
                                                         "diagnostics": "Overloaded, try later"}]}


# --------------------------------------------------------------------------- pure functions

def test_decimals_round_trip_exactly() -> None:
    body = {"valueQuantity": {"value": Decimal("49.9")}, "p": Decimal("0.05"), "f": 0.05, "g": 49.9,
            "big": Decimal("1E+2"), "i": 3, "s": "Ünïcode \"q\"", "b": [True, False, None]}
    text = dumps(body)
    assert '"value":49.9' in text and '"p":0.05' in text and '"f":0.05' in text and '"g":49.9' in text
    back = loads(text)
    assert back["valueQuantity"]["value"] == Decimal("49.9") and str(back["valueQuantity"]["value"]) == "49.9"
    assert str(back["p"]) == "0.05" and isinstance(back["i"], int)
    assert back == json.loads(text, parse_float=Decimal)
    assert json.loads(text)["s"] == "Ünïcode \"q\""
    for bad in (Decimal("NaN"), float("inf")):
        with pytest.raises(ValueError):
            dumps({"x": bad})
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_operation_outcome_text_joins_diagnostics_and_details() -> None:
    oo = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "first", "details": {"text": "second"}},
        {"severity": "error", "code": "conflict"}]}
    assert operation_outcome_text(oo) == "first; second; conflict"
    assert operation_outcome_text({"error": "invalid_client", "error_description": "bad key"}) == \
        "invalid_client: bad key"


def test_retry_after_seconds_and_http_date() -> None:
    r = requests.Response()
    r.headers["Retry-After"] = "7"
    assert retry_after(r.headers) == 7
    r.headers["Retry-After"] = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= (retry_after(r.headers) or 0) <= 30
    r.headers["Retry-After"] = "soon"
    assert retry_after(r.headers) is None


def test_paths_and_foreign_urls_are_checked() -> None:
    c = FhirClient("http://127.0.0.1:9/fhir/")
    assert c.base_url == "http://127.0.0.1:9/fhir"
    for rtype, rid in (("Patient", "../metadata"), ("Patient", "a?b=c"), ("patient", "x"), ("Patient", "x" * 65)):
        with pytest.raises(ValueError):
            c.read(rtype, rid)
    with pytest.raises(FhirError, match="another server"):
        c.request("GET", "http://127.0.0.2:9/fhir/Patient")
    assert c.round_trips == 0


# --------------------------------------------------------------------------- retries and failures

def test_429_retry_after_is_honoured(scripted) -> None:
    s = scripted(lambda h, n: send(h, 429, OO_503, headers={"Retry-After": "1"}) if n == 1 else send(h, 200, PATIENT))
    c = FhirClient(s.base_url, backoff=0.01, max_backoff=5)
    t0 = time.monotonic()
    assert c.read("Patient", "p1") == PATIENT
    waited = s.calls[1][2] - s.calls[0][2]
    assert 0.95 <= waited < 1.6, waited
    assert time.monotonic() - t0 < 2
    assert c.round_trips == 2


def test_retry_after_is_capped_by_max_backoff(scripted) -> None:
    s = scripted(lambda h, n: send(h, 503, OO_503, headers={"Retry-After": "120"}) if n == 1 else send(h, 200, PATIENT))
    c = FhirClient(s.base_url, retries=1, backoff=0.01, max_backoff=0.2)
    t0 = time.monotonic()
    assert c.read("Patient", "p1") == PATIENT
    assert time.monotonic() - t0 < 1


def test_503_forever_gives_server_unavailable(scripted) -> None:
    s = scripted(lambda h, n: send(h, 503, OO_503))
    c = FhirClient(s.base_url, retries=3, **FAST)
    with pytest.raises(FhirServerUnavailable) as ei:
        list(c.search("Observation", {"patient": "p1"}))
    e = ei.value
    assert len(s.calls) == 4 and c.round_trips == 4
    assert e.status == 503 and e.outcome == "Overloaded, try later"
    assert s.base_url in str(e) and "4 tries" in str(e) and "HTTP 503" in str(e)
    assert "?" not in e.url and "p1" not in str(e)


def test_server_down_gives_clear_message() -> None:
    base = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    c = FhirClient(base, retries=2, **FAST)
    with pytest.raises(FhirServerUnavailable) as ei:
        c.capabilities()
    msg = str(ei.value)
    assert base in msg and "connection refused" in msg and "3 tries" in msg
    assert ei.value.status is None and c.round_trips == 3


def test_post_is_retried_when_nothing_was_sent() -> None:
    c = FhirClient(f"http://127.0.0.1:{free_port()}/fhir", retries=2, **FAST)
    with pytest.raises(FhirServerUnavailable, match="connection refused"):
        c.create({"resourceType": "Patient"})
    assert c.round_trips == 3


def test_reset_connection_get_is_retried(scripted) -> None:
    s = scripted(lambda h, n: reset_connection(h) if n < 3 else send(h, 200, PATIENT))
    c = FhirClient(s.base_url, retries=3, **FAST)
    assert c.read("Patient", "p1") == PATIENT
    assert c.round_trips == 3


def test_reset_connection_get_gives_up(scripted) -> None:
    s = scripted(lambda h, n: reset_connection(h))
    c = FhirClient(s.base_url, retries=1, **FAST)
    with pytest.raises(FhirServerUnavailable, match="connection broken") as ei:
        c.read("Patient", "p1")
    assert s.base_url in str(ei.value) and "2 tries" in str(ei.value)


def test_reset_after_post_is_not_retried(scripted) -> None:
    s = scripted(lambda h, n: reset_connection(h))
    c = FhirClient(s.base_url, retries=3, **FAST)
    with pytest.raises(FhirServerUnavailable, match="outcome is unknown"):
        c.create({"resourceType": "Patient"})
    assert len(s.calls) == 1 and c.round_trips == 1


def test_read_timeout_post_is_not_retried_but_get_is(scripted) -> None:
    s = scripted(lambda h, n: (time.sleep(0.4), send(h, 200, PATIENT)))
    c = FhirClient(s.base_url, retries=1, backoff=0.01, timeout=(2, 0.1))
    with pytest.raises(FhirServerUnavailable, match="read timeout.*outcome is unknown"):
        c.transaction([{"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}}])
    assert c.round_trips == 1
    with pytest.raises(FhirServerUnavailable, match="read timeout.*2 tries"):
        c.read("Patient", "p1")
    assert c.round_trips == 3


def test_post_retried_on_503_but_not_on_502(scripted) -> None:
    s = scripted(lambda h, n: send(h, 503, OO_503) if n == 1 else send(h, 502, "<h1>Bad gateway</h1>",
                                                                       ctype="text/html"))
    c = FhirClient(s.base_url, retries=3, **FAST)
    with pytest.raises(FhirServerUnavailable, match="HTTP 502.*outcome is unknown") as ei:
        c.create({"resourceType": "Patient"})
    assert len(s.calls) == 2 and ei.value.outcome == "Bad gateway"


def test_batch_of_gets_is_retried_like_a_get(scripted) -> None:
    reply = {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {"status": "200 OK"}}]}
    s = scripted(lambda h, n: send(h, 504, OO_503) if n == 1 else send(h, 200, reply))
    c = FhirClient(s.base_url, retries=2, **FAST)
    assert c.batch([{"request": {"method": "GET", "url": "Observation?patient=1"}}]) == reply["entry"]
    assert len(s.calls) == 2 and s.calls[0][0] == "POST"


# --------------------------------------------------------------------------- content types and errors

def test_application_json_is_accepted_and_headers_are_sent(scripted) -> None:
    s = scripted(lambda h, n: send(h, 200, {"resourceType": "Patient", "id": "p1", "x": 1.10},
                                   ctype="application/json;charset=UTF-8"))
    c = FhirClient(s.base_url, **FAST)
    got = c.read("Patient", "p1")
    assert got is not None and got["x"] == Decimal("1.1")
    c.update({"resourceType": "Patient", "id": "p1"})
    get_headers, put_headers = s.calls[0][3], s.calls[1][3]
    assert get_headers["Accept"] == "application/fhir+json"
    assert get_headers["User-Agent"].startswith("clm-stratify/")
    assert "Content-Type" not in get_headers
    assert put_headers["Content-Type"] == "application/fhir+json"


def test_html_200_is_an_error(scripted) -> None:
    s = scripted(lambda h, n: send(h, 200, "<html><body>Please log in</body></html>", ctype="text/html"))
    c = FhirClient(s.base_url, **FAST)
    with pytest.raises(FhirError, match="text/html") as ei:
        c.read("Patient", "p1")
    assert ei.value.status == 200 and "Please log in" in ei.value.outcome


def test_empty_2xx_body_is_fine(scripted) -> None:
    s = scripted(lambda h, n: send(h, 201, None, headers={"Location": f"{h.path}/_history/1"}))
    c = FhirClient(s.base_url, **FAST)
    assert c.create({"resourceType": "Patient"}) == (201, None)


def test_error_reply_carries_the_operation_outcome(scripted) -> None:
    oo = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "Invalid date search value"}]}
    s = scripted(lambda h, n: send(h, 400, oo))
    c = FhirClient(s.base_url, **FAST)
    with pytest.raises(FhirError) as ei:
        list(c.search("Observation", {"date": "gt2026+00:00", "patient": "secret-id"}))
    e = ei.value
    assert type(e) is FhirError and e.status == 400 and e.method == "GET"
    assert e.outcome == "Invalid date search value" and e.url == f"{s.base_url}/Observation"
    assert "secret-id" not in str(e)
    assert "date=gt2026%2B00%3A00" in s.calls[0][1]  # '+' is encoded, not sent as a space


@pytest.mark.parametrize("status", [409, 412])
def test_409_and_412_are_conflicts(scripted, status: int) -> None:
    s = scripted(lambda h, n: send(h, status, {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "conflict", "details": {"text": "Version mismatch"}}]}))
    c = FhirClient(s.base_url, **FAST)
    with pytest.raises(FhirConflict, match="Version mismatch") as ei:
        c.update({"resourceType": "Patient", "id": "p1"}, if_match='W/"1"')
    assert ei.value.status == status and len(s.calls) == 1
    assert s.calls[0][3]["If-Match"] == 'W/"1"'


def test_next_link_to_another_server_is_refused(scripted) -> None:
    page = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": PATIENT}],
            "link": [{"relation": "next", "url": "http://127.0.0.2:1/fhir/Patient?page=2"}]}
    s = scripted(lambda h, n: send(h, 200, page))
    c = FhirClient(s.base_url, **FAST)
    with pytest.raises(FhirError, match="another server"):
        list(c.search("Patient"))
    assert len(s.calls) == 1


def test_paging_loop_is_detected(scripted) -> None:
    def reply(h: BaseHTTPRequestHandler, n: int) -> None:
        send(h, 200, {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": PATIENT}],
                      "link": [{"relation": "next", "url": f"{s.base_url}/Patient?page=2"}]})
    s = scripted(reply)
    c = FhirClient(s.base_url, **FAST)
    with pytest.raises(FhirError, match="paging loop"):
        list(c.search("Patient"))
    assert len(s.calls) == 2  # page 2 links to itself


class CountingAuth(requests.auth.AuthBase):
    def __init__(self) -> None:
        self.invalidated = 0

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer tok{self.invalidated}"
        return r

    def invalidate(self) -> None:
        self.invalidated += 1


def test_401_refreshes_the_token_once(scripted) -> None:
    s = scripted(lambda h, n: send(h, 200, PATIENT) if h.headers["Authorization"] == "Bearer tok1"
                 else send(h, 401, {"resourceType": "OperationOutcome", "issue": [
                     {"severity": "error", "code": "login", "diagnostics": "Token expired"}]}))
    auth = CountingAuth()
    c = FhirClient(s.base_url, auth, **FAST)
    assert c.create(PATIENT)[0] == 200  # a POST refused with 401 is safe to resend
    assert auth.invalidated == 1 and c.round_trips == 2
    auth.invalidated = 5
    with pytest.raises(FhirError, match="Token expired") as ei:
        c.read("Patient", "p1")  # tok5 and the refreshed tok6 are refused: one refresh only
    assert ei.value.status == 401 and auth.invalidated == 6 and c.round_trips == 4


def test_logging_has_no_query_strings(scripted, caplog: pytest.LogCaptureFixture) -> None:
    s = scripted(lambda h, n: send(h, 503, OO_503) if n == 1 else send(h, 200, {
        "resourceType": "Bundle", "type": "searchset", "entry": [{"resource": PATIENT}]}))
    c = FhirClient(s.base_url, auth=CountingAuth(), **FAST)
    with caplog.at_level(logging.DEBUG, logger="clm_stratify.http"):
        assert list(c.search("Observation", {"patient": "secret-id"})) == [PATIENT]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.name == "clm_stratify.http"]
    assert len(warnings) == 1 and "/fhir/Observation" in warnings[0].getMessage()
    assert "503" in warnings[0].getMessage() and len(debug) == 2
    assert "secret-id" not in caplog.text and "Bearer" not in caplog.text and "tok0" not in caplog.text


# --------------------------------------------------------------------------- outcomes that cut a search
CUT_OUTCOME = {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": [
    {"severity": "warning", "code": "incomplete", "diagnostics": "search results truncated"}]}}
IGNORED_OUTCOME = {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": [
    {"severity": "warning", "code": "not-supported", "diagnostics": "Unknown parameter 'foo'; ignored"}]}}


def _searchset(*entries: dict, next_url: str | None = None) -> dict:
    b = {"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}
    if next_url:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


def test_a_page_whose_outcome_says_results_are_missing_fails_the_search(scripted) -> None:
    """The adversary's searchset: one match, no total, no next link, and an ``incomplete``
    outcome on the second page. The search fails naming the server's words; the raw pages
    (the interop probes' ``complete=False``) are still seen as sent."""
    match = {"search": {"mode": "match"}, "resource": {"resourceType": "Observation", "id": "o1"}}
    s = scripted(lambda h, n: send(h, 200, _searchset(match, next_url=f"{s.base_url}/Observation?page=2")
                                   if "page=2" not in h.path else _searchset(CUT_OUTCOME)))
    c = FhirClient(s.base_url, **FAST)
    with pytest.raises(FhirTruncated, match="search results truncated") as ei:
        list(c.search("Observation", {"patient": "p1"}))
    assert "incomplete" in str(ei.value) and ei.value.outcome == "search results truncated"
    raw = list(c.search_pages("Observation", {"patient": "p1"}, complete=False))
    assert [len(p["entry"]) for p in raw] == [1, 1] and c.last_search_warnings == ["search results truncated"]
    with pytest.raises(FhirTruncated):   # a first page from a batch reply, followed
        list(c.follow_pages(_searchset(match, CUT_OUTCOME)))


def test_an_ignored_parameter_stays_a_warning(scripted) -> None:
    match = {"search": {"mode": "match"}, "resource": {"resourceType": "Observation", "id": "o1"}}
    s = scripted(lambda h, n: send(h, 200, _searchset(match, IGNORED_OUTCOME)))
    c = FhirClient(s.base_url, **FAST)
    assert [r["id"] for r in c.search("Observation", {"patient": "p1", "foo": "x"})] == ["o1"]
    assert c.last_search_warnings == ["Unknown parameter 'foo'; ignored"]


def test_an_offset_continuation_with_a_cutting_outcome_fails(scripted) -> None:
    """A server that stopped early (total 2, one match, no next link): the client asks
    ``_offset``, and that page says it was cut."""
    first = {**_searchset({"search": {"mode": "match"}, "resource": {"resourceType": "Observation", "id": "o1"}}),
             "total": 2}
    s = scripted(lambda h, n: send(h, 200, first if "_offset" not in h.path else _searchset(CUT_OUTCOME)))
    with pytest.raises(FhirTruncated, match="search results truncated"):
        list(FhirClient(s.base_url, **FAST).search("Observation", {"patient": "p1"}))
    assert "_offset=1" in s.calls[-1][1]


# --------------------------------------------------------------------------- SEKMET
