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

# "in-doubt": a judgement that cannot be attributed to the patient or read may record the
# recurrence as technically unresectable; it can never be ruled out, so never "resectable".
TechnicalJudgement = Literal["resectable", "unresectable", "in-doubt"]


class Fact(BaseModel, Generic[T]):
    """One fact about the patient: its value (None = unknown) and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: T | None = None
    refs: tuple[str, ...] = ()
    note: str | None = None
    # True when the value is only a lower bound (e.g. "at least 3 lesions": one
    # measurement could not be used). A lower bound can prove ">= threshold", never "<".
    lower_bound: bool = False
    # An upper bound known besides (or instead of) the value: "size < 30 mm" is
    # at_most=30, at_most_strict=True. It can prove "< threshold", never ">=". An exact
    # value is its own upper bound; leave at_most None then.
    at_most: Decimal | None = None
    at_most_strict: bool = False

    @property
    def upper(self) -> tuple[Decimal | int | None, bool]:
        """(upper bound, strict): the exact value when there is one, else ``at_most``."""
        if self.value is not None and not self.lower_bound and not isinstance(self.value, bool):
            return self.value, False  # type: ignore[return-value]
        return self.at_most, self.at_most_strict

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
    # True: the reference liver resection is recorded; None: it is not (never False).
    prior_liver_resection: Fact[StrictBool] = Fact[StrictBool]()
    # False when a newer imaging report than the newest measured study has no
    # structured measurements (the measurements may be stale); True otherwise.
    imaging_measurements: Fact[StrictBool] = Fact[StrictBool](value=True)
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
