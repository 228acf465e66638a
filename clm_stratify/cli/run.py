"""``clm-stratify run``: classify patients on a FHIR server and write RiskAssessments back.

:func:`run_live` is the run itself, shared with ``clm-stratify demo``.
"""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import (add_format_option, add_rules_options, add_server_options,
                                     load_rules, make_client, patient_ref)
from fhir_adapters.project import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_SERVER


def run_live(args: argparse.Namespace, client) -> int:
    """Classify ``args.patient`` (or every patient) on the client's server, write back
    (unless ``args.dry_run``) and print the results; exit 1 when a patient failed, 4 when
    the one patient asked for is not on the server."""
    from clm_stratify.pipeline import RunSummary, Stratifier

    rules = load_rules(args)
    stratifier = Stratifier(client, rules, dry_run=args.dry_run)
    if args.dry_run:
        output.err(f"DRY RUN: nothing will be written to {client.base_url}")
    if args.patient:
        summary = RunSummary([stratifier.patient(patient_ref(args.patient, args.fhir_url))])
        if summary.results[0].action == "not-found":
            if args.format == "json":
                output.print_run(summary, stratifier, client, args.format, one_patient=True)
            output.err(f"error: {summary.results[0].error}")
            return EXIT_NOT_FOUND
    else:
        summary = stratifier.population(progress=output.progress, bulk=False if args.no_bulk else None)
    output.print_run(summary, stratifier, client, args.format, one_patient=bool(args.patient),
                     listing=getattr(args, "list", False))
    return EXIT_FAILED if summary.failures else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from fhir_adapters.fhir.client import FhirError, FhirServerUnavailable

    with make_client(args) as client:
        try:
            return run_live(args, client)
        except FhirServerUnavailable as exc:
            output.err(f"error: FHIR server unavailable: {exc}")
            return EXIT_SERVER
        except FhirError as exc:
            output.err(f"error: {exc}"
                       + (f" ({exc.outcome})" if exc.outcome and exc.outcome not in str(exc) else ""))
            return EXIT_SERVER


def add_list_option(p: argparse.ArgumentParser) -> None:
    """``--list``: one line per patient before the summary (``--format json`` always lists them)."""
    p.add_argument("--list", action="store_true",
                   help="one line per patient: group, status, action, and why (the reason and missing facts of "
                        "an indeterminate result, the error of a failure); JSON always has them")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="classify patients on a FHIR server and write RiskAssessments back",
                              epilog="examples:\n  clm-stratify run --fhir-url http://127.0.0.1:8090/fhir --all\n"
                                     "  clm-stratify run --fhir-url URL --all --list --dry-run\n"
                                     "  clm-stratify run --fhir-url URL --patient 123 --dry-run\n\n"
                                     f"exit codes: {EXIT_OK} done, {EXIT_FAILED} a patient failed (listed), "
                                     f"{EXIT_BAD_INPUT} bad input, {EXIT_SERVER} server unusable,\n"
                                     f"  {EXIT_NOT_FOUND} --patient: no such patient on the server",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="one patient (logical id)")
    who.add_argument("--all", action="store_true",
                     help="every patient with a liver-metastasis Condition")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--no-bulk", action="store_true",
                   help="--all: search in chunks of patients even when the server offers $export")
    add_list_option(p)
    add_server_options(p)
    add_rules_options(p)
    add_format_option(p)
    p.set_defaults(func=cmd_run)
