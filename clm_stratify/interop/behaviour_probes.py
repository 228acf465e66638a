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
        self.unknown_parameter()

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
        if c.status is None:
            self.check("probe.conditional-create", title, WARN, c.note or "no answer", c.outcome, t[0])
        elif c.status == 412:
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

    def unknown_parameter(self) -> None:
        """``probe.unknown-parameter`` and ``probe.handling-strict``: what an unknown search
        parameter did without and with ``Prefer: handling=strict``, compared with the same
        search without it (a server may ignore it, reject it, or match nothing)."""
        with self.timed() as t:
            u = probes.probe_unknown_parameter(self.client, self.tag)
        search = f"Patient?_tag=<run tag>&{u.parameter}=1"
        lenient, strict = u.effect(u.lenient), u.effect(u.strict)
        detail = f"{search}: {u.describe(u.lenient)}"
        title = "unknown search parameter"
        if lenient == "ignored" and not u.lenient.warnings:
            self.check("probe.unknown-parameter", title, WARN, detail, seconds=t[0])
            self.quirk("search-parameter-ignored", "an unknown parameter is ignored silently (no warning)",
                       "pull drops resources of other patients; RiskAssessments are checked to be ours")
        elif lenient in ("ignored", "rejected"):
            self.check("probe.unknown-parameter", title, PASS, detail + (" (lenient handling)" if lenient ==
                                                                        "ignored" else ""), u.lenient.outcome, t[0])
        elif lenient == "matched-nothing":
            self.check("probe.unknown-parameter", title, WARN, detail, seconds=t[0])
            self.quirk("unknown-parameter-matches-nothing", f"{search} gave HTTP 200 and no results; "
                       f"{u.control.count} without the parameter",
                       "no error to catch: cap.searches names the parameters the server does not declare, and "
                       "read-back compares every patient with what a correct server returns (an unsupported "
                       "parameter shows there as missing data)")
        else:
            self.check("probe.unknown-parameter", title, WARN, detail + ": the probe shows nothing certain",
                       u.lenient.outcome, t[0])
        title = "Prefer: handling=strict"
        both = (f"without Prefer: {u.describe(u.lenient)}; with Prefer: handling=strict: "
                f"{u.describe(u.strict)}")
        if strict == "rejected" and u.strict.status is not None and 400 <= u.strict.status < 500:
            self.check("probe.handling-strict", title, PASS, f"supported: {both}", u.strict.outcome)
        else:
            self.check("probe.handling-strict", title, WARN, f"not supported: {both}", u.strict.outcome)
            self.quirk("handling-strict-ignored", f"{search} with Prefer: handling=strict: {u.describe(u.strict)}",
                       "the project does not depend on it: results are checked (subject, tag, identifier) "
                       "on the client side")
