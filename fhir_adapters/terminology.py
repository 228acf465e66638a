"""The terminology file: which codes mean what, declared in YAML a site can extend.

The mapping asks questions such as "is this Condition a liver metastasis?" through a
:class:`Terminology`; no code list lives in Python. A site adds its local codes to
``rules/terminology.yaml`` (or its own copy passed with ``--terminology``).

Code matching::

    >>> c = Code(system="http://hl7.org/fhir/sid/icd-10-cm", prefix="C78.0")
    >>> c.matches("http://hl7.org/fhir/sid/icd-10-cm", "C78.01")
    True
    >>> c.matches("http://hl7.org/fhir/sid/icd-10-cm", "c7800")
    True
    >>> c.matches("http://hl7.org/fhir/sid/icd-10-cm", "C78.7")
    False
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.filekind import WrongKindOfFileError, looks_like_ruleset, top_level
from engine.yamlfile import DeclarativeFileError, load_model

DEFAULT_TERMINOLOGY = Path(__file__).resolve().parent.parent / "rules" / "terminology.yaml"


def _norm(code: str) -> str:
    """Codes compare without dots, spaces or case (ICD-10 'C78.00' == 'C7800')."""
    return code.replace(".", "").replace(" ", "").upper()


class Code(BaseModel):
    """One code, or every code starting with ``prefix`` (for ICD-10 families)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str = Field(min_length=1)
    code: str | None = None
    prefix: str | None = None
    display: str | None = None

    @model_validator(mode="after")
    def _one_of_code_or_prefix(self) -> "Code":
        if (self.code is None) == (self.prefix is None):
            raise ValueError("give exactly one of 'code' or 'prefix'")
        return self

    def matches(self, system: str | None, code: str | None) -> bool:
        if not system or not code or system != self.system:
            return False
        if self.code is not None:
            return _norm(code) == _norm(self.code)
        return _norm(code).startswith(_norm(self.prefix or ""))


class CodeList(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1)
    codes: tuple[Code, ...] = Field(min_length=1)

    def matches(self, system: str | None, code: str | None) -> bool:
        return any(c.matches(system, code) for c in self.codes)

    def matches_any(self, codings: Iterable[tuple[str | None, str | None]]) -> bool:
        return any(self.matches(s, c) for s, c in codings)


class Trigger(BaseModel):
    """One kind of resource whose creation, update or deletion re-classifies its patient:
    a Subscription per trigger (``clm-stratify subscribe``), and what the receiver re-queries.
    ``code_lists`` name code lists of this file; their codes make the token search
    ``<parameter>=system|code,...``. No code lists, or a list with a ``prefix`` entry
    (which a token search cannot express), watches every resource of the type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource: str = Field(pattern=r"^[A-Z][A-Za-z]{1,63}$")
    parameter: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]*$")
    code_lists: tuple[str, ...] = ()
    description: str = Field(min_length=1)

    @model_validator(mode="after")
    def _parameter_with_lists(self) -> "Trigger":
        if bool(self.parameter) != bool(self.code_lists):
            raise ValueError("give both 'parameter' and 'code_lists' (a filtered trigger), or neither "
                             "(every resource of the type)")
        return self


class PlausibleRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    minimum: Decimal = Field(gt=0)
    maximum: Decimal = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "PlausibleRange":
        if not (self.minimum.is_finite() and self.maximum.is_finite()) or self.minimum >= self.maximum:
            raise ValueError("minimum must be below maximum")
        return self


class Terminology(BaseModel):
    """Validated content of ``rules/terminology.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    description: str = ""

    # Conditions
    liver_metastasis_condition: CodeList
    metastasis_condition_generic: CodeList
    extrahepatic_metastasis_condition: CodeList
    liver_site: CodeList
    # Imaging
    tumour_size_observation: CodeList
    longest_dimension: CodeList
    pathology_method: CodeList
    # Treatment history
    hepatectomy_procedure: CodeList
    chemotherapy_procedure: CodeList
    chemotherapy_medication: CodeList
    # Technical resectability recorded by the care team
    technical_resectability_observation: CodeList
    technically_resectable_value: CodeList
    technically_unresectable_value: CodeList
    # Imaging reports whose arrival triggers a re-classification
    radiology_report_category: CodeList
    # Imaging studies (ImagingStudy.series.modality) whose arrival triggers a re-classification
    imaging_modality: CodeList
    # UCUM length units accepted for a diameter, with their exact factor to millimetres
    length_units_to_mm: dict[str, Decimal] = Field(min_length=1)
    plausible_diameter_mm: "PlausibleRange"
    # Unlinked measurements this close in time are one imaging study
    unlinked_study_tolerance_minutes: int = Field(ge=0, le=24 * 60)
    # What re-classifies a patient when it is created, updated or deleted (subscribe / serve)
    triggers: tuple[Trigger, ...] = Field(min_length=1)

    @field_validator("length_units_to_mm")
    @classmethod
    def _positive_factors(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        bad = [u for u, f in v.items() if not f.is_finite() or f <= 0]
        if bad:
            raise ValueError(f"unit factors must be positive numbers: {', '.join(bad)}")
        return v

    @field_validator("triggers")
    @classmethod
    def _known_lists_one_per_type(cls, v: tuple[Trigger, ...]) -> tuple[Trigger, ...]:
        lists = sorted(name for name, f in cls.model_fields.items() if f.annotation is CodeList)
        problems, seen = [], set()
        for i, trigger in enumerate(v):
            if trigger.resource in seen:
                problems.append(f"[{i}].resource: {trigger.resource} is listed twice (one entry per resource type: "
                                f"put all its code lists in one)")
            seen.add(trigger.resource)
            problems += [f"[{i}].code_lists: unknown code list {name!r} (known: {', '.join(lists)})"
                         for name in trigger.code_lists if name not in lists]
        if problems:
            raise ValueError("; ".join(problems))
        return v

    def code_lists_of(self, trigger: Trigger) -> list[CodeList]:
        """The code lists a trigger names (checked at load)."""
        return [getattr(self, name) for name in trigger.code_lists]


def load_terminology(path: Path | str | None = None) -> Terminology:
    """Load and validate a terminology file (the project's default when ``path`` is None).
    A rule set given as a terminology is named as such, in one line."""
    try:
        return load_model(path or DEFAULT_TERMINOLOGY, Terminology)
    except DeclarativeFileError:
        if path is not None and looks_like_ruleset(top_level(path)):
            raise WrongKindOfFileError(path, "is a rule set, not a terminology file: give it as the rule set "
                                             "(--rules, or the file of rules validate)") from None
        raise

