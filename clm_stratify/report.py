"""A short, readable text report of one classification."""

from __future__ import annotations

import textwrap
from decimal import Decimal

from engine.classify import Classification, Criterion

_MARK = {"present": "present", "absent": "absent ", "unknown": "UNKNOWN"}


def _value(c: Criterion) -> str:
    if c.value is None:
        return "unknown"
    if isinstance(c.value, bool):
        return "yes" if c.value else "no"
    if isinstance(c.value, Decimal):
        text = f"{c.value.normalize():f}"
    else:
        text = str(c.value)
    text = f"{text} {c.unit}" if c.unit else text
    return f"at least {text}" if c.note and "at least" in c.note else text


def _refs(refs: tuple[str, ...], limit: int = 4) -> str:
    if not refs:
        return ""
    shown = ", ".join(refs[:limit])
    return f" [{shown}{', ...' if len(refs) > limit else ''}]"


def _wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, width=92, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False, break_long_words=False)


def text_report(r: Classification) -> str:
    who = r.patient or "(patient not named)"
    if not r.assessed:
        lines = [f"{who}: NO-RECURRENCE ({r.group}, {r.status})", _wrap(r.not_assessed_reason or "", "  ")]
    else:
        lines = [f"{who}: {r.group.upper()} ({r.status})"]
    lines.append(_wrap(f"Why: {r.reason} (rule {r.group_rule})", "  "))
    lines.append("  Prognostic factors at recurrence:")
    for c in r.criteria.values():
        op = ""
        if c.threshold is not None:
            op = f" (threshold {c.operator} {c.threshold.normalize():f}{' ' + c.unit if c.unit else ''})"
        lines.append(_wrap(f"[{_MARK[c.state]}] {c.label}: {_value(c)}{op}{_refs(c.refs)}", "    "))
        if c.state == "unknown" and c.note:
            lines.append(_wrap(f"why unknown: {c.note}", "        "))
    lines.append("  Other facts:")
    for c in r.facts.values():
        lines.append(_wrap(f"{c.label}: {c.state}{_refs(c.refs)}", "    "))
    if r.missing:
        lines.append("  Missing facts:")
        for m in r.missing:
            lines.append(_wrap(f"- {m.text}" + (f" ({m.detail})" if m.detail else ""), "    "))
    if r.recommendations:
        lines.append("  Recommendations:")
        for rec in r.recommendations:
            lines.append(_wrap(f"- {rec.text}", "    "))
    if r.cohort_survival:
        s = r.cohort_survival
        lines.append(_wrap(
            f"Cohort estimate: 5-year overall survival {s.five_year_os_percent} % in the study's "
            f"{s.group} group (p {s.p_value} across groups). {s.caveat}", "  "))
    if r.status_note:
        lines.append(_wrap(f"Status: {r.status_note}", "  "))
    lines.append(_wrap(f"Rule set: {r.ruleset.id} {r.ruleset.version} (doi:{r.ruleset.doi}, "
                       f"PMID {r.ruleset.pmid})", "  "))
    for w in r.warnings:
        lines.append(_wrap(f"warning: {w}", "  "))
    return "\n".join(lines)
