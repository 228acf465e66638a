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
from decimal import Decimal

from engine.classify import Classification, Criterion


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
    """A short, readable text report of one classification."""
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


def print_classification(result: Classification, fmt: str) -> None:
    """``classify``: the classification as the text report or as JSON."""
    if fmt == "json":
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print(text_report(result))


# --------------------------------------------------------------------------- a run on a server
def summary_table(summary) -> str:
    """Patients per group and RiskAssessments per action of a run, then its failures."""
    from engine.ruleset import GROUP_IDS

    lines = [f"{'group':<24}{'patients':>9}"]
    for g in GROUP_IDS:
        lines.append(f"{g:<24}{summary.groups.get(g, 0):>9}")
    lines.append(f"{'total classified':<24}{sum(summary.groups.values()):>9}")
    acts = summary.actions
    lines.append("RiskAssessments: " + ", ".join(f"{k} {acts[k]}" for k in
                 ("created", "updated", "unchanged", "would-create", "would-update", "no-recurrence", "failed")
                 if acts.get(k)))
    if summary.failures:
        lines.append("Failed (not written; run again to retry):")
        lines += [f"  {r.patient}: {r.error}" for r in summary.failures]
    return "\n".join(lines)


def result_json(r) -> dict:
    """The JSON shape of one patient's result (a :class:`~clm_stratify.pipeline.PatientResult`) in a run."""
    return {"patient": str(r.patient), "action": r.action, "group": r.group, "status": r.status,
            "risk_assessment": r.risk_assessment, "error": r.error,
            "classification": r.classification.to_json() if r.classification else None,
            **({"would_write": r.written} if r.action.startswith("would-") else {})}


def print_run(summary, stratifier, client, fmt: str, one_patient: bool) -> None:
    """``run`` (and ``demo``): the results of a run as JSON, or the summary table as text
    (with the report, and with what --dry-run would write, when the run was of one patient)."""
    from fhir_adapters.fhir.client import dumps

    if fmt == "json":
        print(dumps({"fhir_url": client.base_url, "data_source": stratifier.last_source or "patient-search",
                     "write_strategy": stratifier.writer.strategy.name,
                     "strategy_notes": list(stratifier.writer.choice.notes),
                     "patients": [result_json(r) for r in summary.results],
                     "groups": dict(summary.groups), "actions": dict(summary.actions)}))
        return
    if one_patient:
        r = summary.results[0]
        if r.classification:
            print(text_report(r.classification))
        if r.action.startswith("would-"):
            print(f"\n--dry-run: would write ({r.action}):")
            for resource in r.written:
                print(dumps(resource))
    print(summary_table(summary))
    if stratifier.last_source:
        print(f"Data read by: {stratifier.last_source} ({client.round_trips} HTTP round trips)")
    print(f"Write strategy: {stratifier.writer.strategy.name}"
          + "".join(f"\n  note: {n}" for n in stratifier.writer.choice.notes))


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
            print(f"  {d['kind']}:{d['id']}{who} after {d['attempts']} attempts, at {iso(d['at'])}: {d['error']}")
