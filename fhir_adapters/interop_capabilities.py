"""What a FHIR server declares in its CapabilityStatement, as far as ``clm-stratify
interop`` relies on it (interactions, search parameters, update-as-create, conditional
create / update)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping


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
