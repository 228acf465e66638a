"""Parse a FHIR Subscription notification, whichever of the three styles it comes in.

1. R4 criteria-based rest-hook: the resource itself (``PUT|POST {endpoint}/{type}/{id}``
   or ``POST {endpoint}``), an empty body (no payload: the receiver re-queries), or a
   deletion (``DELETE {endpoint}/{type}/{id}``, no body: HAPI FHIR's rest-hook with payload).
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

The door (issue 13): what is parsed here is stored, so every field is checked and
bounded before it is kept, and the models carry the same bounds (a stored row that
breaks them fails ``model_validate_json``, and the worker dead-letters it).

* Event numbers and counts (``eventsInNotification`` too, checked though not kept): a
  JSON integer or a string of ASCII digits (FHIR integer64), 0 to 2**63 - 1 (SQLite
  INTEGER); else an error.
* At most :data:`MAX_EVENTS` events per notification.
* ``notificationEvent``, ``additionalContext``, ``parameter``, ``part`` and ``entry``
  must be arrays of objects; a Reference must be an object.
* Kept strings are valid Unicode (no lone surrogate): a reference, ``subscription``
  and ``topic`` at most :data:`MAX_REF` characters without whitespace or control
  characters; ``resourceType`` a FHIR type name; ``id`` a FHIR id (1-64 of
  A-Z a-z 0-9 - .); ``focus`` a literal reference to a resource (kept as ``Type/id``).
  A lone surrogate in the subject reference of a carried resource is an error too, not
  "no patient named".
* Informational fields only (``timestamp``, ``meta.versionId``) are dropped, not
  refused, when malformed: a timestamp that is not a FHIR instant, a version that is not
  a FHIR id.

    >>> try:
    ...     parse_notification({"resourceType": "Bundle", "type": "subscription-notification", "entry": [
    ...         {"resource": {"resourceType": "SubscriptionStatus", "type": "event-notification",
    ...                       "notificationEvent": [{"eventNumber": "9223372036854775808"}]}}]})
    ... except NotificationError as exc:
    ...     print(exc)
    notificationEvent[0].eventNumber is 9223372036854775808, over the limit 9223372036854775807
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StringConstraints,
                      ValidationError)

from fhir_adapters.fhir.reference import PatientRef, patient_of, plain_ref, subject_element

Kind = Literal["handshake", "heartbeat", "event-notification", "query-status", "query-event", "resource", "empty",
               "deletion"]
KINDS = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")

MAX_NUMBER = 2**63 - 1     # the largest SQLite INTEGER
MAX_EVENTS = 1000          # events in one notification
MAX_REF = 1024             # characters of a reference, subscription or topic

_TYPE = r"[A-Z][A-Za-z]{0,63}"
_ID = r"[A-Za-z0-9\-.]{1,64}"
_TEXT = r"[^\s\x00-\x1f\x7f-\x9f]+"          # (a reference or URL: no whitespace, no control character)
_INSTANT = (r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
            r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?"
            r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))")         # (FHIR instant)
_RE = {name: re.compile(p) for name, p in (("type", _TYPE), ("id", _ID), ("local", f"{_TYPE}/{_ID}"),
                                           ("text", _TEXT), ("instant", _INSTANT))}
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUMBER = re.compile(r"([+-]?)([0-9]+)")


class NotificationError(ValueError):
    """The body is not a notification this receiver understands (400 to the sender).
    The message is always valid Unicode (it goes back in the response)."""

    def __init__(self, message: str):
        super().__init__(message.encode("utf-8", "backslashreplace").decode("utf-8"))


def _checked(pattern: str, max_length: int | None = None) -> StringConstraints:
    return StringConstraints(pattern=f"^(?:{pattern})$", max_length=max_length)


TypeName = Annotated[str, _checked(_TYPE)]
FhirId = Annotated[str, _checked(_ID)]
LocalRef = Annotated[str, _checked(f"{_TYPE}/{_ID}")]
Text = Annotated[str, _checked(_TEXT, MAX_REF)]
Instant = Annotated[str, _checked(_INSTANT)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_NUMBER)]

# A PatientRef in memory, ``"Patient/<id>"`` in the stored JSON.
StoredPatientRef = Annotated[PatientRef, BeforeValidator(lambda v: PatientRef.parse(v) if isinstance(v, str) else v),
                             PlainSerializer(lambda r: r.reference, return_type=str)]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    number: Count | None = None
    timestamp: Instant | None = None
    focus: LocalRef | None = None     # "Type/id"
    version: FhirId | None = None     # the focus resource's versionId, when the payload carries it
    patient: StoredPatientRef | None = None   # when the notification says
    resource_type: TypeName | None = None


class Notification(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    style: Literal["rest-hook", "rest-hook-empty", "backport-r4", "backport-r4b", "r5"]
    kind: Kind
    subscription: Text | None = None   # "Subscription/id"
    topic: Text | None = None
    events_since_start: Count | None = None
    events: Annotated[tuple[Event, ...], Field(max_length=MAX_EVENTS)] = ()


# ---------------------------------------------------------------- checking one value
def _kind(value: Any) -> str:
    """The JSON type of ``value``, for a message."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def _show(value: Any) -> str:
    """``value`` for a message: short, and no container is walked (it may be deep)."""
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"a number of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (dict, list)):
        return _kind(value)
    return repr(value)[:60]


def _int(value: Any, what: str) -> int | None:
    """A count or event number: a JSON integer or a string of digits, 0..MAX_NUMBER."""
    if value is None:
        return None
    match = _NUMBER.fullmatch(value) if isinstance(value, str) else None
    if match:
        digits = match[2].lstrip("0") or "0"
        negative = match[1] == "-" and digits != "0"
        number = int(digits) if len(digits) <= 20 else MAX_NUMBER + 1
    elif isinstance(value, int) and not isinstance(value, bool):
        negative, number = value < 0, abs(value)
    else:
        raise NotificationError(f"{what} is not a whole number: {_show(value)}")
    if negative:
        raise NotificationError(f"{what} is negative: {_show(value)}")
    if number > MAX_NUMBER:
        shown = value.lstrip("+") if isinstance(value, str) and len(value) <= 40 else _show(value)
        raise NotificationError(f"{what} is {shown}, over the limit {MAX_NUMBER}")
    return number


def _str(value: Any, what: str, rule: str, about: str, limit: int = MAX_REF) -> str | None:
    """A string kept: valid Unicode, at most ``limit`` characters, matching ``_RE[rule]``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise NotificationError(f"{what} is {_kind(value)}, not a string")
    if _SURROGATE.search(value):
        raise NotificationError(f"{what} is not valid Unicode (a lone surrogate): {_show(value)}")
    if len(value) > limit:
        raise NotificationError(f"{what} is {len(value)} characters long, over the limit {limit}")
    if not _RE[rule].fullmatch(value):
        raise NotificationError(f"{what} is not {about}: {_show(value)}")
    return value


def _optional(value: Any, rule: str) -> str | None:
    """An informational string: kept when it is well formed, else dropped."""
    return value if isinstance(value, str) and _RE[rule].fullmatch(value) else None


def _array(value: Any, what: str) -> list[tuple[str, dict]]:
    """An array of objects (absent: empty), each with its name for a message."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise NotificationError(f"{what} is {_kind(value)}, not an array")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise NotificationError(f"{what}[{i}] is {_kind(item)}, not an object")
    return [(f"{what}[{i}]", item) for i, item in enumerate(value)]


def _events_at_most(items: list, what: str) -> None:
    if len(items) > MAX_EVENTS:
        raise NotificationError(f"{what} has {len(items)} events, over the limit {MAX_EVENTS}")


def _ref(value: Any, what: str) -> str | None:
    """The ``reference`` of a Reference (None when it has none: by identifier or display only)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise NotificationError(f"{what} is {_kind(value)}, not a Reference (an object)")
    return plain_ref(_str(value.get("reference"), f"{what}.reference", "text", "a reference"))


def _focus(value: Any, what: str) -> str | None:
    focus = _ref(value, what)
    if focus is not None and not _RE["local"].fullmatch(focus):
        raise NotificationError(f"{what} is not a literal reference to a resource (Type/id): {_show(focus)}")
    return focus


def _patient_ref(reference: str | None) -> PatientRef | None:
    try:
        return PatientRef.parse(reference) if reference and reference.startswith("Patient/") else None
    except ValueError:
        return None


def _patient_of(resource: dict, what: str) -> PatientRef | None:
    """The patient the resource names (:func:`patient_of`); a lone surrogate in that
    reference is refused, not taken for "no patient"."""
    name, subject = subject_element(resource)
    text = subject.get("reference") if isinstance(subject, dict) else None
    if isinstance(text, str) and _SURROGATE.search(text):
        raise NotificationError(f"{what}{name}.reference is not valid Unicode (a lone surrogate): {_show(text)}")
    return patient_of(resource)


def _version(resource: dict) -> str | None:
    meta = resource.get("meta")
    return _optional(meta.get("versionId"), "id") if isinstance(meta, dict) else None


# ---------------------------------------------------------------- the three styles
def _resource_event(resource: dict, path: str | None) -> dict:
    if resource.get("id") is None:
        raise NotificationError("the notified resource has no resourceType or id")
    rtype = _str(resource["resourceType"], "resourceType", "type", "a FHIR resource type name", 64)
    rid = _str(resource["id"], "id", "id", "a FHIR id (1-64 of A-Z a-z 0-9 - .)", 64)
    if path:
        parts = path.strip("/").split("/")
        if len(parts) != 2 or parts != [rtype, rid]:
            raise NotificationError(f"the URL names {_show(path.strip('/'))} but the body is {rtype}/{rid}")
    return {"focus": f"{rtype}/{rid}", "version": _version(resource), "patient": _patient_of(resource, ""),
            "resource_type": rtype}


def _deleted_event(path: str | None) -> dict:
    """The event of ``DELETE {endpoint}/{type}/{id}``: the focus only (the worker finds its
    patient in the resource's history, as for any event whose focus it cannot read)."""
    rtype, _, rid = (path or "").strip("/").partition("/")
    rtype = _str(rtype, "the URL's resource type", "type", "a FHIR resource type name", 64)
    rid = _str(rid, "the URL's id", "id", "a FHIR id (1-64 of A-Z a-z 0-9 - .)", 64)
    return {"focus": f"{rtype}/{rid}", "resource_type": rtype}


def _event(number: Any, number_what: str, timestamp: Any, focus: Any, focus_what: str,
           context: list[tuple[str, Any]]) -> dict:
    patients = (_patient_ref(_ref(c, what)) for what, c in context)
    patient = next((p for p in list(patients) if p), None)   # (every context is checked)
    focus_ref = _focus(focus, focus_what)
    return {"number": _int(number, number_what), "timestamp": _optional(timestamp, "instant"), "focus": focus_ref,
            "patient": patient, "resource_type": focus_ref.split("/")[0] if focus_ref else None}


def _params(items: Any, what: str) -> dict[str, list[tuple[str, dict]]]:
    """Parameters by name: [(where, parameter)]."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for where, p in _array(items, what):
        if not isinstance(p.get("name"), str):
            raise NotificationError(f"{where}.name is {_kind(p.get('name'))}, not a string")
        out.setdefault(p["name"], []).append((where, p))
    return out


def _value(name: str, where: str, p: dict) -> tuple[str, Any]:
    """(how to name it in a message, the value[x] of a parameter)."""
    for key, value in p.items():
        if key.startswith("value"):
            return f"{name} ({where}.{key})", value
    return f"{name} ({where})", None


def _parse_parameters(status: dict) -> tuple[dict, list[dict]]:
    params = _params(status.get("parameter"), "parameter")
    first = {name: _value(name, *items[0]) for name, items in params.items()}
    notified = params.get("notification-event", [])
    _events_at_most(notified, "notification-event")
    events = []
    for where, item in notified:
        parts = _params(item.get("part"), f"{where}.part")
        get = {name: _value(name, *items[0]) for name, items in parts.items()}
        number_what, number = get.get("event-number", ("event-number", None))
        focus_what, focus = get.get("focus", ("focus", None))
        context = [_value("additional-context", *c) for c in parts.get("additional-context", [])]
        events.append(_event(number, number_what, get.get("timestamp", ("", None))[1], focus, focus_what, context))
    in_what, in_count = first.get("events-in-notification", ("events-in-notification", None))
    _int(in_count, in_what)   # (checked, not kept)
    sub_what, sub = first.get("subscription", ("subscription", None))
    topic_what, topic = first.get("topic", ("topic", None))
    count_what, count = first.get("events-since-subscription-start", ("events-since-subscription-start", None))
    header = {"subscription": _ref(sub, sub_what), "topic": _str(topic, topic_what, "text", "a canonical URL"),
              "type": first.get("type", ("type", None))[1], "events": _int(count, count_what)}
    return header, events


def _parse_status(status: dict) -> tuple[dict, list[dict]]:
    notified = _array(status.get("notificationEvent"), "notificationEvent")
    _events_at_most(notified, "notificationEvent")
    events = []
    for where, item in notified:
        context = _array(item.get("additionalContext"), f"{where}.additionalContext")
        events.append(_event(item.get("eventNumber"), f"{where}.eventNumber", item.get("timestamp"),
                             item.get("focus"), f"{where}.focus", context))
    header = {
        "subscription": _ref(status.get("subscription"), "subscription"),
        "topic": _str(status.get("topic"), "topic", "text", "a canonical URL"),
        "type": status.get("type"),
        "events": _int(status.get("eventsSinceSubscriptionStart"), "eventsSinceSubscriptionStart"),
    }
    _int(status.get("eventsInNotification"), "eventsInNotification")
    return header, events


def _parse_bundle(bundle: dict) -> Notification:
    btype = bundle.get("type")
    if bundle.get("entry") in (None, []):
        raise NotificationError("the notification Bundle has no status entry")
    entries = _array(bundle.get("entry"), "entry")
    status = entries[0][1].get("resource")
    stype = status.get("resourceType") if isinstance(status, dict) else None
    if stype == "Parameters":
        header, events = _parse_parameters(status)
        style = "backport-r4"
    elif stype == "SubscriptionStatus":
        header, events = _parse_status(status)
        style = "r5" if btype == "subscription-notification" else "backport-r4b"
    else:
        raise NotificationError(f"the first entry of a notification is a Parameters or SubscriptionStatus, "
                                f"not {_show(stype)}")
    if header["type"] not in KINDS:
        raise NotificationError(f"unknown notification type {_show(header['type'])}")
    # full-resource payloads: the resources follow the status entry
    carried = {}
    for where, entry in entries[1:]:
        resource = entry.get("resource")
        if resource is not None and not isinstance(resource, dict):
            raise NotificationError(f"{where}.resource is {_kind(resource)}, not an object")
        key = f"{resource.get('resourceType')}/{resource.get('id')}" if resource else ""
        if _RE["local"].fullmatch(key):
            carried.setdefault(key, resource)
    for e in events:
        resource = carried.get(e["focus"] or "")
        if resource is not None:
            e.update(patient=e["patient"] or _patient_of(resource, f"the resource {e['focus']}: "),
                     version=_version(resource))
    return Notification(style=style, kind=header["type"], subscription=header["subscription"],
                        topic=header["topic"], events_since_start=header["events"],
                        events=tuple(Event(**e) for e in events))


def parse_notification(body: Any, path: str | None = None, deleted: bool = False) -> Notification:
    """A Notification from a parsed JSON body (None for an empty body); ``deleted``: a
    ``DELETE`` of ``path`` (``Type/id``), which has no body."""
    try:
        if deleted:
            if body is not None:
                raise NotificationError("a DELETE notification has no body (the URL names the deleted resource)")
            return Notification(style="rest-hook", kind="deletion", events=(Event(**_deleted_event(path)),))
        return _parse(body, path)
    except ValidationError as exc:   # a bound of the models that the checks above missed
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(map(str, first["loc"])) or "the notification"
        raise NotificationError(f"{where}: {first['msg']}") from None


def _parse(body: Any, path: str | None) -> Notification:
    if body is None:
        return Notification(style="rest-hook-empty", kind="empty")
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise NotificationError("the body is not a FHIR resource (no resourceType)")
    if body["resourceType"] == "Bundle" and body.get("type") in ("history", "subscription-notification"):
        if path:
            raise NotificationError("a notification Bundle is POSTed to the endpoint itself")
        return _parse_bundle(body)
    return Notification(style="rest-hook", kind="resource", events=(Event(**_resource_event(body, path)),))
