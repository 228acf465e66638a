"""``clm-stratify interop`` against a real SEKMET, and behind a proxy that adds one
real-world server quirk at a time (``tests/support/quirky_fhir_server.py``)."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from clm_stratify.cli import main
from clm_stratify.interop import STEPS, InteropRun
from clm_stratify.pipeline import Rules
from engine.classify import Engine
from clm_stratify.interop import probes
from fhir_adapters.fhir.codec import loads
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.local_server import free_port
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR
from tests.support.quirky_fhir_server import QuirkyFhirServer
from tests.support.rewrite_proxy import RewriteProxy

# A borderline patient with 5+ Observations (paging with _count=2), a resectable one,
# and one without liver recurrence (classified, no RiskAssessment).
SMALL = ["11-borderline-count-and-size-no-adjuvant.json", "01-resectable-single-small.json",
         "19-no-recurrence-measurements-only.json"]
RULES = Rules(Engine.default(), load_terminology())


def interop(base_url: str, fixtures=SMALL, keep: bool = False) -> InteropRun:
    client = FhirClient(base_url, retries=1, backoff=0.05)
    run = InteropRun(client, RULES, fixtures=fixtures, keep=keep)
    run.run()
    client.close()
    return run


def statuses(run: InteropRun) -> dict[str, str]:
    return {c.id: c.status for c in run.report.checks}


def left_on_server(base_url: str, tag: tuple[str, str]) -> list[str]:
    with FhirClient(base_url) as c:
        return [r for t in ("Patient", "Observation", "Condition", "Procedure", "MedicationAdministration",
                            "MedicationStatement", "DiagnosticReport", "BodyStructure", "Specimen", "Subscription")
                for r in probes.tagged(c, t, tag)]


def assessments_left(base_url: str, run: InteropRun) -> list[str]:
    """RiskAssessments and Provenances of the run still on the server: every one the run
    met, read by id, and (where the server can) any RiskAssessment of its patients."""
    with FhirClient(base_url) as c:
        refs = set(run.assessments) | set(run.ra_refs.values()) | {r for r in run.created
                                                                   if r.startswith("Provenance/")}
        left = [r for r in sorted(refs) if c.read(*r.split("/", 1)) is not None]
        ra = c.capabilities().resource("RiskAssessment")
        if ra is not None and "patient" in ra.search_params and run.patients:
            ids = ",".join(p.patient.id for p in run.patients)
            left += [probes.ref_of(r) for r in c.search("RiskAssessment", {"patient": ids, "_count": "100"})]
            for ref in refs:
                left += [probes.ref_of(p) for p in c.search("Provenance", {"target": ref})]
        return left


# --------------------------------------------------------------------------- no server

def test_run_scoped_ids_and_references_are_unique_per_run():
    bundle = loads((FIXTURES_DIR / "28-mcode-focus-same-lesion-twice.json").read_bytes())
    old = {probes.ref_of(e["resource"]) for e in bundle["entry"]}
    a, ids_a = probes.run_scoped_bundle(bundle, "aaaa1111")
    b, ids_b = probes.run_scoped_bundle(bundle, "bbbb2222")
    assert set(ids_a) == old and not set(ids_a.values()) & set(ids_b.values())
    for entry in a["entry"]:
        r = entry["resource"]
        assert r["id"].endswith("-aaaa1111") and entry["fullUrl"] == probes.ref_of(r)
        refs = probes.references_in(r)
        assert not refs & old, refs                         # nothing points at the shared ids any more
        assert refs <= set(ids_a.values()) | {x for x in refs if x not in ids_a.values()}
    focus = [f["reference"] for e in a["entry"] for f in e["resource"].get("focus", [])]
    assert focus and all(f.endswith("-aaaa1111") for f in focus)
    assert bundle["entry"][0]["resource"]["id"] in {x.split("/")[1] for x in old}  # the input is not changed


def test_deletion_order_puts_referrers_first():
    pat = {"resourceType": "Patient", "id": "p"}
    body = {"resourceType": "BodyStructure", "id": "b", "patient": {"reference": "Patient/p"}}
    obs = {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"},
           "focus": [{"reference": "BodyStructure/b"}]}
    assert probes.deletion_order([pat, body, obs]) == ["Observation/o", "BodyStructure/b", "Patient/p"]


def test_unreachable_server_exits_3():
    client = FhirClient(f"http://127.0.0.1:{free_port()}/fhir", retries=0)
    report = InteropRun(client, RULES, fixtures=SMALL).run()
    assert report.exit_code == 3
    assert {c.id: c.status for c in report.checks} == {"cap.read": "fail"}


# --------------------------------------------------------------------------- SEKMET

@pytest.mark.integration
def test_cli_against_sekmet_passes_and_names_the_riskassessment_gap(fhir_server, tmp_path, capsys):
    path = tmp_path / "report.json"
    code = main(["interop", "--fhir-url", fhir_server.base_url, "--report", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert code == 0, out
    assert report["result"] == "pass" and report["counts"]["fail"] == 0
    n = len(yaml.safe_load((FIXTURES_DIR / "expected.yaml").read_text()))
    assert report["fixtures"] == n and len(report["patients"]) == n
    assert all(p["group"] == p["expected_group"] for p in report["patients"])
    checks = {c["id"]: c for c in report["checks"]}
    for cid in ("cap.version", "cap.searches", "cap.batch", "cap.transaction", "cap.write-strategy",
                "cap.riskassessment-search", "load.fixtures", "read.fetch-patient", "read.paging",
                "read.patient-filter", "probe.unknown-parameter", "probe.handling-strict",
                "probe.version-conflict", "probe.conditional-create", "read.media-type", "write.classify",
                "write.first", "write.read-back", "write.second", "write.no-duplicates",
                "write.riskassessment-search", "cleanup"):
        assert cid in checks, cid
    # The RiskAssessment search gap, and the fallback the project uses there.
    assert report["write_strategy"]["strategy"] == "update-as-create"
    quirks = {q["id"]: q for q in report["quirks"]}
    gap = quirks["riskassessment-search-unsupported"]
    assert "not in the CapabilityStatement" in gap["detail"] and "?patient=" in gap["detail"]
    assert "update-as-create by deterministic id" in gap["handling"]
    assert {"missing": "RiskAssessment search", "fallback": gap["handling"]} in report["fallbacks"]
    assert checks["write.riskassessment-search"]["status"] == "warn"
    assert "Unknown search parameter 'patient' for RiskAssessment" in quirks["search-parameter-ignored"]["evidence"]
    # SEKMET's own behaviour: 412 for both conflicts, strict handling supported, totals, short links.
    assert "412-on-multiple-match-conditional-create" in quirks
    assert "multiple" in checks["probe.conditional-create"]["outcome"] or "matched 2" in \
        checks["probe.conditional-create"]["outcome"]
    assert checks["probe.version-conflict"]["status"] == "pass"
    assert checks["probe.handling-strict"]["status"] == "pass"
    assert not {"409-on-version-conflict", "bundle-total-absent", "long-next-links", "handling-strict-ignored",
                "application-json-content-type"} & set(quirks)
    steps = [s["step"] for s in report["steps"]]
    assert steps == [s for s in STEPS if s in steps]          # in order (another step may sit between)
    assert {"capabilities", "load", "read-back", "write", "cleanup"} <= set(steps) and steps[-1] == "cleanup"
    assert "PUT by id" in checks["load.fixtures"]["detail"]
    assert all(s["seconds"] >= 0 for s in report["steps"])
    # The table, and nothing of the run left on the server.
    assert "update-as-create" in out and "Quirks met:" in out and "FAIL" not in out
    assert report["not_deleted"] == []
    tag = (report["tag"]["system"], report["tag"]["code"])
    assert left_on_server(fhir_server.base_url, tag) == []
    with FhirClient(fhir_server.base_url) as c:
        for p in report["patients"]:
            if p["risk_assessment"]:
                assert c.read("RiskAssessment", p["risk_assessment"].split("/")[1]) is None


@pytest.mark.integration
def test_two_concurrent_runs_on_one_server_do_not_collide_and_keep_leaves_the_data(fhir_server):
    runs: list[InteropRun] = []

    def go():
        runs.append(interop(fhir_server.base_url, keep=True))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    for run in runs:
        assert not run.report.failed, [c for c in run.report.checks if c.status == "fail"]
        assert statuses(run)["cleanup"] == "pass" and "kept" in run.report.checks[-1].detail
        loaded = {probes.ref_of(r) for r in run.loaded}
        assert all(r.endswith(f"-{run.run_id}") for r in loaded)
        assert loaded <= set(left_on_server(fhir_server.base_url, run.tag))     # kept, under the run's tag
        assert len(run.ra_refs) == 2
        with FhirClient(fhir_server.base_url) as c:
            assert all(c.read("RiskAssessment", ref.split("/")[1]) for ref in run.ra_refs.values())
    assert not set(left_on_server(fhir_server.base_url, runs[0].tag)) & set(
        left_on_server(fhir_server.base_url, runs[1].tag))
    assert not set(runs[0].ra_refs.values()) & set(runs[1].ra_refs.values())
    # Clean up what --keep left, with the runs' own clean-up.
    for run in runs:
        run.keep = False
        run.client = FhirClient(fhir_server.base_url)
        run.cleanup()
        assert (run.report.checks[-1].id, run.report.checks[-1].status) == ("cleanup", "pass")
        run.client.close()
        assert left_on_server(fhir_server.base_url, run.tag) == []


# --------------------------------------------------------------------------- two real servers

@pytest.fixture(params=["sekmet", "medplum"])
def real_server(request):
    """(kind, server): SEKMET (clients choose ids, pages with next links, no RiskAssessment
    search) and Medplum's engine (assigns ids, never pages, unknown parameters match nothing)."""
    return request.param, request.getfixturevalue("fhir_server" if request.param == "sekmet" else "medplum_server")


def checks_of(run: InteropRun) -> dict:
    return {c.id: c for c in run.report.checks}


@pytest.mark.integration
def test_interop_on_both_real_servers_says_what_each_did_and_leaves_nothing(real_server):
    kind, srv = real_server
    run = interop(srv.base_url, keep=True)
    with FhirClient(srv.base_url) as c:     # FixturePatient.patient is the id on the server
        for p in run.patients:
            assert probes.has_tag(c.read("Patient", p.patient.id), run.tag)
    run.keep, run.client = False, FhirClient(srv.base_url)
    run.cleanup()                            # the run's own clean-up, as without --keep
    run.client.close()
    checks, quirks = checks_of(run), run.report.quirks
    assert not run.report.failed, [(c.id, c.detail) for c in run.report.checks if c.status == "fail"]
    # Positive evidence: every patient was loaded, read back, classified; the written
    # assessment was found by the searches the project relies on.
    assert len(run.patients) == 3 and len(run.ra_refs) == 2
    for cid in ("load.fixtures", "read.fetch-patient", "read.paging", "read.patient-filter", "write.classify",
                "write.first", "write.read-back", "write.second", "write.no-duplicates"):
        assert checks[cid].status == "pass", (cid, checks[cid].detail)
    assert run.report.checks[-1].status == "pass"
    assert "5 of the patient's 5 Observations" in checks["read.paging"].detail
    assert "returned 5 Observations, all the patient's" in checks["read.patient-filter"].detail
    assert "no new version (meta.versionId read before and after)" in checks["write.second"].detail
    search = checks["write.riskassessment-search"]
    assert f"{run.ra_refs[run.patients[1].patient]} among them" in search.detail or \
        f"{run.ra_refs[run.patients[0].patient]} among them" in search.detail
    assert run.report.checks[-1].id == "cleanup" and "nothing left" in run.report.checks[-1].detail
    assert run.report.not_deleted == []
    assert left_on_server(srv.base_url, run.tag) == []
    assert assessments_left(srv.base_url, run) == []
    if kind == "sekmet":
        assert "PUT by id (client-assigned ids ending in" in checks["load.fixtures"].detail
        assert run.report.info["load_method"] == "PUT by id"
        assert all(p.patient.id.endswith(f"-{run.run_id}") for p in run.patients)
        assert all(probes.ref_of(r).endswith(f"-{run.run_id}") for r in run.loaded)
        assert "2 next links followed" in checks["read.paging"].detail and "_offset" not in checks["read.paging"].detail
        assert not {"paging-absent", "bundle-total-absent", "bundle-total-inaccurate", "count-not-honoured",
                    "unknown-parameter-matches-nothing", "handling-strict-ignored", "identifier-search-misses"} & set(quirks)
        strict = checks["probe.handling-strict"]
        assert strict.status == "pass"
        assert "without Prefer: HTTP 200: ignored (3 results, as without the parameter); warning: Unknown search " \
               "parameter" in strict.detail
        assert "with Prefer: handling=strict: HTTP 400: rejected (Unknown search parameter" in strict.detail
        assert checks["probe.unknown-parameter"].status == "pass"
        # RiskAssessment search is not declared and ignored: a warn (not relied on), own assessment found
        assert search.status == "warn" and "not relied on: update-as-create" in search.detail
        assert "of other patients/identifiers" in search.detail and "search-parameter-ignored" in quirks
    else:
        load = checks["load.fixtures"]
        assert "POST with urn:uuid fullUrls (the server assigns ids" in load.detail
        assert run.report.info["load_method"].startswith("POST with urn:uuid")
        assert checks["cap.update-create"].status == "warn" and "server assigns ids" in checks["cap.update-create"].detail
        assert any(f["missing"] == "update-as-create (client-assigned ids)" for f in run.report.info["fallbacks"])
        assert not any(p.patient.id.endswith(run.run_id) for p in run.patients)     # the server's own ids
        ids = {probes.ref_of(r) for r in run.loaded}
        assert all(probes.owner_of(r) in {p.patient.reference for p in run.patients} | {None}
                   for r in run.loaded if r["resourceType"] != "Patient")
        assert all(ref in ids for r in run.loaded for ref in probes.references_in(r))    # references rewritten
        # Medplum never pages: the quirk says what it did; the client went on with _offset
        paging = checks["read.paging"].detail
        assert "0 next links followed, then _offset from page 2 (page 1 had no next link)" in paging
        assert "page 1 had no next link after 2 resources (Bundle.total 5)" in quirks["paging-absent"].detail
        assert "went on with _offset" in quirks["paging-absent"].handling
        assert "bundle-total-absent" not in quirks and "count-not-honoured" not in quirks
        # an unknown parameter matches nothing, with or without Prefer: handling=strict
        strict = checks["probe.handling-strict"]
        assert strict.status == "warn"
        assert ("without Prefer: HTTP 200: matched nothing (0 results, 3 without the parameter; neither ignored "
                "nor rejected); no warning; with Prefer: handling=strict: HTTP 200: matched nothing") in strict.detail
        assert checks["probe.unknown-parameter"].status == "warn"
        assert "unknown-parameter-matches-nothing" in quirks and "handling-strict-ignored" in quirks
        assert "search-parameter-ignored" not in quirks
        # the identifier (no '|' any more) finds the assessment: conditional writes work
        assert search.status == "pass" and "each search found the patient's assessment and nothing else" in \
            search.detail
        assert checks["write.first"].detail.endswith("(strategy conditional-update)")


@pytest.mark.integration
def test_read_back_on_medplum_names_what_its_identifier_search_misses(medplum_server):
    """Medplum's engine does not match subject:identifier / patient:identifier for a subject
    given by identifier only (measured): read-back FAILs naming the resource and why,
    rather than passing on what came back."""
    client = FhirClient(medplum_server.base_url)
    run = InteropRun(client, RULES, fixtures=["38-identifier-only-subject-technical.json"])
    try:
        assert run.capabilities()
        run.load()
        run.read_back()
    finally:
        run.cleanup()
        client.close()
    check = checks_of(run)["read.fetch-patient"]
    assert check.status == "fail"
    assert "its subject names the patient by identifier only: the subject:identifier / patient:identifier " \
           "search did not find it" in check.detail
    assert checks_of(run)["cleanup"].status == "pass" and left_on_server(medplum_server.base_url, run.tag) == []


def _identifier_never_matches(method: str, pq: str, status: int, body: object) -> tuple[int, object]:
    """Every RiskAssessment?identifier= search answers an empty Bundle (as Medplum did while
    the identifier value held a '|')."""
    if method == "GET" and "/RiskAssessment?" in pq and "identifier=" in pq:
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": 0}
    return status, body


def _without_offset(method: str, pq: str) -> str:
    path, _, query = pq.partition("?")
    kept = "&".join(p for p in query.split("&") if p and not p.startswith("_offset="))
    return f"{path}?{kept}" if kept else path


@pytest.mark.integration
def test_an_identifier_search_that_misses_fails_the_search_check_not_passes_it(medplum_server):
    """Proxy in front of Medplum: RiskAssessment?identifier= finds nothing (no real server
    here does that any more). The writer stops after its first write; the report says so
    and write.riskassessment-search FAILs (the conditional writer relies on it); the one
    assessment written is found by patient and cleaned up."""
    with RewriteProxy(medplum_server.base_url, reply=_identifier_never_matches) as proxy:
        run = interop(proxy.base_url)
    checks = checks_of(run)
    assert run.report.exit_code == 1
    assert checks["write.first"].status == "fail" and "found nothing" in checks["write.first"].detail
    search = checks["write.riskassessment-search"]
    assert search.status == "fail", search.detail
    assert "0 results, not RiskAssessment/" in search.detail and "a re-run would write a duplicate" in search.detail
    assert "1 result, RiskAssessment/" in search.detail       # found by patient: the evidence it exists
    assert "identifier-search-misses" in run.report.quirks
    assert checks["write.second"].status == "skip" and checks["cleanup"].status == "pass"
    assert left_on_server(medplum_server.base_url, run.tag) == []
    assert assessments_left(medplum_server.base_url, run) == []


@pytest.mark.integration
def test_a_server_that_neither_pages_nor_honours_offset_fails_paging_naming_it(medplum_server):
    """Proxy in front of Medplum drops _offset: the search cannot be completed; paging
    FAILs with the client's FhirTruncated text and the quirk says nothing could be done."""
    with RewriteProxy(medplum_server.base_url, request=_without_offset) as proxy:
        run = interop(proxy.base_url)
    checks = checks_of(run)
    paging = checks["read.paging"]
    assert paging.status == "fail" and "returned 2 of 5 results (Bundle.total) with no next link" in paging.detail
    assert "ignored _offset" in paging.detail
    assert "FhirTruncated" in run.report.quirks["paging-absent"].handling
    assert checks["read.patient-filter"].status == "skip"
    assert checks["cleanup"].status == "pass"
    assert left_on_server(medplum_server.base_url, run.tag) == []


# --------------------------------------------------------------------------- quirks, for real

QUIRK_CASES = [
    ("no-total", "bundle-total-absent", "read.paging", "pass"),
    ("long-next-links", "long-next-links", "read.paging", "pass"),
    ("application-json", "application-json-content-type", "read.media-type", "warn"),
    ("409-for-412", "409-on-version-conflict", "probe.version-conflict", "warn"),
    ("ignore-strict", "handling-strict-ignored", "probe.handling-strict", "warn"),
    ("silent-ignore-patient", "search-parameter-ignored", "read.patient-filter", "warn"),
]


@pytest.mark.integration
@pytest.mark.parametrize("quirk, named, check, status", QUIRK_CASES, ids=[c[0] for c in QUIRK_CASES])
def test_each_quirk_is_met_handled_and_named(fhir_server, quirk, named, check, status):
    with QuirkyFhirServer(fhir_server.base_url, {quirk}) as proxy:
        run = interop(proxy.base_url)
        report = run.report
        assert report.exit_code == 0, [c for c in report.checks if c.status == "fail"]
        assert named in report.quirks, sorted(report.quirks)
        assert statuses(run)[check] == status
        assert statuses(run)["write.second"] == "pass" and statuses(run)["cleanup"] == "pass"
        assert report.quirks[named].handling
        if quirk == "long-next-links":
            assert proxy.tokens and all(len(t) > 2900 for t in proxy.tokens)
            assert "characters" in report.quirks[named].detail
        if quirk == "silent-ignore-patient":
            assert "no warning" in report.quirks[named].detail
        if quirk == "no-total":       # no total, next links to the end: nothing else is claimed
            assert not {"paging-absent", "bundle-total-inaccurate"} & set(report.quirks)
            assert "all came back once" in next(c.detail for c in report.checks if c.id == "read.paging")
        if quirk == "409-for-412":
            assert "If-Match" in report.quirks[named].evidence or "conflict" in report.quirks[named].evidence.lower()
    assert left_on_server(fhir_server.base_url, run.tag) == []


@pytest.mark.integration
def test_without_batch_the_parallel_fallback_is_named_and_used(fhir_server):
    with QuirkyFhirServer(fhir_server.base_url, {"no-batch"}) as proxy:
        run = interop(proxy.base_url)
    assert run.report.exit_code == 0, [c for c in run.report.checks if c.status == "fail"]
    assert statuses(run)["cap.batch"] == "warn" and run.report.info["search_mode"] == "parallel"
    assert {"missing": "batch", "fallback": "the same searches one by one, 4 in parallel"} in \
        run.report.info["fallbacks"]
    assert "parallel searches" in next(c.detail for c in run.report.checks if c.id == "read.fetch-patient")


@pytest.mark.integration
def test_ignored_if_match_fails_the_run(fhir_server):
    with QuirkyFhirServer(fhir_server.base_url, {"ignore-if-match"}) as proxy:
        run = interop(proxy.base_url)
    assert run.report.exit_code == 1
    assert statuses(run)["probe.version-conflict"] == "fail"
    assert statuses(run)["cleanup"] == "pass"


@pytest.mark.integration
def test_a_refused_riskassessment_fails_with_the_servers_text_and_is_still_cleaned_up(fhir_server, tmp_path,
                                                                                       capsys):
    with QuirkyFhirServer(fhir_server.base_url, {"reject-riskassessment"}) as proxy:
        path = tmp_path / "r.json"
        code = main(["interop", "--fhir-url", proxy.base_url, "--report", str(path)])
        out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert code == 1 and report["result"] == "fail"
    first = next(c for c in report["checks"] if c["id"] == "write.first")
    assert first["status"] == "fail"
    assert "RiskAssessment is not accepted by this server" in first["outcome"]
    assert "[server: RiskAssessment is not accepted by this server" in " ".join(out.split())
    checks = {c["id"]: c["status"] for c in report["checks"]}
    assert checks["cleanup"] == "pass" and checks["write.classify"] == "pass"
    assert checks["write.second"] == checks["write.no-duplicates"] == "skip"
    tag = (report["tag"]["system"], report["tag"]["code"])
    assert left_on_server(fhir_server.base_url, tag) == []
