"""FHIR R4 resources of one patient -> tumour features (docs: clinical-basis.md).

Each feature is a :class:`engine.features.Fact` with the references behind it and a
note when it is unknown. The rules of evidence, in short:

* Withdrawn records are ignored: Observation entered-in-error / cancelled, Condition
  refuted / entered-in-error or resolved / inactive / remission, Procedure and
  medication records not done.
* The reference resection is the latest completed hepatectomy. Measurements dated on
  or before it are initial-diagnosis data. Lesions are counted on the latest imaging
  date after it: one per distinct ``focus``, one per Observation without focus.
* A measurement counts as a liver lesion when its bodySite, or the location of its
  focus BodyStructure, is the liver; or when it names no site and no specimen in a
  patient with a liver recurrence. Pathology (a ``specimen``, or a pathology method)
  and other sites do not count.
* A value that cannot be used (dataAbsentReason, no value, unknown unit, a wrong type,
  zero or negative) leaves that lesion's size unknown, never zero. What cannot be
  placed (an undated or unreadable measurement) makes count and size *lower bounds*:
  they can still prove a factor present, never absent.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable

from engine.features import Fact, Features
from fhir_adapters.record import PatientRecord
from fhir_adapters.terminology import CodeList, Terminology

WITHDRAWN_OBSERVATION = {"entered-in-error", "cancelled"}
FINAL_OBSERVATION = {"final", "amended", "corrected"}
WITHDRAWN_VERIFICATION = {"refuted", "entered-in-error"}
UNCONFIRMED_VERIFICATION = {"provisional", "differential", "unconfirmed"}
INACTIVE_CLINICAL = {"resolved", "inactive", "remission"}
DONE_PROCEDURE = {"completed"}
GIVEN_ADMINISTRATION = {"completed", "in-progress"}
TAKEN_STATEMENT = {"active", "completed", "stopped"}
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


# ----------------------------------------------------------------------------- helpers
def ref(resource: Any) -> str:
    """``Type/id``, with ``/_history/n`` when the resource carries a version."""
    base = f"{resource.get_resource_type()}/{resource.id}"
    version = resource.meta.versionId if resource.meta is not None else None
    return f"{base}/_history/{version}" if version else base


def plain_ref(reference: str | None) -> str | None:
    """A reference without base URL or version: ``http://x/fhir/Patient/1/_history/2`` -> ``Patient/1``."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def codings(*concepts: Any) -> list[tuple[str | None, str | None]]:
    out = []
    for concept in concepts:
        for c in (concept.coding or []) if concept is not None else []:
            out.append((c.system, c.code))
    return out


def concept_code(concept: Any, system: str) -> str | None:
    for s, c in codings(concept):
        if s == system:
            return c
    return None


def day_of(value: Any) -> tuple[dt.date | None, bool]:
    """The calendar date of a FHIR date/dateTime, and whether it is precise to the day.

    >>> day_of("2024-05")
    (datetime.date(2024, 5, 1), False)
    >>> day_of(dt.datetime(2024, 5, 3, 23, 30, tzinfo=dt.timezone.utc))
    (datetime.date(2024, 5, 3), True)
    """
    if value is None:
        return None, False
    if isinstance(value, dt.datetime):
        return value.date(), True
    if isinstance(value, dt.date):
        return value, True
    text = str(value)
    try:
        if len(text) == 4:
            return dt.date(int(text), 1, 1), False
        if len(text) == 7:
            return dt.date(int(text[:4]), int(text[5:7]), 1), False
        return dt.date.fromisoformat(text[:10]), True
    except ValueError:
        return None, False


def effective_day(resource: Any, *fields: str) -> tuple[dt.date | None, bool]:
    for name in fields:
        value = getattr(resource, name, None)
        if value is None:
            continue
        if name.endswith("Period"):
            value = value.start or value.end
        return day_of(value)
    return None, False


def day_span(resource: Any, *fields: str) -> tuple[dt.date, dt.date] | None:
    """First and last calendar day a date/dateTime/Period may mean (None: no date).

    >>> day_span(type("O", (), {"effectiveDateTime": "2024-02"})(), "effectiveDateTime")
    (datetime.date(2024, 2, 1), datetime.date(2024, 2, 29))
    """
    day, precise = effective_day(resource, *fields)
    if day is None:
        return None
    if precise:
        return day, day
    for name in fields:
        value = getattr(resource, name, None)
        if value is None:
            continue
        text = str(value.start or value.end) if name.endswith("Period") else str(value)
        if len(text) == 4:
            return day, dt.date(day.year, 12, 31)
        next_month = dt.date(day.year + day.month // 12, day.month % 12 + 1, 1)
        return day, next_month - dt.timedelta(days=1)
    return day, day


# ----------------------------------------------------------------------------- findings
@dataclass
class _Lesion:
    key: str
    refs: list[str] = field(default_factory=list)
    sizes_mm: list[Decimal] = field(default_factory=list)
    lower_bound_mm: list[Decimal] = field(default_factory=list)
    size_problems: list[str] = field(default_factory=list)


@dataclass
class _Measurement:
    ref: str
    lesion_key: str
    span: tuple[dt.date, dt.date] | None   # the days the measurement may have been taken
    size_mm: Decimal | None
    size_is_lower_bound: bool
    size_problem: str | None


class FeatureMapper:
    """Maps one :class:`PatientRecord` to :class:`Features` with one terminology."""

    def __init__(self, terminology: Terminology):
        self.t = terminology

    # ------------------------------------------------------------------ entry point
    def map(self, record: PatientRecord) -> Features:
        self.warnings: list[str] = []
        self.record = record
        liver = self._liver_recurrence(record)
        resection_day, resection_refs = self._reference_resection(record)
        count, size, lesion_days = self._lesions(record, liver.value is True, resection_day)
        extrahepatic = self._extrahepatic(record, liver)
        technical = self._technical(record, resection_day)
        recurrence_day = self._recurrence_day(record, resection_day, lesion_days)
        adjuvant = self._adjuvant(record, resection_day, resection_refs, recurrence_day)
        for u in record.unreadable:
            self.warnings.append(f"{u.ref} is not valid FHIR R4 and was not used: {u.problem}")
        return Features(
            patient=record.patient_ref, liver_recurrence=liver, tumour_count=count,
            largest_diameter_mm=size, extrahepatic_disease=extrahepatic,
            technical_resectability=technical, adjuvant_chemotherapy=adjuvant,
            warnings=tuple(self.warnings),
        )

    def _ref(self, resource: Any) -> str:
        """Reference of a resource; its Bundle fullUrl when it has no id."""
        if resource.id is None:
            return self.record.full_urls.get(id(resource), f"{resource.get_resource_type()}/(no id)")
        return ref(resource)

    # ------------------------------------------------------------------ conditions
    def _condition_status(self, c: Any) -> str:
        """'withdrawn', 'inactive', 'unconfirmed' or 'active'."""
        ver = concept_code(c.verificationStatus, CONDITION_VERIFICATION)
        clin = concept_code(c.clinicalStatus, CONDITION_CLINICAL)
        if ver in WITHDRAWN_VERIFICATION:
            return "withdrawn"
        if clin in INACTIVE_CLINICAL or (clin is None and c.abatementDateTime is not None):
            return "inactive"
        if ver in UNCONFIRMED_VERIFICATION:
            return "unconfirmed"
        return "active"

    def _site_is_liver(self, concepts: Iterable[Any]) -> bool | None:
        """True (liver), False (another site), None (no coded site)."""
        pairs = codings(*concepts)
        if not pairs:
            return None
        return self.t.liver_site.matches_any(pairs)

    def _metastasis_sites(self, c: Any) -> set[str]:
        """Sites of a metastasis Condition: any of 'liver', 'extrahepatic', 'unknown-site'
        (empty when it is not a metastasis). A generic metastasis code takes its sites
        from bodySite, each site on its own (liver and lung is both)."""
        pairs = codings(c.code)
        sites = set()
        if self.t.liver_metastasis_condition.matches_any(pairs):
            sites.add("liver")
        if self.t.extrahepatic_metastasis_condition.matches_any(pairs):
            sites.add("extrahepatic")
        if self.t.metastasis_condition_generic.matches_any(pairs):
            for site in c.bodySite or [None]:
                is_liver = self._site_is_liver([site] if site is not None else [])
                sites.add({True: "liver", False: "extrahepatic", None: "unknown-site"}[is_liver])
        return sites

    def _unreadable_matching(self, record: PatientRecord, rtype: str, *lists: CodeList) -> list[str]:
        return [u.ref for u in record.unreadable
                if u.resource_type == rtype and any(cl.matches_any(u.codings) for cl in lists)]

    def _liver_recurrence(self, record: PatientRecord) -> Fact[bool]:
        active, unconfirmed, ignored = [], [], []
        for c in record.conditions:
            if "liver" not in self._metastasis_sites(c):
                continue
            status = self._condition_status(c)
            {"active": active, "unconfirmed": unconfirmed}.get(status, ignored).append(self._ref(c))
        if active:
            return Fact[bool](value=True, refs=tuple(active))
        unreadable = self._unreadable_matching(record, "Condition", self.t.liver_metastasis_condition,
                                               self.t.metastasis_condition_generic)
        if unconfirmed or unreadable:
            why = (f"liver metastasis not confirmed ({', '.join(unconfirmed)})" if unconfirmed
                   else f"liver-metastasis Condition not readable ({', '.join(unreadable)})")
            return Fact[bool](value=None, refs=tuple(unconfirmed), note=why)
        note = "no liver-metastasis Condition in the record"
        if ignored:
            note = f"liver-metastasis Conditions withdrawn or no longer active: {', '.join(ignored)}"
        return Fact[bool](value=False, refs=tuple(ignored), note=note)

    def _extrahepatic(self, record: PatientRecord, liver: Fact[bool]) -> Fact[bool]:
        confirmed, doubtful, ignored = [], [], []
        for c in record.conditions:
            sites = self._metastasis_sites(c)
            if not sites & {"extrahepatic", "unknown-site"}:
                continue
            status = self._condition_status(c)
            if status == "active" and "extrahepatic" in sites:
                confirmed.append(self._ref(c))
            elif status in ("active", "unconfirmed"):
                doubtful.append(self._ref(c))
            else:
                ignored.append(self._ref(c))
        if confirmed:
            return Fact[bool](value=True, refs=tuple(confirmed))
        unreadable = self._unreadable_matching(record, "Condition", self.t.extrahepatic_metastasis_condition,
                                               self.t.metastasis_condition_generic)
        if doubtful or unreadable:
            note = ("extrahepatic metastasis suspected but not confirmed, or its site is not coded: "
                    f"{', '.join(doubtful + unreadable)}")
            return Fact[bool](value=None, refs=tuple(doubtful), note=note)
        note = "no active, confirmed extrahepatic metastasis recorded"
        if ignored:
            note += f" (withdrawn or inactive: {', '.join(ignored)})"
        return Fact[bool](value=False, refs=tuple(ignored), note=note)

    # ------------------------------------------------------------------ resection
    def _reference_resection(self, record: PatientRecord) -> tuple[dt.date | None, tuple[str, ...]]:
        """The latest completed hepatectomy: its day and reference."""
        best: tuple[dt.date, str] | None = None
        for p in record.procedures:
            if p.status not in DONE_PROCEDURE or not self.t.hepatectomy_procedure.matches_any(codings(p.code)):
                continue
            day, _ = effective_day(p, "performedDateTime", "performedPeriod")
            if day is None:
                self.warnings.append(f"{self._ref(p)}: hepatectomy without a date; not used as the reference resection")
                continue
            if best is None or day > best[0]:
                best = (day, self._ref(p))
        if best is None:
            return None, ()
        return best[0], (best[1],)

    # ------------------------------------------------------------------ lesions
    def _size_mm(self, quantity: Any, where: str) -> tuple[Decimal | None, bool, str | None]:
        """(millimetres, is a lower bound, problem)."""
        if quantity is None or quantity.value is None:
            return None, False, f"{where}: no value"
        unit = quantity.code or quantity.unit
        factor = self.t.length_units_to_mm.get(unit or "")
        if factor is None:
            return None, False, f"{where}: unit {unit!r} is not a known length unit"
        value = Decimal(quantity.value)
        if not value.is_finite() or value <= 0:
            return None, False, f"{where}: size {value} {unit} is not a positive length"
        if quantity.comparator in ("<", "<="):
            return None, False, f"{where}: size given only as {quantity.comparator} {value} {unit}"
        mm = value * factor
        limits = self.t.plausible_diameter_mm
        if not limits.minimum <= mm <= limits.maximum:
            return None, False, (f"{where}: size {value} {unit} is outside the plausible range "
                                 f"{limits.minimum}-{limits.maximum} mm")
        return mm, quantity.comparator in (">", ">="), None

    def _measurement_size(self, o: Any) -> tuple[Decimal | None, bool, str | None] | None:
        """Size of a tumour-size Observation, or None when it is not one."""
        where = self._ref(o)
        for comp in o.component or []:
            if self.t.longest_dimension.matches_any(codings(comp.code)):
                if comp.dataAbsentReason is not None:
                    return None, False, f"{where}: longest dimension absent ({comp.dataAbsentReason.text or concept_code(comp.dataAbsentReason, 'http://terminology.hl7.org/CodeSystem/data-absent-reason')})"
                return self._size_mm(comp.valueQuantity, where)
        pairs = codings(o.code)
        if not (self.t.tumour_size_observation.matches_any(pairs) or self.t.longest_dimension.matches_any(pairs)):
            return None
        if o.dataAbsentReason is not None:
            return None, False, f"{where}: size absent ({o.dataAbsentReason.text or concept_code(o.dataAbsentReason, 'http://terminology.hl7.org/CodeSystem/data-absent-reason')})"
        if o.valueQuantity is None:
            return None, False, f"{where}: no longest dimension (no component 33728-7 and no valueQuantity)"
        return self._size_mm(o.valueQuantity, where)

    def _is_liver_lesion(self, o: Any, record: PatientRecord, liver_recurrence: bool) -> bool:
        if o.specimen is not None or self.t.pathology_method.matches_any(codings(o.method)):
            return False
        site = self._site_is_liver([o.bodySite] if o.bodySite is not None else [])
        for f in o.focus or []:
            target = plain_ref(f.reference)
            if target in record.body_structures:
                bs = record.body_structures[target]
                site = self._site_is_liver([bs.location] if bs.location is not None else []) if site is None else site
            elif target is not None and target.startswith("Condition/"):
                cond = next((c for c in record.conditions if f"Condition/{c.id}" == target), None)
                if cond is not None and site is None:
                    sites = self._metastasis_sites(cond)
                    site = True if "liver" in sites else False if sites == {"extrahepatic"} else None
        if site is not None:
            return site
        return liver_recurrence

    def _lesion_key(self, o: Any) -> str:
        """A lesion's identity: its focus BodyStructure (stable across reports), else the
        Observation itself. A focus on a Condition is not a lesion's identity."""
        for f in o.focus or []:
            target = plain_ref(f.reference)
            if target and target.startswith("BodyStructure/"):
                return target
        return self._ref(o)

    def _lesions(self, record: PatientRecord, liver_recurrence: bool,
                 resection_day: dt.date | None) -> tuple[Fact[int], Fact[Decimal], list[dt.date]]:
        measurements: list[_Measurement] = []
        for o in record.observations:
            if o.status in WITHDRAWN_OBSERVATION:
                continue
            size = self._measurement_size(o)
            if size is None or not self._is_liver_lesion(o, record, liver_recurrence):
                continue
            span = day_span(o, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
            if span is not None and resection_day is not None and span[1] <= resection_day:
                continue  # initial diagnosis, before (or on the day of) the reference resection
            if span is not None and span[0] != span[1]:
                self.warnings.append(f"{self._ref(o)}: date known only to the month or year")
            measurements.append(_Measurement(self._ref(o), self._lesion_key(o), span, *size))

        # Precisely dated measurements after the resection fix the latest imaging date.
        def placed(m: _Measurement) -> bool:
            return (m.span is not None and m.span[0] == m.span[1]
                    and (resection_day is None or m.span[0] > resection_day))

        latest = max((m.span[0] for m in measurements if placed(m)), default=None)
        current = [m for m in measurements if placed(m) and m.span[0] == latest]
        # What cannot be placed (no date, a month that may be the latest, a period that
        # straddles the resection) can only add lesions: count and size become lower bounds.
        uncertain = [m for m in measurements if not placed(m) and (m.span is None or latest is None
                                                                    or m.span[1] >= latest)]
        unreadable = self._unreadable_matching(record, "Observation", self.t.tumour_size_observation,
                                               self.t.longest_dimension)
        if uncertain or unreadable:
            self.warnings.append("tumour measurements that cannot be placed in time or read: "
                                 f"{', '.join([m.ref for m in uncertain] + unreadable)}; count and size are "
                                 "lower bounds")
        current += uncertain
        lesion_days = sorted({m.span[0] for m in measurements if placed(m)})
        if not current:
            note = "no tumour measurement of the liver after the reference resection"
            if unreadable:
                note = f"tumour measurements not readable: {', '.join(unreadable)}"
            return Fact[int](note=note), Fact[Decimal](note=note), lesion_days

        lesions: dict[str, _Lesion] = {}
        for m in current:
            lesion = lesions.setdefault(m.lesion_key, _Lesion(m.lesion_key))
            lesion.refs.append(m.ref)
            if m.size_mm is not None:
                (lesion.lower_bound_mm if m.size_is_lower_bound else lesion.sizes_mm).append(m.size_mm)
            elif m.size_problem:
                lesion.size_problems.append(m.size_problem)
        refs = tuple(r for lesion in lesions.values() for r in lesion.refs)
        bound = bool(uncertain or unreadable)
        when = f"on {latest.isoformat()}" if latest else "(not placed in time)"
        count = Fact[int](value=len(lesions), refs=refs, lower_bound=bound,
                          note=f"{len(lesions)} distinct lesion(s) measured {when}"
                               + ("; at least this many" if bound else ""))

        exact = [max(lz.sizes_mm) for lz in lesions.values() if lz.sizes_mm]
        floors = [max(lz.lower_bound_mm) for lz in lesions.values() if not lz.sizes_mm and lz.lower_bound_mm]
        unsized = [lz for lz in lesions.values() if not lz.sizes_mm and not lz.lower_bound_mm]
        problems = [p for lz in unsized for p in lz.size_problems]
        self.warnings.extend(problems)
        if not exact and not floors:
            size = Fact[Decimal](refs=refs, note="; ".join(problems) or "no lesion size recorded")
        else:
            largest = max(exact + floors)
            size_bound = bound or bool(floors) or bool(unsized)
            note = f"largest of {len(lesions)} lesion(s) {when}"
            if size_bound:
                note += ("; at least this large: " + "; ".join(
                    problems or ["a size is given only as a lower bound or a measurement could not be used"]))
            size = Fact[Decimal](value=largest, refs=refs, lower_bound=size_bound, note=note)
        return count, size, lesion_days

    # ------------------------------------------------------------------ technical judgement
    def _technical(self, record: PatientRecord, resection_day: dt.date | None) -> Fact:
        judgements: list[tuple[dt.date | None, str | None, str]] = []
        for o in record.observations:
            if o.status in WITHDRAWN_OBSERVATION:
                continue
            if not self.t.technical_resectability_observation.matches_any(codings(o.code)):
                continue
            if o.status not in FINAL_OBSERVATION:
                self.warnings.append(f"{self._ref(o)}: technical resectability assessment is {o.status}, "
                                     "not final; not used")
                continue
            day, _ = effective_day(o, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
            if day is not None and resection_day is not None and day <= resection_day:
                continue  # a judgement about the initial disease, not the recurrence
            value = None
            if o.valueBoolean is not None:
                value = "resectable" if o.valueBoolean else "unresectable"
            elif o.valueCodeableConcept is not None:
                pairs = codings(o.valueCodeableConcept)
                if self.t.technically_unresectable_value.matches_any(pairs):
                    value = "unresectable"
                elif self.t.technically_resectable_value.matches_any(pairs):
                    value = "resectable"
            if value is None and o.dataAbsentReason is None:
                self.warnings.append(f"{self._ref(o)}: technical resectability value not recognised")
            judgements.append((day, value, self._ref(o)))
        usable = [j for j in judgements if j[1] is not None]
        if not usable:
            return Fact(note="no technical resectability assessment recorded after the reference resection",
                        refs=tuple(j[2] for j in judgements))
        latest_day = max((j[0] for j in usable if j[0] is not None), default=None)
        latest = [j for j in usable if j[0] == latest_day] if latest_day else usable
        values = {j[1] for j in latest}
        refs = tuple(j[2] for j in latest)
        if len(values) > 1:
            self.warnings.append(f"conflicting technical resectability assessments: {', '.join(refs)}")
            return Fact(refs=refs, note="conflicting technical resectability assessments on the same day")
        return Fact(value=values.pop(), refs=refs)

    # ------------------------------------------------------------------ chemotherapy
    def _recurrence_day(self, record: PatientRecord, resection_day: dt.date | None,
                        lesion_days: list[dt.date]) -> dt.date | None:
        days = []
        for c in record.conditions:
            if "liver" in self._metastasis_sites(c) and self._condition_status(c) == "active":
                day, _ = effective_day(c, "onsetDateTime", "onsetPeriod", "recordedDate")
                if day is not None and (resection_day is None or day > resection_day):
                    days.append(day)
        days += lesion_days[:1]
        return min(days) if days else None

    def _chemo_records(self, record: PatientRecord) -> tuple[list[tuple[dt.date | None, str]], list[str]]:
        """(dated chemotherapy records, records that might be chemotherapy but cannot be read)."""
        found, doubtful = [], []
        for p in record.procedures:
            if p.status in ("completed", "in-progress") and self.t.chemotherapy_procedure.matches_any(codings(p.code)):
                found.append((effective_day(p, "performedDateTime", "performedPeriod")[0], self._ref(p)))
        for statuses, items in ((GIVEN_ADMINISTRATION, record.medication_administrations),
                                (TAKEN_STATEMENT, record.medication_statements)):
            for m in items:
                if m.status not in statuses:
                    continue
                concept = m.medicationCodeableConcept
                if concept is None and m.medicationReference is not None:
                    med = record.medications.get(plain_ref(m.medicationReference.reference) or "")
                    if med is None:
                        doubtful.append(f"{self._ref(m)} (medication {m.medicationReference.reference} not found)")
                        continue
                    concept = med.code
                if concept is not None and self.t.chemotherapy_medication.matches_any(codings(concept)):
                    found.append((effective_day(m, "effectiveDateTime", "effectivePeriod")[0], self._ref(m)))
        for rtype in ("Procedure", "MedicationAdministration", "MedicationStatement"):
            doubtful += self._unreadable_matching(record, rtype, self.t.chemotherapy_procedure,
                                                  self.t.chemotherapy_medication)
        return found, doubtful

    def _adjuvant(self, record: PatientRecord, resection_day: dt.date | None, resection_refs: tuple[str, ...],
                  recurrence_day: dt.date | None) -> Fact[bool]:
        if resection_day is None:
            return Fact[bool](note="no completed hepatectomy recorded, so no adjuvant window")
        given, undated, unplaced = [], [], []
        records, doubtful = self._chemo_records(record)
        for day, r in records:
            if day is None:
                undated.append(r)
            elif day > resection_day and recurrence_day is None:
                unplaced.append(r)  # after the resection, but the recurrence date is unknown
            elif day > resection_day and day < recurrence_day:
                given.append(r)
        if given:
            return Fact[bool](value=True, refs=resection_refs + tuple(given))
        if doubtful:
            return Fact[bool](refs=resection_refs,
                              note=f"records that may be chemotherapy cannot be read: {', '.join(doubtful)}")
        if undated or unplaced:
            why = (f"chemotherapy records without a date: {', '.join(undated)}" if undated else
                   f"chemotherapy after the resection ({', '.join(unplaced)}) but the recurrence date is "
                   "unknown, so it cannot be called adjuvant")
            return Fact[bool](refs=tuple(undated + unplaced), note=why)
        return Fact[bool](value=False, refs=resection_refs,
                          note=f"no chemotherapy recorded after the resection of {resection_day}"
                               + (f" and before the recurrence ({recurrence_day})" if recurrence_day else ""))


def map_features(record: PatientRecord, terminology: Terminology) -> Features:
    """Convenience wrapper: ``FeatureMapper(terminology).map(record)``."""
    return FeatureMapper(terminology).map(record)
