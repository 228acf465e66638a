"""The imaging studies of the recurrence: which liver measurements count, and how they
are grouped into studies.

The factors are those *at recurrence*, and a factor is read per study (four lesions on
one examination), so measurements belong to a study, not to a calendar day: the
imaging report that lists them, the ImagingStudy or report they name, else the same
instant on the UTC timeline. Measurements before the reference resection are the
initial disease; with no resection recorded, those older than the recurrence Condition
are not counted but keep count and size from being proven absent. What cannot be
placed in time is kept apart: it can only add lesions.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from fhir_adapters.features.evidence import WITHDRAWN_OBSERVATION, WITHDRAWN_REPORT, MappingContext, codings, matches
from fhir_adapters.features.measurements import Measurement, is_liver_lesion, lesion_key, measurement_sizes
from fhir_adapters.features.recurrence import Event
from fhir_adapters.fhir.timeline import When
from fhir_adapters.terminology import Terminology


@dataclass
class Study:
    key: str
    when: When                      # the span of the study (its measurements and report)
    last: When                      # its latest measurement
    lesions: dict[str, list[Measurement]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"the study of {self.when.text}" + ("" if self.key.startswith("time:") else f" ({self.key})")


@dataclass
class Imaging:
    """The liver imaging of the recurrence, as the lesion and currency facts read it."""
    studies: list[Study]            # oldest first
    uncertain: list[Measurement]    # cannot be placed in one study: can only add lesions
    unplaceable: list[str] = field(default_factory=list)   # not counted, but count and size are lower bounds
    uncounted: list[When] = field(default_factory=list)    # dated liver imaging not counted (before the onset)


def is_imaging_report(terminology: Terminology, dr: Any) -> bool:
    return matches(terminology.radiology_report_category, codings(*(dr.category or [])))


def reports(ctx: MappingContext) -> tuple[dict[str, str], dict[str, When | None]]:
    """(Observation ref -> its study key, study key -> the report's date) from the
    DiagnosticReports that list measurements as ``result``."""
    record = ctx.record
    study_of: dict[str, str] = {}
    when_of: dict[str, When | None] = {}
    for dr in record.diagnostic_reports:
        if dr.status in WITHDRAWN_REPORT or not is_imaging_report(ctx.terminology, dr):
            continue  # the same reports a server search by category returns
        key = next((record.canonical(i.reference) for i in dr.imagingStudy or [] if i.reference), None) or ctx.ref(dr)
        when_of.setdefault(key, When.of_element(dr, "effectiveDateTime", "effectivePeriod"))
        # an Observation may name its report (derivedFrom / partOf) instead of being listed
        study_of[f"DiagnosticReport:{record.canonical(ctx.ref(dr))}"] = key
        for r in dr.result or []:
            target = record.canonical(r.reference)
            if target:
                study_of[target] = key
    return study_of, when_of


def study_link(ctx: MappingContext, o: Any, study_of: dict[str, str]) -> str | None:
    """The study an Observation names itself: a report that lists it, or an
    ImagingStudy / DiagnosticReport in derivedFrom or partOf."""
    own = ctx.record.canonical(ctx.ref(o))
    if own in study_of:
        return study_of[own]
    for link in [*(o.derivedFrom or []), *(o.partOf or [])]:
        target = ctx.record.canonical(link.reference)
        if target and target.startswith("ImagingStudy/"):
            return target
        if target and target.startswith("DiagnosticReport/"):
            return study_of.get(f"DiagnosticReport:{target}", target)
    return None


def studies_of_recurrence(ctx: MappingContext, liver_recurrence: bool, resection: Event | None,
                          onset: When | None) -> Imaging:
    """The imaging studies of the recurrence, oldest first, and the measurements that
    cannot be placed in one (no date, or a month or year that straddles the
    resection): those can only add lesions."""
    study_of, report_when = reports(ctx)
    unplaceable: list[str] = []
    uncounted_imaging: list[When] = []   # dated liver imaging not counted (before the onset)
    placed: list[Measurement] = []
    uncertain: list[Measurement] = []
    initial: list[str] = []
    for o in ctx.record.observations:
        if o.status in WITHDRAWN_OBSERVATION:
            continue
        sizes = measurement_sizes(ctx, o)
        if sizes is None or not is_liver_lesion(ctx, o, liver_recurrence):
            continue
        link = study_link(ctx, o, study_of)
        when = When.of_element(o, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
        if when is None and link is not None:
            when = report_when.get(link)
        readings = [Measurement(ctx.ref(o), lesion_key(ctx, o), when, None, *size) for size in sizes]
        m = readings[0]
        if when is None:
            uncertain.extend(readings)
            continue
        if resection is not None:
            place = when.relation(resection.when)
            if place == "before":
                initial.append(m.ref)
                continue
        elif onset is not None:
            if when.end <= onset.start:
                # It may still be the recurrence (no resection says otherwise): not
                # counted, but it keeps count and size from being proven absent.
                ctx.warnings.append(
                    f"{m.ref}: measured {when.text}, before the liver-recurrence Condition ({onset.text}), with "
                    "no resection recorded: not counted, and count and size are lower bounds")
                unplaceable.append(m.ref)
                uncounted_imaging.append(when)   # still imaging: a judgement older than it is stale
                continue
            place = "after" if when.start >= onset.start or when.fine else "uncertain"
        else:
            place = "after"
        if place == "uncertain" or (link is None and not when.fine):
            uncertain.extend(readings)
            continue
        for r in readings:
            r.study = link
        placed.extend(readings)
    if initial:
        ctx.warnings.append("measurements before the reference resection (initial disease) not counted: "
                            + ", ".join(initial))
    studies = group_into_studies(ctx.terminology, placed, report_when)
    for m in uncertain:
        ctx.warnings.append(f"{m.ref}: tumour measurement that cannot be placed in time "
                            + (f"({m.when.text})" if m.when else "(no date)")
                            + "; count and size are lower bounds")
    return Imaging(sorted(studies.values(), key=lambda s: s.last.sort_key()), uncertain,
                   unplaceable, uncounted_imaging)


def group_into_studies(terminology: Terminology, placed: list[Measurement],
                       report_when: dict[str, When | None]) -> dict[str, Study]:
    """Measurements -> studies. Two measurements are of one study when the record links
    them to the same report or ImagingStudy, or when their times are within the
    tolerance of each other (chained): splitting one examination would hide lesions,
    joining two only makes the answer more cautious."""
    parent = list(range(len(placed)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_link: dict[str, int] = {}
    for i, m in enumerate(placed):
        if m.study is not None:
            parent[root(i)] = root(first_of_link.setdefault(m.study, i))
    tolerance = dt.timedelta(minutes=terminology.unlinked_study_tolerance_minutes)
    order = sorted(range(len(placed)), key=lambda i: placed[i].when.sort_key())  # type: ignore[union-attr]
    reach: int | None = None  # the measurement reaching furthest so far
    for i in order:
        when = placed[i].when
        assert when is not None
        if reach is not None and placed[reach].when.near(when, tolerance):  # type: ignore[union-attr]
            parent[root(i)] = root(reach)
        if reach is None or when.end > placed[reach].when.end:  # type: ignore[union-attr]
            reach = i
    studies: dict[int, Study] = {}
    for i in order:
        m = placed[i]
        assert m.when is not None
        r = root(i)
        study = studies.get(r)
        if study is None:
            study = studies[r] = Study(m.study or f"time:{m.when.key}", m.when, m.when)
        else:
            study.when = study.when.union(m.when)
            if m.study is not None and study.key.startswith("time:"):
                study.key = m.study
            if m.when.start > study.last.start:
                study.last = m.when
        if m.study and report_when.get(m.study) is not None:
            study.when = study.when.union(report_when[m.study])  # type: ignore[arg-type]
        study.lesions.setdefault(m.lesion_key, []).append(m)
    return {s.key: s for s in studies.values()}
