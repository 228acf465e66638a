"""CDS Hooks cards from a classification: the same words as the text report and the
RiskAssessment (:mod:`engine.explain`), in the card's fields.

* ``summary``: ``CLM recurrence: <group label> (<status>)`` (< 140 characters).
* ``indicator``: the urgency of attention, per group and status, from the rule set
  (``card_indicators`` in rules/resectability.yaml: ``info`` only for a final
  resectable result, never ``critical``).
* ``detail`` (GitHub Flavored Markdown): why, the factors with their values, thresholds
  and evidence, the other facts, missing facts, recommendations, the cohort estimate with
  its caveat, the status note, warnings, the rule set, and whether the RiskAssessment on
  the FHIR server says the same. Every dynamic string is escaped (:func:`md`): a record
  cannot inject a link, HTML or layout into the card.
* ``source``: the study's citation, ``https://doi.org/<doi>``, topic = the rule set.
* ``links``: the RiskAssessment on the FHIR server when the one there says exactly this
  (``absolute``); none otherwise, and the detail says it is not written yet.

A patient with no liver recurrence gets no card: ``patient-view`` fires at every chart
opening and a card for every patient without the disease would be noise.
"""

from __future__ import annotations

import re
import uuid

from engine import explain
from engine.classify import Classification
from engine.ruleset import RuleSet
from fhir_adapters.project import RULESET_SYSTEM

SUMMARY_PREFIX = "CLM recurrence: "
MAX_SUMMARY = 139      # the spec: "<140-character summary"
MAX_REFS = 6           # evidence references shown per factor

_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")     # every ASCII punctuation character


def md(text: object) -> str:
    """``text`` as literal Markdown text: each ASCII punctuation character backslash-escaped
    (no emphasis, code, link, autolink, HTML or table can start) and line breaks as spaces
    (no block can start).

    >>> md("<b>x</b> [a](http://e.example) *y*")
    '\\\\<b\\\\>x\\\\<\\\\/b\\\\> \\\\[a\\\\]\\\\(http\\\\:\\\\/\\\\/e\\\\.example\\\\) \\\\*y\\\\*'
    """
    return _PUNCT.sub(r"\\\1", " ".join(str(text).split()))


def indicator(r: Classification, ruleset: RuleSet) -> str:
    return ruleset.card_indicators[r.group][r.status]


def summary(r: Classification) -> str:
    text = SUMMARY_PREFIX + explain.headline(r)
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 1] + "…"


def _evidence(refs: tuple[str, ...]) -> str:
    if not refs:
        return ""
    shown = ", ".join(md(ref) for ref in refs[:MAX_REFS])
    more = f" and {len(refs) - MAX_REFS} more" if len(refs) > MAX_REFS else ""
    return f"; evidence: {shown}{more}"


def detail(r: Classification, assessment_url: str | None) -> str:
    lines = [f"**Why:** {md(explain.reason_text(r))}", "", "**Prognostic factors at recurrence**", ""]
    for c in r.criteria.values():
        threshold = explain.threshold_text(c)
        line = f"- {md(explain.factor_text(c))}" + (f" (threshold {md(threshold)})" if threshold else "")
        line += _evidence(c.refs)
        if c.state == "unknown" and c.note:
            line += f"; why unknown: {md(c.note)}"
        lines.append(line)
    lines += ["", "**Other facts**", ""]
    lines += [f"- {md(c.label)}: {md(explain.state_text(c.state))}{_evidence(c.refs)}" for c in r.facts.values()]
    for title, texts in (("Missing facts", explain.missing_texts(r)),
                         ("Recommendations", explain.recommendation_texts(r))):
        if texts:
            lines += ["", f"**{title}**", ""] + [f"- {md(t)}" for t in texts]
    cohort = explain.cohort_text(r)
    if cohort:
        lines += ["", md(cohort)]
    if r.status_note:
        lines += ["", f"**Status:** {md(r.status_note)}"]
    if r.warnings:
        lines += ["", "**Warnings**", ""] + [f"- {md(w)}" for w in r.warnings]
    lines += ["", f"**Rule set:** {md(explain.ruleset_text(r))}", ""]
    if assessment_url:
        lines.append("**RiskAssessment:** the one on the FHIR server says the same (linked below).")
    else:
        lines.append("**RiskAssessment:** not written to the FHIR server yet (this service writes nothing; "
                     "clm\\-stratify run or serve writes it).")
    return "\n".join(lines)


def source(r: Classification) -> dict:
    rs = r.ruleset
    out: dict = {"label": " ".join(rs.citation.split())[:300] or rs.title,
                 "topic": {"system": RULESET_SYSTEM, "code": rs.id, "display": rs.title}}
    if rs.doi:
        out["url"] = f"https://doi.org/{rs.doi}"
    return out


def card(r: Classification, ruleset: RuleSet, assessment_url: str | None = None) -> dict:
    """The card of one assessed classification by ``ruleset`` (the rule set that made it)."""
    out = {"uuid": str(uuid.uuid4()), "summary": summary(r), "indicator": indicator(r, ruleset),
           "detail": detail(r, assessment_url), "source": source(r)}
    if assessment_url:
        out["links"] = [{"label": "RiskAssessment on the FHIR server", "url": assessment_url, "type": "absolute"}]
    return out


def cards(r: Classification, ruleset: RuleSet, assessment_url: str | None = None) -> dict:
    """The service response: one card, or none when the rule set assesses nothing."""
    return {"cards": [card(r, ruleset, assessment_url)] if r.assessed else []}
