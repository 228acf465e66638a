"""The rules of evidence shared by every fact (docs: clinical-basis.md).

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

This module holds what more than one fact uses: the status sets that say what a
record withdraws, the :class:`MappingContext` of one mapping (record, terminology,
warnings), references and codings (:func:`matches`: a code list's answer, remembered),
the fact classes :class:`~engine.features.Features` holds, the "distrusted resources may
cast doubt" helper, and the status and sites of metastasis Conditions. Each fact is decided in its own
module; :mod:`fhir_adapters.features.mapping` calls them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.features import Features
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import CodeList, Terminology

# The fact classes Features holds (Features takes an instance of its own class as it
# is; any other parametrisation of Fact it validates again).
BoolFact = Features.model_fields["liver_recurrence"].annotation
CountFact = Features.model_fields["tumour_count"].annotation
SizeFact = Features.model_fields["largest_diameter_mm"].annotation
JudgementFact = Features.model_fields["technical_resectability"].annotation

# ----------------------------------------------------------------------------- statuses
WITHDRAWN_OBSERVATION = {"entered-in-error", "cancelled"}
WITHDRAWN_REPORT = {"entered-in-error", "cancelled"}
FINAL_OBSERVATION = {"final", "amended", "corrected"}
WITHDRAWN_VERIFICATION = {"refuted", "entered-in-error"}
UNCONFIRMED_VERIFICATION = {"provisional", "differential", "unconfirmed"}
INACTIVE_CLINICAL = {"resolved", "inactive", "remission"}
DONE_PROCEDURE = {"completed"}                      # the reference resection
GIVEN_PROCEDURE = {"completed", "in-progress"}      # a chemotherapy Procedure
GIVEN_ADMINISTRATION = {"completed", "in-progress"}
TAKEN_STATEMENT = {"active", "completed", "stopped"}
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


# ----------------------------------------------------------------------------- references, codes
def ref(resource: Any) -> str:
    """``Type/id``, with ``/_history/n`` when the resource carries a version."""
    base = f"{resource.get_resource_type()}/{resource.id}"
    version = resource.meta.versionId if resource.meta is not None else None
    return f"{base}/_history/{version}" if version else base


def codings(*concepts: Any) -> list[tuple[str | None, str | None]]:
    if len(concepts) == 1:
        coding = concepts[0].coding if concepts[0] is not None else None
        return [(c.system, c.code) for c in coding] if coding else []
    out = []
    for concept in concepts:
        for c in (concept.coding or []) if concept is not None else []:
            out.append((c.system, c.code))
    return out


_ANSWERS: dict[int, tuple[CodeList, dict[tuple[Any, Any], bool]]] = {}
_MAX_ANSWERS = 1 << 16


def matches(code_list: CodeList, pairs: Iterable[tuple[str | None, str | None]]) -> bool:
    """``code_list.matches_any(pairs)``, each (system, code) asked once per code list
    (the answer is remembered; code lists are frozen).

    >>> from fhir_adapters.terminology import load_terminology
    >>> matches(load_terminology().liver_site, [("http://snomed.info/sct", "10200004")])
    True
    """
    entry = _ANSWERS.get(id(code_list))
    if entry is None or entry[0] is not code_list:
        if len(_ANSWERS) > 256:
            _ANSWERS.clear()
        entry = _ANSWERS[id(code_list)] = (code_list, {})
    answers = entry[1]
    for pair in pairs:
        hit = answers.get(pair)
        if hit is None:
            if len(answers) >= _MAX_ANSWERS:
                answers.clear()
            hit = answers[pair] = code_list.matches(*pair)
        if hit:
            return True
    return False


def concept_code(concept: Any, system: str) -> str | None:
    for s, c in codings(concept):
        if s == system:
            return c
    return None


# ----------------------------------------------------------------------------- one mapping
@dataclass
class MappingContext:
    """What one mapping of one record shares between the facts: the record, the
    terminology, and the warnings collected so far (in order; duplicates are removed at
    the end)."""

    record: PatientRecord
    terminology: Terminology
    warnings: list[str] = field(default_factory=list)
    _refs: dict[int, str] = field(default_factory=dict)

    def ref(self, resource: Any) -> str:
        """Reference of a resource; its Bundle fullUrl when it has no id."""
        found = self._refs.get(id(resource))
        if found is None:
            if resource.id is None:
                found = self.record.full_urls.get(id(resource), f"{resource.get_resource_type()}/(no id)")
            else:
                found = ref(resource)
            self._refs[id(resource)] = found
        return found

    def distrusted_matching(self, rtype: str, *lists: CodeList) -> list[str]:
        """Unreadable or unattributable resources of a type that may say what ``lists``
        mean: they may cast doubt on a fact, never prove it."""
        record = self.record
        if not record.unreadable and not record.unattributable:
            return []
        return [u.ref for u in record.distrusted
                if u.resource_type == rtype and any(matches(cl, u.codings) for cl in lists)]


def name_what_is_not_evidence(ctx: MappingContext) -> None:
    """Warn about every resource that is not evidence: unreadable, unattributable,
    foreign, and what the source itself could not provide."""
    record = ctx.record
    who = record.patient_ref or "this patient"
    ctx.warnings.extend(record.notes)
    for u in record.unreadable:
        ctx.warnings.append(f"{u.ref} is not valid FHIR R4 and was not used: {u.problem}")
    for u in record.unattributable:
        ctx.warnings.append(f"{u.ref}: unattributable ({u.problem}); not used as evidence for {who}")
    for u in record.foreign:
        ctx.warnings.append(f"{u.ref} {u.problem}, not {who}; ignored")


# ----------------------------------------------------------------------------- conditions
def condition_status(c: Any) -> str:
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


def site_is_liver(terminology: Terminology, concepts: Iterable[Any]) -> bool | None:
    """True (liver), False (another site), None (no coded site)."""
    pairs = codings(*concepts)
    if not pairs:
        return None
    return matches(terminology.liver_site, pairs)


def metastasis_sites(terminology: Terminology, c: Any) -> set[str]:
    """Sites of a metastasis Condition: any of 'liver', 'extrahepatic', 'unknown-site'
    (empty when it is not a metastasis). A generic metastasis code takes its sites
    from bodySite, each site on its own (liver and lung is both)."""
    pairs = codings(c.code)
    sites = set()
    if matches(terminology.liver_metastasis_condition, pairs):
        sites.add("liver")
    if matches(terminology.extrahepatic_metastasis_condition, pairs):
        sites.add("extrahepatic")
    if matches(terminology.metastasis_condition_generic, pairs):
        for site in c.bodySite or [None]:
            is_liver = site_is_liver(terminology, [site] if site is not None else [])
            sites.add({True: "liver", False: "extrahepatic", None: "unknown-site"}[is_liver])
    return sites
