"""How a RiskAssessment is found and written on one server: a strategy object, chosen
once from the server's capabilities (:func:`choose`), best first:

1. :class:`UpdateAsCreate`: ``PUT RiskAssessment/<deterministic id>``. Race-free and
   needs no search on RiskAssessment (SEKMET has none).
2. :class:`ConditionalUpdate`: ``PUT RiskAssessment?identifier=<system>|<key>``.
3. :class:`ConditionalCreate`: ``POST`` with ``If-None-Exist: identifier=...``.

Each answers two questions: :meth:`WriteStrategy.find_current` (the server's current
assessment for this patient and rule-set version) and :meth:`WriteStrategy.request`
(the transaction entry's ``request`` that writes a new one). An existing assessment is
always updated by id with ``If-Match`` on its version, whatever the strategy, so a
concurrent writer is detected (409 or 412).

A new strategy is one subclass (``name``, ``find_current``, ``_create``) and a line in
:func:`choose`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import quote

from fhir_adapters.fhir.batch import read_entry
from fhir_adapters.fhir.capabilities import ServerCapabilities
from fhir_adapters.fhir.client import FhirClient, FhirConflict, FhirError
from fhir_adapters.fhir.search import token
from fhir_adapters.project import IDENTIFIER_SYSTEM, TAG, TAG_SYSTEM
from fhir_adapters.writeback.resources import is_legacy_of, legacy_id

__all__ = ["WriteStrategy", "UpdateAsCreate", "ConditionalUpdate", "ConditionalCreate", "StrategyChoice",
           "choose", "BY_NAME"]


def identifier_token(ra: dict) -> str:
    """``system|value`` of the assessment's identifier (the conditional-write key), escaped."""
    return token(IDENTIFIER_SYSTEM, ra["identifier"][0]["value"])


def _query(pairs: Sequence[tuple[str, str]]) -> str:
    return "&".join(f"{k}={quote(v, safe='|:/')}" for k, v in pairs)


def is_ours(found: dict, ra: dict) -> bool:
    """``found`` (a search result) really is ``ra``'s assessment: same identifier and subject
    (a server that ignores the identifier parameter returns every assessment)."""
    wanted = ra["identifier"][0]["value"]
    idents = found.get("identifier") if isinstance(found.get("identifier"), list) else []
    same_key = any(isinstance(i, dict) and i.get("system") == IDENTIFIER_SYSTEM and i.get("value") == wanted
                   for i in idents)
    return same_key and (found.get("subject") or {}).get("reference") == ra["subject"]["reference"]


class WriteStrategy:
    """Finds the current assessment and writes a new one, on one server."""

    name: ClassVar[str]

    def __init__(self, client: FhirClient) -> None:
        self.client = client

    def find_current(self, ra: dict) -> dict | None:
        """The server's current RiskAssessment for ``ra``'s patient and rule-set version."""
        raise NotImplementedError

    def find_current_many(self, ras: Sequence[dict]) -> list[dict | None]:
        """:meth:`find_current` for many (one round trip each unless a strategy can batch)."""
        return [self.find_current(ra) for ra in ras]

    def how_found(self, ra: dict) -> str:
        """How :meth:`find_current` looks for ``ra`` (for error messages)."""
        raise NotImplementedError

    def found_otherwise(self, ra: dict) -> dict | None:
        """``ra``'s assessment found another way than :meth:`find_current` (asked before a
        writer's first create: a server whose search misses what is there is caught before
        it gets a duplicate). None when there is no other way, or it finds nothing."""
        return None

    def request(self, ra: dict, current: dict | None) -> tuple[dict, dict]:
        """(the RiskAssessment to send, the transaction entry's ``request``) that writes ``ra``."""
        if current is not None:
            ra = {**ra, "id": current["id"]}
            request = {"method": "PUT", "url": f"RiskAssessment/{current['id']}"}
            version = (current.get("meta") or {}).get("versionId")
            if version:
                request["ifMatch"] = f'W/"{version}"'
            return ra, request
        return self._create(ra)

    def _create(self, ra: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    def retire(self, ra: dict, current: dict | None) -> list[dict]:
        """Transaction entries that retire ``current`` when ``ra`` replaces it under another
        id (an earlier release's assessment); none otherwise."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client.base_url!r})"


def _legacy_id_of(ra: dict) -> str:
    """The id an earlier release gave ``ra``'s assessment (its rule-set version hashed in)."""
    coding = ra["method"]["coding"][0]
    return legacy_id(ra["subject"]["reference"], coding["code"], coding["version"])



class UpdateAsCreate(WriteStrategy):
    """``PUT RiskAssessment/<deterministic id>``; the current one is read by that id."""

    name = "update-as-create"

    def find_current(self, ra: dict) -> dict | None:
        return self.client.read("RiskAssessment", ra["id"]) or self._legacy(ra)

    def _legacy(self, ra: dict) -> dict | None:
        """An assessment an earlier release wrote for this rule-set version (its id hashed the
        version in): replaced by ``ra``'s id in the same transaction (:meth:`request`)."""
        found = self.client.read("RiskAssessment", _legacy_id_of(ra))
        return found if found is not None and is_legacy_of(found, ra) else None

    def request(self, ra: dict, current: dict | None) -> tuple[dict, dict]:
        if current is not None and current.get("id") != ra["id"]:
            return self._create(ra)   # a legacy assessment: ours is written under its own id
        return super().request(ra, current)

    def retire(self, ra: dict, current: dict | None) -> list[dict]:
        if current is not None and current.get("id") != ra["id"]:
            return [{"request": {"method": "DELETE", "url": f"RiskAssessment/{current['id']}"}}]
        return []

    def how_found(self, ra: dict) -> str:
        return f"a read of RiskAssessment/{ra['id']}"

    def find_current_many(self, ras: Sequence[dict]) -> list[dict | None]:
        if not ras or not self.client.capabilities().batch:
            return super().find_current_many(ras)
        # A read that failed (5xx, an OperationOutcome in place of the assessment) is an
        # error, never "no current assessment": that would write a version that says the same.
        reads = [f"RiskAssessment/{ra['id']}" for ra in ras]
        responses = self.client.batch([{"request": {"method": "GET", "url": url}} for url in reads])
        found = [read_entry(self.client.base_url, i, url, r) for i, (url, r) in enumerate(zip(reads, responses))]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:   # first run after an upgrade, or new patients: an earlier release's assessment?
            olds = [f"RiskAssessment/{_legacy_id_of(ras[i])}" for i in missing]
            legacy = self.client.batch([{"request": {"method": "GET", "url": url}} for url in olds])
            for i, url, r in zip(missing, olds, legacy):
                old = read_entry(self.client.base_url, i, url, r)
                found[i] = old if old is not None and is_legacy_of(old, ras[i]) else None
        return found

    def _create(self, ra: dict) -> tuple[dict, dict]:
        return ra, {"method": "PUT", "url": f"RiskAssessment/{ra['id']}"}


class _ByIdentifier(WriteStrategy):
    """Finds the current assessment by its identifier (the server assigns ids); only
    results that really carry the identifier and subject count.

    When the server can search RiskAssessment by ``subject`` (or ``patient``), the
    patient comes first in every search and conditional write, with the identifier:
    the same match, but a server that filters in order looks at one patient's
    assessments instead of scanning every identifier (Medplum's engine: 0.02 s instead
    of 0.5 s per search at 300 assessments, growing with their number)."""

    chunk = 50   # patients per OR search in find_current_many

    def _patient_param(self) -> str | None:
        caps = self.client.capabilities().resource("RiskAssessment")
        return next((p for p in ("subject", "patient") if caps and p in caps.search_params), None)

    def criteria(self, ras: Sequence[dict]) -> list[tuple[str, str]]:
        """The search for these assessments (OR lists): patient first, then identifier."""
        param = self._patient_param()
        pairs = [(param, ",".join(ra["subject"]["reference"] for ra in ras))] if param else []
        return pairs + [("identifier", ",".join(identifier_token(ra) for ra in ras))]

    def find_current(self, ra: dict) -> dict | None:
        found = self.client.search("RiskAssessment", self.criteria([ra]), strict=True)
        return self._one([r for r in found if is_ours(r, ra)], ra) or self._legacy([ra])[0]

    def _legacy(self, ras: Sequence[dict]) -> list[dict | None]:
        """Assessments an earlier release wrote for these patients and rule set (identifier
        ``Patient/<id>|<rule set>|<version>``), found by patient and tag: updated in place
        (the new identifier replaces the old), so one stays current after an upgrade."""
        found = self._by_subject_and_tag(ras)
        if found is None:
            return [None] * len(ras)
        return [self._one([r for r in found if is_legacy_of(r, ra)], ra) for ra in ras]

    def _by_subject_and_tag(self, ras: Sequence[dict]) -> list[dict] | None:
        """Every assessment of these patients with our tag (None: no patient search here)."""
        param = self._patient_param()
        if param is None or not ras:
            return None
        params = [(param, ",".join(ra["subject"]["reference"] for ra in ras)), ("_tag", token(TAG_SYSTEM, TAG)),
                  ("_count", str(4 * len(ras)))]
        return list(self.client.search("RiskAssessment", params))

    def find_current_many(self, ras: Sequence[dict]) -> list[dict | None]:
        out: list[dict | None] = []
        for start in range(0, len(ras), self.chunk):
            part = ras[start:start + self.chunk]
            params = self.criteria(part) + [("_count", str(2 * len(part)))]
            found = list(self.client.search("RiskAssessment", params, strict=True))
            current = [self._one([r for r in found if is_ours(r, ra)], ra) for ra in part]
            missing = [i for i, c in enumerate(current) if c is None]
            for i, old in zip(missing, self._legacy([part[i] for i in missing])):
                current[i] = old
            out += current
        return out

    def how_found(self, ra: dict) -> str:
        return f"the search RiskAssessment?{'&'.join(f'{k}={v}' for k, v in self.criteria([ra]))}"

    def found_otherwise(self, ra: dict) -> dict | None:
        try:
            found = self._by_subject_and_tag([ra])
        except FhirError:
            return None   # no second way on this server
        return next((r for r in found or [] if is_ours(r, ra)), None)

    def _one(self, matches: list[dict], ra: dict) -> dict | None:
        if len(matches) > 1:
            ids = ", ".join(f"RiskAssessment/{m.get('id')}" for m in matches[:5])
            raise FhirConflict(f"{len(matches)} RiskAssessments share identifier {identifier_token(ra)} ({ids}): "
                               "duplicates are already on the server; keep one and delete the others",
                               status=412, url=self.client.base_url)
        return matches[0] if matches else None


class ConditionalUpdate(_ByIdentifier):
    """``PUT RiskAssessment?[subject=<patient>&]identifier=<system>|<key>``."""

    name = "conditional-update"

    def _create(self, ra: dict) -> tuple[dict, dict]:
        ra = {k: v for k, v in ra.items() if k != "id"}
        return ra, {"method": "PUT", "url": f"RiskAssessment?{_query(self.criteria([ra]))}"}


class ConditionalCreate(_ByIdentifier):
    """``POST RiskAssessment`` with ``If-None-Exist: [subject=<patient>&]identifier=<system>|<key>``."""

    name = "conditional-create"

    def _create(self, ra: dict) -> tuple[dict, dict]:
        ra = {k: v for k, v in ra.items() if k != "id"}
        return ra, {"method": "POST", "url": "RiskAssessment", "ifNoneExist": _query(self.criteria([ra]))}


BY_NAME: dict[str, type[WriteStrategy]] = {s.name: s for s in (UpdateAsCreate, ConditionalUpdate, ConditionalCreate)}


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy a server's capabilities allow, why (notes), and what else it declares."""

    strategy: type[WriteStrategy]
    notes: tuple[str, ...] = ()
    fallbacks: tuple[type[WriteStrategy], ...] = ()


def choose(caps: ServerCapabilities) -> StrategyChoice:
    """Pick the write strategy the server's CapabilityStatement allows (with notes).

    >>> choose(ServerCapabilities.parse({"rest": [{"resource": [{"type": "RiskAssessment",
    ...     "conditionalCreate": True, "searchParam": [{"name": "identifier"}]}]}]})).strategy.name
    'conditional-create'
    """
    ra = caps.resource("RiskAssessment")
    notes: list[str] = []
    if ra is None:
        notes.append("RiskAssessment is not in the CapabilityStatement: no search parameters for it "
                     "(an existing assessment is found by its deterministic id)")
        if caps.resources and all(r.update_create for r in caps.resources.values()):
            notes.append("update-as-create inferred from the other resource types (all updateCreate: true)")
        return StrategyChoice(UpdateAsCreate, tuple(notes))
    has_identifier = "identifier" in ra.search_params
    if not has_identifier:
        notes.append("RiskAssessment has no 'identifier' search parameter: conditional writes unavailable")
    if "patient" not in ra.search_params and "subject" not in ra.search_params:
        notes.append("RiskAssessment cannot be searched by patient")
    fallbacks: list[type[WriteStrategy]] = []
    if has_identifier and ra.conditional_update:
        fallbacks.append(ConditionalUpdate)
    if has_identifier and ra.conditional_create:
        fallbacks.append(ConditionalCreate)
    if ra.update_create:
        return StrategyChoice(UpdateAsCreate, tuple(notes), tuple(fallbacks))
    if fallbacks:
        notes.append("server does not allow update-as-create (client-assigned ids) for RiskAssessment")
        return StrategyChoice(fallbacks[0], tuple(notes), tuple(fallbacks[1:]))
    notes.append("no idempotent write strategy is declared; trying update-as-create")
    return StrategyChoice(UpdateAsCreate, tuple(notes))
