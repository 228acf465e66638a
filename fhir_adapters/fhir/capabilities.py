"""What a FHIR server declares in its CapabilityStatement, parsed once.

Every question the program asks of a server's capabilities (can it batch? ``$export``?
which search parameters does RiskAssessment have? update-as-create?) is asked of one
:class:`ServerCapabilities`, which :meth:`fhir_adapters.fhir.client.FhirClient.capabilities`
fetches once per client. Only ``rest.mode = server`` is read. Parsing never fails: a part
of the wrong JSON kind (``"rest": {}``, ``"interaction": 5``, an entry that is not an
object) is ignored and named in :attr:`ServerCapabilities.problems`.

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
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ServerCapabilities", "ResourceCapabilities", "CapabilitiesCache"]


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


def _kind(value: Any) -> str:
    """The JSON kind of ``value``, for a problem's text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class _Reader:
    """Reads the parts of a statement defensively: a part of the wrong JSON kind is
    ignored and named in :attr:`problems` (never an exception)."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if text not in self.problems and len(self.problems) < 50:
            self.problems.append(text)

    def items(self, owner: Mapping, key: str, where: str) -> list[Mapping]:
        """The objects of the array ``owner[key]`` (absent: none)."""
        value = owner.get(key)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            self.problem(f"{_path(where, key)} is {_kind(value)}, not an array: ignored")
            return []
        bad = [i for i, item in enumerate(value) if not isinstance(item, Mapping)]
        if bad:
            self.problem(f"{_path(where, key)}[{bad[0]}] is {_kind(value[bad[0]])}, not an object: ignored"
                         + (f" ({len(bad)} such entries)" if len(bad) > 1 else ""))
        return [item for item in value if isinstance(item, Mapping)]

    def codes(self, owner: Mapping, key: str, field_name: str, where: str) -> frozenset[str]:
        """The string ``field_name`` of each object of ``owner[key]``."""
        out = set()
        for item in self.items(owner, key, where):
            value = item.get(field_name)
            if isinstance(value, str) and value:
                out.add(value)
            elif value is not None:
                self.problem(f"{_path(where, key)}.{field_name} is {_kind(value)}, not a string: ignored")
        return frozenset(out)

    def text(self, owner: Mapping, key: str, where: str) -> str | None:
        value = owner.get(key)
        if value is None or isinstance(value, str):
            return value or None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        self.problem(f"{_path(where, key)} is {_kind(value)}, not a string: ignored")
        return None


@dataclass(frozen=True)
class ServerCapabilities:
    """The parts of a CapabilityStatement this program relies on; ``statement`` is the raw
    JSON; ``problems`` names the parts that were malformed and ignored (for the interop
    report)."""

    fhir_version: str
    software: str
    system_interactions: frozenset[str]
    system_operations: frozenset[str]
    resources: Mapping[str, ResourceCapabilities]
    statement: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    problems: tuple[str, ...] = ()

    @classmethod
    def parse(cls, statement: Any) -> "ServerCapabilities":
        """Parse any JSON value; never raises. What is not of the kind FHIR says (``"rest": {}``,
        ``"interaction": 5``, a resource entry that is a string, ...) is ignored and named in
        :attr:`problems`.

        >>> caps = ServerCapabilities.parse({"rest": [{"resource": 5}, "x"], "fhirVersion": 4})
        >>> caps.resources, caps.fhir_version
        (mappingproxy({}), '4')
        >>> caps.problems
        ('rest[1] is a string, not an object: ignored', 'rest[0].resource is a number, not an array: ignored')
        """
        read = _Reader()
        if not isinstance(statement, Mapping):
            if statement is not None:
                read.problem(f"the CapabilityStatement is {_kind(statement)}, not an object: ignored")
            statement = {}
        kind = statement.get("resourceType")
        if kind is not None and kind != "CapabilityStatement":
            read.problem(f"resourceType is {kind!r}, not 'CapabilityStatement'")
        soft = statement.get("software")
        if soft is not None and not isinstance(soft, Mapping):
            read.problem(f"software is {_kind(soft)}, not an object: ignored")
        soft = soft if isinstance(soft, Mapping) else {}
        software = " ".join(x for x in (read.text(soft, "name", "software"), read.text(soft, "version", "software"))
                            if x) or "(not stated)"
        system: set[str] = set()
        operations: set[str] = set()
        merged: dict[str, dict[str, Any]] = {}
        for n, rest in enumerate(read.items(statement, "rest", "")):
            where = f"rest[{n}]"
            mode = rest.get("mode", "server")
            if mode != "server":
                if not isinstance(mode, str):
                    read.problem(f"{where}.mode is {_kind(mode)}, not a string: the entry is ignored")
                continue
            system |= read.codes(rest, "interaction", "code", where)
            operations |= read.codes(rest, "operation", "name", where)
            for r in read.items(rest, "resource", where):
                rtype = r.get("type")
                if not isinstance(rtype, str) or not rtype:
                    read.problem(f"{where}.resource.type is {_kind(rtype)}, not a resource type: the entry is ignored")
                    continue
                at = f"{where}.resource({rtype})"
                m = merged.setdefault(rtype, {"interactions": set(), "search_params": set(), "operations": set(),
                                              "update_create": False, "conditional_create": False,
                                              "conditional_update": False})
                m["interactions"] |= read.codes(r, "interaction", "code", at)
                m["search_params"] |= read.codes(r, "searchParam", "name", at)
                m["operations"] |= read.codes(r, "operation", "name", at)
                m["update_create"] |= _flag(r.get("updateCreate"))
                m["conditional_create"] |= _flag(r.get("conditionalCreate"))
                m["conditional_update"] |= _flag(r.get("conditionalUpdate"))
        resources = {t: ResourceCapabilities(frozenset(m["interactions"]), frozenset(m["search_params"]),
                                             frozenset(m["operations"]), m["update_create"],
                                             m["conditional_create"], m["conditional_update"])
                     for t, m in merged.items()}
        version = read.text(statement, "fhirVersion", "") or "(not stated)"
        return cls(version, software, frozenset(system), frozenset(operations), MappingProxyType(resources),
                   statement, tuple(read.problems))

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


class CapabilitiesCache:
    """The capabilities of servers that many short-lived clients call (the CDS Hooks
    service makes one client per EHR request, for that request's token): read once per
    server per ``ttl`` seconds instead of at every request. Thread-safe.

    >>> cache = CapabilitiesCache(ttl=60)
    >>> cache.get("http://h/fhir") is None
    True
    >>> cache.put("http://h/fhir", ServerCapabilities.parse({}))
    >>> cache.get("http://h/fhir/") is not None
    True
    """

    def __init__(self, ttl: float = 600.0, clock=time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, ServerCapabilities]] = {}

    def get(self, base_url: str) -> ServerCapabilities | None:
        with self._lock:
            entry = self._entries.get(base_url.rstrip("/"))
        return entry[1] if entry and self._clock() - entry[0] < self.ttl else None

    def put(self, base_url: str, caps: ServerCapabilities) -> None:
        with self._lock:
            self._entries[base_url.rstrip("/")] = (self._clock(), caps)
