"""The CDS Hooks service in process (FastAPI's TestClient, no server process): request
checks and their status codes, the JWT, discovery, prefetch shapes, cards per group.
The FHIR-server fallback is in tests/integration/test_cds_hooks.py."""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient

from clm_stratify.pipeline import Rules, evaluate
from clm_stratify.service.cds_auth import JwtVerifier
from clm_stratify.service.cds_hooks import SERVICE_ID, CdsConfig, create_cds_app
from clm_stratify.service.cds_prefetch import templates
from engine import explain
from fhir_adapters.sources.bundle import read_bundle_file
from fixtures import FIXTURES_DIR
from tests.support.cds_validator.spec_checks import check_card, check_discovery

DATA = Path(__file__).resolve().parents[1] / "data" / "cds_hooks"
EXPECTED = yaml.safe_load((FIXTURES_DIR / "expected.yaml").read_text())
BASE = "http://cds.test"
ISS = "https://ehr.test/"
RULES = Rules.load()
ID_ONLY = "only by identifier cannot be seen"


def prefetch_of(fixture: str) -> tuple[str, dict]:
    """(patient id, a full prefetch) built from a fixture Bundle: each template's resources
    in a searchset Bundle; Medications and BodyStructures as ``include`` entries."""
    entries = json.loads((FIXTURES_DIR / fixture).read_text())["entry"]
    resources = [e["resource"] for e in entries]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    out: dict = {}
    for t in templates(RULES.terminology):
        if t.params is None:
            out[t.key] = patient
            continue
        matches = [{"resource": r, "search": {"mode": "match"}} for r in resources if r["resourceType"] == t.rtype]
        if t.rtype == "MedicationAdministration":
            matches += [{"resource": r, "search": {"mode": "include"}} for r in resources
                        if r["resourceType"] in ("Medication", "BodyStructure")]
        out[t.key] = {"resourceType": "Bundle", "type": "searchset", "entry": matches} if matches else None
    return patient["id"], out


def request(patient_id: str, prefetch: dict | None = None, **extra) -> dict:
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/example", "patientId": patient_id}, **extra}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


@pytest.fixture(scope="module")
def sandbox() -> TestClient:
    return TestClient(create_cds_app(CdsConfig(public_url=BASE, verifier=None), lambda: RULES))


@pytest.fixture(scope="module")
def keys():
    return {"RS384": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES384": ec.generate_private_key(ec.SECP384R1())}


@pytest.fixture(scope="module")
def secured(keys) -> TestClient:
    jwks = {"keys": []}
    for alg, key in keys.items():
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": alg, "alg": alg, "use": "sig"})
    verifier = JwtVerifier({ISS: jwt.PyJWKSet.from_dict(jwks)})
    return TestClient(create_cds_app(CdsConfig(public_url=BASE, verifier=verifier), lambda: RULES))


def token(keys, alg="ES384", aud=f"{BASE}/cds-services/{SERVICE_ID}", **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISS, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, keys[alg], algorithm=alg, headers={"kid": alg, "typ": "JWT"})


def post(client: TestClient, body, auth: str | None = None, service: str = SERVICE_ID):
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    return client.post(f"/cds-services/{service}", json=body, headers=headers)


# --------------------------------------------------------------------------- discovery
def test_discovery_lists_the_service_with_the_pipelines_searches(sandbox):
    body = sandbox.get("/cds-services").json()
    check_discovery(body)
    (service,) = body["services"]
    assert service["hook"] == "patient-view" and service["id"] == SERVICE_ID
    prefetch = service["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    for t in templates(RULES.terminology):   # every search of `run`, with the id a token
        assert prefetch[t.key].startswith(f"{t.rtype}") and "{{context.patientId}}" in prefetch[t.key]
    assert "code=http://loinc.org|21889-1" in prefetch["observation"]
    # The product's own lookup order: the patient first, then our identifier.
    assert prefetch["assessment"].startswith("RiskAssessment?subject=Patient/{{context.patientId}}&identifier=")


def test_our_checks_accept_the_specifications_own_examples():
    check_discovery(json.loads((DATA / "spec-discovery.json").read_text()))
    for c in json.loads((DATA / "spec-response.json").read_text())["cards"]:
        check_card(c)
    # The spec's autolaunchable example leaves out `indicator`, which its own table makes
    # REQUIRED: with it added, the card passes.
    (auto,) = json.loads((DATA / "spec-response-autolaunchable.json").read_text())["cards"]
    with pytest.raises(AssertionError):
        check_card(auto)
    check_card({**auto, "indicator": "info"})


# --------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("mutate, status, says", [
    (lambda b: b.pop("hookInstance"), 400, "hookInstance"),
    (lambda b: b.update(hook="order-sign"), 400, "patient-view only"),
    (lambda b: b["context"].pop("patientId"), 400, "context.patientId"),
    (lambda b: b["context"].update(patientId="../Patient/x"), 400, "context.patientId"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "user/*.read", "subject": "s"}), 400, "without fhirServer"),
    (lambda b: b.update(fhirServer="http://127.0.0.1:1/fhir", fhirAuthorization={
        "access_token": "t", "token_type": "MAC", "expires_in": 300, "scope": "s", "subject": "s"}), 400, "Bearer"),
    (lambda b: b.update(context=["not", "an", "object"]), 400, "context"),
    (lambda b: b["prefetch"].update(condition=[1, 2]), 400, "prefetch condition"),
    (lambda b: b["prefetch"].update(condition={"resourceType": "Bundle", "type": "collection", "entry": []}),
     400, "searchset"),
    (lambda b: b["prefetch"].update(patient={"resourceType": "Patient", "id": "someone-else"}), 400, "someone-else"),
    (lambda b: b["prefetch"].pop("observation"), 412, "prefetch observation"),
])
def test_bad_requests_get_the_specs_status_with_a_reason(sandbox, mutate, status, says):
    pid, prefetch = prefetch_of("12-borderline-three-factors-adjuvant.json")
    body = request(pid, prefetch)
    mutate(body)
    r = post(sandbox, body)
    assert r.status_code == status, r.text
    assert says in r.json()["issue"][0]["diagnostics"]


def test_malformed_json_unknown_service_and_wrong_media_type(sandbox):
    assert sandbox.post(f"/cds-services/{SERVICE_ID}", content=b"{not json",
                        headers={"Content-Type": "application/json"}).status_code == 400
    assert sandbox.post(f"/cds-services/{SERVICE_ID}", content=b"x", headers={"Content-Type": "text/plain"}
                        ).status_code == 415
    r = post(sandbox, request("p1", {}), service="no-such-service")
    assert r.status_code == 404 and SERVICE_ID in r.json()["issue"][0]["diagnostics"]


def test_the_specifications_example_request_is_refused_412_not_guessed(sandbox):
    """The spec's request prefetches only a Patient and names a FHIR server this service
    may not call: the record would be partial, so 412, never a card."""
    body = json.loads((DATA / "spec-request-patient-view.json").read_text())
    r = post(sandbox, body)
    assert r.status_code == 412
    assert "not one this service may call" in r.json()["issue"][0]["diagnostics"]


# --------------------------------------------------------------------------- the JWT
def test_a_five_minute_jwt_with_a_jku_header_is_accepted_and_jku_never_fetched(secured, keys):
    """Epic and others send ``jku``: accepted, the key taken from the registered set only
    (the URL is a closed loopback port: fetching it would fail the call)."""
    pid, prefetch = prefetch_of("02-resectable-final-two-lesions.json")
    now = int(time.time())
    payload = {"iss": ISS, "aud": f"{BASE}/cds-services/{SERVICE_ID}", "exp": now + 300 + 50, "iat": now,
               "jti": str(uuid.uuid4())}
    auth = jwt.encode(payload, keys["ES384"], algorithm="ES384",
                      headers={"kid": "ES384", "typ": "JWT", "jku": "http://127.0.0.1:9/jwks.json"})
    assert post(secured, request(pid, prefetch), auth).status_code == 200


def test_a_valid_jwt_is_accepted_for_each_algorithm(secured, keys):
    pid, prefetch = prefetch_of("02-resectable-final-two-lesions.json")
    for alg in ("RS384", "ES384"):
        assert post(secured, request(pid, prefetch), token(keys, alg)).status_code == 200
    assert secured.get("/cds-services", headers={
        "Authorization": f"Bearer {token(keys, aud=f'{BASE}/cds-services')}"}).status_code == 200


@pytest.mark.parametrize("case", ["none", "garbage", "wrong-aud", "expired", "future-iat", "no-jti", "other-iss",
                                  "unknown-kid", "hmac", "alg-none", "replay", "discovery-without",
                                  "exp-31-years", "exp-7-minutes", "exp-string", "iat-string", "exp-fraction",
                                  "exp-boolean"])
def test_jwt_problems_are_401(secured, keys, case):
    pid, prefetch = prefetch_of("02-resectable-final-two-lesions.json")
    now = int(time.time())
    auth = {"none": None, "garbage": "abc.def.ghi",
            "wrong-aud": token(keys, aud=f"{BASE}/cds-services/other"),
            "expired": token(keys, exp=now - 120, iat=now - 400),
            "future-iat": token(keys, iat=now + 600, exp=now + 900),
            "no-jti": token(keys, jti=None), "other-iss": token(keys, iss="https://evil.test/"),
            "hmac": jwt.encode({"iss": ISS, "aud": f"{BASE}/cds-services/{SERVICE_ID}", "exp": now + 60,
                                "iat": now, "jti": "x"}, "secret" * 8, algorithm="HS256", headers={"kid": "ES384"}),
            "alg-none": jwt.encode({"iss": ISS, "aud": f"{BASE}/cds-services/{SERVICE_ID}", "exp": now + 60,
                                    "iat": now, "jti": "y"}, None, algorithm="none", headers={"kid": "ES384"}),
            # Short-lived: at most 5 minutes (+60 s leeway) after iat and now; integers only.
            "exp-31-years": token(keys, exp=now + 31 * 365 * 86400),
            "exp-7-minutes": token(keys, exp=now + 420),
            "exp-string": token(keys, exp=str(now + 60)),
            "iat-string": token(keys, iat=str(now)),
            "exp-fraction": token(keys, exp=now + 60.5),
            "exp-boolean": token(keys, exp=True),
            }.get(case)
    if case == "unknown-kid":
        auth = jwt.encode({"iss": ISS, "aud": f"{BASE}/cds-services/{SERVICE_ID}", "exp": now + 60, "iat": now,
                           "jti": str(uuid.uuid4())}, keys["ES384"], algorithm="ES384", headers={"kid": "nope"})
    if case == "replay":
        auth = token(keys)
        assert post(secured, request(pid, prefetch), auth).status_code == 200
    if case == "discovery-without":
        r = secured.get("/cds-services")
    else:
        r = post(secured, request(pid, prefetch), auth)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    said = r.json()["issue"][0]["diagnostics"]
    if case.startswith(("exp-", "iat-")):
        assert ("short-lived" if case in ("exp-31-years", "exp-7-minutes") else "not an integer") in said, said


# --------------------------------------------------------------------------- prefetch shapes
def test_null_without_a_fhir_server_is_no_data_and_outcome_is_refused(sandbox):
    pid, prefetch = prefetch_of("12-borderline-three-factors-adjuvant.json")
    prefetch["diagnosticReport"] = None
    assert post(sandbox, request(pid, prefetch)).status_code == 200
    prefetch["condition"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    r = post(sandbox, request(pid, prefetch))
    assert r.status_code == 412 and "OperationOutcome" in r.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("damage", ["next-link", "total-beyond-entries", "error-outcome-entry"])
def test_an_incomplete_prefetched_bundle_is_never_classified_alone(sandbox, damage):
    pid, prefetch = prefetch_of("12-borderline-three-factors-adjuvant.json")
    bundle = prefetch["observation"]
    if damage == "next-link":
        bundle["link"] = [{"relation": "next", "url": "http://127.0.0.1:1/fhir/Observation?page=2"}]
    elif damage == "total-beyond-entries":
        bundle["total"] = len(bundle["entry"]) + 1
    else:
        bundle["entry"].append({"resource": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "too-costly"}]}, "search": {"mode": "outcome"}})
    assert post(sandbox, request(pid, prefetch)).status_code == 412


def test_a_referenced_medication_missing_from_prefetch_is_412(sandbox):
    """Fixture 32 points at BodyStructures (Observation.focus) that a prefetch can only
    carry as included resources: without them and without a FHIR server, 412."""
    pid, prefetch = prefetch_of("32-mcode-adapted-tumor-focus.json")
    assert post(sandbox, request(pid, copy.deepcopy(prefetch))).status_code == 200
    entries = prefetch["medicationAdministration"]["entry"]
    prefetch["medicationAdministration"]["entry"] = [e for e in entries if e["search"]["mode"] == "match"]
    r = post(sandbox, request(pid, prefetch))
    assert r.status_code == 412 and "BodyStructure?_id=" in r.json()["issue"][0]["diagnostics"]


def test_resources_of_another_patient_in_prefetch_are_not_this_patients(sandbox):
    """Fixture 43 mixes in another patient's measurements; the card must match `classify`
    of the fixture (which refuses them) and name them in the warnings."""
    pid, prefetch = prefetch_of("43-other-patient-resources-mixed-in.json")
    (c,) = post(sandbox, request(pid, prefetch)).json()["cards"]
    result = evaluate(read_bundle_file(FIXTURES_DIR / "43-other-patient-resources-mixed-in.json"), RULES)
    assert result.group == EXPECTED["43-other-patient-resources-mixed-in.json"]["group"]
    assert c["summary"] == f"CLM recurrence: {explain.headline(result)}"


# --------------------------------------------------------------------------- cards
GROUP_FIXTURES = {g: sorted(n for n, w in EXPECTED.items() if w["group"] == g and w.get("assessed", True))[:3]
                  for g in ("resectable", "borderline-resectable", "unresectable", "indeterminate")}


@pytest.mark.parametrize("fixture", [n for names in GROUP_FIXTURES.values() for n in names])
def test_card_says_what_classify_says(sandbox, fixture):
    pid, prefetch = prefetch_of(fixture)
    r = post(sandbox, request(pid, prefetch))
    assert r.status_code == 200, r.text
    (c,) = r.json()["cards"]
    check_card(c)
    result = evaluate(read_bundle_file(FIXTURES_DIR / fixture), RULES)
    assert result.group == EXPECTED[fixture]["group"]
    assert c["summary"] == f"CLM recurrence: {explain.headline(result)}"
    assert c["indicator"] == ("info" if result.group == "resectable" and result.status == "final" else "warning")
    assert c["indicator"] == RULES.engine.ruleset.card_indicators[result.group][result.status]
    assert c["source"]["url"] == f"https://doi.org/{result.ruleset.doi}"
    # No FHIR server and no assessment prefetch: the card cannot tell, and says so.
    assert "links" not in c and "could not check whether one is on the FHIR server" in c["detail"]
    for rec in result.recommendations:
        assert rec.text.split()[0] in c["detail"]


def test_no_recurrence_gives_no_card(sandbox):
    name = next(n for n, w in EXPECTED.items() if w.get("assessed") is False)
    pid, prefetch = prefetch_of(name)
    assert post(sandbox, request(pid, prefetch)).json() == {"cards": []}


def test_hostile_strings_in_a_record_cannot_inject_markdown_or_html():
    """A Condition id and an unreadable resource's text reach the detail (evidence and
    warnings); rendered as GitHub Flavored Markdown they stay text."""
    import cmarkgfm   # in the [test] extra: rendered as an EHR renders card markdown
    from clm_stratify.service.cds_cards import card, md

    hostile = "<img src=x onerror=alert(1)> [click](http://evil.example) www.evil.example **bold** `code` | a |"
    rendered = cmarkgfm.github_flavored_markdown_to_html(f"- {md(hostile)}")
    assert "<img" not in rendered and "<a " not in rendered and "<strong>" not in rendered and "<code>" not in rendered
    fixture = json.loads((FIXTURES_DIR / "13-unresectable-final-extensive.json").read_text())
    for e in fixture["entry"]:
        if e["resource"]["resourceType"] == "Condition":
            e["resource"]["id"] = "x-www.evil.example"
    from fhir_adapters.sources.record import PatientRecord
    result = evaluate(PatientRecord.from_resources([e["resource"] for e in fixture["entry"]]), RULES)
    html = cmarkgfm.github_flavored_markdown_to_html(card(result, RULES.engine.ruleset)["detail"])
    assert "<a " not in html and "www.evil.example" in html


def test_summary_is_under_140_characters_for_every_group_label():
    from clm_stratify.service.cds_cards import SUMMARY_PREFIX

    for fixture in (n for names in GROUP_FIXTURES.values() for n in names):
        result = evaluate(read_bundle_file(FIXTURES_DIR / fixture), RULES)
        assert len(SUMMARY_PREFIX + explain.headline(result)) < 140


# --------------------------------------------------------------------------- CORS
def test_cors_allows_only_the_listed_browser_clients_and_never_skips_authentication(keys):
    """Browser-based CDS clients need CORS (the spec's security section); only the origins
    given with --cds-cors-origin are allowed, and a preflight does not authenticate a call."""
    jwks = {"keys": []}
    key = keys["ES384"]
    jwk = json.loads(jwt.algorithms.get_default_algorithms()["ES384"].to_jwk(key.public_key()))
    jwks["keys"].append({**jwk, "kid": "ES384", "alg": "ES384", "use": "sig"})
    config = CdsConfig(public_url=BASE, verifier=JwtVerifier({ISS: jwt.PyJWKSet.from_dict(jwks)}),
                       cors_origins=("https://sandbox.cds-hooks.org",))
    client = TestClient(create_cds_app(config, lambda: RULES))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = client.options(f"/cds-services/{SERVICE_ID}", headers={"Origin": "https://sandbox.cds-hooks.org", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
    other = client.options(f"/cds-services/{SERVICE_ID}", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    unauthenticated = client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert unauthenticated.status_code == 401
    good = client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org",
                                                "Authorization": f"Bearer {token(keys, aud=f'{BASE}/cds-services')}"})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "https://sandbox.cds-hooks.org"
    # Without origins configured, no CORS header at all.
    plain = TestClient(create_cds_app(CdsConfig(public_url=BASE, verifier=None), lambda: RULES))
    assert "access-control-allow-origin" not in plain.get("/cds-services", headers={"Origin": "https://x.example"}).headers


# --------------------------------------------------------------------------- a prefetch that says it was cut
def cut_to_one_lesion(prefetch: dict) -> dict:
    """The adversary's prefetch: fixture 11's Observations cut to its one 9 mm lesion, no
    total, no next link, and an ``incomplete`` warning outcome."""
    entries = [e for e in prefetch["observation"]["entry"] if e["resource"]["id"] == "f11-ct-les5"]
    entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "warning", "code": "incomplete", "diagnostics": "search results truncated"}]},
        "search": {"mode": "outcome"}})
    return {**prefetch, "observation": {"resourceType": "Bundle", "type": "searchset", "entry": entries}}


def test_a_prefetch_whose_outcome_says_it_was_cut_is_412_not_resectable(sandbox):
    pid, prefetch = prefetch_of("11-borderline-count-and-size-no-adjuvant.json")
    r = post(sandbox, request(pid, cut_to_one_lesion(prefetch)))
    assert r.status_code == 412, r.text
    said = r.json()["issue"][0]["diagnostics"]
    assert "prefetch observation" in said and "search results truncated" in said and "incomplete" in said


def test_a_prefetch_with_an_ignored_parameter_warning_is_used(sandbox):
    pid, prefetch = prefetch_of("11-borderline-count-and-size-no-adjuvant.json")
    prefetch["observation"]["entry"].append({"resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "warning", "code": "not-supported", "diagnostics": "Unknown parameter 'x'; ignored"}]},
        "search": {"mode": "outcome"}})
    (c,) = post(sandbox, request(pid, prefetch)).json()["cards"]
    assert c["summary"].startswith("CLM recurrence: Borderline resectable")


# --------------------------------------------------------------------------- the RiskAssessment on the server
def _current_ra(pid: str, prefetch: dict, **extra) -> dict:
    """The RiskAssessment of the record the service reads from exactly this request."""
    from clm_stratify.service.cds_hooks import _client, parse_request
    from clm_stratify.service.cds_prefetch import Prefetch
    from fhir_adapters.fhir.reference import PatientRef
    from fhir_adapters.writeback.resources import build_risk_assessment

    _, why = _client(CdsConfig(public_url=BASE, verifier=None), parse_request(request(pid, prefetch, **extra)))
    p = Prefetch(RULES.terminology, PatientRef(pid), copy.deepcopy(prefetch), None, why)
    p.gather()
    from fhir_adapters.fhir.codec import dumps
    return json.loads(dumps(build_risk_assessment(evaluate(p.record(None), RULES, PatientRef(pid)))))


def _searchset(*resources, **extra) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources], **extra}


def _resectable(ra: dict) -> dict:
    """``ra`` as the adversary changed it on the server: group resectable."""
    changed = copy.deepcopy(ra)
    changed["prediction"][0]["qualitativeRisk"] = {"coding": [{"system": "urn:x", "code": "resectable"}],
                                                   "text": "Resectable"}
    return changed


@pytest.mark.parametrize("case, says, link", [
    ("same-no-server", "the one on the FHIR server says the same (not linked: neither fhirServer nor an absolute "
                       "fullUrl in the assessment prefetch locates it).", None),
    ("same-named-server", "the one on the FHIR server says the same (linked below).",
     "RiskAssessment on the FHIR server"),
    ("differs", "says Resectable (preliminary) and differs from this card (linked below, out of date)",
     "RiskAssessment on the FHIR server (out of date)"),
    ("none", "not written to the FHIR server yet", None),
    ("none-other-patients-only", "not written to the FHIR server yet", None),
    ("unknown-paged", "could not check whether one is on the FHIR server", None),
    ("unknown-cut", "could not check whether one is on the FHIR server", None),
    ("unknown-duplicates", "could not check whether one is on the FHIR server", None),
    ("unknown-not-sent", "could not check whether one is on the FHIR server", None),
])
def test_the_card_says_what_it_knows_of_the_assessment_on_the_server(sandbox, case, says, link):
    """Each state from the ``assessment`` prefetch alone (no FHIR server the service may call)."""
    pid, prefetch = prefetch_of("12-borderline-three-factors-adjuvant.json")
    extra = {}
    if case in ("same-named-server", "differs"):
        extra["fhirServer"] = "http://127.0.0.1:9/fhir"   # named, not one the service may call
    ra = _current_ra(pid, prefetch, **extra)
    ra["id"] = "ra-1"
    other = {**copy.deepcopy(ra), "id": "ra-2", "subject": {"reference": "Patient/someone-else"}}
    assessment = {
        "same-no-server": _searchset(ra), "same-named-server": _searchset(ra),
        "differs": _searchset(_resectable(ra)), "none": _searchset(), "none-other-patients-only": _searchset(other),
        "unknown-paged": _searchset(other, link=[{"relation": "next", "url": "http://127.0.0.1:9/fhir/x"}]),
        "unknown-cut": {**_searchset(), "entry": [{"search": {"mode": "outcome"}, "resource": {
            "resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "too-costly"}]}}]},
        "unknown-duplicates": _searchset(ra, {**ra, "id": "ra-3"}),
    }.get(case)
    if assessment is not None:
        prefetch["assessment"] = assessment
    r = post(sandbox, request(pid, prefetch, **extra))
    assert r.status_code == 200, r.text
    (c,) = r.json()["cards"]
    assert says in c["detail"], c["detail"].splitlines()[-1]
    if link is None:
        assert "links" not in c
    else:
        assert c["links"] == [{"label": link, "url": "http://127.0.0.1:9/fhir/RiskAssessment/ra-1",
                               "type": "absolute"}]


@pytest.mark.parametrize("change, says, link", [
    ("none", "the one on the FHIR server says the same (linked below).", "RiskAssessment on the FHIR server"),
    ("group", "says Borderline resectable (preliminary) and differs from this card (linked below, out of date)",
     "RiskAssessment on the FHIR server (out of date)"),
    ("basis", "says Resectable (preliminary) and differs from this card (linked below, out of date)",
     "RiskAssessment on the FHIR server (out of date)"),
    ("relative-fullUrl", "says the same (not linked: neither fhirServer nor an absolute fullUrl", None),
])
def test_the_assessment_run_wrote_is_the_same_though_the_prefetch_card_has_a_warning(sandbox, change, says, link):
    """The adversary's case: the prefetch of f06 (no fhirServer: the card warns that
    resources naming the patient only by identifier cannot be seen) with the RiskAssessment
    ``run`` writes for the whole record (no such warning), found by its ``fullUrl``. The
    warning is the card's caveat, not a difference; a changed group or an extra basis
    resource on the server is one."""
    fixture = "06-resectable-size-49-9mm.json"
    pid, prefetch = prefetch_of(fixture)
    from fhir_adapters.fhir.codec import dumps
    from fhir_adapters.writeback.resources import build_risk_assessment
    ra = json.loads(dumps(build_risk_assessment(evaluate(read_bundle_file(FIXTURES_DIR / fixture), RULES))))
    assert not any("Data warning" in n["text"] for n in ra["note"])
    if change == "group":
        risk = ra["prediction"][0]["qualitativeRisk"]
        risk["coding"][0].update(code="borderline-resectable", display="Borderline resectable")
        risk["text"] = "Borderline resectable"
    if change == "basis":
        ra["basis"].append({"reference": "Observation/not-in-this-record"})
    url = (f"RiskAssessment/{ra['id']}" if change == "relative-fullUrl"
           else f"http://127.0.0.1:9/fhir/RiskAssessment/{ra['id']}")
    prefetch["assessment"] = {**_searchset(), "entry": [{"fullUrl": url, "resource": ra, "search": {"mode": "match"}}]}
    r = post(sandbox, request(pid, prefetch))
    assert r.status_code == 200, r.text
    (c,) = r.json()["cards"]
    assert c["summary"] == "CLM recurrence: Resectable (preliminary)" and ID_ONLY in c["detail"]
    assert says in c["detail"], c["detail"].splitlines()[-1]
    assert c.get("links") == ([{"label": link, "url": url, "type": "absolute"}] if link else None)


# --------------------------------------------------------------------------- feedback, 404 and 405
FEEDBACK = [
    {"feedback": [{"card": "4e0a3a1e-3283-4575-ab82-028d55fe2719", "outcome": "accepted",
                   "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
                   "outcomeTimestamp": "2021-12-11T10:05:31Z"}]},
    {"feedback": [{"card": "f6b95768-b1c8-40dc-8385-bf3504b82ffb", "outcome": "overridden",
                   "outcomeTimestamp": "2020-12-11T00:00:00Z"}]},
    {"feedback": [{"card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "overridden",
                   "overrideReason": {"reason": {"code": "d7ecf885",
                                                 "system": "https://example.com/cds-hooks/override-reason-system"},
                                      "userComment": "A comment entered by the clinician."},
                   "outcomeTimestamp": "2020-12-11T00:00:00Z"}]},
]


@pytest.mark.parametrize("body", FEEDBACK)
def test_the_specifications_feedback_examples_are_accepted_and_only_counted(sandbox, body, caplog):
    with caplog.at_level("INFO", logger="clm_stratify.service.cds_hooks"):
        r = sandbox.post(f"/cds-services/{SERVICE_ID}/feedback", json=body)
    assert r.status_code == 200, r.text
    assert "CDS feedback: 1 " in caplog.text and body["feedback"][0]["card"] not in caplog.text
    assert "A comment" not in caplog.text


@pytest.mark.parametrize("mutate, says", [
    (lambda b: b.pop("feedback"), "feedback: Field required"),
    (lambda b: b["feedback"][0].pop("card"), "card"),
    (lambda b: b["feedback"][0].update(outcome="ignored"), "outcome"),
    (lambda b: b["feedback"][0].update(outcomeTimestamp="yesterday"), "outcomeTimestamp"),
    (lambda b: b["feedback"][0].update(outcomeTimestamp="2021-12-11T10:05:31+02:00"), "UTC"),
    (lambda b: b["feedback"][0].update(acceptedSuggestions=[{"uuid": "x"}]), "acceptedSuggestions.0.id"),
])
def test_malformed_feedback_is_400_naming_the_problem(sandbox, mutate, says):
    body = copy.deepcopy(FEEDBACK[0])
    mutate(body)
    r = sandbox.post(f"/cds-services/{SERVICE_ID}/feedback", json=body)
    assert r.status_code == 400 and says in r.json()["issue"][0]["diagnostics"], r.text


def test_feedback_needs_the_jwt_of_its_own_url(secured, keys):
    url = f"/cds-services/{SERVICE_ID}/feedback"
    assert secured.post(url, json=FEEDBACK[1]).status_code == 401
    ok = token(keys, aud=f"{BASE}{url}")
    assert secured.post(url, json=FEEDBACK[1], headers={"Authorization": f"Bearer {ok}"}).status_code == 200
    wrong = token(keys)   # the call's audience, not the feedback's
    assert secured.post(url, json=FEEDBACK[1], headers={"Authorization": f"Bearer {wrong}"}).status_code == 401


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", f"/cds-services/{SERVICE_ID}", 405, "POST"),
    ("HEAD", f"/cds-services/{SERVICE_ID}", 405, "POST"),
    ("GET", "/cds-services/nope", 404, None),
    ("GET", "/cds-services/nope/feedback", 404, None),
    ("PUT", f"/cds-services/{SERVICE_ID}", 405, "POST"),
    ("GET", f"/cds-services/{SERVICE_ID}/feedback", 405, "POST"),
    ("POST", "/cds-services", 405, "GET, HEAD"),
    ("DELETE", "/cds-services", 405, "GET, HEAD"),
    ("POST", "/cds-services/other/feedback", 404, None),
    ("GET", "/cds-services/a/b/c", 404, None),
    ("GET", "/cds-services/", 404, None),
])
def test_every_other_route_under_cds_services_answers_an_operation_outcome(sandbox, method, path, status, allow):
    r = sandbox.request(method, path, json={} if method in ("POST", "PUT") else None)
    assert r.status_code == status, r.text
    assert r.headers.get("allow") == allow
    assert method == "HEAD" or r.json()["resourceType"] == "OperationOutcome"


def test_head_on_discovery_is_get_without_the_body(sandbox, secured):
    got, head = sandbox.get("/cds-services"), sandbox.head("/cds-services")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]
    assert secured.head("/cds-services").status_code == 401   # authenticated like GET


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/x", 404, None), ("GET", "/favicon.ico", 404, None), ("POST", "/", 404, None),
    ("POST", "/healthz", 405, "GET, HEAD"),
])
def test_the_service_alone_answers_other_paths_with_an_operation_outcome(sandbox, method, path, status, allow):
    r = sandbox.request(method, path)
    assert r.status_code == status and r.json()["resourceType"] == "OperationOutcome", r.text
    assert sorted(filter(None, (r.headers.get("allow") or "").split(", "))) == sorted(allow.split(", ") if allow else [])


def test_accepted_without_suggestions_is_taken_our_cards_have_none(sandbox, caplog):
    body = copy.deepcopy(FEEDBACK[0])
    del body["feedback"][0]["acceptedSuggestions"]
    with caplog.at_level("INFO", logger="clm_stratify.service.cds_hooks"):
        assert sandbox.post(f"/cds-services/{SERVICE_ID}/feedback", json=body).status_code == 200
        body["feedback"][0]["acceptedSuggestions"] = []
        assert sandbox.post(f"/cds-services/{SERVICE_ID}/feedback", json=body).status_code == 200
    assert caplog.text.count("CDS feedback: 1 accepted") == 2
