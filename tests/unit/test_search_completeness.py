"""Search values escaped per the spec, and when a search is complete (issue 12).

Pure logic; the behaviour against real servers (Medplum never pages; a proxy that drops
``_offset``) is in tests/integration/test_two_servers.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from fhir_adapters.fhir.search import CUT_CODES, WARNING_CODES, Completeness, count_of, escape, results_cut, token
from fhir_adapters.writeback.resources import assessment_id, assessment_key
from fhir_adapters.writeback.strategy import is_ours
from fhir_adapters.project import IDENTIFIER_SYSTEM


def page(ids, total=None, include=(), outcome=False):
    entries = [{"search": {"mode": "match"}, "resource": {"resourceType": "Observation", "id": i}} for i in ids]
    entries += [{"search": {"mode": "include"}, "resource": {"resourceType": "Patient", "id": i}} for i in include]
    if outcome:
        entries.append({"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome"}})
    b = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    if total is not None:
        b["total"] = total
    return b


def _unescape_split(text: str, sep: str, keep_escapes: bool = False) -> list[str]:
    """How a conforming server splits an escaped value on ``sep``."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i:i + 2] if keep_escapes else text[i + 1]
            i += 2
            continue
        if text[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    return parts + [cur]


@settings(max_examples=200, deadline=None)
@given(system=st.text(min_size=1, max_size=20), code=st.text(min_size=1, max_size=20))
def test_a_token_splits_back_into_its_system_and_code(system, code):
    assert _unescape_split(token(system, code), "|") == [system, code]
    one = token(system, code)
    assert _unescape_split(",".join([one, one]), ",", keep_escapes=True) == [one, one]


def test_escape_names_every_special_character():
    assert escape("a|b,c$d\\e") == "a\\|b\\,c\\$d\\\\e"
    assert token(None, "x|y") == "x\\|y"


def test_count_of():
    assert count_of([("_count", "500"), ("patient", "a")]) == 500
    assert count_of([("patient", "a")]) is None
    assert count_of([("_count", "many")]) is None


def test_a_page_without_next_that_leaves_results_out_is_a_shortfall():
    c = Completeness(500)
    _, matches, new = c.add(page(["a", "b"], total=3, include=["p"], outcome=True))
    assert (matches, new, c.total, c.matched) == (2, 2, 3, 2)
    assert "2 of 3" in c.shortfall(matches)


def test_total_reached_or_a_short_last_page_is_complete():
    c = Completeness(2)
    c.add(page(["a", "b"], total=2))
    assert c.shortfall(2) is None
    c = Completeness(10)
    c.add(page(["a", "b"]))
    assert c.shortfall(2) is None


def test_a_full_last_page_without_total_is_checked_not_assumed():
    c = Completeness(2)
    c.add(page(["a", "b"]))
    assert "full" in c.shortfall(2)


def test_repeated_results_are_not_counted_twice():
    c = Completeness(2)
    c.add(page(["a", "b"], total=4))
    shown, matches, new = c.add(page(["a", "b"]))     # a server that ignored _offset
    assert (matches, new, c.matched) == (2, 0, 2)
    assert shown["entry"] == []
    shown, matches, new = c.add(page(["b", "c"]))
    assert (new, c.matched, [e["resource"]["id"] for e in shown["entry"]]) == (1, 3, ["c"])


def test_a_boolean_or_text_total_is_not_a_total():
    for bad in (True, "3", 2.5):
        c = Completeness()
        c.add({**page(["a"]), "total": bad})
        assert c.total is None


def test_the_assessment_key_has_no_version_and_no_token_separators():
    key = assessment_key("Patient/p-1.x", "clm-recurrence-resectability")
    assert key == "clm-recurrence-resectability/Patient/p-1.x"
    assert not set(key) & set("|,$\\")
    assert assessment_id("Patient/p1", "rs") == assessment_id("Patient/p1", "rs")
    assert assessment_id("Patient/p1", "rs") != assessment_id("Patient/p2", "rs")
    with pytest.raises(ValueError, match="only A-Z"):  # a rule-set id the schema refuses
        assessment_key("Patient/p1", "rule|set")


def test_only_an_assessment_with_our_identifier_and_subject_is_ours():
    ra = {"identifier": [{"system": IDENTIFIER_SYSTEM, "value": "rs/Patient/p1"}],
          "subject": {"reference": "Patient/p1"}}
    assert is_ours(dict(ra), ra)
    assert not is_ours({**ra, "subject": {"reference": "Patient/p2"}}, ra)
    assert not is_ours({**ra, "identifier": [{"system": "other", "value": "rs/Patient/p1"}]}, ra)
    assert not is_ours({"subject": {"reference": "Patient/p1"}, "identifier": "junk"}, ra)


@pytest.mark.parametrize("bundle, problem", [
    ({"entry": [5]}, "entry[0] is not an object"),
    ({"entry": {"a": 1}}, "entry is not a list"),
    ({"entry": [{"resource": "x"}]}, "entry[0].resource is not an object"),
    ({"entry": [{"search": "match"}]}, "entry[0].search is not an object"),
    ({"link": {"relation": "next"}}, "link is not a list of objects"),
    ({"link": ["next"]}, "link is not a list of objects"),
    ({"entry": [{"resource": {"resourceType": "Patient"}}], "link": []}, None),
])
def test_a_malformed_bundle_is_named_not_read_in_part(bundle, problem):
    from fhir_adapters.fhir.client import _malformed

    assert _malformed({"resourceType": "Bundle", **bundle}) == problem


# --------------------------------------------------------------------------- outcomes that cut results
def _oo(severity, code, text="server text"):
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


@pytest.mark.parametrize("severity", ["warning", "information"])
@pytest.mark.parametrize("code", sorted(CUT_CODES))
def test_an_outcome_saying_data_were_left_out_is_a_cut_at_any_severity(severity, code):
    why = results_cut(_oo(severity, code))
    assert why and code in why and "server text" in why


@pytest.mark.parametrize("severity", ["warning", "information"])
@pytest.mark.parametrize("code", sorted(WARNING_CODES))
def test_an_outcome_about_the_request_is_a_warning_only(severity, code):
    assert results_cut(_oo(severity, code)) is None


@pytest.mark.parametrize("severity", ["fatal", "error"])
@pytest.mark.parametrize("code", ["not-supported", "informational", "incomplete", "processing"])
def test_an_error_outcome_is_a_cut_whatever_its_code(severity, code):
    assert results_cut(_oo(severity, code)).startswith(f"{severity} {code}")


@pytest.mark.parametrize("outcome", [
    {"resourceType": "OperationOutcome"}, {"resourceType": "OperationOutcome", "issue": []},
    _oo("warning", "made-up-code"), _oo("warning", None), "text", {"resourceType": "OperationOutcome", "issue": [3]},
])
def test_an_outcome_that_cannot_be_read_is_not_taken_as_harmless(outcome):
    assert results_cut(outcome)


def test_one_cutting_issue_among_warnings_is_enough():
    oo = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "warning", "code": "not-supported", "diagnostics": "Unknown parameter 'x'; ignored"},
        {"severity": "warning", "code": "too-costly", "details": {"text": "capped at 100"}}]}
    assert results_cut(oo) == "warning too-costly (the server stopped to protect its resources): capped at 100"


# --------------------------------------------------------------------------- malformed outcomes (issue 15, pass 2)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
ISSUE = st.fixed_dictionaries({}, optional={"severity": JSON | st.sampled_from(["fatal", "error", "warning", "information"]),
                                            "code": JSON | st.sampled_from(sorted(set(CUT_CODES) | WARNING_CODES)),
                                            "diagnostics": JSON, "details": JSON})


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON, st.builds(lambda issues: {"resourceType": "OperationOutcome", "issue": issues},
                                 st.lists(ISSUE | JSON, max_size=3) | JSON)))
def test_results_cut_and_outcome_text_never_raise(outcome):
    """Whatever JSON a server puts where an OperationOutcome should be: a reason or None
    (a reason, unless every issue is a readable warning), and a text, never an exception."""
    from fhir_adapters.fhir.errors import operation_outcome_text

    why = results_cut(outcome)
    assert why is None or (isinstance(why, str) and why)
    if why is None:
        issues = outcome["issue"]
        assert issues and all(i.get("severity") in ("warning", "information") and i.get("code") in WARNING_CODES
                              for i in issues)
    assert isinstance(operation_outcome_text(outcome), str)


@pytest.mark.parametrize("issue, says", [
    ({"severity": "warning", "code": ["not-supported"]}, "code ['not-supported']"),    # the crash: unhashable
    ({"severity": "warning", "code": {"coding": "x"}}, "not an R4 issue type"),
    ({"severity": "bogus", "code": "not-supported"}, "severity 'bogus'"),
    ({"severity": ["warning"], "code": "not-supported"}, "not an R4 issue severity"),
    ({"code": "not-supported"}, "severity None"),
    ({"severity": "warning", "code": "not-supported", "diagnostics": ["x"], "details": []}, "severity"),
])
def test_an_outcome_of_the_wrong_shape_is_a_cut_not_a_crash(issue, says):
    why = results_cut({"resourceType": "OperationOutcome", "issue": [issue]})
    if issue.get("severity") == "warning" and issue.get("code") == "not-supported":
        assert why is None   # readable: its odd text fields change nothing
    else:
        assert says in why


@pytest.mark.parametrize("bundle, problem", [
    ({"total": "5"}, "total is not a non-negative integer ('5')"),
    ({"total": -1}, "total is not a non-negative integer ('-1')"),
    ({"total": True}, "total is not a non-negative integer ('True')"),
    ({"link": [{"relation": ["next"], "url": "http://h/x"}]}, "link[0] has a relation or url that is not a string"),
    ({"link": [{"url": "http://h/x"}]}, "link[0] has a relation or url that is not a string"),
    ({"total": 0, "link": [{"relation": "Next", "url": "http://h/x"}]}, None),
])
def test_a_total_or_link_of_the_wrong_type_is_a_malformed_bundle(bundle, problem):
    from fhir_adapters.fhir.client import _malformed

    assert _malformed({"resourceType": "Bundle", **bundle}) == problem
