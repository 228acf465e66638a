"""Behaviour probes of ``clm-stratify interop`` (in the read-back step): an unknown search
parameter with and without ``Prefer: handling=strict``, a stale ``If-Match``, and a
conditional create with two matches."""

from __future__ import annotations

from clm_stratify.interop.checks import FAIL, PASS, WARN
from clm_stratify.interop.run_state import RunState
from clm_stratify.interop import probes
from fhir_adapters.writeback.strategy import ConditionalCreate


class BehaviourProbes(RunState):
    """The ``probe.*`` checks."""

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
        relies = self.choice is not None and ConditionalCreate in (self.choice.strategy,
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
