"""Command-line interface: ``clm-stratify`` (or ``python -m clm_stratify``).

Exit codes: 0 success, 1 a patient or a run failed, 2 bad input (file, rule set,
arguments), 3 the FHIR server could not be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clm_stratify import __version__

EXAMPLES = """\
examples:
  clm-stratify classify --bundle fixtures/05-borderline-size-50mm-exact.json
  clm-stratify classify --bundle patient.json --format json
  clm-stratify rules validate rules/resectability.yaml
  clm-stratify rules validate --terminology rules/terminology.yaml
"""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_SERVER = 0, 1, 2, 3


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _load_engine_and_terminology(args: argparse.Namespace):
    from engine.classify import Engine
    from fhir_adapters.terminology import load_terminology

    engine = Engine.from_file(args.rules) if args.rules else Engine.default()
    return engine, load_terminology(args.terminology)


def cmd_classify(args: argparse.Namespace) -> int:
    from clm_stratify.report import text_report
    from fhir_adapters.bundle import read_bundle_file
    from fhir_adapters.mapping import map_features

    engine, terminology = _load_engine_and_terminology(args)
    record = read_bundle_file(args.bundle)
    result = engine.classify(map_features(record, terminology))
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print(text_report(result))
    return EXIT_OK


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
    print("\n".join(checked))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clm-stratify",
        description="Resectability of recurrent colorectal liver metastases (Kobayashi et al., "
                    "Ann Surg Oncol 2024) from FHIR R4 data, fired by a declarative rule set.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"clm-stratify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def rules_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rules", metavar="PATH", help="rule set YAML (default: rules/resectability.yaml)")
        p.add_argument("--terminology", metavar="PATH",
                       help="terminology YAML (default: rules/terminology.yaml)")

    p = sub.add_parser("classify", help="classify one patient from a FHIR Bundle file",
                       epilog="example:\n  clm-stratify classify --bundle patient.json --format json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="FILE",
                   help="FHIR R4 Bundle (collection, searchset or transaction) of one patient")
    rules_options(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("rules", help="check rule set and terminology files")
    rules_sub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    v = rules_sub.add_parser("validate", help="validate a rule set (and/or a terminology) file",
                             epilog="examples:\n  clm-stratify rules validate rules/resectability.yaml\n"
                                    "  clm-stratify rules validate --terminology my-site-terms.yaml",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("path", nargs="?", help="rule set YAML (default: the project's rule set)")
    v.add_argument("--terminology", metavar="PATH", help="also validate this terminology file")
    v.set_defaults(func=cmd_rules_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.classify import RulesetInconsistentError
    from engine.yamlfile import DeclarativeFileError
    from fhir_adapters.bundle import BundleError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (BundleError, DeclarativeFileError, RulesetInconsistentError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
