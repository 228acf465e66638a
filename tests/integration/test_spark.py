"""Apache Spark (local[2]) against the local path: the JVM's line keys equal the Python
attribution rules line by line, and the two paths give identical outputs patient by
patient on the fixtures and on 2 000 synthetic patients. Needs Java 17 and PySpark
(``.ci/run`` installs both)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java (apt-get install openjdk-17-jre-headless)", allow_module_level=True)

from clm_stratify.pipeline import Rules
from clm_stratify.population import run_population
from clm_stratify.population.core import KINDS
from clm_stratify.population.output import read_lines
from fhir_adapters.fhir.codec import dumps
from fhir_adapters.fhir.load import fixture_bundles
from fhir_adapters.sources.ndjson import BadLine, Prefilter, read_line
from fixtures import FIXTURES_DIR
from fixtures.population import write_ndjson

pytestmark = pytest.mark.spark

MASTER = "local[2]"
BASE = "https://ehr.example.org/fhir"
WHEN = "2026-12-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def spark():
    from clm_stratify.population.spark import session

    s = session(MASTER)
    yield s
    s.stop()


# ----------------------------------------------------------------------------- keys
REFERENCES = [
    "Patient/p1", "Patient/p1/", "Patient/p1/_history/2", "Patient/p1/_history/", "Patient/p-1.x",
    f"{BASE}/Patient/p2", f"{BASE}/Patient/p2/_history/7", f"{BASE}//Patient/p2", "https://other.org/r4/Patient/p3",
    "http://h/Patient/p4", "ftp://h/Patient/p5", "Patient/p1\n", "Patient/p1\r", "Patient/p1 ", " Patient/p1",
    "Patient/" + "x" * 64, "Patient/" + "x" * 65, "patient/p1", "Group/g1", "urn:uuid:0b1c", "#contained",
    "Patient/p\u00e9", "Patient/p1\u2028", "https://h.org/fhir\u2028x/Patient/p6", "Patient", "", "Patient/",
    "https://h.org/fhir/Patient/p7?x=1", "Medication/m1", "BodyStructure/b1", f"{BASE}/BodyStructure/b2/_history/1",
]
VALUES = [None, 5, True, [], {}, "text", 1.5]


def _subject_variants(rng: random.Random) -> dict:
    pick = rng.random()
    ref = rng.choice(REFERENCES)
    if pick < 0.55:
        return {"subject": {"reference": ref}}
    if pick < 0.65:
        return {"patient": {"reference": ref}}
    if pick < 0.70:
        return {"subject": None, "patient": {"reference": ref}}
    if pick < 0.75:
        return {"subject": rng.choice(VALUES)}
    if pick < 0.80:
        return {"subject": {"reference": rng.choice(VALUES)}}
    if pick < 0.85:
        return {"subject": {"identifier": {"system": "s", "value": "v"}}}
    if pick < 0.90:
        return {"subject": {"display": "Jane"}, "patient": {"reference": ref}}
    return {}


def _resource(rng: random.Random) -> dict:
    rtype = rng.choice(["Patient", "Observation", "Observation", "Condition", "Procedure", "MedicationAdministration",
                        "MedicationStatement", "Medication", "BodyStructure", "DiagnosticReport", "Encounter",
                        "Specimen"])
    r: dict = {"resourceType": rtype}
    roll = rng.random()
    if roll < 0.8:
        r["id"] = rng.choice(["p1", "p2", "m1", "b1", "b2", "x" * 64, "x" * 65, "bad id", "p1\n", "é"])
    elif roll < 0.9:
        r["id"] = rng.choice(VALUES)
    r.update(_subject_variants(rng))
    code = rng.choice(["21889-1", "2188.9-1", "21889 -1", "33728-7", "2345-7", "LP29684-5", "lp29684-5", "RAD",
                       "technical-resectability", "x"])
    r["code"] = {"coding": [{"system": "http://loinc.org", "code": code}]}
    if rng.random() < 0.3:
        r["medicationReference"] = rng.choice([{"reference": rng.choice(REFERENCES)}, "Medication/m1", None])
    if rng.random() < 0.3:
        r["focus"] = rng.choice([[{"reference": rng.choice(REFERENCES)} for _ in range(rng.randint(0, 3))],
                                 {"reference": "BodyStructure/b1"}, ["BodyStructure/b1"], None])
    if rng.random() < 0.1:
        r["note"] = [{"text": rng.choice(["Größe", "taille \u2028", "plain"])}]
    return r


RAW_LINES = [
    '{"resourceType":"Observation","subject":{"reference":"Patient/a"},"subject":{"reference":"Patient/b"}}',
    '{"resourceType":"Patient","id":"a","id":"b"}',
    '{"resourceType":"Observation","subject":{"reference":"Patient/\\ud800"}}',   # a lone surrogate
    '{"resourceType":"Observation","code":{"coding":[{"code":"\\u0032\\u0031889-1"}]},"subject":{"reference":"Patient/e"}}',
    '{"resourceType":"Observation","valueQuantity":{"value":1e400},"subject":{"reference":"Patient/big"}}',
    '{"resourceType":"Observation","valueQuantity":{"value":NaN},"subject":{"reference":"Patient/nan"}}',
    '{"resourceType":"Patient","id":"\\u0070\\u0031"}',
    '\ufeff{"resourceType":"Patient","id":"bom"}',
    '{"resourceType":"Patient","id":"ws"}   \t\r',
    '\x0c', '   ', '[1]', '"text"', '{"resourceType":null}', '{}', 'not json',
    '{"resourceType":"Patient","id":"\ufffd"}',
    '{"resourceType":"Observation","subject":{"reference":"Patient/deep"},"x":' + "[" * 600 + "]" * 600 + "}",
    '{"resourceType":"Observation","subject":{"reference":"Patient/deeper"},"x":' + "[" * 3000 + "]" * 3000 + "}",
]


def _python(line: str, prefilter: Prefilter, base: str | None) -> tuple | None:
    try:
        read = read_line(line, prefilter, base)
    except BadLine as exc:
        return ("error", str(exc))
    if read is None:
        return None
    i = read[1]
    return (i.resource_type, i.owner, i.joined, list(i.wants), i.kept)


@pytest.mark.parametrize("base", [None, BASE])
def test_jvm_line_keys_equal_the_python_rules(spark, tmp_path, base):
    from clm_stratify.population.spark import keyed_lines
    from fhir_adapters.terminology import load_terminology

    rng = random.Random(7)
    lines = [json.dumps(_resource(rng), ensure_ascii=rng.random() < 0.5) for _ in range(3000)] + RAW_LINES
    # fixture resources too: every real shape of the test data
    lines += [dumps(e["resource"]) for b in fixture_bundles(FIXTURES_DIR) for e in b["entry"]]
    lines = [line for line in lines if "\n" not in line]
    path = tmp_path / "keys.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefilter = Prefilter.of(load_terminology())
    rows = keyed_lines(spark, [str(path)], prefilter, base).collect()
    got: dict[str, tuple] = {}
    for r in rows:
        got[r["line"]] = ("error", r["error"]) if r["error"] else (
            r["resource_type"], r["owner"], r["joined"], list(r["wants"]), r["kept"])
    expected = {line: _python(line, prefilter, base) for line in lines}
    expected = {k: v for k, v in expected.items() if v is not None}
    # a line that holds a bare \r: Spark was told lineSep \n, as the Python reader splits
    assert set(got) == set(expected)
    differences = {line[:120]: (got[line], expected[line]) for line in expected if got[line] != expected[line]}
    assert not differences, differences
    via_jvm = sum(1 for r in rows if r["error"] is None)
    assert via_jvm > 2500   # most lines were keyed on the JVM, not by the Python fallback


# ----------------------------------------------------------------------------- whole runs
def _fixture_ndjson(directory: Path) -> Path:
    directory.mkdir()
    by_type: dict[str, list[str]] = {}
    for bundle in fixture_bundles(FIXTURES_DIR):
        for e in bundle["entry"]:
            by_type.setdefault(e["resource"]["resourceType"], []).append(dumps(e["resource"]))
    for rtype, lines in by_type.items():
        (directory / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def _outputs(out: Path) -> dict[str, list[str]]:
    return {kind: sorted(line for _, _, line in read_lines(out, kind)) for kind in KINDS}


def _compare(tmp_path: Path, source: Path, base: str | None) -> dict[str, list[str]]:
    rules = Rules.load()
    local = run_population([str(source)], str(tmp_path / "local"), rules, base=base, occurrence=WHEN)
    spark = run_population([str(source)], str(tmp_path / "spark"), rules, master=MASTER, base=base, occurrence=WHEN)
    a, b = _outputs(tmp_path / "local"), _outputs(tmp_path / "spark")
    for kind in KINDS:
        assert len(a[kind]) == len(b[kind]), kind
        by_patient_a = {json.loads(x).get("patient") or x: x for x in a[kind]}
        for line in b[kind]:
            assert line in a[kind], (kind, line[:300], by_patient_a.get(json.loads(line).get("patient"), "")[:300])
    assert local.groups == spark.groups and local.failed == spark.failed
    assert json.loads((tmp_path / "spark" / "manifest.json").read_text())["complete"] is True
    return a


def test_spark_equals_local_on_the_fixtures(tmp_path):
    out = _compare(tmp_path, _fixture_ndjson(tmp_path / "in"), None)
    assert len(out["classifications"]) == 62


def test_spark_equals_local_on_2000_synthetic_patients(tmp_path):
    counts = write_ndjson(tmp_path / "in", 2000, seed=11, per_file=3000)
    out = _compare(tmp_path, tmp_path / "in", BASE)
    assert len(out["classifications"]) == 2000
    groups = {json.loads(x)["group"] for x in out["classifications"]}
    assert {"resectable", "borderline-resectable", "unresectable", "indeterminate"} <= groups
    # adjuvant chemotherapy named only by a shared Medication (joined by reference) is read
    given = [json.loads(x)["evidence"]["adjuvant_chemotherapy"] for x in out["classifications"]]
    assert counts["Medication"] == 2
    assert any(e["state"] == "given" and any(r.endswith("-chemo") for r in e["refs"]) for e in given)
