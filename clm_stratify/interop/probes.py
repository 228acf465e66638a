"""FHIR-level helpers of ``clm-stratify interop``: the behaviour probes (stale
``If-Match``, conditional create with several matches, unknown search parameter with and
without ``Prefer: handling=strict``), and, re-exported here so callers import one
module, the rest of the run's FHIR side:

- :mod:`clm_stratify.interop.run_data`: the run tag, run-scoped ids and references;
- :mod:`fhir_adapters.fhir.capabilities`: what a server declares;
- :mod:`clm_stratify.interop.search`: paging and reply media types;
- :mod:`clm_stratify.interop.cleanup`: deleting what a run created.

The probe resources are bare ``Patient`` resources (an identifier and the run tag): no
clinical content, and every FHIR server supports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_adapters.fhir.client import FhirClient, FhirError
from clm_stratify.interop.cleanup import delete_levels, deletion_levels, deletion_order, still_present, tagged
from fhir_adapters.project import RUN_TAG_SYSTEM
from clm_stratify.interop.run_data import (as_stored, has_tag, local_search, new_run_id, owner_of, ref_of,
                                            references_in, run_scoped_bundle, tag_token, token_matches)
from clm_stratify.interop.search import FHIR_JSON, LONG_LINK_CHARS, ReplyRecorder, SearchPages, search_pages

from fhir_adapters.project import PROBE_IDENTIFIER_SYSTEM  # noqa: E402


@dataclass
class ProbeResult:
    """One behaviour probe: the HTTP status met, the server's text, what it created."""

    status: int | None
    outcome: str = ""
    note: str = ""
    created: list[str] = field(default_factory=list)   # Type/id to clean up


def probe_patient(tag: tuple[str, str], identifier: str) -> dict:
    return {"resourceType": "Patient", "meta": {"tag": [{"system": tag[0], "code": tag[1]}]},
            "identifier": [{"system": PROBE_IDENTIFIER_SYSTEM, "value": identifier}]}


def probe_version_conflict(client: FhirClient, tag: tuple[str, str]) -> ProbeResult:
    """Create a resource, update it (version 2), then update it with ``If-Match`` of version 1.

    R4 says 412; some servers answer 409; a 2xx means ``If-Match`` is ignored.
    """
    _, created = client.create(probe_patient(tag, f"{tag[1]}-version"))
    if not created or not created.get("id"):
        return ProbeResult(None, note="the create reply had no body (cannot probe versions)")
    result = ProbeResult(None, created=[ref_of(created)])
    v1 = (created.get("meta") or {}).get("versionId")
    if not v1:
        result.note = "the server gives no meta.versionId: If-Match cannot be used"
        return result
    second = dict(created, active=True)
    client.update(second)
    stale = dict(created, active=False)
    try:
        status, _ = client.update(stale, if_match=f'W/"{v1}"')
        result.status = status
        result.note = f"an update with a stale If-Match (W/\"{v1}\") was accepted"
    except FhirError as exc:
        result.status, result.outcome = exc.status, exc.outcome
    return result


def probe_conditional_create_multiple(client: FhirClient, tag: tuple[str, str]) -> ProbeResult:
    """Create two resources with one identifier, then a conditional create on it (R4: 412)."""
    value = f"{tag[1]}-duplicate"
    result = ProbeResult(None)
    for _ in range(2):
        _, body = client.create(probe_patient(tag, value))
        if body and body.get("id"):
            result.created.append(ref_of(body))
    if len(result.created) < 2:
        result.note = (f"the create replies named {len(result.created)} of the 2 resources sharing the identifier "
                       "(no body?): not probed")
        return result
    try:
        status, body = client.create(probe_patient(tag, value),
                                     if_none_exist=f"identifier={PROBE_IDENTIFIER_SYSTEM}|{value}")
        result.status = status
        if status == 201 and body and body.get("id"):
            result.created.append(ref_of(body))
            result.note = "If-None-Exist was ignored: a third resource was created"
        else:
            result.note = "one of the matches was returned"
    except FhirError as exc:
        result.status, result.outcome = exc.status, exc.outcome
    return result


@dataclass
class SearchAttempt:
    """One search of the unknown-parameter probe: HTTP status (200 when it answered), how
    many of the run's tagged resources came back, the searchset's warnings, the server's
    error text."""

    status: int | None
    count: int = 0
    warnings: list[str] = field(default_factory=list)
    outcome: str = ""


@dataclass
class UnknownParamProbe:
    """The run's tagged resources searched three times: without the made-up parameter
    (``control``), with it (``lenient``), with it and ``Prefer: handling=strict``."""

    parameter: str
    control: SearchAttempt
    lenient: SearchAttempt
    strict: SearchAttempt

    def effect(self, a: SearchAttempt) -> str:
        """What the parameter did to the search ``a``: ``rejected`` (an HTTP error),
        ``ignored`` (as many results as without it), ``matched-nothing`` (none, where the
        control found some), ``filtered`` (fewer), or ``unknown`` (the control found none)."""
        if a.status != 200:
            return "rejected"
        if not self.control.count:
            return "unknown"
        if a.count == 0:
            return "matched-nothing"
        return "ignored" if a.count >= self.control.count else "filtered"

    def describe(self, a: SearchAttempt) -> str:
        """What happened, in words, e.g. ``HTTP 200: matched nothing (0 results; 10 without it)``."""
        warning = "; ".join(dict.fromkeys(a.warnings))
        said = f"; warning: {warning}" if warning else "; no warning"
        effect = self.effect(a)
        if effect == "rejected":
            return f"HTTP {a.status if a.status is not None else '(no answer)'}: rejected" + \
                (f" ({a.outcome})" if a.outcome else "")
        if effect == "unknown":
            return (f"HTTP 200, {a.count} of the run's resources (effect unknown: the search without the "
                    f"parameter found none of them either){said}")
        if effect == "matched-nothing":
            return (f"HTTP 200: matched nothing (0 results, {self.control.count} without the parameter; "
                    f"neither ignored nor rejected){said}")
        if effect == "ignored":
            return f"HTTP 200: ignored ({a.count} results, as without the parameter){said}"
        return f"HTTP 200: filtered ({a.count} results, {self.control.count} without the parameter){said}"


def probe_unknown_parameter(client: FhirClient, tag: tuple[str, str], rtype: str = "Patient") -> UnknownParamProbe:
    """Search the run's tagged resources without a made-up parameter, with it, and with it
    and ``Prefer: handling=strict`` (first page of each, exactly as the server sent it;
    only resources that really carry the run tag are counted)."""
    unknown = f"clm-interop-unknown-{tag[1]}"
    base = {"_tag": tag_token(tag), "_count": "10"}
    attempts: list[SearchAttempt] = []
    for params, strict in ((base, False), ({**base, unknown: "1"}, False), ({**base, unknown: "1"}, True)):
        try:
            page = search_pages(client, rtype, params, max_pages=1, strict=strict, complete=False)
            attempts.append(SearchAttempt(200, sum(has_tag(r, tag) for r in page.resources), page.warnings))
        except FhirError as exc:
            attempts.append(SearchAttempt(exc.status, 0, [], exc.outcome or str(exc)))
    return UnknownParamProbe(unknown, *attempts)

__all__ = [
    "RUN_TAG_SYSTEM", "PROBE_IDENTIFIER_SYSTEM", "LONG_LINK_CHARS", "FHIR_JSON",
    "new_run_id", "tag_token", "has_tag", "ref_of", "run_scoped_bundle", "references_in", "token_matches",
    "local_search", "ReplyRecorder", "SearchPages", "search_pages", "owner_of", "ProbeResult",
    "probe_version_conflict", "probe_conditional_create_multiple", "UnknownParamProbe", "SearchAttempt", "as_stored",
    "probe_unknown_parameter", "deletion_levels", "deletion_order", "delete_levels", "tagged", "still_present",
]
