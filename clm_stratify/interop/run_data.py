"""Run-scoped test data of ``clm-stratify interop``: the run tag, run-suffixed ids with
their references rewritten, and what a correct server returns for a search over it.

Everything a run creates carries the run's ``meta.tag`` (:data:`RUN_TAG_SYSTEM` | run id)
and, for the loaded patient data, ids that end in ``-<run id>`` with every reference
inside the Bundle rewritten to match, so two runs on one shared sandbox never touch each
other's resources.
"""

from __future__ import annotations

import copy
import re
import secrets
from typing import Any, Iterable, Mapping


_REF = re.compile(r"^(?:.*/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?P<hist>/_history/[^/]+)?$")


def new_run_id() -> str:
    """A short random run id (8 hex characters)."""
    return secrets.token_hex(4)


def tag_token(tag: tuple[str, str]) -> str:
    return f"{tag[0]}|{tag[1]}"


def has_tag(resource: Mapping, tag: tuple[str, str]) -> bool:
    return any(t.get("system") == tag[0] and t.get("code") == tag[1]
               for t in (resource.get("meta") or {}).get("tag") or [] if isinstance(t, Mapping))


def ref_of(resource: Mapping) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


# --------------------------------------------------------------------------- run-scoped data

def run_scoped_bundle(bundle: Mapping, run_id: str) -> tuple[dict, dict[str, str]]:
    """A copy of a fixture Bundle whose ids end in ``-<run_id>``, references rewritten.

    Returns the Bundle and the id map (``"Patient/f01-pat"`` -> ``"Patient/f01-pat-<run>"``).
    References to resources of the Bundle (relative, or absolute with any base, with or
    without ``/_history/n``) become relative references to the new ids; other references
    (``urn:uuid:``, ``#contained``, resources outside the Bundle) are left alone.

    >>> b = {"resourceType": "Bundle", "type": "collection", "entry": [
    ...     {"fullUrl": "https://x.org/Patient/p", "resource": {"resourceType": "Patient", "id": "p"}},
    ...     {"resource": {"resourceType": "Observation", "id": "o",
    ...                   "subject": {"reference": "https://x.org/Patient/p"}}}]}
    >>> out, ids = run_scoped_bundle(b, "ab12")
    >>> ids["Patient/p"], out["entry"][1]["resource"]["subject"]["reference"]
    ('Patient/p-ab12', 'Patient/p-ab12')
    """
    out = copy.deepcopy(dict(bundle))
    ids: dict[str, str] = {}
    for entry in out.get("entry") or []:
        r = entry["resource"]
        new = f"{r['id']}-{run_id}"
        if len(new) > 64:
            raise ValueError(f"{ref_of(r)}: id too long for a run suffix (FHIR ids are at most 64 characters)")
        ids[ref_of(r)] = f"{r['resourceType']}/{new}"

    for entry in out.get("entry") or []:
        r = entry["resource"]
        new_ref = ids[ref_of(r)]
        r["id"] = new_ref.split("/", 1)[1]
        _rewrite_references(r, ids)
        entry["fullUrl"] = new_ref
    return out, ids


def _rewrite_references(node: Any, ids: Mapping[str, str]) -> None:
    """Point every reference to a key of ``ids`` (``Type/id``) at its value, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and (m := _REF.match(value)):
                target = ids.get(f"{m['type']}/{m['id']}")
                if target:
                    node[key] = target + (m["hist"] or "")
            else:
                _rewrite_references(value, ids)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, ids)


def as_stored(resource: Mapping, ids: Mapping[str, str]) -> dict:
    """A copy of a loaded resource as the server holds it: its id and its references to
    the other loaded resources replaced by the ids the server gave them (``ids``: Bundle
    ``Type/id`` -> server ``Type/id``; the identity when the ids were the client's).

    >>> r = {"resourceType": "Observation", "id": "o-ab12", "subject": {"reference": "Patient/p-ab12"}}
    >>> as_stored(r, {"Observation/o-ab12": "Observation/9f1c", "Patient/p-ab12": "Patient/77d0"})
    {'resourceType': 'Observation', 'id': '9f1c', 'subject': {'reference': 'Patient/77d0'}}
    """
    out = copy.deepcopy(dict(resource))
    out["id"] = ids[ref_of(resource)].split("/", 1)[1]
    _rewrite_references(out, ids)
    return out


def references_in(resource: Any) -> set[str]:
    """Every ``Type/id`` a resource refers to (relative form)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str) and (m := _REF.match(value)):
                    found.add(f"{m['type']}/{m['id']}")
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(resource)
    return found


def token_matches(token_list: str, codings: Iterable[Mapping]) -> bool:
    """Does a token search value (``system|code,...``) match one of the codings?"""
    for token in token_list.split(","):
        system, sep, code = token.rpartition("|")
        for c in codings:
            if c.get("code") == code and (not sep or not system or c.get("system") == system):
                return True
    return False


def local_search(resources: Iterable[Mapping], rtype: str, params: Mapping[str, str], patient: str) -> set[str]:
    """What a correct server returns for ``rtype?patient=<patient>&code=...`` over ``resources``.

    Understands the parameters the pipeline's per-patient searches use: ``patient``
    (the ``subject``/``patient`` reference) and ``code`` (a token list); ``_count`` and
    the like are ignored.
    """
    out = set()
    for r in resources:
        if r.get("resourceType") != rtype:
            continue
        owner = ((r.get("subject") or r.get("patient") or {}).get("reference") or "")
        if owner != patient:
            continue
        if "code" in params and not token_matches(params["code"], (r.get("code") or {}).get("coding") or []):
            continue
        out.add(ref_of(r))
    return out


def owner_of(resource: Mapping) -> str | None:
    for key in ("subject", "patient"):
        ref = (resource.get(key) or {}).get("reference")
        if isinstance(ref, str) and (m := _REF.match(ref)) and m["type"] == "Patient":
            return f"Patient/{m['id']}"
    return None
