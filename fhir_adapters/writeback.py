"""Write RiskAssessment + Provenance back, once per patient and rule-set version.

Strategy, chosen from the CapabilityStatement (:func:`choose_strategy`), best first:

1. ``update-as-create``: ``PUT RiskAssessment/<deterministic id>``. Race-free and
   needs no search on RiskAssessment (SEKMET has none).
2. ``conditional-update``: ``PUT RiskAssessment?identifier=<system>|<key>``.
3. ``conditional-create``: ``POST`` with ``If-None-Exist: identifier=...``, then
   ``PUT`` by id with ``If-Match`` for later changes.

Every write is a ``transaction`` (RiskAssessment + Provenance, atomic). The current
assessment is read first: when it already says the same thing, nothing is written
(a re-run on unchanged data adds no version and no Provenance). An existing one is
updated with ``If-Match`` on its version, so a concurrent writer is detected (409 or
412) and the write is retried once on fresh data.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

from engine.classify import Classification
from fhir_adapters.assessment import IDENTIFIER_SYSTEM, build_provenance, build_risk_assessment, same_assessment
from fhir_adapters.client import FhirClient, FhirConflict, FhirError, FhirServerUnavailable


class Strategy(str, Enum):
    UPDATE_AS_CREATE = "update-as-create"
    CONDITIONAL_UPDATE = "conditional-update"
    CONDITIONAL_CREATE = "conditional-create"


@dataclass(frozen=True)
class StrategyChoice:
    strategy: Strategy
    notes: tuple[str, ...] = ()
    fallbacks: tuple[Strategy, ...] = ()


def _resource_caps(caps: dict) -> dict[str, dict]:
    out = {}
    for rest in caps.get("rest", []):
        if rest.get("mode", "server") == "server":
            for r in rest.get("resource", []):
                out[r.get("type")] = r
    return out


def choose_strategy(caps: dict) -> StrategyChoice:
    """Pick the write strategy the server's CapabilityStatement allows (with notes)."""
    resources = _resource_caps(caps)
    ra = resources.get("RiskAssessment")
    notes: list[str] = []
    if ra is None:
        notes.append("RiskAssessment is not in the CapabilityStatement: no search parameters for it "
                     "(an existing assessment is found by its deterministic id)")
        update_create = bool(resources) and all(r.get("updateCreate") for r in resources.values())
        if update_create:
            notes.append("update-as-create inferred from the other resource types (all updateCreate: true)")
        return StrategyChoice(Strategy.UPDATE_AS_CREATE, tuple(notes))
    params = {p.get("name") for p in ra.get("searchParam", [])}
    has_identifier = "identifier" in params
    if not has_identifier:
        notes.append("RiskAssessment has no 'identifier' search parameter: conditional writes unavailable")
    if "patient" not in params and "subject" not in params:
        notes.append("RiskAssessment cannot be searched by patient")
    fallbacks = []
    if has_identifier and ra.get("conditionalUpdate"):
        fallbacks.append(Strategy.CONDITIONAL_UPDATE)
    if has_identifier and ra.get("conditionalCreate"):
        fallbacks.append(Strategy.CONDITIONAL_CREATE)
    if ra.get("updateCreate", False):
        return StrategyChoice(Strategy.UPDATE_AS_CREATE, tuple(notes), tuple(fallbacks))
    if fallbacks:
        notes.append("server does not allow update-as-create (client-assigned ids) for RiskAssessment")
        return StrategyChoice(fallbacks[0], tuple(notes), tuple(fallbacks[1:]))
    notes.append("no idempotent write strategy is declared; trying update-as-create")
    return StrategyChoice(Strategy.UPDATE_AS_CREATE, tuple(notes))


@dataclass
class WriteResult:
    patient: str
    action: str                   # created | updated | unchanged | would-create | would-update | failed
    risk_assessment: str | None = None   # RiskAssessment/<id>[/_history/n]
    error: str | None = None
    resources: list[dict] = field(default_factory=list)  # what was (or would be) written


class AssessmentWriter:
    """Writes classifications to one server with one strategy."""

    def __init__(self, client: FhirClient, choice: StrategyChoice | None = None):
        self.client = client
        self._choice = choice

    @property
    def choice(self) -> StrategyChoice:
        """Chosen on first use (a receiver may start while the FHIR server is down)."""
        if self._choice is None:
            self._choice = choose_strategy(self.client.capabilities())
        return self._choice

    @property
    def strategy(self) -> Strategy:
        return self.choice.strategy

    # ------------------------------------------------------------------ reading
    def current(self, ra: dict) -> dict | None:
        """The server's current assessment for the same patient and rule-set version."""
        if self.strategy is Strategy.UPDATE_AS_CREATE:
            return self.client.read("RiskAssessment", ra["id"])
        matches = list(self.client.search("RiskAssessment", {"identifier": self._identifier(ra)}, strict=True))
        if len(matches) > 1:
            raise FhirConflict(f"{len(matches)} RiskAssessments share identifier {self._identifier(ra)}",
                               status=412, url=self.client.base_url)
        return matches[0] if matches else None

    def current_many(self, ras: Sequence[dict]) -> list[dict | None]:
        """Current assessments for many, in one batch round trip where possible."""
        from fhir_adapters.pull import supports_batch

        if self.strategy is not Strategy.UPDATE_AS_CREATE or not ras or not supports_batch(self.client):
            return [self.current(ra) for ra in ras]
        responses = self.client.batch([{"request": {"method": "GET", "url": f"RiskAssessment/{ra['id']}"}}
                                       for ra in ras])
        out = []
        for response in responses:
            status = str((response.get("response") or {}).get("status", ""))
            out.append(response.get("resource") if status.startswith("2") else None)
        return out

    @staticmethod
    def _identifier(ra: dict) -> str:
        return f"{IDENTIFIER_SYSTEM}|{ra['identifier'][0]['value']}"

    # ------------------------------------------------------------------ building
    def entries(self, r: Classification, ra: dict, current: dict | None) -> list[dict]:
        """Transaction entries: the RiskAssessment and its Provenance."""
        ra = dict(ra)
        if current is not None:
            ra["id"] = current["id"]
        ra_url = f"urn:uuid:{uuid.uuid4()}"
        request: dict = {"method": "PUT", "url": f"RiskAssessment/{ra['id']}"}
        version = (current or {}).get("meta", {}).get("versionId")
        if current is not None and version:
            request["ifMatch"] = f'W/"{version}"'
        elif current is None and self.strategy is Strategy.CONDITIONAL_UPDATE:
            ra.pop("id")
            request = {"method": "PUT", "url": f"RiskAssessment?identifier={self._identifier(ra)}"}
        elif current is None and self.strategy is Strategy.CONDITIONAL_CREATE:
            ra.pop("id")
            request = {"method": "POST", "url": "RiskAssessment", "ifNoneExist": f"identifier={self._identifier(ra)}"}
        if request["method"] == "PUT" and "id" in ra:
            ra_url = f"{self.client.base_url}/RiskAssessment/{ra['id']}"
        provenance = build_provenance(ra, r, activity="UPDATE" if current else "CREATE", target=ra_url)
        return [{"fullUrl": ra_url, "resource": ra, "request": request},
                {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": provenance,
                 "request": {"method": "POST", "url": "Provenance"}}]

    # ------------------------------------------------------------------ writing
    def write(self, r: Classification, *, dry_run: bool = False) -> WriteResult:
        """Write one patient's assessment (retrying once on a concurrent change)."""
        ra = build_risk_assessment(r)
        for attempt in (1, 2):
            current = self.current(ra)
            if same_assessment(current, ra):
                return WriteResult(r.patient, "unchanged", _ref(current))
            entries = self.entries(r, ra, current)
            if dry_run:
                return WriteResult(r.patient, "would-update" if current else "would-create",
                                   f"RiskAssessment/{entries[0]['resource'].get('id', '(new)')}",
                                   resources=[e["resource"] for e in entries])
            try:
                response = self.client.transaction(entries)
            except FhirConflict:
                if attempt == 2:
                    raise
                continue
            return _result(r.patient, response, current, entries)
        raise AssertionError("unreachable")

    def write_many(self, results: Sequence[Classification], *, dry_run: bool = False) -> list[WriteResult]:
        """Write many patients' assessments: one read batch and one transaction for all.

        When the shared transaction fails, each patient is written on its own, so one
        bad record cannot block the others; their failures are reported per patient.
        """
        ras = [build_risk_assessment(r) for r in results]
        try:
            currents = self.current_many(ras)
        except FhirServerUnavailable as exc:  # the server is down: the chunk fails as one
            return [WriteResult(r.patient, "failed", error=str(exc)) for r in results]
        except FhirError:
            return [self._write_alone(r, dry_run) for r in results]
        out: list[WriteResult | None] = [None] * len(results)
        pending: list[tuple[int, list[dict]]] = []
        for i, (r, ra, current) in enumerate(zip(results, ras, currents)):
            if same_assessment(current, ra):
                out[i] = WriteResult(r.patient, "unchanged", _ref(current))
                continue
            entries = self.entries(r, ra, current)
            if dry_run:
                out[i] = WriteResult(r.patient, "would-update" if current else "would-create",
                                     f"RiskAssessment/{entries[0]['resource'].get('id', '(new)')}",
                                     resources=[e["resource"] for e in entries])
            else:
                pending.append((i, entries))
        if pending:
            try:
                response = self.client.transaction([e for _, entries in pending for e in entries])
                for k, (i, entries) in enumerate(pending):
                    out[i] = _result(results[i].patient, response[2 * k:2 * k + 2], currents[i], entries)
            except FhirError:
                # One bad entry fails the whole transaction, or its reply was lost: write
                # each patient alone (each re-reads first, so nothing is written twice).
                # Once one of them finds the server down, the rest fail at once rather
                # than each waiting through the client's retries.
                down: FhirServerUnavailable | None = None
                for i, _ in pending:
                    if down is not None:
                        out[i] = WriteResult(results[i].patient, "failed", error=str(down))
                        continue
                    try:
                        out[i] = self.write(results[i], dry_run=dry_run)
                    except FhirServerUnavailable as alone:
                        down = alone
                        out[i] = WriteResult(results[i].patient, "failed", error=str(alone))
                    except FhirError as alone:
                        out[i] = WriteResult(results[i].patient, "failed", error=str(alone))
        return [w for w in out if w is not None]

    def _write_alone(self, r: Classification, dry_run: bool) -> WriteResult:
        try:
            return self.write(r, dry_run=dry_run)
        except FhirError as exc:
            return WriteResult(r.patient, "failed", error=str(exc))


def _ref(resource: dict | None) -> str | None:
    if not resource:
        return None
    version = (resource.get("meta") or {}).get("versionId")
    return f"RiskAssessment/{resource['id']}" + (f"/_history/{version}" if version else "")


def _result(patient: str, response: list[dict], current: dict | None, entries: list[dict]) -> WriteResult:
    first = (response[0] if response else {}).get("response") or {}
    status = str(first.get("status", ""))
    location = first.get("location") or ""
    ref = location.split("/fhir/")[-1] if location else None
    if ref and "RiskAssessment/" in ref:
        ref = ref[ref.index("RiskAssessment/"):]
    action = "created" if status.startswith("201") or current is None else "updated"
    return WriteResult(patient, action, ref or f"RiskAssessment/{entries[0]['resource'].get('id')}",
                       resources=[e["resource"] for e in entries])
