"""``clm-stratify run``: classify patients on a FHIR server and write RiskAssessments back.

:func:`run_live` is the run itself, shared with ``clm-stratify demo``.
"""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import (add_format_option, add_rules_options, add_server_options,
                                     load_rules, make_client, patient_ref)
from fhir_adapters.project import EXIT_FAILED, EXIT_OK, EXIT_SERVER


def run_live(args: argparse.Namespace, client) -> int:
    """Classify ``args.patient`` (or every patient) on the client's server, write back
    (unless ``args.dry_run``) and print the results; exit 1 when a patient failed."""
    from clm_stratify.pipeline import RunSummary, Stratifier

    rules = load_rules(args)
    stratifier = Stratifier(client, rules, dry_run=args.dry_run)
    if args.patient:
        summary = RunSummary([stratifier.patient(patient_ref(args.patient, args.fhir_url))])
    else:
        summary = stratifier.population(progress=output.progress, bulk=False if args.no_bulk else None)
    output.print_run(summary, stratifier, client, args.format, one_patient=bool(args.patient))
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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="classify patients on a FHIR server and write RiskAssessments back",
                              epilog="examples:\n  clm-stratify run --fhir-url http://127.0.0.1:8090/fhir --all\n"
                                     "  clm-stratify run --fhir-url URL --patient 123 --dry-run",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="one patient (logical id)")
    who.add_argument("--all", action="store_true",
                     help="every patient with a liver-metastasis Condition")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--no-bulk", action="store_true",
                   help="--all: search in chunks of patients even when the server offers $export")
    add_server_options(p)
    add_rules_options(p)
    add_format_option(p)
    p.set_defaults(func=cmd_run)
