"""Errors of the FHIR layer: what failed, where, and what the server said.

Every failure of :class:`fhir_adapters.fhir.client.FhirClient` is a :class:`FhirError`
(or a subclass) whose message names the method, the URL without its query string and the
server's OperationOutcome text, so a message can be shown to an integrator as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FhirError", "FhirServerUnavailable", "FhirConflict", "FhirTruncated", "operation_outcome_text"]


class FhirError(Exception):
    """A FHIR request failed.

    Attributes:
        status: HTTP status, or None when no reply was received.
        url: the request URL **without** its query string.
        outcome: the OperationOutcome's ``issue[].diagnostics`` / ``details.text``
            joined with ``"; "`` (or an excerpt of a non-FHIR body).
        method: the HTTP method.

    >>> e = FhirError("boom", status=400, url="http://h/fhir/Observation", outcome="bad", method="GET")
    >>> (e.status, e.outcome, str(e))
    (400, 'bad', 'boom')
    """

    def __init__(self, message: str, *, status: int | None = None, url: str = "",
                 outcome: str = "", method: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url
        self.outcome = outcome
        self.method = method


class FhirServerUnavailable(FhirError):
    """The server could not be reached, or kept answering 429/502/503/504, after the retries.

    Also raised at once for a non-idempotent request whose outcome is unknown (read
    timeout, connection reset after sending, 502/504): the message says so.
    """


class FhirConflict(FhirError):
    """HTTP 409 or 412: version conflict (``If-Match``), or several matches for a conditional write."""


def operation_outcome_text(body: Any) -> str:
    """The human text of an OperationOutcome: each issue's ``diagnostics`` and ``details.text``.

    Falls back to ``details.coding[].display`` / ``code``, and understands OAuth error
    bodies (``error`` / ``error_description``).

    >>> operation_outcome_text({"resourceType": "OperationOutcome", "issue": [
    ...     {"severity": "error", "code": "conflict", "diagnostics": "Version mismatch"}]})
    'Version mismatch'
    """
    if not isinstance(body, Mapping):
        return ""
    if "error" in body and body.get("resourceType") is None:
        return ": ".join(str(body[k]) for k in ("error", "error_description") if body.get(k))
    texts: list[str] = []
    for issue in body.get("issue") if isinstance(body.get("issue"), list) else []:
        if not isinstance(issue, Mapping):
            continue
        details = issue.get("details") if isinstance(issue.get("details"), Mapping) else {}
        found = [str(t) for t in (issue.get("diagnostics"), details.get("text")) if t]
        if not found:
            codings = details.get("coding") if isinstance(details.get("coding"), list) else []
            found = [str(c.get("display")) for c in codings if isinstance(c, Mapping) and c.get("display")]
        if not found and issue.get("code"):
            found = [str(issue["code"])]
        for t in found:
            if t not in texts:
                texts.append(t)
    return "; ".join(texts)


class FhirTruncated(FhirError):
    """A search answered with fewer resources than exist and no way to get the rest
    (no ``next`` link, and ``_offset`` not honoured): using the partial answer would
    classify from a partial record, so the search fails instead."""
