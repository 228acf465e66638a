"""``clm-stratify rules diff`` (shadow runs of a new rule set) on Bundle files, and the
one-line hint when a terminology is given as a rule set (or the reverse).

The must-show: a copy of the project's rule set with the size threshold at 40 mm moves
exactly the patients an oracle computed from the mapped features predicts. The oracle
applies the clinical basis (docs: ../shared/reference/clinical-basis.md) itself: each
factor present / absent / unknown from the feature's value and bounds, then the group
table; it is checked against the engine on the current rule set first.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from clm_stratify.cli import main
from engine.classify import Engine
from engine.features import Fact, Features
from engine.ruleset import RuleSet, load_ruleset
from engine.shadow import NO_RECURRENCE, STATES, shadow_run
from engine.yamlfile import DeclarativeFileError
from fhir_adapters.features.mapping import map_features
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR

ROOT = Path(__file__).resolve().parents[2]


def ruleset_data() -> dict:
    return yaml.safe_load((ROOT / "rules" / "resectability.yaml").read_text())


def bumped(data: dict) -> dict:
    major, minor, _ = data["version"].split(".")
    return {**data, "version": f"{major}.{int(minor) + 1}.0"}


def write_rules(tmp_path: Path, data: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rules_with_threshold(tmp_path: Path, mm: int) -> Path:
    data = bumped(ruleset_data())
    data["factors"]["largest_ge_50mm"]["threshold"] = mm
    return write_rules(tmp_path, data, f"rules-{mm}")


def fixture_features() -> list[Features]:
    terminology = load_terminology()
    return [map_features(read_bundle_file(p), terminology) for p in sorted(FIXTURES_DIR.glob("*.json"))]


# ----------------------------------------------------------------------------- the oracle
def factor_state(fact: Fact, threshold: Decimal) -> str:
    """">= threshold" from a value and its bounds (clinical basis, "Reading numbers")."""
    if fact.value is not None and Decimal(fact.value) >= threshold:
        return "present"                  # an exact value or a lower bound at or above it
    if fact.value is not None and not fact.lower_bound:
        return "absent"                   # an exact value below it
    if fact.at_most is not None and (fact.at_most < threshold or (fact.at_most == threshold and fact.at_most_strict)):
        return "absent"                   # an upper bound below it
    return "unknown"


def oracle(f: Features, size_mm: int) -> tuple[str, str]:
    """(state, status) by the clinical basis' group table and status rule."""
    liver = {True: "present", False: "absent"}.get(f.liver_recurrence.value, "unknown")
    if liver == "absent":
        return NO_RECURRENCE, "preliminary"
    if liver == "unknown":
        return "indeterminate", "preliminary"
    technical = f.technical_resectability.value or "not-assessed"
    factors = [factor_state(f.tumour_count, Decimal(4)), factor_state(f.largest_diameter_mm, Decimal(size_mm)),
               {True: "present", False: "absent"}.get(f.extrahepatic_disease.value, "unknown")]
    resection = f.prior_liver_resection.value is True
    if technical == "unresectable":
        group = "unresectable"
    elif "present" in factors:
        group = "borderline-resectable"
    elif technical != "in-doubt" and all(s == "absent" for s in factors) and resection:
        group = "resectable"
    else:
        group = "indeterminate"
    final = (technical in ("resectable", "unresectable") and resection and f.imaging_measurements.value is not False
             and group != "indeterminate")
    return group, "final" if final else "preliminary"


def diff_json(argv: list[str], capsys) -> tuple[int, dict]:
    code = main(["rules", "diff", *argv, "--format", "json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out)


# ----------------------------------------------------------------------------- the must-show
def test_the_oracle_agrees_with_the_engine_on_the_current_rule_set():
    features = fixture_features()
    results = Engine.default().classify_many(features)
    got = {f.patient: (r.group if r.assessed else NO_RECURRENCE, r.status) for f, r in zip(features, results)}
    assert got == {f.patient: oracle(f, 50) for f in features}


def test_a_40mm_threshold_moves_exactly_the_patients_the_oracle_predicts(tmp_path, capsys):
    features = {f.patient: f for f in fixture_features()}
    before = {p: oracle(f, 50) for p, f in features.items()}
    after = {p: oracle(f, 40) for p, f in features.items()}
    expected = {p: after[p] for p in features if before[p][0] != after[p][0]}
    # proven 40-49.x mm (exact or a lower bound) -> borderline; "< 50 mm" no longer proves absent
    assert expected == {"Patient/f06-pat": ("borderline-resectable", "preliminary"),
                        "Patient/f55-pat": ("borderline-resectable", "preliminary"),
                        "Patient/f57-pat": ("indeterminate", "preliminary"),
                        "Patient/f59-pat": ("borderline-resectable", "preliminary")}

    code, data = diff_json(["--rules", str(rules_with_threshold(tmp_path, 40)), "--bundle", str(FIXTURES_DIR)], capsys)
    assert code == 0
    assert {m["patient"]: (m["to"]["group"], m["to"]["status"]) for m in data["moved"]} == expected
    assert all(m["from"]["group"] == before[m["patient"]][0] for m in data["moved"])
    matrix = {row: {col: 0 for col in STATES} for row in STATES}
    for p in features:
        matrix[before[p][0]][after[p][0]] += 1
    assert data["matrix"] == matrix
    assert data["status_changed"] == [] and data["failures"] == [] and data["written"] == "nothing"
    assert data["patients"] == len(features) and data["unchanged"] == len(features) - len(expected)
    assert data["new"]["version"] != data["current"]["version"] and data["notes"] == []
    size = {m["patient"]: m["factors"] for m in data["moved"]}
    assert size["Patient/f06-pat"] == [{"factor": "largest_ge_50mm", "label": "largest recurrent tumour 5 cm or more",
                                        "from": "absent", "to": "present", "test_from": ">= 50 mm",
                                        "test_to": ">= 40 mm", "value": "49.9 mm"}]
    assert (size["Patient/f57-pat"][0]["from"], size["Patient/f57-pat"][0]["to"]) == ("absent", "unknown")
    assert size["Patient/f59-pat"][0]["value"] == "at least 49.0 mm"


def test_the_text_report_shows_the_pair_the_matrix_and_each_mover(tmp_path, capsys):
    assert main(["rules", "diff", "--rules", str(rules_with_threshold(tmp_path, 40)), "--bundle", str(FIXTURES_DIR)]) == 0
    text = capsys.readouterr().out
    assert "nothing is written" in text.splitlines()[0]
    assert "61 patient(s) compared, 0 failed" in text and "moved: 4" in text and "unchanged: 57" in text
    assert ("  Patient/f06-pat: resectable (preliminary) -> borderline-resectable (preliminary) "
            "[G3-all-factors-absent -> G2-factor-present]: largest recurrent tumour 5 cm or more "
            "(>= 50 mm -> >= 40 mm) absent -> present (49.9 mm)") in text.splitlines()
    row = next(line for line in text.splitlines() if line.startswith("resectable "))
    assert row.split()[1:] == ["19", "2", "0", "1", "0"]


# ----------------------------------------------------------------------------- the pair
def test_an_identical_rule_set_says_nothing_can_move(tmp_path, capsys):
    same = write_rules(tmp_path, ruleset_data(), "same")
    code, data = diff_json(["--rules", str(same), "--bundle", str(FIXTURES_DIR), "--fail-on-change"], capsys)
    assert code == 0 and data["moved"] == [] and data["unchanged"] == 61
    assert data["notes"] == ["identical rule sets (same sha256): nothing can move"]


def test_fail_on_change_exits_1_when_a_patient_moves(tmp_path, capsys):
    assert main(["rules", "diff", "--rules", str(rules_with_threshold(tmp_path, 40)), "--bundle",
                 str(FIXTURES_DIR / "06-resectable-size-49-9mm.json"), "--fail-on-change"]) == 1
    assert "moved: 1" in capsys.readouterr().out


def test_another_id_or_the_same_version_is_warned(tmp_path, capsys):
    data = ruleset_data()
    data["factors"]["largest_ge_50mm"]["threshold"] = 40
    same_version = write_rules(tmp_path, data, "same-version")
    _, out = diff_json(["--rules", str(same_version), "--bundle", str(FIXTURES_DIR / "01-resectable-single-small.json")],
                       capsys)
    assert out["notes"] and "bump the new one's version" in out["notes"][0]
    other = write_rules(tmp_path, {**bumped(data), "id": "site-resectability"}, "other-id")
    _, out = diff_json(["--rules", str(other), "--bundle", str(FIXTURES_DIR / "01-resectable-single-small.json")], capsys)
    assert any("another id (site-resectability" in n and "beside the current ones" in n for n in out["notes"])


def test_writing_for_patients_without_a_recurrence_is_its_own_column(tmp_path, capsys):
    data = bumped(ruleset_data())
    data["assessment"]["write_when"] = {"liver_recurrence": ["present", "unknown", "absent"]}
    code, out = diff_json(["--rules", str(write_rules(tmp_path, data, "write-all")), "--bundle", str(FIXTURES_DIR)],
                          capsys)
    no_recurrence = {p for p, f in ((f.patient, f) for f in fixture_features()) if oracle(f, 50)[0] == NO_RECURRENCE}
    assert code == 0 and len(no_recurrence) == 5
    assert {m["patient"] for m in out["moved"]} == no_recurrence
    assert out["matrix"][NO_RECURRENCE] == {**{s: 0 for s in STATES}, "indeterminate": 5}


def test_a_status_only_change_is_listed_apart():
    """Pure: features -> two engines -> diff. A rule set that no longer asks for current
    imaging makes a stale-imaging resectable result final: status changes, group does not."""
    data = bumped(ruleset_data())
    data["status"]["final_when"]["all"] = [c for c in data["status"]["final_when"]["all"]
                                           if c != {"imaging_measurements": "current"}]
    new = Engine(RuleSet.model_validate(data))
    stale = Features(patient="Patient/s", liver_recurrence=Fact[bool](value=True), tumour_count=Fact[int](value=1),
                     largest_diameter_mm=Fact(value=Decimal(20)), extrahepatic_disease=Fact[bool](value=False),
                     technical_resectability=Fact(value="resectable"), prior_liver_resection=Fact[bool](value=True),
                     imaging_measurements=Fact[bool](value=False))
    current_img = stale.model_copy(update={"patient": "Patient/c", "imaging_measurements": Fact[bool](value=True)})
    diff = shadow_run([stale, current_img], Engine.default(), new)
    assert diff.moved == () and diff.unchanged == 1
    (change,) = diff.status_changed
    assert (change.patient, change.before, change.after) == ("Patient/s", "resectable", "resectable")
    assert (change.before_status, change.after_status, change.changes) == ("preliminary", "final", ())
    assert diff.matrix["resectable"]["resectable"] == 2


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    new = str(rules_with_threshold(tmp_path, 40))
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle", ')
    assert main(["rules", "diff", "--rules", new, "--bundle", str(FIXTURES_DIR), "--bundle", str(broken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {broken}: not valid JSON at line 1, column 28"
    (tmp_path / "empty").mkdir()
    assert main(["rules", "diff", "--rules", new, "--bundle", str(tmp_path / "empty")]) == 2
    assert "no *.json Bundle files" in capsys.readouterr().err
    twice = tmp_path / "copy.json"
    twice.write_bytes((FIXTURES_DIR / "06-resectable-size-49-9mm.json").read_bytes())
    assert main(["rules", "diff", "--rules", new, "--bundle", str(FIXTURES_DIR), "--bundle", str(twice)]) == 2
    assert "Patient/f06-pat is also in" in capsys.readouterr().err
    assert main(["rules", "diff", "--rules", new, "--bundle", str(FIXTURES_DIR), "--all"]) == 2
    assert "give --fhir-url" in capsys.readouterr().err
    assert main(["rules", "diff", "--rules", new, "--fhir-url", "http://127.0.0.1:9/fhir"]) == 2
    assert "give --all" in capsys.readouterr().err
    assert main(["rules", "diff", "--rules", str(tmp_path / "nope.yaml"), "--bundle", str(FIXTURES_DIR)]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the hint
TERMINOLOGY = str(ROOT / "rules" / "terminology.yaml")
RULESET = str(ROOT / "rules" / "resectability.yaml")


@pytest.mark.parametrize("argv", [
    ["rules", "validate", TERMINOLOGY],
    ["classify", "--bundle", str(FIXTURES_DIR / "01-resectable-single-small.json"), "--rules", TERMINOLOGY],
    ["rules", "diff", "--rules", TERMINOLOGY, "--bundle", str(FIXTURES_DIR)],
])
def test_a_terminology_given_as_a_rule_set_is_named_in_one_line(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: {TERMINOLOGY} is a terminology file, not a rule set: "
                                       "give it with --terminology\n")


@pytest.mark.parametrize("argv", [
    ["rules", "validate", "--terminology", RULESET],
    ["classify", "--bundle", str(FIXTURES_DIR / "01-resectable-single-small.json"), "--terminology", RULESET],
])
def test_a_rule_set_given_as_a_terminology_is_named_in_one_line(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: {RULESET} is a rule set, not a terminology file: give it as the "
                                       "rule set (--rules, or the file of rules validate)\n")


def test_a_broken_rule_set_still_gets_its_field_errors(tmp_path, capsys):
    data = ruleset_data()
    data["factors"]["largest_ge_50mm"]["threshold"] = "fifty"
    del data["groups"]
    path = write_rules(tmp_path, data, "broken")
    with pytest.raises(DeclarativeFileError) as info:
        load_ruleset(path)
    assert "terminology" not in str(info.value) and "groups: Field required" in str(info.value)
    assert main(["rules", "validate", str(path)]) == 2
    assert "factors.largest_ge_50mm.threshold" in capsys.readouterr().err
