"""Create, inspect and remove this project's Subscriptions on a FHIR server.

Two styles:

* ``criteria`` (R4): one rest-hook Subscription per watched search
  (:meth:`fhir_adapters.sources.pull.Searches.watched`: tumour-size and technical-resectability
  Observations, metastasis Conditions, radiology DiagnosticReports), payload
  ``application/fhir+json`` or none.
* ``backport`` (R4 Backport IG): one Subscription per topic canonical URL given,
  with the same searches as filter criteria where the topic's resource type matches,
  payload content ``full-resource``, ``id-only`` or ``empty``.

Every Subscription carries the shared secret as a ``channel.header``, and a
``meta.tag`` so ``remove`` finds exactly what this tool created.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlencode

from fhir_adapters.project import TAG_SYSTEM
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.sources.pull import Searches
from fhir_adapters.terminology import Terminology

SUBSCRIPTION_TAG = "clm-stratify-subscription"
BACKPORT_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
EXT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"


@dataclass(frozen=True)
class SubscriptionState:
    """One of our Subscriptions as the server reports it (``Subscription.status``, ``error``).
    Not the FHIR ``SubscriptionStatus`` resource, which a notification carries."""

    id: str
    criteria: str
    status: str
    error: str | None = None


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


def ours(client: FhirClient) -> list[dict]:
    return list(client.search("Subscription", {"_tag": f"{TAG_SYSTEM}|{SUBSCRIPTION_TAG}", "_count": "200"}))


def create(client: FhirClient, subscriptions: list[dict], wait: float = 5.0) -> list[SubscriptionState]:
    """Create the Subscriptions, then wait (bounded) for each to leave ``requested``
    (the handshake, for backport ones) and report their status."""
    ids = []
    for sub in subscriptions:
        _, created = client.create(sub)
        ids.append(created["id"] if created else None)
    deadline = time.monotonic() + wait
    statuses: list[SubscriptionState] = []
    while True:
        statuses = [status(client, sid, sub) for sid, sub in zip(ids, subscriptions)]
        if all(s.status != "requested" for s in statuses) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def status(client: FhirClient, sid: str | None, sub: dict | None = None) -> SubscriptionState:
    current = client.read("Subscription", sid) if sid else None
    if current is None:
        return SubscriptionState(sid or "(not created)", (sub or {}).get("criteria", ""), "missing")
    return SubscriptionState(current["id"], current.get("criteria", ""), current.get("status", "?"),
                              current.get("error"))


def remove(client: FhirClient) -> list[str]:
    removed = []
    for sub in ours(client):
        client.delete("Subscription", sub["id"])
        removed.append(sub["id"])
    return removed
