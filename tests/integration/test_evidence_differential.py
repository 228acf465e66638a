"""Differential test: one record, several ways of handing it over, one answer.

For every fixture, the same patient's record

(a) as the fixture's `collection` Bundle (`classify --bundle`, with and without
    `--patient`), also rewritten with `urn:uuid` fullUrls and references (a
    transaction, the Patient's fullUrl resolves the subjects) and with absolute
    references to the same server;
(b) inside a `searchset` Bundle that also holds copies of other fixtures (other
    patients, every id changed), classified with `--patient`; and without `--patient`
    when only this patient's Patient entry has `search.mode` "match";
(c) loaded on a real SEKMET server (tests/conftest.py loads every fixture) and
    classified with `run --patient ID --dry-run`

gives the same group, status, criteria and `assessed` (clinical-basis.md: "`classify` on
a Bundle and `run` on a server give the same answer for the same record, including
'no recurrence'").
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest

from clm_stratify.cli import main

pytestmark = pytest.mark.integration

from fixtures import FIXTURES_DIR  # noqa: E402

FIXTURES = FIXTURES_DIR
# Plain json (floats): the fixtures were written from Python floats, whose repr round-trips,
# so a variant written back with json.dumps keeps every number's text (49.9, 0.05, 1.9).
DOCS: dict[str, dict] = {p.name: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("[0-9][0-9]-*.json"))}
NAMES = sorted(DOCS)
BASE = "https://example.org/fhir"
# Mixed into the searchset: records that would change the answer if they were merged
# (three factors; technically resectable -> final; technically unresectable).
OTHERS = ["12-borderline-three-factors-adjuvant.json", "02-resectable-final-two-lesions.json",
          "13-unresectable-final-extensive.json"]


def prefix_of(name: str) -> str:
    return f"f{name[:2]}"


def pid_of(name: str) -> str:
    return f"{prefix_of(name)}-pat"


# ----------------------------------------------------------------------------- running the CLI
def run_cli(argv: list[str], capsys) -> dict:
    try:
        code = main(argv + ["--format", "json"])
    except SystemExit as exc:  # argparse: an option the command does not know
        out = capsys.readouterr()
        pytest.fail(f"{' '.join(argv[:1])} exited {exc.code}: {out.err.strip()[-400:]}")
    out = capsys.readouterr()
    assert code == 0, out.err or out.out
    return json.loads(out.out)


def answer(result: dict) -> dict:
    """What must agree: group, status, criteria, assessed."""
    return {"group": result["group"], "status": result["status"], "criteria": result["criteria"],
            "assessed": result.get("assessed", "<missing>")}


def write(doc: dict, path: Path) -> Path:
    path.write_text(json.dumps(doc, indent=1))
    return path


_ANSWERS: dict[str, dict] = {}


def collection_answer(name: str, capsys) -> dict:
    """The answer for the fixture file itself (a), computed once per fixture."""
    if name not in _ANSWERS:
        _ANSWERS[name] = answer(run_cli(["classify", "--bundle", str(FIXTURES / name)], capsys))
    return _ANSWERS[name]


# ----------------------------------------------------------------------------- building the variants
def renamed(node, old: str, new: str):
    """Every string with `old` replaced by `new` (ids, references, fullUrls, identifiers)."""
    if isinstance(node, dict):
        return {k: renamed(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [renamed(v, old, new) for v in node]
    if isinstance(node, str):
        return node.replace(old, new)
    return node


def other_patients(name: str) -> list[tuple[str, dict]]:
    """Copies of other fixtures with every id changed (fNN- -> xNN-) and another MRN."""
    out = []
    for other in OTHERS:
        if other == name:
            continue
        p = prefix_of(other)
        doc = renamed(DOCS[other], f"{p}-", f"x{other[:2]}-")
        doc = renamed(doc, f"MRN-CLM-00{other[:2]}", f"MRN-XXX-00{other[:2]}")
        out.append((f"x{other[:2]}-pat", doc))
    return out


def searchset(name: str, *, others_match: bool) -> dict:
    """The record and the other patients' resources interleaved in one searchset."""
    def entries(doc: dict, own: bool) -> list[dict]:
        out = []
        for e in doc["entry"]:
            e = copy.deepcopy(e)
            is_patient = e["resource"]["resourceType"] == "Patient"
            mode = "match" if is_patient and (own or others_match) else "include"
            e["search"] = {"mode": mode}
            out.append(e)
        return out

    lists = [entries(DOCS[name], True)] + [entries(doc, False) for _, doc in other_patients(name)]
    mixed: list[dict] = []
    for i in range(max(len(x) for x in lists)):
        for j, x in enumerate(lists):
            k = i if j % 2 == 0 else len(x) - 1 - i   # own entries in order, others reversed
            if 0 <= k < len(x):
                mixed.append(x[k])
    return {"resourceType": "Bundle", "id": f"{prefix_of(name)}-searchset", "type": "searchset",
            "total": sum(1 for e in mixed if e["search"]["mode"] == "match"), "entry": mixed}


def in_bundle_refs(doc: dict) -> dict[str, str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["fullUrl"] for e in doc["entry"]}


def rewrite_references(node, mapping: dict[str, str]):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in mapping:
                out[k] = mapping[v]
            else:
                out[k] = rewrite_references(v, mapping)
        return out
    if isinstance(node, list):
        return [rewrite_references(v, mapping) for v in node]
    return node


def as_urn_uuid_transaction(name: str) -> dict:
    """fullUrls become urn:uuid; every reference to a resource of the Bundle uses it."""
    doc = copy.deepcopy(DOCS[name])
    mapping = {ref: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{BASE}/{ref}')}" for ref in in_bundle_refs(doc)}
    entries = []
    for e in doc["entry"]:
        ref = f"{e['resource']['resourceType']}/{e['resource']['id']}"
        entries.append({"fullUrl": mapping[ref], "resource": rewrite_references(e["resource"], mapping),
                        "request": {"method": "PUT", "url": ref}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def with_absolute_references(name: str) -> dict:
    """Every reference to a resource of the Bundle written as the absolute URL (same server)."""
    doc = copy.deepcopy(DOCS[name])
    mapping = {ref: f"{BASE}/{ref}" for ref in in_bundle_refs(doc)}
    doc["entry"] = [{**e, "resource": rewrite_references(e["resource"], mapping)} for e in doc["entry"]]
    return doc


# ----------------------------------------------------------------------------- harness checks
def test_variants_really_differ_from_the_collection():
    name = "28-mcode-focus-same-lesion-twice.json"
    s = searchset(name, others_match=True)
    pats = [e for e in s["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert len(pats) == 1 + len(other_patients(name)) and all(e["search"]["mode"] == "match" for e in pats)
    ids = [e["resource"]["id"] for e in s["entry"]]
    assert len(ids) == len(set(ids))
    t = as_urn_uuid_transaction(name)
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in t["entry"])
    obs = next(e["resource"] for e in t["entry"] if e["resource"]["resourceType"] == "Observation")
    assert obs["subject"]["reference"].startswith("urn:uuid:") and obs["focus"][0]["reference"].startswith("urn:uuid:")
    a = with_absolute_references(name)
    assert json.dumps(a).count(f'"{BASE}/Patient/f28-pat"') > 1
    for n in NAMES:  # numbers keep their text when a variant is written back
        assert json.dumps(DOCS[n], indent=2) + "\n" == (FIXTURES / n).read_text(), n


# ----------------------------------------------------------------------------- (a) and (b): files
@pytest.mark.parametrize("name", NAMES)
def test_patient_option_on_the_collection_gives_the_same_answer(name, capsys):
    want = collection_answer(name, capsys)
    got = answer(run_cli(["classify", "--bundle", str(FIXTURES / name), "--patient", pid_of(name)], capsys))
    assert got == want, name


@pytest.mark.parametrize("name", NAMES)
def test_searchset_with_other_patients_gives_the_same_answer(name, tmp_path, capsys):
    want = collection_answer(name, capsys)
    f = write(searchset(name, others_match=True), tmp_path / "searchset.json")
    got = run_cli(["classify", "--bundle", str(f), "--patient", pid_of(name)], capsys)
    assert got["patient"] == f"Patient/{pid_of(name)}"
    assert answer(got) == want, name


@pytest.mark.parametrize("name", NAMES)
def test_searchset_match_entry_picks_the_patient(name, tmp_path, capsys):
    want = collection_answer(name, capsys)
    f = write(searchset(name, others_match=False), tmp_path / "searchset.json")
    got = run_cli(["classify", "--bundle", str(f)], capsys)
    assert got["patient"] == f"Patient/{pid_of(name)}"
    assert answer(got) == want, name


@pytest.mark.parametrize("name", NAMES)
def test_urn_uuid_references_resolving_in_the_bundle_give_the_same_answer(name, tmp_path, capsys):
    want = collection_answer(name, capsys)
    f = write(as_urn_uuid_transaction(name), tmp_path / "transaction.json")
    assert answer(run_cli(["classify", "--bundle", str(f)], capsys)) == want, name


@pytest.mark.parametrize("name", NAMES)
def test_absolute_references_to_the_same_server_give_the_same_answer(name, tmp_path, capsys):
    want = collection_answer(name, capsys)
    f = write(with_absolute_references(name), tmp_path / "absolute.json")
    assert answer(run_cli(["classify", "--bundle", str(f)], capsys)) == want, name


# ----------------------------------------------------------------------------- (c): SEKMET
@pytest.mark.parametrize("name", NAMES)
def test_run_on_a_server_gives_the_same_answer(name, server, capsys):
    want = collection_answer(name, capsys)
    out = run_cli(["run", "--fhir-url", server.base_url, "--patient", pid_of(name), "--dry-run"], capsys)
    [p] = out["patients"]
    assert p["action"] != "failed", p
    c = p["classification"]
    assert c is not None, p
    got = {"group": c["group"], "status": c["status"], "criteria": c["criteria"],
           "assessed": c.get("assessed", "<missing>")}
    assert got == want, name
    # The run reports a group only for a patient it assesses.
    assert (p["group"], p["status"]) == ((c["group"], c["status"]) if want["assessed"] else (None, None)), name
    # "no recurrence" is the same answer on both sides: no RiskAssessment would be written.
    assert (p["action"] == "no-recurrence") == (want["assessed"] is False), (p["action"], want)
