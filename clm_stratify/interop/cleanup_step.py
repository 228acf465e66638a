"""Step 5 of ``clm-stratify interop``: delete everything the run created (unless ``keep``)
and say what could not be deleted."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from clm_stratify.interop.checks import PASS, WARN, short_list
from clm_stratify.interop.run_state import RunState
from clm_stratify.interop import probes
from fhir_adapters.writeback.resources import assessment_id
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.writeback.strategy import UpdateAsCreate


class CleanupStep(RunState):
    """The ``cleanup`` check."""

    def cleanup(self) -> None:
        if self.keep:
            self.check("cleanup", "clean-up", PASS,
                       f"kept (--keep): find them with {self.client.base_url}/Patient?_tag="
                       f"{probes.tag_token(self.tag)} (same _tag on each type); RiskAssessments: "
                       + (", ".join(sorted(self.ra_refs.values())[:3]) + (" ..." if len(self.ra_refs) > 3 else "")))
            return
        rs = self.rules.engine.ruleset
        # Every assessment the run met (first and second write, and any found by the
        # duplicate count), those the server holds for the run's patients (when it can be
        # asked), and under update-as-create the deterministic id of each loaded patient
        # (in case the run stopped before it learnt the written ids).
        by_id = self.choice is None or self.choice.strategy is UpdateAsCreate
        on_server = self._assessments_on_server()
        ra_search = "" if on_server is None else ", RiskAssessment?patient= of the run's patients"
        on_server = on_server or []
        ras = dict.fromkeys(list(self.ra_refs.values()) + sorted(self.assessments) + on_server + (
            [f"RiskAssessment/{assessment_id(p.patient.reference, rs.id)}" for p in self.patients] if by_id else []))
        known = dict.fromkeys(list(self.ra_refs.values()) + sorted(self.assessments) + on_server)
        provenances: list[str] = [r for r in self.created if r.startswith("Provenance/")]
        searched = set(self.ra_refs.values()) if provenances else set()   # by the duplicate count
        for ref in [r for r in known if r not in searched]:
            try:
                provenances += [x for x in self._provenances(ref) if x not in provenances]
            except FhirError:
                break
        others = [r for r in self.created if not r.startswith("Provenance/")]
        levels = [provenances, list(ras), *probes.deletion_levels(self.loaded), others]
        order = list(dict.fromkeys(r for level in levels for r in level))
        types = list(dict.fromkeys(self._types + ["Patient"]))
        with self.timed() as t:
            # Does _tag search work here? (Then it finds every loaded patient; with no patient
            # loaded there is no evidence that it does.)
            tag_search = bool(self.patients) and {p.patient.reference for p in self.patients} <= set(
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
                left = sorted({r for part in parts for r in part} | set(left_tagged)
                              | set(self._assessments_on_server() or []))
        self.report.not_deleted = [f"{r}" + (f" ({failed[r]})" if r in failed else "") for r in left]
        self.check("cleanup", "clean-up", WARN if left else PASS,
                   f"could not delete {len(left)}: {short_list(self.report.not_deleted, 5)}" if left else
                   f"DELETE sent for {len(set(order) | set(sweep))} resources (loaded data, probes, "
                   f"RiskAssessments, Provenances); nothing left ("
                   + ("_tag search and reads by id" if tag_search else "every one read by id") + ra_search + ")",
                   seconds=t[0])
