"""Structural checks of the synthetic FHIR fixtures in fixtures/ (not of the engine's results).

Every fixture must parse as an R4B Bundle, hold exactly one Patient, use ids unique across
all fixtures (prefixed with its number), resolve every reference inside its own bundle,
and have exactly one entry in fixtures/expected.yaml (and vice versa).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle

from fixtures import FIXTURES_DIR  # noqa: E402

FIXTURES = FIXTURES_DIR
FIXTURE_FILES = sorted(FIXTURES.glob("[0-9][0-9]-*.json"))
EXPECTED_FILE = FIXTURES / "expected.yaml"
BASE_URL = "https://example.org/fhir"
GROUPS = {"resectable", "borderline-resectable", "unresectable", "indeterminate"}
STATUSES = {"preliminary", "final"}
CRITERIA = {"tumour_count_ge_4", "largest_ge_50mm", "extrahepatic_disease"}
EXPECTED_KEYS = {"description", "group", "status", "criteria", "adjuvant_chemotherapy",
                 "assessed", "evidence_states", "warnings_contain"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _resources(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", [])]


def _references(node) -> list[str]:
    """Every Reference.reference string anywhere in a resource."""
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            found.append(ref)
        for value in node.values():
            found.extend(_references(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_references(value))
    return found


@pytest.fixture(scope="module")
def expected() -> dict:
    data = yaml.safe_load(EXPECTED_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "expected.yaml must be a mapping file name -> expectation"
    return data


def test_there_are_fixtures():
    assert len(FIXTURE_FILES) >= 24
    numbers = [p.name[:2] for p in FIXTURE_FILES]
    assert len(set(numbers)) == len(numbers), "fixture numbers must be unique"
    for p in FIXTURE_FILES:
        assert re.fullmatch(r"\d\d-[a-z0-9]+(-[a-z0-9]+)*\.json", p.name), p.name


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_parses_as_r4b_collection_bundle(path: Path):
    data = _load(path)
    bundle = Bundle.model_validate(data)
    assert bundle.type == "collection"
    assert bundle.entry, "bundle has no entries"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_exactly_one_patient_with_synthetic_identifier(path: Path):
    prefix = f"f{path.name[:2]}"
    patients = [r for r in _resources(_load(path)) if r["resourceType"] == "Patient"]
    assert len(patients) == 1
    patient = patients[0]
    assert patient["id"] == f"{prefix}-pat"
    assert any(i.get("system") == "https://example.org/mrn" and i.get("value")
               for i in patient.get("identifier", []))


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_ids_prefixed_and_full_urls(path: Path):
    prefix = f"f{path.name[:2]}-"
    for entry in _load(path)["entry"]:
        res = entry["resource"]
        assert res["id"].startswith(prefix), res["id"]
        assert entry["fullUrl"] == f"{BASE_URL}/{res['resourceType']}/{res['id']}"


def test_ids_unique_across_all_fixtures():
    ids = Counter()
    for path in FIXTURE_FILES:
        for res in _resources(_load(path)):
            ids[res["id"]] += 1
    dupes = [i for i, n in ids.items() if n > 1]
    assert not dupes, f"ids used more than once: {dupes}"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_references_resolve_inside_bundle(path: Path):
    """Every reference is a relative Type/id inside the bundle, and every subject is the
    bundle's patient; except in the fixtures about attribution (they name the warning
    "unattributable" or "belongs to"), where resources whose subject is deliberately not
    the patient are the point of the fixture."""
    resources = _resources(_load(path))
    present = {f"{r['resourceType']}/{r['id']}" for r in resources}
    patient_ref = next(f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient")
    needles = " ".join(yaml.safe_load(EXPECTED_FILE.read_text())[path.name].get("warnings_contain") or [])
    about_attribution = "unattributable" in needles or "belongs to" in needles
    deliberate = 0
    for res in resources:
        subjects = [res[key] for key in ("subject", "patient") if key in res and res["resourceType"] != "Patient"]
        unnamed = not subjects and res["resourceType"] not in ("Patient", "Medication")
        if about_attribution and (unnamed or any(s.get("reference") != patient_ref for s in subjects)):
            deliberate += 1
            continue
        for ref in _references(res):
            assert re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", ref), \
                f"{res['id']}: reference {ref!r} is not relative Type/id"
            assert ref in present, f"{res['id']}: reference {ref!r} not in bundle"
        for s in subjects:
            assert s["reference"] == patient_ref, f"{res['id']} subject is not the bundle's patient"
    assert deliberate or not about_attribution, "an attribution fixture with nothing to attribute"


def test_expected_matches_fixture_files(expected):
    names = {p.name for p in FIXTURE_FILES}
    assert set(expected) == names, (
        f"missing in expected.yaml: {sorted(names - set(expected))}; "
        f"no such fixture: {sorted(set(expected) - names)}")


def test_expected_entries_well_formed(expected):
    for name, exp in expected.items():
        assert set(exp) <= EXPECTED_KEYS, f"{name}: unknown keys {set(exp) - EXPECTED_KEYS}"
        assert isinstance(exp.get("description"), str) and exp["description"], name
        assert exp.get("group") in GROUPS, name
        assert exp.get("status") in STATUSES, name
        criteria = exp.get("criteria")
        if criteria is not None:
            assert set(criteria) == CRITERIA, name
            assert all(v in (True, False, None) for v in criteria.values()), name
        assert exp.get("adjuvant_chemotherapy") in (True, False, None), name


def test_expected_entries_consistent_with_rules(expected):
    """Group/status must follow from criteria as the default rule set defines them."""
    for name, exp in expected.items():
        group, criteria = exp["group"], exp["criteria"]
        if group == "unresectable":
            assert exp["status"] == "final", name
            continue
        if criteria is None:
            assert group == "indeterminate" and exp["status"] == "preliminary", name
            continue
        values = list(criteria.values())
        resection = (exp.get("evidence_states") or {}).get("prior_liver_resection", "recorded")
        if any(v is True for v in values):
            assert group == "borderline-resectable", name
        elif all(v is False for v in values) and resection == "recorded":
            assert group == "resectable", name
        else:
            assert group == "indeterminate", name
