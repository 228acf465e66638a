"""One patient's resources, validated once with the R4B models.

A resource that does not validate is not dropped in silence: it is kept as an
:class:`Unreadable` with the problem and its raw codes, so the mapping can turn the
facts it might have changed into "unknown" (an unreadable 60 mm lesion must not let a
patient look resectable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from engine.yamlfile import describe_validation_error

# Resource types the mapping reads; anything else is carried along but not validated.
MAPPED_TYPES = (
    "Patient", "Observation", "Condition", "Procedure", "MedicationAdministration",
    "MedicationStatement", "Medication", "BodyStructure",
)


@dataclass(frozen=True)
class Unreadable:
    """A resource of a mapped type that is not valid R4, with what could still be read."""

    ref: str
    resource_type: str
    problem: str
    codings: tuple[tuple[str | None, str | None], ...]


def raw_codings(raw: dict, *paths: str) -> tuple[tuple[str | None, str | None], ...]:
    """(system, code) pairs found at ``paths`` of a raw resource, read defensively.

    >>> raw_codings({"code": {"coding": [{"system": "s", "code": "c"}, "junk"]}}, "code")
    (('s', 'c'),)
    """
    found = []
    for path in paths:
        node: Any = raw.get(path) if isinstance(raw, dict) else None
        concepts = node if isinstance(node, list) else [node]
        for concept in concepts:
            if isinstance(concept, dict) and isinstance(concept.get("coding"), list):
                for c in concept["coding"]:
                    if isinstance(c, dict):
                        s, v = c.get("system"), c.get("code")
                        found.append((s if isinstance(s, str) else None, v if isinstance(v, str) else None))
    return tuple(found)


def reference_of(raw: dict) -> str:
    rtype = raw.get("resourceType") if isinstance(raw.get("resourceType"), str) else "Resource"
    rid = raw.get("id")
    return f"{rtype}/{rid}" if isinstance(rid, str) and rid else f"{rtype}/(no id)"


@dataclass
class PatientRecord:
    """The typed resources of one patient, by type, plus the unreadable ones."""

    patient: Any | None = None
    subject: str | None = None  # "Patient/id" when known without a Patient resource
    observations: list = field(default_factory=list)
    conditions: list = field(default_factory=list)
    procedures: list = field(default_factory=list)
    medication_administrations: list = field(default_factory=list)
    medication_statements: list = field(default_factory=list)
    medications: dict[str, Any] = field(default_factory=dict)
    body_structures: dict[str, Any] = field(default_factory=dict)
    unreadable: list[Unreadable] = field(default_factory=list)
    # fullUrl of resources that have no id (transaction Bundles with urn:uuid), by id(model)
    full_urls: dict[int, str] = field(default_factory=dict)

    @property
    def patient_ref(self) -> str | None:
        if self.patient is not None:
            if self.patient.id:
                return f"Patient/{self.patient.id}"
            return self.full_urls.get(id(self.patient), self.subject)
        return self.subject

    @classmethod
    def from_resources(cls, resources: Iterable[dict]) -> "PatientRecord":
        record = cls()
        for raw in resources:
            record.add(raw)
        return record

    def add(self, raw: dict, full_url: str | None = None) -> None:
        rtype = raw.get("resourceType") if isinstance(raw, dict) else None
        if rtype not in MAPPED_TYPES:
            return
        try:
            model = get_fhir_model_class(rtype).model_validate(raw)
        except (ValidationError, RecursionError) as exc:
            problem = ("nested too deeply to validate" if isinstance(exc, RecursionError)
                       else "; ".join(describe_validation_error(exc)[:3]))
            codings = raw_codings(raw, "code", "bodySite", "medicationCodeableConcept", "location")
            for comp in raw.get("component", []) if isinstance(raw.get("component"), list) else []:
                codings += raw_codings(comp, "code") if isinstance(comp, dict) else ()
            where = reference_of(raw)
            if where.endswith("/(no id)") and full_url:
                where = full_url
            self.unreadable.append(Unreadable(where, rtype, problem, codings))
            return
        if model.id is None and full_url:
            self.full_urls[id(model)] = full_url
        self._file(rtype, model)

    def _file(self, rtype: str, model: Any) -> None:
        if rtype == "Patient":
            if self.patient is None:
                self.patient = model
        elif rtype == "Observation":
            self.observations.append(model)
        elif rtype == "Condition":
            self.conditions.append(model)
        elif rtype == "Procedure":
            self.procedures.append(model)
        elif rtype == "MedicationAdministration":
            self.medication_administrations.append(model)
        elif rtype == "MedicationStatement":
            self.medication_statements.append(model)
        elif rtype == "Medication":
            self.medications[f"Medication/{model.id}"] = model
        elif rtype == "BodyStructure":
            self.body_structures[f"BodyStructure/{model.id}"] = model
