"""What a FHIR server declares in its CapabilityStatement, parsed once.

Every question the program asks of a server's capabilities (can it batch? ``$export``?
which search parameters does RiskAssessment have? update-as-create?) is asked of one
:class:`ServerCapabilities`, which :meth:`fhir_adapters.fhir.client.FhirClient.capabilities`
fetches once per client. Only ``rest.mode = server`` is read.

    >>> caps = ServerCapabilities.parse({"fhirVersion": "4.0.1", "rest": [{"mode": "server",
    ...     "interaction": [{"code": "batch"}],
    ...     "resource": [{"type": "RiskAssessment", "updateCreate": True,
    ...                   "searchParam": [{"name": "identifier"}], "interaction": [{"code": "read"}]}]}]})
    >>> caps.batch, caps.export, caps.resource("RiskAssessment").update_create
    (True, False, True)
    >>> caps.missing_search("RiskAssessment", ["identifier", "patient"])
    ['RiskAssessment search-type', 'RiskAssessment?patient']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ServerCapabilities", "ResourceCapabilities"]


@dataclass(frozen=True)
class ResourceCapabilities:
    """``rest.resource`` of one type (merged when a statement lists the type twice)."""

    interactions: frozenset[str] = frozenset()
    search_params: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()
    update_create: bool = False
    conditional_create: bool = False
    conditional_update: bool = False


_NONE = ResourceCapabilities()


def _flag(value: Any) -> bool:
    """A CapabilityStatement boolean (some servers write the string ``"true"``)."""
    return value is True or value == "true"


def _codes(items: Any, key: str) -> frozenset[str]:
    return frozenset(str(i[key]) for i in items or [] if isinstance(i, Mapping) and i.get(key))


@dataclass(frozen=True)
class ServerCapabilities:
    """The parts of a CapabilityStatement this program relies on; ``statement`` is the raw JSON."""

    fhir_version: str
    software: str
    system_interactions: frozenset[str]
    system_operations: frozenset[str]
    resources: Mapping[str, ResourceCapabilities]
    statement: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, statement: Mapping[str, Any] | None) -> "ServerCapabilities":
        statement = statement if isinstance(statement, Mapping) else {}
        soft = statement.get("software") if isinstance(statement.get("software"), Mapping) else {}
        software = " ".join(str(x) for x in (soft.get("name"), soft.get("version")) if x) or "(not stated)"
        system: set[str] = set()
        operations: set[str] = set()
        merged: dict[str, dict[str, Any]] = {}
        for rest in statement.get("rest") or []:
            if not isinstance(rest, Mapping) or rest.get("mode", "server") != "server":
                continue
            system |= _codes(rest.get("interaction"), "code")
            operations |= _codes(rest.get("operation"), "name")
            for r in rest.get("resource") or []:
                if not isinstance(r, Mapping):
                    continue
                m = merged.setdefault(str(r.get("type")), {"interactions": set(), "search_params": set(),
                                                           "operations": set(), "update_create": False,
                                                           "conditional_create": False,
                                                           "conditional_update": False})
                m["interactions"] |= _codes(r.get("interaction"), "code")
                m["search_params"] |= _codes(r.get("searchParam"), "name")
                m["operations"] |= _codes(r.get("operation"), "name")
                m["update_create"] |= _flag(r.get("updateCreate"))
                m["conditional_create"] |= _flag(r.get("conditionalCreate"))
                m["conditional_update"] |= _flag(r.get("conditionalUpdate"))
        resources = {t: ResourceCapabilities(frozenset(m["interactions"]), frozenset(m["search_params"]),
                                             frozenset(m["operations"]), m["update_create"],
                                             m["conditional_create"], m["conditional_update"])
                     for t, m in merged.items()}
        return cls(str(statement.get("fhirVersion") or "(not stated)"), software, frozenset(system),
                   frozenset(operations), MappingProxyType(resources), statement)

    def resource(self, rtype: str) -> ResourceCapabilities | None:
        """The declaration of ``rtype``, or None when the statement does not list it."""
        return self.resources.get(rtype)

    @property
    def batch(self) -> bool:
        """The server declares the ``batch`` system interaction."""
        return "batch" in self.system_interactions

    @property
    def export(self) -> bool:
        """The server offers Bulk Data ``$export`` at system or Patient level."""
        return "export" in self.system_operations or "export" in (self.resources.get("Patient", _NONE).operations)

    def missing_search(self, rtype: str, params: Iterable[str]) -> list[str]:
        """What is not declared for ``rtype``: ``search-type`` and/or search parameters."""
        rc = self.resources.get(rtype)
        if rc is None:
            return [f"{rtype} (not in the CapabilityStatement)"]
        out = [] if "search-type" in rc.interactions else [f"{rtype} search-type"]
        return out + [f"{rtype}?{p}" for p in params if p not in rc.search_params]

    def missing_interaction(self, rtypes: Iterable[str], interaction: str) -> list[str]:
        """The types among ``rtypes`` that do not declare ``interaction``."""
        return sorted(t for t in rtypes if interaction not in self.resources.get(t, _NONE).interactions)
