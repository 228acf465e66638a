"""Typed models of exactly what the mapping reads: the fast validation boundary of
:class:`~fhir_adapters.sources.record.PatientRecord`.

fhir.resources' R4B models validate every element of a resource, contained resources
and narrative included: three quarters of the cost of mapping a patient. The models
here validate the elements the mapping and the attribution read (:data:`READ`), with
the same attribute names and the same Python values, as strictly as fhir.resources
does or more:

* the same primitive constraints: ``code``, ``id``, ``uri`` and ``string`` are
  fhir.resources' own annotated types; ``decimal``, ``dateTime`` and ``instant`` use its
  regexes and give its values (an exact :class:`~decimal.Decimal`; an aware datetime, a
  date, or the string of a partial date or of a leap second);
* strict reading: a JSON string where FHIR requires a number or a boolean, a number
  where it requires a boolean or a dateTime, is unreadable (fhir.resources would read
  ``"18"`` as 18, ``1`` as True and ``1700000000`` as a dateTime);
* cardinality (a list where R4 has a list, an object where it has one), no null inside a
  list of elements, required elements present (as fhir.resources requires them), a
  required ``status``, at most one type of a choice element ``[x]`` (exactly one where
  R4 requires it);
* no element R4B does not define (names taken from the R4B models): a misspelt
  ``specimen`` or ``focus`` makes the resource unreadable, never silently absent.

Elements the mapping does not read are not validated: a bad ``identifier``, ``note``,
``contained`` resource or ``extension`` no longer makes a resource unreadable. The
validation runs in pydantic-core (Rust schemas, primitives included); Python only checks
element names and choice elements (set operations) and explains what fails.

:func:`read` answers with a model, or with :class:`NotRead` when these models do not
decide: a resource they reject, and a valid one they do not model (a ``status`` given
only as an extension, an R4B element name they do not declare inside an element such as
a Coding ``extension``, the R4B models' Python names instead of the JSON ones). The R4B
models then decide, see :func:`fhir_adapters.sources.record.read_resource`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Optional

from fhir.resources.R4B import fhirtypes, get_fhir_model_class
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError, SchemaValidator
from pydantic_core import core_schema as cs

# ----------------------------------------------------------------------------- primitives
Code = fhirtypes.CodeType          # the very constraints fhir.resources applies
Id = fhirtypes.IdType
String = fhirtypes.StringType
Uri = fhirtypes.UriType

STRICT = "fhir_strict_reading"    # the error type of what fhir.resources reads laxly
_DATETIME = fhirtypes.DateTimeType.__metadata__[0].pattern.pattern
_INSTANT = fhirtypes.InstantType.__metadata__[0].pattern.pattern
_LEAP = re.compile(r"(.*T[0-9]{2}:[0-9]{2}:)60(.*)")


class _Schema:
    """Annotated metadata that is a pydantic-core schema (validated in Rust)."""

    def __init__(self, schema: cs.CoreSchema):
        self.schema = schema

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> cs.CoreSchema:
        return self.schema


def _first(*schemas: cs.CoreSchema) -> cs.CoreSchema:
    return cs.union_schema(list(schemas), mode="left_to_right")


def _strict(found: str, wanted: str) -> PydanticCustomError:
    return PydanticCustomError(STRICT, f"a {found} where FHIR requires {wanted}")


def _not_a_boolean(v: Any) -> bool:
    if isinstance(v, (int, float, Decimal)) and not isinstance(v, (bool, str)):
        raise _strict("number", "a boolean")
    raise PydanticCustomError("bool_type", "Input should be a valid boolean")


def _leap_second(v: Any) -> str:
    """A leap second (``...:60``, which Python cannot represent) is checked with :59 and
    kept as the string, as fhir.resources keeps it."""
    m = _LEAP.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise PydanticCustomError("datetime_parsing", "Input should be a valid FHIR dateTime")
    _ANY_TIME(m[1] + "59" + m[2])
    return v


def _not_a_date_string(v: Any, kind: str) -> Any:
    """What a Python caller may put in a dict (JSON gives strings only)."""
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            raise PydanticCustomError("timezone_aware", f"{kind} must be timezone aware.")
        return v
    if isinstance(v, dt.date) and kind == "DateTime":
        return v
    if isinstance(v, (int, float, Decimal)) and not isinstance(v, bool):
        raise _strict("number", f"a {kind[0].lower()}{kind[1:]} string")
    raise PydanticCustomError("datetime_type", f"Input should be a valid {kind}")


def _time_schema(pattern: str, kind: str, *shapes: cs.CoreSchema) -> cs.CoreSchema:
    """A FHIR date/time string: the FHIR regex, then the first of ``shapes`` that reads it
    (a leap second last); anything else (a number, a Python date) in Python."""
    return _first(cs.chain_schema([cs.str_schema(pattern=f"^(?:{pattern})$"), _first(
        *shapes, cs.chain_schema([cs.str_schema(pattern=r"^.{19}"), cs.datetime_schema()]),
        cs.no_info_plain_validator_function(_leap_second))]),
        cs.no_info_plain_validator_function(lambda v: _not_a_date_string(v, kind)))


_ANY_TIME = SchemaValidator(cs.datetime_schema()).validate_python
FhirDecimal = Annotated[Decimal, _Schema(_first(
    cs.decimal_schema(strict=True), cs.chain_schema([cs.int_schema(strict=True), cs.decimal_schema()]),
    cs.chain_schema([cs.float_schema(strict=True), cs.decimal_schema()])))]
FhirBoolean = Annotated[bool, _Schema(_first(cs.bool_schema(strict=True),
                                             cs.no_info_plain_validator_function(_not_a_boolean)))]
FhirDateTime = Annotated[Any, _Schema(_time_schema(
    _DATETIME, "DateTime",
    cs.str_schema(pattern=r"^[0-9]{4}(?:-[0-9]{2})?$"),                       # a year or a month: kept as written
    cs.chain_schema([cs.str_schema(pattern=r"^.{10}$"), cs.date_schema()])))]
FhirInstant = Annotated[Any, _Schema(_time_schema(_INSTANT, "Instant"))]


# ----------------------------------------------------------------------------- models
class FastModel(BaseModel):
    """An element read by these models: an element name it does not declare is an error
    (then the R4B models decide, see :func:`read`)."""

    model_config = ConfigDict(extra="forbid")


class FastResource(BaseModel):
    """A resource read by these models. Its element names are checked against R4B's
    before validation (:class:`Shape`); those the mapping does not read are ignored."""

    model_config = ConfigDict(extra="ignore")
    __resource_type__: ClassVar[str] = "Resource"

    @classmethod
    def get_resource_type(cls) -> str:
        return cls.__resource_type__


def _model(fhir_type: str, read: dict[str, Any], also: tuple[str, ...] = (), base: type = FastModel) -> Any:
    """A model of the R4B type ``fhir_type``: the elements in ``read`` (JSON name -> type)
    validated and required as R4B requires them (present; JSON null allowed, as in
    fhir.resources). An element model also accepts, unvalidated, the common elements
    ``also`` (attribute ``x_<name>``); any other name makes the fast models pass the
    resource to the R4B models, which know every element."""
    ref = get_fhir_model_class(fhir_type)
    elements = {info.alias or name: info for name, info in ref.model_fields.items()}
    unknown = (set(read) | set(also)) - set(elements)
    assert not unknown, f"{fhir_type} has no element {unknown}"
    fields: dict[str, Any] = {}
    for alias, info in elements.items():
        default = ... if info.is_required() else None
        if alias in read:
            fields[alias] = (Optional[read[alias]], default)
        elif alias in also or (base is FastResource and default is ...):
            fields[f"x_{alias}"] = (Any, Field(default, alias=alias))
    model = create_model(f"Fast{fhir_type}", __base__=base, **fields)
    if base is FastResource:
        model.__resource_type__ = fhir_type
    return model


_VALUES = ("valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueRange", "valueRatio",
           "valueSampledData", "valueTime", "valueDateTime", "valuePeriod")
Coding = _model("Coding", {"system": Uri, "code": Code}, ("display", "version", "userSelected"))
CodeableConcept = _model("CodeableConcept", {"coding": list[Coding], "text": String})
Quantity = _model("Quantity", {"value": FhirDecimal, "comparator": Code, "unit": String, "system": Uri, "code": Code})
Period = _model("Period", {"start": FhirDateTime, "end": FhirDateTime})
Identifier = _model("Identifier", {"system": Uri, "value": String}, ("use", "type", "period", "assigner"))
Reference = _model("Reference", {"reference": String, "type": Uri, "identifier": Identifier, "display": String})
Meta = _model("Meta", {"versionId": Id}, ("lastUpdated", "source", "profile", "security", "tag"))
Component = _model("ObservationComponent", {"code": CodeableConcept, "dataAbsentReason": CodeableConcept,
                                            "valueQuantity": Quantity}, ("interpretation", "referenceRange", *_VALUES))

# What the mapping (fhir_adapters/features/, fhir_adapters/sources/pull.py) and the
# attribution (subject / patient) read, per resource type.
_RESOURCE = {"id": Id, "meta": Meta}
_SUBJECT = {"subject": Reference}
_MEDICATION_USE = {**_SUBJECT, "status": Code, "medicationCodeableConcept": CodeableConcept,
                   "medicationReference": Reference, "effectiveDateTime": FhirDateTime, "effectivePeriod": Period}
READ: dict[str, dict[str, Any]] = {
    "Patient": {},
    "Observation": {**_SUBJECT, "status": Code, "code": CodeableConcept, "component": list[Component],
                    "valueQuantity": Quantity, "valueBoolean": FhirBoolean, "valueCodeableConcept": CodeableConcept,
                    "dataAbsentReason": CodeableConcept, "specimen": Reference, "method": CodeableConcept,
                    "bodySite": CodeableConcept, "focus": list[Reference], "derivedFrom": list[Reference],
                    "partOf": list[Reference], "effectiveDateTime": FhirDateTime, "effectivePeriod": Period,
                    "effectiveInstant": FhirInstant},
    "Condition": {**_SUBJECT, "code": CodeableConcept, "bodySite": list[CodeableConcept],
                  "clinicalStatus": CodeableConcept, "verificationStatus": CodeableConcept,
                  "onsetDateTime": FhirDateTime, "onsetPeriod": Period, "abatementDateTime": FhirDateTime,
                  "recordedDate": FhirDateTime},
    "Procedure": {**_SUBJECT, "status": Code, "code": CodeableConcept, "performedDateTime": FhirDateTime,
                  "performedPeriod": Period},
    "MedicationAdministration": _MEDICATION_USE,
    "MedicationStatement": _MEDICATION_USE,
    "Medication": {"code": CodeableConcept},
    "BodyStructure": {"patient": Reference, "location": CodeableConcept},
    "DiagnosticReport": {**_SUBJECT, "status": Code, "category": list[CodeableConcept],
                         "effectiveDateTime": FhirDateTime, "effectivePeriod": Period, "issued": FhirInstant,
                         "result": list[Reference], "imagingStudy": list[Reference]},
}
MODELS: dict[str, Any] = {t: _model(t, {**_RESOURCE, **read}, base=FastResource) for t, read in READ.items()}
VALIDATORS = {t: m.__pydantic_validator__.validate_python for t, m in MODELS.items()}


# ----------------------------------------------------------------------------- what pydantic cannot say
@dataclass(frozen=True)
class Shape:
    """What a type's R4B model checks beyond its fields: its JSON names, its choice
    elements (and whether one is required), its required primitives."""

    names: frozenset[str]
    choices: tuple[tuple[tuple[str, ...], bool], ...]
    choice_names: frozenset[str]
    required_choice: bool
    required: tuple[str, ...]

    @classmethod
    def of(cls, fhir_type: str) -> "Shape":
        ref = get_fhir_model_class(fhir_type)
        blank = ref.model_construct()
        choices = tuple((tuple(names), bool(ref.model_fields[names[0]].json_schema_extra["one_of_many_required"]))
                        for names in blank.get_one_of_many_fields().values())
        return cls(frozenset([*(f.alias or n for n, f in ref.model_fields.items()), "resourceType"]), choices,
                   frozenset(n for names, _ in choices for n in names), any(req for _, req in choices),
                   tuple(ref.model_fields[name].alias or name for name, _ in blank.get_required_fields()))

    def choices_ok(self, raw: dict) -> bool:
        """At most one type of each choice element, exactly one where R4 requires it."""
        if not self.required_choice and len(self.choice_names.intersection(raw)) < 2:
            return True
        for names, required in self.choices:
            given = 0
            for name in names:
                if raw.get(name) is not None:
                    given += 1
            if given > 1 or (required and not given):
                return False
        return True


SHAPES = {t: Shape.of(t) for t in READ}
COMPONENT = Shape.of("ObservationComponent")


@dataclass(frozen=True)
class NotRead:
    """The fast models did not read a resource. ``strict``: they reject it on purpose
    (strict reading), whatever the R4B models say; ``problem`` says why."""

    problem: str = "not decided by the fast models"
    strict: bool = False


DEFER = NotRead()


def read(rtype: str, raw: dict) -> Any:
    """The fast model of one resource of a mapped type, or :class:`NotRead`."""
    shape = SHAPES[rtype]
    if not shape.names.issuperset(raw) or not shape.choices_ok(raw):
        return DEFER
    components = raw.get("component") if rtype == "Observation" else None
    if type(components) is list:
        for c in components:
            if type(c) is dict and not COMPONENT.choices_ok(c):
                return DEFER
    try:
        model = VALIDATORS[rtype](raw)
    except ValidationError as exc:
        strict = [e for e in exc.errors() if e["type"] == STRICT]
        if strict:
            return NotRead("; ".join(f"{_path(e['loc'])}: {e['msg']}" for e in strict[:3]), strict=True)
        return DEFER
    except RecursionError:
        return DEFER
    for name in shape.required:
        if getattr(model, name) is None:
            return DEFER   # given only as an extension (``_status``): the R4B models judge that
    return model


def _path(loc: tuple) -> str:
    """``component[0].valueQuantity.value`` (pydantic's union and function markers left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and not part.startswith("function-"):
            out += f".{part}" if out else part
    return out
