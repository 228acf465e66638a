"""Rule set and terminology files: validation with paths, and the load-time checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clm_stratify.cli import main
from engine.classify import Engine, RulesetInconsistentError
from engine.ruleset import load_ruleset
from engine.yamlfile import DeclarativeFileError
from fhir_adapters.terminology import load_terminology
from rules import DEFAULT_RULESET, DEFAULT_TERMINOLOGY


def edited(tmp_path: Path, source: Path, edit) -> Path:
    data = yaml.safe_load(source.read_text())
    edit(data)
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_default_files_are_valid(capsys):
    assert main(["rules", "validate", str(DEFAULT_RULESET), "--terminology", str(DEFAULT_TERMINOLOGY)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "3888 combinations" in out  # 3^3 factors x 3 (liver) x 4 (technical) x 3 x 2 x 2


def test_thresholds_come_from_the_file():
    rs = load_ruleset()
    assert rs.factors["tumour_count_ge_4"].threshold == 4
    assert rs.factors["largest_ge_50mm"].threshold == 50
    assert rs.citation.doi == "10.1245/s10434-024-16491-3" and rs.citation.pmid == "39580378"


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["factors"]["largest_ge_50mm"].update(threshold="fifty"),
     "factors.largest_ge_50mm.threshold: "),
    (lambda d: d["factors"]["largest_ge_50mm"].update(operator="is_true"),
     "factors.largest_ge_50mm: Value error, feature largest_diameter_mm is numeric"),
    (lambda d: d["groups"][2].update(id="maybe"), "groups[2].id: "),
    (lambda d: d["groups"][2]["when"]["all"][0].update(liver_recurrence="yes"),
     "groups[2].when.all[0].liver_recurrence: 'yes' is not a state of liver_recurrence"),
    (lambda d: d["groups"][1]["when"]["all"].append({"tumour_size": "present"}),
     "groups[1].when.all[2].tumour_size: unknown fact 'tumour_size'"),
    (lambda d: d.update(version="1.0"), "version: String should match pattern"),
    (lambda d: d.pop("citation"), "citation: Field required"),
    (lambda d: d["fact_labels"].pop("adjuvant_chemotherapy"), "fact_labels: Value error, no label for adjuvant_chemotherapy"),
    (lambda d: d["card_indicators"]["unresectable"].pop("final"),
     "card_indicators: Value error, no indicator for unresectable final"),
    (lambda d: d["card_indicators"]["resectable"].update(final="urgent"),
     "card_indicators.resectable.final: Input should be 'info', 'warning' or 'critical'"),
    (lambda d: d["survival"].update(horizon_years=0), "survival.horizon_years: Input should be greater than 0"),
    (lambda d: d["survival"]["five_year_os_percent"].update(resectable=140),
     "survival.five_year_os_percent.resectable: Input should be less than or equal to 100"),
])
def test_bad_rule_file_names_file_and_field(tmp_path, edit, expected, capsys):
    path = edited(tmp_path, DEFAULT_RULESET, edit)
    with pytest.raises(DeclarativeFileError) as info:
        load_ruleset(path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert main(["rules", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_overlapping_group_rules_are_refused(tmp_path):
    def overlap(d):  # G3 no longer requires the count factor to be absent: overlaps G2
        d["groups"][3]["when"]["all"] = [c for c in d["groups"][3]["when"]["all"] if "tumour_count_ge_4" not in c]
    with pytest.raises(RulesetInconsistentError, match="exactly one must"):
        Engine(load_ruleset(edited(tmp_path, DEFAULT_RULESET, overlap)))


def test_a_gap_in_the_group_rules_is_refused(tmp_path, capsys):
    path = edited(tmp_path, DEFAULT_RULESET, lambda d: d["groups"].pop(4))  # drop G4 (unknown factor)
    with pytest.raises(RulesetInconsistentError, match="none"):
        Engine(load_ruleset(path))
    assert main(["rules", "validate", str(path)]) == 2
    assert "exactly one must" in capsys.readouterr().err


def test_a_site_can_change_a_threshold_in_yaml_only(tmp_path):
    from engine.features import Fact, Features
    path = edited(tmp_path, DEFAULT_RULESET, lambda d: d["factors"]["tumour_count_ge_4"].update(threshold=5))
    engine = Engine(load_ruleset(path))
    f = Features(liver_recurrence=Fact[bool](value=True), tumour_count=Fact[int](value=4),
                 largest_diameter_mm=Fact(value=10), extrahepatic_disease=Fact[bool](value=False),
                 prior_liver_resection=Fact[bool](value=True))
    assert engine.classify(f).group == "resectable"
    assert Engine.default().classify(f).group == "borderline-resectable"


@pytest.mark.parametrize("text, expected", [
    ("id: [unclosed", "not valid YAML"),
    ("- a list", "expected a mapping"),
])
def test_unparseable_yaml(tmp_path, text, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(DeclarativeFileError, match=expected):
        load_ruleset(p)


def test_bad_terminology_names_field(tmp_path, capsys):
    path = edited(tmp_path, DEFAULT_TERMINOLOGY,
                  lambda d: d["extrahepatic_metastasis_condition"]["codes"].append({"system": "http://snomed.info/sct"}))
    with pytest.raises(DeclarativeFileError, match=r"extrahepatic_metastasis_condition\.codes\[\d+\]: Value error, give exactly one of 'code' or 'prefix'"):
        load_terminology(path)
    assert main(["rules", "validate", "--terminology", str(path)]) == 2


def test_a_site_can_add_a_code(tmp_path):
    from fhir_adapters.features.mapping import map_features
    from fhir_adapters.sources.record import PatientRecord
    local = {"system": "https://hospital.example/codes", "code": "MET-PERITONEUM"}
    path = edited(tmp_path, DEFAULT_TERMINOLOGY,
                  lambda d: d["extrahepatic_metastasis_condition"]["codes"].append(local))
    cond = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [local]}}
    record = PatientRecord.from_resources([cond])
    assert map_features(record, load_terminology(path)).extrahepatic_disease.value is True
    assert map_features(record, load_terminology()).extrahepatic_disease.value is False
