"""Which Subscription is which (``subscribe`` idempotency), what counts as evidence of a
notification (the interop ``subscription`` check never passes on nothing), and the usage
errors of both commands. No server: the behaviour on real servers is in
tests/integration/test_subscribe_idempotent.py and test_interop_subscription.py."""

from __future__ import annotations

import pytest

from clm_stratify.cli import main
from clm_stratify.interop.subscription_step import Arrival, evidence, names_resource
from clm_stratify.service import subscriptions as subs
from fhir_adapters.project import TAG_SYSTEM
from fhir_adapters.terminology import load_terminology

OURS = {"system": TAG_SYSTEM, "code": subs.SUBSCRIPTION_TAG}


def wanted(secret: str = "s" * 20, payload: bool = True, endpoint: str = "http://127.0.0.1:8765/notify") -> list[dict]:
    return subs.criteria_subscriptions(load_terminology(), endpoint, "X-S", secret, payload=payload)


def stored(sub: dict, **changes) -> dict:
    """``sub`` as a server gives it back: id, meta with version, status."""
    return {**sub, "id": "srv-1", "status": "active", "meta": {**sub["meta"], "versionId": "7",
                                                                "lastUpdated": "2026-01-01T00:00:00Z"}, **changes}


# --------------------------------------------------------------------------- subscribe: which is which
def test_the_same_subscription_as_stored_has_no_differences_and_the_same_key():
    for sub in wanted():
        assert subs.differences(sub, stored(sub)) == []
        assert subs.key_of(stored(sub)) == subs.key_of(sub)


def test_secret_and_payload_changes_are_differences_not_new_keys():
    old, new_secret, no_payload = wanted("a" * 20), wanted("b" * 20), wanted("a" * 20, payload=False)
    for o, s, p in zip(old, new_secret, no_payload):
        assert subs.key_of(o) == subs.key_of(s) == subs.key_of(p)
        assert subs.differences(s, stored(o)) == ["channel.header (secret)"]
        assert subs.differences(p, stored(o)) == ["channel.payload"]


def test_endpoint_and_criteria_make_the_key():
    a = wanted()
    b = wanted(endpoint="http://127.0.0.1:9999/notify")
    assert len({subs.key_of(s) for s in a}) == len(a)                       # one key per watched search
    assert not {subs.key_of(s) for s in a} & {subs.key_of(s) for s in b}


def test_backport_key_has_topic_and_filter():
    [sub] = subs.backport_subscriptions(load_terminology(), "http://127.0.0.1:1/notify", "X-S", "s" * 20,
                                        [("http://example.org/topic/size", "Observation")])
    endpoint, criteria, filters = subs.key_of(sub)
    assert criteria == "http://example.org/topic/size" and filters and filters[0].startswith("Observation?")
    [heartbeat] = subs.backport_subscriptions(load_terminology(), "http://127.0.0.1:1/notify", "X-S", "s" * 20,
                                              [("http://example.org/topic/size", "Observation")], heartbeat=30)
    assert subs.key_of(heartbeat) == subs.key_of(sub)
    assert subs.differences(heartbeat, stored(sub)) == ["channel.extension"]


def test_only_the_tag_on_the_resource_makes_it_ours():
    sub = wanted()[0]
    assert subs.is_ours(sub)
    assert not subs.is_ours({**sub, "meta": {}})
    assert not subs.is_ours({**sub, "meta": {"tag": [{**OURS, "system": "http://other"}]}})
    assert not subs.is_ours({**sub, "resourceType": "Basic"})


# --------------------------------------------------------------------------- interop: what is evidence
def arrival(at: float, method: str = "POST", path: str = "/notify", body: bytes = b"") -> Arrival:
    return Arrival(at, method, path, True, body)


@pytest.mark.parametrize("arrivals", [
    [],                                                                     # nothing at all
    [arrival(1.0)],                                                         # an empty POST before the create
    [arrival(1.0, body=b'{"resourceType": "Bundle", "type": "history", "entry": []}')],   # a handshake
    [arrival(6.0, method="GET")],                                           # not a notification
    [arrival(6.0, path="/notify/Patient/other")],
    [arrival(6.0, body=b'{"resourceType": "Patient", "id": "other"}')],
    [arrival(6.0, body=b'{"resourceType": "Observation", "id": "p1"}')],   # same id, other type
    [arrival(6.0, body=b"not json, mentions Patient/p1")],
])
def test_no_evidence_no_pass(arrivals):
    assert evidence(arrivals, "Patient", "p1", since=5.0) is None


@pytest.mark.parametrize("found", [
    arrival(6.0, method="PUT", path="/notify/Patient/p1", body=b'{"resourceType": "Patient", "id": "p1"}'),
    arrival(6.0, body=b'{"resourceType": "Patient", "id": "p1"}'),
    arrival(6.0),                                                           # empty rest-hook after the create
    arrival(6.0, body=b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": '
                      b'"Parameters", "parameter": [{"name": "notification-event", "part": [{"name": "focus", '
                      b'"valueReference": {"reference": "http://h/fhir/Patient/p1"}}]}]}}]}'),
])
def test_evidence_names_the_resource_or_is_an_empty_post_after_it(found):
    assert evidence([arrival(1.0, body=b'{"resourceType": "Bundle"}'), found], "Patient", "p1", since=5.0) is found


def test_names_resource_is_bounded_on_deep_documents():
    deep = b"[" * 5000 + b"]" * 5000
    assert names_resource(deep, "Patient", "p1") is False


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv, message", [
    (["interop", "--subscription-host", "0.0.0.0"], "--subscription-host 0.0.0.0 listens on every interface"),
    (["interop", "--subscription-wait", "500"], "--subscription-wait 500: give 0 to 120 seconds"),
    (["interop", "--subscription-port", "70000"], "--subscription-port 70000"),
    (["interop", "--subscription-url", "ftp://x/notify"], "--subscription-url must start with http"),
    (["subscribe", "--endpoint", "http://127.0.0.1:1/notify", "--wait", "-1"], "--wait -1"),
])
def test_usage_errors(argv, message, capsys):
    code = main([argv[0], "--fhir-url", "http://127.0.0.1:9/fhir", *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
