"""FHIR R4 resources of one patient -> tumour features (docs: clinical-basis.md).

Each feature is a :class:`engine.features.Fact` with the references behind it and a
note when it is unknown. The record arrives attributed and strictly read
(:mod:`fhir_adapters.sources.record`); the rules of evidence, in short:

* Only this patient's readable resources are evidence. Unreadable or unattributable
  ones can cast doubt (a fact they may touch can no longer be proven absent), foreign
  ones are ignored; all are named in the warnings.
* Withdrawn records are ignored: Observation entered-in-error / cancelled, Condition
  refuted / entered-in-error or resolved / inactive / remission, Procedure and
  medication records not done.
* The reference resection is the latest completed hepatectomy. A liver-metastasis
  Condition or a measurement dated before it (or on its day) is the initial disease.
  With no resection recorded, measurements older than the recurrence Condition do not
  count, and the result stays preliminary.
* Measurements belong to imaging studies: the report that lists them, the ImagingStudy
  they derive from, else the same instant on the UTC timeline (or the same day for
  dates). A factor shown on any study of the recurrence stays shown (the most lesions
  on one study, the largest size on any); it is absent only when the latest study
  shows it absent and accounts for every lesion seen before (by focus identity, or at
  least as many lesions).
* A measurement counts as a liver lesion when its bodySite, or the location of its
  focus BodyStructure, is the liver; or when it names no site and no specimen in a
  patient with a liver recurrence. Pathology (a ``specimen``, or a pathology method)
  and other sites do not count.
* A value that cannot be used (dataAbsentReason, no value, unknown unit, zero or
  negative) leaves that lesion's size unknown, never zero. Comparators are bounds:
  ``>``/``>=`` a lower bound, ``<``/``<=`` an upper bound. What cannot be placed (an
  undated measurement, a month that straddles the resection) makes count and size
  *lower bounds*: they can still prove a factor present, never absent.
* A newer imaging report with no measurements makes the measurements possibly stale,
  and a technical judgement older than the latest imaging is stale (not assessed).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Literal

from engine.features import Fact, Features
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import CodeList, Terminology
from fhir_adapters.fhir.timeline import When

WITHDRAWN_OBSERVATION = {"entered-in-error", "cancelled"}
WITHDRAWN_REPORT = {"entered-in-error", "cancelled"}
FINAL_OBSERVATION = {"final", "amended", "corrected"}
WITHDRAWN_VERIFICATION = {"refuted", "entered-in-error"}
UNCONFIRMED_VERIFICATION = {"provisional", "differential", "unconfirmed"}
INACTIVE_CLINICAL = {"resolved", "inactive", "remission"}
DONE_PROCEDURE = {"completed"}
GIVEN_ADMINISTRATION = {"completed", "in-progress"}
TAKEN_STATEMENT = {"active", "completed", "stopped"}
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
UCUM = "http://unitsofmeasure.org"


# ----------------------------------------------------------------------------- helpers
def ref(resource: Any) -> str:
    """``Type/id``, with ``/_history/n`` when the resource carries a version."""
    base = f"{resource.get_resource_type()}/{resource.id}"
    version = resource.meta.versionId if resource.meta is not None else None
    return f"{base}/_history/{version}" if version else base


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


# ----------------------------------------------------------------------------- findings
SizeBound = Literal["exact", "at-least", "below", "at-most"]


@dataclass(frozen=True)
class _Event:
    """A dated record that marks a boundary (the reference resection)."""
    when: When
    ref: str


@dataclass
class _Measurement:
    ref: str
    lesion_key: str                 # focus BodyStructure, else the Observation itself
    when: When | None               # its own date, else its report's
    study: str | None               # the study it belongs to (None: cannot be placed)
    size_mm: Decimal | None
    bound: SizeBound
    size_problem: str | None


@dataclass
class _Study:
    key: str
    when: When                      # the span of the study (its measurements and report)
    last: When                      # its latest measurement
    lesions: dict[str, list[_Measurement]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"the study of {self.when.text}" + ("" if self.key.startswith("time:") else f" ({self.key})")


def _upper_of(ms: Iterable[_Measurement]) -> tuple[Decimal, bool] | None:
    """The largest size a lesion (or a set of lesions) may have: (bound, strict), or None
    when one of the measurements has no upper bound."""
    best: tuple[Decimal, bool] | None = None
    for m in ms:
        if m.size_mm is None or m.bound == "at-least":
            return None
        strict = m.bound == "below"
        if best is None or m.size_mm > best[0] or (m.size_mm == best[0] and not strict):
            best = (m.size_mm, strict)
    return best


class FeatureMapper:
    """Maps one :class:`PatientRecord` to :class:`Features` with one terminology."""

    def __init__(self, terminology: Terminology):
        self.t = terminology

    # ------------------------------------------------------------------ entry point
    def map(self, record: PatientRecord) -> Features:
        self.warnings: list[str] = []
        self.record = record
        self._name_what_is_not_evidence(record)
        resection = self._reference_resection(record)
        liver, onset = self._liver_recurrence(record, resection)
        studies, uncertain = self._studies(record, liver.value is True, resection, onset)
        count, size = self._lesions(record, studies, uncertain)
        imaging, latest_imaging = self._imaging_currency(record, studies, uncertain)
        extrahepatic = self._extrahepatic(record)
        technical = self._technical(record, resection, onset, latest_imaging)
        recurrence_when = min((w for w in (onset, studies[0].when if studies else None) if w is not None),
                              key=When.sort_key, default=None)
        adjuvant = self._adjuvant(record, resection, recurrence_when)
        prior = (Fact[bool](value=True, refs=(resection.ref,), note=f"completed liver resection on {resection.when.text}")
                 if resection else Fact[bool](note="no completed liver resection recorded"))
        return Features(
            patient=record.patient_ref, liver_recurrence=liver, tumour_count=count,
            largest_diameter_mm=size, extrahepatic_disease=extrahepatic,
            technical_resectability=technical, adjuvant_chemotherapy=adjuvant,
            prior_liver_resection=prior, imaging_measurements=imaging,
            warnings=tuple(dict.fromkeys(self.warnings)),
        )

    def _ref(self, resource: Any) -> str:
        """Reference of a resource; its Bundle fullUrl when it has no id."""
        if resource.id is None:
            return self.record.full_urls.get(id(resource), f"{resource.get_resource_type()}/(no id)")
        return ref(resource)

    def _name_what_is_not_evidence(self, record: PatientRecord) -> None:
        who = record.patient_ref or "this patient"
        self.warnings.extend(record.notes)
        for u in record.unreadable:
            self.warnings.append(f"{u.ref} is not valid FHIR R4 and was not used: {u.problem}")
        for u in record.unattributable:
            self.warnings.append(f"{u.ref}: unattributable ({u.problem}); not used as evidence for {who}")
        for u in record.foreign:
            self.warnings.append(f"{u.ref} {u.problem}, not {who}; ignored")

    def _distrusted_matching(self, record: PatientRecord, rtype: str, *lists: CodeList) -> list[str]:
        """Unreadable or unattributable resources of a type that may say what ``lists`` mean."""
        return [u.ref for u in record.distrusted
                if u.resource_type == rtype and any(cl.matches_any(u.codings) for cl in lists)]

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

    def _liver_recurrence(self, record: PatientRecord, resection: _Event | None) -> tuple[Fact[bool], When | None]:
        """The liver-recurrence fact, and the onset of the recurrence (its earliest dated
        Condition). A Condition dated before the reference resection is the initial
        disease; one that cannot be placed against it proves nothing."""
        active, unconfirmed, ignored, unplaced, onsets = [], [], [], [], []
        for c in record.conditions:
            if "liver" not in self._metastasis_sites(c):
                continue
            status = self._condition_status(c)
            if status not in ("active", "unconfirmed"):
                ignored.append(self._ref(c))
                continue
            when = When.of_element(c, "onsetDateTime", "onsetPeriod", "recordedDate")
            if resection is not None:
                place = when.relation(resection.when) if when is not None else "uncertain"
                if place == "before":
                    self.warnings.append(
                        f"{self._ref(c)}: liver-metastasis Condition dated {when.text}, before the reference "  # type: ignore[union-attr]
                        f"resection ({resection.when.text}): the initial disease, not the recurrence")
                    ignored.append(self._ref(c))
                    continue
                if place == "uncertain":
                    self.warnings.append(
                        f"{self._ref(c)}: liver-metastasis Condition "
                        + (f"dated {when.text}" if when else "without a date")
                        + f" cannot be placed before or after the reference resection ({resection.when.text})")
                    unplaced.append(self._ref(c))
                    continue
            (active if status == "active" else unconfirmed).append(self._ref(c))
            if status == "active" and when is not None:
                onsets.append(when)
        onset = min(onsets, key=When.sort_key, default=None)
        if active:
            return Fact[bool](value=True, refs=tuple(active)), onset
        unreadable = self._distrusted_matching(record, "Condition", self.t.liver_metastasis_condition,
                                               self.t.metastasis_condition_generic)
        if unconfirmed or unreadable or unplaced:
            parts = []
            if unconfirmed:
                parts.append(f"liver metastasis not confirmed ({', '.join(unconfirmed)})")
            if unplaced:
                parts.append(f"liver metastasis not placed after the resection ({', '.join(unplaced)})")
            if unreadable:
                parts.append(f"liver-metastasis Condition not readable or not attributable ({', '.join(unreadable)})")
            return Fact[bool](value=None, refs=tuple(unconfirmed + unplaced), note="; ".join(parts)), None
        note = "no liver-metastasis Condition in the record"
        if ignored:
            note = ("liver-metastasis Conditions withdrawn, no longer active or before the resection: "
                    f"{', '.join(ignored)}")
        return Fact[bool](value=False, refs=tuple(ignored), note=note), None

    def _extrahepatic(self, record: PatientRecord) -> Fact[bool]:
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
        unreadable = self._distrusted_matching(record, "Condition", self.t.extrahepatic_metastasis_condition,
                                               self.t.metastasis_condition_generic)
        if doubtful or unreadable:
            note = ("extrahepatic metastasis suspected but not confirmed, its site is not coded, or its record "
                    f"is not readable or not attributable: {', '.join(doubtful + unreadable)}")
            return Fact[bool](value=None, refs=tuple(doubtful), note=note)
        note = "no active, confirmed extrahepatic metastasis recorded"
        if ignored:
            note += f" (withdrawn or inactive: {', '.join(ignored)})"
        return Fact[bool](value=False, refs=tuple(ignored), note=note)

    # ------------------------------------------------------------------ resection
    def _reference_resection(self, record: PatientRecord) -> _Event | None:
        """The latest completed hepatectomy."""
        best: _Event | None = None
        for p in record.procedures:
            if p.status not in DONE_PROCEDURE or not self.t.hepatectomy_procedure.matches_any(codings(p.code)):
                continue
            when = When.of_element(p, "performedDateTime", "performedPeriod")
            if when is None:
                self.warnings.append(f"{self._ref(p)}: hepatectomy without a date; not used as the reference resection")
                continue
            if best is None or when.sort_key() > best.when.sort_key():
                best = _Event(when, self._ref(p))
        return best

    # ------------------------------------------------------------------ lesions
    def _size_mm(self, quantity: Any, where: str) -> tuple[Decimal | None, SizeBound, str | None]:
        """(millimetres, what the number is: exact or a bound, problem)."""
        if quantity is None or quantity.value is None:
            return None, "exact", f"{where}: no value"
        if quantity.system not in (None, UCUM):
            return None, "exact", f"{where}: unit system {quantity.system!r} is not UCUM"
        unit = quantity.code or quantity.unit
        factor = self.t.length_units_to_mm.get(unit or "")
        if factor is None:
            return None, "exact", f"{where}: unit {unit!r} is not a known UCUM length unit"
        value = Decimal(quantity.value)
        if not value.is_finite() or value <= 0:
            return None, "exact", f"{where}: size {value} {unit} is not a positive length"
        mm = value * factor
        bounds: dict[str | None, SizeBound] = {None: "exact", "<": "below", "<=": "at-most", ">": "at-least",
                                               ">=": "at-least"}
        if quantity.comparator not in bounds:
            return None, "exact", f"{where}: comparator {quantity.comparator!r} is not an R4 comparator"
        bound = bounds[quantity.comparator]
        limits = self.t.plausible_diameter_mm
        if bound in ("exact", "at-least") and not limits.minimum <= mm <= limits.maximum:
            return None, "exact", (f"{where}: size {value} {unit} is outside the plausible range "
                                   f"{limits.minimum}-{limits.maximum} mm")
        return mm, bound, None

    def _measurement_sizes(self, o: Any) -> list[tuple[Decimal | None, SizeBound, str | None]] | None:
        """Every longest-dimension reading of a tumour-size Observation (each component
        33728-7, and its valueQuantity), or None when it is not one. The Observation is a
        tumour size by its code, as the server search finds it."""
        pairs = codings(o.code)
        if not (self.t.tumour_size_observation.matches_any(pairs) or self.t.longest_dimension.matches_any(pairs)):
            return None
        where = self._ref(o)
        readings = []
        for comp in o.component or []:
            if self.t.longest_dimension.matches_any(codings(comp.code)):
                if comp.dataAbsentReason is not None:
                    readings.append((None, "exact", f"{where}: longest dimension absent ({comp.dataAbsentReason.text or concept_code(comp.dataAbsentReason, DATA_ABSENT)})"))
                else:
                    readings.append(self._size_mm(comp.valueQuantity, where))
        if o.valueQuantity is not None or not readings:
            if o.dataAbsentReason is not None and not readings:
                readings.append((None, "exact", f"{where}: size absent ({o.dataAbsentReason.text or concept_code(o.dataAbsentReason, DATA_ABSENT)})"))
            elif o.valueQuantity is None:
                readings.append((None, "exact", f"{where}: no longest dimension (no component 33728-7 and no valueQuantity)"))
            else:
                readings.append(self._size_mm(o.valueQuantity, where))
        return readings

    def _is_liver_lesion(self, o: Any, record: PatientRecord, liver_recurrence: bool) -> bool:
        if o.specimen is not None or self.t.pathology_method.matches_any(codings(o.method)):
            return False
        site = self._site_is_liver([o.bodySite] if o.bodySite is not None else [])
        for f in o.focus or []:
            target = self.record.canonical(f.reference)
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
            target = self.record.canonical(f.reference)
            if target and self._is_lesion_identity(target):
                return target
        return self._ref(o)

    def _is_lesion_identity(self, key: str) -> bool:
        return key.startswith("BodyStructure/") or key in self.record.body_structures

    def _reports(self, record: PatientRecord) -> tuple[dict[str, str], dict[str, When | None]]:
        """(Observation ref -> its study key, study key -> the report's date) from the
        DiagnosticReports that list measurements as ``result``."""
        study_of: dict[str, str] = {}
        when_of: dict[str, When | None] = {}
        for dr in record.diagnostic_reports:
            if dr.status in WITHDRAWN_REPORT or not self._is_imaging_report(dr):
                continue  # the same reports a server search by category returns
            key = next((self.record.canonical(i.reference) for i in dr.imagingStudy or [] if i.reference), None) or self._ref(dr)
            when_of.setdefault(key, When.of_element(dr, "effectiveDateTime", "effectivePeriod"))
            # an Observation may name its report (derivedFrom / partOf) instead of being listed
            study_of[f"DiagnosticReport:{self.record.canonical(self._ref(dr))}"] = key
            for r in dr.result or []:
                target = self.record.canonical(r.reference)
                if target:
                    study_of[target] = key
        return study_of, when_of

    def _study_link(self, o: Any, study_of: dict[str, str]) -> str | None:
        """The study an Observation names itself: a report that lists it, or an
        ImagingStudy / DiagnosticReport in derivedFrom or partOf."""
        own = self.record.canonical(self._ref(o))
        if own in study_of:
            return study_of[own]
        for link in [*(o.derivedFrom or []), *(o.partOf or [])]:
            target = self.record.canonical(link.reference)
            if target and target.startswith("ImagingStudy/"):
                return target
            if target and target.startswith("DiagnosticReport/"):
                return study_of.get(f"DiagnosticReport:{target}", target)
        return None

    def _studies(self, record: PatientRecord, liver_recurrence: bool, resection: _Event | None,
                 onset: When | None) -> tuple[list[_Study], list[_Measurement]]:
        """The imaging studies of the recurrence, oldest first, and the measurements that
        cannot be placed in one (no date, or a month or year that straddles the
        resection): those can only add lesions."""
        study_of, report_when = self._reports(record)
        self._unplaceable: list[str] = []
        self._uncounted_imaging: list[When] = []   # dated liver imaging not counted (before the onset)
        placed: list[_Measurement] = []
        uncertain: list[_Measurement] = []
        initial: list[str] = []
        for o in record.observations:
            if o.status in WITHDRAWN_OBSERVATION:
                continue
            sizes = self._measurement_sizes(o)
            if sizes is None or not self._is_liver_lesion(o, record, liver_recurrence):
                continue
            link = self._study_link(o, study_of)
            when = When.of_element(o, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
            if when is None and link is not None:
                when = report_when.get(link)
            readings = [_Measurement(self._ref(o), self._lesion_key(o), when, None, *size) for size in sizes]
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
                    self.warnings.append(
                        f"{m.ref}: measured {when.text}, before the liver-recurrence Condition ({onset.text}), with "
                        "no resection recorded: not counted, and count and size are lower bounds")
                    self._unplaceable.append(m.ref)
                    self._uncounted_imaging.append(when)   # still imaging: a judgement older than it is stale
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
            self.warnings.append("measurements before the reference resection (initial disease) not counted: "
                                 + ", ".join(initial))
        studies = self._group_into_studies(placed, report_when)
        for m in uncertain:
            self.warnings.append(f"{m.ref}: tumour measurement that cannot be placed in time "
                                 + (f"({m.when.text})" if m.when else "(no date)")
                                 + "; count and size are lower bounds")
        return sorted(studies.values(), key=lambda s: s.last.sort_key()), uncertain

    def _group_into_studies(self, placed: list[_Measurement], report_when: dict[str, When | None]) -> dict[str, _Study]:
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
        tolerance = dt.timedelta(minutes=self.t.unlinked_study_tolerance_minutes)
        order = sorted(range(len(placed)), key=lambda i: placed[i].when.sort_key())  # type: ignore[union-attr]
        reach: int | None = None  # the measurement reaching furthest so far
        for i in order:
            when = placed[i].when
            assert when is not None
            if reach is not None and placed[reach].when.near(when, tolerance):  # type: ignore[union-attr]
                parent[root(i)] = root(reach)
            if reach is None or when.end > placed[reach].when.end:  # type: ignore[union-attr]
                reach = i
        studies: dict[int, _Study] = {}
        for i in order:
            m = placed[i]
            assert m.when is not None
            r = root(i)
            study = studies.get(r)
            if study is None:
                study = studies[r] = _Study(m.study or f"time:{m.when.key}", m.when, m.when)
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

    def _unaccounted(self, studies: list[_Study]) -> list[str]:
        """Why the latest study does not account for every lesion seen earlier."""
        if len(studies) < 2:
            return []
        latest = studies[-1]
        problems = []
        for s in studies[:-1]:
            for key in s.lesions:
                if self._is_lesion_identity(key) and key not in latest.lesions:
                    problems.append(f"lesion {key} seen on {s.label} is not measured on the latest study "
                                    f"({latest.when.text}): not accounted for")
            if len(latest.lesions) < len(s.lesions):
                problems.append(f"the latest study ({latest.when.text}) measures {len(latest.lesions)} lesion(s), "
                                f"fewer than the {len(s.lesions)} of {s.label}: not accounted for")
        return list(dict.fromkeys(problems))

    def _lesions(self, record: PatientRecord, studies: list[_Study],
                 uncertain: list[_Measurement]) -> tuple[Fact[int], Fact[Decimal]]:
        """Count and largest size over the studies of the recurrence: a factor shown on
        any study stays shown; absence needs the latest study to account for all."""
        distrusted = self._distrusted_matching(record, "Observation", self.t.tumour_size_observation,
                                               self.t.longest_dimension)
        if distrusted:
            self.warnings.append("tumour measurements that cannot be read or attributed: "
                                 f"{', '.join(distrusted)}; count and size are lower bounds")
        distrusted += self._unplaceable
        if not studies and not uncertain:
            note = "no tumour measurement of the liver after the reference resection"
            if distrusted:
                note = f"tumour measurements not readable or not attributable: {', '.join(distrusted)}"
            return Fact[int](note=note), Fact[Decimal](note=note)
        unaccounted = self._unaccounted(studies)
        self.warnings.extend(unaccounted)
        doubt = bool(uncertain or distrusted or unaccounted)
        all_ms = [m for s in studies for ms in s.lesions.values() for m in ms] + uncertain
        refs = tuple(dict.fromkeys(m.ref for m in all_ms))

        # Count: the most distinct lesions on one study (with what cannot be placed, at least
        # as many as the latest study plus those).
        biggest = max(studies, key=lambda s: len(s.lesions), default=None)
        n = len(biggest.lesions) if biggest else 0
        if uncertain:
            n = max(n, len(set(studies[-1].lesions if studies else ()) | {m.lesion_key for m in uncertain}))
        where = f"on {biggest.label}" if biggest else "(not placed in time)"
        count = Fact[int](value=n, refs=refs, lower_bound=doubt,
                          note=f"{n} distinct lesion(s) {where}" + ("; at least this many" if doubt else "")
                               + (f" ({'; '.join(unaccounted)})" if unaccounted else ""))

        # Size: the largest any measurement shows (can prove >= t), and the largest any
        # lesion may be (can prove < t only when nothing is in doubt).
        lows = [m.size_mm for m in all_ms if m.size_mm is not None and m.bound in ("exact", "at-least")]
        problems = list(dict.fromkeys(m.size_problem for m in all_ms if m.size_problem))
        self.warnings.extend(problems)
        upper = None if doubt or problems else _upper_of(all_ms)
        low = max(lows, default=None)
        if low is None and upper is None:
            return count, Fact[Decimal](refs=refs, note="; ".join(problems + unaccounted) or "no lesion size recorded")
        span = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} of the recurrence"
        if upper is not None and low is not None and upper == (low, False):
            return count, Fact[Decimal](value=low, refs=refs, note=f"largest lesion on {span}")
        note = f"largest lesion on {span}"
        if low is not None:
            note += f": at least {low} mm"
        if upper is not None:
            note += f"; {'below' if upper[1] else 'at most'} {upper[0]} mm"
        why = problems + unaccounted + (["a measurement could not be placed, read or attributed"]
                                        if uncertain or distrusted else [])
        if why:
            note += " (" + "; ".join(why) + ")"
        return count, Fact[Decimal](value=low, refs=refs, lower_bound=low is not None,
                                    at_most=upper[0] if upper else None,
                                    at_most_strict=upper[1] if upper else False, note=note)

    # ------------------------------------------------------------------ imaging currency
    def _imaging_currency(self, record: PatientRecord, studies: list[_Study],
                          uncertain: list[_Measurement]) -> tuple[Fact[bool], When | None]:
        """Whether the latest imaging report has the structured measurements used (False:
        a newer report has text only), and the latest moment of imaging of the recurrence
        (any measurement, its report, or a newer report): a technical judgement must not
        be older than that."""
        points = [m.when for s in studies for ms in s.lesions.values() for m in ms if m.when is not None]
        points += [s.when for s in studies] + [m.when for m in uncertain if m.when is not None]
        points += self._uncounted_imaging
        if not studies:
            return Fact[bool](value=True), max(points, key=lambda w: w.start, default=None)
        latest = max((s.when for s in studies), key=lambda w: w.end)
        measured = {self.record.canonical(m.ref) for s in studies for ms in s.lesions.values() for m in ms}
        newer = []
        for dr in record.diagnostic_reports:
            if dr.status in WITHDRAWN_REPORT or not self._is_imaging_report(dr):
                continue
            when = When.of_element(dr, "effectiveDateTime", "effectivePeriod") or When.of(dr.issued)
            if when is None or not when.after(latest):
                continue
            if any(self.record.canonical(r.reference) in measured for r in dr.result or []):
                continue
            newer.append(self._ref(dr))
            points.append(when)
            self.warnings.append(f"{self._ref(dr)}: imaging report of {when.text} is newer than the latest tumour "
                                 f"measurements ({latest.text}) and has no structured measurements; the "
                                 "measurements may be stale and the result stays preliminary")
        # An imaging report that cannot be read or attributed may be the newest one.
        for ref in self._distrusted_matching(record, "DiagnosticReport", self.t.radiology_report_category):
            newer.append(ref)
            self.warnings.append(f"{ref}: an imaging report that cannot be read or attributed may be newer than the "
                                 "latest tumour measurements; the measurements may be stale and the result stays "
                                 "preliminary")
        newest = max(points, key=lambda w: w.start)
        if newer:
            return Fact[bool](value=False, refs=tuple(newer),
                              note=f"newer imaging report(s) without measurements: {', '.join(newer)}"), newest
        return Fact[bool](value=True, note=f"latest measured study {latest.text}"), newest

    def _is_imaging_report(self, dr: Any) -> bool:
        return self.t.radiology_report_category.matches_any(codings(*(dr.category or [])))

    # ------------------------------------------------------------------ technical judgement
    def _technical(self, record: PatientRecord, resection: _Event | None, onset: When | None,
                   latest_imaging: When | None) -> Fact:
        """The care team's latest technical judgement of the recurrence. One dated before
        the latest imaging is stale (a new scan never inherits an old "final"); one that
        cannot be dated against the imaging is not used either."""
        judgements: list[tuple[When, str | None, str]] = []
        stale: list[str] = []
        for o in record.observations:
            if o.status in WITHDRAWN_OBSERVATION:
                continue
            if not self.t.technical_resectability_observation.matches_any(codings(o.code)):
                continue
            if o.status not in FINAL_OBSERVATION:
                self.warnings.append(f"{self._ref(o)}: technical resectability assessment is {o.status}, "
                                     "not final; not used")
                continue
            when = When.of_element(o, "effectiveDateTime", "effectivePeriod", "effectiveInstant")
            if when is not None and resection is not None and when.relation(resection.when) != "after":
                self.warnings.append(f"{self._ref(o)}: technical resectability assessment of {when.text} is not after "
                                     f"the reference resection ({resection.when.text}): about the initial disease, "
                                     "not used")
                continue
            if when is not None and resection is None and onset is not None and when.end <= onset.start:
                self.warnings.append(f"{self._ref(o)}: technical resectability assessment of {when.text} is before the "
                                     f"liver-recurrence Condition ({onset.text}) with no resection recorded: not "
                                     "about this recurrence, not used")
                stale.append(self._ref(o))
                continue
            if when is None:
                self.warnings.append(f"{self._ref(o)}: technical resectability assessment without a date; "
                                     "it cannot be shown to be current, so it is not used")
                stale.append(self._ref(o))
                continue
            if latest_imaging is not None and when.start < latest_imaging.start:
                self.warnings.append(f"{self._ref(o)}: technical resectability assessment of {when.text} is older "
                                     f"than the latest imaging ({latest_imaging.text}): stale, treated as not assessed")
                stale.append(self._ref(o))
                continue
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
            judgements.append((when, value, self._ref(o)))
        fact = self._current_judgement(judgements, stale)
        # One that cannot be attributed or read may be newer and say "unresectable".
        doubt = [u.ref for u in record.distrusted if u.resource_type == "Observation"
                 and self.t.technical_resectability_observation.matches_any(u.codings)
                 and not self._says_resectable(u)]
        if doubt and fact.value != "unresectable":
            return Fact(value="in-doubt", refs=(*fact.refs, *doubt),
                        note=("technical resectability assessment(s) that cannot be attributed or read may record the "
                              f"recurrence as unresectable: {', '.join(doubt)}"))
        return fact

    def _says_resectable(self, u: Any) -> bool:
        """A distrusted judgement that plainly says "resectable" (as written) cannot hide an
        "unresectable": ignoring it is safe. Anything else may say "unresectable"."""
        if self.t.technically_unresectable_value.matches_any(u.codings):
            return False
        return (u.value_boolean is True or str(u.value_boolean).strip().lower() == "true"
                or self.t.technically_resectable_value.matches_any(u.codings))

    def _current_judgement(self, judgements: list[tuple[When, str | None, str]], stale: list[str]) -> Fact:
        usable = [j for j in judgements if j[1] is not None]
        if not usable:
            note = "no technical resectability assessment recorded after the reference resection"
            if stale:
                note = f"technical resectability assessments older than the latest imaging or undated: {', '.join(stale)}"
            return Fact(note=note, refs=tuple(j[2] for j in judgements))
        newest = max(usable, key=lambda j: j[0].sort_key())[0]
        latest = [j for j in usable if not newest.after(j[0])]
        values = {j[1] for j in latest}
        refs = tuple(j[2] for j in latest)
        if len(values) > 1:
            self.warnings.append(f"conflicting technical resectability assessments: {', '.join(refs)}")
            return Fact(refs=refs, note="conflicting technical resectability assessments at the same time")
        return Fact(value=values.pop(), refs=refs)

    # ------------------------------------------------------------------ chemotherapy
    def _chemo_records(self, record: PatientRecord) -> tuple[list[tuple[When | None, str]], list[str]]:
        """(dated chemotherapy records, records that might be chemotherapy but cannot be
        read or attributed)."""
        found, doubtful = [], []
        for p in record.procedures:
            if p.status in ("completed", "in-progress") and self.t.chemotherapy_procedure.matches_any(codings(p.code)):
                found.append((When.of_element(p, "performedDateTime", "performedPeriod"), self._ref(p)))
        for statuses, items in ((GIVEN_ADMINISTRATION, record.medication_administrations),
                                (TAKEN_STATEMENT, record.medication_statements)):
            for m in items:
                if m.status not in statuses:
                    continue
                concept = m.medicationCodeableConcept
                if concept is None and m.medicationReference is not None:
                    med = record.medications.get(self.record.canonical(m.medicationReference.reference) or "")
                    if med is None:
                        doubtful.append(f"{self._ref(m)} (medication {m.medicationReference.reference} not found)")
                        continue
                    concept = med.code
                if concept is not None and self.t.chemotherapy_medication.matches_any(codings(concept)):
                    found.append((When.of_element(m, "effectiveDateTime", "effectivePeriod"), self._ref(m)))
        for rtype in ("Procedure", "MedicationAdministration", "MedicationStatement"):
            doubtful += self._distrusted_matching(record, rtype, self.t.chemotherapy_procedure,
                                                  self.t.chemotherapy_medication)
        return found, doubtful

    def _adjuvant(self, record: PatientRecord, resection: _Event | None, recurrence: When | None) -> Fact[bool]:
        if resection is None:
            return Fact[bool](note="no completed hepatectomy recorded, so no adjuvant window")
        given, undated, unplaced = [], [], []
        records, doubtful = self._chemo_records(record)
        for when, r in records:
            if when is None:
                undated.append(r)
            elif when.after(resection.when) and recurrence is None:
                unplaced.append(r)  # after the resection, but the recurrence date is unknown
            elif when.after(resection.when) and recurrence.after(when):  # type: ignore[union-attr]
                given.append(r)
        if given:
            return Fact[bool](value=True, refs=(resection.ref, *given))
        if doubtful:
            return Fact[bool](refs=(resection.ref,),
                              note=f"records that may be chemotherapy cannot be read or attributed: {', '.join(doubtful)}")
        if undated or unplaced:
            why = (f"chemotherapy records without a date: {', '.join(undated)}" if undated else
                   f"chemotherapy after the resection ({', '.join(unplaced)}) but the recurrence date is "
                   "unknown, so it cannot be called adjuvant")
            return Fact[bool](refs=tuple(undated + unplaced), note=why)
        return Fact[bool](value=False, refs=(resection.ref,),
                          note=f"no chemotherapy recorded after the resection of {resection.when.text}"
                               + (f" and before the recurrence ({recurrence.text})" if recurrence else ""))


def map_features(record: PatientRecord, terminology: Terminology) -> Features:
    """Convenience wrapper: ``FeatureMapper(terminology).map(record)``."""
    return FeatureMapper(terminology).map(record)
