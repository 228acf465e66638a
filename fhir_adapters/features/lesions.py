"""Tumour count and largest diameter over the imaging studies of the recurrence.

Two of the three prognostic factors. A factor shown on any study of the recurrence
stays shown (the most distinct lesions on one study, the largest size on any study):
shrinkage under treatment does not make a recurrence resectable. It is absent only when
the latest study accounts for every lesion seen before and nothing is in doubt (a
measurement that cannot be placed, read or attributed makes both lower bounds).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Iterable

from engine.features import Fact
from fhir_adapters.features.evidence import CountFact, MappingContext, SizeFact
from fhir_adapters.features.measurements import Measurement, is_lesion_identity
from fhir_adapters.features.studies import Imaging, Study
from fhir_adapters.sources.record import PatientRecord


def upper_of(ms: Iterable[Measurement]) -> tuple[Decimal, bool] | None:
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


def unaccounted(record: PatientRecord, studies: list[Study]) -> list[str]:
    """Why the latest study does not account for every lesion seen earlier."""
    if len(studies) < 2:
        return []
    latest = studies[-1]
    problems = []
    for s in studies[:-1]:
        for key in s.lesions:
            if is_lesion_identity(record, key) and key not in latest.lesions:
                problems.append(f"lesion {key} seen on {s.label} is not measured on the latest study "
                                f"({latest.when.text}): not accounted for")
        if len(latest.lesions) < len(s.lesions):
            problems.append(f"the latest study ({latest.when.text}) measures {len(latest.lesions)} lesion(s), "
                            f"fewer than the {len(s.lesions)} of {s.label}: not accounted for")
    return list(dict.fromkeys(problems))


def lesions(ctx: MappingContext, imaging: Imaging) -> tuple[Fact[int], Fact[Decimal]]:
    """Count and largest size over the studies of the recurrence: a factor shown on
    any study stays shown; absence needs the latest study to account for all."""
    t = ctx.terminology
    studies, uncertain = imaging.studies, imaging.uncertain
    distrusted = ctx.distrusted_matching("Observation", t.tumour_size_observation, t.longest_dimension)
    if distrusted:
        ctx.warnings.append("tumour measurements that cannot be read or attributed: "
                            f"{', '.join(distrusted)}; count and size are lower bounds")
    distrusted += imaging.unplaceable
    if not studies and not uncertain:
        note = "no tumour measurement of the liver after the reference resection"
        if distrusted:
            note = f"tumour measurements not readable or not attributable: {', '.join(distrusted)}"
        return CountFact(note=note), SizeFact(note=note)
    missing = unaccounted(ctx.record, studies)
    ctx.warnings.extend(missing)
    doubt = bool(uncertain or distrusted or missing)
    all_ms = [m for s in studies for ms in s.lesions.values() for m in ms] + uncertain
    refs = tuple(dict.fromkeys(m.ref for m in all_ms))

    # Count: the most distinct lesions on one study (with what cannot be placed, at least
    # as many as the latest study plus those).
    biggest = max(studies, key=lambda s: len(s.lesions), default=None)
    n = len(biggest.lesions) if biggest else 0
    if uncertain:
        n = max(n, len(set(studies[-1].lesions if studies else ()) | {m.lesion_key for m in uncertain}))
    where = f"on {biggest.label}" if biggest else "(not placed in time)"
    count = CountFact(value=n, refs=refs, lower_bound=doubt,
                      note=f"{n} distinct lesion(s) {where}" + ("; at least this many" if doubt else "")
                           + (f" ({'; '.join(missing)})" if missing else ""))

    # Size: the largest any measurement shows (can prove >= t), and the largest any
    # lesion may be (can prove < t only when nothing is in doubt).
    lows = [m.size_mm for m in all_ms if m.size_mm is not None and m.bound in ("exact", "at-least")]
    problems = list(dict.fromkeys(m.size_problem for m in all_ms if m.size_problem))
    ctx.warnings.extend(problems)
    upper = None if doubt or problems else upper_of(all_ms)
    low = max(lows, default=None)
    if low is None and upper is None:
        return count, SizeFact(refs=refs, note="; ".join(problems + missing) or "no lesion size recorded")
    span = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} of the recurrence"
    if upper is not None and low is not None and upper == (low, False):
        return count, SizeFact(value=low, refs=refs, note=f"largest lesion on {span}")
    note = f"largest lesion on {span}"
    if low is not None:
        note += f": at least {low} mm"
    if upper is not None:
        note += f"; {'below' if upper[1] else 'at most'} {upper[0]} mm"
    why = problems + missing + (["a measurement could not be placed, read or attributed"]
                                if uncertain or distrusted else [])
    if why:
        note += " (" + "; ".join(why) + ")"
    return count, SizeFact(value=low, refs=refs, lower_bound=low is not None,
                           at_most=upper[0] if upper else None,
                           at_most_strict=upper[1] if upper else False, note=note)
