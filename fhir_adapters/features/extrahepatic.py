"""Extrahepatic disease: an active, confirmed metastasis Condition outside the liver.

It is one of the three prognostic factors. Present on one active, confirmed Condition;
unknown when one is only suspected, has no coded site, or may be hidden in a record
that cannot be read or attributed; absent only when none of these exists.
"""

from __future__ import annotations

from engine.features import Fact
from fhir_adapters.features.evidence import BoolFact, MappingContext, condition_status, metastasis_sites


def extrahepatic_disease(ctx: MappingContext) -> Fact[bool]:
    t = ctx.terminology
    confirmed, doubtful, ignored = [], [], []
    for c in ctx.record.conditions:
        sites = metastasis_sites(t, c)
        if not sites & {"extrahepatic", "unknown-site"}:
            continue
        status = condition_status(c)
        if status == "active" and "extrahepatic" in sites:
            confirmed.append(ctx.ref(c))
        elif status in ("active", "unconfirmed"):
            doubtful.append(ctx.ref(c))
        else:
            ignored.append(ctx.ref(c))
    if confirmed:
        return BoolFact(value=True, refs=tuple(confirmed))
    unreadable = ctx.distrusted_matching("Condition", t.extrahepatic_metastasis_condition,
                                        t.metastasis_condition_generic)
    if doubtful or unreadable:
        note = ("extrahepatic metastasis suspected but not confirmed, its site is not coded, or its record "
                f"is not readable or not attributable: {', '.join(doubtful + unreadable)}")
        return BoolFact(value=None, refs=tuple(doubtful), note=note)
    note = "no active, confirmed extrahepatic metastasis recorded"
    if ignored:
        note += f" (withdrawn or inactive: {', '.join(ignored)})"
    return BoolFact(value=False, refs=tuple(ignored), note=note)
