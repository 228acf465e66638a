"""The notification parser is the door of the receiver (issue 13): what it lets in is stored.

``parse_notification`` either refuses a body with a :class:`NotificationError` (a 400
naming the field) or returns a Notification that serialises, reads back equal, and fits
the SQLite inbox (every integer below 2**63). Checked two ways:

* the three attacks of issue 13, one test each (they failed before the fix);
* a schema-aware hypothesis fuzz test over the three notification styles (criteria
  rest-hook with and without a path, empty body, backport R4 Parameters, backport R4B
  and R5 SubscriptionStatus): structurally plausible notifications, then mutated (wrong
  JSON types at every level, huge/negative/float/string numbers, NaN and infinities, lone
  surrogates and odd Unicode (in references too), long strings, missing and extra
  fields, deep nesting, raw invalid UTF-8),
  sent as raw bytes to the real receiver app in-process, with a real SQLite inbox.
  Oracle: never a 5xx; a 200 exactly when the parser accepts the body, and then the
  stored row validates, equals the parsed notification and fits SQLite; a 400 stores nothing.
"""

from __future__ import annotations

import copy
import decimal
import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from clm_stratify.service.inbox import Inbox
from clm_stratify.service.notifications import Notification, NotificationError, parse_notification
from clm_stratify.service.receiver import ReceiverConfig, create_app

SECRET = "door-secret"
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
LIMIT = 2**63 - 1
RAW = "@@RAW@@"   # a string replaced by raw bytes after JSON encoding
MAX_BODY = ReceiverConfig(secret=SECRET).max_body


# ---------------------------------------------------------------- the receiver, in-process
@pytest.fixture(scope="module")
def door(tmp_path_factory):
    db = tmp_path_factory.mktemp("door") / "inbox.sqlite"
    inbox = Inbox(db)
    with TestClient(create_app(inbox, ReceiverConfig(secret=SECRET)), raise_server_exceptions=False) as client:
        yield client, db
    inbox.close()


def rows(db) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, body FROM notification ORDER BY id").fetchall()


def send(door, body: bytes, path: str | None = None):
    client, db = door
    before = rows(db)
    url = "/notify" + (f"/{path}" if path else "")
    response = client.request("PUT" if path else "POST", url, content=body, headers=HEADERS)
    return response, before, rows(db)


def encode(doc, raw: bytes = b"\xff") -> bytes:
    return json.dumps(doc, ensure_ascii=True).encode().replace(json.dumps(RAW).encode()[1:-1], raw)


def status_bundle(btype="history", events=None, **extra):
    status = {"resourceType": "SubscriptionStatus", "type": "event-notification", "eventsSinceSubscriptionStart": "3",
              "subscription": {"reference": "Subscription/s1"}, "topic": "http://x.org/topic",
              "notificationEvent": events if events is not None else [
                  {"eventNumber": "3", "focus": {"reference": "Observation/o1"},
                   "additionalContext": [{"reference": "Patient/p1"}]}]}
    status.update(extra)
    return {"resourceType": "Bundle", "type": btype, "entry": [{"resource": status}]}


def parameters_bundle(*params):
    base = [{"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "type", "valueCode": "event-notification"}]
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"resource": {"resourceType": "Parameters", "parameter": base + list(params)}}]}


def event_part(number="1", focus="Observation/o1"):
    return {"name": "notification-event", "part": [{"name": "event-number", "valueString": number},
                                                   {"name": "focus", "valueReference": {"reference": focus}}]}


# ---------------------------------------------------------------- attack 1: numbers over SQLite INTEGER
@pytest.mark.parametrize("body, field", [
    (status_bundle(events=[{"eventNumber": "1"}, {"eventNumber": 2}, {"eventNumber": str(2**63)}]),
     "notificationEvent[2].eventNumber is 9223372036854775808, over the limit 9223372036854775807"),
    (status_bundle("subscription-notification", events=[{"eventNumber": 2**63}]), "notificationEvent[0].eventNumber"),
    (status_bundle(eventsSinceSubscriptionStart=2**64), "eventsSinceSubscriptionStart"),
    (status_bundle(eventsSinceSubscriptionStart="9" * 40), "eventsSinceSubscriptionStart"),
    (parameters_bundle(event_part(str(2**63))), "event-number"),
    (parameters_bundle({"name": "events-since-subscription-start", "valueString": str(2**63)}),
     "events-since-subscription-start"),
])
def test_an_event_number_over_sqlite_integer_is_refused_at_the_door(door, body, field):
    with pytest.raises(NotificationError, match="over the limit") as caught:
        parse_notification(body)
    assert field in str(caught.value)
    response, before, after = send(door, encode(body))
    assert (response.status_code, after) == (400, before), response.text
    assert "over the limit" in response.json()["issue"][0]["diagnostics"]


def test_the_largest_sqlite_integer_is_still_accepted(door):
    body = status_bundle(eventsSinceSubscriptionStart=str(LIMIT), events=[{"eventNumber": LIMIT}])
    assert parse_notification(body).events[0].number == LIMIT
    response, before, after = send(door, encode(body))
    assert (response.status_code, len(after)) == (200, len(before) + 1)


# ---------------------------------------------------------------- attack 2: lone surrogates
OBS = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"}}


@pytest.mark.parametrize("body, path", [
    ({**OBS, "id": "\ud800"}, None),
    ({**OBS, "id": "o\udfff1"}, None),
    ({**OBS, "resourceType": "Obs\ud800"}, None),
    (status_bundle(events=[{"eventNumber": "1", "focus": {"reference": "Observation/\ud800"}}]), None),
    (status_bundle(subscription={"reference": "Subscription/\ud800"}), None),
    (status_bundle(topic="http://x.org/\ud800"), None),
    (parameters_bundle(event_part(focus="http://x/fhir/\udc00/1")), None),
    (parameters_bundle({"name": "topic", "valueCanonical": "\ud800"}), None),
])
def test_a_lone_surrogate_is_refused_not_a_500(door, body, path):
    with pytest.raises(NotificationError):
        parse_notification(body, path)
    response, before, after = send(door, encode(body), path)
    assert (response.status_code, after) == (400, before), response.text


@pytest.mark.parametrize("body", [
    status_bundle(events=[{"eventNumber": "1", "timestamp": "2024-01-01T00:00:00Z\ud800"}]),
    {**OBS, "meta": {"versionId": "\ud800"}},
])
def test_a_lone_surrogate_in_an_informational_field_is_dropped(door, body):
    n = parse_notification(body)
    assert (n.events[0].timestamp, n.events[0].version) == (None, None)
    response, before, after = send(door, encode(body))
    assert (response.status_code, len(after)) == (200, len(before) + 1), response.text
    assert Notification.model_validate_json(after[-1][1]) == n


# ---------------------------------------------------------------- attack 3: containers of the wrong JSON type
NOT_ARRAYS = [5, "abc", {"a": 1}, 1.5, True]
NOT_OBJECTS = [5, "abc", [1], 1.5, True, None]
CONTAINERS = [   # (body for a wrong value, the field named in the error, the wrong values)
    (lambda w: status_bundle(events=w), "notificationEvent", NOT_ARRAYS),
    (lambda w: status_bundle("subscription-notification", events=[{"eventNumber": "1"}, {"eventNumber": "2"}, w]),
     "notificationEvent[2]", NOT_OBJECTS),
    (lambda w: status_bundle(events=[{"eventNumber": "1", "additionalContext": w}]),
     "notificationEvent[0].additionalContext", NOT_ARRAYS),
    (lambda w: status_bundle(events=[{"eventNumber": "1", "additionalContext": [{"reference": "Patient/p1"}, w]}]),
     "notificationEvent[0].additionalContext[1]", NOT_OBJECTS),
    (lambda w: {"resourceType": "Bundle", "type": "history",
                "entry": [{"resource": {"resourceType": "Parameters", "parameter": w}}]}, "parameter", NOT_ARRAYS),
    (lambda w: parameters_bundle(w), "parameter[2]", NOT_OBJECTS),
    (lambda w: parameters_bundle({"name": "notification-event", "part": w}), "parameter[2].part", NOT_ARRAYS),
    (lambda w: parameters_bundle({"name": "notification-event", "part": [w]}), "parameter[2].part[0]", NOT_OBJECTS),
    (lambda w: {**status_bundle(), "entry": w}, "entry", NOT_ARRAYS),
    (lambda w: {**status_bundle(), "entry": status_bundle()["entry"] + [w]}, "entry[1]", NOT_OBJECTS),
]


@pytest.mark.parametrize("make, field, wrong", [(m, f, w) for m, f, ws in CONTAINERS for w in ws],
                         ids=[f"{f}={w!r}" for _, f, ws in CONTAINERS for w in ws])
def test_a_container_of_the_wrong_json_type_is_a_400_naming_it(door, make, field, wrong):
    body = make(wrong)
    with pytest.raises(NotificationError) as caught:
        parse_notification(body)
    assert field in str(caught.value)
    response, before, after = send(door, encode(body))
    assert (response.status_code, after) == (400, before), response.text
    assert field in response.json()["issue"][0]["diagnostics"]


def test_too_many_events_are_refused():
    with pytest.raises(NotificationError, match="notificationEvent has 1001 events, over the limit 1000"):
        parse_notification(status_bundle(events=[{"eventNumber": str(i)} for i in range(1, 1002)]))
    assert len(parse_notification(status_bundle(events=[{"eventNumber": str(i)} for i in range(1, 1001)])).events) \
        == 1000


def test_a_stored_row_out_of_bounds_does_not_validate_on_the_way_out():
    from pydantic import ValidationError

    for row in ('{"style":"r5","kind":"event-notification","events":[{"number":9223372036854775808}]}',
                '{"style":"r5","kind":"event-notification","events_since_start":-1}',
                '{"style":"rest-hook","kind":"resource","events":[{"focus":"Observation/a b"}]}',
                '{"style":"rest-hook","kind":"resource","events":[{"resource_type":"observation"}]}',
                '{"style":"r5","kind":"heartbeat","topic":"' + "x" * 1025 + '"}',
                '{"style":"r5","kind":"heartbeat","extra":1}'):
        with pytest.raises(ValidationError):
            Notification.model_validate_json(row)


# ---------------------------------------------------------------- the fuzz test
ids = st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True).filter(lambda s: s.strip(".") != "")
rtypes = st.one_of(st.sampled_from(["Observation", "Condition", "Patient", "Encounter", "MedicationRequest"]),
                   st.from_regex(r"[A-Z][A-Za-z]{0,63}", fullmatch=True))
numbers = st.one_of(st.integers(0, LIMIT), st.integers(0, LIMIT).map(str), st.integers(0, 50).map(str))
instants = st.sampled_from(["2024-05-01T10:00:00Z", "2024-05-01T10:00:00.123+02:00", "1999-12-31T23:59:60-14:00"])


@st.composite
def references(draw, rtype=rtypes):
    t, i = draw(rtype), draw(ids)
    return draw(st.sampled_from([f"{t}/{i}", f"http://x.org/fhir/{t}/{i}", f"https://x.org/fhir/{t}/{i}/_history/2"]))


@st.composite
def resources(draw):
    t, i = draw(rtypes), draw(ids)
    doc = {"resourceType": t, "id": i}
    if draw(st.booleans()):
        doc["meta"] = {"versionId": draw(ids)}
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["subject", "patient"]))] = {"reference": draw(references(st.just("Patient")))}
    return doc


@st.composite
def context(draw):
    return [{"reference": r} for r in draw(st.lists(references(st.sampled_from(["Patient", "Encounter"])), max_size=3))]


@st.composite
def status_events(draw):
    events = []
    for _ in range(draw(st.integers(0, 3))):
        event = {"eventNumber": draw(numbers)}
        if draw(st.booleans()):
            event["timestamp"] = draw(instants)
        if draw(st.booleans()):
            event["focus"] = {"reference": draw(references())}
        if draw(st.booleans()):
            event["additionalContext"] = draw(context())
        events.append(event)
    return events


@st.composite
def status_notifications(draw, btype):
    status = {"resourceType": "SubscriptionStatus", "status": "active",
              "type": draw(st.sampled_from(["event-notification", "heartbeat", "handshake", "query-status"])),
              "eventsSinceSubscriptionStart": draw(numbers), "topic": "http://x.org/SubscriptionTopic/t",
              "subscription": {"reference": draw(st.sampled_from(["Subscription/s1",
                                                                   "http://x/fhir/Subscription/s2"]))},
              "notificationEvent": draw(status_events())}
    carried = [{"fullUrl": "x", "resource": draw(resources())} for _ in range(draw(st.integers(0, 2)))]
    return {"resourceType": "Bundle", "type": btype, "entry": [{"resource": status}] + carried}, None


@st.composite
def parameters_notifications(draw):
    params = [{"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
              {"name": "topic", "valueCanonical": "http://x.org/SubscriptionTopic/t"},
              {"name": "type", "valueCode": draw(st.sampled_from(["event-notification", "heartbeat", "handshake"]))},
              {"name": "events-since-subscription-start", "valueString": draw(numbers)}]
    for event in draw(status_events()):
        parts = [{"name": "event-number", "valueString": event["eventNumber"]}]
        if "timestamp" in event:
            parts.append({"name": "timestamp", "valueInstant": event["timestamp"]})
        if "focus" in event:
            parts.append({"name": "focus", "valueReference": event["focus"]})
        parts += [{"name": "additional-context", "valueReference": c} for c in event.get("additionalContext", [])]
        params.append({"name": "notification-event", "part": parts})
    carried = [{"resource": draw(resources())} for _ in range(draw(st.integers(0, 2)))]
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"resource": {"resourceType": "Parameters", "parameter": params}}] + carried}, None


@st.composite
def rest_hooks(draw):
    doc = draw(resources())
    return doc, (f"{doc['resourceType']}/{doc['id']}" if draw(st.booleans()) else None)


notifications = st.one_of(rest_hooks(), st.just((None, None)), parameters_notifications(),
                          status_notifications("history"), status_notifications("subscription-notification"))

ODD = ["\ud800", "a\udfffb", "\x00", "\u2028", "\u202e", "e\u0301", "\U0001f600", "１２", " 1", "1 ", "+1", "-1",
       "-0", "0x10", "1e3", "1.0", "\n", "", RAW, "x" * 65, "x" * 1025, "Patient/" + "a" * 65, "Patient/\ud800",
       "Observation/o1/extra", "urn:uuid:0b1c", "#contained", "2024-02-30T00:00:00Z", "2024-05-01T10:00:00Z\n"]
mutants = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1.5, 2**63 - 1, 2**63, 2**64, -2**63, 10**40, [], {}, [None], [[]],
                     float("nan"), float("inf"), float("-inf")]),          # (json.dumps writes NaN, Infinity)
    st.sampled_from(ODD), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.integers(1, 5000).map(lambda n: "a" * n),
    st.integers(50, 400).map(lambda n: json.loads("[" * n + "]" * n)),
    st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                 lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=6), k, max_size=3)),
                 max_leaves=8))
KEYS = ["resourceType", "id", "type", "entry", "resource", "parameter", "part", "name", "valueString",
        "valueReference", "reference", "notificationEvent", "eventNumber", "focus", "additionalContext",
        "eventsSinceSubscriptionStart", "timestamp", "meta", "versionId", "subscription", "topic", "extra"]


@st.composite
def mutated(draw, doc):
    """``doc`` with 0-4 mutations, each at a node reached by a random walk from the root."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(0, 4))):
        if not isinstance(doc, (dict, list)):
            break
        node = doc
        while True:
            children = list(node.keys() if isinstance(node, dict) else range(len(node)))
            inner = [c for c in children if isinstance(node[c], (dict, list))]
            if not inner or draw(st.integers(0, 5)) == 0:
                break
            node = node[draw(st.sampled_from(inner))]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate", "raw"]))
        if isinstance(node, dict):
            key = draw(st.sampled_from(sorted(node) or ["resourceType"])) if action != "add" else draw(
                st.sampled_from(KEYS))
            if action == "delete":
                node.pop(key, None)
            elif action == "raw":          # raw bytes in a string, e.g. invalid UTF-8 (see requests_)
                node[key] = draw(st.sampled_from([RAW, f"Patient/{RAW}", f"Observation/o{RAW}", f"{RAW}1"]))
            elif key == "reference" and action == "duplicate":   # a lone surrogate inside a reference
                node[key] = draw(st.sampled_from(["Patient/p\ud800", "Observation/\udc001", "\udfff"]))
            else:
                node[key] = copy.deepcopy(draw(mutants))   # (sampled values are shared)
        elif action == "delete" and node:
            node.pop(draw(st.integers(0, len(node) - 1)))
        elif action == "duplicate" and node:
            times = draw(st.sampled_from([1, 2, 1000]))       # (1000: over the event limit)
            node.extend([node[-1]] * (times if len(json.dumps(node[-1])) < 300 else 2))
        elif node and action == "replace":
            node[draw(st.integers(0, len(node) - 1))] = copy.deepcopy(draw(mutants))
        else:
            node.append(copy.deepcopy(draw(mutants)))
    return doc


@st.composite
def requests_(draw):
    doc, path = draw(notifications)
    if doc is None:
        deep = b'{"resourceType": "Bundle", "type": "history", "entry": ' + b"[" * 3000 + b"]" * 3000 + b"}"
        return draw(st.sampled_from([b"", b"  ", b"null", b"\xff\xfe", b'{"resourceType": "\xed\xa0\x80"}', deep])), None
    doc = draw(mutated(doc))
    if path is not None and draw(st.integers(0, 5)) == 0:
        path = draw(st.sampled_from(["Observation/o1", "Patient/p1", f"{path}x"]))
    raw = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\\ud800", b"\\udc00\\ud800", b"ok"]))
    return encode(doc, raw), path


def not_a_number(name: str):
    raise ValueError(f"{name}: not JSON (RFC 8259)")


def expected(body: bytes, path: str | None) -> Notification | None:
    """What the door should do: the Notification to store, or None (a 400)."""
    try:
        parsed = json.loads(body, parse_float=decimal.Decimal, parse_constant=not_a_number) if body.strip() else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    try:
        return parse_notification(parsed, path)
    except NotificationError as exc:
        str(exc).encode("utf-8")     # the message goes out in the 400: it must be valid Unicode
        return None


def check_stored(body: str, n: Notification) -> None:
    stored = Notification.model_validate_json(body)
    assert stored == n
    assert Notification.model_validate_json(stored.model_dump_json()) == stored
    for number in [stored.events_since_start, *(e.number for e in stored.events)]:
        assert number is None or 0 <= number < 2**63
    assert len(stored.events) <= 1000


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests_())
def test_fuzzed_notifications_never_5xx_and_store_only_what_the_parser_accepts(door, request):
    body, path = request
    n = expected(body, path)
    response, before, after = send(door, body, path)
    assert response.status_code < 500, (response.status_code, response.text[:300], body[:300])
    if len(body) > MAX_BODY:
        assert (response.status_code, after) == (413, before)
        return
    if n is None:
        assert (response.status_code, after) == (400, before), (response.text[:300], body[:300])
        return
    assert response.status_code == 200, (response.text[:300], body[:300])
    assert len(after) == len(before) + 1
    check_stored(after[-1][1], n)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests_())
def test_the_parser_refuses_or_returns_a_storable_notification(request):
    body, path = request
    n = expected(body, path)
    if n is not None:
        check_stored(n.model_dump_json(), n)
