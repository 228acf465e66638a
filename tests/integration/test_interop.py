"""``clm-stratify interop`` against a real SEKMET, and behind a proxy that adds one
real-world server quirk at a time (``tests/support/quirky_fhir_server.py``)."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from clm_stratify.cli import main
from clm_stratify.interop import InteropRun
from clm_stratify.pipeline import Rules
from engine.classify import Engine
from clm_stratify.interop import probes
from fhir_adapters.fhir.codec import loads
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.local_server import free_port
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR
from tests.support.quirky_fhir_server import QuirkyFhirServer

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
                            "BodyStructure", "Specimen") for r in probes.tagged(c, t, tag)]


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
    assert [s["step"] for s in report["steps"]] == ["capabilities", "load", "read-back", "write", "cleanup"]
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
