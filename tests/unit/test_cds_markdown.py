"""The card's Markdown (clm_stratify/service/cds_cards.py ``md``, ``code``): text from a
record stays text when an EHR renders the detail as GitHub Flavored Markdown, and still
reads as plain text where an EHR shows the Markdown as it is.

Rendered with cmarkgfm (GitHub's cmark-gfm: autolink, table, strikethrough, tasklist and
tagfilter extensions, footnotes on, raw HTML let through so that any escape we miss shows
up as an element). The expected text is computed here independently of the module
(``unicodedata``), not with its helpers. The one character ``md`` adds: a word joiner
(U+2060, invisible) before an e-mail address's "@", which no escape keeps from being linked.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from html.parser import HTMLParser

import cmarkgfm   # in the [test] extra
import pytest
from cmarkgfm.cmark import Options
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clm_stratify.pipeline import Rules, evaluate
from clm_stratify.service.cds_cards import code, detail, md
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.sources.record import PatientRecord
from fixtures import FIXTURES_DIR

RULES = Rules.load()
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WHITESPACE = "\t\n\x0b\x0c\r"
# Pieces that start Markdown, HTML or an autolink somewhere (GFM, CommonMark, cmark-gfm's
# extensions), glued together at random with ordinary text, whitespace and control characters.
PIECES = ["www.", "WwW.", "http://", "https://", "ftp://", "mailto:", "xmpp:", "a@b.example", "@", ".", ":", "/",
          "evil.example", "<", ">", "</", "<!--", "-->", "<?", "<!D", "<![CDATA[", "<a href=x>", "<img src=x>",
          "<script>", "<x@y.z>", "<http://e.x>", "&", "&amp;", "&#x41;", "&#65;", "&lt;", ";", "`", "``", "*", "**",
          "_", "__", "~", "~~", "[", "]", "[x](y)", "![i](y)", "[^1]", "[^1]: n", "[x]: /u", "[ ]", "[x]", "(", ")",
          "!", "|", "| a | b |", "|-|", "\\", "#", "# ", "###### ", ">", "> ", "-", "- ", "+ ", "* ", "=", "===",
          "---", "***", "___", "1.", "1. ", "1) ", "123456789. ", "1234567890. ", "    ", " ", "  ", "\n", "\n\n",
          "\r\n", "\t", "\x00", "\x01", "\x07", "\x0b", "\x0c", "\x1c", "\x1f", "\x7f", "\x85", "\x9f", "\ud800",
          "\udfff", "\ufffe", "\uffff", "\u00a0", "\u2028", "\u3000", "ſ", "K", "p = 0.049", "study's", "x", "W",
          "w", "9", "é", "\U0001f600"]
hostile = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)
anything = st.text(st.characters(blacklist_categories=()), max_size=40)   # surrogates and controls too
texts = st.one_of(hostile, anything)


class Rendered(HTMLParser):
    """The elements (and comments, declarations, processing instructions), the text, and
    the text of each list item and code element of an HTML fragment."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: set[str] = set()
        self.codes: list[str] = []
        self.items: list[str] = []
        self._in_item = False
        self.data: list[str] = []
        self._in_code = False
        self.feed(html)
        self.close()
        self.text = "".join(self.data).strip("\n")

    def handle_starttag(self, tag, attrs):
        self.elements.add(tag)
        if tag == "code":
            self._in_code = True
            self.codes.append("")
        if tag == "li":
            self._in_item = True
            self.items.append("")

    def handle_endtag(self, tag):
        self.elements.add(tag)
        self._in_code = self._in_code and tag != "code"
        self._in_item = self._in_item and tag != "li"

    def handle_data(self, data):
        self.data.append(data)
        if self._in_code:
            self.codes[-1] += data
        if self._in_item:
            self.items[-1] += data

    def handle_comment(self, data):
        self.elements.add("<!--")

    def handle_decl(self, decl):
        self.elements.add("<!")

    def handle_pi(self, data):
        self.elements.add("<?")

    def unknown_decl(self, data):
        self.elements.add("<![")


def render(markdown: str) -> Rendered:
    options = Options.CMARK_OPT_UNSAFE | Options.CMARK_OPT_FOOTNOTES
    return Rendered(cmarkgfm.github_flavored_markdown_to_html(markdown, options=options))


def same_text(got: str, want: str) -> bool:
    """Whether ``got`` reads as ``want``: equal but for word joiners put before an "@"."""
    return got.replace("\u2060@", "@") == want.replace("\u2060@", "@")


def shown(x: str) -> str:
    """What a reader must see of ``x``: control characters (category Cc, but the whitespace
    ones), surrogates and U+FFFE/U+FFFF as U+FFFD; whitespace runs as one space."""
    out = []
    for ch in x:
        if ch in WHITESPACE:
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch in "\ufffe\uffff":
            out.append("\ufffd")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


@SETTINGS
@given(texts)
@example("Observation/f11-ct-les1/_history/1 p = 0.049 study's >= 4 lesions")
@example("<img src=x onerror=alert(1)> [click](http://evil.example) www.evil.example **bold** `code` | a |")
@example("a@b.example mailto:a@b.example xmpp:a@b.example/r https://e.x/a_b ftp://e.x WWW.E.X")
@example("x\n\n- y\n> z\n# h\n1. i\n---\n| a | b |\n|---|---|\n| c | d |")
@example("id \x07\x01 \ud800 \ufffe \x85 \x1c end")
@example("- [ ] task [^1]\n\n[^1]: note\n[x]: http://e.x")
def test_md_text_stays_text_wherever_the_card_puts_it(x):
    want = shown(x)
    for markdown, wrapper, prefix in (
            (f"- {md(x)}", {"ul", "li"}, ""),                                  # a list item's text
            (md(x), {"p"}, ""),                                                # a paragraph of its own
            (f"**Why:** {md(x)}", {"p", "strong"}, "Why: "),                   # after a bold label
            (f"**Why:** {md(x, line_start=False)}", {"p", "strong"}, "Why: "),
            (f"- a (threshold {md(x, line_start=False)})", {"ul", "li"}, "a (threshold ")):
        out = render(markdown)
        assert out.elements <= wrapper, (markdown, out.elements)
        if prefix.endswith("(threshold "):
            assert same_text(out.text, prefix + want + ")"), markdown
        else:
            assert same_text(out.text, (prefix + want).rstrip(" ")), markdown


@SETTINGS
@given(texts)
@example("Observation/f11-ct-les1/_history/1")
@example("Condition/a`b")
@example(" \n\t")
@example("`")
@example("Observation/\x07\x01/ x <b> www.e.x http://e.x a@b.c")
def test_a_reference_is_a_code_span_read_verbatim_or_md_text(x):
    out = render(f"- evidence: {code(x)}, {code(x)}")
    want = shown(x)
    assert same_text(out.text, f"evidence: {want}, {want}".rstrip(" "))
    if want and "`" not in want:
        assert out.elements == {"ul", "li", "code"} and out.codes == [want, want]
    else:
        assert out.elements <= {"ul", "li"}


F11 = evaluate(read_bundle_file(FIXTURES_DIR / "11-borderline-count-and-size-no-adjuvant.json"), RULES)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
@example("<img src=x> a@b.example www.e.x http://e.x `x` | a |\n# h")
def test_a_whole_detail_with_record_text_in_every_dynamic_place_stays_text(x):
    """Fixture 11's result with ``x`` as each factor's evidence and why-unknown note, the
    status note and a warning: the detail renders to the card's own elements only."""
    criteria = {k: dataclasses.replace(c, state="unknown", refs=(x, "Observation/f11-ct-les1"), note=x)
                for k, c in F11.criteria.items()}
    out = render(detail(dataclasses.replace(F11, criteria=criteria, status_note=x, warnings=(x,))))
    assert out.elements <= {"p", "strong", "ul", "li", "code"}
    want = shown(x)
    assert all(same_text(c, want) or c.startswith(("Observation/", "Condition/", "Procedure/")) for c in out.codes)
    assert same_text(out.items[-1], want)                              # the warning, the last item
    if want:                                                            # each factor's note ends its item
        ends = [item.replace("\u2060@", "@").endswith("; why unknown: " + want.replace("\u2060@", "@"))
                for item in out.items[:-1]]
        assert sum(ends) == len(criteria)


@pytest.mark.parametrize("text", [
    "p = 0.049", "study's", ">= 4 lesions", "5-year overall survival 30.8 % (p < 0.0001 across groups)",
    "present (62 mm); why unknown: size not recorded", "doi: 10.1245 and 3 < 4 & 5 > 2", "rule G2-factor-present",
    "9.0.0", "1.5 cm", "www example", "a # b + c = d - e", "doi:10.1245/s10434-024-16491-3", "PMID:39580378",
    "httpx://e.x", "ratio 2:1", "urn:oid:1.2.3"])
def test_ordinary_text_mid_line_is_not_escaped(text):
    assert md(text, line_start=False) == text


@pytest.mark.parametrize("text, escaped", [
    ("# h", "\\# h"), ("> q", "\\> q"), ("- b", "\\- b"), ("+ b", "\\+ b"), ("= u", "\\= u"), ("* b", "\\* b"),
    ("1. i", "1\\. i"), ("123456789) i", "123456789\\) i"), ("1234567890. i", "1234567890. i"), ("1.5 cm", "1.5 cm"),
    ("http://e.x", "http\\://e.x"), ("www.e.x", "www\\.e.x"), ("a@b.c", "a\u2060@b.c"), ("@b", "@b"), ("<b>", "\\<b>"),
    ("&amp;", "\\&amp;"), ("a_b", "a\\_b"), ("| c |", "\\| c \\|"), ("HTTPS://e.x", "HTTPS\\://e.x"),
    ("Ftp://e.x", "Ftp\\://e.x"), ("MailTo:a", "MailTo\\:a"), ("xmpp:a", "xmpp\\:a"), ("doi:http://e.x", "doi:http\\://e.x")])
def test_what_could_start_markdown_is_escaped_and_only_that(text, escaped):
    assert md(text) == escaped


def test_the_detail_reads_as_plain_text():
    """Fixture 11's detail, as an EHR that shows Markdown as it is would show it."""
    text = detail(F11)
    for phrase in ("p = 0.049", "study's", "(threshold >= 4 lesions)", "(threshold >= 50 mm)",
                   "evidence: `Observation/f11-ct-les1`, `Observation/f11-ct-les2`",
                   "(group borderline-resectable, rule G2-factor-present)", f"(doi:{F11.ruleset.doi}, PMID"):
        assert phrase in text, phrase


def test_control_characters_from_a_record_reach_the_card_as_replacement_characters():
    fixture = json.loads((FIXTURES_DIR / "11-borderline-count-and-size-no-adjuvant.json").read_text())
    resources = [e["resource"] for e in fixture["entry"]]
    condition = next(r for r in resources if r["resourceType"] == "Condition")
    condition["id"] = "f11-\x07liver\x01-met"      # refused as invalid FHIR: named in the warnings
    result = evaluate(PatientRecord.from_resources(resources), RULES)
    assert any("\x07" in w for w in result.warnings)
    text = detail(result)
    assert "\n- Condition/f11-\ufffdliver\ufffd-met is not valid FHIR R4" in text
    assert not any(unicodedata.category(ch) == "Cc" for ch in text.replace("\n", ""))
