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
