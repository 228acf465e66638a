"""Step 1 of ``clm-stratify interop``: read the CapabilityStatement and check what the run
relies on; what is missing is a ``warn`` naming the fallback the project uses there."""

from __future__ import annotations

from clm_stratify.interop.checks import FAIL, PASS, WARN, short_list
from clm_stratify.interop.run_state import RunState
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.fhir.load import PUT_BY_ID, load_method
from fhir_adapters.sources.pull import Searches
from fhir_adapters.writeback.strategy import UpdateAsCreate, choose


class CapabilitiesStep(RunState):
    """The ``cap.*`` checks."""

    def capabilities(self) -> bool:
        with self.timed() as t:
            try:
                caps = self.caps = self.client.capabilities()
            except FhirError as exc:
                self.check("cap.read", "CapabilityStatement", FAIL, str(exc), exc.outcome)
                return False
        self.report.info["server"] = {"fhir_version": caps.fhir_version, "software": caps.software}
        if caps.problems:
            self.check("cap.statement", "CapabilityStatement well-formed", WARN,
                       f"{len(caps.problems)} malformed parts ignored: {short_list(list(caps.problems), 4)}")
        r4 = caps.fhir_version.startswith("4.0")
        self.check("cap.version", "FHIR version", PASS if r4 else WARN,
                   f"{caps.fhir_version} ({caps.software})"
                   + ("" if r4 else "; the project reads and writes R4 (4.0.1) JSON"), seconds=t[0])

        wanted: dict[str, set[str]] = {}
        searches = Searches(self.rules.terminology)
        for rtype, params in searches.for_patients(["x"]) + [("Condition", searches.recurrence_conditions())]:
            wanted.setdefault(rtype, set()).update(p for p in params if not p.startswith("_"))
        missing = [m for rtype, params in wanted.items() for m in caps.missing_search(rtype, sorted(params))]
        self.check("cap.searches", "search by patient and code", WARN if missing else PASS,
                   ("not declared: " + ", ".join(missing) + "; the searches are sent anyway (read-back shows "
                    "whether they work)") if missing else
                   ", ".join(f"{t}?{'&'.join(sorted(p))}" for t, p in wanted.items()) + ": declared")

        batch = caps.batch
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
        refused = [t for t in types if caps.resource(t) and not caps.resource(t).update_create]
        unlisted = [t for t in types if caps.resource(t) is None]
        if load_method(caps, types) == PUT_BY_ID:
            self.check("cap.update-create", "update-as-create (client-assigned ids)", WARN if unlisted else PASS,
                       (f"declared for {', '.join(t for t in types if t not in unlisted) or 'no type'}; "
                        f"{', '.join(unlisted)} not in the CapabilityStatement: assumed like the others; "
                        "the test data is loaded with PUT by id (the load step shows whether it works)")
                       if unlisted else f"declared for {', '.join(types)}: the test data is loaded with PUT by id")
        else:
            used = "POST with urn:uuid fullUrls in a transaction, ids read from response.location"
            self.fallback("update-as-create (client-assigned ids)", used)
            self.check("cap.update-create", "update-as-create (client-assigned ids)", WARN,
                       f"not allowed (updateCreate false or absent) for {', '.join(refused or unlisted)}: the server "
                       f"assigns ids; fallback: {used}")

        self.choice = choice = choose(caps)
        ra = caps.resource("RiskAssessment")
        cond = ("not declared (RiskAssessment is not in the CapabilityStatement)" if ra is None else
                f"conditional create {'yes' if ra.conditional_create else 'no'}, "
                f"conditional update {'yes' if ra.conditional_update else 'no'}")
        needed = choice.strategy is not UpdateAsCreate or choice.fallbacks
        self.check("cap.conditional", "conditional create / update (RiskAssessment)",
                   PASS if (ra and (ra.conditional_create or ra.conditional_update)) or not needed else WARN,
                   cond + ("" if needed else "; not needed: the write strategy is update-as-create"))

        ra_params = ra.search_params if ra else frozenset()
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

        notes = list(choice.notes) + [f"fallback: {f.name}" for f in choice.fallbacks]
        self.report.info["write_strategy"] = {"strategy": choice.strategy.name, "notes": list(choice.notes),
                                              "fallbacks": [f.name for f in choice.fallbacks]}
        self.check("cap.write-strategy", "write strategy", WARN if choice.notes else PASS,
                   choice.strategy.name + "".join(f"; {n}" for n in notes))

        no_delete = caps.missing_interaction(types + ["RiskAssessment", "Provenance"], "delete")
        self.check("cap.delete", "delete (clean-up)", WARN if no_delete else PASS,
                   f"not declared for {', '.join(no_delete)}: clean-up tries anyway" if no_delete else "declared")
        return True
