"""One tumour-size Observation: its size readings, whether it is a liver lesion, and
which lesion it measures.

Reading numbers is where a missing value most easily becomes "small": a value that
cannot be used (dataAbsentReason, no value, a unit that is not a UCUM length, zero,
negative or implausible) leaves the lesion's size unknown, never zero, and a
comparator makes the number a bound. A measurement is a liver lesion by its bodySite
or its focus BodyStructure's location, or, naming no site and no specimen, in a
patient with a liver recurrence; pathology and other sites do not count. Its focus
BodyStructure is the lesion's identity across studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from fhir_adapters.features.evidence import (MappingContext, codings, concept_code, matches, metastasis_sites,
                                             site_is_liver)
from fhir_adapters.fhir.timeline import When
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology

DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
UCUM = "http://unitsofmeasure.org"

SizeBound = Literal["exact", "at-least", "below", "at-most"]
Reading = tuple[Decimal | None, SizeBound, str | None]
# What a Quantity.comparator makes of its number (R4: <, <=, >=, >).
BOUNDS: dict[str | None, SizeBound] = {None: "exact", "<": "below", "<=": "at-most", ">": "at-least", ">=": "at-least"}


@dataclass
class Measurement:
    ref: str
    lesion_key: str                 # focus BodyStructure, else the Observation itself
    when: When | None               # its own date, else its report's
    study: str | None               # the study it belongs to (None: cannot be placed)
    size_mm: Decimal | None
    bound: SizeBound
    size_problem: str | None


def size_mm(terminology: Terminology, quantity: Any, where: str) -> Reading:
    """(millimetres, what the number is: exact or a bound, problem)."""
    if quantity is None or quantity.value is None:
        return None, "exact", f"{where}: no value"
    if quantity.system not in (None, UCUM):
        return None, "exact", f"{where}: unit system {quantity.system!r} is not UCUM"
    unit = quantity.code or quantity.unit
    factor = terminology.length_units_to_mm.get(unit or "")
    if factor is None:
        return None, "exact", f"{where}: unit {unit!r} is not a known UCUM length unit"
    value = Decimal(quantity.value)
    if not value.is_finite() or value <= 0:
        return None, "exact", f"{where}: size {value} {unit} is not a positive length"
    mm = value * factor
    if quantity.comparator not in BOUNDS:
        return None, "exact", f"{where}: comparator {quantity.comparator!r} is not an R4 comparator"
    bound = BOUNDS[quantity.comparator]
    limits = terminology.plausible_diameter_mm
    if bound in ("exact", "at-least") and not limits.minimum <= mm <= limits.maximum:
        return None, "exact", (f"{where}: size {value} {unit} is outside the plausible range "
                               f"{limits.minimum}-{limits.maximum} mm")
    if bound in ("below", "at-most") and mm > limits.maximum:
        # an upper bound beyond any plausible size says nothing (and must not reach the
        # engine as a number it cannot compare exactly)
        return None, "exact", (f"{where}: upper bound {quantity.comparator}{value} {unit} is beyond the plausible "
                               f"range {limits.minimum}-{limits.maximum} mm; it says nothing about the size")
    return mm, bound, None


def measurement_sizes(ctx: MappingContext, o: Any) -> list[Reading] | None:
    """Every longest-dimension reading of a tumour-size Observation (each component
    33728-7, and its valueQuantity), or None when it is not one. The Observation is a
    tumour size by its code, as the server search finds it."""
    t = ctx.terminology
    pairs = codings(o.code)
    if not (matches(t.tumour_size_observation, pairs) or matches(t.longest_dimension, pairs)):
        return None
    where = ctx.ref(o)
    readings: list[Reading] = []
    for comp in o.component or []:
        if matches(t.longest_dimension, codings(comp.code)):
            if comp.dataAbsentReason is not None:
                readings.append((None, "exact", f"{where}: longest dimension absent ({comp.dataAbsentReason.text or concept_code(comp.dataAbsentReason, DATA_ABSENT)})"))
            else:
                readings.append(size_mm(t, comp.valueQuantity, where))
    if o.valueQuantity is not None or not readings:
        if o.dataAbsentReason is not None and not readings:
            readings.append((None, "exact", f"{where}: size absent ({o.dataAbsentReason.text or concept_code(o.dataAbsentReason, DATA_ABSENT)})"))
        elif o.valueQuantity is None:
            readings.append((None, "exact", f"{where}: no longest dimension (no component 33728-7 and no valueQuantity)"))
        else:
            readings.append(size_mm(t, o.valueQuantity, where))
    return readings


def is_liver_lesion(ctx: MappingContext, o: Any, liver_recurrence: bool) -> bool:
    t, record = ctx.terminology, ctx.record
    if o.specimen is not None or matches(t.pathology_method, codings(o.method)):
        return False
    site = site_is_liver(t, [o.bodySite] if o.bodySite is not None else [])
    for f in o.focus or []:
        target = record.canonical(f.reference)
        if target in record.body_structures:
            bs = record.body_structures[target]
            site = site_is_liver(t, [bs.location] if bs.location is not None else []) if site is None else site
        elif target is not None and target.startswith("Condition/"):
            cond = next((c for c in record.conditions if f"Condition/{c.id}" == target), None)
            if cond is not None and site is None:
                sites = metastasis_sites(t, cond)
                site = True if "liver" in sites else False if sites == {"extrahepatic"} else None
    if site is not None:
        return site
    return liver_recurrence


def lesion_key(ctx: MappingContext, o: Any) -> str:
    """A lesion's identity: its focus BodyStructure (stable across reports), else the
    Observation itself. A focus on a Condition is not a lesion's identity."""
    for f in o.focus or []:
        target = ctx.record.canonical(f.reference)
        if target and is_lesion_identity(ctx.record, target):
            return target
    return ctx.ref(o)


def is_lesion_identity(record: PatientRecord, key: str) -> bool:
    return key.startswith("BodyStructure/") or key in record.body_structures
