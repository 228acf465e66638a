"""Imaging currency: whether the structured measurements are from the latest imaging,
and the latest moment of imaging of the recurrence.

A newer imaging report with text only (or one that cannot be read or attributed) may
show what the measurements do not: the measurements may be stale and the result stays
preliminary. The latest moment of imaging is what a technical judgement must not be
older than (:mod:`fhir_adapters.features.technical`).
"""

from __future__ import annotations

from typing import Any

from engine.features import Fact
from fhir_adapters.features.evidence import WITHDRAWN_REPORT, BoolFact, MappingContext
from fhir_adapters.features.studies import Imaging, is_imaging_report
from fhir_adapters.fhir.timeline import When


def _imaging_reports(ctx: MappingContext) -> list[tuple[Any, When | None]]:
    """The patient's imaging reports that are not withdrawn, each with its time."""
    return [(dr, When.of_element(dr, "effectiveDateTime", "effectivePeriod") or When.of(dr.issued))
            for dr in ctx.record.diagnostic_reports
            if dr.status not in WITHDRAWN_REPORT and is_imaging_report(ctx.terminology, dr)]


def imaging_currency(ctx: MappingContext, imaging: Imaging) -> tuple[Fact[bool], When | None]:
    """Whether the latest imaging report has the structured measurements used (False:
    a newer report has text only), and the latest moment of imaging of the recurrence
    (any measurement, its report, or a newer report): a technical judgement must not
    be older than that."""
    record, studies, uncertain = ctx.record, imaging.studies, imaging.uncertain
    points = [m.when for s in studies for ms in s.lesions.values() for m in ms if m.when is not None]
    points += [s.when for s in studies] + [m.when for m in uncertain if m.when is not None]
    points += imaging.uncounted
    if not studies:
        # No measured study: every imaging report still dates the latest imaging (a
        # technical judgement older than it is stale), and one that cannot be read or
        # attributed may be that newest imaging.
        points += [when for _, when in _imaging_reports(ctx) if when is not None]
        doubt = ctx.distrusted_matching("DiagnosticReport", ctx.terminology.radiology_report_category)
        newest = max(points, key=lambda w: w.start, default=None)
        if doubt:
            ctx.warnings += [f"{ref}: an imaging report that cannot be read or attributed may be the newest imaging; "
                             "the result stays preliminary" for ref in doubt]
            return BoolFact(value=False, refs=tuple(doubt),
                            note=f"imaging report(s) that cannot be read or attributed: {', '.join(doubt)}"), newest
        return BoolFact(value=True), newest
    latest = max((s.when for s in studies), key=lambda w: w.end)
    measured = {record.canonical(m.ref) for s in studies for ms in s.lesions.values() for m in ms}
    newer = []
    for dr, when in _imaging_reports(ctx):
        if when is None or not when.after(latest):
            continue
        if any(record.canonical(r.reference) in measured for r in dr.result or []):
            continue
        newer.append(ctx.ref(dr))
        points.append(when)
        ctx.warnings.append(f"{ctx.ref(dr)}: imaging report of {when.text} is newer than the latest tumour "
                            f"measurements ({latest.text}) and has no structured measurements; the "
                            "measurements may be stale and the result stays preliminary")
    # An imaging report that cannot be read or attributed may be the newest one.
    for ref in ctx.distrusted_matching("DiagnosticReport", ctx.terminology.radiology_report_category):
        newer.append(ref)
        ctx.warnings.append(f"{ref}: an imaging report that cannot be read or attributed may be newer than the "
                            "latest tumour measurements; the measurements may be stale and the result stays "
                            "preliminary")
    newest = max(points, key=lambda w: w.start)
    if newer:
        return BoolFact(value=False, refs=tuple(newer),
                        note=f"newer imaging report(s) without measurements: {', '.join(newer)}"), newest
    return BoolFact(value=True, note=f"latest measured study {latest.text}"), newest
