r"""Search syntax and completeness: values escaped per the FHIR search specification, and
a search that returned everything or says why not.

**Escaping.** In a search value ``\``, ``|``, ``,`` and ``$`` are special (R4 search,
"Escaping Search Parameters"): a literal one is written ``\|`` etc. :func:`escape` and
:func:`token` do it, so an identifier value with a ``|`` or ``,`` is not split into
system and code or into an OR list. (Some servers split on every ``|`` even when escaped:
values this project writes contain none.)

**Completeness.** :class:`Completeness` follows one search across its pages and decides,
at the last page (no ``next`` link), whether everything came back:

* ``Bundle.total`` present and more than the distinct matches received: the server
  stopped early without a ``next`` link (seen on Medplum, which never pages);
* no total, and the last page is full (as many matches as ``_count`` asked for): the
  server may have stopped early; checked rather than assumed.

In both cases the client continues with ``_offset`` (see
:meth:`fhir_adapters.fhir.client.FhirClient.search_pages`); a server that ignores
``_offset`` (sends the same resources again) or returns nothing while its total says more
exist makes the search fail with :class:`~fhir_adapters.fhir.errors.FhirTruncated`,
naming what the server did. A server that caps ``_count`` silently with neither a
``next`` link nor a total cannot be told apart from a complete answer.

**Outcomes that say results are missing.** A searchset may carry an OperationOutcome
entry (``search.mode = outcome``). :func:`results_cut` reads it by the R4 IssueType
value set (http://hl7.org/fhir/ValueSet/issue-type): severity ``fatal`` or ``error``, or
a code that says data were left out (:data:`CUT_CODES`, at any severity), means the
page does not hold every match; a code about the request itself (:data:`WARNING_CODES`:
an ignored or unknown parameter, a value not understood) is a warning only, since what
came back is still everything the server found. A code outside the value set, or none,
a severity outside fatal, error, warning and information, or a severity or code that is
not a string, counts as a cut: an outcome the client cannot read is not taken as
harmless. :func:`results_cut` never raises, whatever the JSON.

>>> token("http://example.org/ids", "A|B,C")
'http://example.org/ids|A\\|B\\,C'
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["escape", "token", "Completeness", "count_of", "results_cut", "CUT_CODES", "WARNING_CODES",
           "SEVERITIES", "MAX_OFFSET_PAGES", "MAX_PAGES", "MAX_STALE_PAGES"]

# At most this many _offset continuations of one search (a bound, not a page size).
MAX_OFFSET_PAGES = 10_000
# At most this many pages of one search by next links, and at most this many pages in a
# row that bring nothing new (a server whose next links never end).
MAX_PAGES = 100_000
MAX_STALE_PAGES = 3


# R4 IssueType codes that say some results were not returned (each with the spec's reason).
CUT_CODES = {
    "incomplete": "not all data sought were returned",
    "too-costly": "the server stopped to protect its resources",
    "throttled": "the server refused part of the work for load management",
    "timeout": "an internal timeout",
    "too-long": "content too long (denial-of-service protection)",
    "transient": "a transient processing problem",
    "lock-error": "a resource was locked",
    "no-store": "the persistent store is unavailable",
    "exception": "an unexpected internal error",
    "suppressed": "information withheld by business rules, consent, privacy or access rights",
    "security": "a security problem",
    "login": "login required",
    "unknown": "unknown user",
    "expired": "the user session expired",
    "forbidden": "the user may not see everything",
}
# R4 IssueSeverity (http://hl7.org/fhir/ValueSet/issue-severity): any other value, or a
# severity or code that is not a string, counts as a cut.
SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
# R4 IssueType codes about the request or the content, not about results left out: an
# ignored parameter returns more, never fewer, matches; a value the server did not
# understand matches nothing, which the results then say truthfully.
WARNING_CODES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "processing", "not-supported", "duplicate",
    "multiple-matches", "not-found", "deleted", "code-invalid", "extension", "business-rule", "conflict",
    "informational",
})


def results_cut(outcome: object) -> str | None:
    """Why an OperationOutcome in a searchset says results are missing, or None when it
    is a warning only (see the module docstring).

    >>> results_cut({"resourceType": "OperationOutcome", "issue": [{"severity": "warning",
    ...     "code": "incomplete", "diagnostics": "search results truncated"}]})
    'warning incomplete (not all data sought were returned): search results truncated'
    >>> results_cut({"resourceType": "OperationOutcome", "issue": [{"severity": "warning",
    ...     "code": "not-supported", "diagnostics": "Unknown parameter 'foo'; ignored"}]}) is None
    True
    """
    if not isinstance(outcome, dict):
        return "an outcome entry that is not a resource"
    issues = outcome.get("issue") if isinstance(outcome.get("issue"), list) else []
    if not issues:
        return "an OperationOutcome with no issue"
    for issue in issues:
        if not isinstance(issue, dict):
            return "an OperationOutcome issue that is not an object"
        severity, code = issue.get("severity"), issue.get("code")
        if not isinstance(severity, str) or severity not in SEVERITIES:
            why = f"severity {_shown(severity)} (not an R4 issue severity: not taken as harmless)"
        elif not isinstance(code, str):
            why = f"{severity} code {_shown(code)} (not an R4 issue type: not taken as harmless)"
        elif severity in ("fatal", "error"):
            why = f"{severity} {code}"
        elif code in CUT_CODES:
            why = f"{severity} {code} ({CUT_CODES[code]})"
        elif code not in WARNING_CODES:
            why = f"{severity} {code!r} (not an R4 issue type: not taken as harmless)"
        else:
            continue
        details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
        text = next((t for t in (issue.get("diagnostics"), details.get("text")) if isinstance(t, str) and t), None)
        return f"{why}: {text}" if text else why
    return None


def _shown(value: object) -> str:
    """A JSON value in a message, short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def escape(value: str) -> str:
    r"""A search value with ``\``, ``|``, ``,`` and ``$`` escaped.

    >>> escape(r"a|b,c$d\e")
    'a\\|b\\,c\\$d\\\\e'
    """
    return value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


def token(system: str | None, code: str) -> str:
    """``system|code`` (both escaped); just the code when there is no system (any system)."""
    return f"{escape(system)}|{escape(code)}" if system else escape(code)


def count_of(pairs: Sequence[tuple[str, str]]) -> int | None:
    """The ``_count`` a search asked for, or None."""
    for key, value in reversed(list(pairs)):
        if key == "_count":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _key(entry: dict) -> str | None:
    r = entry.get("resource")
    if not isinstance(r, dict):
        return None
    return f"{r.get('resourceType')}/{r.get('id')}" if r.get("id") else None


def _is_match(entry: dict) -> bool:
    mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
    return mode in (None, "match") and isinstance(entry.get("resource"), dict)


class Completeness:
    """The distinct matches of one search so far, and its ``Bundle.total`` (first page)."""

    def __init__(self, requested_count: int | None = None) -> None:
        self.requested_count = requested_count
        self.total: int | None = None
        self.matched = 0
        self.pages = 0
        self._keys: set[str] = set()

    def add(self, bundle: dict) -> tuple[dict, int, int]:
        """Count a page; returns (the page without matches already seen, its matches,
        how many of them were new)."""
        if self.pages == 0 and isinstance(bundle.get("total"), int) and not isinstance(bundle.get("total"), bool):
            self.total = bundle["total"]
        self.pages += 1
        entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
        kept, matches, new = [], 0, 0
        for entry in entries:
            if not _is_match(entry):
                kept.append(entry)
                continue
            matches += 1
            key = _key(entry)
            if key is not None and key in self._keys:
                continue
            if key is not None:
                self._keys.add(key)
            new += 1
            kept.append(entry)
        self.matched += new
        page = bundle if len(kept) == len(entries) else {**bundle, "entry": kept}
        return page, matches, new

    def shortfall(self, last_page_matches: int) -> str | None:
        """Why the search may be incomplete at a page without a ``next`` link, or None."""
        if self.total is not None:
            if self.matched < self.total:
                return (f"the server returned {self.matched} of {self.total} results (Bundle.total) "
                        f"with no next link")
            return None
        if self.requested_count and last_page_matches >= self.requested_count:
            return (f"the last page is full ({last_page_matches} results for _count={self.requested_count}) "
                    f"with no next link and no Bundle.total")
        return None

    def done(self, page_matches: int) -> bool:
        """After an ``_offset`` page: nothing more to fetch."""
        if self.total is not None:
            return self.matched >= self.total
        return not (self.requested_count and page_matches >= self.requested_count)
