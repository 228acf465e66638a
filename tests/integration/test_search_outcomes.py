"""A search page whose OperationOutcome says results are missing, through the whole
product against a real SEKMET server.

SEKMET never says a search was cut (its only outcome entries are ``not-supported``
warnings for parameters it ignores), so a loopback proxy in front of it (tests/support/
rewrite_proxy.py) adds the adversary's entry to every Observation searchset, alone or
inside a batch reply: ``{"severity": "warning", "code": "incomplete", "diagnostics":
"search results truncated"}``. ``run --patient`` must fail that patient (exit 1) and
write nothing; ``run --all`` the same for every patient; a warning-only outcome changes
nothing."""

from __future__ import annotations

import copy

import pytest

from clm_stratify.cli import main
from fhir_adapters.fhir.client import FhirClient
from tests.support.rewrite_proxy import RewriteProxy

pytestmark = pytest.mark.integration

PATIENT = "f11-pat"
CUT = {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": [
    {"severity": "warning", "code": "incomplete", "diagnostics": "search results truncated"}]}}
IGNORED = {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": [
    {"severity": "warning", "code": "not-supported", "diagnostics": "Unknown parameter 'x'; ignored"}]}}


def adding(outcome: dict, rtype: str = "Observation"):
    """A reply rewrite: ``outcome`` appended to every ``rtype`` searchset, with all but
    the first match dropped (the server "cut" it)."""
    def cut(bundle: dict) -> dict:
        matches = [e for e in bundle.get("entry") or [] if (e.get("search") or {}).get("mode") != "outcome"]
        return {**bundle, "entry": matches[:1] + [copy.deepcopy(outcome)]}

    def reply(method: str, pq: str, status: int, body):
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            return status, body
        if body.get("type") == "searchset" and pq.split("?")[0].endswith(f"/{rtype}"):
            return status, cut(body)
        if body.get("type") == "batch-response":
            for entry in body.get("entry") or []:
                r = entry.get("resource")
                if isinstance(r, dict) and r.get("type") == "searchset" and any(
                        (e.get("resource") or {}).get("resourceType") == rtype for e in r.get("entry") or []):
                    entry["resource"] = cut(r)
        return status, body
    return reply


def assessments_of(base_url: str, pid: str) -> list[dict]:
    with FhirClient(base_url) as fhir:
        return list(fhir.search("RiskAssessment", {"subject": f"Patient/{pid}"}))


def test_a_cut_search_fails_the_patient_and_writes_nothing(server, capsys):
    assert assessments_of(server.base_url, PATIENT) == []
    with RewriteProxy(server.base_url, reply=adding(CUT)) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--patient", PATIENT])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "search results truncated" in out + err
    assert assessments_of(server.base_url, PATIENT) == []


def test_a_warning_only_outcome_does_not_stop_a_run(server, capsys):
    """The same proxy with an ignored-parameter warning: the patient is classified (from
    the one Observation left: the proxy drops the rest, so the group is not f11's own)."""
    with RewriteProxy(server.base_url, reply=adding(IGNORED)) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--patient", PATIENT, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, out + err


def test_a_cut_cohort_search_stops_run_all_with_exit_3(server, capsys):
    """``run --all`` first searches the recurrence Conditions for its cohort: cut, it stops
    as for any truncated search (exit 3, server unusable) before classifying anyone
    (``--no-bulk``: the searches, not $export)."""
    with RewriteProxy(server.base_url, reply=adding(CUT, "Condition")) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--all", "--no-bulk"])
    out, err = capsys.readouterr()
    assert code == 3, out + err
    assert "search results truncated" in err
    with FhirClient(server.base_url) as fhir:
        assert list(fhir.search("RiskAssessment", {"_count": "5"})) == []


# --------------------------------------------------------------------------- batch entries (issue 15, pass 2)
# The first batch of ``run --patient`` holds the six searches of pull.PATIENT_SEARCHES in
# that order, then the read Patient/<id>: the proxy replaces one entry of that reply.
OBSERVATION, DIAGNOSTIC_REPORT, PATIENT_READ = 0, 5, 6
TIMEOUT = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception",
                                                          "diagnostics": "database timeout"}]}
INCOMPLETE = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "incomplete",
                                                             "diagnostics": "search results truncated"}]}


def replacing(index: int, status: str, resource: dict | None = None, outcome: dict | None = None):
    """A reply rewrite: entry ``index`` of the first (7-entry) batch reply answers
    ``status`` with ``resource`` (None: the server's own), and ``outcome`` in its response."""
    def reply(method: str, pq: str, code: int, body):
        entries = body.get("entry") if isinstance(body, dict) and body.get("type") == "batch-response" else None
        if entries and len(entries) == 7:
            entries[index]["response"] = {"status": status, **({"outcome": outcome} if outcome else {})}
            if resource is not None:
                entries[index]["resource"] = copy.deepcopy(resource)
        return code, body
    return reply


@pytest.mark.parametrize("pid, index, status, resource, outcome", [
    ("f47-pat", DIAGNOSTIC_REPORT, "404 Not Found", TIMEOUT, None),
    ("f47-pat", DIAGNOSTIC_REPORT, "410 Gone", TIMEOUT, None),
    ("f47-pat", DIAGNOSTIC_REPORT, "200 OK", TIMEOUT, None),
    ("f47-pat", DIAGNOSTIC_REPORT, "206 Partial Content", None, None),
    ("f47-pat", DIAGNOSTIC_REPORT, "200 OK", None, INCOMPLETE),
    ("f05-pat", OBSERVATION, "200 OK", TIMEOUT, None),
], ids=["404+OO", "410+OO", "200+OO", "206", "200+outcome-incomplete", "f05-observation-200+OO"])
def test_a_batch_entry_that_is_not_a_whole_search_fails_the_patient(server, capsys, pid, index, status,
                                                                    resource, outcome):
    """The adversary's cases: without the guard f47 came out ``Resectable (final)``
    instead of ``(preliminary)`` and f05 indeterminate, exit 0. Now the patient fails
    (exit 1, named) and nothing is written."""
    assert assessments_of(server.base_url, pid) == []
    with RewriteProxy(server.base_url, reply=replacing(index, status, resource, outcome)) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--patient", pid])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    what = "DiagnosticReport" if index == DIAGNOSTIC_REPORT else "Observation"
    assert f"batch entry {index} ({what} search)" in out + err
    assert ("database timeout" if resource is TIMEOUT else
            "search results truncated" if outcome else status) in out + err
    assert assessments_of(server.base_url, pid) == []


@pytest.mark.parametrize("status", [None, "404 Not Found", "410 Gone"])
def test_a_patient_read_entry_answering_404_is_still_not_found(server, capsys, status):
    """A read may answer 404 or 410 (the patient does not exist; None: SEKMET's own 404
    entry): exit 4, as before."""
    rewrite = replacing(PATIENT_READ, status, TIMEOUT) if status else None
    with RewriteProxy(server.base_url, reply=rewrite) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--patient", "nobody-pat", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 4, out + err
    assert "no patient Patient/nobody-pat" in out + err or "nobody-pat" in out + err


def test_a_patient_read_entry_holding_something_else_fails_the_patient(server, capsys):
    with RewriteProxy(server.base_url, reply=replacing(PATIENT_READ, "200 OK", TIMEOUT)) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--patient", "f47-pat", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "batch entry 6 (Patient/f47-pat) answered 200 OK with OperationOutcome/None" in out + err


def test_a_malformed_outcome_entry_fails_the_patient_not_the_run(server, capsys):
    """``issue[].code`` a list used to crash ``results_cut`` (TypeError, traceback); now
    it is an outcome that cannot be read: a cut, that patient fails."""
    odd = {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "warning", "code": ["not-supported"], "details": ["x"]}]}}
    with RewriteProxy(server.base_url, reply=adding(odd)) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--patient", PATIENT, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "Traceback" not in out + err and "not an R4 issue type" in out + err


def test_a_failed_batch_read_of_the_current_assessments_is_not_no_assessment(make_server, capsys):
    """The writer reads the current assessments in one batch (update-as-create on SEKMET).
    An entry that answers 500 with an OperationOutcome is not "no current assessment":
    taken so (as before), every patient got a new version and Provenance saying the same.
    Now the batch read is an error, the writer reads each assessment on its own (the proxy
    fails only the batch), and nothing changes."""
    srv = make_server()
    assert main(["run", "--fhir-url", srv.base_url, "--all", "--no-bulk"]) == 0
    capsys.readouterr()
    with FhirClient(srv.base_url) as fhir:
        before = {r["id"]: r["meta"]["versionId"] for r in fhir.search("RiskAssessment", {"_count": "500"})}
        provenances = len(list(fhir.search("Provenance", {"_count": "500"})))
    assert len(before) == 56

    failed_entries = []

    def failing_reads(method: str, pq: str, status: int, body):
        if isinstance(body, dict) and body.get("type") == "batch-response" and any(
                (e.get("resource") or {}).get("resourceType") == "RiskAssessment" for e in body.get("entry") or []):
            for e in body["entry"]:
                if (e.get("resource") or {}).get("resourceType") == "RiskAssessment":
                    failed_entries.append(e["resource"]["id"])
                    e["response"] = {"status": "500 Internal Server Error"}
                    e["resource"] = {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "exception", "diagnostics": "storage unavailable"}]}
        return status, body

    with RewriteProxy(srv.base_url, reply=failing_reads) as proxy:
        code = main(["run", "--fhir-url", proxy.base_url, "--all", "--no-bulk"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "RiskAssessments: unchanged 56" in out and "Traceback" not in err
    assert len(failed_entries) == 56   # the batch read was tried, and failed
    with FhirClient(srv.base_url) as fhir:
        after = {r["id"]: r["meta"]["versionId"] for r in fhir.search("RiskAssessment", {"_count": "500"})}
        assert after == before
        assert len(list(fhir.search("Provenance", {"_count": "500"}))) == provenances
