"""Fuzzing the receiver's HTTP endpoints (a real `clm-stratify serve` process).

Random bodies (bytes, JSON, mutated real notifications, deep nesting), content
types, methods, paths and headers (the secret present, wrong, absent, odd bytes),
plus raw malformed HTTP on a socket. Never a 5xx; nothing enters the inbox unless
the request is authenticated and well formed: the notification total in ``/healthz``
changes only on a 200, and a 200 only happens for a body that the notification
parser accepts, with the right secret. Run: ``python -m pytest tests/integration/test_receiver_fuzz.py``.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clm_stratify.service.notifications import NotificationError, parse_notification
from tests.support.receiver_process import SECRET, Receiver

pytestmark = pytest.mark.integration
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def receiver(fhir_server, tmp_path_factory):
    # An empty SEKMET: accepted notifications name unknown patients, fail and are retried.
    d = tmp_path_factory.mktemp("fuzz")
    with Receiver(fhir_server.base_url, d / "inbox.sqlite", None, "--max-body", "20000") as r:
        yield r


def total(receiver) -> int:
    counts = receiver.health()["counts"]
    return sum(v for k, v in counts.items() if k.startswith("notifications_"))


OBS = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "size"},
       "subject": {"reference": "Patient/p1"}}
BACKPORT = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
    "resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
        {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": "1"},
        {"name": "notification-event", "part": [{"name": "event-number", "valueString": "1"},
                                                {"name": "focus", "valueReference": {"reference": "Observation/o1"}}]}]}}]}

leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
anyjson = st.recursive(leaf, lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=6), k, max_size=3)),
                       max_leaves=20)


@st.composite
def mutated(draw, base):
    doc = json.loads(json.dumps(base))
    node = doc
    for _ in range(draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            if draw(st.booleans()):
                node[key] = draw(anyjson)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[draw(st.integers(0, len(node) - 1))]
    return json.dumps(doc).encode()


bodies = st.one_of(
    st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    anyjson.map(lambda j: json.dumps(j).encode()), mutated(OBS), mutated(BACKPORT), st.just(b""),
    st.integers(100, 6000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(100, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b"x" * 20001), st.just(b"\xff\xfe{}"),
)
secrets_ = st.sampled_from([SECRET, SECRET, SECRET, None, "", SECRET + "x", SECRET[:-1], SECRET.upper(), "é" * 5])
ctypes_ = st.sampled_from(["application/fhir+json", "application/json", "application/fhir+json; charset=utf-8",
                           "text/plain", "", None, "application/xml", "application/json+fhir", "multipart/form-data",
                           "application/fhir+json; charset=latin-1"])
paths = st.sampled_from(["/notify", "/notify/Observation/o1", "/notify/Observation/o2", "/notify/x/y",
                         "/notify/Observation/../Patient", "/notify/Observation/%00", "/healthz", "/",
                         "/notify/Observation/o1/extra", "/docs", "/openapi.json"])
methods = st.sampled_from(["POST", "PUT", "POST", "GET", "DELETE", "PATCH"])


@FUZZ
@given(body=bodies, secret=secrets_, ctype=ctypes_, path=paths, method=methods,
       extra=st.dictionaries(st.sampled_from(["X-Signature", "Content-Encoding", "Transfer-Encoding", "Expect",
                                              "X-Forwarded-For"]), st.sampled_from(["gzip", "x", "100-continue", "1"]),
                             max_size=2))
def test_random_requests_never_5xx_and_store_only_valid_authenticated(receiver, body, secret, ctype, path, method, extra):
    headers = dict(extra)
    headers.pop("Transfer-Encoding", None)           # requests would frame the body itself
    if secret is not None:
        headers["X-CLM-Subscription-Secret"] = secret
    if ctype is not None:
        headers["Content-Type"] = ctype
    before = total(receiver)
    try:
        r = requests.request(method, receiver.url + path, data=body, headers=headers, timeout=10)
    except requests.ConnectionError:
        r = None                                     # the server may close on a malformed request
    after = total(receiver)
    if r is None:
        assert after == before
        return
    assert r.status_code < 500, (r.status_code, r.text[:200])
    if r.status_code == 200 and path.startswith("/notify"):
        assert after == before + 1
        assert secret == SECRET
        rpath = path[len("/notify/"):] if path.startswith("/notify/") else None
        parsed = json.loads(body) if body.strip() else None
        try:
            parse_notification(parsed, rpath, deleted=method == "DELETE")
        except NotificationError as exc:
            raise AssertionError(f"stored a notification the parser refuses: {exc}")
    else:
        assert after == before, (r.status_code, r.text[:200])
        if path.startswith("/notify") and secret != SECRET and method in ("POST", "PUT", "DELETE"):
            assert r.status_code in (401, 404, 405)


RAW = [
    b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-CLM-Subscription-Secret: " + SECRET.encode()
    + b"\r\nContent-Type: application/fhir+json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-CLM-Subscription-Secret: " + SECRET.encode()
    + b"\r\nContent-Type: application/fhir+json\r\n\r\n" + b"4e20\r\n" + b"[" * 20000 + b"\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: x\r\nX-CLM-Subscription-Secret: \xff\xfe\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /notify HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 70000 + b"\r\n\r\n",
    b"POST /notify HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n",
    b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}",     # body shorter than declared
]


@pytest.mark.parametrize("raw", RAW, ids=range(len(RAW)))
def test_malformed_http_never_5xx_and_stores_nothing(receiver, raw):
    before = total(receiver)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    status = reply.split(b"\r\n", 1)[0]
    assert not re.match(rb"HTTP/1\.[01] 5\d\d", status), reply[:300]
    assert total(receiver) == before
    assert receiver.proc.poll() is None


import re  # noqa: E402
