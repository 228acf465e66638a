"""``clm-stratify subscribe`` is idempotent, on both real servers (SEKMET and Medplum's
engine): a second run with the same arguments creates nothing (every event would
otherwise be delivered twice), a changed secret or payload updates the Subscriptions in
place, stale ones and duplicates of ours for the endpoint are deleted, and Subscriptions
that are not ours (no tag, or another endpoint) are never touched, also when the server's
``_tag`` search cannot be trusted.

The endpoint is a loopback HTTP server answering 200 (SEKMET really delivers)."""

from __future__ import annotations

import re
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from clm_stratify.cli import main
from clm_stratify.service.subscriptions import SUBSCRIPTION_TAG
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.project import TAG_SYSTEM
from fhir_adapters.terminology import load_terminology
from tests.support.http import LoopbackServer, operation_outcome, read_body, send
from tests.support.quirky_fhir_server import QuirkyFhirServer

pytestmark = pytest.mark.integration
SECRET_A, SECRET_B = "first-secret-0123456789", "second-secret-9876543210"
OUR_TAG = {"system": TAG_SYSTEM, "code": SUBSCRIPTION_TAG}
N = len(load_terminology().triggers)       # one criteria Subscription per trigger of the terminology


def _ok(h: BaseHTTPRequestHandler) -> None:
    read_body(h)
    send(h, 200, operation_outcome("informational", "received"))


@pytest.fixture(params=["sekmet", "medplum"])
def fhir(request):
    """Each test runs on SEKMET and on Medplum's engine (both session servers, shared)."""
    return request.getfixturevalue("fhir_server" if request.param == "sekmet" else "medplum_server")


@pytest.fixture
def endpoint():
    with LoopbackServer(_ok, methods=("POST", "PUT")) as srv:
        yield f"{srv.url}/notify"


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", SECRET_A)


def subscribe(base_url: str, endpoint: str, capsys, *extra: str) -> tuple[int, str]:
    code = main(["subscribe", "--fhir-url", base_url, "--endpoint", endpoint, "--wait", "1", *extra])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out


def on_server(base_url: str, endpoint: str | None = None, tagged: bool = True) -> dict[str, dict]:
    """Every Subscription on the server (read independently of the code under test), by id:
    ours (tag checked) or not ours, for ``endpoint`` when given."""
    with FhirClient(base_url) as c:
        subs = list(c.search("Subscription", {"_count": "1000"}))
    return {s["id"]: s for s in subs
            if (OUR_TAG in [{"system": t.get("system"), "code": t.get("code")}
                            for t in (s.get("meta") or {}).get("tag") or []]) == tagged
            and (endpoint is None or s["channel"]["endpoint"] == endpoint)}


def actions(out: str) -> list[str]:
    return re.findall(r"\[(created|updated|unchanged|removed)", out)


def versions(subs: dict[str, dict]) -> dict[str, str]:
    return {i: s["meta"]["versionId"] for i, s in subs.items()}


def expected_code(fhir) -> int:
    # SEKMET activates criteria Subscriptions; Medplum stores them as 'requested' for ever (exit 1)
    return 0 if "medplum" not in type(fhir).__name__.lower() else 1


def test_twice_creates_once_and_a_changed_secret_or_payload_updates_in_place(fhir, endpoint, capsys, monkeypatch):
    try:
        code, out = subscribe(fhir.base_url, endpoint, capsys)
        assert code == expected_code(fhir), out
        assert actions(out) == ["created"] * N and f"created {N}" in out
        first = on_server(fhir.base_url, endpoint)
        assert len(first) == N

        code, out = subscribe(fhir.base_url, endpoint, capsys)
        assert code == expected_code(fhir), out
        assert actions(out) == ["unchanged"] * N and out.strip().endswith(f"unchanged {N}")
        again = on_server(fhir.base_url, endpoint)
        assert versions(again) == versions(first)             # nothing written at all

        monkeypatch.setenv("CLM_SUBSCRIPTION_SECRET", SECRET_B)
        code, out = subscribe(fhir.base_url, endpoint, capsys)
        assert actions(out) == ["updated"] * N and out.count("channel.header (secret)") == N, out
        assert SECRET_B not in out and SECRET_A not in out    # the secret is never printed
        updated = on_server(fhir.base_url, endpoint)
        assert set(updated) == set(first)                     # in place: same ids, no new ones
        assert all(s["channel"]["header"] == [f"X-CLM-Subscription-Secret: {SECRET_B}"] for s in updated.values())
        assert all(updated[i]["meta"]["versionId"] != first[i]["meta"]["versionId"] for i in first)

        code, out = subscribe(fhir.base_url, endpoint, capsys, "--payload", "none")
        assert actions(out) == ["updated"] * N and out.count("channel.payload") == N, out
        no_payload = on_server(fhir.base_url, endpoint)
        assert set(no_payload) == set(first) and all("payload" not in s["channel"] for s in no_payload.values())
        code, out = subscribe(fhir.base_url, endpoint, capsys, "--payload", "none")
        assert actions(out) == ["unchanged"] * N
    finally:
        assert main(["subscribe", "--fhir-url", fhir.base_url, "--endpoint", endpoint, "--remove"]) == 0
    assert on_server(fhir.base_url, endpoint) == {}


def test_stale_and_duplicate_ones_are_removed_and_others_never_touched(fhir, endpoint, capsys):
    other_endpoint = endpoint.replace("/notify", "/other/notify")
    with FhirClient(fhir.base_url) as c:
        try:
            subscribe(fhir.base_url, endpoint, capsys)
            first = on_server(fhir.base_url, endpoint)
            model = next(iter(first.values()))
            copy = {k: v for k, v in model.items() if k not in ("id", "meta")} | {"meta": {"tag": [OUR_TAG]}}
            _, duplicate = c.create(copy)                                     # an old run's twin
            _, stale = c.create(copy | {"criteria": "Encounter"})             # no longer wanted
            _, foreign = c.create({k: v for k, v in copy.items() if k != "meta"})   # not ours: no tag
            _, elsewhere = c.create(copy | {"channel": copy["channel"] | {"endpoint": other_endpoint}})
            untouched = {sid: c.read("Subscription", sid)["meta"]["versionId"]           # as settled (activated)
                         for sid in (foreign["id"], elsewhere["id"])}

            code, out = subscribe(fhir.base_url, endpoint, capsys)
            assert sorted(actions(out)) == ["removed"] * 2 + ["unchanged"] * N, out
            assert f"Subscription/{duplicate['id']}: deleted" in out and "duplicate of Subscription/" in out
            assert f"Subscription/{stale['id']}: deleted" in out and "no longer wanted" in out
            assert set(on_server(fhir.base_url, endpoint)) == set(first)
            with FhirClient(fhir.base_url) as check:
                for sid, version in untouched.items():
                    assert check.read("Subscription", sid)["meta"]["versionId"] == version

            # --remove with --endpoint: only ours for that endpoint
            assert main(["subscribe", "--fhir-url", fhir.base_url, "--endpoint", endpoint, "--remove"]) == 0
            assert on_server(fhir.base_url, endpoint) == {}
            assert elsewhere["id"] in on_server(fhir.base_url, other_endpoint)
            assert foreign["id"] in on_server(fhir.base_url, endpoint, tagged=False)
        finally:
            for sid in list(on_server(fhir.base_url, endpoint, tagged=False)) + list(
                    on_server(fhir.base_url, other_endpoint)) + list(on_server(fhir.base_url, endpoint)):
                c.delete("Subscription", sid)


class TagDistrust(QuirkyFhirServer):
    """SEKMET behind a proxy whose ``Subscription?_tag=`` search is ``ignored`` (everyone's
    come back), matches ``nothing``, or is an ``error`` (400)."""

    def __init__(self, upstream: str, mode: str):
        super().__init__(upstream)
        self.mode = mode

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if h.command == "GET" and parts.path.rstrip("/").endswith("/Subscription") and any(
                k == "_tag" for k, _ in query):
            if self.mode == "nothing":
                return send(h, 200, {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
            if self.mode == "error":
                return send(h, 400, operation_outcome("not-supported", "Unknown search parameter '_tag'"))
            h.path = parts.path + "?" + urlencode([(k, v) for k, v in query if k != "_tag"])
        super()._handle(h)


@pytest.mark.parametrize("mode", ["ignored", "nothing", "error"])
def test_a_tag_search_that_cannot_be_trusted_neither_duplicates_nor_touches_others(fhir_server, endpoint, capsys,
                                                                                    mode):
    with TagDistrust(fhir_server.base_url, mode) as proxy, FhirClient(fhir_server.base_url) as c:
        # someone else's Subscription with exactly our criteria and endpoint, but not our tag
        theirs = {"resourceType": "Subscription", "status": "requested", "reason": "someone else's",
                  "criteria": "Condition", "channel": {"type": "rest-hook", "endpoint": endpoint}}
        _, foreign = c.create(theirs)
        foreign = c.read("Subscription", foreign["id"])           # as the server settled it (activated)
        try:
            code, out = subscribe(proxy.base_url, endpoint, capsys)
            assert code == 0 and actions(out) == ["created"] * N, out
            code, out = subscribe(proxy.base_url, endpoint, capsys)
            assert code == 0 and actions(out) == ["unchanged"] * N, out
            assert len(on_server(fhir_server.base_url, endpoint)) == N
            assert c.read("Subscription", foreign["id"])["meta"]["versionId"] == foreign["meta"]["versionId"]
            assert main(["subscribe", "--fhir-url", proxy.base_url, "--endpoint", endpoint, "--remove"]) == 0
            assert on_server(fhir_server.base_url, endpoint) == {}
            assert c.read("Subscription", foreign["id"]) is not None
        finally:
            for sid in [foreign["id"], *on_server(fhir_server.base_url, endpoint)]:
                c.delete("Subscription", sid)


def test_backport_subscriptions_are_idempotent_too(fhir_server, endpoint, capsys):
    from sekmet.subscriptions.backport import topic_basic

    topic = topic_basic("clm-idem-tumor-size", "Tumour size", "Tumour size measured", "Observation", "true",
                        [("patient", "Observation"), ("code", "Observation")])
    url = next(e["valueUri"] for e in topic["extension"] if e["url"].endswith(".url"))
    args = ("--style", "backport", "--topic", f"{url}=Observation", "--payload-content", "id-only")
    with FhirClient(fhir_server.base_url) as c:
        c.update(topic)
        try:
            code, out = subscribe(fhir_server.base_url, endpoint, capsys, *args)
            assert code == 0 and actions(out) == ["created"], out          # the handshake was answered
            code, out = subscribe(fhir_server.base_url, endpoint, capsys, *args)
            assert code == 0 and actions(out) == ["unchanged"], out
            code, out = subscribe(fhir_server.base_url, endpoint, capsys, *args[:-1], "full-resource")
            assert actions(out) == ["updated"] and "channel._payload" in out, out
            assert len(on_server(fhir_server.base_url, endpoint)) == 1
        finally:
            assert main(["subscribe", "--fhir-url", fhir_server.base_url, "--endpoint", endpoint, "--remove"]) == 0
            c.delete("Basic", topic["id"])
