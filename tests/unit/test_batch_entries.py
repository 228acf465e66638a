"""A batch-response entry is a result only when it is whole (issue 15, adversarial pass 2),
and a CDS prefetch page out of spec is refused, not used.

Pure functions; the same cases through ``run`` against SEKMET behind a rewriting proxy
are in tests/integration/test_search_outcomes.py."""

from __future__ import annotations

import pytest

from clm_stratify.service.cds_prefetch import CdsError, _bundle_resources
from fhir_adapters.fhir.batch import read_entry, search_entry
from fhir_adapters.fhir.errors import FhirError, FhirTruncated

BASE = "http://127.0.0.1:9/fhir"
TIMEOUT = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception",
                                                          "diagnostics": "database timeout"}]}
SEARCHSET = {"resourceType": "Bundle", "type": "searchset", "entry": []}
PATIENT = {"resourceType": "Patient", "id": "f47-pat"}


@pytest.mark.parametrize("status, resource, says", [
    ("404 Not Found", TIMEOUT, "answered 404 Not Found, not a search result: database timeout"),
    ("410 Gone", TIMEOUT, "answered 410 Gone, not a search result: database timeout"),
    ("200 OK", TIMEOUT, "answered 200 OK with OperationOutcome, not a searchset Bundle: database timeout"),
    ("206 Partial Content", SEARCHSET, "answered 206 Partial Content, not a search result"),
    ("204", None, "answered 204, not a search result"),
    ("200", {"resourceType": "Bundle", "type": "collection"}, "with Bundle collection, not a searchset"),
    ("200", None, "with no resource"),
    (None, SEARCHSET, "answered no status"),
    ("500 Internal Server Error", TIMEOUT, "failed: 500 Internal Server Error: database timeout"),
])
def test_a_search_entry_that_is_not_a_whole_searchset_is_an_error(status, resource, says):
    entry = {"response": {"status": status} if status else {}, **({"resource": resource} if resource else {})}
    with pytest.raises(FhirError) as ei:
        search_entry(BASE, 5, "DiagnosticReport", entry)
    assert str(ei.value) == f"batch entry 5 (DiagnosticReport search) {says}" or says in str(ei.value)
    assert "batch entry 5 (DiagnosticReport search)" in str(ei.value)


def test_only_4xx_other_than_404_410_reads_as_a_refused_search():
    """pull._refused takes "failed: 4xx" as a server refusing a search (identifier
    searches then become a note on the record); a 404/410 search entry must not."""
    from fhir_adapters.sources.pull import _refused

    def error(status):
        with pytest.raises(FhirError) as ei:
            search_entry(BASE, 0, "Observation", {"response": {"status": status}, "resource": TIMEOUT})
        return ei.value
    assert _refused(error("400 Bad Request")) and _refused(error("403 Forbidden"))
    assert not _refused(error("404 Not Found")) and not _refused(error("410 Gone"))
    assert not _refused(error("500 Internal Server Error"))


def test_a_200_searchset_is_used_unless_its_response_outcome_says_results_are_missing():
    ok = {"response": {"status": "200 OK"}, "resource": SEARCHSET}
    assert search_entry(BASE, 0, "Observation", ok) is SEARCHSET
    informational = {"resourceType": "OperationOutcome", "issue": [{"severity": "information",
                                                                    "code": "informational", "details": {"text": "All OK"}}]}
    assert search_entry(BASE, 0, "Observation", {**ok, "response": {"status": "200", "outcome": informational}})
    incomplete = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "incomplete",
                                                                 "diagnostics": "search results truncated"}]}
    for outcome in (incomplete, TIMEOUT, {"resourceType": "OperationOutcome", "issue": [{"severity": "warning",
                                                                                         "code": ["incomplete"]}]}, "x"):
        with pytest.raises(FhirTruncated, match=r"batch entry 0 \(Observation search\) incomplete"):
            search_entry(BASE, 0, "Observation", {**ok, "response": {"status": "200 OK", "outcome": outcome}})


def test_a_read_entry_is_the_resource_or_none_when_it_does_not_exist():
    assert read_entry(BASE, 6, "Patient/f47-pat", {"response": {"status": "200 OK"}, "resource": PATIENT}) is PATIENT
    assert read_entry(BASE, 6, "Patient/f47-pat", {"response": {"status": "404 Not Found"}, "resource": TIMEOUT}) is None
    assert read_entry(BASE, 6, "Patient/f47-pat", {"response": {"status": "410"}}) is None
    for status, resource, says in [("200 OK", TIMEOUT, "with OperationOutcome/None, not Patient/f47-pat"),
                                   ("200 OK", {**PATIENT, "id": "other"}, "with Patient/other, not Patient/f47-pat"),
                                   ("206", PATIENT, "failed: 206"), ("500", None, "failed: 500")]:
        with pytest.raises(FhirError, match="batch entry 6 \\(Patient/f47-pat\\) "):
            read_entry(BASE, 6, "Patient/f47-pat", {"response": {"status": status}, "resource": resource})
        with pytest.raises(FhirError) as ei:
            read_entry(BASE, 6, "Patient/f47-pat", {"response": {"status": status}, "resource": resource})
        assert says in str(ei.value)


# --------------------------------------------------------------------------- CDS prefetch pages
def _page(n: int = 2, **extra) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", **extra,
            "entry": [{"search": {"mode": "match"}, "resource": {"resourceType": "Observation", "id": f"o{i}"}}
                      for i in range(n)]}


@pytest.mark.parametrize("extra, says", [
    ({"total": "5"}, "Bundle.total is not a non-negative integer ('5')"),
    ({"total": -2}, "Bundle.total is not a non-negative integer"),
    ({"total": 2.0}, "Bundle.total is not a non-negative integer"),
    ({"link": [{"relation": ["next"], "url": "http://127.0.0.1:9/fhir/Observation?page=2"}]},
     "a Bundle.link relation is not a string"),
])
def test_a_prefetch_page_out_of_spec_is_a_malformed_request(extra, says):
    with pytest.raises(CdsError) as ei:
        _bundle_resources("observation", _page(**extra))
    assert ei.value.status == 400 and says in str(ei.value)


def test_a_prefetch_next_link_counts_whatever_its_case_and_a_bogus_severity_is_a_cut():
    _, _, incomplete = _bundle_resources("observation", _page(link=[{"relation": "Next", "url": "http://h/x"}]))
    assert incomplete
    assert _bundle_resources("observation", _page(total=2, link=[{"relation": "self", "url": "http://h/x"}]))[2] is False
    bogus = {"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "bogus", "code": "not-supported", "diagnostics": "Unknown parameter"}]}}
    page = _page()
    page["entry"].append(bogus)
    _, cut, _ = _bundle_resources("observation", page)
    assert cut and "severity 'bogus'" in cut
