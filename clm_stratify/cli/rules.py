"""``clm-stratify rules validate``: check rule set and terminology files."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from fhir_adapters.project import EXIT_OK


def cmd_rules_validate(args: argparse.Namespace) -> int:
    from engine.classify import Engine
    from engine.ruleset import load_ruleset
    from fhir_adapters.terminology import load_terminology

    checked = []
    if args.path or not args.terminology:
        rs = load_ruleset(args.path)
        n = Engine(rs).check_coverage()
        checked.append(f"{args.path or 'default rule set'}: {rs.id} {rs.version} is valid "
                       f"({len(rs.groups)} group rules, {len(rs.recommendations)} recommendations; "
                       f"exactly one group for each of {n} combinations of facts)")
    if args.terminology:
        t = load_terminology(args.terminology)
        checked.append(f"{args.terminology}: terminology {t.id} {t.version} is valid")
    output.out("\n".join(checked))
    return EXIT_OK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("rules", help="check rule set and terminology files")
    rules_sub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    v = rules_sub.add_parser("validate", help="validate a rule set (and/or a terminology) file",
                             epilog="examples:\n  clm-stratify rules validate rules/resectability.yaml\n"
                                    "  clm-stratify rules validate --terminology my-site-terms.yaml",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("path", nargs="?", help="rule set YAML (default: the project's rule set)")
    v.add_argument("--terminology", metavar="PATH", help="also validate this terminology file")
    v.set_defaults(func=cmd_rules_validate)
