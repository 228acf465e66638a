"""FHIR-level helpers of ``clm-stratify interop``: what a server declares, run-scoped
test data, behaviour probes, and clean-up.

Everything a run creates carries the run's ``meta.tag``
(:data:`RUN_TAG_SYSTEM` | run id) and, for the loaded patient data, ids that end in
``-<run id>`` with every reference inside the Bundle rewritten to match, so two runs on
one shared sandbox never touch each other's resources. Clean-up deletes only what
carries that tag (checked here, not trusted to the server's ``_tag`` search).

The probe resources are bare ``Patient`` resources (an identifier and the run tag): no
clinical content, and every FHIR server supports them.
"""

from __future__ import annotations

import copy
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from fhir_adapters.client import FhirClient, FhirError

RUN_TAG_SYSTEM = "https://clm-stratify.org/fhir/CodeSystem/interop-run"
PROBE_IDENTIFIER_SYSTEM = "https://clm-stratify.org/fhir/NamingSystem/interop-probe"
#: a ``next`` link longer than this is reported as a long continuation token.
LONG_LINK_CHARS = 1000
FHIR_JSON = "application/fhir+json"

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


# --------------------------------------------------------------------------- capabilities

@dataclass
class ResourceCaps:
    interactions: set[str] = field(default_factory=set)
    search_params: set[str] = field(default_factory=set)
    update_create: bool = False
    conditional_create: bool = False
    conditional_update: bool = False


@dataclass
class ServerCaps:
    """The parts of a CapabilityStatement a run relies on."""

    fhir_version: str
    software: str
    system_interactions: set[str]
    resources: dict[str, ResourceCaps]

    @classmethod
    def parse(cls, caps: Mapping) -> "ServerCaps":
        soft = caps.get("software") or {}
        software = " ".join(str(x) for x in (soft.get("name"), soft.get("version")) if x) or "(not stated)"
        system: set[str] = set()
        resources: dict[str, ResourceCaps] = {}
        for rest in caps.get("rest") or []:
            if rest.get("mode", "server") != "server":
                continue
            system |= {i.get("code") for i in rest.get("interaction") or [] if i.get("code")}
            for r in rest.get("resource") or []:
                rc = resources.setdefault(str(r.get("type")), ResourceCaps())
                rc.interactions |= {i.get("code") for i in r.get("interaction") or [] if i.get("code")}
                rc.search_params |= {p.get("name") for p in r.get("searchParam") or [] if p.get("name")}
                rc.update_create |= bool(r.get("updateCreate"))
                rc.conditional_create |= bool(r.get("conditionalCreate"))
                rc.conditional_update |= bool(r.get("conditionalUpdate"))
        return cls(str(caps.get("fhirVersion") or "(not stated)"), software, system, resources)

    def missing_search(self, rtype: str, params: Iterable[str]) -> list[str]:
        """What is not declared for ``rtype``: ``search-type`` and/or search parameters."""
        rc = self.resources.get(rtype)
        if rc is None:
            return [f"{rtype} (not in the CapabilityStatement)"]
        out = [] if "search-type" in rc.interactions else [f"{rtype} search-type"]
        return out + [f"{rtype}?{p}" for p in params if p not in rc.search_params]

    def missing_interaction(self, rtypes: Iterable[str], interaction: str) -> list[str]:
        return sorted(t for t in rtypes if interaction not in self.resources.get(t, ResourceCaps()).interactions)


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

    def rewrite(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str) and (m := _REF.match(value)):
                    target = ids.get(f"{m['type']}/{m['id']}")
                    if target:
                        node[key] = target + (m["hist"] or "")
                else:
                    rewrite(value)
        elif isinstance(node, list):
            for item in node:
                rewrite(item)

    for entry in out.get("entry") or []:
        r = entry["resource"]
        new_ref = ids[ref_of(r)]
        r["id"] = new_ref.split("/", 1)[1]
        rewrite(r)
        entry["fullUrl"] = new_ref
    return out, ids


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


# --------------------------------------------------------------------------- recording replies

class ReplyRecorder:
    """Counts the media types of the server's replies (a ``requests`` response hook).

    >>> rec = ReplyRecorder(FhirClient("http://127.0.0.1:1/fhir"))   # doctest: +SKIP
    >>> rec.media_types                                             # doctest: +SKIP
    Counter({'application/fhir+json': 212, 'application/json': 3})
    """

    def __init__(self, client: FhirClient):
        self.client = client
        self.media_types: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self._lock = threading.Lock()
        client.session.hooks.setdefault("response", []).append(self._hook)

    def _hook(self, resp: Any, *args: Any, **kwargs: Any) -> Any:
        if resp.content:
            mime = resp.headers.get("Content-Type", "").split(";")[0].strip().lower() or "(none)"
            with self._lock:
                self.media_types[mime] += 1
                path = resp.request.path_url.split("?")[0] if resp.request is not None else ""
                self.examples.setdefault(mime, f"{resp.request.method if resp.request else ''} {path}".strip())
        return resp

    def close(self) -> None:
        hooks = self.client.session.hooks.get("response", [])
        if self._hook in hooks:
            hooks.remove(self._hook)


# --------------------------------------------------------------------------- searching

@dataclass
class SearchPages:
    """What a search returned, page by page (bounded)."""

    resources: list[dict] = field(default_factory=list)
    pages: int = 0
    page_sizes: list[int] = field(default_factory=list)
    totals: list[int | None] = field(default_factory=list)
    next_link_lengths: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def ids(self) -> list[str]:
        return [ref_of(r) for r in self.resources]


def search_pages(client: FhirClient, rtype: str, params: Mapping[str, str], *, max_pages: int = 100,
                 strict: bool = False) -> SearchPages:
    """Run a search following ``next`` links verbatim, recording what each page looked like."""
    out = SearchPages()
    pages = client.search_pages(rtype, dict(params), strict=strict)
    try:
        for bundle in pages:
            out.pages += 1
            entries = [e for e in bundle.get("entry") or []
                       if (e.get("search") or {}).get("mode") != "outcome" and isinstance(e.get("resource"), dict)]
            out.resources += [e["resource"] for e in entries]
            out.page_sizes.append(len(entries))
            out.totals.append(bundle.get("total"))
            nxt = next((link.get("url") for link in bundle.get("link") or []
                        if link.get("relation") == "next" and link.get("url")), None)
            if nxt:
                out.next_link_lengths.append(len(nxt))
            if out.pages >= max_pages and nxt:
                out.truncated = True
                break
    finally:
        pages.close()
    out.warnings = list(client.last_search_warnings)
    return out


def owner_of(resource: Mapping) -> str | None:
    for key in ("subject", "patient"):
        ref = (resource.get(key) or {}).get("reference")
        if isinstance(ref, str) and (m := _REF.match(ref)) and m["type"] == "Patient":
            return f"Patient/{m['id']}"
    return None


# --------------------------------------------------------------------------- probes

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
class UnknownParamProbe:
    lenient_status: int | None
    lenient_count: int
    lenient_warnings: list[str]
    lenient_outcome: str
    strict_status: int | None
    strict_outcome: str


def probe_unknown_parameter(client: FhirClient, tag: tuple[str, str], rtype: str = "Patient") -> UnknownParamProbe:
    """Search the run's tagged resources with a made-up parameter, without and with
    ``Prefer: handling=strict``."""
    params = {"_tag": tag_token(tag), f"clm-interop-unknown-{tag[1]}": "1", "_count": "10"}
    results: list[Any] = []
    for strict in (False, True):
        try:
            page = search_pages(client, rtype, params, max_pages=1, strict=strict)
            results.append((200, len(page.resources), page.warnings, ""))
        except FhirError as exc:
            results.append((exc.status, 0, [], exc.outcome))
    (ls, lc, lw, lo), (ss, _, _, so) = results
    return UnknownParamProbe(ls, lc, lw, lo, ss, so)


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


__all__ = [
    "RUN_TAG_SYSTEM", "PROBE_IDENTIFIER_SYSTEM", "LONG_LINK_CHARS", "FHIR_JSON", "ServerCaps", "ResourceCaps",
    "new_run_id", "tag_token", "has_tag", "ref_of", "run_scoped_bundle", "references_in", "token_matches",
    "local_search", "ReplyRecorder", "SearchPages", "search_pages", "owner_of", "ProbeResult",
    "probe_version_conflict", "probe_conditional_create_multiple", "UnknownParamProbe",
    "probe_unknown_parameter", "deletion_levels", "deletion_order", "delete_levels", "tagged", "still_present",
]
