"""The interop report's judgements, without a server: what counts as paging cut short,
what an unknown search parameter did, and that every quirk the steps can name exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clm_stratify.interop.checks import QUIRKS
from clm_stratify.interop.probes import SearchAttempt, UnknownParamProbe
from clm_stratify.interop.search import SearchPages

INTEROP = Path(__file__).resolve().parents[2] / "clm_stratify" / "interop"


def pages(sizes, has_next, totals) -> SearchPages:
    return SearchPages(pages=len(sizes), page_sizes=list(sizes), has_next=list(has_next), totals=list(totals))


@pytest.mark.parametrize("res, cut", [
    (pages([2, 2, 1], [True, True, False], [5, 5, 5]), None),                 # next links to the end
    (pages([2, 2, 1], [True, True, False], [None] * 3), None),                # no total, next links
    (pages([2, 2, 1], [False, False, False], [5, 5, 5]), (1, 2)),             # Medplum + the client's _offset
    (pages([2], [False], [5]), (1, 2)),                                       # cut short, nothing more came
    (pages([2, 2], [True, False], [None, None]), None),                       # ends properly without a total
    (pages([2, 2, 2], [False, False, False], [None] * 3), (1, 2)),            # full pages, no link, no total
    (pages([5], [False], [5]), None),                                         # one page, all of it
    (pages([], [], []), None),
])
def test_a_page_without_next_link_is_cut_short_only_when_more_existed(res, cut):
    assert res.cut_short() == cut


def probe(control, lenient, strict) -> UnknownParamProbe:
    return UnknownParamProbe("clm-interop-unknown-x", control, lenient, strict)


OK3 = SearchAttempt(200, 3)


@pytest.mark.parametrize("attempt, effect, text", [
    (SearchAttempt(200, 3), "ignored", "HTTP 200: ignored (3 results, as without the parameter); no warning"),
    (SearchAttempt(200, 3, ["Unknown search parameter 'x'"]), "ignored",
     "HTTP 200: ignored (3 results, as without the parameter); warning: Unknown search parameter 'x'"),
    (SearchAttempt(200, 0), "matched-nothing",
     "HTTP 200: matched nothing (0 results, 3 without the parameter; neither ignored nor rejected); no warning"),
    (SearchAttempt(400, 0, [], "Unknown search parameter 'x'"), "rejected",
     "HTTP 400: rejected (Unknown search parameter 'x')"),
    (SearchAttempt(None, 0, [], ""), "rejected", "HTTP (no answer): rejected"),
    (SearchAttempt(200, 1), "filtered", "HTTP 200: filtered (1 results, 3 without the parameter); no warning"),
])
def test_what_an_unknown_parameter_did_is_said_exactly(attempt, effect, text):
    u = probe(OK3, attempt, attempt)
    assert u.effect(attempt) == effect
    assert u.describe(attempt) == text


def test_an_empty_control_gives_no_verdict():
    """No tagged resource found even without the parameter: no claim either way."""
    u = probe(SearchAttempt(200, 0), SearchAttempt(200, 0), SearchAttempt(200, 0))
    assert u.effect(u.lenient) == "unknown"
    assert "effect unknown" in u.describe(u.lenient)


def _quirk_ids_used() -> set[str]:
    used = set()
    for path in INTEROP.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "quirk"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                used.add(node.args[0].value)
    return used


def test_every_quirk_a_step_can_name_is_declared():
    used = _quirk_ids_used()
    assert {"paging-absent", "count-not-honoured", "bundle-total-absent", "unknown-parameter-matches-nothing",
            "handling-strict-ignored", "identifier-search-misses"} <= used
    assert used <= set(QUIRKS), used - set(QUIRKS)
