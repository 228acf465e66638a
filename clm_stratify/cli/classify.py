"""``clm-stratify classify``: classify one patient from a FHIR Bundle file."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import add_format_option, add_rules_options, load_rules
from fhir_adapters.project import EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from clm_stratify.pipeline import evaluate
    from fhir_adapters.sources.bundle import read_bundle_file

    rules = load_rules(args)
    record = read_bundle_file(args.bundle, args.patient)
    result = evaluate(record, rules)
    output.print_classification(result, args.format)
    return EXIT_OK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("classify", help="classify one patient from a FHIR Bundle file",
                              epilog="example:\n  clm-stratify classify --bundle patient.json --format json",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="FILE",
                   help="FHIR R4 Bundle (collection, searchset or transaction) of one patient")
    p.add_argument("--patient", metavar="ID",
                   help="the patient to classify when the Bundle holds several patients' resources "
                        "(default: the Bundle's only Patient); other patients' resources are ignored and named")
    add_rules_options(p)
    add_format_option(p)
    p.set_defaults(func=cmd_classify)
