"""CDS Hooks round trips: ``clm-stratify cds-hooks`` as a real uvicorn process on
127.0.0.1 and SEKMET loaded with the fixtures. Prefetch built by reading SEKMET with the
discovery templates; the same call with no prefetch (fallback to SEKMET with
``fhirAuthorization``); a partial prefetch; a fhirServer the service may not call; the
group on the card against ``classify``; the link to a written RiskAssessment; the CDS
Hooks project's validator on the real responses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from clm_stratify.pipeline import Rules, Stratifier, evaluate
from clm_stratify.service.cds_hooks import SERVICE_ID
from clm_stratify.service.cds_prefetch import assessment_template, templates
from engine import explain
from fhir_adapters.fhir.client import FhirClient, dumps
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.writeback.resources import assessment_id
from fixtures import FIXTURES_DIR
from tests.support.cds_validator.spec_checks import check_card, check_discovery
from tests.support.receiver_process import free_port

VALIDATOR = Path(__file__).resolve().parents[1] / "support" / "cds_validator"
EXPECTED = yaml.safe_load((FIXTURES_DIR / "expected.yaml").read_text())
RULES = Rules.load()
# Two assessed fixtures per group, classified through SEKMET both ways.
BY_GROUP = [n for g in ("resectable", "borderline-resectable", "unresectable", "indeterminate")
            for n in sorted(n for n, w in EXPECTED.items() if w["group"] == g and w.get("assessed", True))[:2]]


def patient_id(fixture: str) -> str:
    entries = json.loads((FIXTURES_DIR / fixture).read_text())["entry"]
    return next(e["resource"]["id"] for e in entries if e["resource"]["resourceType"] == "Patient")


@pytest.fixture(scope="module")
def cds(server, tmp_path_factory):
    """The standalone service (sandbox mode: the JWT is tested in tests/unit) allowed to call SEKMET."""
    port = free_port()
    log = tmp_path_factory.mktemp("cds") / "cds.log"
    proc = subprocess.Popen([sys.executable, "-m", "clm_stratify", "cds-hooks", "--port", str(port),
                             "--fhir-url", server.base_url, "--cds-no-auth"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"cds-hooks did not start: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def prefetch_from(server_url: str, pid: str, keys=None) -> dict:
    """What a CDS client sends: each discovery template's answer from SEKMET (first page);
    ``assessment`` too unless ``keys`` are named."""
    out = {}
    with FhirClient(server_url) as fhir:
        for t in templates(RULES.terminology) + ([assessment_template(RULES.engine.ref.id)] if keys is None else []):
            if keys is not None and t.key not in keys:
                continue
            out[t.key] = fhir.read("Patient", pid) if t.params is None else next(fhir.search_pages(*t.query(pid)))
    return out


def call(url: str, pid: str, prefetch: dict | None = None, fhir_server: str | None = None,
         authorization: bool = True) -> requests.Response:
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": pid}}
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server:
        body["fhirServer"] = fhir_server
    if fhir_server and authorization:
        body["fhirAuthorization"] = {"access_token": "opaque-test-token", "token_type": "Bearer", "expires_in": 300,
                                     "scope": "user/*.read", "subject": "clm-stratify", "patient": pid}
    return requests.post(f"{url}/cds-services/{SERVICE_ID}", data=dumps(body), timeout=60,
                         headers={"Content-Type": "application/json"})


def last_source_line(log: Path) -> tuple[int, int]:
    """(prefetched, fetched) of the service's last logged call."""
    found = re.findall(r"prefetched (\d+), fetched (\d+)", log.read_text())
    assert found, log.read_text()[-2000:]
    return int(found[-1][0]), int(found[-1][1])


ID_ONLY = "only by identifier cannot be seen"


def same(a: dict, b: dict) -> bool:
    """The same cards, but for the one thing a prefetch cannot carry: resources naming the
    patient only by identifier (a warning when no FHIR server can be searched for them)."""
    def shown(c: dict) -> dict:
        lines = [x for x in c["detail"].splitlines() if x.strip() and ID_ONLY not in x and x != "**Warnings**"]
        return {"summary": c["summary"], "indicator": c["indicator"], "source": c["source"], "detail": lines}
    return [shown(c) for c in a["cards"]] == [shown(c) for c in b["cards"]]


def test_prefetch_and_fallback_give_the_same_cards_as_classify(server, cds):
    url, log = cds
    n_templates = len(templates(RULES.terminology))
    for fixture in BY_GROUP:
        pid = patient_id(fixture)
        prefetched = call(url, pid, prefetch_from(server.base_url, pid))
        assert prefetched.status_code == 200, prefetched.text
        assert last_source_line(log) == (n_templates, 0)
        fallback = call(url, pid, fhir_server=server.base_url)
        assert fallback.status_code == 200, fallback.text
        assert last_source_line(log) == (0, n_templates)
        assert same(prefetched.json(), fallback.json()), fixture
        assert ID_ONLY in prefetched.json()["cards"][0]["detail"]      # the fixtures' patients have identifiers
        assert ID_ONLY not in fallback.json()["cards"][0]["detail"]    # searched on SEKMET
        (card,) = fallback.json()["cards"]
        check_card(card)
        result = evaluate(read_bundle_file(FIXTURES_DIR / fixture), RULES, PatientRef(pid))
        assert result.group == EXPECTED[fixture]["group"]
        assert card["summary"] == f"CLM recurrence: {explain.headline(result)}", fixture


def test_partial_prefetch_searches_only_what_is_missing(server, cds):
    url, log = cds
    pid = patient_id("12-borderline-three-factors-adjuvant.json")
    full = call(url, pid, prefetch_from(server.base_url, pid)).json()
    keys = [t.key for t in templates(RULES.terminology)]
    partial = call(url, pid, prefetch_from(server.base_url, pid, keys=set(keys) - {"observation", "procedure"}),
                   fhir_server=server.base_url)
    assert partial.status_code == 200, partial.text
    assert last_source_line(log) == (len(keys) - 2, 2)
    assert same(full, partial.json())


def test_a_fhir_server_not_allowed_is_never_called(cds):
    url, _ = cds
    r = call(url, "f12-pat", fhir_server="http://127.0.0.1:9/fhir")
    assert r.status_code == 412
    assert "not one this service may call" in r.json()["issue"][0]["diagnostics"]


def test_a_missing_prefetch_without_fhir_server_is_412(server, cds):
    url, _ = cds
    pid = patient_id("12-borderline-three-factors-adjuvant.json")
    prefetch = prefetch_from(server.base_url, pid)
    del prefetch["condition"]
    r = call(url, pid, prefetch)
    assert r.status_code == 412 and "prefetch condition" in r.json()["issue"][0]["diagnostics"]


def test_the_card_links_the_written_assessment_once_it_says_the_same(server, cds):
    url, log = cds
    fixture = "05-borderline-size-50mm-exact.json"
    pid = patient_id(fixture)
    before = call(url, pid, fhir_server=server.base_url).json()["cards"][0]
    with FhirClient(server.base_url) as fhir:
        written = Stratifier(fhir, RULES).patient(PatientRef(pid))
    assert written.risk_assessment, written
    ra_id = assessment_id(f"Patient/{pid}", RULES.engine.ref.id)
    assert ra_id in written.risk_assessment
    after = call(url, pid, fhir_server=server.base_url).json()["cards"][0]
    assert "links" not in before and "not written to the FHIR server yet" in before["detail"]
    assert after["links"] == [{"label": "RiskAssessment on the FHIR server", "type": "absolute",
                               "url": f"{server.base_url}/RiskAssessment/{ra_id}"}]
    with FhirClient(server.base_url) as fhir:
        found = next(fhir.search_pages("RiskAssessment", {"_id": ra_id}))
    prefetch = {**prefetch_from(server.base_url, pid), "assessment": found}
    with_prefetch = call(url, pid, prefetch, fhir_server=server.base_url)
    assert with_prefetch.json()["cards"][0]["links"] == after["links"]   # the assessment from prefetch
    assert last_source_line(log) == (len(templates(RULES.terminology)), 0)
    # Prefetch alone cannot show resources named by identifier only: the card warns so, the
    # written assessment does not; that is the card's caveat, not a difference: the same.
    alone = call(url, pid, prefetch, fhir_server="http://127.0.0.1:9/fhir").json()["cards"][0]
    assert ID_ONLY in alone["detail"] and "says the same (linked below)" in alone["detail"]
    assert alone["links"] == [{"label": "RiskAssessment on the FHIR server", "type": "absolute",
                               "url": f"http://127.0.0.1:9/fhir/RiskAssessment/{ra_id}"}]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_cds_validator_accepts_our_responses_but_for_where_it_lags_2_0(server, cds, tmp_path):
    """cds-validator 0.3.0 was written for a pre-1.0 draft: exactly the differences listed
    in tests/support/cds_validator/README.md are reported, nothing else."""
    if not (VALIDATOR / "node_modules" / "cds-validator").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=VALIDATOR, check=True,
                       env={**os.environ}, timeout=300)
    url, _ = cds
    discovery = requests.get(f"{url}/cds-services", timeout=10).json()
    check_discovery(discovery)
    pid = patient_id("05-borderline-size-50mm-exact.json")
    cards = call(url, pid, fhir_server=server.base_url).json()

    def validate(kind: str, doc: dict) -> set[tuple[str, str]]:
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps(doc))
        out = subprocess.run(["node", str(VALIDATOR / "validate.js"), kind, str(path)], capture_output=True,
                             text=True, check=True, timeout=60)
        return {(e["property"], e["message"]) for e in json.loads(out.stdout)}

    assert validate("discovery", discovery) == {
        ("instance.services[0]", 'additionalProperty "title" exists in instance when not allowed'),
        ("instance.services[0]", 'additionalProperty "usageRequirements" exists in instance when not allowed'),
        ("instance.services[0].name", "is required")}
    assert "links" in cards["cards"][0]   # written by the test above: the link is validated too
    assert validate("card", cards) == {
        ("instance.cards[0]", 'additionalProperty "uuid" exists in instance when not allowed'),
        ("instance.cards[0].source", 'additionalProperty "topic" exists in instance when not allowed'),
        ("instance.cards[0].links[0]", 'additionalProperty "type" exists in instance when not allowed')}
    # The same responses down-converted to the draft it knows pass whole.
    old = {"services": [{"hook": s["hook"], "name": s["title"], "description": s["description"], "id": s["id"],
                         "prefetch": s["prefetch"]} for s in discovery["services"]]}
    assert validate("discovery", old) == set()
    old_cards = {"cards": [{**{k: v for k, v in c.items() if k not in ("uuid", "links")},
                            "source": {k: v for k, v in c["source"].items() if k != "topic"},
                            "links": [{"label": x["label"], "url": x["url"]} for x in c["links"]]}
                           for c in cards["cards"]]}
    assert validate("card", old_cards) == set()


def test_serve_mounts_the_service_beside_notify_and_a_sighup_reload_reaches_the_cards(server, tmp_path):
    """``serve --cds-hooks`` answers /cds-services on the receiver's port (/notify and
    /healthz still there), and the rule set a SIGHUP loads is the one the next card uses:
    f06 (largest tumour 49.9 mm) is resectable at 50 mm and borderline at 40 mm."""
    import signal

    from clm_stratify.service.cds_cards import md
    from rules import DEFAULT_RULESET
    from tests.support.receiver_process import Receiver

    def rules_with(threshold: int, version: str) -> None:
        data = yaml.safe_load(DEFAULT_RULESET.read_text())
        data["factors"]["largest_ge_50mm"]["threshold"] = threshold
        data["version"] = version
        rules.write_text(yaml.safe_dump(data, sort_keys=False))

    def card() -> dict:
        response = call(receiver.url, "f06-pat", fhir_server=server.base_url)
        assert response.status_code == 200, response.text
        return response.json()["cards"][0]

    rules = tmp_path / "rules.yaml"
    rules_with(50, "9.0.0")
    with Receiver(server.base_url, tmp_path / "inbox.sqlite", None, "--cds-hooks", "--cds-no-auth",
                  "--rules", str(rules)) as receiver:
        discovery = requests.get(f"{receiver.url}/cds-services", timeout=10)
        assert discovery.status_code == 200 and discovery.json()["services"][0]["id"] == SERVICE_ID
        assert receiver.health()["status"] in ("ok", "degraded")
        assert requests.post(receiver.endpoint, timeout=10).status_code == 401   # /notify still checks its secret
        first = card()
        assert first["summary"].startswith("CLM recurrence: Resectable"), first["summary"]
        assert md("9.0.0") in first["detail"]   # as the card writes it

        rules_with(40, "9.0.1")
        receiver.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded rule set" not in receiver.log.read_text():
            assert time.monotonic() < deadline, receiver.log.read_text()[-2000:]
            time.sleep(0.1)
        second = card()
        assert second["summary"].startswith("CLM recurrence: Borderline resectable"), second["summary"]
        assert md("9.0.1") in second["detail"]
    assert "Traceback" not in receiver.log.read_text()


def test_a_prefetch_the_client_says_was_cut_is_fetched_again_or_refused(server, cds):
    """The adversary's request: f11's Observations cut to one 9 mm lesion with an
    ``incomplete`` outcome. Without a FHIR server: 412 naming it (it was "Resectable").
    With SEKMET named (open: no fhirAuthorization, the spec makes it optional): the
    server's full answer, borderline as ``classify`` says."""
    url, log = cds
    pid = patient_id("11-borderline-count-and-size-no-adjuvant.json")
    prefetch = prefetch_from(server.base_url, pid)
    prefetch["observation"]["entry"] = [e for e in prefetch["observation"]["entry"]
                                        if e["resource"]["id"] == "f11-ct-les5"] + [
        {"resource": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "incomplete", "diagnostics": "search results truncated"}]},
         "search": {"mode": "outcome"}}]
    prefetch["observation"].pop("total", None)
    prefetch["observation"].pop("link", None)
    refused = call(url, pid, prefetch)
    assert refused.status_code == 412 and "search results truncated" in refused.json()["issue"][0]["diagnostics"]
    fetched = call(url, pid, prefetch, fhir_server=server.base_url, authorization=False)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["cards"][0]["summary"].startswith("CLM recurrence: Borderline resectable")
    assert last_source_line(log) == (len(templates(RULES.terminology)) - 1, 1)


def test_the_card_says_when_the_assessment_on_the_server_differs(server, cds):
    """Written by ``run``: ``same`` (linked). Changed on the server to resectable, as the
    adversary did with a PUT: ``differs``, linked as out of date and named. The
    ``assessment`` prefetch read with the discovery template finds it without a FHIR
    server: SEKMET ignores both ``subject`` and ``identifier`` on RiskAssessment (warnings)
    and returns every assessment; only ours (identifier and subject) counts, linked by its
    entry's ``fullUrl`` when no FHIR server is named. (Prefetch alone cannot see resources
    named by identifier only, so its card warns of that and the written one does not: a
    caveat of the card, not a difference.)"""
    url, _ = cds
    pid = patient_id("11-borderline-count-and-size-no-adjuvant.json")
    with FhirClient(server.base_url) as fhir:
        for other in ("01-resectable-single-small.json", "13-unresectable-final-extensive.json"):
            Stratifier(fhir, RULES).patient(PatientRef(patient_id(other)))   # more assessments on the server
        assert Stratifier(fhir, RULES).patient(PatientRef(pid)).risk_assessment
    ra_id = assessment_id(f"Patient/{pid}", RULES.engine.ref.id)
    link = f"{server.base_url}/RiskAssessment/{ra_id}"
    same_card = call(url, pid, fhir_server=server.base_url, authorization=False).json()["cards"][0]
    assert same_card["links"] == [{"label": "RiskAssessment on the FHIR server", "type": "absolute", "url": link}]
    assert "says the same (linked below)" in same_card["detail"]

    with FhirClient(server.base_url) as fhir:
        template = assessment_template(RULES.engine.ref.id)
        found = next(fhir.search_pages(*template.query(pid)))
        ids = [e["resource"]["id"] for e in found["entry"] if e["search"]["mode"] == "match"]
        assert ra_id in ids and len(ids) >= 3 and "next" not in [x["relation"] for x in found.get("link", [])]
        prefetch = {**prefetch_from(server.base_url, pid), "assessment": found}
        written = fhir.read("RiskAssessment", ra_id)
        written["prediction"][0]["qualitativeRisk"]["text"] = "Resectable"
        written["prediction"][0]["qualitativeRisk"]["coding"][0].update(code="resectable", display="Resectable")
        fhir.update(written)
    full_url = next(e["fullUrl"] for e in found["entry"] if e["resource"]["id"] == ra_id)
    assert full_url.startswith(server.base_url)
    alone = call(url, pid, prefetch).json()["cards"][0]   # the prefetch read before the change
    assert ID_ONLY in alone["detail"] and "says the same (linked below)." in alone["detail"]
    assert alone["links"] == [{"label": "RiskAssessment on the FHIR server", "type": "absolute", "url": full_url}]
    with FhirClient(server.base_url) as fhir:
        changed = {**prefetch, "assessment": next(fhir.search_pages(*template.query(pid)))}
    alone = call(url, pid, changed).json()["cards"][0]
    assert "says Resectable (preliminary) and differs from this card (linked below, out of date)" in alone["detail"]
    assert alone["links"] == [{"label": "RiskAssessment on the FHIR server (out of date)", "type": "absolute",
                               "url": full_url}]
    differs = call(url, pid, fhir_server=server.base_url, authorization=False).json()["cards"][0]
    assert differs["summary"].startswith("CLM recurrence: Borderline resectable")
    assert differs["links"] == [{"label": "RiskAssessment on the FHIR server (out of date)", "type": "absolute",
                                 "url": link}]
    assert "says Resectable" in differs["detail"] and "differs from this card" in differs["detail"]


def test_the_service_alone_over_http_head_and_other_paths(cds):
    """Through uvicorn: HEAD on discovery is GET without the body; a path no route takes
    (a browser's /favicon.ico) and an unknown service are OperationOutcome 404s."""
    url, _ = cds
    got, head = requests.get(f"{url}/cds-services", timeout=10), requests.head(f"{url}/cds-services", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    for path in ("/favicon.ico", "/x", "/cds-services/nope"):
        r = requests.get(f"{url}{path}", timeout=10)
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome", (path, r.text)


def test_the_servers_capabilities_are_read_once_not_at_every_chart_opening(server):
    """Each call gets its own FHIR client (the request's token); the CapabilityStatement the
    assessment lookup needs is cached per server (a real EHR's can be hundreds of kB)."""
    from fastapi.testclient import TestClient

    from clm_stratify.service.cds_hooks import CdsConfig, create_cds_app
    from tests.support.rewrite_proxy import RewriteProxy

    with RewriteProxy(server.base_url) as proxy:
        config = CdsConfig(public_url="http://127.0.0.1:1", verifier=None, fhir_servers=(proxy.base_url,))
        app = TestClient(create_cds_app(config, lambda: RULES))
        pid = patient_id(BY_GROUP[0])
        body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": proxy.base_url,
                "context": {"userId": "Practitioner/example", "patientId": pid}}
        for _ in range(3):
            r = app.post(f"/cds-services/{SERVICE_ID}", json={**body, "hookInstance": str(uuid.uuid4())})
            assert r.status_code == 200 and r.json()["cards"], r.text
        metadata = [pq for method, pq in proxy.requests if pq.split("?")[0].rstrip("/").endswith("/metadata")]
        assert len(metadata) == 1, proxy.requests
