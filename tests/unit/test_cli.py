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
