"""Parse a FHIR Subscription notification, whichever of the three styles it comes in.

1. R4 criteria-based rest-hook: the resource itself (``PUT|POST {endpoint}/{type}/{id}``
   or ``POST {endpoint}``), or an empty body (no payload: the receiver re-queries).
2. R4/R4B Backport IG topic-based: a ``history`` Bundle whose first entry is a
   ``Parameters`` (R4) or ``SubscriptionStatus`` (R4B).
3. R5 topic-based: a ``subscription-notification`` Bundle with a ``SubscriptionStatus``.

The result is a :class:`Notification` with its events (event number, focus, the
resource when the payload carries it, and the patient when the notification names it).
Anything else raises :class:`NotificationError` with a message for the sender.

    >>> n = parse_notification({"resourceType": "Observation", "id": "o1", "status": "final",
    ...                         "code": {"text": "size"}, "subject": {"reference": "Patient/p1"}},
    ...                        path="Observation/o1")
    >>> n.style, n.kind, n.events[0].focus, n.events[0].patient
    ('rest-hook', 'resource', 'Observation/o1', PatientRef(id='p1'))
    >>> n.model_dump()["events"][0]["patient"]      # stored in the inbox as the FHIR reference
    'Patient/p1'
    >>> Notification.model_validate_json(n.model_dump_json()) == n
    True
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

from fhir_adapters.fhir.reference import PatientRef, patient_of, plain_ref

Kind = Literal["handshake", "heartbeat", "event-notification", "query-status", "query-event", "resource", "empty"]
KINDS = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")


class NotificationError(ValueError):
    """The body is not a notification this receiver understands (400 to the sender)."""


# A PatientRef in memory, ``"Patient/<id>"`` in the stored JSON.
StoredPatientRef = Annotated[PatientRef, BeforeValidator(lambda v: PatientRef.parse(v) if isinstance(v, str) else v),
                             PlainSerializer(lambda r: r.reference, return_type=str)]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)
    number: int | None = None
    timestamp: str | None = None
    focus: str | None = None          # "Type/id"
    version: str | None = None        # the focus resource's versionId, when the payload carries it
    patient: StoredPatientRef | None = None   # when the notification says
    resource_type: str | None = None


class Notification(BaseModel):
    model_config = ConfigDict(frozen=True)
    style: Literal["rest-hook", "rest-hook-empty", "backport-r4", "backport-r4b", "r5"]
    kind: Kind
    subscription: str | None = None   # "Subscription/id"
    topic: str | None = None
    events_since_start: int | None = None
    events: tuple[Event, ...] = ()


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(str(value))
    except ValueError:
        raise NotificationError(f"{what} is not a whole number: {value!r}") from None
    if number < 0:
        raise NotificationError(f"{what} is negative: {number}")
    return number


def _resource_event(resource: dict, path: str | None) -> Event:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(rtype, str) or not isinstance(rid, str):
        raise NotificationError("the notified resource has no resourceType or id")
    if path:
        parts = path.strip("/").split("/")
        if len(parts) != 2 or parts != [rtype, rid]:
            raise NotificationError(f"the URL names {path.strip('/')} but the body is {rtype}/{rid}")
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    version = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
    return Event(focus=f"{rtype}/{rid}", version=version, patient=patient_of(resource), resource_type=rtype)


def _ref(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return plain_ref(value["reference"])
    return None


def _params(parameters: list) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in parameters:
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            out.setdefault(p["name"], []).append(p)
    return out


def _value(p: dict) -> Any:
    for key, value in p.items():
        if key.startswith("value"):
            return value
    return None


def _patient_ref(reference: str | None) -> PatientRef | None:
    try:
        return PatientRef.parse(reference) if reference and reference.startswith("Patient/") else None
    except ValueError:
        return None


def _event(number: Any, timestamp: Any, focus_ref: Any, context: list[Any], what: str) -> Event:
    patient = next((p for p in map(_patient_ref, map(_ref, context)) if p), None)
    focus = _ref(focus_ref)
    return Event(number=_int(number, what), timestamp=timestamp if isinstance(timestamp, str) else None,
                 focus=focus, patient=patient, resource_type=focus.split("/")[0] if focus else None)


def _parse_parameters(status: dict) -> tuple[dict, list[Event]]:
    params = _params(status.get("parameter", []) if isinstance(status.get("parameter"), list) else [])
    first = {name: _value(items[0]) for name, items in params.items()}
    events = []
    for item in params.get("notification-event", []):
        parts = _params(item.get("part", []) if isinstance(item.get("part"), list) else [])
        get = {name: _value(items[0]) for name, items in parts.items()}
        context = [_value(c) for c in parts.get("additional-context", [])]
        events.append(_event(get.get("event-number"), get.get("timestamp"), get.get("focus"), context,
                             "event-number"))
    header = {
        "subscription": _ref(first.get("subscription")),
        "topic": first.get("topic"),
        "type": first.get("type"),
        "events": _int(first.get("events-since-subscription-start"), "events-since-subscription-start"),
    }
    return header, events


def _parse_status(status: dict) -> tuple[dict, list[Event]]:
    events = []
    for item in status.get("notificationEvent", []) or []:
        if not isinstance(item, dict):
            continue
        events.append(_event(item.get("eventNumber"), item.get("timestamp"), item.get("focus"),
                             list(item.get("additionalContext", []) or []), "eventNumber"))
    header = {
        "subscription": _ref(status.get("subscription")),
        "topic": status.get("topic"),
        "type": status.get("type"),
        "events": _int(status.get("eventsSinceSubscriptionStart"), "eventsSinceSubscriptionStart"),
    }
    return header, events


def _parse_bundle(bundle: dict) -> Notification:
    btype = bundle.get("type")
    entries = bundle.get("entry")
    if btype not in ("history", "subscription-notification"):
        raise NotificationError(f"a notification Bundle has type history or subscription-notification, not {btype!r}")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise NotificationError("the notification Bundle has no status entry")
    status = entries[0].get("resource")
    stype = status.get("resourceType") if isinstance(status, dict) else None
    if stype == "Parameters":
        header, events = _parse_parameters(status)
        style = "backport-r4"
    elif stype == "SubscriptionStatus":
        header, events = _parse_status(status)
        style = "r5" if btype == "subscription-notification" else "backport-r4b"
    else:
        raise NotificationError(f"the first entry of a notification is a Parameters or SubscriptionStatus, not {stype!r}")
    if header["type"] not in KINDS:
        raise NotificationError(f"unknown notification type {header['type']!r}")
    # full-resource payloads: the resources follow the status entry
    carried = {}
    for entry in entries[1:]:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str) and isinstance(resource.get("id"), str):
            carried[f"{resource['resourceType']}/{resource['id']}"] = resource
    enriched = []
    for e in events:
        resource = carried.get(e.focus or "")
        if resource is not None:
            meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
            e = e.model_copy(update={"patient": e.patient or patient_of(resource),
                                     "version": meta.get("versionId") if isinstance(meta.get("versionId"), str) else None})
        enriched.append(e)
    return Notification(style=style, kind=header["type"], subscription=header["subscription"],
                        topic=header["topic"] if isinstance(header["topic"], str) else None,
                        events_since_start=header["events"], events=tuple(enriched))


def parse_notification(body: Any, path: str | None = None) -> Notification:
    """A Notification from a parsed JSON body (None for an empty body)."""
    if body is None:
        return Notification(style="rest-hook-empty", kind="empty")
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise NotificationError("the body is not a FHIR resource (no resourceType)")
    if body["resourceType"] == "Bundle" and body.get("type") in ("history", "subscription-notification"):
        if path:
            raise NotificationError("a notification Bundle is POSTed to the endpoint itself")
        return _parse_bundle(body)
    return Notification(style="rest-hook", kind="resource", events=(_resource_event(body, path),))
