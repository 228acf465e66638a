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
* ``links``: the RiskAssessment on the FHIR server (``absolute``: on the named
  ``fhirServer``, else the prefetch entry's absolute ``fullUrl``; the detail says when it
  cannot be linked): as is when it says the same clinically (group, status, rule set,
  factors, basis: not the warnings of how this call read the record), labelled out of
  date when it says something else (the detail names what). The detail says "not written yet" only when a complete search found
  none, and "could not check" when there was no FHIR server and no usable ``assessment``
  prefetch, or the search was cut or refused (:class:`OnServer`).

A patient with no liver recurrence gets no card: ``patient-view`` fires at every chart
opening and a card for every patient without the disease would be noise.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Literal

from engine import explain
from engine.classify import Classification
from engine.ruleset import RuleSet
from fhir_adapters.project import RULESET_SYSTEM

SUMMARY_PREFIX = "CLM recurrence: "
MAX_SUMMARY = 139      # the spec: "<140-character summary"
MAX_REFS = 6           # evidence references shown per factor

# What a record's text may not bring into a card, each as U+FFFD (the narrative's rule, C1 too):
# control characters but the whitespace ones (tab, line breaks: they become spaces), lone
# surrogates (a JSON "\ud800" escape), U+FFFE, U+FFFF.
_UNPRINTABLE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
# What can start inline Markdown or HTML anywhere in a line: an escape, code, emphasis,
# strikethrough, a link or image, a table cell; HTML or an autolink ("<" before a letter,
# "/", "!", "?": "p < 0.05" stays), an entity ("&" before a letter or "#"); GFM's autolinks
# (cmark-gfm's autolink extension): the ":" of the schemes it links, http, https, ftp,
# mailto, xmpp (any case; other colons, "doi:10.1245/...", stay), the "." of "www.". Each gets a "\".
# An e-mail address ("a@b.example", "mailto:a@b.example", "xmpp:...") is linked after the
# text is put together (cmark-gfm merges text nodes first): no escape stops it. A word
# joiner (U+2060, invisible) between the "@" and what could be an address's local part does.
_INLINE = re.compile(r"[\\`*_\[\]|~]|<(?=[a-z/!?])|&(?=[a-z#])|(?:(?<=http)|(?<=https)|(?<=ftp)|(?<=mailto)|(?<=xmpp)):(?=\S)|(?<=www)\.|(?<=[a-z0-9.+_-])@",
                     re.IGNORECASE)
# What can start a block at the start of a line (a list item's text included): a heading, a
# quote, a bullet, a setext underline; the "1." / "1)" of an ordered list (the "\" goes after
# the digits). "*" "`" "~" "<" "|" are escaped anywhere already; leading spaces are gone.
_BLOCK_START = re.compile(r"(?=[#>+=-])|[0-9]{1,9}(?=[.)](?: |$))")


def _escape(m: re.Match) -> str:
    return "\u2060@" if m[0] == "@" else "\\" + m[0]


def plain(text: object) -> str:
    """``text`` on one line: unprintable characters as U+FFFD, whitespace runs as one space."""
    return " ".join(_UNPRINTABLE.sub("\ufffd", str(text)).split())


def md(text: object, line_start: bool = True) -> str:
    r"""``text`` as literal Markdown text that still reads as plain text: only what could
    start Markdown or HTML is backslash-escaped (no emphasis, code, link, autolink, HTML or
    table can start; an e-mail address's "@" gets a word joiner before it), on one line
    (:func:`plain`); with ``line_start`` (the text may begin a line or a list item's text) a
    block starter at its start too: mid-line, pass False.

    >>> print(md("<b>x</b> [a](HTTP://e.example) *y* www.e.example p >= 0.05, doi:10.1245/x"))
    \<b>x\</b> \[a\](HTTP\://e.example) \*y\* www\.e.example p >= 0.05, doi:10.1245/x
    >>> print(md(">= 4 lesions"), "|", md(">= 4 lesions", line_start=False), "|", md("1. a\n b"))
    \>= 4 lesions | >= 4 lesions | 1\. a b
    """
    out = _INLINE.sub(_escape, plain(text))
    start = _BLOCK_START.match(out) if line_start else None
    return out[:start.end()] + "\\" + out[start.end():] if start else out


def code(text: object) -> str:
    r"""``text`` as a code span, read verbatim (references, identifiers), on one line
    (:func:`plain`); as :func:`md` text when it holds a backtick or nothing.

    >>> print(code("Observation/f11-ct-les1/_history/1"), code("a`b"))
    `Observation/f11-ct-les1/_history/1` a\`b
    """
    text = plain(text)
    return f"`{text}`" if text and "`" not in text else md(text, line_start=False)


def indicator(r: Classification, ruleset: RuleSet) -> str:
    return ruleset.card_indicators[r.group][r.status]


def summary(r: Classification) -> str:
    text = SUMMARY_PREFIX + explain.headline(r)
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 1] + "…"


def _evidence(refs: tuple[str, ...]) -> str:
    if not refs:
        return ""
    shown = ", ".join(code(ref) for ref in refs[:MAX_REFS])
    more = f" and {len(refs) - MAX_REFS} more" if len(refs) > MAX_REFS else ""
    return f"; evidence: {shown}{more}"


@dataclass(frozen=True)
class OnServer:
    """What the card says of the RiskAssessment on the FHIR server: ``same`` (it says
    what the card says), ``differs`` (it says something else: ``says``), ``none`` (a
    complete search found none of ours), ``unknown`` (could not check: ``why``, logged
    only). ``url``: the assessment on the server, linked: on the named FHIR server, else
    the absolute ``fullUrl`` the ``assessment`` prefetch gives it; None when neither."""

    state: Literal["same", "differs", "none", "unknown"]
    url: str | None = None
    says: str = ""
    why: str = ""


UNKNOWN = OnServer("unknown", why="not looked up")


_NO_LINK = "not linked: neither fhirServer nor an absolute fullUrl in the assessment prefetch locates it"


def _on_server_text(on: OnServer) -> str:
    if on.state == "same":
        return ("**RiskAssessment:** the one on the FHIR server says the same"
                + (" (linked below)." if on.url else f" ({_NO_LINK})."))
    if on.state == "differs":
        return (f"**RiskAssessment:** the one on the FHIR server says {md(on.says, line_start=False)} and differs from this card"
                + (" (linked below, out of date)" if on.url else f" ({_NO_LINK})")
                + "; clm-stratify run or serve updates it (this service writes nothing).")
    if on.state == "none":
        return ("**RiskAssessment:** not written to the FHIR server yet (this service writes nothing; "
                "clm-stratify run or serve writes it).")
    return "**RiskAssessment:** could not check whether one is on the FHIR server."


def detail(r: Classification, on_server: OnServer = UNKNOWN) -> str:
    lines = [f"**Why:** {md(explain.reason_text(r))}", "", "**Prognostic factors at recurrence**", ""]
    for c in r.criteria.values():
        threshold = explain.threshold_text(c)
        line = f"- {md(explain.factor_text(c))}" + (f" (threshold {md(threshold, line_start=False)})" if threshold else "")
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
    lines.append(_on_server_text(on_server))
    return "\n".join(lines)


def source(r: Classification) -> dict:
    rs = r.ruleset
    out: dict = {"label": " ".join(rs.citation.split())[:300] or rs.title,
                 "topic": {"system": RULESET_SYSTEM, "code": rs.id, "display": rs.title}}
    if rs.doi:
        out["url"] = f"https://doi.org/{rs.doi}"
    return out


def card(r: Classification, ruleset: RuleSet, on_server: OnServer = UNKNOWN) -> dict:
    """The card of one assessed classification by ``ruleset`` (the rule set that made it)."""
    out = {"uuid": str(uuid.uuid4()), "summary": summary(r), "indicator": indicator(r, ruleset),
           "detail": detail(r, on_server), "source": source(r)}
    if on_server.url and on_server.state in ("same", "differs"):
        label = ("RiskAssessment on the FHIR server" if on_server.state == "same"
                 else "RiskAssessment on the FHIR server (out of date)")
        out["links"] = [{"label": label, "url": on_server.url, "type": "absolute"}]
    return out


def cards(r: Classification, ruleset: RuleSet, on_server: OnServer = UNKNOWN) -> dict:
    """The service response: one card, or none when the rule set assesses nothing."""
    return {"cards": [card(r, ruleset, on_server)] if r.assessed else []}
