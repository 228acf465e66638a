"""Step 4 of ``clm-stratify interop``: classify, compare with ``fixtures/expected.yaml``,
write the RiskAssessments, read them back, write again (must be ``unchanged``), count
RiskAssessments and Provenances, and check whether ``RiskAssessment`` search filters."""

from __future__ import annotations

import re
from collections import Counter

from pydantic import ValidationError

from clm_stratify.interop.checks import FAIL, PASS, SKIPPED_WITHOUT_ASSESSMENTS, WARN, short_list
from clm_stratify.interop.run_state import RunState
from clm_stratify.pipeline import Stratifier
from clm_stratify.interop import probes
from fhir_adapters.project import GROUP_SYSTEM, TAG, TAG_SYSTEM
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.writeback.strategy import UpdateAsCreate
from fhir_adapters.writeback.writer import AssessmentWriter

_HTTP_TEXT = re.compile(r"HTTP \d{3}: (.+)$")


def _ra_id(ref: str | None) -> str | None:
    """``RiskAssessment/<id>[/_history/n]`` -> ``<id>``."""
    if not ref or not ref.startswith("RiskAssessment/"):
        return None
    return ref.split("/")[1]


class WriteStep(RunState):
    """The ``write.*`` checks."""

    def classify_and_write(self) -> None:
        writer = AssessmentWriter(self.client, self.choice)
        stratifier = Stratifier(self.client, self.rules, writer=writer)
        refs = [p.patient for p in self.patients]
        with self.timed() as t:
            first = {r.patient: r for r in stratifier.population(refs).results}
        mismatches, failures = [], []
        groups: Counter = Counter()
        for p in self.patients:
            o = first.get(p.patient)
            self.report.patients.append({
                "fixture": p.fixture, "patient": p.patient.reference,
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
                failures.append(f"{p.patient}: {o.error}")
            elif _ra_id(o.risk_assessment):
                self.ra_refs[p.patient] = f"RiskAssessment/{_ra_id(o.risk_assessment)}"
        self.check("write.classify", "classification as expected (expected.yaml)", FAIL if mismatches else PASS,
                   short_list(mismatches, 4) if mismatches else
                   f"{len(self.patients)} patients: " + ", ".join(f"{g} {n}" for g, n in groups.items()),
                   seconds=t[0])
        actions = Counter(o.action for o in first.values())
        server_text = "; ".join(dict.fromkeys(m.group(1) for f in failures if (m := _HTTP_TEXT.search(f))))
        self.check("write.first", "write RiskAssessments + Provenance", FAIL if failures else PASS,
                   (short_list(failures, 3) if failures else
                    ", ".join(f"{a} {n}" for a, n in actions.items()))
                   + f" (strategy {writer.strategy.name})", server_text, t[0])
        if not self.ra_refs:
            self.skip(SKIPPED_WITHOUT_ASSESSMENTS, "no RiskAssessment was written")
            return
        versions = self.check_assessments(first)
        with self.timed() as t:
            second = stratifier.population(refs).results
        changed = [f"{o.patient}: {o.action}" + (f" ({o.error})" if o.error else "")
                   for o in second if o.action not in ("unchanged", "no-recurrence")]
        again = self._versions()
        new_versions = [f"{ref}: version {versions.get(ref)} -> {v}" for ref, v in again.items()
                        if v != versions.get(ref)]
        self.check("write.second", "second write is 'unchanged' (no new version)",
                   FAIL if changed or new_versions else PASS,
                   short_list(changed + new_versions, 4) if changed or new_versions else
                   f"{len(self.ra_refs)} unchanged; no new version", seconds=t[0])
        self.count_duplicates()
        self.riskassessment_search()

    def _versions(self) -> dict[str, str | None]:
        out = {}
        for ref in self.ra_refs.values():
            ra = self.client.read("RiskAssessment", ref.split("/")[1])
            out[ref] = ((ra or {}).get("meta") or {}).get("versionId")
        return out

    def check_assessments(self, results: dict) -> dict[str, str | None]:
        from fhir.resources.R4B.riskassessment import RiskAssessment

        problems: list[str] = []
        versions: dict[str, str | None] = {}
        with self.timed() as t:
            for patient, ref in self.ra_refs.items():
                o = results[patient]
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
                if (ra.get("subject") or {}).get("reference") != patient.reference:
                    problems.append(f"{ref}: subject {(ra.get('subject') or {}).get('reference')}")
        self.check("write.read-back", "RiskAssessments read back", FAIL if problems else PASS,
                   short_list(problems, 3) if problems else
                   f"{len(self.ra_refs)} read by id: valid R4B RiskAssessment, group code in {GROUP_SYSTEM}, "
                   "status and subject as written", seconds=t[0])
        return versions

    def count_duplicates(self) -> None:
        patients = {p.reference for p in self.ra_refs}
        problems: list[str] = []
        with self.timed() as t:
            params = {"_tag": f"{TAG_SYSTEM}|{TAG}", "_count": "100"}
            ra_caps = self.caps.resources.get("RiskAssessment") if self.caps else None
            if ra_caps and "patient" in ra_caps.search_params:
                params["patient"] = ",".join(p.id for p in self.ra_refs)
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
                   short_list(problems + prov_problems, 4) if problems or prov_problems else
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
        relies = self.choice.strategy is not UpdateAsCreate
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
