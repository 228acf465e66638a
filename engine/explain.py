"""The words of a classification, in one place: the text report, the RiskAssessment's
note and narrative, and the CDS Hooks cards all say a result with these functions, so
they say the same thing.

Pure presentation glue: every clinical text (labels, reasons, missing-fact texts,
recommendations, caveats) comes from the rule set through the Classification; only
how values, bounds and states are put into words is decided here.

    >>> from decimal import Decimal
    >>> from engine.classify import Criterion
    >>> size = Criterion(id="largest_ge_50mm", label="largest recurrent tumour 5 cm or more",
    ...                  state="unknown", value=Decimal("21"), unit="mm", lower_bound=True)
    >>> factor_text(size)
    'largest recurrent tumour 5 cm or more: unknown (at least 21 mm)'
    >>> value_text(Criterion(id="c", label="x", state="absent", value=3, unit="lesions"))
    '3'
    >>> value_text(Criterion(id="s", label="x", state="absent", unit="mm",
    ...                      at_most=Decimal("30"), at_most_strict=True))
    'less than 30 mm'
"""

from __future__ import annotations

from decimal import Decimal

from engine.classify import Classification, Criterion

__all__ = ["value_text", "state_text", "factor_text", "threshold_text", "headline", "reason_text",
           "missing_texts", "recommendation_texts", "cohort_text", "ruleset_text"]


def _number(v: Decimal | int, unit: str | None) -> str:
    """A number as written (``50.0`` -> ``50``), with its unit when it is a measurement.
    A count (an int) is shown bare: the label names what is counted ("3", not "3 lesions")."""
    if isinstance(v, Decimal):
        text = f"{v.normalize():f}"
        return f"{text} {unit}" if unit else text
    return str(v)


def value_text(c: Criterion) -> str:
    """The value as a clinician reads it: ``32 mm``, ``3``, ``at least 21 mm``, ``less than
    30 mm``, ``at most 30 mm``, ``yes`` / ``no``, ``unknown`` when nothing is known.

    >>> value_text(Criterion(id="e", label="x", state="present", value=True))
    'yes'
    >>> value_text(Criterion(id="e", label="x", state="unknown"))
    'unknown'
    """
    v = c.value
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return state_text(v)
    parts = []
    if v is not None:
        parts.append(f"at least {_number(v, c.unit)}" if c.lower_bound else _number(v, c.unit))
    if c.at_most is not None and (v is None or c.lower_bound):
        parts.append(f"{'less than' if c.at_most_strict else 'at most'} {_number(c.at_most, c.unit)}")
    return " and ".join(parts) or "unknown"


def state_text(state: str) -> str:
    """A state as a word: ``not-assessed`` -> ``not assessed``."""
    return state.replace("-", " ")


def _has_quantity(c: Criterion) -> bool:
    """The value says more than the state: a number or a bound (not true/false or a word)."""
    return (c.value is not None and not isinstance(c.value, (bool, str))) or c.at_most is not None


def factor_text(c: Criterion) -> str:
    """``<label>: <state> (<value>)``; the value only where it says more than the state.

    >>> factor_text(Criterion(id="e", label="extrahepatic disease present", state="absent", value=False))
    'extrahepatic disease present: absent'
    """
    text = f"{c.label}: {state_text(c.state)}"
    return f"{text} ({value_text(c)})" if _has_quantity(c) else text


def threshold_text(c: Criterion) -> str | None:
    """The factor's threshold (``>= 50 mm``), None for a true/false factor or a fact."""
    if c.threshold is None:
        return None
    return f"{c.operator} {c.threshold.normalize():f}{' ' + c.unit if c.unit else ''}"


def headline(r: Classification) -> str:
    """The group's label and the status, ``Borderline resectable (preliminary)``; a result
    the rule set writes no assessment for says so: ``Not assessed (no-recurrence)``."""
    if not r.assessed:
        return "Not assessed (no-recurrence)"
    label = r.group_label
    # "Indeterminate (facts missing)" -> "Indeterminate (facts missing; preliminary)"
    return f"{label[:-1]}; {r.status})" if label.endswith(")") else f"{label} ({r.status})"


def reason_text(r: Classification) -> str:
    """Why: the group rule's reason, with the group and rule that decided it."""
    return f"{r.reason} (group {r.group}, rule {r.group_rule})"


def missing_texts(r: Classification) -> list[str]:
    """Each missing fact: the rule set's text and, where known, why it is missing."""
    return [m.text + (f" ({m.detail})" if m.detail else "") for m in r.missing]


def recommendation_texts(r: Classification) -> list[str]:
    return [rec.text for rec in r.recommendations]


def _lower_first(label: str) -> str:
    return label[:1].lower() + label[1:] if label[1:2].islower() else label


def cohort_text(r: Classification) -> str | None:
    """The cohort survival figure of the group with its caveat (None when none applies)."""
    s = r.cohort_survival
    if s is None:
        return None
    return (f"Cohort estimate: {s.horizon_years}-year overall survival {s.five_year_os_percent} % in the "
            f"study's {_lower_first(r.group_label)} group (p {s.p_value} across groups). {s.caveat}")


def ruleset_text(r: Classification) -> str:
    rs = r.ruleset
    return f"{rs.title}, rule set {rs.id} {rs.version} (doi:{rs.doi}, PMID {rs.pmid})"
