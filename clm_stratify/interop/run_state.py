"""What one ``clm-stratify interop`` run holds (server, fixtures, what it created) and its
bookkeeping (checks, quirks, skips, fallbacks, step timings), shared by the step modules."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clm_stratify.interop.checks import FAIL, QUIRKS, SKIP, Check, InteropReport, Quirk
from clm_stratify.interop import probes
from fhir_adapters.fhir.codec import loads
from clm_stratify.pipeline import Rules
from fhir_adapters.fhir.capabilities import ServerCapabilities
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.fhir.client import FhirClient, FhirError
from clm_stratify.interop.probes import ref_of
from fhir_adapters.writeback.strategy import UpdateAsCreate


@dataclass
class FixturePatient:
    """A fixture patient as loaded and what ``expected.yaml`` says of it: ``patient`` is its
    id on the server (run-suffixed, or the server's own when it assigns ids) and
    ``resources`` are as the server holds them (server ids, references rewritten)."""

    fixture: str
    original_id: str
    patient: PatientRef
    expected_group: str
    expected_status: str
    resources: list[dict]


class RunState:
    """The state of one interop run and its bookkeeping; the steps are mixins of this
    class, put together in :class:`clm_stratify.interop.run.InteropRun`."""

    _types: list[str]                  # resource types of the fixtures (set by the capabilities step)
    _raw_bundles: list[dict]           # the fixture Bundles, read once (see _bundles)

    def __init__(self, client: FhirClient, rules: Rules, *,
                 fixtures_dir: Path | None = None, fixtures: list[str] | None = None,
                 keep: bool = False, run_id: str | None = None):
        from fixtures import FIXTURES_DIR

        self.client = client
        self.rules = rules
        self.fixtures_dir = Path(fixtures_dir or FIXTURES_DIR)
        self.fixture_names = fixtures or sorted(p.name for p in self.fixtures_dir.glob("[0-9][0-9]-*.json"))
        self.keep = keep
        self.run_id = run_id or probes.new_run_id()
        self.tag = (probes.RUN_TAG_SYSTEM, self.run_id)
        self.report = InteropReport(self.run_id, client.base_url)
        self.caps: ServerCapabilities | None = None
        self.choice = None
        self.patients: list[FixturePatient] = []
        self.loaded: list[dict] = []          # every resource sent (for clean-up)
        self.created: list[str] = []          # probe resources, Provenances found
        self.ra_refs: dict[PatientRef, str] = {}   # patient -> RiskAssessment/<id> (the first write)
        self.assessments: set[str] = set()         # every RiskAssessment/<id> met of the run's patients
        self._step = ""

    # ------------------------------------------------------------------ bookkeeping
    def check(self, id: str, title: str, status: str, detail: str = "", outcome: str = "",
              seconds: float = 0.0) -> Check:
        c = Check(id, self._step, title, status, detail, outcome, seconds)
        self.report.checks.append(c)
        return c

    def quirk(self, id: str, detail: str, handling: str, evidence: str = "") -> None:
        q = self.report.quirks.get(id)
        if q is None:
            self.report.quirks[id] = Quirk(id, QUIRKS[id], detail, handling, evidence)
        else:
            q.detail += f"; {detail}"
            if evidence and evidence not in q.evidence:
                q.evidence = "; ".join(x for x in (q.evidence, evidence) if x)

    def skip(self, checks: tuple[tuple[str, str, str], ...], reason: str) -> None:
        for step, id, title in checks:
            self.report.checks.append(Check(id, step, title, SKIP, f"not run: {reason}"))

    def fallback(self, missing: str, used: str) -> None:
        self.report.info.setdefault("fallbacks", []).append({"missing": missing, "fallback": used})

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._step = name
        started = time.monotonic()
        try:
            yield
        except FhirError as exc:
            self.check(f"{name}.error", f"{name}: unexpected server error", FAIL, str(exc), exc.outcome)
        finally:
            self.report.steps[name] = self.report.steps.get(name, 0.0) + time.monotonic() - started

    @contextmanager
    def timed(self) -> Iterator[list[float]]:
        out = [0.0]
        started = time.monotonic()
        try:
            yield out
        finally:
            out[0] = time.monotonic() - started

    # ------------------------------------------------------------------ shared by the steps
    def _bundles(self) -> list[dict]:
        if not hasattr(self, "_raw_bundles"):
            self._raw_bundles = [loads((self.fixtures_dir / n).read_bytes()) for n in self.fixture_names]
        return self._raw_bundles

    @staticmethod
    def _fallback_text(choice) -> str:
        if choice.strategy is UpdateAsCreate:
            return ("update-as-create by deterministic id (PUT RiskAssessment/<id>; the current assessment is "
                    "read by that id, never searched)")
        return f"{choice.strategy.name} (conditional writes on the identifier)"

    def _provenances(self, ra_ref: str) -> list[str]:
        page = probes.search_pages(self.client, "Provenance", {"target": ra_ref, "_count": "50"}, max_pages=5)
        return [ref_of(r) for r in page.resources if r.get("resourceType") == "Provenance"
                and any((t.get("reference") or "").split("/_history/")[0].endswith(ra_ref)
                        for t in r.get("target") or [])]

    def _assessments_on_server(self) -> list[str] | None:
        """``RiskAssessment/<id>`` of every assessment the server holds for the run's
        patients (their ids are the run's own), when RiskAssessment can be searched by
        patient; None when it cannot (then they are known by id only)."""
        ra = self.caps.resource("RiskAssessment") if self.caps else None
        if ra is None or "patient" not in ra.search_params or not self.patients:
            return None
        mine = {p.patient.reference for p in self.patients}
        ids = sorted(p.patient.id for p in self.patients)
        found: list[str] = []
        try:
            for i in range(0, len(ids), 50):
                res = probes.search_pages(self.client, "RiskAssessment",
                                          {"patient": ",".join(ids[i:i + 50]), "_count": "100"}, max_pages=10)
                found += [probes.ref_of(r) for r in res.resources
                          if r.get("resourceType") == "RiskAssessment" and probes.owner_of(r) in mine]
        except FhirError:
            return None
        return sorted(set(found))
