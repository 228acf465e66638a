"""The RiskAssessment's narrative (``text``): the classification as a clinician reads it.

Built from the same words as the text report and the note (:mod:`engine.explain`), as an
XHTML fragment that FHIR accepts (R4 Narrative, txt-1 / txt-2):

* one root ``<div xmlns="http://www.w3.org/1999/xhtml">``, never empty;
* only ``div h3 p b ul li``: plain formatting elements of the txt-1 list, no attributes
  (no scripts, forms, objects, event handlers or external images: nothing to run or fetch);
* every dynamic string (rule-set texts, references, notes, warnings from the record) is
  escaped (``html.escape``, quotes too), and characters XML 1.0 cannot carry (control
  characters, lone surrogates, U+FFFE/U+FFFF) are replaced by U+FFFD: a record's text
  can neither add markup nor make the fragment unreadable.

``status`` is ``generated``: everything in it comes from the resource's other fields, so
whether a re-run changes the assessment compares what it says (:func:`normal_text`), not
its markup, which a server may serialise again (whitespace, attribute order, entities).

    >>> _text('<b onclick="x()">&\\x01')
    '&lt;b onclick=&quot;x()&quot;&gt;&amp;\\ufffd'
"""

from __future__ import annotations

import functools
import html
import re
import xml.etree.ElementTree as ET

from engine import explain
from engine.classify import Classification, Criterion

XHTML_NS = "http://www.w3.org/1999/xhtml"

# Not allowed in XML 1.0 documents (the narrative is one): C0 controls but tab, LF, CR;
# surrogates (a lone one can come from a JSON "\ud800" escape); U+FFFE, U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# R4 Narrative.div, txt-1: the elements and attributes a narrative may use (the spec's list).
TXT1_ELEMENTS = frozenset(
    "a abbr acronym b big blockquote br caption cite code col colgroup dd dfn div dl dt em h1 h2 h3 h4 h5 "
    "h6 hr i img li ol p pre q samp small span strong sub sup table tbody td tfoot th thead tr tt ul var".split())
TXT1_ATTRIBUTES = frozenset(
    "abbr accesskey align alt axis bgcolor border cellhalign cellpadding cellspacing cellvalign char charoff "
    "charset cite class colspan compact coords dir frame headers height href hreflang hspace id lang longdesc name "
    "nowrap rel rev rowspan rules scope shape span src start style summary tabindex title type valign value "
    "vspace width".split())


def check_xhtml(div: str) -> None:
    """Raise ValueError unless ``div`` is a narrative FHIR accepts and this program may
    write: well-formed XML, one XHTML ``div`` at the root, only txt-1 elements and
    attributes, no image or link to fetch from elsewhere, some text (txt-2)."""
    try:
        root = ET.fromstring(div)
    except ET.ParseError as exc:
        raise ValueError(f"narrative is not well-formed XHTML: {exc}") from None
    if root.tag != f"{{{XHTML_NS}}}div":
        raise ValueError(f"narrative root is {root.tag}, not an XHTML div")
    for el in root.iter():
        ns, _, name = el.tag.rpartition("}")
        if ns != "{" + XHTML_NS or name not in TXT1_ELEMENTS:
            raise ValueError(f"narrative element {el.tag} is not allowed (txt-1)")
        for attr, value in el.attrib.items():
            if attr not in TXT1_ATTRIBUTES:
                raise ValueError(f"narrative attribute {attr} on {name} is not allowed (txt-1)")
            if attr in ("src", "href") and not value.startswith("#"):
                raise ValueError(f"narrative {name}/@{attr} refers outside the resource: {value[:60]}")
    if not "".join(root.itertext()).strip():
        raise ValueError("narrative has no text (txt-2)")


@functools.lru_cache(maxsize=4096)   # rule-set texts repeat in every narrative of a population run
def _text(s: str) -> str:
    """A dynamic string as XHTML character data."""
    return html.escape(_NOT_XML.sub("\ufffd", s), quote=True)


def _p(label: str, text: str) -> str:
    """A paragraph with a bold label (a literal of this module, not escaped)."""
    return f"<p><b>{label}</b> {_text(text)}</p>"


def _list(title: str, items: list[str]) -> list[str]:
    """A titled list (``title`` a literal of this module, each item already XHTML);
    nothing when there are no items."""
    if not items:
        return []
    return [f"<p><b>{title}</b></p>", "<ul>", *(f"<li>{i}</li>" for i in items), "</ul>"]


def _evidence(c: Criterion) -> str:
    return f" Evidence: {', '.join(c.refs)}." if c.refs else ""


def _factor(c: Criterion) -> str:
    threshold = explain.threshold_text(c)
    text = explain.factor_text(c) + (f" (threshold {threshold})" if threshold else "") + "."
    if c.state == "unknown" and c.note:
        text += f" Why unknown: {c.note}."
    return _text(text + _evidence(c))


def narrative(r: Classification) -> dict:
    """``RiskAssessment.text`` for ``r``: ``{"status": "generated", "div": ...}``."""
    parts = [f'<div xmlns="{XHTML_NS}">', f"<h3>{_text(explain.headline(r))}</h3>"]
    if not r.assessed and r.not_assessed_reason:
        parts.append(f"<p>{_text(r.not_assessed_reason)}</p>")
    parts.append(_p("Why:", explain.reason_text(r)))
    parts += _list("Prognostic factors at recurrence", [_factor(c) for c in r.criteria.values()])
    parts += _list("Other facts", [_text(explain.factor_text(c) + "." + _evidence(c)) for c in r.facts.values()])
    parts += _list("Missing facts", [_text(m) for m in explain.missing_texts(r)])
    parts += _list("Recommendations", [_text(t) for t in explain.recommendation_texts(r)])
    cohort = explain.cohort_text(r)
    if cohort:
        parts.append(f"<p>{_text(cohort)}</p>")
    if r.status_note:
        parts.append(_p("Status:", r.status_note))
    parts.append(_p("Rule set:", explain.ruleset_text(r)))
    parts.append(_p("Source:", r.ruleset.citation))
    parts += _list("Data warnings", [_text(w) for w in r.warnings])
    parts.append("</div>")
    return {"status": "generated", "div": "".join(parts)}


def normal_text(text: object) -> tuple[str, ...] | None:
    """What a narrative says, for comparing a stored one with a new one: its status and
    the words of its XHTML in order, whatever the server made of whitespace, entities,
    attribute order or namespace prefixes. None when there is no narrative.

    >>> a = normal_text({"status": "generated", "div": f'<div xmlns="{XHTML_NS}"><p>a &amp; b</p><p>c</p></div>'})
    >>> a == normal_text({"status": "generated", "div": f'<div xmlns="{XHTML_NS}">\\n <p>a &#38; b</p>\\n<p>c </p></div>'})
    True
    >>> a == normal_text({"status": "generated", "div": f'<div xmlns="{XHTML_NS}"><p>a &amp; c</p></div>'})
    False
    """
    if not isinstance(text, dict) or not isinstance(text.get("div"), str):
        return None
    try:
        pieces = ET.fromstring(text["div"]).itertext()
    except ET.ParseError:   # not what this program writes: compared as written
        pieces = iter((text["div"],))
    return (str(text.get("status")), *(w for piece in pieces for w in piece.split()))
