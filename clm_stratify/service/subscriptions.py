"""Create, inspect and remove this project's Subscriptions on a FHIR server.

Two styles:

* ``criteria`` (R4): one rest-hook Subscription per watched search, i.e. per trigger of the
  terminology (``triggers`` in ``rules/terminology.yaml``, built by
  :meth:`fhir_adapters.sources.pull.Searches.watched`: tumour-size and technical-resectability
  Observations, metastasis Conditions, imaging DiagnosticReports and ImagingStudies, resection
  and chemotherapy Procedures, medication records), payload ``application/fhir+json`` or none.
* ``backport`` (R4 Backport IG): one Subscription per topic canonical URL given,
  with the same searches as filter criteria where the topic's resource type matches,
  payload content ``full-resource``, ``id-only`` or ``empty``.

Every Subscription carries the shared secret as a ``channel.header``, and a
``meta.tag`` so :func:`sync` and :func:`remove` find exactly what this tool created.
:func:`sync` is idempotent: it matches each wanted Subscription to one of ours by
endpoint + criteria (+ backport filters), updates what differs, creates what is missing
and deletes ours for that endpoint that are no longer wanted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import islice
from typing import Mapping
from urllib.parse import urlencode

from fhir_adapters.project import TAG_SYSTEM
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.sources.pull import Searches
from fhir_adapters.terminology import Terminology

SUBSCRIPTION_TAG = "clm-stratify-subscription"
BACKPORT_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
EXT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"


@dataclass(frozen=True)
class SubscriptionState:
    """One of our Subscriptions as the server reports it (``Subscription.status``, ``error``),
    and what :func:`sync` did to it (``action``: created, updated, unchanged, removed; ``note``:
    why). Not the FHIR ``SubscriptionStatus`` resource, which a notification carries."""

    id: str
    criteria: str
    status: str
    error: str | None = None
    action: str = ""
    note: str = ""


def criteria_text(rtype: str, params: dict[str, str]) -> str:
    return f"{rtype}?{urlencode(params, safe='|,:/')}" if params else rtype


def _base(endpoint: str, secret_header: str, secret: str, reason: str) -> dict:
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": SUBSCRIPTION_TAG}]},
        "status": "requested",
        "reason": reason,
        "channel": {"type": "rest-hook", "endpoint": endpoint, "header": [f"{secret_header}: {secret}"]},
    }


def criteria_subscriptions(terminology: Terminology, endpoint: str, secret_header: str, secret: str,
                           payload: bool = True) -> list[dict]:
    out = []
    for rtype, params in Searches(terminology).watched():
        sub = _base(endpoint, secret_header, secret, f"clm-stratify: re-classify on new {rtype}")
        sub["criteria"] = criteria_text(rtype, params)
        if payload:
            sub["channel"]["payload"] = "application/fhir+json"
        out.append(sub)
    return out


def backport_subscriptions(terminology: Terminology, endpoint: str, secret_header: str, secret: str,
                           topics: list[tuple[str, str]], content: str = "full-resource",
                           heartbeat: int | None = None) -> list[dict]:
    """``topics``: (canonical URL, resource type the topic is about)."""
    watched = dict(Searches(terminology).watched())
    out = []
    for url, rtype in topics:
        sub = _base(endpoint, secret_header, secret, f"clm-stratify: re-classify on {url}")
        sub["meta"]["profile"] = [BACKPORT_PROFILE]
        sub["criteria"] = url
        if watched.get(rtype):
            sub["_criteria"] = {"extension": [{"url": f"{EXT}backport-filter-criteria",
                                               "valueString": criteria_text(rtype, watched[rtype])}]}
        sub["channel"]["payload"] = "application/fhir+json"
        sub["channel"]["_payload"] = {"extension": [{"url": f"{EXT}backport-payload-content", "valueCode": content}]}
        if heartbeat:
            sub["channel"]["extension"] = [{"url": f"{EXT}backport-heartbeat-period", "valueUnsignedInt": heartbeat}]
        out.append(sub)
    return out


# --------------------------------------------------------------------------- which are ours, and which is which
def is_ours(resource: Mapping) -> bool:
    """Does ``resource`` really carry our Subscription tag? (Checked on each resource a search
    returns: a server may ignore ``_tag`` and return everyone's Subscriptions.)"""
    return resource.get("resourceType") == "Subscription" and any(
        isinstance(t, Mapping) and t.get("system") == TAG_SYSTEM and t.get("code") == SUBSCRIPTION_TAG
        for t in (resource.get("meta") or {}).get("tag") or [])


def endpoint_of(sub: Mapping) -> str:
    return str((sub.get("channel") or {}).get("endpoint") or "")


def filters_of(sub: Mapping) -> tuple[str, ...]:
    """The backport filter criteria of a Subscription (empty for a criteria-style one)."""
    return tuple(str(e.get("valueString")) for e in (sub.get("_criteria") or {}).get("extension") or []
                 if isinstance(e, Mapping) and e.get("url") == f"{EXT}backport-filter-criteria")


def key_of(sub: Mapping) -> tuple[str, str, tuple[str, ...]]:
    """What makes a Subscription the same one across runs: its endpoint, its criteria (a
    search, or a backport topic URL) and its backport filters. Secret, payload, reason and
    heartbeat may change: the Subscription is then updated in place.

    >>> key_of({"criteria": "Condition", "channel": {"endpoint": "http://r/notify"}})
    ('http://r/notify', 'Condition', ())
    """
    return endpoint_of(sub), str(sub.get("criteria") or ""), filters_of(sub)


_COMPARED = ("criteria", "_criteria", "reason", "end")


def differences(wanted: Mapping, current: Mapping) -> list[str]:
    """What of ``wanted`` (as we would write it) ``current`` (as stored) does not say; the
    secret's value is never named.

    >>> w = {"criteria": "Condition", "channel": {"type": "rest-hook", "header": ["X-S: new"]}}
    >>> differences(w, {"criteria": "Condition", "channel": {"type": "rest-hook", "header": ["X-S: old"]}})
    ['channel.header (secret)']
    >>> differences(w, dict(w, status="active", id="1", meta={"versionId": "3"}))
    []
    """
    out = [k for k in _COMPARED if wanted.get(k) != current.get(k)]
    wc, cc = wanted.get("channel") or {}, current.get("channel") or {}
    for k in sorted(set(wc) | set(cc)):
        if wc.get(k) != cc.get(k):
            out.append("channel.header (secret)" if k == "header" else f"channel.{k}")
    if sorted((wanted.get("meta") or {}).get("profile") or []) != sorted((current.get("meta") or {}).get("profile") or []):
        out.append("meta.profile")
    return out


MAX_SCANNED = 10_000     # Subscriptions read when the _tag search cannot be trusted


def ours(client: FhirClient, endpoint: str | None = None) -> list[dict]:
    """Our Subscriptions on the server (each one's tag checked), only those for ``endpoint``
    when given. Found by ``_tag``; when that search fails or finds nothing (a server that
    does not support ``_tag`` may answer with nothing rather than an error), every
    Subscription is read (at most :data:`MAX_SCANNED`) and the tag checked on each."""
    found: dict[str, dict] = {}
    try:
        for r in islice(client.search("Subscription", {"_tag": f"{TAG_SYSTEM}|{SUBSCRIPTION_TAG}",
                                                       "_count": "200"}), MAX_SCANNED):
            if is_ours(r):
                found[r["id"]] = r
    except FhirError:
        found = {}
    if not found:
        for r in islice(client.search("Subscription", {"_count": "200"}), MAX_SCANNED):
            if is_ours(r):
                found[r["id"]] = r
    return [s for s in found.values() if endpoint is None or endpoint_of(s) == endpoint]


# --------------------------------------------------------------------------- create, update, remove
def sync(client: FhirClient, wanted: list[dict], wait: float = 5.0) -> list[SubscriptionState]:
    """Make our Subscriptions on the server exactly ``wanted`` (idempotent: run twice, nothing
    changes the second time).

    Each wanted Subscription is matched to one of ours by :func:`key_of`: identical ones are
    left alone (``unchanged``), those that differ (secret, payload, reason, heartbeat), or
    that the server turned ``off`` or ``error``, are updated in place (``PUT`` by id), missing
    ones are created. Ours for the same endpoints that are not wanted any more, and
    duplicates of one key, are deleted (``removed``). Ours for other endpoints are not
    touched. Then waits (bounded by ``wait`` seconds) for each to leave ``requested``."""
    endpoints = {endpoint_of(w) for w in wanted}
    existing: dict[tuple, list[dict]] = {}
    for sub in ours(client):
        if endpoint_of(sub) in endpoints:
            existing.setdefault(key_of(sub), []).append(sub)
    done: list[tuple[str | None, dict, str, str]] = []       # (id, body, action, note)
    removed: list[SubscriptionState] = []

    def delete(sub: dict, note: str) -> None:
        client.delete("Subscription", sub["id"])
        removed.append(SubscriptionState(sub["id"], sub.get("criteria", ""), "deleted", None, "removed", note))

    for want in wanted:
        # several of ours for one key (an older, non-idempotent run): keep an active one that
        # already says what we want, the oldest first; delete the others
        matches = sorted(existing.pop(key_of(want), []), key=lambda s: (
            s.get("status") != "active", bool(differences(want, s)), (s.get("meta") or {}).get("lastUpdated") or ""))
        if not matches:
            _, created = client.create(want)
            done.append(((created or {}).get("id"), want, "created", ""))
            continue
        keep, extra = matches[0], matches[1:]
        for dup in extra:
            delete(dup, f"duplicate of Subscription/{keep['id']}")
        changed = differences(want, keep)
        if keep.get("status") in ("off", "error"):
            changed.append(f"status was {keep.get('status')}")
        if changed:
            client.update({**want, "id": keep["id"]})
            done.append((keep["id"], want, "updated", ", ".join(changed)))
        else:
            done.append((keep["id"], want, "unchanged", ""))
    for stale in existing.values():
        for sub in stale:
            delete(sub, "no longer wanted for this endpoint")
    deadline = time.monotonic() + wait
    while True:
        states = [replace(status(client, sid, body), action=action, note=note) for sid, body, action, note in done]
        if all(s.status != "requested" for s in states) or time.monotonic() > deadline:
            return states + removed
        time.sleep(0.2)


def status(client: FhirClient, sid: str | None, sub: dict | None = None) -> SubscriptionState:
    current = client.read("Subscription", sid) if sid else None
    if current is None:
        return SubscriptionState(sid or "(not created)", (sub or {}).get("criteria", ""), "missing")
    return SubscriptionState(current["id"], current.get("criteria", ""), current.get("status", "?"),
                              current.get("error"))


def remove(client: FhirClient, endpoint: str | None = None) -> list[str]:
    """Delete our Subscriptions (only those for ``endpoint`` when given); their ids."""
    removed = []
    for sub in ours(client, endpoint):
        client.delete("Subscription", sub["id"])
        removed.append(sub["id"])
    return removed
