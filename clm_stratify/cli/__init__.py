"""Command-line interface: ``clm-stratify`` (or ``python -m clm_stratify``).

One module per command (its function and its ``add_parser``); the options several
commands share are in :mod:`clm_stratify.cli.common`, and everything they print goes
through :mod:`clm_stratify.cli.output`.

Exit codes: 0 success, 1 a patient or a run failed, 2 bad input (file, rule set,
arguments), 3 the FHIR server could not be used, 4 ``run --patient``: the server has no
such patient, 141 (128 + SIGPIPE, as a shell tool
killed by SIGPIPE) the command did all its work but its standard output was closed by
the reader before all of it was written (``clm-stratify run --all | head -1``).

A closed pipe never interrupts a command: the rest of that stream's output is dropped
(no traceback, no "Exception ignored" at exit) and the command finishes its work (a
``run`` writes every RiskAssessment it would have written); see
:func:`clm_stratify.cli.output.guarded_streams`. A command's own failure (1, 2, 3) is
the exit code even when its output was cut short too. Standard error closed by its reader
drops the messages and keeps the command's own exit code, and so does a standard output or
error closed before the command started (``>&-``, ``2>&-``: sent away, like ``>/dev/null``).
"""

from __future__ import annotations

import argparse

from clm_stratify.cli import classify, demo, inbox, interop, output, population, rules, run, serve, subscribe
from clm_stratify.cli import cds_hooks
from clm_stratify.cli.common import UsageError
from fhir_adapters.project import EXIT_BAD_INPUT, EXIT_CLOSED_PIPE, EXIT_OK, VERSION

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  clm-stratify demo
  clm-stratify run --fhir-url http://127.0.0.1:8090/fhir --all
  clm-stratify run --fhir-url http://127.0.0.1:8090/fhir --all --list --dry-run
  clm-stratify run --fhir-url https://fhir.example.org/r4 --patient 123 --dry-run --format json
  clm-stratify run --fhir-url URL --all --auth smart --smart-client-id clm --smart-key key.pem
  CLM_SUBSCRIPTION_SECRET=... clm-stratify serve --fhir-url http://127.0.0.1:8090/fhir --port 8765
  clm-stratify cds-hooks --fhir-url http://127.0.0.1:8090/fhir --port 8766 --cds-client ISS=ehr-jwks.json
  CLM_SUBSCRIPTION_SECRET=... clm-stratify subscribe --fhir-url http://127.0.0.1:8090/fhir --endpoint http://127.0.0.1:8765/notify
  clm-stratify inbox --inbox clm-inbox.sqlite
  clm-stratify population --ndjson export/ --out out/
  clm-stratify write-back --from out/ --fhir-url http://127.0.0.1:8090/fhir
  clm-stratify classify --bundle fixtures/05-borderline-size-50mm-exact.json
  clm-stratify classify --bundle patient.json --format json
  clm-stratify rules validate rules/resectability.yaml
  clm-stratify rules diff --rules new.yaml --bundle fixtures/
  clm-stratify rules validate --terminology rules/terminology.yaml
"""

# The commands in the order ``clm-stratify --help`` lists them.
COMMANDS = (classify, run, population, demo, serve, cds_hooks, subscribe, inbox, interop, rules)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines), and every option's
    default at the end of its help: ``(default: 5.0)``. Not for defaults that say nothing
    (None, False: a flag that is off) nor for helps that already name their default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not shows_default(action) or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


def shows_default(action: argparse.Action) -> bool:
    """An option whose default says something (not None, False, an empty list of a
    repeatable option, or suppressed)."""
    empty = isinstance(action.default, (list, tuple)) and not action.default
    return bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS) \
        and not empty and action.help is not argparse.SUPPRESS


def _subparsers(parser: argparse.ArgumentParser):
    """``parser`` and every parser below it (``rules validate`` too)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _subparsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clm-stratify",
        description="Resectability of recurrent colorectal liver metastases (Kobayashi et al., "
                    "Ann Surg Oncol 2024) from FHIR R4 data, fired by a declarative rule set.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"clm-stratify {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for p in _subparsers(parser):   # one formatter for every command's --help
        p.formatter_class = HelpFormatter
        for action in p._actions:
            if action.help is None and shows_default(action):
                action.help = "default: %(default)s"   # argparse prints no help line for an option without help
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default: the command line); its exit code (see above).
    argparse's own exits (``--help``, ``--version``, a usage error) stay ``SystemExit``."""
    argparse_exit = None
    with output.guarded_streams() as (stdout, _stderr):
        try:
            code = _command(argv)
        except SystemExit as exc:   # argparse printed help, the version or a usage error
            argparse_exit, code = exc, exc.code
    if stdout.closed_by_reader and code in (EXIT_OK, None):
        code = EXIT_CLOSED_PIPE
    if argparse_exit is not None:
        raise SystemExit(code) from None
    return code


def _command(argv: list[str] | None) -> int:
    from engine.classify import RulesetInconsistentError
    from engine.yamlfile import DeclarativeFileError
    from fhir_adapters.sources.bundle import BundleError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (BundleError, DeclarativeFileError, RulesetInconsistentError, UsageError) as exc:
        output.err(f"error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        output.err("interrupted")
        return 130
