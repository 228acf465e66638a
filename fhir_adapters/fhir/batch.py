"""What one entry of a ``batch-response`` Bundle may be taken for.

A batch is not atomic: each entry answers on its own, and only some answers are results.

* A **search** entry is usable only when it answered exactly ``200``, holds a
  ``searchset`` Bundle, and its ``response.outcome`` (if any) does not say results are
  missing (:func:`~fhir_adapters.fhir.search.results_cut`). A ``404``/``410`` (a search
  cannot be "not found": a proxy or a failing server said it), a ``206`` (partial
  content), another 2xx, or an OperationOutcome in place of the Bundle is never read as
  "no results": it is a :class:`FhirError` naming the entry.
* A **read** entry (``Type/id``) may answer ``404``/``410`` (it does not exist: None);
  a ``200`` must hold that very resource.
"""

from __future__ import annotations

from fhir_adapters.fhir.errors import FhirError, FhirTruncated, operation_outcome_text
from fhir_adapters.fhir.search import results_cut

__all__ = ["search_entry", "read_entry"]


def _status(entry: dict) -> tuple[str, str, dict]:
    """(status code, status line, ``response``) of a batch-response entry."""
    reply = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    line = str(reply.get("status", "")).strip()
    return (line.split(" ")[0] if line else ""), line or "no status", reply


def _error(base: str, i: int, what: str, problem: str, *outcomes: object) -> FhirError:
    text = next((t for t in map(operation_outcome_text, outcomes) if t), "")
    return FhirError(f"batch entry {i} ({what}) {problem}" + (f": {text}" if text else ""),
                     status=None, url=base, outcome=text)


def _kind(resource: object) -> str:
    if not isinstance(resource, dict):
        return "no resource"
    return f"{resource.get('resourceType')} {resource.get('type') or ''}".strip()


def search_entry(base: str, i: int, rtype: str, entry: dict) -> dict:
    """The searchset Bundle of entry ``i`` (a search of ``rtype``), or :class:`FhirError`.

    >>> search_entry("http://h/fhir", 5, "DiagnosticReport", {"response": {"status": "404 Not Found"},
    ...     "resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "error",
    ...     "code": "exception", "diagnostics": "database timeout"}]}})
    Traceback (most recent call last):
    ...
    fhir_adapters.fhir.errors.FhirError: batch entry 5 (DiagnosticReport search) answered 404 Not Found, not a search result: database timeout
    """
    code, line, reply = _status(entry)
    what = f"{rtype} search"
    resource = entry.get("resource")
    if code != "200":
        # "failed: 4xx" is what a refused search reads as (pull._refused); 404/410/2xx are not refusals
        problem = (f"failed: {line}" if code[:1] in ("4", "5") and code not in ("404", "410")
                   else f"answered {line}, not a search result")
        raise _error(base, i, what, problem, reply.get("outcome"), resource)
    if not isinstance(resource, dict) or resource.get("resourceType") != "Bundle" or resource.get("type") != "searchset":
        raise _error(base, i, what, f"answered {line} with {_kind(resource)}, not a searchset Bundle",
                     reply.get("outcome"), resource)
    if "outcome" in reply:
        cut = results_cut(reply["outcome"])
        if cut:
            raise FhirTruncated(f"batch entry {i} ({what}) incomplete: the server says results are missing ({cut})",
                                url=base, method="GET", outcome=operation_outcome_text(reply["outcome"]))
    return resource


def read_entry(base: str, i: int, read: str, entry: dict) -> dict | None:
    """The resource of entry ``i`` (a read of ``Type/id``); None when it does not exist
    (404/410); else :class:`FhirError`.

    >>> read_entry("http://h/fhir", 6, "Patient/p1", {"response": {"status": "410 Gone"}}) is None
    True
    """
    code, line, reply = _status(entry)
    if code in ("404", "410"):
        return None
    resource = entry.get("resource")
    if code != "200":
        raise _error(base, i, read, f"failed: {line}", reply.get("outcome"), resource)
    rtype, _, rid = read.partition("/")
    if not isinstance(resource, dict) or resource.get("resourceType") != rtype or resource.get("id") != rid:
        got = f"{resource.get('resourceType')}/{resource.get('id')}" if isinstance(resource, dict) else "no resource"
        raise _error(base, i, read, f"answered {line} with {got}, not {read}", reply.get("outcome"), resource)
    return resource
