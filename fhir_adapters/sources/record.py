"""One patient's resources, attributed and validated once.

Every resource that enters a record is sorted here, at the boundary, into exactly one
of:

* **evidence**: this patient's (see :mod:`fhir_adapters.fhir.reference`) and readable, as a
  typed model in the lists below;
* **unattributable**: it cannot be shown to be this patient's (identifier or display
  only, unresolvable reference, a Group, no subject): kept with its raw codes, so the
  mapping can let it cast doubt (never prove a factor absent) without crediting it;
* **unreadable**: this patient's but not valid R4 where the mapping reads it, or
  strictly unreadable: a JSON string where FHIR requires a number or a boolean
  (fhir.resources would quietly turn ``"value": "18"`` into 18), a number where it
  requires a boolean or a dateTime. Kept with its raw codes, like the unattributable ones;
* **foreign**: evidently someone else's (another Patient, another identifier): ignored,
  and named.

Nothing is dropped without a trace: the mapping names all but the evidence in its
warnings.

**What is validated** (:func:`read_resource`). The fast models of
:mod:`fhir_adapters.sources.models` validate exactly the elements the mapping and the
attribution read (``models.READ``), as strictly as fhir.resources' R4B models or more,
and reject element names R4B does not define. **Elements the mapping does not read are
not validated**: a resource invalid only there (a bad ``identifier``, ``note``,
``extension``, ``contained`` resource, Patient ``birthDate``...) is evidence, where the
full R4B models made it unreadable. That is safe for the mapping, which never looks
there, and it is most of what the fast models save. What the fast models cannot
decide or reject is decided by the full R4B models, which give the message for an
unreadable resource (the one users always saw); ``full_models=True`` uses the R4B
models alone (the reference; tests/unit/test_fast_models.py checks both paths agree).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ValidationError

from engine.yamlfile import describe_validation_error
from fhir_adapters.fhir.reference import (SHARED_TYPES, SUBJECT_ELEMENTS, Attribution, PatientIdentity, Reference,
                                          patient_of, plain_ref)
from fhir_adapters.sources.models import NotRead
from fhir_adapters.sources.models import read as fast_read

# Resource types the mapping reads; anything else is carried along but not validated.
MAPPED_TYPES = (
    "Patient", "Observation", "Condition", "Procedure", "MedicationAdministration",
    "MedicationStatement", "Medication", "BodyStructure", "DiagnosticReport",
)
# Where a distrusted resource's codes are, so the mapping knows what it may have said.
CODED_ELEMENTS = ("code", "bodySite", "medicationCodeableConcept", "location", "category", "valueCodeableConcept")


@dataclass(frozen=True)
class Distrusted:
    """A resource that is not evidence (unreadable or unattributable), with what could
    still be read of it: its type, codes and why it is not used."""

    ref: str
    resource_type: str
    problem: str
    codings: tuple[tuple[str | None, str | None], ...]   # value codes included
    value_boolean: object = None                         # ``valueBoolean`` as written (any JSON type)

    @classmethod
    def of(cls, ref: str, rtype: str, problem: str, raw: dict) -> "Distrusted":
        return cls(ref, rtype, problem, all_raw_codings(raw), raw.get("valueBoolean"))


Unreadable = Distrusted  # the name the first wave used


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


def all_raw_codings(raw: dict) -> tuple[tuple[str | None, str | None], ...]:
    codings = raw_codings(raw, *CODED_ELEMENTS)
    for comp in raw.get("component", []) if isinstance(raw.get("component"), list) else []:
        codings += raw_codings(comp, "code") if isinstance(comp, dict) else ()
    return codings


def reference_of(raw: dict, full_url: str | None = None) -> str:
    rtype = raw.get("resourceType") if isinstance(raw.get("resourceType"), str) else "Resource"
    rid = raw.get("id")
    if isinstance(rid, str) and rid:
        return f"{rtype}/{rid}"
    return full_url or f"{rtype}/(no id)"


def _fingerprint(raw: dict) -> str:
    try:
        return json.dumps(raw, sort_keys=True, default=str)
    except (RecursionError, ValueError):
        return f"unreadable:{id(raw)}"


def add_distinct(record: "PatientRecord", entries: list[tuple[dict, str | None]]) -> None:
    """Add resources to a record; several *different* resources under one ``Type/id`` (a
    Bundle that repeats an id) cannot be told apart: each is distrusted and named, never
    merged into one (four lesions must not become one). Exact repeats are added once."""
    by_key: dict[str | tuple, list[tuple[dict, str | None]]] = {}
    for raw, full_url in entries:
        rid = raw.get("id") if isinstance(raw, dict) else None
        key = (raw.get("resourceType"), rid) if isinstance(rid, str) and rid else f"#{len(by_key)}"
        group = by_key.get(key)
        if group is None:
            by_key[key] = [(raw, full_url)]
        else:
            group.append((raw, full_url))
    if len(by_key) == len(entries):   # no id given twice (the usual case)
        for raw, full_url in entries:
            record.add(raw, full_url)
        return
    for key, group in by_key.items():
        if len(group) == 1 or len({_fingerprint(raw) for raw, _ in group}) == 1:
            record.add(*group[0])
            continue
        key = f"{key[0]}/{key[1]}"
        for raw, full_url in group:
            rtype = raw.get("resourceType")
            if rtype in MAPPED_TYPES and rtype != "Patient":
                record.unreadable.append(Distrusted.of(
                    full_url or key, rtype, f"{len(group)} different resources share the id {key}; none is used", raw))


# ----------------------------------------------------------------------------- strict reading
_ALIASES: dict[type, dict[str, str]] = {}


def _field_names(cls: type) -> dict[str, str]:
    """JSON name -> model attribute name, for one model class (cached)."""
    names = _ALIASES.get(cls)
    if names is None:
        names = {(f.alias or n): n for n, f in cls.model_fields.items()}  # type: ignore[attr-defined]
        _ALIASES[cls] = names
    return names


def strings_for_numbers(raw: Any, model: Any, path: str = "") -> list[str]:
    """Paths where the JSON has a string and the validated model a number or boolean.

    fhir.resources (like pydantic in lax mode) reads ``"18"`` as 18 and ``"true"`` as
    True; FHIR JSON requires a JSON number / boolean there, so such a resource is
    unreadable, never silently a number.

    >>> from fhir.resources.R4B.quantity import Quantity
    >>> strings_for_numbers({"value": "18", "unit": "mm"}, Quantity.model_validate({"value": "18", "unit": "mm"}))
    ['value']
    """
    found: list[str] = []
    if isinstance(raw, dict) and isinstance(model, BaseModel):
        names = _field_names(type(model))
        for key, value in raw.items():
            attr = names.get(key)
            if attr is None or key.startswith("_"):
                continue
            sub = getattr(model, attr, None)
            where = f"{path}.{key}" if path else key
            if isinstance(value, str):
                if isinstance(sub, (bool, int, float, Decimal)):
                    found.append(where)
            elif isinstance(value, (dict, list)):
                found += strings_for_numbers(value, sub, where)
    elif isinstance(raw, list) and isinstance(model, list):
        for i, (r, m) in enumerate(zip(raw, model)):
            found += strings_for_numbers(r, m, f"{path}[{i}]")
    return found


# ----------------------------------------------------------------------------- validation
def read_with_full_models(rtype: str, raw: dict) -> tuple[Any, str]:
    """(fhir.resources R4B model, "") or (None, why it is unreadable): every element
    validated, then strictly read (:func:`strings_for_numbers`)."""
    try:
        model = get_fhir_model_class(rtype).model_validate(raw)
    except (ValidationError, RecursionError) as exc:
        return None, ("nested too deeply to validate" if isinstance(exc, RecursionError)
                      else "; ".join(describe_validation_error(exc)[:3]))
    except (AttributeError, TypeError, ValueError) as exc:
        # fhir.resources' own validators fail this way on some damaged shapes (a number
        # where an object is expected, found by hypothesis): unreadable, never a crash.
        return None, f"not valid FHIR R4 ({type(exc).__name__}: {str(exc)[:200]})"
    loose = strings_for_numbers(raw, model)
    if loose:
        return None, "; ".join(f"{p}: a string where FHIR requires a number or boolean" for p in loose[:3])
    return model, ""


def read_resource(rtype: str, raw: dict, full_models: bool = False) -> tuple[Any, str]:
    """(model, "") or (None, why the resource is unreadable).

    The fast models (:mod:`fhir_adapters.sources.models`) read what the mapping reads.
    What they do not read is decided by the full R4B models, with the message users
    have always seen; when the R4B models accept a resource the fast models refuse on
    purpose (strict reading: ``1`` for a boolean, a number for a dateTime), it stays
    unreadable. ``full_models``: the R4B models alone (the reference the fast models
    are tested against)."""
    if full_models:
        return read_with_full_models(rtype, raw)
    model = fast_read(rtype, raw)
    if type(model) is not NotRead:
        return model, ""
    return not_read_by_fast_models(rtype, raw, model)


def not_read_by_fast_models(rtype: str, raw: dict, not_read: NotRead) -> tuple[Any, str]:
    """What the full R4B models make of a resource the fast models did not read."""
    full, problem = read_with_full_models(rtype, raw)
    if full is not None and not_read.strict:
        return None, not_read.problem
    return full, problem


# ----------------------------------------------------------------------------- the record
def identity_of(resources: Iterable[dict]) -> PatientIdentity:
    """The patient of a list of one patient's resources: its Patient resource, else the
    one Patient that the resources' subjects name (ValueError when several)."""
    resources = [r for r in resources if isinstance(r, dict)]
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    if len(patients) == 1:
        return PatientIdentity.of_patient(patients[0])
    owners = Counter(o for o in (patient_of(r) for r in resources) if o)
    if len(patients) > 1 or len(owners) > 1:
        names = sorted({f"Patient/{p.get('id')}" for p in patients} | {o.reference for o in owners})
        raise ValueError(f"the resources belong to several patients: {', '.join(names)}")
    return PatientIdentity(id=next(iter(owners)).id) if owners else PatientIdentity()


@dataclass
class PatientRecord:
    """The typed evidence of one patient, by type, and what is not evidence and why."""

    identity: PatientIdentity = field(default_factory=PatientIdentity)
    patient: Any | None = None
    observations: list = field(default_factory=list)
    conditions: list = field(default_factory=list)
    procedures: list = field(default_factory=list)
    medication_administrations: list = field(default_factory=list)
    medication_statements: list = field(default_factory=list)
    diagnostic_reports: list = field(default_factory=list)
    medications: dict[str, Any] = field(default_factory=dict)
    body_structures: dict[str, Any] = field(default_factory=dict)
    unreadable: list[Distrusted] = field(default_factory=list)
    unattributable: list[Distrusted] = field(default_factory=list)
    foreign: list[Distrusted] = field(default_factory=list)
    # fullUrl of resources that have no id (transaction Bundles with urn:uuid), by id(model)
    full_urls: dict[int, str] = field(default_factory=dict)
    # What the source could not provide (e.g. a search the server refused), for the warnings
    notes: list[str] = field(default_factory=list)
    # Bundle fullUrls (urn:uuid:...) of resources that have an id -> ``Type/id``
    aliases: dict[str, str] = field(default_factory=dict)
    # Validate with fhir.resources' full R4B models (the reference) instead of the fast models
    full_models: bool = False
    _added: int = 0
    _attributions: dict[tuple[str, str], Attribution] = field(default_factory=dict, repr=False, compare=False)

    def canonical(self, reference: str | None) -> str | None:
        """A reference inside this record as ``Type/id`` (or the fullUrl of a resource
        without id), whichever way it was written: relative, absolute, versioned or by
        the Bundle's ``urn:uuid`` fullUrl."""
        if not reference:
            return None
        if reference.count("/") == 1 and reference[-1] != "\n":   # Type/id (or urn, contained, unparsed): plain
            return self.aliases.get(reference) or reference
        alias = self.aliases.get(reference)
        if alias:
            return alias
        parsed = Reference.parse(reference)
        if parsed.kind == "absolute" and parsed.base not in self.identity.bases:
            # On another server (or one this record cannot place): never this record's Type/id.
            return reference.split("/_history/")[0]
        return plain_ref(reference)

    @property
    def patient_ref(self) -> str | None:
        return self.identity.ref

    @property
    def distrusted(self) -> list[Distrusted]:
        """What may have said something about this patient but is not evidence."""
        return self.unreadable + self.unattributable

    @classmethod
    def from_resources(cls, resources: Iterable[dict], identity: PatientIdentity | None = None,
                       full_models: bool = False) -> "PatientRecord":
        resources = list(resources)
        record = cls(identity if identity is not None else identity_of(resources), full_models=full_models)
        add_distinct(record, [(raw, None) for raw in resources])
        return record

    def add(self, raw: dict, full_url: str | None = None) -> None:
        rtype = raw.get("resourceType") if isinstance(raw, dict) else None
        if rtype not in MAPPED_TYPES:
            return
        self._added += 1
        attribution = self._attribute(rtype, raw)
        if attribution.kind == "foreign":
            self.foreign.append(Distrusted.of(reference_of(raw, full_url), rtype, f"belongs to {attribution.why}", raw))
            return
        if attribution.kind == "unattributable":
            self.unattributable.append(Distrusted.of(reference_of(raw, full_url), rtype, attribution.why or "", raw))
            return
        if self.full_models:
            model, problem = read_with_full_models(rtype, raw)
        else:   # read_resource(), inline: this is the path of every resource
            model, problem = fast_read(rtype, raw), ""
            if type(model) is NotRead:
                model, problem = not_read_by_fast_models(rtype, raw, model)
        if model is None:
            self.unreadable.append(Distrusted.of(reference_of(raw, full_url), rtype, problem, raw))
            return
        if model.id is None:
            # Each resource without an id is its own: never one key for several of them.
            full_url = full_url or f"{rtype}/(no id, entry {self._added})"
            self.full_urls[id(model)] = full_url
        elif full_url:
            self.aliases[full_url] = f"{rtype}/{model.id}"
        self._file(rtype, model, full_url)

    def _attribute(self, rtype: str, raw: dict) -> Attribution:
        """``self.identity.attribute(raw)``. A subject given by its reference alone is
        attributed once per record: the answer depends only on the element's name and
        the reference."""
        if rtype not in SHARED_TYPES and rtype != "Patient":
            for name in SUBJECT_ELEMENTS:
                if name in raw:
                    subject = raw[name]
                    if type(subject) is dict and len(subject) == 1 and type(subject.get("reference")) is str:
                        key = (name, subject["reference"])
                        found = self._attributions.get(key)
                        if found is None:
                            found = self._attributions[key] = self.identity.attribute(raw)
                        return found
                    break
        return self.identity.attribute(raw)

    def _file(self, rtype: str, model: Any, full_url: str | None) -> None:
        if rtype in _LISTS:
            getattr(self, _LISTS[rtype]).append(model)
        elif rtype == "Patient":
            if self.patient is None:
                self.patient = model
        else:
            key = f"{rtype}/{model.id}" if model.id else (full_url or f"{rtype}/(no id)")
            (self.medications if rtype == "Medication" else self.body_structures)[key] = model


_LISTS = {"Observation": "observations", "Condition": "conditions", "Procedure": "procedures",
          "MedicationAdministration": "medication_administrations",
          "MedicationStatement": "medication_statements", "DiagnosticReport": "diagnostic_reports"}
