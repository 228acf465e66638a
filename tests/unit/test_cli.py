"""Command-line errors: one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import json

import pytest

from clm_stratify.cli import main

from fixtures import FIXTURES_DIR  # noqa: E402

FIXTURES = FIXTURES_DIR


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON at line 1"),
    ("[1, 2]", "expected a FHIR Bundle object, found a JSON list"),
    ('{"resourceType": "Patient", "id": "p"}', "expected resourceType 'Bundle', found 'Patient'"),
    ('{"resourceType": "Bundle", "type": "message"}', "Bundle.type 'message' is not one of"),
    ('{"resourceType": "Bundle", "type": "collection", "entry": {}}', "Bundle.entry must be a list"),
    ('{"resourceType": "Bundle", "type": "collection", "entry": []}', "holds no Patient"),
    ('{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"id": "x"}}]}',
     "Bundle.entry[0].resource has no resourceType"),
])
def test_bad_bundle_file(tmp_path, capsys, content, message):
    f = tmp_path / "in.json"
    f.write_text(content)
    code, out, err = run(["classify", "--bundle", str(f)], capsys)
    assert code == 2
    assert message in err and str(f) in err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_several_patients_are_refused(tmp_path, capsys):
    a = json.loads((FIXTURES / "01-resectable-single-small.json").read_text())
    b = json.loads((FIXTURES / "03-borderline-count-exactly-4.json").read_text())
    a["entry"] += b["entry"]
    f = tmp_path / "two.json"
    f.write_text(json.dumps(a))
    code, _, err = run(["classify", "--bundle", str(f)], capsys)
    assert code == 2 and "several patients" in err and "Patient/f01-pat" in err and "Patient/f03-pat" in err


def test_missing_file(capsys):
    code, _, err = run(["classify", "--bundle", "/nonexistent/x.json"], capsys)
    assert code == 2 and "file not found" in err


def test_missing_rules_file(capsys):
    code, _, err = run(["classify", "--bundle", str(FIXTURES / "01-resectable-single-small.json"),
                        "--rules", "/nonexistent/rules.yaml"], capsys)
    assert code == 2 and "/nonexistent/rules.yaml: file not found" in err


def test_help_shows_examples_first(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_run_refuses_a_patient_url_of_another_server(capsys):
    """Found in review: the base of --patient https://other/fhir/Patient/7 was dropped and
    local Patient/7 was classified (and written). Refused before anything is sent."""
    code = main(["run", "--fhir-url", "http://127.0.0.1:9/fhir", "--patient", "https://other.example/fhir/Patient/7"])
    assert code == 2
    assert "another server" in capsys.readouterr().err


# --------------------------------------------------------------------------- issue 15: a CLI that tells the truth
def _all_parsers():
    from clm_stratify.cli import _subparsers, build_parser
    return list(_subparsers(build_parser()))


def test_every_help_shows_every_default():
    """Every option of every command (``rules validate`` too) whose default says something
    shows it in its --help; None and False (a flag that is off) are not shown."""
    import argparse

    from clm_stratify.cli import shows_default

    checked = 0
    for parser in _all_parsers():
        text = " ".join(parser.format_help().split())   # one line: wrapping may split a default
        for action in parser._actions:
            if not shows_default(action):
                continue
            shown = parser._get_formatter()._expand_help(action)   # the option's help as argparse prints it
            values = {str(action.default)} | ({f"{action.default:g}"} if isinstance(action.default, float) else set())
            assert "default" in shown.lower() and any(v in shown for v in values), (parser.prog, action.option_strings)
            assert " ".join(shown.split()) in text, (parser.prog, action.option_strings)
            checked += 1
        assert "(default: False)" not in text and "(default: None)" not in text, parser.prog
        assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    assert checked > 40   # every command's options were walked, not just a few


def test_the_examples_keep_their_lines():
    from clm_stratify.cli import build_parser
    text = build_parser().format_help()
    assert "examples:\n  clm-stratify demo\n  clm-stratify run" in text


def test_summary_counts_add_up_with_no_recurrence_and_failures_on_rows_of_their_own():
    """Found in issue 15: 'indeterminate 6' counted 2 patients without a recurrence (no
    assessment), and 'total classified' was not the number of patients of the run."""
    from clm_stratify.cli.output import summary_table
    from clm_stratify.pipeline import PatientResult, RunSummary
    from fhir_adapters.fhir.reference import PatientRef

    results = [PatientResult(PatientRef("a"), "created", "resectable", "final"),
               PatientResult(PatientRef("b"), "updated", "indeterminate", "preliminary"),
               PatientResult(PatientRef("c"), "no-recurrence", "indeterminate", "preliminary"),
               PatientResult(PatientRef("d"), "no-recurrence", "indeterminate", "preliminary"),
               PatientResult(PatientRef("e"), "failed", "unresectable", "final", error="HTTP 500 on write"),
               PatientResult(PatientRef("f"), "failed", error="batch entry 0 failed: 503")]
    summary = RunSummary(results)
    rows = dict(line.rsplit(None, 1) for line in summary_table(summary).splitlines()[1:8])
    rows = {k.strip(): int(v) for k, v in rows.items()}
    assert rows == {"resectable": 1, "borderline-resectable": 0, "unresectable": 0, "indeterminate": 1,
                    "no-recurrence": 2, "failed": 2, "total": 6}
    assert sum(summary.groups.values()) + summary.actions["no-recurrence"] + len(summary.failures) == summary.total
    text = summary_table(summary)
    assert "RiskAssessments: created 1, updated 1" in text
    assert "Patient/e: HTTP 500 on write" in text and "Patient/f: batch entry 0 failed: 503" in text


def test_the_listing_says_why_for_indeterminate_no_recurrence_and_failed():
    from clm_stratify.cli.output import run_listing
    from clm_stratify.pipeline import PatientResult, RunSummary, evaluate, Rules
    from fhir_adapters.fhir.reference import PatientRef
    from fhir_adapters.sources.bundle import read_bundle_file

    rules = Rules.load()
    indeterminate = evaluate(read_bundle_file(FIXTURES / "17-indeterminate-no-measurements.json"), rules)
    assert indeterminate.group == "indeterminate" and indeterminate.missing
    results = [PatientResult(PatientRef("f17-pat"), "created", "indeterminate", "preliminary",
                             classification=indeterminate),
               PatientResult(PatientRef("x"), "failed", error="HTTP 503 from the server")]
    lines = run_listing(RunSummary(results)).splitlines()
    assert lines[0].split() == ["patient", "group", "status", "action", "why"]
    assert len(lines) == 3
    f17 = lines[1]
    assert f17.startswith("Patient/f17-pat") and "indeterminate" in f17 and "created" in f17
    for m in indeterminate.missing:   # every missing fact named, by its label
        label = {**indeterminate.criteria, **indeterminate.facts}[m.fact].label
        assert label in f17
    assert lines[2].startswith("Patient/x") and "failed" in lines[2] and "HTTP 503 from the server" in lines[2]


@pytest.mark.parametrize("fixture", ["17-indeterminate-no-measurements.json", "01-resectable-single-small.json"])
def test_classify_json_is_one_document(capsys, fixture):
    code, out, _ = run(["classify", "--bundle", str(FIXTURES / fixture), "--format", "json"], capsys)
    assert code == 0
    assert json.loads(out)["patient"].startswith("Patient/")


def test_exit_codes_are_documented():
    import clm_stratify.cli as cli
    from fhir_adapters.project import EXIT_NOT_FOUND
    from pathlib import Path

    assert EXIT_NOT_FOUND == 4
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "4 ``run --patient``: the server has no" in " ".join(cli.__doc__.split())
    assert "**4** `run --patient ID`: no such patient on the server" in readme
