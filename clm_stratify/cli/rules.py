"""``clm-stratify rules validate``: check rule set and terminology files.
``clm-stratify rules diff``: a shadow run of a new rule set (who would move; writes nothing)."""

from __future__ import annotations

import argparse
import json

from clm_stratify.cli import output
from clm_stratify.cli.common import UsageError, add_format_option, add_server_options, make_client, patient_ref
from fhir_adapters.project import EXIT_FAILED, EXIT_OK, EXIT_SERVER


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
    _add_diff_parser(rules_sub)


# --------------------------------------------------------------------------- rules diff
def cmd_rules_diff(args: argparse.Namespace) -> int:
    from engine.classify import Engine
    from engine.shadow import shadow_run
    from fhir_adapters.fhir.client import FhirError, FhirServerUnavailable
    from fhir_adapters.terminology import load_terminology

    current = Engine.from_file(args.current) if args.current else Engine.default()
    new = Engine.from_file(args.rules)
    terminology = load_terminology(args.terminology)
    try:
        shadow_input = _gather(args, terminology)
    except FhirServerUnavailable as exc:
        output.err(f"error: FHIR server unavailable: {exc}")
        return EXIT_SERVER
    except FhirError as exc:
        output.err(f"error: {exc}" + (f" ({exc.outcome})" if exc.outcome and exc.outcome not in str(exc) else ""))
        return EXIT_SERVER
    diff = shadow_run(shadow_input.features, current, new)
    if args.format == "json":
        data = {**diff.to_json(), "input": shadow_input.source, "written": "nothing",
                "failures": [{"patient": p, "error": e} for p, e in shadow_input.failures],
                "notes": [*diff.notes, *shadow_input.notes]}
        output.out(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        output.out(diff_text(diff, shadow_input))
    if shadow_input.failures:
        return EXIT_FAILED
    return EXIT_FAILED if args.fail_on_change and diff.changed else EXIT_OK


def _gather(args: argparse.Namespace, terminology):
    """The features to compare, from the one input given."""
    from clm_stratify.population import InputError
    from clm_stratify.population.shadow import from_bundles, from_features, from_server

    if (args.all or args.patient) and not args.fhir_url:
        raise UsageError("--all and --patient read from a FHIR server: give --fhir-url")
    if args.fhir_url and bool(args.all) == bool(args.patient):
        raise UsageError("--fhir-url: give --all (every patient with a liver-metastasis Condition) or --patient ID")
    if args.bundle:
        return from_bundles(args.bundle, terminology)
    if args.from_features:
        try:
            return from_features(args.from_features, terminology)
        except InputError as exc:
            raise UsageError(str(exc)) from None
    with make_client(args) as client:
        patients = [patient_ref(p, args.fhir_url) for p in args.patient] if args.patient else None
        return from_server(client, terminology, patients)


def diff_text(diff, shadow_input) -> str:
    """The text report: the pair, the input, the transition matrix, who moves and why."""
    from engine.shadow import STATES

    ref = lambda r: f"{r.id} {r.version} (sha256 {r.sha256[:12]})"  # noqa: E731
    lines = ["Shadow run of a rule set: nothing is written (no assessment, no file).",
             f"current: {ref(diff.current)}", f"new:     {ref(diff.new)}",
             f"input:   {shadow_input.source}: {diff.patients} patient(s) compared, "
             f"{len(shadow_input.failures)} failed"]
    lines += [f"  {n}" if n.startswith("warning") else f"  note: {n}" for n in (*diff.notes, *shadow_input.notes)]
    width = max(map(len, STATES)) + 2
    lines += ["", "current \\ new".ljust(width) + "  ".join(STATES)]
    lines += [row.ljust(width) + "  ".join(str(diff.matrix[row][col]).rjust(len(col)) for col in STATES)
              for row in STATES]
    lines += ["", f"moved: {len(diff.moved)}"] + [_move_line(m) for m in diff.moved]
    if diff.status_changed:
        lines += ["", f"status changed, same group: {len(diff.status_changed)}"]
        lines += [_move_line(m) for m in diff.status_changed]
    if shadow_input.failures:
        lines += ["", f"failed (not compared): {len(shadow_input.failures)}"]
        lines += [f"  {p}: {e}" for p, e in shadow_input.failures]
    lines += ["", f"unchanged: {diff.unchanged}"]
    return "\n".join(lines)


def _move_line(m) -> str:
    why = "; ".join(f"{c.label}" + (f" ({c.test_before} -> {c.test_after})" if c.test_before != c.test_after else "")
                    + f" {c.before} -> {c.after} ({c.value})" for c in m.changes)
    return (f"  {m.patient}: {m.before} ({m.before_status}) -> {m.after} ({m.after_status}) "
            f"[{m.before_rule} -> {m.after_rule}]" + (f": {why}" if why else ""))


def _add_diff_parser(rules_sub) -> None:
    d = rules_sub.add_parser(
        "diff", help="shadow run: classify with the current and a new rule set, show who would move (writes nothing)",
        epilog="examples:\n  clm-stratify rules diff --rules new.yaml --bundle fixtures/\n"
               "  clm-stratify rules diff --rules new.yaml --fhir-url http://127.0.0.1:8090/fhir --all\n"
               "  clm-stratify rules diff --rules new.yaml --from-features out/ --format json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--rules", required=True, metavar="NEW.yaml", help="the new rule set")
    d.add_argument("--current", metavar="PATH", help="the current rule set (default: the project's)")
    d.add_argument("--terminology", metavar="PATH", help="terminology YAML (default: rules/terminology.yaml)")
    source = d.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", action="append", metavar="F",
                        help="a patient's Bundle file, or a directory of them (*.json); repeatable")
    source.add_argument("--fhir-url", metavar="URL", help="read the patients from this FHIR server (read only)")
    source.add_argument("--from-features", metavar="DIR", help="the features of a population run (OUT or OUT/features)")
    d.add_argument("--all", action="store_true", help="--fhir-url: every patient with a liver-metastasis Condition")
    d.add_argument("--patient", action="append", metavar="ID", help="--fhir-url: this patient (repeatable)")
    d.add_argument("--fail-on-change", action="store_true",
                   help="exit 1 when any patient would move or change status (for rule-set CI)")
    add_server_options(d)
    add_format_option(d)
    d.set_defaults(func=cmd_rules_diff)
