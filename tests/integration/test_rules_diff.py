"""``clm-stratify rules diff`` against a real SEKMET server loaded with the fixtures and
on a population run of the same fixtures: the three inputs (Bundle files, the server,
the run's features) give the same movers for a 40 mm threshold, the ones the oracle of
tests/unit/test_rules_diff.py predicts, and the server is only read (every
RiskAssessment and Provenance keeps its count and its version)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clm_stratify.cli import main
from clm_stratify.population.output import read_lines
from clm_stratify.population.core import features_of
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.codec import dumps
from fhir_adapters.fhir.load import fixture_bundles
from fhir_adapters.fhir.local_server import free_port
from fhir_adapters.fhir.reference import patient_of
from fixtures import FIXTURES_DIR
from tests.unit.test_rules_diff import oracle, rules_with_threshold

EXPECTED = {"Patient/f06-pat", "Patient/f55-pat", "Patient/f57-pat", "Patient/f59-pat"}


def diff(argv: list[str], capsys) -> tuple[int, dict]:
    code = main(["rules", "diff", *argv, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def movers(data: dict) -> list[tuple]:
    return sorted((m["patient"], m["from"]["group"], m["from"]["status"], m["to"]["group"], m["to"]["status"],
                   json.dumps(m["factors"])) for m in data["moved"])


def written(client: FhirClient) -> dict[str, str]:
    """Every RiskAssessment and Provenance on the server, with its version."""
    return {f"{r['resourceType']}/{r['id']}": r["meta"]["versionId"]
            for rtype in ("RiskAssessment", "Provenance") for r in client.search(rtype, {"_count": "500"})}


@pytest.fixture(scope="module")
def new_rules(tmp_path_factory) -> str:
    return str(rules_with_threshold(tmp_path_factory.mktemp("rules"), 40))


def test_the_server_is_only_read_and_agrees_with_the_bundles(server, new_rules, capsys):
    with FhirClient(server.base_url) as client:
        assert main(["run", "--fhir-url", server.base_url, "--all", "--no-bulk"]) == 0
        capsys.readouterr()
        before = written(client)
        assert len(before) > 100   # the current assessments and their Provenances
        code, on_server = diff(["--rules", new_rules, "--fhir-url", server.base_url, "--all"], capsys)
        assert code == 0 and on_server["failures"] == [] and on_server["written"] == "nothing"
        assert written(client) == before
    _, on_files = diff(["--rules", new_rules, "--bundle", str(FIXTURES_DIR)], capsys)
    assert {m["patient"] for m in on_server["moved"]} == EXPECTED
    assert movers(on_server) == movers(on_files)
    assert on_server["patients"] < on_files["patients"]   # the server's cohort: a metastasis Condition


def test_patients_by_id_and_a_missing_one(server, new_rules, capsys):
    code, data = diff(["--rules", new_rules, "--fhir-url", server.base_url, "--patient", "f06-pat",
                       "--patient", "f01-pat", "--patient", "nobody-here"], capsys)
    assert code == 1   # a patient failed: the comparison is incomplete
    assert [m["patient"] for m in data["moved"]] == ["Patient/f06-pat"] and data["patients"] == 2
    assert data["failures"] == [{"patient": "Patient/nobody-here",
                                 "error": f"no patient Patient/nobody-here on {server.base_url}"}]


def test_a_server_that_cannot_be_used_is_exit_3(new_rules, capsys):
    assert main(["rules", "diff", "--rules", new_rules, "--fhir-url", f"http://127.0.0.1:{free_port()}/fhir",
                 "--all", "--connect-timeout", "1"]) == 3
    assert capsys.readouterr().err.startswith("error: FHIR server unavailable")


def attributable_fixtures() -> list[Path]:
    """The fixture files whose every resource names its patient by a literal reference. In
    an NDJSON export the others' resources belong to no patient and go to every record
    as unattributable (README, "Whose line it is"), so their records differ by design."""
    return [path for path, bundle in zip(sorted(FIXTURES_DIR.glob("[0-9][0-9]-*.json")), fixture_bundles(FIXTURES_DIR))
            if all(e["resource"]["resourceType"] == "Patient" or patient_of(e["resource"]) for e in bundle["entry"])]


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory) -> Path:
    """A population run of the (attributable) fixture patients, their resources as NDJSON."""
    root = tmp_path_factory.mktemp("fixture-run")
    (root / "in").mkdir()
    by_type: dict[str, list[str]] = {}
    for path in attributable_fixtures():
        for e in json.loads(path.read_text())["entry"]:
            by_type.setdefault(e["resource"]["resourceType"], []).append(dumps(e["resource"]))
    for rtype, lines in by_type.items():
        (root / "in" / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["population", "--ndjson", str(root / "in"), "--out", str(root / "out")]) == 0
    return root / "out"


def test_the_features_of_a_population_run_give_the_same_diff_as_the_bundles(fixture_run, new_rules, capsys):
    files = attributable_fixtures()
    assert 50 < len(files) < 61
    code, from_run = diff(["--rules", new_rules, "--from-features", str(fixture_run)], capsys)
    assert code == 0 and from_run["failures"] == []
    features = [features_of(line) for _, _, line in read_lines(fixture_run, "features")]
    expected = {f.patient for f in features if oracle(f, 50)[0] != oracle(f, 40)[0]}
    assert {m["patient"] for m in from_run["moved"]} == expected == EXPECTED
    _, on_files = diff(["--rules", new_rules, *(a for f in files for a in ("--bundle", str(f)))], capsys)
    different = ("input", "notes")
    assert {k: v for k, v in from_run.items() if k not in different} == {k: v for k, v in on_files.items()
                                                                           if k not in different}
    assert not any(p.name != "manifest.json" and p.stat().st_mtime > (fixture_run / "manifest.json").stat().st_mtime
                   for p in fixture_run.rglob("*"))   # the run's OUT was only read


def test_features_mapped_with_another_terminology_are_refused(fixture_run, new_rules, tmp_path, capsys):
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "rules" / "terminology.yaml").read_text())
    data["version"] = "9.9.9"
    other = tmp_path / "terms.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["rules", "diff", "--rules", new_rules, "--from-features", str(fixture_run),
                 "--terminology", str(other)]) == 2
    err = capsys.readouterr().err
    assert "mapped with another terminology" in err and len(err.strip().splitlines()) == 1
