"""Adjuvant chemotherapy: chemotherapy given after the reference resection and before
the recurrence.

It decides the recommendation for borderline-resectable disease (preoperative
chemotherapy helped those who had no adjuvant chemotherapy), so "none" needs a dated
resection, a known recurrence date, dated chemotherapy records, and no record that may
be chemotherapy but cannot be read or attributed.
"""

from __future__ import annotations

from engine.features import Fact
from fhir_adapters.features.evidence import (GIVEN_ADMINISTRATION, GIVEN_PROCEDURE, TAKEN_STATEMENT, BoolFact,
                                             MappingContext, codings, matches)
from fhir_adapters.features.recurrence import Event
from fhir_adapters.fhir.timeline import When


def chemotherapy_records(ctx: MappingContext) -> tuple[list[tuple[When | None, str]], list[str]]:
    """(dated chemotherapy records, records that might be chemotherapy but cannot be
    read or attributed)."""
    record, t = ctx.record, ctx.terminology
    found, doubtful = [], []
    for p in record.procedures:
        if p.status in GIVEN_PROCEDURE and matches(t.chemotherapy_procedure, codings(p.code)):
            found.append((When.of_element(p, "performedDateTime", "performedPeriod"), ctx.ref(p)))
    for statuses, items in ((GIVEN_ADMINISTRATION, record.medication_administrations),
                            (TAKEN_STATEMENT, record.medication_statements)):
        for m in items:
            if m.status not in statuses:
                continue
            concept = m.medicationCodeableConcept
            if concept is None and m.medicationReference is not None:
                med = record.medications.get(record.canonical(m.medicationReference.reference) or "")
                if med is None:
                    doubtful.append(f"{ctx.ref(m)} (medication {m.medicationReference.reference} not found)")
                    continue
                concept = med.code
            if concept is not None and matches(t.chemotherapy_medication, codings(concept)):
                found.append((When.of_element(m, "effectiveDateTime", "effectivePeriod"), ctx.ref(m)))
    for rtype in ("Procedure", "MedicationAdministration", "MedicationStatement"):
        doubtful += ctx.distrusted_matching(rtype, t.chemotherapy_procedure, t.chemotherapy_medication)
    return found, doubtful


def adjuvant_chemotherapy(ctx: MappingContext, resection: Event | None, recurrence: When | None) -> Fact[bool]:
    if resection is None:
        return BoolFact(note="no completed hepatectomy recorded, so no adjuvant window")
    given, undated, unplaced = [], [], []
    records, doubtful = chemotherapy_records(ctx)
    for when, r in records:
        if when is None:
            undated.append(r)
        elif when.after(resection.when) and recurrence is None:
            unplaced.append(r)  # after the resection, but the recurrence date is unknown
        elif when.after(resection.when) and recurrence.after(when):  # type: ignore[union-attr]
            given.append(r)
    if given:
        return BoolFact(value=True, refs=(resection.ref, *given))
    if doubtful:
        return BoolFact(refs=(resection.ref,),
                        note=f"records that may be chemotherapy cannot be read or attributed: {', '.join(doubtful)}")
    if undated or unplaced:
        why = (f"chemotherapy records without a date: {', '.join(undated)}" if undated else
               f"chemotherapy after the resection ({', '.join(unplaced)}) but the recurrence date is "
               "unknown, so it cannot be called adjuvant")
        return BoolFact(refs=tuple(undated + unplaced), note=why)
    return BoolFact(value=False, refs=(resection.ref,),
                    note=f"no chemotherapy recorded after the resection of {resection.when.text}"
                         + (f" and before the recurrence ({recurrence.text})" if recurrence else ""))
