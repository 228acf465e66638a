"""``clm-stratify population`` on this machine and ``clm-stratify write-back`` to a real
SEKMET server: outputs, refusals, re-stratification from features (exact decimals, a
40 mm threshold moves exactly the expected patients), and a write-back that is
idempotent, bounded and resumable after being killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from clm_stratify.cli import main
from clm_stratify.population.output import read_lines
from clm_stratify.population.core import features_line, features_of
from engine.features import Fact, Features
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.local_server import LocalFhirServer
from fhir_adapters.project import TAG, TAG_SYSTEM
from fixtures.population import BASE, MEDICATIONS, patient_resources, write_ndjson

ROOT = Path(__file__).resolve().parents[2]
WHEN = "2026-12-01T00:00:00+00:00"


def lines(out: Path, kind: str) -> list[dict]:
    return [json.loads(line) for _, _, line in read_lines(out, kind)]


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> tuple[Path, Path]:
    """300 synthetic patients as NDJSON, classified once: (input dir, OUT)."""
    root = tmp_path_factory.mktemp("population")
    write_ndjson(root / "in", 300, seed=5, per_file=400)
    assert main(["population", "--ndjson", str(root / "in"), "--out", str(root / "out"), "--base", BASE]) == 0
    return root / "in", root / "out"


def test_population_writes_every_kind_and_a_complete_manifest(population):
    _, out = population
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["patients"] == 300
    classified = lines(out, "classifications")
    assert len(classified) == 300 == len(lines(out, "features"))
    assessed = [c for c in classified if c["assessed"]]
    bundles = lines(out, "assessments")
    assert len(bundles) == len(assessed) == manifest["counts"]["outputs"]["assessments"]
    ra, provenance = (e["resource"] for e in bundles[0]["entry"])
    assert ra["resourceType"] == "RiskAssessment" and provenance["target"] == [{"reference": f"RiskAssessment/{ra['id']}"}]
    assert sum(manifest["counts"]["groups"].values()) == 300
    # the prefilter dropped the laboratory Observations, and nothing else was lost
    assert manifest["counts"]["lines_kept"] < manifest["counts"]["lines_read"]


def test_unreadable_lines_stop_the_run_with_file_and_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n{"resourceType":"Pat\n')
    assert main(["population", "--ndjson", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Patient.ndjson:2: invalid JSON" in err and "nothing was classified" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_out_must_be_new_or_empty_and_inputs_must_exist(tmp_path, population, capsys):
    source, out = population
    assert main(["population", "--ndjson", str(source), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["population", "--ndjson", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["population", "--ndjson", "s3a://bucket/x", "--out", str(tmp_path / "o2")]) == 2
    assert "needs --master" in capsys.readouterr().err


def test_two_processes_give_the_same_result_as_one(tmp_path, population):
    source, out = population
    assert main(["population", "--ndjson", str(source), "--out", str(tmp_path / "two"), "--base", BASE,
                 "--workers", "2"]) == 0
    for kind in ("classifications", "features"):
        assert sorted(map(json.dumps, lines(out, kind))) == sorted(map(json.dumps, lines(tmp_path / "two", kind)))


def test_features_round_trip_exactly_and_restratify_gives_the_same_result(tmp_path, population):
    _, out = population
    for _, _, line in read_lines(out, "features"):
        assert features_line(features_of(line)) == line
    sizes = [features_of(line).largest_diameter_mm.value for _, _, line in read_lines(out, "features")]
    assert all(s is None or isinstance(s, Decimal) for s in sizes) and any(s is not None for s in sizes)
    odd = Features(patient="Patient/x", largest_diameter_mm=Fact[Decimal](value=Decimal("49.90"),
                                                                        at_most=Decimal("5E+1")))
    assert features_of(features_line(odd)) == odd
    assert str(features_of(features_line(odd)).largest_diameter_mm.value) == "49.90"
    assert main(["population", "--from-features", str(out / "features"), "--out", str(tmp_path / "again")]) == 0
    assert (sorted(map(json.dumps, lines(out, "classifications")))
            == sorted(map(json.dumps, lines(tmp_path / "again", "classifications"))))


def _rules_with_threshold(tmp_path: Path, mm: int) -> Path:
    data = yaml.safe_load((ROOT / "rules" / "resectability.yaml").read_text())
    data["factors"]["largest_ge_50mm"]["threshold"] = mm
    data["version"] = "1.3.0"
    path = tmp_path / f"rules-{mm}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_restratify_with_a_40mm_threshold_moves_exactly_the_expected_patients(tmp_path, population):
    _, out = population
    new = _rules_with_threshold(tmp_path, 40)
    assert main(["population", "--from-features", str(out), "--rules", str(new), "--out", str(tmp_path / "40")]) == 0
    before = {c["patient"]: c for c in lines(out, "classifications")}
    after = {c["patient"]: c for c in lines(tmp_path / "40", "classifications")}
    features = {f["patient"]: f for f in lines(out, "features")}
    moved = {p for p in before if before[p]["group"] != after[p]["group"]}
    expected = set()
    for p, c in before.items():
        size = features[p]["largest_diameter_mm"]
        value = Decimal(str(size["value"])) if size["value"] is not None else None
        # ">= 40 mm" is now proven (an exact size or a lower bound at 40-49.x mm): a factor
        # present, so a resectable or undecided patient becomes borderline
        if value is not None and Decimal(40) <= value < Decimal(50) and c["group"] in ("resectable", "indeterminate"):
            expected.add(p)
    assert moved == expected and expected, (sorted(moved ^ expected)[:5], len(expected))
    assert all(after[p]["group"] == "borderline-resectable" for p in moved)
    manifest = json.loads((tmp_path / "40" / "manifest.json").read_text())
    assert manifest["ruleset"]["version"] == "1.3.0" and manifest["restratified_from"]["ruleset"]["version"] == "1.2.0"


def test_restratify_refuses_another_terminology(tmp_path, population, capsys):
    _, out = population
    data = yaml.safe_load((ROOT / "rules" / "terminology.yaml").read_text())
    data["version"] = "9.9.9"
    other = tmp_path / "terminology.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["population", "--from-features", str(out), "--terminology", str(other),
                 "--out", str(tmp_path / "x")]) == 2
    assert "another terminology" in capsys.readouterr().err


# ----------------------------------------------------------------------------- write-back
@pytest.fixture(scope="module")
def loaded_server(tmp_path_factory, population):
    """A SEKMET server holding the same 300 patients (the assessments name them)."""
    import random

    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("sekmet-population")) as srv:
        with FhirClient(srv.base_url) as c:
            rng = random.Random(5)
            batch = list(MEDICATIONS)
            for i in range(300):
                batch += patient_resources(i, rng)
            for start in range(0, len(batch), 400):
                c.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                               for r in batch[start:start + 400]])
        yield srv


def _ours(client: FhirClient, rtype: str) -> list[dict]:
    return list(client.search(rtype, {"_tag": f"{TAG_SYSTEM}|{TAG}", "_count": "500"}))


def test_write_back_is_idempotent_and_resumable_after_a_kill(tmp_path, population, loaded_server, capsys):
    _, out = population
    url = loaded_server.base_url
    n = len(lines(out, "assessments"))
    assert main(["write-back", "--from", str(out), "--fhir-url", url, "--max-writers", "3"]) == 0
    assert f"created {n}" in capsys.readouterr().out
    with FhirClient(url) as c:
        ras = _ours(c, "RiskAssessment")
        assert len(ras) == n and len({r["subject"]["reference"] for r in ras}) == n
        assert len(_ours(c, "Provenance")) == n
    # journal: a second run skips every chunk; without it, everything is found unchanged
    assert main(["write-back", "--from", str(out), "--fhir-url", url]) == 0
    assert "already written" in capsys.readouterr().out
    for j in (out / "write-back").iterdir():
        j.unlink()
    assert main(["write-back", "--from", str(out), "--fhir-url", url, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["actions"] == {"unchanged": n}

    # a new rule set's run, its write-back killed part way, then run again
    new_out = tmp_path / "40"
    assert main(["population", "--from-features", str(out), "--rules", str(_rules_with_threshold(tmp_path, 40)),
                 "--out", str(new_out)]) == 0
    before = {c["patient"]: c["group"] for c in lines(out, "classifications")}
    movers = sum(1 for c in lines(new_out, "classifications") if before[c["patient"]] != c["group"])
    proc = subprocess.Popen([sys.executable, "-m", "clm_stratify", "write-back", "--from", str(new_out),
                             "--fhir-url", url, "--max-writers", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            journals = list((new_out / "write-back").glob("*.journal")) if (new_out / "write-back").exists() else []
            if journals and journals[0].read_text().count("\n") >= 1:
                journal = journals[0]
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert journal is not None, "the write-back finished or never wrote a chunk before it could be killed"
    chunks = -(-n // 100)
    assert journal.read_text().count("\n") < chunks   # it was interrupted part way
    assert main(["write-back", "--from", str(new_out), "--fhir-url", url]) == 0
    assert "already written" in capsys.readouterr().out
    with FhirClient(url) as c:
        ras = _ours(c, "RiskAssessment")
        assert len(ras) == n   # still one per patient
        assert all(r["method"]["coding"][0]["version"] == "1.3.0" for r in ras)
        # one Provenance per write: the first n, then one per assessment the new rule set changed
        assert len(_ours(c, "Provenance")) == n + n   # the version changes every assessment
    assert movers > 0


def test_write_back_refuses_an_unfinished_run(tmp_path, loaded_server, capsys):
    (tmp_path / "x").mkdir()
    assert main(["write-back", "--from", str(tmp_path / "x"), "--fhir-url", loaded_server.base_url]) == 2
    assert "no manifest.json" in capsys.readouterr().err
