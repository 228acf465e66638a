"""``clm-stratify interop``: test a FHIR server: store, read back, classify, write, clean up."""

from __future__ import annotations

import argparse

from clm_stratify.cli.common import add_rules_options, add_server_options, load_rules, make_client


def cmd_interop(args: argparse.Namespace) -> int:
    """Test a FHIR server end to end (the clm_stratify.interop package); exit 1 when a check failed."""
    from clm_stratify.interop import run_command

    rules = load_rules(args)
    with make_client(args) as client:
        return run_command(client, rules, report_path=args.report, keep=args.keep)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "interop", help="test a FHIR server: store, read back, classify, write, clean up",
        epilog="examples:\n  clm-stratify interop --fhir-url http://127.0.0.1:8090/fhir --report r.json\n"
               "  clm-stratify interop --fhir-url URL --auth bearer --keep",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    p.add_argument("--report", metavar="PATH", help="write the JSON report (checks, quirks, timings) here")
    p.add_argument("--keep", action="store_true", help="leave the run's tagged test data and assessments")
    add_server_options(p)
    add_rules_options(p)
    p.set_defaults(func=cmd_interop)
