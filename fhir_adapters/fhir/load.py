"""Load Bundles of resources onto a FHIR server (the demo, interop runs, tests).

A ``collection`` Bundle becomes one ``transaction``. How the resources get their ids
depends on the server (its CapabilityStatement):

* **PUT by id** (``PUT [type]/[id]``) when the server allows clients to choose ids
  (``updateCreate: true`` for every type of the Bundle it lists): loading twice changes
  nothing and the ids stay those of the Bundle.
* **POST with urn:uuid** otherwise (a server that assigns ids, e.g. Medplum): every
  resource gets a ``urn:uuid:`` fullUrl, references between them are rewritten to it
  (the server resolves them, FHIR R4 transaction rules), and the ids the server chose
  are read back from each entry's ``response.location``. Loading twice makes copies.

:func:`load_bundles` returns a :class:`Loaded`: how many resources, how, and the id map
``Type/bundle-id -> Type/server-id`` (identity for PUT), so callers find their patients.
An optional tag marks every resource (interop runs clean up by it).
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fhir_adapters.fhir.capabilities import ServerCapabilities
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.codec import loads

PUT_BY_ID = "PUT by id"
POST_URN_UUID = "POST with urn:uuid (server-assigned ids)"


@dataclass
class Loaded:
    """What :func:`load_bundles` did."""

    count: int = 0
    method: str = PUT_BY_ID
    ids: dict[str, str] = field(default_factory=dict)   # Type/bundle-id -> Type/server-id

    def server_id(self, ref: str) -> str:
        """The server's id of a Bundle resource (``Patient/f01-pat`` -> its id there)."""
        return self.ids[ref].split("/", 1)[1]


def client_ids_allowed(caps: ServerCapabilities, types: Iterable[str]) -> bool:
    """The server lets clients choose ids (``updateCreate: true``) for every type of
    ``types`` it lists; for types it does not list, as it does for all the others (a
    statement that lists no type at all: assumed yes, the older behaviour)."""
    listed = [r for t in types if (r := caps.resource(t)) is not None]
    if listed:
        return all(r.update_create for r in listed)
    return all(r.update_create for r in caps.resources.values())


def _tagged(resource: dict, tag: tuple[str, str] | None) -> dict:
    resource = copy.deepcopy(resource)
    if tag is not None:
        meta = resource.setdefault("meta", {})
        meta.setdefault("tag", []).append({"system": tag[0], "code": tag[1]})
    return resource


def as_transaction_entries(bundle: dict, tag: tuple[str, str] | None = None) -> list[dict]:
    """``PUT [type]/[id]`` entries for every resource of ``bundle``."""
    entries = []
    for entry in bundle.get("entry", []):
        resource = _tagged(entry["resource"], tag)
        rtype, rid = resource["resourceType"], resource["id"]
        entries.append({"fullUrl": f"{rtype}/{rid}", "resource": resource,
                        "request": {"method": "PUT", "url": f"{rtype}/{rid}"}})
    return entries


def as_create_entries(bundle: dict, tag: tuple[str, str] | None = None,
                      known: dict[str, str] | None = None) -> tuple[list[dict], list[str]]:
    """``POST [type]`` entries with ``urn:uuid`` fullUrls, references rewritten to them;
    references to resources loaded earlier (``known``: bundle ref -> server ref) are
    rewritten to their server ids. Returns (entries, the bundle ref of each entry)."""
    urns: dict[str, str] = {}
    refs: list[str] = []
    for entry in bundle.get("entry", []):
        r = entry["resource"]
        ref = f"{r['resourceType']}/{r['id']}"
        urn = f"urn:uuid:{uuid.uuid4()}"
        urns[ref] = urn
        if isinstance(entry.get("fullUrl"), str):
            urns[entry["fullUrl"]] = urn
        refs.append(ref)
    targets = {**(known or {}), **urns}
    entries = []
    for entry, ref in zip(bundle.get("entry", []), refs):
        resource = _rewrite(_tagged(entry["resource"], tag), targets)
        resource.pop("id", None)
        entries.append({"fullUrl": urns[ref], "resource": resource,
                        "request": {"method": "POST", "url": resource["resourceType"]}})
    return entries, refs


def _rewrite(value: Any, targets: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: (targets.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, targets))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, targets) for v in value]
    return value


def _location_ref(response: dict, rtype: str) -> str:
    location = str((response.get("response") or {}).get("location") or "")
    parts = location.split("?")[0].split("/")
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == rtype and parts[-1]:
        return f"{rtype}/{parts[-1]}"
    resource = response.get("resource")
    if isinstance(resource, dict) and resource.get("id"):
        return f"{rtype}/{resource['id']}"
    raise FhirError(f"the transaction response names no {rtype} id (no response.location, no resource)",
                    method="POST")


def load_method(caps: ServerCapabilities, types: Iterable[str]) -> str:
    """:data:`PUT_BY_ID` when the server lets clients choose ids for ``types``, else
    :data:`POST_URN_UUID`."""
    return PUT_BY_ID if client_ids_allowed(caps, types) else POST_URN_UUID


def load_bundle(client: FhirClient, bundle: dict, loaded: Loaded, tag: tuple[str, str] | None = None) -> list[dict]:
    """Load one Bundle in one transaction, the way ``loaded.method`` says; its ids go into
    ``loaded.ids`` (references to Bundles loaded before through ``loaded`` are resolved).
    Returns the transaction-response entries, in the order of the Bundle's entries."""
    if loaded.method == PUT_BY_ID:
        entries = as_transaction_entries(bundle, tag)
        responses = client.transaction(entries)
        loaded.ids.update({e["fullUrl"]: e["fullUrl"] for e in entries})
    else:
        entries, refs = as_create_entries(bundle, tag, loaded.ids)
        responses = client.transaction(entries)
        for entry, ref, response in zip(entries, refs, responses):
            loaded.ids[ref] = _location_ref(response, entry["resource"]["resourceType"])
    loaded.count += len(entries)
    return responses


def load_bundles(client: FhirClient, bundles: Iterable[dict], tag: tuple[str, str] | None = None) -> Loaded:
    """Load every resource of ``bundles`` (one transaction per Bundle); see the module docstring."""
    bundles = list(bundles)
    types = {e["resource"]["resourceType"] for b in bundles for e in b.get("entry", [])}
    loaded = Loaded(method=load_method(client.capabilities(), types))
    for bundle in bundles:
        load_bundle(client, bundle, loaded, tag)
    return loaded


def fixture_bundles(directory: Path) -> list[dict]:
    """The numbered fixture Bundles (``NN-name.json``) of a directory, in order."""
    return [loads(p.read_bytes()) for p in sorted(directory.glob("[0-9][0-9]-*.json"))]
