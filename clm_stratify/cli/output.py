"""Everything the commands print: the text report of one classification, the run summary
table, the JSON shape of results, progress, and the plain lines of the other commands.

Standard output carries the result; standard error carries progress, warnings and errors.
While a command runs, both are guarded against a reader that goes away
(:func:`guarded_streams`): a closed pipe drops the rest of that stream's output, it never
interrupts the command's work.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

from engine import explain
from engine.classify import Classification


# --------------------------------------------------------------------------- closed pipes
# The exit code of a command whose standard output was closed by its reader before all
# of it was written (``clm-stratify run --all | head -1``): 128 + SIGPIPE, as a shell tool
# killed by SIGPIPE exits (fhir_adapters.project.EXIT_CLOSED_PIPE). A command's own
# failure code (1, 2, 3) takes precedence.


def _is_closed_pipe(exc: OSError) -> bool:
    """The reader of the stream went away (a pipe, or a socket, closed at the other end)."""
    return isinstance(exc, (BrokenPipeError, ConnectionResetError))


class GuardedStream:
    """``sys.stdout`` or ``sys.stderr`` while a command runs: writes and flushes pass through
    until the reader closes the stream; then the stream is marked :attr:`closed_by_reader`,
    its file descriptor is pointed at ``os.devnull`` (so that what is still buffered, and
    what the interpreter flushes at exit, goes nowhere without an error: the recipe of
    the Python docs, "Note on SIGPIPE") and the rest of the output is dropped. Every
    other attribute is the stream's own."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except OSError as exc:
                if not _is_closed_pipe(exc):
                    raise
                self._reader_gone()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except OSError as exc:
                if not _is_closed_pipe(exc):
                    raise
                self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed_by_reader = True
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):   # not a file (a test's capture): nothing to point
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _fill_closed_descriptors() -> None:
    """A standard stream closed before the command started (``2>&-``, ``>&-``): its file
    descriptor is opened on ``os.devnull``, so that no file the command opens (the inbox,
    a log) takes descriptor 0, 1 or 2 and receives its output. ``sys.stdout`` /
    ``sys.stderr`` (None then, and ``print(..., file=sys.stderr)`` would write on standard
    output) become streams that write nowhere. This is output the user sent away on
    purpose (like ``>/dev/null``): the exit code is the command's own."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))   # closed once put back (None) and unused


@contextmanager
def guarded_streams() -> Iterator[tuple[GuardedStream, GuardedStream]]:
    """Run a command with ``sys.stdout`` and ``sys.stderr`` guarded (:class:`GuardedStream`);
    both are flushed at the end (a reader that closed the pipe is noticed there too) and
    put back. Yields the two guards: ``stdout.closed_by_reader`` tells that the result was
    not all delivered."""
    saved = sys.stdout, sys.stderr
    _fill_closed_descriptors()
    guards = GuardedStream(sys.stdout), GuardedStream(sys.stderr)
    sys.stdout, sys.stderr = guards
    try:
        yield guards
    finally:
        try:
            for guard in guards:
                guard.flush()
        finally:
            sys.stdout, sys.stderr = saved


# --------------------------------------------------------------------------- plain lines
def out(text: str = "") -> None:
    """One result line (or block) on standard output."""
    print(text)


def err(text: str) -> None:
    """One line of news, a warning or an error on standard error."""
    print(text, file=sys.stderr)


def progress(done: int, total: int) -> None:
    """A progress bar of a population run on standard error, when it is a terminal."""
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total) if total else width
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} patients", end="", file=sys.stderr)
    if done >= total:
        print(file=sys.stderr)


# --------------------------------------------------------------------------- one classification
# A factor's state as a fixed-width mark, so an unknown factor stands out in the report.
_MARK = {"present": "present", "absent": "absent ", "unknown": "UNKNOWN"}


def _refs(refs: tuple[str, ...], limit: int = 4) -> str:
    if not refs:
        return ""
    shown = ", ".join(refs[:limit])
    return f" [{shown}{', ...' if len(refs) > limit else ''}]"


def _wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, width=92, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False, break_long_words=False)


def text_report(r: Classification) -> str:
    """A short, readable text report of one classification."""
    who = r.patient or "(patient not named)"
    lines = [f"{who}: {explain.headline(r)}"]
    if not r.assessed:
        lines.append(_wrap(r.not_assessed_reason or "", "  "))
    lines.append(_wrap(f"Why: {explain.reason_text(r)}", "  "))
    lines.append("  Prognostic factors at recurrence:")
    for c in r.criteria.values():
        threshold = explain.threshold_text(c)
        op = f" (threshold {threshold})" if threshold else ""
        lines.append(_wrap(f"[{_MARK[c.state]}] {explain.factor_text(c)}{op}{_refs(c.refs)}", "    "))
        if c.state == "unknown" and c.note:
            lines.append(_wrap(f"why unknown: {c.note}", "        "))
    lines.append("  Other facts:")
    for c in r.facts.values():
        lines.append(_wrap(f"{explain.factor_text(c)}{_refs(c.refs)}", "    "))
    if r.missing:
        lines.append("  Missing facts:")
        lines += [_wrap(f"- {m}", "    ") for m in explain.missing_texts(r)]
    if r.recommendations:
        lines.append("  Recommendations:")
        lines += [_wrap(f"- {rec}", "    ") for rec in explain.recommendation_texts(r)]
    cohort = explain.cohort_text(r)
    if cohort:
        lines.append(_wrap(cohort, "  "))
    if r.status_note:
        lines.append(_wrap(f"Status: {r.status_note}", "  "))
    lines.append(_wrap(f"Rule set: {explain.ruleset_text(r)}", "  "))
    for w in r.warnings:
        lines.append(_wrap(f"warning: {w}", "  "))
    return "\n".join(lines)


def print_classification(result: Classification, fmt: str) -> None:
    """``classify``: the classification as the text report or as JSON."""
    if fmt == "json":
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print(text_report(result))


# --------------------------------------------------------------------------- a run on a server
# The rows of the run summary after the groups: every patient is in exactly one row.
_OTHER_ROWS = (("no-recurrence", "no-recurrence"), ("not-found", "not found"), ("failed", "failed"))
_WRITE_ACTIONS = ("created", "updated", "unchanged", "would-create", "would-update")


def summary_table(summary) -> str:
    """Patients per group (assessed ones only), then no-recurrence, not found and failed
    patients, and a total that is their sum (every patient of the run once); then the
    RiskAssessments per write action, and the failures."""
    from engine.ruleset import GROUP_IDS

    lines = [f"{'group':<24}{'patients':>9}"]
    for g in GROUP_IDS:
        lines.append(f"{g:<24}{summary.groups.get(g, 0):>9}")
    acts = summary.actions
    for action, label in _OTHER_ROWS:
        if action != "not-found" or acts.get(action):
            lines.append(f"{label:<24}{acts.get(action, 0):>9}")
    lines.append(f"{'total':<24}{summary.total:>9}")
    written = [f"{k} {acts[k]}" for k in _WRITE_ACTIONS if acts.get(k)]
    lines.append("RiskAssessments: " + (", ".join(written) if written else "none"))
    if summary.failures:
        lines.append("Failed (not written; run again to retry):")
        lines += [f"  {r.patient}: {r.error}" for r in summary.failures]
    return "\n".join(lines)


def why(r) -> str:
    """Why a patient of a run got what it got, in a few words, where the group alone does
    not say: the facts an indeterminate result misses (by their labels; the texts and
    details are in the JSON and the report), the reason a patient was not assessed, the
    error of a failure ('' otherwise)."""
    c = r.classification
    if r.failed or c is None:
        return r.error or ""
    if not c.assessed:
        return c.not_assessed_reason or ""
    if c.group == "indeterminate":
        labels = {**{k: v.label for k, v in c.facts.items()}, **{k: v.label for k, v in c.criteria.items()}}
        return "unknown: " + "; ".join(labels.get(m.fact, m.fact) for m in c.missing) if c.missing else c.reason
    return ""


def shown(r) -> tuple[str | None, str | None]:
    """The group and status a run reports for a patient: none for a patient the rule set
    does not assess (no-recurrence: no assessment, so no group; the engine's placeholder
    group stays inside ``classification``) or that failed."""
    return (r.group, r.status) if r.assessed else (None, None)


def run_listing(summary) -> str:
    """``run --list``: one line per patient: patient, group, status, action, and why (:func:`why`)."""
    rows = [(str(r.patient), *(v or "-" for v in shown(r)), r.action, why(r)) for r in summary.results]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(("patient", "group", "status",
                                                                                   "action"))]
    head = ("patient", "group", "status", "action", "why")
    return "\n".join(("  ".join(f"{v:<{w}}" for v, w in zip(row[:4], widths)) + "  " + row[4]).rstrip()
                     for row in [head, *rows])


def result_json(r) -> dict:
    """The JSON shape of one patient's result (a :class:`~clm_stratify.pipeline.PatientResult`)
    in a run: what was done and why at the top (``reason``, ``missing``: the missing facts),
    the whole classification below."""
    c = r.classification
    group, status = shown(r)
    return {"patient": str(r.patient), "action": r.action, "group": group, "status": status,
            "reason": (c.reason if c.assessed else c.not_assessed_reason) if c else None,
            "missing": [{"fact": m.fact, "text": m.text, "detail": m.detail} for m in c.missing] if c else [],
            "risk_assessment": r.risk_assessment, "error": r.error,
            "classification": c.to_json() if c else None,
            **({"would_write": r.written} if r.action.startswith("would-") else {})}


def dry_run_banner(fhir_url: str) -> str:
    return f"DRY RUN: nothing was written to {fhir_url}"


def print_run(summary, stratifier, client, fmt: str, one_patient: bool, listing: bool = False) -> None:
    """``run`` (and ``demo``): the results of a run as one JSON document (every patient in
    it), or as text: the summary table, preceded by the report and what --dry-run would
    write when the run was of one patient, or by one line per patient with ``listing``.
    A dry run says at the start and at the end that nothing was written."""
    from fhir_adapters.fhir.client import dumps

    if fmt == "json":
        print(dumps({"fhir_url": client.base_url, "dry_run": stratifier.dry_run,
                     "data_source": stratifier.last_source or "patient-search",
                     "write_strategy": stratifier.writer.strategy.name,
                     "strategy_notes": list(stratifier.writer.choice.notes),
                     "patients": [result_json(r) for r in summary.results], "total": summary.total,
                     "groups": dict(summary.groups), "actions": dict(summary.actions)}))
        return
    if stratifier.dry_run:
        print(dry_run_banner(client.base_url))
    if one_patient:
        r = summary.results[0]
        if r.classification:
            print(text_report(r.classification))
        if r.action.startswith("would-"):
            print(f"\n--dry-run: would write ({r.action}):")
            for resource in r.written:
                print(dumps(resource))
    elif listing:
        print(run_listing(summary))
    print(summary_table(summary))
    if stratifier.last_source:
        print(f"Data read by: {stratifier.last_source} ({client.round_trips} HTTP round trips)")
    print(f"Write strategy: {stratifier.writer.strategy.name}"
          + "".join(f"\n  note: {n}" for n in stratifier.writer.choice.notes))
    if stratifier.dry_run:
        print(dry_run_banner(client.base_url))


# --------------------------------------------------------------------------- subscriptions and inbox
def print_inbox(inbox) -> None:
    """``inbox``: the items per state, the items failing and waiting for their next try,
    then the dead letters."""
    from clm_stratify.service.health import iso

    depth = inbox.depth()
    print("inbox " + ", ".join(f"{k} {v}" for k, v in sorted(depth.items())) if depth else "inbox empty")
    retrying = inbox.retrying()
    if retrying:
        print("retrying (failed, will be tried again):")
        for d in retrying:
            who = f" {d['patient']}" if d["patient"] else ""
            print(f"  {d['kind']}:{d['id']}{who} after {d['attempts']} attempts, next at {iso(d['next'])}: "
                  f"{d['error']}")
    dead = inbox.dead_letters()
    if dead:
        print("dead letters (replay with --replay KIND:ID or --replay-all; give up with --drop KIND:ID "
              "or --drop-all):")
        for d in dead:
            who = f" {d['patient']}" if d["patient"] else ""
            since = iso(d["at"]) if d["at"] is not None else "an unknown time (dead-lettered by an earlier release)"
            print(f"  {d['kind']}:{d['id']}{who} after {d['attempts']} attempts, dead since {since}: {d['error']}")
