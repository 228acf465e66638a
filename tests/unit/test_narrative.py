"""The RiskAssessment's narrative and the words of a result (engine/explain.py).

The narrative is checked without a screenshot: every fixture's narrative, and one built
from hostile strings, must parse as well-formed XML with an XHTML ``div`` at the root,
use only the elements and attributes of R4's txt-1 list (no event handler, no external
``src``), carry text (txt-2) and pass the R4B model. The checker here is written
independently of :func:`fhir_adapters.writeback.narrative.check_xhtml`, which the writer
runs before anything leaves the program.
"""

from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from clm_stratify.cli.output import text_report
from clm_stratify.pipeline import Rules, evaluate
from engine import explain
from engine.classify import Engine, MissingFact, Recommendation
from engine.features import Fact, Features
from engine.reference import classify_many_eager
from engine.ruleset import load_ruleset
from fhir_adapters.fhir.client import dumps
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.writeback import narrative as narrative_module
from fhir_adapters.writeback.narrative import check_xhtml, narrative, normal_text
from fhir_adapters.writeback.resources import build_provenance, build_risk_assessment, same_assessment
from fixtures import FIXTURES_DIR

XHTML = "{http://www.w3.org/1999/xhtml}"
# R4 Narrative.div txt-1 (the xpath of the constraint in the R4 StructureDefinition).
ELEMENTS = {"a", "abbr", "acronym", "b", "big", "blockquote", "br", "caption", "cite", "code", "col", "colgroup",
            "dd", "dfn", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "li", "ol",
            "p", "pre", "q", "samp", "small", "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th",
            "thead", "tr", "tt", "ul", "var"}
ATTRIBUTES = {"abbr", "accesskey", "align", "alt", "axis", "bgcolor", "border", "cellhalign", "cellpadding",
              "cellspacing", "cellvalign", "char", "charoff", "charset", "cite", "class", "colspan", "compact", "coords",
              "dir", "frame", "headers", "height", "href", "hreflang", "hspace", "id", "lang", "longdesc", "name",
              "nowrap", "rel", "rev", "rowspan", "rules", "scope", "shape", "span", "src", "start", "style",
              "summary", "tabindex", "title", "type", "valign", "value", "vspace", "width"}
R4_TYPES = (Path(__file__).parents[1] / "support" / "medplum" / "node_modules" / "@medplum" / "definitions"
            / "dist" / "fhir" / "r4" / "profiles-types.json")

RULES = Rules.load()
FIXTURE_FILES = sorted(p.name for p in FIXTURES_DIR.glob("[0-9]*.json"))


def result(name: str):
    return evaluate(read_bundle_file(FIXTURES_DIR / name), RULES)


def assessment(r) -> dict:
    return build_risk_assessment(r, occurrence="2024-05-01T00:00:00+00:00")


def assert_valid_narrative(ra: dict) -> ET.Element:
    """The must-show check: well-formed XHTML within FHIR's allowed elements."""
    text = ra["text"]
    assert text["status"] == "generated"
    root = ET.fromstring(text["div"])                       # well-formed XML, or ParseError
    assert root.tag == XHTML + "div"
    for el in root.iter():
        assert el.tag.startswith(XHTML) and el.tag[len(XHTML):] in ELEMENTS, el.tag
        for attr, value in el.attrib.items():
            assert attr in ATTRIBUTES and not attr.lower().startswith("on"), attr
            assert attr != "src" or value.startswith("#"), value
    assert "".join(root.itertext()).strip()                 # txt-2
    RiskAssessment.model_validate(ra)
    dumps(ra).encode("utf-8")                              # serialisable as the writer sends it
    return root


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_every_fixture_narrative_is_valid_xhtml_and_says_what_the_note_says(name):
    r = result(name)
    if r.patient is None:
        pytest.skip("no patient: no assessment is written")
    ra = assessment(r)
    said = words(" ".join(assert_valid_narrative(ra).itertext()))
    report = words(text_report(r))
    notes = " ".join(n["text"] for n in ra["note"])
    assert explain.headline(r) in said and explain.headline(r) in report and explain.headline(r) in notes
    for c in r.criteria.values():
        line = explain.factor_text(c)
        assert line in said and line in report and line in notes
    for m in explain.missing_texts(r):
        assert words(m) in said and words(m) in report
    for rec in r.recommendations:
        assert words(rec.text) in said and rec.text in ra["mitigation"]
    if r.cohort_survival:
        assert words(explain.cohort_text(r)) in said and r.cohort_survival.caveat in said
    for ref in r.evidence_refs():
        assert ref in said
    assert ra["prediction"][0]["qualitativeRisk"]["text"] == r.group_label


HOSTILE = ('<script>alert("x")</script>', "a & b &amp; c", "quotes \" ' `", "]]> <![CDATA[ x ]]>",
           "<img src=\"http://evil.example/x.png\" onerror=\"steal()\"/>", "--> <!-- ", "<?xml-stylesheet x?>")
# Characters XML 1.0 cannot carry: each must become U+FFFD. JSON can carry all of them
# ("\u0001", a lone "\ud800"), so a FHIR record can bring them in. The R4B model refuses
# lone surrogates in any string (the whole RiskAssessment, not only its narrative), so
# they are tried on the narrative alone.
UNXML = ("\x00", "\x01", "\x0b", "\x1f", "\ufffe", "\uffff")
SURROGATES = ("\ud800", "\udfff")


def hostile_result(chars: tuple[str, ...] = UNXML):
    """The 15 fixture's result with hostile strings in every text the narrative shows."""
    assert json.loads('"\\u0001\\ud800"') == "\x01\ud800"    # JSON does carry them
    r = result("15-indeterminate-size-missing.json")
    evil = " ".join(HOSTILE) + " " + "".join(chars)
    criteria = {k: dataclasses.replace(c, label=f"{c.label} {evil}", note=evil, refs=(*c.refs, f"Observation/{evil}"))
                for k, c in r.criteria.items()}
    facts = {k: dataclasses.replace(c, label=f"{c.label} {evil}") for k, c in r.facts.items()}
    return dataclasses.replace(
        r, group_label=f"Indeterminate {evil}", reason=evil, status_note=evil, criteria=criteria, facts=facts,
        missing=(MissingFact(fact="x", text=evil, detail=evil),),
        recommendations=(Recommendation(rule="R-x", text=evil),), warnings=(evil,)), evil


def test_hostile_strings_are_text_never_markup():
    r, evil = hostile_result()
    ra = build_risk_assessment(r, occurrence="2024-05-01T00:00:00+00:00")   # validated, check_xhtml included
    root = assert_valid_narrative(ra)
    shown = "".join(root.itertext())
    expected = evil
    for ch in UNXML:
        expected = expected.replace(ch, "\ufffd")
    assert shown.count(expected) >= 8                   # every hostile text is there, as text
    assert [el.tag[len(XHTML):] for el in root.iter() if el.tag[len(XHTML):] in ("script", "img")] == []
    assert "<script" not in ra["text"]["div"] and "onerror=\"" not in ra["text"]["div"]


def test_lone_surrogates_become_replacement_characters_in_the_narrative():
    r, evil = hostile_result(UNXML + SURROGATES)
    div = narrative(r)["div"]
    check_xhtml(div)
    root = ET.fromstring(div)
    assert not any(ch in div for ch in UNXML + SURROGATES)
    assert "\ufffd" * len(UNXML + SURROGATES) in "".join(root.itertext())
    div.encode("utf-8")


def test_the_check_fails_when_escaping_is_removed(monkeypatch):
    """Escaping switched off (as a bug would): the same hostile input fails the check."""
    r, _ = hostile_result()
    monkeypatch.setattr(narrative_module, "_text", str)
    raw = narrative(r)["div"]
    with pytest.raises((ET.ParseError, AssertionError)):
        assert_valid_narrative({**assessment(result("15-indeterminate-size-missing.json")), "text": {
            "status": "generated", "div": raw}})
    with pytest.raises(ValueError, match="narrative"):
        check_xhtml(raw)
    with pytest.raises(ValueError, match="narrative"):
        build_risk_assessment(r, occurrence="2024-05-01T00:00:00+00:00")


@pytest.mark.parametrize("div, problem", [
    ('<div xmlns="http://www.w3.org/1999/xhtml"><p>a & b</p></div>', "well-formed"),
    ('<div><p>no namespace</p></div>', "root"),
    ('<div xmlns="http://www.w3.org/1999/xhtml"><script>x()</script></div>', "script"),
    ('<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="x()">a</p></div>', "onclick"),
    ('<div xmlns="http://www.w3.org/1999/xhtml"><img src="https://evil.example/x.png"/>a</div>', "outside"),
    ('<div xmlns="http://www.w3.org/1999/xhtml"><p> </p></div>', "txt-2"),
])
def test_check_xhtml_refuses_what_fhir_does_not_allow(div, problem):
    with pytest.raises(ValueError, match=problem):
        check_xhtml(div)


@pytest.mark.skipif(not R4_TYPES.exists(), reason="Medplum's R4 definitions are not installed (tests/support/medplum)")
def test_allowed_lists_are_the_r4_specs_txt1():
    types = json.loads(R4_TYPES.read_text())
    div = next(el for e in types["entry"] if e["resource"].get("id") == "Narrative"
               for el in e["resource"]["snapshot"]["element"] if el["path"] == "Narrative.div")
    xpath = next(c["xpath"] for c in div["constraint"] if c["key"] == "txt-1")
    elements_part, attributes_part = xpath.split("@*")
    spec_elements = set(re.findall(r"'([a-z0-9]+)'", elements_part))
    spec_attributes = set(re.findall(r"'([a-z]+)'", attributes_part))
    assert spec_elements == ELEMENTS == narrative_module.TXT1_ELEMENTS
    assert spec_attributes == ATTRIBUTES == narrative_module.TXT1_ATTRIBUTES


def test_a_narrative_the_server_serialised_again_is_the_same_assessment():
    r = result("12-borderline-three-factors-adjuvant.json")
    ra = assessment(r)
    div = ra["text"]["div"]
    again = (div.replace("><", ">\n  <").replace("&gt;", "&#62;").replace(" xmlns=", "  xmlns=")
             .replace("<h3>", "<h3 >"))
    assert again != div and same_assessment({**ra, "text": {"status": "generated", "div": again}}, ra)
    changed = div.replace("present (6)", "present (7)")
    assert changed != div and not same_assessment({**ra, "text": {"status": "generated", "div": changed}}, ra)
    assert not same_assessment({k: v for k, v in ra.items() if k != "text"}, ra)   # written by an older release
    assert normal_text(None) is None


def test_the_size_lower_bound_reads_at_least_in_note_report_and_json():
    """The issue's case: the note said "unknown (21 mm)" where the report said "at least 21 mm"."""
    r = result("15-indeterminate-size-missing.json")
    size = r.criteria["largest_ge_50mm"]
    assert size.lower_bound and explain.value_text(size) == "at least 21 mm"
    line = "largest recurrent tumour 5 cm or more: unknown (at least 21 mm)"
    assert line in " ".join(n["text"] for n in assessment(r)["note"])
    assert line in words(text_report(r))
    assert r.to_json()["evidence"]["largest_ge_50mm"]["lower_bound"] is True


@pytest.mark.parametrize("fact, expected", [
    (Fact[Decimal](value=Decimal("32.0")), "32 mm"),
    (Fact[Decimal](value=Decimal("21"), lower_bound=True), "at least 21 mm"),
    (Fact[Decimal](at_most=Decimal("30"), at_most_strict=True), "less than 30 mm"),
    (Fact[Decimal](at_most=Decimal("30")), "at most 30 mm"),
    (Fact[Decimal](value=Decimal("21"), lower_bound=True, at_most=Decimal("60")), "at least 21 mm and at most 60 mm"),
    (Fact[Decimal](), "unknown"),
])
def test_value_text_of_a_size_as_the_engine_gives_it(fact, expected):
    c = Engine.default().classify(Features(patient="Patient/p", largest_diameter_mm=fact)).criteria["largest_ge_50mm"]
    assert explain.value_text(c) == expected
    shown = f" ({expected})" if expected != "unknown" else ""    # nothing known: the state says it
    assert explain.factor_text(c) == f"largest recurrent tumour 5 cm or more: {c.state}{shown}"


def test_value_text_of_counts_and_booleans():
    def crit(**features):
        return Engine.default().classify(Features(patient="Patient/p", **features)).criteria
    assert explain.value_text(crit(tumour_count=Fact[int](value=3))["tumour_count_ge_4"]) == "3"
    assert explain.value_text(crit(tumour_count=Fact[int](value=3, lower_bound=True))["tumour_count_ge_4"]) == "at least 3"
    ehd = crit(extrahepatic_disease=Fact[bool](value=True))["extrahepatic_disease"]
    assert explain.value_text(ehd) == "yes" and explain.factor_text(ehd) == "extrahepatic disease present: present"


def test_bounds_travel_through_the_oracle_path_and_sharing_keeps_them_apart():
    engine = Engine.default()
    feats = [Features(patient="Patient/p", largest_diameter_mm=Fact[Decimal](at_most=Decimal(v), at_most_strict=s))
             for v, s in (("30", True), ("30", False), ("40", True))]
    fast, eager = engine.classify_many(feats), classify_many_eager(engine, feats)
    got = [(c.criteria["largest_ge_50mm"].at_most, c.criteria["largest_ge_50mm"].at_most_strict) for c in fast]
    assert got == [(Decimal("30"), True), (Decimal("30"), False), (Decimal("40"), True)]
    assert [c.criteria for c in fast] == [c.criteria for c in eager]
    counts = [Features(patient="Patient/p", tumour_count=Fact[int](value=2, lower_bound=b)) for b in (False, True)]
    assert [engine.classify(f).criteria["tumour_count_ge_4"].lower_bound for f in counts] == [False, True]


def test_headline_says_the_group_label_and_status_and_when_nothing_is_assessed():
    assert explain.headline(result("12-borderline-three-factors-adjuvant.json")) == "Borderline resectable (preliminary)"
    assert explain.headline(result("15-indeterminate-size-missing.json")) == "Indeterminate (facts missing; preliminary)"
    assert explain.headline(result("19-no-recurrence-measurements-only.json")) == "Not assessed (no-recurrence)"


def _codings(node):
    if isinstance(node, dict):
        if "system" in node and "code" in node and "value" not in node:   # a Coding, not a Quantity
            yield node
        for v in node.values():
            yield from _codings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _codings(v)


@pytest.mark.parametrize("activity, display", [("CREATE", "create"), ("UPDATE", "revise")])
def test_every_coding_written_has_a_display(activity, display):
    r = result("13-unresectable-final-extensive.json")
    ra = assessment(r)
    prov = build_provenance(ra, r, activity=activity)
    codings = [c for c in _codings({k: v for k, v in ra.items() if k != "meta"})] + list(_codings(
        {k: v for k, v in prov.items() if k != "meta"}))
    assert len(codings) >= 5 and all(c.get("display") for c in codings), codings
    assert prov["activity"]["coding"][0]["display"] == display
    assert prov["agent"][0]["type"]["coding"][0]["display"] == "Assembler"
    with pytest.raises(ValueError, match="Provenance activity 'DELETE'"):
        build_provenance(ra, r, activity="DELETE")


def test_no_recommendation_points_to_a_place_on_the_page():
    """A recommendation is shown in the text report, the RA's mitigation and CDS cards:
    "below" or "above" is true in at most one of them."""
    for rec in load_ruleset().recommendations:
        assert not re.search(r"\b(below|above)\b", rec.text), rec.rule
