"""More of the receiver's HTTP door (issue 13, review items 1-6), against the real app
in-process with a real SQLite inbox:

* ``DELETE /notify/{type}/{id}`` (HAPI's rest-hook for a deletion): the same secret and
  HMAC checks as PUT/POST (the HMAC over the empty body), the type and id checked, a body
  refused (400), stored as a ``deletion`` event whose focus is the resource and that names
  no patient (the worker reads the focus, then its history);
* ``eventsInNotification`` / ``events-in-notification`` bounded like the other counts;
* a lone surrogate in a subject reference is a 400, not "names no patient";
* NaN / Infinity / -Infinity in a body are not JSON (400);
* a ``Content-Encoding`` other than identity is a 415 naming it;
* no slash redirects; unknown paths and methods answer an OperationOutcome, also with
  the CDS Hooks routes mounted (whose own refusals stay as they are).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import sqlite3

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from clm_stratify.pipeline import Rules
from clm_stratify.service.cds_hooks import CdsConfig, mount
from clm_stratify.service.inbox import Inbox
from clm_stratify.service.notifications import Notification, NotificationError, parse_notification
from clm_stratify.service.receiver import ReceiverConfig, create_app

SECRET = "door-secret"
HMAC_KEY = "door-hmac-key"
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
OBS = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "size"},
       "subject": {"reference": "Patient/p1"}}


def open_door(db, **config):
    inbox = Inbox(db)
    app = create_app(inbox, ReceiverConfig(secret=SECRET, **config))
    return inbox, app


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    db = tmp_path_factory.mktemp("door-more") / "inbox.sqlite"
    inbox, app = open_door(db)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, db
    inbox.close()


@pytest.fixture(scope="module")
def signed_door(tmp_path_factory):
    db = tmp_path_factory.mktemp("door-hmac") / "inbox.sqlite"
    inbox, app = open_door(db, hmac_secret=HMAC_KEY)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, db
    inbox.close()


def rows(db) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, body FROM notification ORDER BY id").fetchall()


def call(door, method: str, url: str, body: bytes = b"", headers: dict | None = None):
    client, db = door
    before = rows(db)
    response = client.request(method, url, content=body, headers=HEADERS if headers is None else headers,
                              follow_redirects=False)
    return response, before, rows(db)


def diagnostics(response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return outcome["issue"][0]["diagnostics"]


def signature(body: bytes) -> str:
    return hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- 1. DELETE deliveries
def test_a_delete_is_stored_as_a_deletion_of_its_focus_naming_no_patient(door):
    response, before, after = call(door, "DELETE", "/notify/Observation/obs-1.a")
    assert response.status_code == 200, response.text
    assert "(deletion)" in diagnostics(response)
    assert len(after) == len(before) + 1
    stored = Notification.model_validate_json(after[-1][1])
    assert (stored.style, stored.kind) == ("rest-hook", "deletion")
    [event] = stored.events
    # no patient and no resource: the worker resolves it by reading the focus, then its history
    assert (event.focus, event.patient, event.resource_type, event.version) == \
        ("Observation/obs-1.a", None, "Observation", None)
    assert stored == parse_notification(None, "Observation/obs-1.a", deleted=True)


@pytest.mark.parametrize("headers", [
    {}, {"X-CLM-Subscription-Secret": "wrong"}, {"X-CLM-Subscription-Secret": SECRET[:-1]},
], ids=["no-secret", "wrong-secret", "prefix-of-secret"])
def test_a_delete_without_the_secret_is_401_like_a_put(door, headers):
    for method in ("DELETE", "PUT"):
        response, before, after = call(door, method, "/notify/Observation/o1",
                                       json.dumps(OBS).encode() if method == "PUT" else b"", headers=headers)
        assert (response.status_code, after) == (401, before), (method, response.text)
        assert "X-CLM-Subscription-Secret" in diagnostics(response)


def test_a_delete_is_signed_over_its_empty_body(signed_door):
    url = "/notify/Condition/c1"
    for given in (None, "0" * 64, signature(b"{}")):
        headers = HEADERS if given is None else {**HEADERS, "X-Signature": given}
        response, before, after = call(signed_door, "DELETE", url, headers=headers)
        assert (response.status_code, after) == (401, before), response.text
        assert "X-Signature" in diagnostics(response)
    response, before, after = call(signed_door, "DELETE", url, headers={**HEADERS, "X-Signature": signature(b"")})
    assert (response.status_code, len(after)) == (200, len(before) + 1), response.text
    assert Notification.model_validate_json(after[-1][1]).events[0].focus == "Condition/c1"


def test_a_delete_with_a_body_is_refused(door):
    """Decided: refused (400), not ignored: HAPI sends a DELETE without a body, and a body
    on a DELETE is a sender this receiver does not know."""
    for body in (json.dumps(OBS).encode(), b"{}", b"not json"):
        response, before, after = call(door, "DELETE", "/notify/Observation/o1", body)
        assert (response.status_code, after) == (400, before), response.text
    assert "a DELETE notification has no body" in diagnostics(call(door, "DELETE", "/notify/Observation/o1",
                                                                   b"{}")[0])
    with pytest.raises(NotificationError, match="has no body"):
        parse_notification({}, "Observation/o1", deleted=True)


@pytest.mark.parametrize("url, field", [
    ("/notify/observation/o1", "the URL's resource type"),
    ("/notify/Obs-ervation/o1", "the URL's resource type"),
    ("/notify/" + "O" * 65 + "/o1", "the URL's resource type"),
    ("/notify/Observation/o%201", "the URL's id"),
    ("/notify/Observation/o_1", "the URL's id"),
    ("/notify/Observation/" + "a" * 65, "the URL's id"),
    ("/notify/Observation/%ED%A0%80", "the URL's id"),     # (decoded as U+FFFD: not a FHIR id)
    ("/notify/Observation/%C3%A9", "the URL's id"),
])
def test_a_delete_of_a_bad_type_or_id_is_400_naming_it(door, url, field):
    response, before, after = call(door, "DELETE", url)
    assert (response.status_code, after) == (400, before), response.text
    assert diagnostics(response).startswith(field)


@pytest.mark.parametrize("url", ["/notify/Observation", "/notify/Observation/o1/extra", "/notify/Observation/a%2Fb",
                                 "/notify/Observation/o1/"])
def test_a_delete_of_a_url_that_is_not_type_and_id_is_404(door, url):
    response, before, after = call(door, "DELETE", url)
    assert (response.status_code, after) == (404, before), response.text
    assert "nothing at" in diagnostics(response)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(rtype=st.one_of(st.from_regex(r"[A-Z][A-Za-z]{0,63}", fullmatch=True), st.text(min_size=1, max_size=70)),
       rid=st.one_of(st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True), st.text(min_size=1, max_size=70)))
def test_fuzzed_deletes_never_5xx_and_store_only_a_checked_focus(door, rtype, rid):
    from urllib.parse import quote

    assume(rtype not in (".", "..") and rid not in (".", ".."))   # (dot segments: the HTTP client resolves them)
    response, before, after = call(door, "DELETE", f"/notify/{quote(rtype, safe='')}/{quote(rid, safe='')}")
    assert response.status_code < 500, response.text
    diagnostics(response)
    try:
        expected = parse_notification(None, f"{rtype}/{rid}", deleted=True)
    except NotificationError:
        expected = None
    if expected is None or "/" in rtype + rid:
        assert (response.status_code, after) == (400 if "/" not in rtype + rid else 404, before), response.text
    else:
        assert (response.status_code, len(after)) == (200, len(before) + 1), response.text
        assert Notification.model_validate_json(after[-1][1]) == expected


# ---------------------------------------------------------------- 2. eventsInNotification
def r5(**extra):
    status = {"resourceType": "SubscriptionStatus", "type": "event-notification", "eventsSinceSubscriptionStart": "3",
              "subscription": {"reference": "Subscription/s1"},
              "notificationEvent": [{"eventNumber": "3", "focus": {"reference": "Observation/o1"}}], **extra}
    return {"resourceType": "Bundle", "type": "subscription-notification", "entry": [{"resource": status}]}


def backport(*extra):
    params = [{"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
              {"name": "type", "valueCode": "event-notification"}, *extra]
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"resource": {"resourceType": "Parameters", "parameter": params}}]}


WRONG_COUNTS = ["abc", -1, "-1", 2**63, str(2**63), 1e19, 1.5, True, {"a": 1}]


@pytest.mark.parametrize("body, field", [
    *[(r5(eventsInNotification=w), "eventsInNotification") for w in WRONG_COUNTS],
    *[(backport({"name": "events-in-notification", "valueInteger": w}), "events-in-notification") for w in WRONG_COUNTS],
])
def test_events_in_notification_is_a_bounded_count(door, body, field):
    response, before, after = call(door, "POST", "/notify", json.dumps(body).encode())
    assert (response.status_code, after) == (400, before), response.text
    assert diagnostics(response).startswith(field)


@pytest.mark.parametrize("body", [r5(eventsInNotification=1), r5(eventsInNotification=str(2**63 - 1)),
                                  backport({"name": "events-in-notification", "valueInteger": 0})])
def test_a_good_events_in_notification_is_accepted(door, body):
    response, before, after = call(door, "POST", "/notify", json.dumps(body).encode())
    assert (response.status_code, len(after)) == (200, len(before) + 1), response.text


# ---------------------------------------------------------------- 3. lone surrogates in a subject reference
@pytest.mark.parametrize("body, path, field", [
    ({**OBS, "subject": {"reference": "Patient/p\ud8001"}}, None, "subject.reference"),
    ({**OBS, "subject": {"reference": "Patient/\udfff"}}, "Observation/o1", "subject.reference"),
    ({**OBS, "resourceType": "MedicationStatement", "subject": {"reference": "\ud800"}}, None, "subject.reference"),
    ({"resourceType": "Bundle", "type": "subscription-notification", "entry": r5()["entry"] + [
        {"resource": {**OBS, "subject": {"reference": "Patient/\ud800"}}}]}, None,
     "the resource Observation/o1: subject.reference"),
])
def test_a_lone_surrogate_in_a_subject_reference_is_400_naming_it(door, body, path, field):
    raw = json.dumps(body, ensure_ascii=True).encode()
    response, before, after = call(door, "PUT" if path else "POST", "/notify" + (f"/{path}" if path else ""), raw)
    assert (response.status_code, after) == (400, before), response.text
    assert diagnostics(response).startswith(field) and "lone surrogate" in diagnostics(response)


# ---------------------------------------------------------------- 4. NaN and infinities
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["value", "event"])
def test_nan_and_infinity_are_not_json(door, constant, where):
    body = ({**OBS, "valueQuantity": {"value": "@@"}} if where == "value"     # a field the parser never reads
            else r5(notificationEvent=[{"eventNumber": "@@"}]))
    raw = json.dumps(body).replace('"@@"', constant).encode()
    response, before, after = call(door, "POST", "/notify", raw)
    assert (response.status_code, after) == (400, before), response.text
    assert diagnostics(response) == f"body is not valid JSON: {constant} is not a JSON number"


# ---------------------------------------------------------------- 5. Content-Encoding
@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "br", "deflate", "identity, gzip", "x-unknown"])
def test_a_compressed_body_is_415_naming_the_encoding(door, encoding):
    raw = json.dumps(OBS).encode()
    body = gzip.compress(raw) if encoding.lower() == "gzip" else raw
    response, before, after = call(door, "POST", "/notify", body, {**HEADERS, "Content-Encoding": encoding})
    assert (response.status_code, after) == (415, before), response.text
    assert repr(encoding.lower()) in diagnostics(response)


def test_an_identity_encoding_is_accepted(door):
    response, before, after = call(door, "PUT", "/notify/Observation/o1", json.dumps(OBS).encode(),
                                   {**HEADERS, "Content-Encoding": "identity"})
    assert (response.status_code, len(after)) == (200, len(before) + 1), response.text


# ---------------------------------------------------------------- 6. redirects, unknown paths, methods
PATHS_404 = ["/notify/", "/healthz/", "/metrics/", "/", "/favicon.ico", "/notify/Observation/", "/docs"]


@pytest.mark.parametrize("path", PATHS_404)
def test_no_slash_redirect_and_unknown_paths_are_an_operation_outcome(door, path):
    response, before, after = call(door, "POST" if path.startswith("/notify") else "GET", path,
                                   headers={**HEADERS, "Host": "evil.example"})
    assert (response.status_code, after) == (404, before), response.text
    assert "location" not in response.headers
    assert diagnostics(response).startswith(f"nothing at {path}")
    assert response.headers["content-type"].startswith("application/fhir+json")


@pytest.mark.parametrize("method, path, allow", [("GET", "/notify", "POST"), ("PATCH", "/notify/Observation/o1", None),
                                                 ("POST", "/healthz", "GET"), ("DELETE", "/metrics", "GET")])
def test_a_method_no_route_takes_is_405_as_an_operation_outcome(door, method, path, allow):
    response, before, after = call(door, method, path)
    assert (response.status_code, after) == (405, before), response.text
    assert diagnostics(response) == f"{method} {path}: Method Not Allowed"
    assert "DELETE" in response.headers["allow"] if allow is None else response.headers["allow"] == allow


def test_with_cds_hooks_mounted_the_receivers_refusals_and_the_cds_refusals_are_outcomes(tmp_path):
    inbox, app = open_door(tmp_path / "inbox.sqlite")
    rules = Rules.load()
    mount(app, CdsConfig(public_url="http://127.0.0.1:1", verifier=None), lambda: rules)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            for method, path, status, says in [
                ("GET", "/notify/", 404, "nothing at /notify/ (the receiver takes"),
                ("GET", "/nope", 404, "nothing at /nope (the receiver takes"),
                ("GET", "/notify", 405, "GET /notify: Method Not Allowed"),
                ("GET", "/cds-services/", 404, "nothing at /cds-services/ (GET /cds-services lists"),
                ("DELETE", "/cds-services", 405, "DELETE /cds-services: allowed here: GET, HEAD"),
            ]:
                response = client.request(method, path, follow_redirects=False)
                assert response.status_code == status, (path, response.text)
                assert diagnostics(response).startswith(says), (path, response.text)
            assert client.get("/cds-services").json()["services"]
    finally:
        inbox.close()
