"""Technical resectability: the care team's current judgement of the recurrence.

Only it can make a result final, so it must be about this recurrence (after the
reference resection, or not before the recurrence Condition when no resection is
recorded) and current (dated, and not older than the latest imaging: a new scan never
inherits an old "final"). A judgement that cannot be read or attributed may say
"unresectable": unless it plainly says "resectable", the judgement is in doubt.
"""

from __future__ import annotations

from typing import Any

from engine.features import Fact
from fhir_adapters.features.evidence import (FINAL_OBSERVATION, WITHDRAWN_OBSERVATION, JudgementFact, MappingContext,
                                             codings, matches)
from fhir_adapters.features.recurrence import Event
from fhir_adapters.fhir.timeline import When
from fhir_adapters.terminology import Terminology

Judgement = tuple[When, str | None, str]   # (when, "resectable" / "unresectable" / None, ref)


def technical_resectability(ctx: MappingContext, resection: Event | None, onset: When | None,
                            latest_imaging: When | None) -> Fact:
    """The care team's latest technical judgement of the recurrence. One dated before
    the latest imaging is stale (a new scan never inherits an old "final"); one that
    cannot be dated against the imaging is not used either."""
    t, warn = ctx.terminology, ctx.warnings.append
    judgements: list[Judgement] = []
    stale: list[str] = []
    for o in ctx.record.observations:
        if o.status in WITHDRAWN_OBSERVATION:
            continue
        if not matches(t.technical_resectability_observation, codings(o.code)):
            continue
        if o.status not in FINAL_OBSERVATION:
            warn(f"{ctx.ref(o)}: technical resectability assessment is {o.status}, not final; not used")
            continue
        when = When.of_element(o, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
        if when is not None and resection is not None and when.relation(resection.when) != "after":
            warn(f"{ctx.ref(o)}: technical resectability assessment of {when.text} is not after "
                 f"the reference resection ({resection.when.text}): about the initial disease, "
                 "not used")
            continue
        if when is not None and resection is None and onset is not None and when.end <= onset.start:
            warn(f"{ctx.ref(o)}: technical resectability assessment of {when.text} is before the "
                 f"liver-recurrence Condition ({onset.text}) with no resection recorded: not "
                 "about this recurrence, not used")
            stale.append(ctx.ref(o))
            continue
        if when is None:
            warn(f"{ctx.ref(o)}: technical resectability assessment without a date; "
                 "it cannot be shown to be current, so it is not used")
            stale.append(ctx.ref(o))
            continue
        if latest_imaging is not None and when.start < latest_imaging.start:
            warn(f"{ctx.ref(o)}: technical resectability assessment of {when.text} is older "
                 f"than the latest imaging ({latest_imaging.text}): stale, treated as not assessed")
            stale.append(ctx.ref(o))
            continue
        value = None
        if o.valueBoolean is not None:
            value = "resectable" if o.valueBoolean else "unresectable"
        elif o.valueCodeableConcept is not None:
            pairs = codings(o.valueCodeableConcept)
            if matches(t.technically_unresectable_value, pairs):
                value = "unresectable"
            elif matches(t.technically_resectable_value, pairs):
                value = "resectable"
        if value is None and o.dataAbsentReason is None:
            warn(f"{ctx.ref(o)}: technical resectability value not recognised")
        judgements.append((when, value, ctx.ref(o)))
    fact = current_judgement(ctx, judgements, stale)
    # One that cannot be attributed or read may be newer and say "unresectable".
    doubt = [u.ref for u in ctx.record.distrusted if u.resource_type == "Observation"
             and matches(t.technical_resectability_observation, u.codings)
             and not says_resectable(t, u)]
    if doubt and fact.value != "unresectable":
        return JudgementFact(value="in-doubt", refs=(*fact.refs, *doubt),
                             note=("technical resectability assessment(s) that cannot be attributed or read may "
                                   f"record the recurrence as unresectable: {', '.join(doubt)}"))
    return fact


def says_resectable(terminology: Terminology, u: Any) -> bool:
    """A distrusted judgement that plainly says "resectable" (as written) cannot hide an
    "unresectable": ignoring it is safe. Anything else may say "unresectable"."""
    if matches(terminology.technically_unresectable_value, u.codings):
        return False
    return (u.value_boolean is True or str(u.value_boolean).strip().lower() == "true"
            or matches(terminology.technically_resectable_value, u.codings))


def current_judgement(ctx: MappingContext, judgements: list[Judgement], stale: list[str]) -> Fact:
    """The newest usable judgement; conflicting ones at the same time decide nothing."""
    usable = [j for j in judgements if j[1] is not None]
    if not usable:
        note = "no technical resectability assessment recorded after the reference resection"
        if stale:
            note = f"technical resectability assessments older than the latest imaging or undated: {', '.join(stale)}"
        return JudgementFact(note=note, refs=tuple(j[2] for j in judgements))
    newest = max(usable, key=lambda j: j[0].sort_key())[0]
    latest = [j for j in usable if not newest.after(j[0])]
    values = {j[1] for j in latest}
    refs = tuple(j[2] for j in latest)
    if len(values) > 1:
        ctx.warnings.append(f"conflicting technical resectability assessments: {', '.join(refs)}")
        return JudgementFact(refs=refs, note="conflicting technical resectability assessments at the same time")
    return JudgementFact(value=values.pop(), refs=refs)
