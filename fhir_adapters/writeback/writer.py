"""Write RiskAssessment + Provenance back, once per patient and rule-set version.

How the current assessment is found and a new one written on this server is a
:class:`~fhir_adapters.writeback.strategy.WriteStrategy`, chosen once from the server's
capabilities (:func:`fhir_adapters.writeback.strategy.choose`).

Every write is a ``transaction`` (RiskAssessment + Provenance, atomic). The current
assessment is read first: when it already says the same thing, nothing is written
(a re-run on unchanged data adds no version and no Provenance). An existing one is
updated with ``If-Match`` on its version, so a concurrent writer is detected (409 or
412) and the write is retried once on fresh data.

The first assessment a writer creates is looked for again the way the next run will look
for it (:meth:`WriteStrategy.find_current`). A server that does not find it (a token
search that does not match the identifier, a PUT that did not keep the id) would get a
duplicate on every run: :class:`WriteNotIdempotent` stops the run instead, naming what
the server did.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Sequence

from engine.classify import Classification
from fhir_adapters.fhir.client import FhirClient, FhirConflict, FhirError, FhirServerUnavailable
from fhir_adapters.writeback.resources import (build_provenance, build_risk_assessment, same_assessment, validated,
                                               with_activity)
from fhir_adapters.writeback.strategy import StrategyChoice, WriteStrategy, choose


class WriteNotIdempotent(FhirError):
    """An assessment this program wrote is not found again the way the next run looks for
    it: writing on would duplicate assessments on every run. Stops the run."""


@dataclass
class WriteResult:
    patient: str
    action: str                   # created | updated | unchanged | would-create | would-update | failed
    risk_assessment: str | None = None   # RiskAssessment/<id>[/_history/n]
    error: str | None = None
    resources: list[dict] = field(default_factory=list)  # what was (or would be) written


@dataclass(frozen=True)
class Prepared:
    """One patient's assessment ready to write: the RiskAssessment and the Provenance
    of its write (its activity and target are set when it is written)."""

    patient: str
    risk_assessment: dict
    provenance: dict

    @classmethod
    def of(cls, r: Classification) -> "Prepared":
        ra = build_risk_assessment(r)
        return cls(r.patient, ra, build_provenance(ra, r, activity="CREATE", check=False))  # validated when written


class AssessmentWriter:
    """Writes classifications to one server with one strategy."""

    def __init__(self, client: FhirClient, choice: StrategyChoice | None = None):
        self.client = client
        self._choice = choice
        self._strategy: WriteStrategy | None = None
        self._verified = False   # a created assessment was found again (once per writer)
        self._refused: WriteNotIdempotent | None = None   # once raised, every later write is refused

    @property
    def choice(self) -> StrategyChoice:
        """Chosen on first use (a receiver may start while the FHIR server is down)."""
        if self._choice is None:
            self._choice = choose(self.client.capabilities())
        return self._choice

    @property
    def strategy(self) -> WriteStrategy:
        if self._strategy is None:
            self._strategy = self.choice.strategy(self.client)
        return self._strategy

    def entries(self, p: Prepared, current: dict | None) -> list[dict]:
        """Transaction entries: the RiskAssessment and its Provenance."""
        ra, request = self.strategy.request(p.risk_assessment, current)
        ra_url = (f"{self.client.base_url}/RiskAssessment/{ra['id']}" if request["method"] == "PUT" and "id" in ra
                  else f"urn:uuid:{uuid.uuid4()}")
        provenance = validated(with_activity(p.provenance, activity="UPDATE" if current else "CREATE", target=ra_url))
        return [{"fullUrl": ra_url, "resource": ra, "request": request},
                {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": provenance,
                 "request": {"method": "POST", "url": "Provenance"}}, *self.strategy.retire(ra, current)]

    # ------------------------------------------------------------------ writing
    def write(self, r: Classification | Prepared, *, dry_run: bool = False) -> WriteResult:
        """Write one patient's assessment (retrying once on a concurrent change)."""
        self._refuse_if_unsafe()
        p = r if isinstance(r, Prepared) else Prepared.of(r)
        ra = p.risk_assessment
        for attempt in (1, 2):
            current = self.strategy.find_current(ra)
            if same_assessment(current, ra):
                return WriteResult(p.patient, "unchanged", _ref(current))
            if current is None and not self._verified and not dry_run:
                self._check_not_hidden(ra)
            entries = self.entries(p, current)
            if dry_run:
                return WriteResult(p.patient, "would-update" if current else "would-create",
                                   f"RiskAssessment/{entries[0]['resource'].get('id', '(new)')}",
                                   resources=[e["resource"] for e in entries if "resource" in e])
            try:
                response = self.client.transaction(entries)
            except FhirConflict:
                if attempt == 2:
                    raise
                continue
            return self._verify(_result(p.patient, response, current, entries), entries)
        raise AssertionError("unreachable")

    def _refuse_if_unsafe(self) -> None:
        """After :class:`WriteNotIdempotent`, this writer writes nothing more (a receiver
        retrying a notification would otherwise add a duplicate per attempt)."""
        if self._refused is not None:
            raise WriteNotIdempotent(f"writing is stopped on this server: {self._refused}",
                                     url=self.client.base_url)

    def _check_not_hidden(self, ra: dict) -> None:
        """Before the first create: the server must not hold ``ra``'s assessment where
        :meth:`WriteStrategy.find_current` cannot see it (a re-run would duplicate it)."""
        hidden = self.strategy.found_otherwise(ra)
        if hidden is not None:
            self._refused = WriteNotIdempotent(
                f"{self.strategy.how_found(ra)} found nothing, but RiskAssessment/{hidden.get('id')} with that "
                f"identifier is on the server (found by subject and tag): this server's search does not find "
                f"assessments the way this program looks for them, so writing would duplicate them; stopping",
                url=self.client.base_url)
            raise self._refused

    def _verify(self, written: WriteResult, entries: list[dict]) -> WriteResult:
        """The first created assessment must be found again (see the module docstring)."""
        if self._verified or written.action != "created":
            return written
        sent = entries[0]["resource"]
        try:
            found = self.strategy.find_current(sent)
        except FhirServerUnavailable:
            return written   # the write happened; the next created one is checked instead
        except FhirError as exc:
            if exc.status is None or exc.status >= 500:
                # The server failed, it did not answer the question: no evidence either way
                # (a 500 while looking must not stop a receiver's writing for good).
                return written   # the next created one is checked instead
            self._refused = WriteNotIdempotent(
                f"{written.risk_assessment} was written, but looking for it again with "
                f"{self.strategy.how_found(sent)} failed ({exc}): a re-run could not find it and would write a "
                f"duplicate; stopping", url=self.client.base_url, status=exc.status)
            raise self._refused from exc
        # The id the server gave (Location, or the returned resource); unknown when it named neither.
        written_id = (written.risk_assessment or "").split("/")[1] if written.risk_assessment else None
        if found is None or (written_id and found.get("id") != written_id):
            what = "found nothing" if found is None else f"found RiskAssessment/{found.get('id')} instead"
            self._refused = WriteNotIdempotent(
                f"{written.risk_assessment or 'A RiskAssessment'} was written, but {self.strategy.how_found(sent)} {what} "
                f"(write strategy {self.strategy.name}): this server does not find an assessment the way the next "
                f"run looks for it, so every run would write a duplicate; stopping", url=self.client.base_url)
            raise self._refused
        self._verified = True
        return written

    def write_many(self, results: Sequence[Classification | Prepared], *, dry_run: bool = False) -> list[WriteResult]:
        """Write many patients' assessments: one read batch and one transaction for all.

        When the shared transaction fails, each patient is written on its own, so one
        bad record cannot block the others; their failures are reported per patient.
        """
        self._refuse_if_unsafe()
        results = [r if isinstance(r, Prepared) else Prepared.of(r) for r in results]
        ras = [r.risk_assessment for r in results]
        try:
            currents = self.strategy.find_current_many(ras)
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
            entries = self.entries(r, current)
            if dry_run:
                out[i] = WriteResult(r.patient, "would-update" if current else "would-create",
                                     f"RiskAssessment/{entries[0]['resource'].get('id', '(new)')}",
                                     resources=[e["resource"] for e in entries if "resource" in e])
            else:
                pending.append((i, entries))
        first_create = next((k for k, (i, _) in enumerate(pending) if currents[i] is None), None)
        if first_create is not None and not self._verified:
            # The first assessment this writer creates is written and found again alone,
            # before the others: a server that cannot find it gets one assessment, not a chunk.
            i, _ = pending.pop(first_create)
            try:
                out[i] = self.write(results[i], dry_run=dry_run)
            except FhirServerUnavailable:
                # Unknown outcome (a lost reply): once more, re-reading first, as the
                # per-patient fallback below does; the write is never repeated blindly.
                out[i] = self._write_alone(results[i], dry_run)
            except WriteNotIdempotent:
                raise
            except FhirError as exc:
                out[i] = WriteResult(results[i].patient, "failed", error=str(exc))
        if pending:
            try:
                response = self.client.transaction([e for _, entries in pending for e in entries])
                at = 0
                for i, entries in pending:
                    out[i] = _result(results[i].patient, response[at:at + len(entries)], currents[i], entries)
                    at += len(entries)
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
                    except WriteNotIdempotent:
                        raise
                    except FhirServerUnavailable as alone:
                        down = alone
                        out[i] = WriteResult(results[i].patient, "failed", error=str(alone))
                    except FhirError as alone:
                        out[i] = WriteResult(results[i].patient, "failed", error=str(alone))
            created = next(((i, entries) for i, entries in pending if out[i].action == "created"), None)
            if created is not None:
                self._verify(out[created[0]], created[1])
        return [w for w in out if w is not None]

    def _write_alone(self, r: Prepared, dry_run: bool) -> WriteResult:
        try:
            return self.write(r, dry_run=dry_run)
        except WriteNotIdempotent:
            raise
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
    # 201 with nothing there before: created. An assessment found before (or, with nothing
    # found, a 200: a concurrent writer's, matched by the conditional write): updated.
    action = "created" if current is None and not status.startswith("200") else "updated"
    sent_id = entries[0]["resource"].get("id") or (current or {}).get("id")
    if not ref and isinstance(response[0].get("resource") if response else None, dict):
        ref = f"RiskAssessment/{response[0]['resource'].get('id')}"   # no Location: the returned resource
    return WriteResult(patient, action, ref or (f"RiskAssessment/{sent_id}" if sent_id else None),
                       resources=[e["resource"] for e in entries if "resource" in e])
