"""``clm-stratify interop``: can this FHIR server store tumour data, let the rules engine
read it back, and accept a RiskAssessment?

One run, five steps, each timed (the JSON report has the figures):

1. **capabilities**: the CapabilityStatement: FHIR version, and what the run relies on
   (search by patient and code, batch, transaction, update-as-create, conditional
   create / update, RiskAssessment search, delete). What is missing is a ``warn`` that
   names the fallback the project uses there (write strategy from
   :func:`fhir_adapters.writeback.choose_strategy`; batch or parallel searches).
2. **load**: the synthetic patients of ``fixtures/``, each resource tagged with the run
   (:data:`~fhir_adapters.interop_probes.RUN_TAG_SYSTEM` | run id) and its id suffixed
   with the run id (references rewritten), so runs never collide on a shared sandbox.
3. **read-back**: every patient through :func:`fhir_adapters.pull.fetch_patient`
   (the pipeline's own searches), compared with what a correct server must return;
   paging with ``_count=2``; then behaviour probes (unknown parameter with and without
   ``Prefer: handling=strict``, a stale ``If-Match``, a conditional create with two
   matches).
4. **write**: classify (:class:`~clm_stratify.pipeline.Stratifier`, as ``run --all``),
   compare with ``fixtures/expected.yaml``, write the RiskAssessments, read them back
   (valid R4B, group, status), write again (must be ``unchanged``; still one
   RiskAssessment and one Provenance per patient); does ``RiskAssessment?patient=``
   filter?
5. **cleanup**: delete everything the run created (unless ``keep``) and say what could
   not be deleted.

Quirks met on the way are named in the report (:data:`QUIRKS`). Exit code: 0 when no
check failed, 1 when one did, 3 when the CapabilityStatement cannot be read.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import yaml
from pydantic import ValidationError

from clm_stratify import __version__
from clm_stratify.pipeline import Stratifier
from engine.classify import Engine
from fhir_adapters import interop_probes as probes
from fhir_adapters.assessment import GROUP_SYSTEM, TAG_SYSTEM, assessment_id
from fhir_adapters.bundle import loads
from fhir_adapters.client import FhirClient, FhirError
from fhir_adapters.interop_probes import ref_of
from fhir_adapters.load import as_transaction_entries
from fhir_adapters.pull import Searches, referenced_searches, fetch_patient, supports_batch
from fhir_adapters.terminology import Terminology
from fhir_adapters.writeback import AssessmentWriter, Strategy, choose_strategy

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STEPS = ("capabilities", "load", "read-back", "write", "cleanup")
EXIT_OK, EXIT_FAILED, EXIT_SERVER = 0, 1, 3

#: quirk id -> what it is (the report adds what was seen and how the project copes).
QUIRKS = {
    "bundle-total-absent": "Bundle.total is absent from searchsets",
    "long-next-links": "next links carry long continuation tokens",
    "application-json-content-type": "replies are application/json, not application/fhir+json",
    "409-on-version-conflict": "409 instead of 412 on a version conflict (stale If-Match)",
    "412-on-multiple-match-conditional-create": "412 on a conditional create with several matches",
    "conditional-create-multiple-matches": "a conditional create with several matches is not answered 412",
    "search-parameter-ignored": "search parameters are ignored (the search returns what its filter excludes)",
    "handling-strict-ignored": "Prefer: handling=strict is not supported (unknown parameters still ignored)",
    "riskassessment-search-unsupported": "RiskAssessment cannot be searched by patient or identifier",
    "count-ignored": "_count is not honoured",
}


SKIPPED_WITHOUT_ASSESSMENTS = (
    ("write", "write.read-back", "RiskAssessments read back"),
    ("write", "write.second", "second write is 'unchanged' (no new version)"),
    ("write", "write.no-duplicates", "one RiskAssessment + Provenance per patient"),
    ("write", "write.riskassessment-search", "RiskAssessment search filters"),
)
SKIPPED_WITHOUT_DATA = (
    ("read-back", "read.fetch-patient", "read back with the pipeline's searches"),
    ("read-back", "read.paging", "paging (_count=2, next links)"),
    ("read-back", "probe.version-conflict", "version conflict (stale If-Match)"),
    ("read-back", "probe.conditional-create", "conditional create, several matches"),
    ("write", "write.classify", "classification as expected (expected.yaml)"),
    ("write", "write.first", "write RiskAssessments + Provenance"),
) + SKIPPED_WITHOUT_ASSESSMENTS


@dataclass
class Check:
    id: str
    step: str
    title: str
    status: str
    detail: str = ""
    outcome: str = ""          # the server's OperationOutcome text, on failures
    seconds: float = 0.0


@dataclass
class Quirk:
    id: str
    title: str
    detail: str
    handling: str
    evidence: str = ""         # the server's own words, when it said something


@dataclass
class FixturePatient:
    fixture: str
    original_id: str
    patient_id: str
    expected_group: str
    expected_status: str
    resources: list[dict]


@dataclass
class InteropReport:
    run_id: str
    fhir_url: str
    checks: list[Check] = field(default_factory=list)
    quirks: dict[str, Quirk] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    patients: list[dict] = field(default_factory=list)
    not_deleted: list[str] = field(default_factory=list)
    capabilities_read: bool = True

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        if not self.capabilities_read:
            return EXIT_SERVER
        return EXIT_FAILED if self.failed else EXIT_OK

    def to_json(self) -> dict:
        counts = Counter(c.status for c in self.checks)
        return {
            "tool": f"clm-stratify {__version__} interop",
            "run_id": self.run_id,
            "fhir_url": self.fhir_url,
            "result": FAIL if self.failed else PASS,
            "exit_code": self.exit_code,
            "counts": {s: counts.get(s, 0) for s in (PASS, WARN, FAIL, SKIP)},
            **self.info,
            "steps": [{"step": s, "seconds": round(self.steps[s], 3)} for s in STEPS if s in self.steps],
            "checks": [asdict(c) | {"seconds": round(c.seconds, 3)} for c in self.checks],
            "quirks": [asdict(q) for q in self.quirks.values()],
            "patients": self.patients,
            "not_deleted": self.not_deleted,
        }


_HTTP_TEXT = re.compile(r"HTTP \d{3}: (.+)$")


def _ra_id(ref: str | None) -> str | None:
    """``RiskAssessment/<id>[/_history/n]`` -> ``<id>``."""
    if not ref or not ref.startswith("RiskAssessment/"):
        return None
    return ref.split("/")[1]


def _short(items: list[str], n: int = 5) -> str:
    return "; ".join(items[:n]) + (f"; ... ({len(items) - n} more)" if len(items) > n else "")


class InteropRun:
    """One interop run against one server (see the module docstring)."""

    def __init__(self, client: FhirClient, engine: Engine, terminology: Terminology, *,
                 fixtures_dir: Path | None = None, fixtures: list[str] | None = None,
                 keep: bool = False, run_id: str | None = None):
        from fixtures import FIXTURES_DIR

        self.client = client
        self.engine = engine
        self.terminology = terminology
        self.fixtures_dir = Path(fixtures_dir or FIXTURES_DIR)
        self.fixture_names = fixtures or sorted(p.name for p in self.fixtures_dir.glob("[0-9][0-9]-*.json"))
        self.keep = keep
        self.run_id = run_id or probes.new_run_id()
        self.tag = (probes.RUN_TAG_SYSTEM, self.run_id)
        self.report = InteropReport(self.run_id, client.base_url)
        self.caps: probes.ServerCaps | None = None
        self.choice = None
        self.patients: list[FixturePatient] = []
        self.loaded: list[dict] = []          # every resource sent (for clean-up)
        self.created: list[str] = []          # probe resources, Provenances found
        self.ra_refs: dict[str, str] = {}     # patient id -> RiskAssessment/<id>
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

    # ------------------------------------------------------------------ the run
    def run(self) -> InteropReport:
        started = time.monotonic()
        self.report.info = {"started_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                            "tag": {"system": self.tag[0], "code": self.tag[1]},
                            "fixtures": len(self.fixture_names), "kept": self.keep, "fallbacks": []}
        recorder = probes.ReplyRecorder(self.client)
        try:
            with self.step("capabilities"):
                if not self.capabilities():
                    self.report.capabilities_read = False
                    return self.report
            try:
                with self.step("load"):
                    self.load()
                if self.patients:
                    with self.step("read-back"):
                        self.read_back()
                        self.paging()
                        self.behaviour_probes()
                    with self.step("write"):
                        self.classify_and_write()
                else:
                    self.skip(SKIPPED_WITHOUT_DATA, "no patient could be loaded")
            finally:
                with self.step("cleanup"):
                    self.cleanup()
        finally:
            recorder.close()
            self._step = "read-back"
            self.media_types(recorder)
            self.report.checks.sort(key=lambda c: STEPS.index(c.step))
            self.report.info["duration_seconds"] = round(time.monotonic() - started, 3)
            self.report.info["round_trips"] = self.client.round_trips
        return self.report

    # ------------------------------------------------------------------ 1 capabilities
    def capabilities(self) -> bool:
        with self.timed() as t:
            try:
                raw = self.client.capabilities()
            except FhirError as exc:
                self.check("cap.read", "CapabilityStatement", FAIL, str(exc), exc.outcome)
                return False
        caps = self.caps = probes.ServerCaps.parse(raw)
        self.report.info["server"] = {"fhir_version": caps.fhir_version, "software": caps.software}
        r4 = caps.fhir_version.startswith("4.0")
        self.check("cap.version", "FHIR version", PASS if r4 else WARN,
                   f"{caps.fhir_version} ({caps.software})"
                   + ("" if r4 else "; the project reads and writes R4 (4.0.1) JSON"), seconds=t[0])

        wanted: dict[str, set[str]] = {}
        searches = Searches(self.terminology)
        for rtype, params in searches.for_patients(["x"]) + [("Condition", searches.recurrence_conditions())]:
            wanted.setdefault(rtype, set()).update(p for p in params if not p.startswith("_"))
        missing = [m for rtype, params in wanted.items() for m in caps.missing_search(rtype, sorted(params))]
        self.check("cap.searches", "search by patient and code", WARN if missing else PASS,
                   ("not declared: " + ", ".join(missing) + "; the searches are sent anyway (read-back shows "
                    "whether they work)") if missing else
                   ", ".join(f"{t}?{'&'.join(sorted(p))}" for t, p in wanted.items()) + ": declared")

        batch = "batch" in caps.system_interactions
        self.report.info["search_mode"] = "batch" if batch else "parallel"
        if not batch:
            self.fallback("batch", "the same searches one by one, 4 in parallel")
        self.check("cap.batch", "batch", PASS if batch else WARN,
                   "declared: one batch round trip per patient" if batch else
                   "not declared: fallback: the same searches one by one, 4 in parallel")
        transaction = "transaction" in caps.system_interactions
        self.check("cap.transaction", "transaction", PASS if transaction else WARN,
                   "declared: loading and write-back (RiskAssessment + Provenance) are atomic" if transaction else
                   "not declared: loading and write-back need it (no fallback; tested below)")

        types = sorted({e["resource"]["resourceType"] for b in self._bundles() for e in b.get("entry", [])})
        self._types = types
        no_uc = [t for t in types if not caps.resources.get(t, probes.ResourceCaps()).update_create]
        self.check("cap.update-create", "update-as-create (client-assigned ids)", WARN if no_uc else PASS,
                   f"not declared for {', '.join(no_uc)}: the test data is loaded with PUT by id (tested below)"
                   if no_uc else f"declared for {', '.join(types)}")

        self.choice = choice = choose_strategy(raw)
        ra = caps.resources.get("RiskAssessment")
        cond = ("not declared (RiskAssessment is not in the CapabilityStatement)" if ra is None else
                f"conditional create {'yes' if ra.conditional_create else 'no'}, "
                f"conditional update {'yes' if ra.conditional_update else 'no'}")
        needed = choice.strategy is not Strategy.UPDATE_AS_CREATE or choice.fallbacks
        self.check("cap.conditional", "conditional create / update (RiskAssessment)",
                   PASS if (ra and (ra.conditional_create or ra.conditional_update)) or not needed else WARN,
                   cond + ("" if needed else "; not needed: the write strategy is update-as-create"))

        ra_params = ra.search_params if ra else set()
        by_patient = bool(ra_params & {"patient", "subject"})
        by_identifier = "identifier" in ra_params
        if by_patient and by_identifier:
            self.check("cap.riskassessment-search", "RiskAssessment search", PASS,
                       "declared: " + ", ".join(sorted(ra_params)))
        else:
            gap = ("RiskAssessment is not in the CapabilityStatement: no search parameters" if ra is None else
                   "RiskAssessment has no " + " or ".join(n for n, ok in (("patient/subject", by_patient),
                                                                        ("identifier", by_identifier)) if not ok)
                   + " search parameter")
            fallback = self._fallback_text(choice)
            self.fallback("RiskAssessment search", fallback)
            self.check("cap.riskassessment-search", "RiskAssessment search", WARN, f"{gap}; fallback: {fallback}")
            self.quirk("riskassessment-search-unsupported", gap, fallback)

        notes = list(choice.notes) + [f"fallback: {f.value}" for f in choice.fallbacks]
        self.report.info["write_strategy"] = {"strategy": choice.strategy.value, "notes": list(choice.notes),
                                              "fallbacks": [f.value for f in choice.fallbacks]}
        self.check("cap.write-strategy", "write strategy", WARN if choice.notes else PASS,
                   choice.strategy.value + "".join(f"; {n}" for n in notes))

        no_delete = caps.missing_interaction(types + ["RiskAssessment", "Provenance"], "delete")
        self.check("cap.delete", "delete (clean-up)", WARN if no_delete else PASS,
                   f"not declared for {', '.join(no_delete)}: clean-up tries anyway" if no_delete else "declared")
        return True

    @staticmethod
    def _fallback_text(choice) -> str:
        if choice.strategy is Strategy.UPDATE_AS_CREATE:
            return ("update-as-create by deterministic id (PUT RiskAssessment/<id>; the current assessment is "
                    "read by that id, never searched)")
        return f"{choice.strategy.value} (conditional writes on the identifier)"

    # ------------------------------------------------------------------ 2 load
    def _bundles(self) -> list[dict]:
        if not hasattr(self, "_raw_bundles"):
            self._raw_bundles = [loads((self.fixtures_dir / n).read_bytes()) for n in self.fixture_names]
        return self._raw_bundles

    def load(self) -> None:
        expected = yaml.safe_load((self.fixtures_dir / "expected.yaml").read_text())
        failures: list[str] = []
        outcome = ""
        with self.timed() as t:
            for name, bundle in zip(self.fixture_names, self._bundles()):
                scoped, ids = probes.run_scoped_bundle(bundle, self.run_id)
                resources = [e["resource"] for e in scoped["entry"]]
                self.loaded += resources
                try:
                    self.client.transaction(as_transaction_entries(scoped, self.tag))
                except FhirError as exc:
                    failures.append(f"{name}: {exc}")
                    outcome = outcome or exc.outcome
                    continue
                [patient] = [r for r in resources if r["resourceType"] == "Patient"]
                original = next(k for k, v in ids.items() if v == ref_of(patient)).split("/", 1)[1]
                want = expected.get(name) or {}
                self.patients.append(FixturePatient(name, original, patient["id"], want.get("group", "?"),
                                                    want.get("status", "?"), resources))
        n = sum(len(p.resources) for p in self.patients)
        detail = (f"{n} resources of {len(self.patients)} patients, one transaction per patient (PUT by id); "
                  f"ids end in -{self.run_id}, meta.tag {probes.tag_token(self.tag)}")
        if failures:
            self.check("load.fixtures", "load tagged synthetic patients", FAIL,
                       f"{len(failures)} of {len(self.fixture_names)} failed: {_short(failures, 3)}; {detail}",
                       outcome, t[0])
        else:
            self.check("load.fixtures", "load tagged synthetic patients", PASS, detail, seconds=t[0])

    # ------------------------------------------------------------------ 3 read back
    def expected_read(self, p: FixturePatient) -> set[str]:
        """What fetch_patient must return for ``p`` from a correct server."""
        patient = f"Patient/{p.patient_id}"
        want = {patient}
        for rtype, params in Searches(self.terminology).for_patients([p.patient_id]):
            want |= probes.local_search(p.resources, rtype, params, patient)
        have = {ref_of(r) for r in p.resources}
        for rtype, params in referenced_searches([r for r in p.resources if ref_of(r) in want]):
            want |= {f"{rtype}/{i}" for i in params["_id"].split(",")} & have
        return want

    def read_back(self) -> None:
        problems: list[str] = []
        total = 0
        before = self.client.round_trips
        with self.timed() as t:
            for p in self.patients:
                got = {ref_of(r) for r in fetch_patient(self.client, p.patient_id, self.terminology)}
                want = self.expected_read(p)
                total += len(got)
                if got != want:
                    problems.append(f"{p.fixture}: missing {sorted(want - got) or 'none'}, "
                                    f"unexpected {sorted(got - want) or 'none'}")
        trips = self.client.round_trips - before
        mode = "batch" if supports_batch(self.client) else "parallel searches"
        self.check("read.fetch-patient", "read back with the pipeline's searches", FAIL if problems else PASS,
                   _short(problems, 3) if problems else
                   f"{len(self.patients)} patients, {total} resources, all as expected "
                   f"({trips} round trips, {mode})", seconds=t[0])

    def paging(self) -> None:
        p = max(self.patients, key=lambda x: sum(r["resourceType"] == "Observation" for r in x.resources))
        patient = f"Patient/{p.patient_id}"
        want = probes.local_search(p.resources, "Observation", {}, patient)
        query = f"Observation?patient={p.patient_id}&_count=2"
        with self.timed() as t:
            res = probes.search_pages(self.client, "Observation", {"patient": p.patient_id, "_count": "2"},
                                      max_pages=50)
        foreign = [r for r in res.resources if probes.owner_of(r) != patient]
        mine = [ref_of(r) for r in res.resources if probes.owner_of(r) == patient]
        dups = sorted(k for k, n in Counter(mine).items() if n > 1)
        missing = sorted(want - set(mine))
        if len(want) < 3:
            self.check("read.paging", "paging (_count=2, next links)", WARN, f"{query}: only {len(want)} "
                       "Observations in the chosen fixtures: paging not exercised", seconds=t[0])
        elif foreign and res.truncated:
            self.check("read.paging", "paging (_count=2, next links)", WARN, f"{query}: the patient filter was "
                       f"ignored and the pages never ended ({res.pages} pages read): paging not checked",
                       seconds=t[0])
        else:
            bad = missing or dups
            detail = (f"{query}: {len(want)} Observations in {res.pages} pages"
                      + (f"; missing {missing}" if missing else "") + (f"; repeated {dups}" if dups else "")
                      + ("" if bad else ", all came back once"))
            self.check("read.paging", "paging (_count=2, next links)", FAIL if bad else PASS, detail,
                       seconds=t[0])
        if res.page_sizes and res.page_sizes[0] > 2:
            self.quirk("count-ignored", f"{query} gave {res.page_sizes[0]} resources on the first page",
                       "pages are followed whatever their size")
        if res.totals and all(x is None for x in res.totals):
            self.quirk("bundle-total-absent", f"{query}: no Bundle.total on any of {res.pages} pages",
                       "Bundle.total is never used: pages are followed until there is no next link")
        elif res.totals and res.totals[0] is not None and res.totals[0] != len(res.resources) and not res.truncated:
            self.quirk("bundle-total-absent", f"{query}: Bundle.total says {res.totals[0]}, "
                       f"{len(res.resources)} came back", "Bundle.total is never used")
        if res.next_link_lengths and max(res.next_link_lengths) > probes.LONG_LINK_CHARS:
            self.quirk("long-next-links", f"{query}: next links of up to {max(res.next_link_lengths)} characters",
                       "next links are followed verbatim (never rebuilt); all pages came back"
                       if not missing else "next links are followed verbatim")
        text = "; ".join(dict.fromkeys(res.warnings))
        self.check("read.patient-filter", "search filter by patient (Observation)", WARN if foreign else PASS,
                   (f"{query} returned {len(foreign)} Observations of other patients"
                    + (f" (server: {text})" if text else " with no warning")
                    + "; fallback: pull drops resources whose subject is another patient")
                   if foreign else f"{query} returned only that patient's Observations")
        if foreign:
            self.quirk("search-parameter-ignored",
                       f"Observation?patient= returned other patients' Observations"
                       + ("" if text else " (silently: no warning in the searchset)"),
                       "pull drops every resource whose subject is another patient", text)

    def behaviour_probes(self) -> None:
        # unknown parameter, with and without Prefer: handling=strict
        with self.timed() as t:
            u = probes.probe_unknown_parameter(self.client, self.tag)
        warn_text = "; ".join(dict.fromkeys(u.lenient_warnings))
        if u.lenient_status == 200 and u.lenient_count and not warn_text:
            self.check("probe.unknown-parameter", "unknown search parameter", WARN,
                       "ignored silently: results came back and the searchset holds no warning", seconds=t[0])
            self.quirk("search-parameter-ignored", "an unknown parameter is ignored silently (no warning)",
                       "pull drops resources of other patients; RiskAssessments are read by id")
        elif u.lenient_status == 200:
            self.check("probe.unknown-parameter", "unknown search parameter", PASS,
                       ("ignored with a warning (lenient handling): " + warn_text) if warn_text else
                       "no results for the run's tag (cannot tell whether it was ignored)", seconds=t[0])
        else:
            self.check("probe.unknown-parameter", "unknown search parameter", PASS,
                       f"rejected even without Prefer: handling=strict (HTTP {u.lenient_status})",
                       u.lenient_outcome, t[0])
        if u.strict_status is not None and 400 <= u.strict_status < 500:
            self.check("probe.handling-strict", "Prefer: handling=strict", PASS,
                       f"supported: an unknown parameter gives HTTP {u.strict_status}: {u.strict_outcome}")
        else:
            self.check("probe.handling-strict", "Prefer: handling=strict", WARN,
                       f"not supported: the unknown parameter was still ignored (HTTP {u.strict_status})")
            self.quirk("handling-strict-ignored", f"a search with an unknown parameter and Prefer: handling=strict "
                       f"gave HTTP {u.strict_status}",
                       "the project does not depend on it: results are checked (subject, tag) on the client side")

        with self.timed() as t:
            v = probes.probe_version_conflict(self.client, self.tag)
        self.created += v.created
        title = "version conflict (stale If-Match)"
        if v.status == 412:
            self.check("probe.version-conflict", title, PASS, "412 Precondition Failed", v.outcome, t[0])
        elif v.status == 409:
            self.check("probe.version-conflict", title, WARN, "409 Conflict instead of 412", v.outcome, t[0])
            self.quirk("409-on-version-conflict", "an update with a stale If-Match gave 409", "the writer treats 409 "
                       "and 412 alike (FhirConflict): re-read, retry once", v.outcome)
        elif v.status is not None and 200 <= v.status < 300:
            self.check("probe.version-conflict", title, FAIL, f"HTTP {v.status}: {v.note}: concurrent writers "
                       "are not detected", seconds=t[0])
        else:
            self.check("probe.version-conflict", title, WARN, v.note or f"HTTP {v.status}", v.outcome, t[0])

        with self.timed() as t:
            c = probes.probe_conditional_create_multiple(self.client, self.tag)
        self.created += c.created
        title = "conditional create, several matches"
        relies = self.choice is not None and Strategy.CONDITIONAL_CREATE in (self.choice.strategy,
                                                                              *self.choice.fallbacks)
        if c.status == 412:
            self.check("probe.conditional-create", title, PASS, "412 Precondition Failed", c.outcome, t[0])
            self.quirk("412-on-multiple-match-conditional-create", "If-None-Exist matching two resources gave 412",
                       "the writer never creates a duplicate: 412 is a FhirConflict (re-read, retry once, "
                       "then reported as failed)", c.outcome)
        else:
            status = FAIL if (c.status == 201 and relies) else WARN
            self.check("probe.conditional-create", title, status,
                       f"HTTP {c.status}" + (f": {c.note}" if c.note and c.status and c.status < 300 else ""),
                       c.outcome, t[0])
            self.quirk("conditional-create-multiple-matches", f"If-None-Exist matching two resources gave "
                       f"HTTP {c.status}" + (f" ({c.note})" if c.note and c.status and c.status < 300 else ""),
                       "not used by the chosen write strategy" if not relies else
                       "the writer reads the current assessment first", c.outcome)

    def media_types(self, recorder: probes.ReplyRecorder) -> None:
        types = dict(recorder.media_types)
        self.report.info["media_types"] = types
        others = {m: n for m, n in types.items() if m != probes.FHIR_JSON}
        if not types:
            return
        if not others:
            self.check("read.media-type", "reply media type", PASS, f"{probes.FHIR_JSON} ({types[probes.FHIR_JSON]} "
                       "replies)")
            return
        plain = others.get("application/json")
        bad = {m: n for m, n in others.items() if m != "application/json"}
        self.check("read.media-type", "reply media type", FAIL if bad else WARN,
                   ", ".join(f"{m}: {n} replies (e.g. {recorder.examples.get(m)})" for m, n in others.items())
                   + "; accepted: any JSON media type")
        if plain:
            self.quirk("application-json-content-type", f"{plain} replies were application/json",
                       "accepted: the client takes application/fhir+json, application/json and other "
                       "application/*+json")

    # ------------------------------------------------------------------ 4 classify and write
    def classify_and_write(self) -> None:
        writer = AssessmentWriter(self.client, self.choice)
        stratifier = Stratifier(self.client, self.engine, self.terminology, writer=writer)
        ids = [p.patient_id for p in self.patients]
        with self.timed() as t:
            first = {o.patient_id: o for o in stratifier.population(ids).outcomes}
        mismatches, failures = [], []
        groups: Counter = Counter()
        for p in self.patients:
            o = first.get(p.patient_id)
            self.report.patients.append({
                "fixture": p.fixture, "patient": f"Patient/{p.patient_id}",
                "expected_group": p.expected_group, "group": o.group if o else None,
                "expected_status": p.expected_status, "status": o.status if o else None,
                "action": o.action if o else None, "risk_assessment": o.risk_assessment if o else None,
                "error": o.error if o else None})
            if o is None or o.group is None:
                mismatches.append(f"{p.fixture}: not classified ({o.error if o else 'no outcome'})")
                continue
            groups[o.group] += 1
            if (o.group, o.status) != (p.expected_group, p.expected_status):
                mismatches.append(f"{p.fixture}: {o.group}/{o.status}, expected "
                                  f"{p.expected_group}/{p.expected_status}")
            if o.failed:
                failures.append(f"Patient/{p.patient_id}: {o.error}")
            elif _ra_id(o.risk_assessment):
                self.ra_refs[p.patient_id] = f"RiskAssessment/{_ra_id(o.risk_assessment)}"
        self.check("write.classify", "classification as expected (expected.yaml)", FAIL if mismatches else PASS,
                   _short(mismatches, 4) if mismatches else
                   f"{len(self.patients)} patients: " + ", ".join(f"{g} {n}" for g, n in groups.items()),
                   seconds=t[0])
        actions = Counter(o.action for o in first.values())
        server_text = "; ".join(dict.fromkeys(m.group(1) for f in failures if (m := _HTTP_TEXT.search(f))))
        self.check("write.first", "write RiskAssessments + Provenance", FAIL if failures else PASS,
                   (_short(failures, 3) if failures else
                    ", ".join(f"{a} {n}" for a, n in actions.items()))
                   + f" (strategy {writer.strategy.value})", server_text, t[0])
        if not self.ra_refs:
            self.skip(SKIPPED_WITHOUT_ASSESSMENTS, "no RiskAssessment was written")
            return
        versions = self.check_assessments(first)
        with self.timed() as t:
            second = stratifier.population(ids).outcomes
        changed = [f"Patient/{o.patient_id}: {o.action}" + (f" ({o.error})" if o.error else "")
                   for o in second if o.action not in ("unchanged", "no-recurrence")]
        again = self._versions()
        new_versions = [f"{ref}: version {versions.get(ref)} -> {v}" for ref, v in again.items()
                        if v != versions.get(ref)]
        self.check("write.second", "second write is 'unchanged' (no new version)",
                   FAIL if changed or new_versions else PASS,
                   _short(changed + new_versions, 4) if changed or new_versions else
                   f"{len(self.ra_refs)} unchanged; no new version", seconds=t[0])
        self.count_duplicates()
        self.riskassessment_search()

    def _versions(self) -> dict[str, str | None]:
        out = {}
        for ref in self.ra_refs.values():
            ra = self.client.read("RiskAssessment", ref.split("/")[1])
            out[ref] = ((ra or {}).get("meta") or {}).get("versionId")
        return out

    def check_assessments(self, outcomes: dict) -> dict[str, str | None]:
        from fhir.resources.R4B.riskassessment import RiskAssessment

        problems: list[str] = []
        versions: dict[str, str | None] = {}
        with self.timed() as t:
            for pid, ref in self.ra_refs.items():
                o = outcomes[pid]
                ra = self.client.read("RiskAssessment", ref.split("/")[1])
                if ra is None:
                    problems.append(f"{ref}: not found")
                    continue
                versions[ref] = (ra.get("meta") or {}).get("versionId")
                try:
                    RiskAssessment.model_validate(ra)
                except ValidationError as exc:
                    problems.append(f"{ref}: not a valid R4B RiskAssessment: {str(exc).splitlines()[0]}")
                codes = [(c.get("system"), c.get("code")) for p in ra.get("prediction") or []
                         for c in (p.get("qualitativeRisk") or {}).get("coding") or []]
                if (GROUP_SYSTEM, o.group) not in codes:
                    problems.append(f"{ref}: group {codes} instead of {o.group}")
                if ra.get("status") != o.status:
                    problems.append(f"{ref}: status {ra.get('status')} instead of {o.status}")
                if (ra.get("subject") or {}).get("reference") != f"Patient/{pid}":
                    problems.append(f"{ref}: subject {(ra.get('subject') or {}).get('reference')}")
        self.check("write.read-back", "RiskAssessments read back", FAIL if problems else PASS,
                   _short(problems, 3) if problems else
                   f"{len(self.ra_refs)} read by id: valid R4B RiskAssessment, group code in {GROUP_SYSTEM}, "
                   "status and subject as written", seconds=t[0])
        return versions

    def _provenances(self, ra_ref: str) -> list[str]:
        page = probes.search_pages(self.client, "Provenance", {"target": ra_ref, "_count": "50"}, max_pages=5)
        return [ref_of(r) for r in page.resources if r.get("resourceType") == "Provenance"
                and any((t.get("reference") or "").split("/_history/")[0].endswith(ra_ref)
                        for t in r.get("target") or [])]

    def count_duplicates(self) -> None:
        patients = {f"Patient/{pid}" for pid in self.ra_refs}
        problems: list[str] = []
        with self.timed() as t:
            params = {"_tag": f"{TAG_SYSTEM}|clm-stratify", "_count": "100"}
            ra_caps = self.caps.resources.get("RiskAssessment") if self.caps else None
            if ra_caps and "patient" in ra_caps.search_params:
                params["patient"] = ",".join(self.ra_refs)
            how = "RiskAssessment?_tag=<project tag>" + ("&patient=..." if "patient" in params else "") \
                + ", subjects checked"
            try:
                res = probes.search_pages(self.client, "RiskAssessment", params, max_pages=30)
                counts = Counter(probes.owner_of(r) for r in res.resources
                                 if r.get("resourceType") == "RiskAssessment")
                if res.truncated:
                    raise FhirError("too many tagged RiskAssessments on the server to page through")
                problems += [f"{p}: {counts.get(p, 0)} RiskAssessments" for p in sorted(patients)
                             if counts.get(p, 0) != 1]
            except FhirError as exc:
                how = f"read by deterministic id ({exc})"
                problems += [f"{ref}: not found" for ref in self.ra_refs.values()
                             if self.client.read("RiskAssessment", ref.split("/")[1]) is None]
            prov_problems = []
            try:
                for ref in self.ra_refs.values():
                    found = self._provenances(ref)
                    self.created += found
                    if len(found) != 1:
                        prov_problems.append(f"{ref}: {len(found)} Provenances")
            except FhirError as exc:
                prov_problems.append(f"Provenance?target= failed: {exc}")
        self.check("write.no-duplicates", "one RiskAssessment + Provenance per patient",
                   FAIL if problems or prov_problems else PASS,
                   _short(problems + prov_problems, 4) if problems or prov_problems else
                   f"{len(patients)} patients, 1 each ({how}; Provenance?target=)", seconds=t[0])

    def riskassessment_search(self) -> None:
        pid, ref = next(iter(self.ra_refs.items()))
        patient = f"Patient/{pid}"
        ra = self.client.read("RiskAssessment", ref.split("/")[1]) or {}
        identifier = next(iter(ra.get("identifier") or []), {})
        results = []
        with self.timed() as t:
            key = f"{identifier.get('system')}|{identifier.get('value')}"
            for name, params in (("patient", {"patient": pid}), ("identifier", {"identifier": key})):
                try:
                    res = probes.search_pages(self.client, "RiskAssessment", {**params, "_count": "50"}, max_pages=3)
                    foreign = [r for r in res.resources if probes.owner_of(r) != patient]
                    results.append((name, 200, foreign, "; ".join(dict.fromkeys(res.warnings))))
                except FhirError as exc:
                    results.append((name, exc.status, [], exc.outcome))
        ignored = [(n, f, w) for n, s, f, w in results if f]
        rejected = [(n, s, w) for n, s, f, w in results if s != 200]
        relies = self.choice.strategy is not Strategy.UPDATE_AS_CREATE
        fallback = self._fallback_text(self.choice)
        if ignored:
            text = "; ".join(dict.fromkeys(w for _, _, w in ignored if w))
            detail = "; ".join(f"RiskAssessment?{n}= returned {len(f)} assessments of other patients"
                               for n, f, _ in ignored) + (f" (server: {text})" if text else " (no warning)")
            self.check("write.riskassessment-search", "RiskAssessment search filters",
                       FAIL if relies else WARN, f"{detail}; fallback: {fallback}", seconds=t[0])
            self.quirk("search-parameter-ignored", "; ".join(f"RiskAssessment?{n}= ignored" for n, _, _ in ignored),
                       f"not relied on: {fallback}", text)
            if "riskassessment-search-unsupported" in self.report.quirks:
                self.report.quirks["riskassessment-search-unsupported"].detail += " (confirmed: " + \
                    ", ".join(f"?{n}=" for n, _, _ in ignored) + " ignored)"
        elif rejected:
            self.check("write.riskassessment-search", "RiskAssessment search filters",
                       FAIL if relies else WARN, "; ".join(f"RiskAssessment?{n}= gave HTTP {s}" for n, s, _ in rejected)
                       + f"; fallback: {fallback}", "; ".join(w for _, _, w in rejected if w), t[0])
        else:
            self.check("write.riskassessment-search", "RiskAssessment search filters", PASS,
                       "both return only that patient's assessment", seconds=t[0])

    # ------------------------------------------------------------------ 5 clean-up
    def cleanup(self) -> None:
        if self.keep:
            self.check("cleanup", "clean-up", PASS,
                       f"kept (--keep): find them with {self.client.base_url}/Patient?_tag="
                       f"{probes.tag_token(self.tag)} (same _tag on each type); RiskAssessments: "
                       + (", ".join(sorted(self.ra_refs.values())[:3]) + (" ..." if len(self.ra_refs) > 3 else "")))
            return
        rs = self.engine.ruleset
        # Every assessment the run may have written (the deterministic id of each loaded
        # patient too, in case the run stopped before it learnt the written ids).
        ras = dict.fromkeys(list(self.ra_refs.values()) + [
            f"RiskAssessment/{assessment_id(f'Patient/{p.patient_id}', rs.id, rs.version)}" for p in self.patients])
        provenances: list[str] = [r for r in self.created if r.startswith("Provenance/")]
        if not provenances:
            for ref in self.ra_refs.values():
                try:
                    provenances += self._provenances(ref)
                except FhirError:
                    break
        others = [r for r in self.created if not r.startswith("Provenance/")]
        levels = [provenances, list(ras), *probes.deletion_levels(self.loaded), others]
        order = list(dict.fromkeys(r for level in levels for r in level))
        types = list(dict.fromkeys(self._types + ["Patient"]))
        with self.timed() as t:
            # Does _tag search work here? (Then it finds every loaded patient.)
            tag_search = {f"Patient/{p.patient_id}" for p in self.patients} <= set(
                probes.tagged(self.client, "Patient", self.tag))
            failed = probes.delete_levels(self.client, levels)
            # Anything still carrying the run tag (checked on each resource, never trusted
            # to _tag): missed, or refused the first time.
            sweep = [r for rtype in types for r in probes.tagged(self.client, rtype, self.tag)]
            if sweep:
                failed |= probes.delete_levels(self.client, [sweep])
            # What is left: by tag search where it works (the RiskAssessments and
            # Provenances carry the project tag, not the run's: read by id), else read all.
            left_tagged = [r for rtype in types for r in probes.tagged(self.client, rtype, self.tag)] \
                if tag_search else []
            to_read = provenances + list(ras) if tag_search else order + sweep
            with ThreadPoolExecutor(max_workers=8) as pool:
                parts = pool.map(lambda c: probes.still_present(self.client, c), [to_read[i::8] for i in range(8)])
                left = sorted({r for part in parts for r in part} | set(left_tagged))
        self.report.not_deleted = [f"{r}" + (f" ({failed[r]})" if r in failed else "") for r in left]
        self.check("cleanup", "clean-up", WARN if left else PASS,
                   f"could not delete {len(left)}: {_short(self.report.not_deleted, 5)}" if left else
                   f"DELETE sent for {len(set(order) | set(sweep))} resources (loaded data, probes, "
                   f"RiskAssessments, Provenances); nothing left ("
                   + ("_tag search and reads by id" if tag_search else "every one read by id") + ")",
                   seconds=t[0])


# --------------------------------------------------------------------------- output

def table(report: InteropReport, width: int | None = None) -> str:
    """The checks as a text table, then the quirks met, the step timings and the counts."""
    width = width or max(100, min(160, shutil.get_terminal_size((120, 24)).columns))
    info = report.info
    server = info.get("server") or {}
    ws = info.get("write_strategy") or {}
    lines = [f"clm-stratify interop: run {report.run_id} against {report.fhir_url}"]
    if server:
        lines.append(f"server: FHIR {server.get('fhir_version')} ({server.get('software')}); write strategy: "
                     f"{ws.get('strategy', '?')}; searches: {info.get('search_mode', '?')}")
    lines.append("")
    lines.append(f"{'step':<13}{'check':<45}{'result':<7}detail")
    indent = " " * 65
    for c in report.checks:
        text = c.detail + (f" [server: {c.outcome}]" if c.outcome and c.status in (FAIL, WARN) else "")
        wrapped = textwrap.wrap(text, max(30, width - 65), break_on_hyphens=False,
                                break_long_words=False) or [""]
        lines.append(f"{c.step:<13}{c.title[:44]:<45}{c.status.upper():<7}{wrapped[0]}")
        lines += [indent + w for w in wrapped[1:]]
    if report.quirks:
        lines += ["", "Quirks met:"]
        for q in report.quirks.values():
            lines += textwrap.wrap(f"- {q.id}: {q.detail}" + (f" (server: {q.evidence})" if q.evidence else ""),
                                   width, subsequent_indent="    ")
            lines += textwrap.wrap(f"handled: {q.handling}", width, initial_indent="    ", subsequent_indent="    ")
    if report.not_deleted:
        lines += ["", "Not deleted:"] + [f"  {r}" for r in report.not_deleted]
    counts = Counter(c.status for c in report.checks)
    steps = ", ".join(f"{s} {report.steps[s]:.2f} s" for s in STEPS if s in report.steps)
    lines += ["", f"Steps: {steps}",
              f"{len(report.checks)} checks: {counts.get(PASS, 0)} pass, {counts.get(WARN, 0)} warn, "
              f"{counts.get(FAIL, 0)} fail ({info.get('duration_seconds', 0):.1f} s)"]
    return "\n".join(lines)


def run_command(client: FhirClient, engine: Engine, terminology: Terminology, *, report_path: str | None = None,
                keep: bool = False, out=None) -> int:
    """What ``clm-stratify interop`` does: run, print the table, write the JSON report."""
    import sys

    out = out or sys.stdout
    report = InteropRun(client, engine, terminology, keep=keep).run()
    print(table(report), file=out)
    if report_path:
        Path(report_path).write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")
        print(f"Report: {report_path}", file=out)
    return report.exit_code
