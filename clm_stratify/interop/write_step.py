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
from clm_stratify.interop.probes import ref_of
from fhir_adapters.project import GROUP_SYSTEM, TAG, TAG_SYSTEM
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.writeback.strategy import UpdateAsCreate, identifier_token, is_ours
from fhir_adapters.writeback.writer import AssessmentWriter

_HTTP_TEXT = re.compile(r"HTTP \d{3}: (.+)$")


def _ra_id(ref: str | None) -> str | None:
    """``RiskAssessment/<id>[/_history/n]`` -> ``<id>``."""
    if not ref or not ref.startswith("RiskAssessment/"):
        return None
    return ref.split("/")[1]


def _same_key(found: dict, ra: dict) -> bool:
    """``found`` carries ``ra``'s identifier and subject (False when either is unreadable)."""
    try:
        return is_ours(found, ra)
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


class WriteStep(RunState):
    """The ``write.*`` checks."""

    def classify_and_write(self) -> None:
        writer = AssessmentWriter(self.client, self.choice)
        stratifier = Stratifier(self.client, self.rules, writer=writer)
        refs = [p.patient for p in self.patients]
        with self.timed() as t:
            try:
                first = {r.patient: r for r in stratifier.population(refs).results}
            except FhirError as exc:
                self._writer_stopped(exc, t)
                return
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
                self.assessments.add(self.ra_refs[p.patient])
            elif o.action != "no-recurrence":
                failures.append(f"{p.patient}: {o.action}, but the writer names no RiskAssessment "
                                f"({o.risk_assessment!r})")
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
            try:
                second = {o.patient: o for o in stratifier.population(refs).results}
            except FhirError as exc:
                self.check("write.second", "second write is 'unchanged' (no new version)", FAIL,
                           f"the writer stopped: {exc}", exc.outcome, t[0])
                self.count_duplicates()
                self.riskassessment_search()
                return
        self.assessments |= {f"RiskAssessment/{_ra_id(o.risk_assessment)}" for o in second.values()
                             if _ra_id(o.risk_assessment)}
        changed = []
        for patient in self.ra_refs:
            o = second.get(patient)
            if o is None:
                changed.append(f"{patient}: no result from the second write")
            elif o.action != "unchanged":
                changed.append(f"{patient}: {o.action}" + (f" ({o.error})" if o.error else "")
                               + (f" {o.risk_assessment}: a second assessment" if o.action == "created" else ""))
        again = self._versions()
        unversioned = sorted(ref for ref, v in again.items() if v is None or versions.get(ref) is None)
        new_versions = [f"{ref}: version {versions.get(ref)} -> {v}" for ref, v in again.items()
                        if ref not in unversioned and v != versions.get(ref)]
        problems = changed + new_versions
        self.check("write.second", "second write is 'unchanged' (no new version)",
                   FAIL if problems else WARN if unversioned else PASS,
                   short_list(problems, 4) if problems else
                   f"{len(self.ra_refs)} unchanged; " + (
                       f"versions not compared for {len(unversioned)}: no meta.versionId" if unversioned else
                       "no new version (meta.versionId read before and after)"), seconds=t[0])
        self.count_duplicates()
        self.riskassessment_search()

    def _writer_stopped(self, exc: FhirError, t: list[float]) -> None:
        """The population write raised (e.g. the writer could not find its first assessment
        again and stopped): say so, then look for what it wrote and search for it."""
        self.check("write.first", "write RiskAssessments + Provenance", FAIL, f"the writer stopped: {exc}",
                   exc.outcome, t[0])
        reason = "the write step stopped (write.first)"
        self.skip((("write", "write.classify", "classification as expected (expected.yaml)"),), reason)
        found = self._assessments_on_server() or []
        self.assessments |= set(found)
        owners = {}
        for ref in found:
            ra = self.client.read("RiskAssessment", ref.split("/")[1]) or {}
            owner = probes.owner_of(ra)
            patient = next((p.patient for p in self.patients if p.patient.reference == owner), None)
            if patient is not None:
                owners.setdefault(patient, ref)
        self.ra_refs.update(owners)
        self.skip(SKIPPED_WITHOUT_ASSESSMENTS[:-1], reason)
        if self.ra_refs:
            self.riskassessment_search()
        else:
            self.skip(SKIPPED_WITHOUT_ASSESSMENTS[-1:], f"{reason}; no RiskAssessment of the run's patients found")

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
            unverified = ""
            try:
                res = probes.search_pages(self.client, "RiskAssessment", params, max_pages=30)
                ours = [r for r in res.resources
                        if r.get("resourceType") == "RiskAssessment" and probes.owner_of(r) in patients]
                self.assessments |= {ref_of(r) for r in ours}      # duplicates too: clean-up deletes them
                counts = Counter(probes.owner_of(r) for r in ours)
                if res.truncated:
                    raise FhirError("too many tagged RiskAssessments on the server to page through")
                problems += [f"{p}: {counts.get(p, 0)} RiskAssessments" for p in sorted(patients)
                             if counts.get(p, 0) != 1]
            except FhirError as exc:
                problems += [f"{ref}: not found" for ref in self.ra_refs.values()
                             if self.client.read("RiskAssessment", ref.split("/")[1]) is None]
                if self.choice.strategy is UpdateAsCreate:
                    how = f"read by deterministic id: one id per patient, so never two ({exc})"
                else:
                    how = f"read by id ({exc})"
                    unverified = (f"each written assessment was read by id, but duplicates cannot be counted: "
                                  f"the search failed ({exc}) and the ids are the server's")
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
                   FAIL if problems or prov_problems else WARN if unverified else PASS,
                   short_list(problems + prov_problems, 4) if problems or prov_problems else unverified or
                   f"{len(patients)} patients, 1 each ({how}; Provenance?target=)", seconds=t[0])

    def riskassessment_search(self) -> None:
        """Does ``RiskAssessment?patient=`` / ``?identifier=`` find the assessment just written
        (and only that patient's)? Positive evidence only: an empty answer is not a pass.

        Severity: a search the chosen write strategy relies on (``identifier`` for the
        conditional strategies: the writer finds the current assessment with it) that does
        not find the assessment is a FAIL, since every re-run would write a duplicate; a
        search the project does not rely on (``patient``; ``identifier`` under
        update-as-create, which reads by id) is a WARN."""
        patient, ref = next(iter(self.ra_refs.items()))
        ra = self.client.read("RiskAssessment", ref.split("/")[1]) or {}
        try:
            key = identifier_token(ra)
        except (KeyError, IndexError, TypeError):
            key = None     # no usable identifier on what the server gave back: said below
        relies_on_identifier = self.choice.strategy is not UpdateAsCreate
        fallback = self._fallback_text(self.choice)
        found: list[tuple[str, str, bool]] = []       # (parameter, what happened, relied on)
        ignored: list[tuple[str, str]] = []           # (parameter, server's warning)
        failed: list[tuple[str, bool]] = []           # (parameter, relied on)
        outcome = ""
        with self.timed() as t:
            searches = [("patient", {"patient": patient.id}, False)]
            searches.append(("identifier", {"identifier": key}, relies_on_identifier) if key else
                            ("identifier", None, relies_on_identifier))
            for name, params, relied in searches:
                query = f"RiskAssessment?{name}=" + (params[name] if params else "")
                if params is None:
                    found.append((name, f"{query}: not tried: {ref} read back has no usable identifier", relied))
                    failed.append((name, relied))
                    continue
                try:
                    res = probes.search_pages(self.client, "RiskAssessment", {**params, "_count": "50"}, max_pages=3)
                except FhirError as exc:
                    found.append((name, f"{query}: HTTP {exc.status}: {exc}", relied))
                    failed.append((name, relied))
                    outcome = outcome or exc.outcome
                    continue
                own = any(ref_of(r) == ref for r in res.resources)
                foreign = [r for r in res.resources if ref_of(r) != ref and (
                    probes.owner_of(r) != patient.reference if name == "patient" else not _same_key(r, ra))]
                warning = "; ".join(dict.fromkeys(res.warnings))
                n = len(res.resources)
                text = (f"{query}: {n} result{'' if n == 1 else 's'}, "
                        + (f"{ref} among them" if own else f"not {ref}")
                        + (f", {len(foreign)} of other patients/identifiers" if foreign else "")
                        + (f" (server: {warning})" if warning else ""))
                found.append((name, text, relied))
                if name == "identifier" and not own:
                    self.quirk("identifier-search-misses", f"{query} answered HTTP 200 without {ref}, written "
                               "with that identifier", "the writer checks that its first created assessment is "
                               "found again, and stops writing on this server when it is not (no duplicates)"
                               if relied else f"not relied on: {fallback}", warning)
                if foreign:
                    ignored.append((name, warning))
                if not own:
                    failed.append((name, relied))
        detail = "; ".join(text for _, text, _ in found)
        title = "RiskAssessment search finds the assessment"
        if any(relied for _, relied in failed):
            self.check("write.riskassessment-search", title, FAIL,
                       f"{detail}; the {self.choice.strategy.name} writer finds the current assessment with "
                       "RiskAssessment?identifier=: a re-run would write a duplicate", outcome, t[0])
        elif failed or ignored:
            self.check("write.riskassessment-search", title, WARN,
                       f"{detail}; not relied on: {fallback}", outcome, t[0])
        else:
            self.check("write.riskassessment-search", title, PASS,
                       f"{detail}: each search found the patient's assessment and nothing else", seconds=t[0])
        if ignored:
            text = "; ".join(dict.fromkeys(w for _, w in ignored if w))
            self.quirk("search-parameter-ignored", "; ".join(f"RiskAssessment?{n}= ignored" for n, _ in ignored)
                       + ("" if text else " (no warning)"),
                       "results are checked on the client side (subject, identifier); " + fallback, text)
            if "riskassessment-search-unsupported" in self.report.quirks:
                self.report.quirks["riskassessment-search-unsupported"].detail += " (confirmed: " + \
                    ", ".join(f"?{n}=" for n, _ in ignored) + " ignored)"
