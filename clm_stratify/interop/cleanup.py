"""Clean-up for ``clm-stratify interop``: delete what a run created, referrers first, and
find what is left.

Only what really carries the run's tag is selected (checked on each resource, never
trusted to the server's ``_tag`` search).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping

from fhir_adapters.fhir.client import FhirClient, FhirError
from clm_stratify.interop.run_data import has_tag, ref_of, references_in, tag_token
from clm_stratify.interop.search import search_pages

# --------------------------------------------------------------------------- clean-up

def deletion_levels(resources: Iterable[Mapping]) -> list[list[str]]:
    """``Type/id`` of ``resources`` in levels: each level refers only to later levels,
    so one level can be deleted in parallel (a cycle is broken at one resource)."""
    res = {ref_of(r): r for r in resources}
    refs = {k: references_in(r) & set(res) - {k} for k, r in res.items()}
    levels: list[list[str]] = []
    remaining = list(res)
    while remaining:
        referenced = set().union(*(refs[k] for k in remaining))
        ready = [k for k in remaining if k not in referenced] or remaining[:1]
        levels.append(ready)
        remaining = [k for k in remaining if k not in ready]
    return levels


def deletion_order(resources: Iterable[Mapping]) -> list[str]:
    """``Type/id`` of ``resources``, referrers before what they refer to."""
    return [ref for level in deletion_levels(resources) for ref in level]


def delete_levels(client: FhirClient, levels: list[list[str]], passes: int = 3, workers: int = 4) -> dict[str, str]:
    """DELETE each ``Type/id``, level after level (a level in parallel); what failed is
    tried again in later passes (another resource may have held a reference). Returns
    what could not be deleted, with the server's text."""

    def delete(ref: str) -> tuple[str, str | None]:
        rtype, rid = ref.split("/", 1)
        try:
            client.delete(rtype, rid)
            return ref, None
        except (FhirError, ValueError) as exc:
            return ref, getattr(exc, "outcome", "") or str(exc)

    failed: dict[str, str] = {}
    todo = [list(dict.fromkeys(level)) for level in levels if level]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(max(1, passes)):
            failed = {}
            for level in todo:
                failed.update({ref: text for ref, text in pool.map(delete, level) if text is not None})
            todo = [[r for r in level if r in failed] for level in todo]
            todo = [level for level in todo if level]
            if not todo:
                break
    return failed


def tagged(client: FhirClient, rtype: str, tag: tuple[str, str], max_pages: int = 20) -> list[str]:
    """``Type/id`` of the ``rtype`` resources that really carry ``tag`` (a server that
    ignores ``_tag`` returns others: they are never selected)."""
    try:
        page = search_pages(client, rtype, {"_tag": tag_token(tag), "_count": "100"}, max_pages=max_pages)
    except FhirError:
        return []
    return [ref_of(r) for r in page.resources if r.get("resourceType") == rtype and has_tag(r, tag)]


def still_present(client: FhirClient, refs: Iterable[str]) -> list[str]:
    """The ``Type/id`` that can still be read (not 404/410)."""
    out = []
    for ref in refs:
        rtype, rid = ref.split("/", 1)
        try:
            if client.read(rtype, rid) is not None:
                out.append(ref)
        except FhirError:
            out.append(ref)
    return out
