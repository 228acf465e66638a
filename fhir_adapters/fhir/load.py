"""Load Bundles of resources onto a FHIR server (the demo, interop runs, tests).

A ``collection`` Bundle becomes a ``transaction`` of ``PUT [type]/[id]`` entries, so
loading twice changes nothing and references between the resources keep working.
An optional tag marks every resource (interop runs clean up by it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

from fhir_adapters.fhir.codec import loads
from fhir_adapters.fhir.client import FhirClient


def as_transaction_entries(bundle: dict, tag: tuple[str, str] | None = None) -> list[dict]:
    entries = []
    for entry in bundle.get("entry", []):
        resource = copy.deepcopy(entry["resource"])
        if tag is not None:
            meta = resource.setdefault("meta", {})
            meta.setdefault("tag", []).append({"system": tag[0], "code": tag[1]})
        rtype, rid = resource["resourceType"], resource["id"]
        entries.append({"fullUrl": f"{rtype}/{rid}", "resource": resource,
                        "request": {"method": "PUT", "url": f"{rtype}/{rid}"}})
    return entries


def load_bundles(client: FhirClient, bundles: Iterable[dict], tag: tuple[str, str] | None = None) -> int:
    """PUT every resource of ``bundles`` (one transaction per Bundle); returns the count."""
    count = 0
    for bundle in bundles:
        entries = as_transaction_entries(bundle, tag)
        client.transaction(entries)
        count += len(entries)
    return count


def fixture_bundles(directory: Path) -> list[dict]:
    """The numbered fixture Bundles (``NN-name.json``) of a directory, in order."""
    return [loads(p.read_bytes()) for p in sorted(directory.glob("[0-9][0-9]-*.json"))]
