"""What a resource was before it was deleted, and what was deleted lately: the FHIR
history interactions (``GET [type]/[id]/_history``, ``GET [type]/_history?_since=``).

A deleted resource can no longer be read (404 or 410), so its patient comes from the
newest version in its instance history that names one. Deletions since an instant are the
``DELETE`` entries of the type history. Both are best effort: a server that does not keep
or serve history (a 4xx answer) gives nothing, and the caller says so; a fault (5xx,
connection) is raised so that the work is retried.

Entries are read newest first (the order R4 prescribes for history), stopping at the
first entry older than ``since``: a server whose ``next`` links drop ``_since`` (SEKMET
0.1.1 does) then costs one page more, not the whole history.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Iterator

from fhir_adapters.fhir.client import FhirClient, FhirError, loads
from fhir_adapters.fhir.reference import PatientRef, patient_of

log = logging.getLogger("clm_stratify.history")

HISTORY_PAGE = 200
MAX_HISTORY_PAGES = 50      # a bound: one resource's versions, or one re-query window's deletions


def _instant(text: object) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _entries(client: FhirClient, path: str, params: list[tuple[str, str]]) -> Iterator[dict]:
    """The entries of a history Bundle and the pages after it (``next`` links verbatim)."""
    url: str = path
    query: list[tuple[str, str]] | None = params
    seen: set[str] = set()
    for _ in range(MAX_HISTORY_PAGES):
        resp = client.request("GET", url, params=query)
        bundle = loads(resp.content) if resp.content else None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
                or not isinstance(bundle.get("entry", []), list) or not isinstance(bundle.get("link", []), list):
            raise FhirError(f"GET {path}: expected a history Bundle", url=client.base_url, method="GET")
        yield from (e for e in bundle.get("entry") or [] if isinstance(e, dict))
        nxt = next((link.get("url") for link in bundle.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next" and link.get("url")), None)
        if not nxt or nxt in seen:
            return
        seen.add(nxt)
        url, query = nxt, None
    log.warning("GET %s: more than %d history pages; stopped reading", path.split("/")[0] + "/...", MAX_HISTORY_PAGES)


def _unsupported(exc: FhirError) -> bool:
    """The server answered with a 4xx: it does not keep or serve this history."""
    return exc.status is not None and 400 <= exc.status < 500


def _version_key(resource: dict) -> tuple[dt.datetime, int]:
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    when = _instant(meta.get("lastUpdated")) or dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    vid = meta.get("versionId")
    return when, int(vid) if isinstance(vid, str) and vid.isdigit() else -1


def patient_of_deleted(client: FhirClient, rtype: str, rid: str) -> PatientRef | None:
    """The patient of the newest version of ``rtype/rid`` (``GET [type]/[id]/_history``) that
    names one by a literal reference; None when the history is empty, gone or not served.
    ``rtype`` and ``rid`` must have been checked (:meth:`FhirClient.read` does)."""
    try:
        versions = [e["resource"] for e in _entries(client, f"{rtype}/{rid}/_history", [("_count", str(HISTORY_PAGE))])
                    if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == rtype
                    and e["resource"].get("id") == rid]
    except FhirError as exc:
        if not _unsupported(exc):
            raise
        log.warning("%s was deleted and its history cannot be read (%s): its patient is unknown", rtype, exc.status)
        return None
    for resource in sorted(versions, key=_version_key, reverse=True):
        patient = patient_of(resource, client.base_url)
        if patient:
            return patient
    return None


def deleted_since(client: FhirClient, rtype: str, since: str) -> Iterator[tuple[str, str | None]]:
    """``(id, when)`` of each ``rtype`` deleted at or after ``since`` (type history with
    ``_since``; ``when`` is the entry's ``response.lastModified``). A server without type
    history yields nothing (logged)."""
    floor = _instant(since)
    try:
        for entry in _entries(client, f"{rtype}/_history", [("_since", since), ("_count", str(HISTORY_PAGE))]):
            response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
            when = response.get("lastModified") if isinstance(response.get("lastModified"), str) else None
            if floor is not None and (t := _instant(when)) is not None and t < floor:
                return                                  # newest first: the rest is older
            request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
            method = str(request.get("method") or "").upper()
            if not (method == "DELETE" or (not method and not isinstance(entry.get("resource"), dict)
                                           and str(response.get("status", "")).startswith(("204", "410")))):
                continue
            url = str(request.get("url") or entry.get("fullUrl") or "").split("?")[0].rstrip("/")
            parts = url.split("/")
            if len(parts) >= 2 and parts[-2] == rtype and parts[-1]:
                yield parts[-1], when
    except FhirError as exc:
        if not _unsupported(exc):
            raise
        log.warning("the server does not serve %s history (%s): deletions are seen only when notified", rtype,
                    exc.status)
