"""Typed tumour features: what the engine classifies.

Each feature is a :class:`Fact`: a value, or ``None`` when unknown, with the references
of the resources it came from and a note saying why it is unknown where it is.

    >>> Fact[int](value=5, refs=("Observation/a",)).known
    True
    >>> Fact[int]().known
    False
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

T = TypeVar("T")

TechnicalJudgement = Literal["resectable", "unresectable"]


class Fact(BaseModel, Generic[T]):
    """One fact about the patient: its value (None = unknown) and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: T | None = None
    refs: tuple[str, ...] = ()
    note: str | None = None
    # True when the value is only a lower bound (e.g. "at least 3 lesions": one
    # measurement could not be used). A lower bound can prove ">= threshold", never "<".
    lower_bound: bool = False

    @property
    def known(self) -> bool:
        return self.value is not None


class Features(BaseModel):
    """Everything the rule set may test, for one patient at one point in time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patient: str | None = None
    liver_recurrence: Fact[StrictBool] = Fact[StrictBool]()
    tumour_count: Fact[StrictInt] = Fact[StrictInt]()
    largest_diameter_mm: Fact[Decimal] = Fact[Decimal]()
    extrahepatic_disease: Fact[StrictBool] = Fact[StrictBool]()
    technical_resectability: Fact[TechnicalJudgement] = Fact[TechnicalJudgement]()
    adjuvant_chemotherapy: Fact[StrictBool] = Fact[StrictBool]()
    warnings: tuple[str, ...] = Field(default=())

    @field_validator("tumour_count")
    @classmethod
    def _count_not_negative(cls, v: Fact[int]) -> Fact[int]:
        if v.value is not None and v.value < 0:
            raise ValueError("tumour count cannot be negative")
        return v

    @field_validator("largest_diameter_mm", mode="before")
    @classmethod
    def _diameter_is_a_real_length(cls, v):
        value = v.get("value") if isinstance(v, dict) else getattr(v, "value", None)
        if isinstance(value, bool) or isinstance(value, str):
            raise ValueError("diameter must be a number of millimetres, not "
                             f"{type(value).__name__}")
        if value is not None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("diameter must be finite")
            if isinstance(value, Decimal) and not value.is_finite():
                raise ValueError("diameter must be finite")
            if value < 0:
                raise ValueError("diameter cannot be negative")
        return v


# Names of the feature fields the rule set's factors may refer to, by kind of value.
NUMERIC_FEATURES = ("tumour_count", "largest_diameter_mm")
BOOLEAN_FEATURES = ("extrahepatic_disease",)
