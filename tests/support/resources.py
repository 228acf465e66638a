"""Small builders of FHIR R4 resources and Bundles for the mapping tests.

Every builder returns a plain JSON-like ``dict`` (what a Bundle entry holds), so a test
can still damage it before it is read. Ids are unique unless one is given (``id=``).

    >>> o = tumour_size("p1", mm=20)
    >>> o["component"][0]["valueQuantity"]["value"]
    20
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

from engine.classify import Classification, Engine
from engine.features import Features
from fhir_adapters.fhir.codec import loads
from fhir_adapters.sources.bundle import record_from_bundle
from fhir_adapters.features.mapping import map_features
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology, load_terminology

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
DAR = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
CLM_OBS = "https://clm-stratify.org/fhir/CodeSystem/clm-observation"
CLM_TR = "https://clm-stratify.org/fhir/CodeSystem/technical-resectability"

LIVER_MET = "94381002"
METASTATIC_GENERIC = "128462008"
LUNG_MET = "94391008"
BONE_MET = "94222008"
PATHOLOGY_METHOD = "787377000"
CT_METHOD = "77477000"
OXALIPLATIN = "32592"

SITES = {
    "liver": "10200004",
    "liver-segment-v": "277959000",
    "liver-right-lobe": "48521005",
    "lung": "39607008",
    "breast": "76752008",
}

RESECTION_DAY = "2023-03-10"   # default hepatectomy date used by the tests
IMAGING_DAY = "2024-05-01"     # default recurrence imaging date

_ids = itertools.count(1)


def _id(prefix: str, given: str | None) -> str:
    return given if given is not None else f"{prefix}-{next(_ids)}"


def subject(pid: str) -> dict:
    return {"reference": f"Patient/{pid}"}


def concept(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def site(name: str | dict | None) -> dict | None:
    """A CodeableConcept for a named site ("liver", "lung", ...), or a given concept."""
    if name is None or isinstance(name, dict):
        return name
    return concept(SCT, SITES[name])


def _meta(resource: dict, version: str | None) -> dict:
    if version is not None:
        resource["meta"] = {"versionId": version}
    return resource


# ----------------------------------------------------------------------------- resources
def patient(pid: str = "p1") -> dict:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": "Test", "given": ["Pat"]}]}


def condition(pid: str, code: str, system: str = SCT, *, verification: str | None = "confirmed",
              clinical: str | None = "active", body_site: Any = None, onset: str | None = "2024-05-10",
              id: str | None = None, version: str | None = None) -> dict:
    res: dict = {"resourceType": "Condition", "id": _id("cond", id), "code": concept(system, code),
                 "subject": subject(pid)}
    if clinical is not None:
        res["clinicalStatus"] = concept(CLIN, clinical)
    if verification is not None:
        res["verificationStatus"] = concept(VER, verification)
    if body_site is not None:
        sites = body_site if isinstance(body_site, list) else [body_site]
        res["bodySite"] = [site(s) for s in sites]
    if onset is not None:
        res["onsetDateTime"] = onset
    return _meta(res, version)


def liver_met(pid: str, *, verification: str | None = "confirmed", clinical: str | None = "active",
              code: str = LIVER_MET, system: str = SCT, onset: str | None = "2024-05-10",
              id: str | None = None, version: str | None = None) -> dict:
    """A liver-metastasis Condition (SNOMED 94381002 by default)."""
    return condition(pid, code, system, verification=verification, clinical=clinical, onset=onset,
                     id=id, version=version)


def extrahepatic(pid: str, code: str = LUNG_MET, system: str = SCT, verification: str | None = "confirmed",
                 clinical: str | None = "active", *, body_site: Any = None, id: str | None = None,
                 onset: str | None = "2024-05-10") -> dict:
    """A metastasis Condition outside the liver (lung, SNOMED, by default)."""
    return condition(pid, code, system, verification=verification, clinical=clinical,
                     body_site=body_site, onset=onset, id=id)


def body_structure(pid: str, location: Any = "liver", *, id: str | None = None) -> dict:
    res: dict = {"resourceType": "BodyStructure", "id": _id("bs", id), "patient": subject(pid)}
    if location is not None:
        res["location"] = site(location)
    return res


def quantity(value: Any, unit: str | None = "mm", comparator: str | None = None) -> dict:
    q: dict = {"value": value}
    if unit is not None:
        q.update({"unit": unit, "system": UCUM, "code": unit})
    if comparator is not None:
        q["comparator"] = comparator
    return q


_NOT_GIVEN = object()


def tumour_size(pid: str, mm: Any = None, *, value: Any = _NOT_GIVEN, unit: str | None = "mm",
                day: str | None = IMAGING_DAY, focus: str | None = None, body_site: Any = "liver",
                status: str = "final", component: bool = True, data_absent: str | None = None,
                comparator: str | None = None, specimen: str | None = None, method: str | None = None,
                id: str | None = None, version: str | None = None, effective: dict | None = None) -> dict:
    """A tumour-size Observation.

    ``component=True``: mCODE TumorSize (code 21889-1, component 33728-7); ``False``:
    plain style (code 33728-7 with valueQuantity). ``mm`` is a size in millimetres;
    ``value`` (with ``unit``) any raw value, even a wrong JSON type. ``data_absent``:
    "component" or "observation" puts a dataAbsentReason there instead of a value.
    ``focus`` is a BodyStructure id (or a full reference containing "/").
    ``effective`` replaces effectiveDateTime (e.g. {"effectivePeriod": {...}}).
    """
    raw_value = mm if value is _NOT_GIVEN else value
    res: dict = {"resourceType": "Observation", "id": _id("obs", id), "status": status,
                 "subject": subject(pid)}
    absent = concept(DAR, "unknown")
    if component:
        res["code"] = concept(LOINC, "21889-1", "Size Tumor")
        comp: dict = {"code": concept(LOINC, "33728-7")}
        if data_absent == "component":
            comp["dataAbsentReason"] = absent
        elif data_absent != "observation":
            comp["valueQuantity"] = quantity(raw_value, unit, comparator)
        res["component"] = [comp]
        if data_absent == "observation":
            res["dataAbsentReason"] = absent
            del res["component"]
    else:
        res["code"] = concept(LOINC, "33728-7")
        if data_absent:
            res["dataAbsentReason"] = absent
        else:
            res["valueQuantity"] = quantity(raw_value, unit, comparator)
    if effective is not None:
        res.update(effective)
    elif day is not None:
        res["effectiveDateTime"] = day
    if body_site is not None:
        res["bodySite"] = site(body_site)
    if focus is not None:
        res["focus"] = [{"reference": focus if "/" in focus else f"BodyStructure/{focus}"}]
    if specimen is not None:
        res["specimen"] = {"reference": f"Specimen/{specimen}"}
    if method is not None:
        res["method"] = concept(SCT, method)
    return _meta(res, version)


def hepatectomy(pid: str, day: str | None = RESECTION_DAY, *, status: str = "completed", code: str = "107963000",
                id: str | None = None) -> dict:
    res: dict = {"resourceType": "Procedure", "id": _id("proc", id), "status": status,
                 "code": concept(SCT, code), "subject": subject(pid)}
    if day is not None:
        res["performedDateTime"] = day
    return res


def medication(code: str = OXALIPLATIN, system: str = RXNORM, *, id: str | None = None) -> dict:
    return {"resourceType": "Medication", "id": _id("med", id), "code": concept(system, code)}


def chemo_admin(pid: str, day: str | None = "2023-06-01", *, code: str = OXALIPLATIN, system: str = RXNORM,
                status: str = "completed", kind: str = "administration", medication_ref: str | None = None,
                id: str | None = None) -> dict:
    """A MedicationAdministration (``kind="administration"``) or MedicationStatement
    (``kind="statement"``) of a chemotherapy drug (oxaliplatin by default)."""
    rtype = "MedicationAdministration" if kind == "administration" else "MedicationStatement"
    res: dict = {"resourceType": rtype, "id": _id("chemo", id), "status": status, "subject": subject(pid)}
    if medication_ref is not None:
        res["medicationReference"] = {"reference": medication_ref}
    else:
        res["medicationCodeableConcept"] = concept(system, code)
    if day is not None:
        res["effectiveDateTime"] = day
    elif kind == "administration":
        # effective[x] is required on MedicationAdministration: an empty period, no date.
        res["effectivePeriod"] = {}
    return res


def technical(pid: str, value: str | bool | None, day: str | None = "2024-05-20", *, status: str = "final",
              id: str | None = None) -> dict:
    """The care team's technical-resectability Observation: "resectable" / "unresectable"
    as valueCodeableConcept, or True / False as valueBoolean."""
    res: dict = {"resourceType": "Observation", "id": _id("tech", id), "status": status,
                 "code": concept(CLM_OBS, "technical-resectability"), "subject": subject(pid)}
    if isinstance(value, bool):
        res["valueBoolean"] = value
    elif value is not None:
        res["valueCodeableConcept"] = concept(CLM_TR, value)
    if day is not None:
        res["effectiveDateTime"] = day
    return res


def bundle(*resources: dict, type: str = "collection", request: bool = False) -> dict:
    entries = []
    for r in resources:
        entry: dict = {"fullUrl": f"https://example.org/fhir/{r['resourceType']}/{r.get('id')}", "resource": r}
        if request:
            entry["request"] = {"method": "PUT", "url": f"{r['resourceType']}/{r.get('id')}"}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": type, "entry": entries}


# ----------------------------------------------------------------------------- running
_TERMINOLOGY: Terminology | None = None


def terminology() -> Terminology:
    global _TERMINOLOGY
    if _TERMINOLOGY is None:
        _TERMINOLOGY = load_terminology()
    return _TERMINOLOGY


def _json_default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return float(o)  # repr of a float is the shortest round trip: 0.05 -> "0.05"
    raise TypeError(type(o).__name__)


def via_json(resources: list[dict] | tuple[dict, ...]) -> list[dict]:
    """The resources written as JSON text and read back the way the CLI reads a file
    (numbers as Decimal)."""
    return loads(json.dumps(list(resources), default=_json_default))


def record(*resources: dict, json_roundtrip: bool = True) -> PatientRecord:
    res = via_json(resources) if json_roundtrip else list(resources)
    return PatientRecord.from_resources(res)


def features(*resources: dict, json_roundtrip: bool = True) -> Features:
    return map_features(record(*resources, json_roundtrip=json_roundtrip), terminology())


def classify(*resources: dict, json_roundtrip: bool = True) -> Classification:
    return Engine.default().classify(features(*resources, json_roundtrip=json_roundtrip))


def classify_bundle(data: dict) -> Classification:
    return Engine.default().classify(map_features(record_from_bundle(data), terminology()))
