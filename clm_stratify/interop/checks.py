"""What ``clm-stratify interop`` reports: check results, the quirks met, the run's report
(with its JSON form and exit code), and the report as a text table."""

from __future__ import annotations

import shutil
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass, field

from fhir_adapters.project import EXIT_FAILED, EXIT_OK, EXIT_SERVER, VERSION

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STEPS = ("capabilities", "load", "read-back", "write", "subscription", "cleanup")

#: quirk id -> what it is (the report adds what was seen and how the project copes).
QUIRKS = {
    "bundle-total-absent": "Bundle.total is absent from searchsets",
    "bundle-total-inaccurate": "Bundle.total differs from the number of resources the search returned",
    "paging-absent": "a searchset page has no next link although more results exist (Bundle.total says so, "
                     "or the page is full)",
    "long-next-links": "next links carry long continuation tokens",
    "application-json-content-type": "replies are application/json, not application/fhir+json",
    "409-on-version-conflict": "409 instead of 412 on a version conflict (stale If-Match)",
    "412-on-multiple-match-conditional-create": "412 on a conditional create with several matches",
    "conditional-create-multiple-matches": "a conditional create with several matches is not answered 412",
    "search-parameter-ignored": "search parameters are ignored (the search returns what its filter excludes)",
    "handling-strict-ignored": "Prefer: handling=strict does not make an unknown search parameter an error",
    "unknown-parameter-matches-nothing": "an unknown search parameter makes the search match nothing "
                                         "(neither ignored nor rejected)",
    "riskassessment-search-unsupported": "RiskAssessment cannot be searched by patient or identifier",
    "identifier-search-misses": "an identifier search does not find the RiskAssessment just written with it",
    "count-not-honoured": "_count is not honoured (pages larger than asked for)",
}


SKIPPED_WITHOUT_ASSESSMENTS = (
    ("write", "write.read-back", "RiskAssessments read back"),
    ("write", "write.second", "second write is 'unchanged' (no new version)"),
    ("write", "write.no-duplicates", "one RiskAssessment + Provenance per patient"),
    ("write", "write.riskassessment-search", "RiskAssessment search finds the assessment"),
)
SKIPPED_WITHOUT_DATA = (
    ("read-back", "read.fetch-patient", "read back with the pipeline's searches"),
    ("read-back", "read.paging", "paging (_count=2, next links)"),
    ("read-back", "probe.version-conflict", "version conflict (stale If-Match)"),
    ("read-back", "probe.conditional-create", "conditional create, several matches"),
    ("write", "write.classify", "classification as expected (expected.yaml)"),
    ("write", "write.first", "write RiskAssessments + Provenance"),
) + SKIPPED_WITHOUT_ASSESSMENTS


@dataclass
class Check:
    """One check of the run: its result (``pass``, ``warn``, ``fail``, ``skip``) and why."""

    id: str
    step: str
    title: str
    status: str
    detail: str = ""
    outcome: str = ""          # the server's OperationOutcome text, on failures
    seconds: float = 0.0


@dataclass
class Quirk:
    """A known server quirk met during the run (:data:`QUIRKS`), and how the project copes."""

    id: str
    title: str
    detail: str
    handling: str
    evidence: str = ""         # the server's own words, when it said something


@dataclass
class InteropReport:
    """Everything a run found; :meth:`to_json` is the JSON report."""

    run_id: str
    fhir_url: str
    checks: list[Check] = field(default_factory=list)
    quirks: dict[str, Quirk] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    patients: list[dict] = field(default_factory=list)
    not_deleted: list[str] = field(default_factory=list)
    capabilities_read: bool = True

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        if not self.capabilities_read:
            return EXIT_SERVER
        return EXIT_FAILED if self.failed else EXIT_OK

    def to_json(self) -> dict:
        counts = Counter(c.status for c in self.checks)
        return {
            "tool": f"clm-stratify {VERSION} interop",
            "run_id": self.run_id,
            "fhir_url": self.fhir_url,
            "result": FAIL if self.failed else PASS,
            "exit_code": self.exit_code,
            "counts": {s: counts.get(s, 0) for s in (PASS, WARN, FAIL, SKIP)},
            **self.info,
            "steps": [{"step": s, "seconds": round(self.steps[s], 3)} for s in STEPS if s in self.steps],
            "checks": [asdict(c) | {"seconds": round(c.seconds, 3)} for c in self.checks],
            "quirks": [asdict(q) for q in self.quirks.values()],
            "patients": self.patients,
            "not_deleted": self.not_deleted,
        }


def short_list(items: list[str], n: int = 5) -> str:
    """The first ``n`` items joined with ``; ``, and how many more there are."""
    return "; ".join(items[:n]) + (f"; ... ({len(items) - n} more)" if len(items) > n else "")


def table(report: InteropReport, width: int | None = None) -> str:
    """The checks as a text table, then the quirks met, the step timings and the counts."""
    width = width or max(100, min(160, shutil.get_terminal_size((120, 24)).columns))
    info = report.info
    server = info.get("server") or {}
    ws = info.get("write_strategy") or {}
    lines = [f"clm-stratify interop: run {report.run_id} against {report.fhir_url}"]
    if server:
        lines.append(f"server: FHIR {server.get('fhir_version')} ({server.get('software')}); write strategy: "
                     f"{ws.get('strategy', '?')}; searches: {info.get('search_mode', '?')}")
    lines.append("")
    lines.append(f"{'step':<13}{'check':<45}{'result':<7}detail")
    indent = " " * 65
    for c in report.checks:
        text = c.detail + (f" [server: {c.outcome}]" if c.outcome and c.status in (FAIL, WARN) else "")
        wrapped = textwrap.wrap(text, max(30, width - 65), break_on_hyphens=False,
                                break_long_words=False) or [""]
        lines.append(f"{c.step:<13}{c.title[:44]:<45}{c.status.upper():<7}{wrapped[0]}")
        lines += [indent + w for w in wrapped[1:]]
    if report.quirks:
        lines += ["", "Quirks met:"]
        for q in report.quirks.values():
            lines += textwrap.wrap(f"- {q.id}: {q.detail}" + (f" (server: {q.evidence})" if q.evidence else ""),
                                   width, subsequent_indent="    ")
            lines += textwrap.wrap(f"handled: {q.handling}", width, initial_indent="    ", subsequent_indent="    ")
    if report.not_deleted:
        lines += ["", "Not deleted:"] + [f"  {r}" for r in report.not_deleted]
    counts = Counter(c.status for c in report.checks)
    steps = ", ".join(f"{s} {report.steps[s]:.2f} s" for s in STEPS if s in report.steps)
    lines += ["", f"Steps: {steps}",
              f"{len(report.checks)} checks: {counts.get(PASS, 0)} pass, {counts.get(WARN, 0)} warn, "
              f"{counts.get(FAIL, 0)} fail ({info.get('duration_seconds', 0):.1f} s)"]
    return "\n".join(lines)
