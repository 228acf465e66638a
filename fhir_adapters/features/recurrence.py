"""Which disease is the recurrence: the reference resection, the prior liver resection
fact, and the liver-recurrence fact with the onset of the recurrence.

The reference resection (the latest completed, dated hepatectomy) is the boundary
every other fact is placed against: a liver-metastasis Condition dated before it is
the initial disease, not evidence of recurrence; one that cannot be placed against it
proves nothing. With no resection recorded, "prior liver resection" is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.features import Fact
from fhir_adapters.features.evidence import (DONE_PROCEDURE, BoolFact, MappingContext, codings, condition_status,
                                             matches, metastasis_sites)
from fhir_adapters.fhir.timeline import When


@dataclass(frozen=True)
class Event:
    """A dated record that marks a boundary (the reference resection)."""
    when: When
    ref: str


def reference_resection(ctx: MappingContext) -> Event | None:
    """The latest completed hepatectomy."""
    best: Event | None = None
    for p in ctx.record.procedures:
        if p.status not in DONE_PROCEDURE or not matches(ctx.terminology.hepatectomy_procedure, codings(p.code)):
            continue
        when = When.of_element(p, "performedDateTime", "performedPeriod")
        if when is None:
            ctx.warnings.append(f"{ctx.ref(p)}: hepatectomy without a date; not used as the reference resection")
            continue
        if best is None or when.sort_key() > best.when.sort_key():
            best = Event(when, ctx.ref(p))
    return best


def prior_liver_resection(resection: Event | None) -> Fact[bool]:
    """Whether a liver resection precedes the recurrence: the reference resection, when
    there is one; unknown (never False) when none is recorded."""
    if resection:
        return BoolFact(value=True, refs=(resection.ref,), note=f"completed liver resection on {resection.when.text}")
    return BoolFact(note="no completed liver resection recorded")


def liver_recurrence(ctx: MappingContext, resection: Event | None) -> tuple[Fact[bool], When | None]:
    """The liver-recurrence fact, and the onset of the recurrence (its earliest dated
    Condition). A Condition dated before the reference resection is the initial
    disease; one that cannot be placed against it proves nothing."""
    t = ctx.terminology
    active, unconfirmed, ignored, unplaced, onsets = [], [], [], [], []
    for c in ctx.record.conditions:
        if "liver" not in metastasis_sites(t, c):
            continue
        status = condition_status(c)
        if status not in ("active", "unconfirmed"):
            ignored.append(ctx.ref(c))
            continue
        when = When.of_element(c, "onsetDateTime", "onsetPeriod", "recordedDate")
        if resection is not None:
            place = when.relation(resection.when) if when is not None else "uncertain"
            if place == "before":
                ctx.warnings.append(
                    f"{ctx.ref(c)}: liver-metastasis Condition dated {when.text}, before the reference "  # type: ignore[union-attr]
                    f"resection ({resection.when.text}): the initial disease, not the recurrence")
                ignored.append(ctx.ref(c))
                continue
            if place == "uncertain":
                ctx.warnings.append(
                    f"{ctx.ref(c)}: liver-metastasis Condition "
                    + (f"dated {when.text}" if when else "without a date")
                    + f" cannot be placed before or after the reference resection ({resection.when.text})")
                unplaced.append(ctx.ref(c))
                continue
        (active if status == "active" else unconfirmed).append(ctx.ref(c))
        if status == "active" and when is not None:
            onsets.append(when)
    onset = min(onsets, key=When.sort_key, default=None)
    if active:
        return BoolFact(value=True, refs=tuple(active)), onset
    unreadable = ctx.distrusted_matching("Condition", t.liver_metastasis_condition, t.metastasis_condition_generic)
    if unconfirmed or unreadable or unplaced:
        parts = []
        if unconfirmed:
            parts.append(f"liver metastasis not confirmed ({', '.join(unconfirmed)})")
        if unplaced:
            parts.append(f"liver metastasis not placed after the resection ({', '.join(unplaced)})")
        if unreadable:
            parts.append(f"liver-metastasis Condition not readable or not attributable ({', '.join(unreadable)})")
        return BoolFact(value=None, refs=tuple(unconfirmed + unplaced), note="; ".join(parts)), None
    note = "no liver-metastasis Condition in the record"
    if ignored:
        note = ("liver-metastasis Conditions withdrawn, no longer active or before the resection: "
                f"{', '.join(ignored)}")
    return BoolFact(value=False, refs=tuple(ignored), note=note), None
