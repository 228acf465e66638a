"""The ``subscription`` step of ``clm-stratify interop`` on real servers: SEKMET fires a
rest-hook (pass), Medplum's engine stores the Subscription and never fires (warn), a
server that refuses Subscriptions (SEKMET behind a proxy that says 422) fails with its
own words. The check never passes without a notification at its own receiver, and it
always leaves nothing behind: no Subscription, no probe resource, no receiver."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

import pytest

from clm_stratify.cli import main
from clm_stratify.interop import InteropRun
from clm_stratify.interop import probes
from clm_stratify.interop.subscription_step import SubscriptionOptions
from clm_stratify.pipeline import Rules
from engine.classify import Engine
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.terminology import load_terminology
from tests.support.http import LoopbackServer, operation_outcome, read_body, send
from tests.support.quirky_fhir_server import QuirkyFhirServer

pytestmark = pytest.mark.integration
SMALL = ["01-resectable-single-small.json"]
RULES = Rules(Engine.default(), load_terminology())
RECEIVER_THREAD = "interop-subscription-receiver"
REFUSAL = "Subscription is not supported by this server (test quirk)"


def interop(base_url: str, **options) -> InteropRun:
    with FhirClient(base_url, retries=1, backoff=0.05) as client:
        run = InteropRun(client, RULES, fixtures=SMALL, subscription=SubscriptionOptions(**options))
        run.run()
    return run


def check_of(run: InteropRun):
    [check] = [c for c in run.report.checks if c.id == "subscription.rest-hook"]
    assert check.step == "subscription"
    return check


def endpoint_in(detail: str) -> str:
    return detail.split("endpoint ")[1].split()[0].rstrip(";),")


def assert_nothing_left(base_url: str, run: InteropRun, endpoint: str) -> None:
    """No Subscription and no Patient of the run on the server; the receiver is gone."""
    with FhirClient(base_url) as c:
        subs = list(c.search("Subscription", {"_count": "1000"}))
        assert [s["id"] for s in subs if probes.has_tag(s, run.tag)
                or s["channel"]["endpoint"] == endpoint] == []
        assert probes.tagged(c, "Patient", run.tag) == []
    assert RECEIVER_THREAD not in [t.name for t in threading.enumerate()]
    port = urlsplit(endpoint).port
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(1)
        s.connect(("127.0.0.1", port))               # the receiver's port is closed


def test_sekmet_notifies_the_run_receiver_pass(fhir_server):
    run = interop(fhir_server.base_url, wait=5)
    check = check_of(run)
    assert check.status == "pass", check.detail
    probe = check.detail.split("notification for ")[1].split()[0]
    assert probe.startswith("Patient/") and "secret header sent" in check.detail
    assert "status active" in check.detail and f"_tag={probes.RUN_TAG_SYSTEM}|{run.run_id}" in check.detail
    assert [s["step"] for s in run.report.to_json()["steps"]].index("subscription") == 4   # after write, before cleanup
    assert run.report.exit_code == 0 and not run.report.not_deleted
    endpoint = endpoint_in(check.detail)
    assert endpoint.startswith("http://127.0.0.1:")
    assert_nothing_left(fhir_server.base_url, run, endpoint)
    with FhirClient(fhir_server.base_url) as c:
        assert c.read(*probe.split("/")) is None


def test_cli_options_reach_the_check(fhir_server, tmp_path, capsys):
    """--subscription-url ({port} filled in) and --subscription-wait through the command."""
    path = tmp_path / "report.json"
    assert main(["interop", "--fhir-url", fhir_server.base_url, "--report", str(path), "--subscription-wait", "3",
                 "--subscription-url", "http://localhost:{port}/notify"]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    [check] = [c for c in report["checks"] if c["id"] == "subscription.rest-hook"]
    assert check["status"] == "pass" and "endpoint http://localhost:" in check["detail"], check
    assert "{port}" not in check["detail"] and "rest-hook Subscription notifies" in out
    assert [s["step"] for s in report["steps"]][-2:] == ["subscription", "cleanup"]


def test_medplum_stores_but_never_notifies_warn(medplum_server):
    started = time.monotonic()
    run = interop(medplum_server.base_url, wait=1)
    check = check_of(run)
    assert check.status == "warn", check.detail
    assert check.detail.startswith("accepted, status requested, no notification within 1 s after creating Patient/")
    assert "nothing arrived" in check.detail
    assert "a server on another machine cannot reach a loopback receiver" in check.detail
    assert 2 <= run.report.steps["subscription"] < time.monotonic() - started     # two bounded waits of 1 s
    assert_nothing_left(medplum_server.base_url, run, endpoint_in(check.detail))


class RefusesSubscriptions(QuirkyFhirServer):
    """SEKMET behind a proxy that answers 422 with an OperationOutcome to any write of a
    Subscription (a server that does not support them)."""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.command in ("POST", "PUT") and urlsplit(h.path).path.rstrip("/").split("/")[2:3] == ["Subscription"]:
            read_body(h)
            return send(h, 422, operation_outcome("not-supported", REFUSAL))
        super()._handle(h)


def test_a_server_that_refuses_subscriptions_fails_with_its_words_and_is_cleaned_up(fhir_server):
    with RefusesSubscriptions(fhir_server.base_url) as proxy:
        run = interop(proxy.base_url, wait=1)
        check = check_of(run)
        assert check.status == "fail"
        assert check.detail.startswith("the server refused to create a rest-hook Subscription (HTTP 422;")
        assert check.outcome == REFUSAL
        assert run.report.exit_code == 1 and statuses(run)["cleanup"] == "pass"
        assert_nothing_left(proxy.base_url, run, endpoint_in(check.detail))


def statuses(run: InteropRun) -> dict[str, str]:
    return {c.id: c.status for c in run.report.checks}


def test_never_passes_without_a_notification_at_its_own_receiver(fhir_server):
    """SEKMET really fires, but to another loopback server (the advertised URL points
    there): the run's receiver gets nothing, so the check warns."""
    got: list[str] = []

    def elsewhere(h: BaseHTTPRequestHandler) -> None:
        read_body(h)
        got.append(f"{h.command} {h.path}")
        send(h, 200, operation_outcome("informational", "received"))

    with LoopbackServer(elsewhere, methods=("POST", "PUT")) as other:
        run = interop(fhir_server.base_url, wait=1, url=f"{other.url}/notify")
        check = check_of(run)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    assert got and got[0].startswith("PUT /notify/Patient/"), got      # the server did notify
    assert check.status == "warn", check.detail
    assert check.detail.startswith("accepted, status active, no notification within 1 s after creating Patient/")
    assert_nothing_left(fhir_server.base_url, run, endpoint_in(check.detail))


def test_a_receiver_port_that_cannot_be_bound_fails_clearly(fhir_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = interop(fhir_server.base_url, wait=1, port=port)
    check = check_of(run)
    assert check.status == "fail", check.detail
    assert check.detail.startswith(f"could not start the notification receiver on 127.0.0.1:{port}: ")
    assert "Traceback" not in check.detail
    with FhirClient(fhir_server.base_url) as c:       # nothing was created
        assert [s for s in c.search("Subscription", {"_count": "1000"}) if probes.has_tag(s, run.tag)] == []
