"""Every fixture Bundle gets its expected result through the real command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clm_stratify.cli import main

from fixtures import FIXTURES_DIR  # noqa: E402

FIXTURES = FIXTURES_DIR
EXPECTED = yaml.safe_load((FIXTURES / "expected.yaml").read_text())
ADJUVANT = {True: "given", False: "not-given", None: "unknown"}


def classify_json(path: Path, capsys) -> dict:
    code = main(["classify", "--bundle", str(path), "--format", "json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_gets_expected_result(name, capsys):
    want = EXPECTED[name]
    got = classify_json(FIXTURES / name, capsys)
    assert got["group"] == want["group"], want["description"]
    assert got["status"] == want["status"]
    if want.get("criteria") is not None:
        assert got["criteria"] == want["criteria"]
    if "adjuvant_chemotherapy" in want:
        assert got["evidence"]["adjuvant_chemotherapy"]["state"] == ADJUVANT[want["adjuvant_chemotherapy"]]
    # Three-valued logic: an unknown factor never yields "resectable".
    if None in got["criteria"].values():
        assert got["group"] != "resectable"
    if "assessed" in want:
        assert got.get("assessed") is want["assessed"], (want["description"], got.get("assessed"))
    for fact, state in (want.get("evidence_states") or {}).items():
        assert fact in got["evidence"], f"no evidence entry for {fact}"
        assert got["evidence"][fact]["state"] == state, (fact, got["evidence"][fact])


def _normalised(text: str) -> tuple[str, str]:
    """The text with line wrapping undone: whitespace collapsed, and (second form) a wrap
    after a hyphen removed, so a phrase or reference split over two lines is still found."""
    flat = " ".join(text.split())
    return flat, re.sub(r"-\s", "-", flat)


WARNED = sorted(n for n, w in EXPECTED.items() if w.get("warnings_contain"))


@pytest.mark.parametrize("name", WARNED)
def test_fixture_warnings_name_the_distrusted_resource_and_reason(name, capsys):
    """Every dropped or distrusted resource is named in the warnings, with its reason, in
    the JSON result and in the text report."""
    want = EXPECTED[name]
    got = classify_json(FIXTURES / name, capsys)
    assert isinstance(got["warnings"], list) and all(isinstance(w, str) for w in got["warnings"])
    for phrase in want["warnings_contain"]:
        assert any(phrase in w or phrase in _normalised(w)[0] for w in got["warnings"]), (
            f"{name}: no warning contains {phrase!r}; warnings: {got['warnings']}")
    assert main(["classify", "--bundle", str(FIXTURES / name)]) == 0
    text = capsys.readouterr().out
    forms = _normalised(text)
    for phrase in want["warnings_contain"]:
        assert any(phrase in form for form in forms), f"{name}: text report lacks {phrase!r}:\n{text}"


def test_warning_phrases_are_not_emitted_for_clean_fixtures(capsys):
    """The key phrases mean something: a clean record (fixture 01) has none of them."""
    got = classify_json(FIXTURES / "01-resectable-single-small.json", capsys)
    phrases = {p for w in EXPECTED.values() for p in w.get("warnings_contain", []) if "/" not in p}
    assert phrases, "no warnings_contain phrases in expected.yaml"
    hits = [(p, w) for p in phrases for w in got["warnings"] if p in w]
    assert not hits, hits


@pytest.mark.parametrize("name", sorted(n for n, w in EXPECTED.items() if w.get("assessed") is False))
def test_no_recurrence_fixture_is_not_assessed(name, capsys):
    """`assessed: false` (run: no-recurrence; compared with a server in test_evidence_differential)."""
    got = classify_json(FIXTURES / name, capsys)
    assert got["assessed"] is False
    assert got["group"] == "indeterminate"
    assert got["evidence"]["liver_recurrence"]["state"] == "absent"


@pytest.mark.parametrize("name", sorted(n for n, w in EXPECTED.items() if w["group"] != "indeterminate"))
def test_each_present_factor_names_its_resources(name, capsys):
    got = classify_json(FIXTURES / name, capsys)
    for factor, value in got["criteria"].items():
        if value is True:
            refs = got["evidence"][factor]["refs"]
            assert refs and all("/" in r for r in refs), (factor, refs)
            bundle = json.loads((FIXTURES / name).read_text())
            ids = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
            assert {r.split("/_history/")[0] for r in refs} <= ids
    assert got["evidence"]["liver_recurrence"]["refs"]


def test_json_output_shape(capsys):
    got = classify_json(FIXTURES / "05-borderline-size-50mm-exact.json", capsys)
    assert set(got) >= {"group", "status", "criteria", "missing", "recommendations", "ruleset", "evidence",
                        "rules_fired", "cohort_survival", "warnings", "patient", "assessed"}
    assert got["assessed"] is True
    assert got["evidence"]["prior_liver_resection"]["state"] == "recorded"
    assert got["evidence"]["imaging_measurements"]["state"] == "current"
    assert set(got["criteria"]) == {"tumour_count_ge_4", "largest_ge_50mm", "extrahepatic_disease"}
    assert got["ruleset"]["id"] == "clm-recurrence-resectability"
    assert got["ruleset"]["version"].count(".") == 2
    assert got["evidence"]["largest_ge_50mm"]["value"] == "50.0"
    assert "group.G2-factor-present" in got["rules_fired"]
    assert "cohort estimate" in got["cohort_survival"]["caveat"]


def test_text_report_names_deciding_facts_and_cohort_caveat(capsys):
    assert main(["classify", "--bundle", str(FIXTURES / "09-borderline-ehd-lung-snomed.json")]) == 0
    out = capsys.readouterr().out
    assert "Patient/f09-pat: Borderline resectable (preliminary)" in out and "group borderline-resectable" in out
    assert "[present] extrahepatic disease present" in out
    assert "Cohort estimate" in out and "not a prediction for this patient" in out


def test_console_script_and_module_entry_points():
    f = str(FIXTURES / "01-resectable-single-small.json")
    for cmd in (["clm-stratify"], [sys.executable, "-m", "clm_stratify"]):
        exe = cmd if cmd[0] != "clm-stratify" else [str(Path(sys.executable).with_name("clm-stratify"))]
        proc = subprocess.run(exe + ["classify", "--bundle", f, "--format", "json"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["group"] == "resectable"
