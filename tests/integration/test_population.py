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
from engine.ruleset import load_ruleset
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
    assert manifest["ruleset"]["version"] == "1.3.0" and manifest["restratified_from"]["ruleset"]["version"] == load_ruleset().version


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


def test_files_that_would_not_be_read_are_refused_not_skipped(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n')
    for name in ("_part2.ndjson", ".hidden.ndjson", "b.jsonl", "b.NDJSON", "c.ndjson.bz2"):
        (src / name).write_text('{"resourceType":"Patient","id":"b"}\n')
        assert main(["population", "--ndjson", str(src), "--out", str(tmp_path / "out")]) == 2
        assert f"would not be read: {name}" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()   # a failed run leaves no OUT behind
        (src / name).unlink()
    (src / "sub").mkdir()
    assert main(["population", "--ndjson", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "sub/" in capsys.readouterr().err


def test_a_damaged_gzip_file_is_one_clear_error(tmp_path, capsys):
    import gzip

    src = tmp_path / "in"
    src.mkdir()
    blob = gzip.compress(b'{"resourceType":"Patient","id":"a"}\n' * 1000)
    (src / "Patient.ndjson.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "out").mkdir()
    assert main(["population", "--ndjson", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Patient.ndjson.gz: cannot be read" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []   # an empty OUT stays empty


def test_a_features_file_must_be_complete_and_strict(tmp_path, population, capsys):
    import shutil

    _, out = population
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("write-back"))
    part = next((copy / "features").iterdir())
    text = part.read_text().splitlines()
    part.write_text("\n".join(text[:20]) + "\n")   # cut
    assert main(["population", "--from-features", str(copy), "--out", str(tmp_path / "x")]) == 2
    assert "the manifest says" in capsys.readouterr().err
    bad = json.loads(text[0])
    del bad["tumour_count"]["lower_bound"]   # must not become an exact count
    part.write_text("\n".join([json.dumps(bad), *text[1:]]) + "\n")
    assert main(["population", "--from-features", str(copy), "--out", str(tmp_path / "y")]) == 2
    assert "tumour_count: every fact has exactly" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_write_back_sends_only_this_runs_own_assessments(tmp_path, population, loaded_server, capsys):
    import shutil

    _, out = population
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("write-back"))
    part = next((copy / "assessments").iterdir())
    lines_ = part.read_text().splitlines()
    first, second = json.loads(lines_[0]), json.loads(lines_[1])
    second["entry"][0]["resource"]["id"] = first["entry"][0]["resource"]["id"]   # overwrite another patient's
    third = json.loads(lines_[2])
    third["entry"][0]["resource"]["status"] = "bogus"
    fourth = json.loads(lines_[3])
    fourth["entry"][0]["resource"]["subject"] = {"reference": "Group/x"}
    part.write_text("\n".join([lines_[0], json.dumps(second), json.dumps(third), json.dumps(fourth), *lines_[4:]]) + "\n")
    assert main(["write-back", "--from", str(copy), "--fhir-url", loaded_server.base_url, "--dry-run"]) == 1
    printed = capsys.readouterr().out
    assert printed.count("not a valid assessment of this run") == 3
    assert "its id or identifier is not the one of" in printed and "status 'bogus'" in printed
    part.write_text("\n".join(lines_[:10]) + "\n")   # cut: refused before anything is written
    assert main(["write-back", "--from", str(copy), "--fhir-url", loaded_server.base_url]) == 2
    assert "the manifest says" in capsys.readouterr().err


def test_write_back_to_a_server_that_cannot_be_used_is_exit_3(tmp_path, population, capsys):
    from fhir_adapters.fhir.local_server import free_port

    _, out = population
    assert main(["write-back", "--from", str(out), "--fhir-url", f"http://127.0.0.1:{free_port()}/fhir",
                 "--connect-timeout", "1"]) == 3
    assert "error:" in capsys.readouterr().err
