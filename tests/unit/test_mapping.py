"""Unit tests of the FHIR -> Features mapping (fhir_adapters/features/, through map_features).

Each test builds a small patient record with tests/support/resources.py, reads it the way the CLI
does (JSON numbers as Decimal), maps it, and classifies it with the default rule set
where the group matters. Clinical rules: /work/shared/reference/clinical-basis.md.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from clm_stratify.cli import main
from engine.classify import Engine
from fhir_adapters.sources.bundle import BundleError, loads, record_from_bundle
from fhir_adapters.features.mapping import map_features
from fhir_adapters.sources.record import PatientRecord
from tests.support.resources import (BONE_MET, ICD10CM, METASTATIC_GENERIC, PATHOLOGY_METHOD, RESECTION_DAY, RXNORM,
                           SCT, body_structure, bundle, chemo_admin, classify, classify_bundle, condition,
                           extrahepatic, features, hepatectomy, liver_met, medication, patient,
                           technical, terminology, tumour_size)

P = "p1"
RESECTABLE = "resectable"
BORDERLINE = "borderline-resectable"
UNRESECTABLE = "unresectable"
INDETERMINATE = "indeterminate"


def base(pid: str = P) -> list[dict]:
    """A patient who had a liver resection (2023-03-10) and a confirmed liver recurrence."""
    return [patient(pid), hepatectomy(pid), liver_met(pid)]


def crit(c) -> dict:
    return c.criteria_values()


def warns_about(warnings, *needles: str) -> bool:
    return any(all(n in w for n in needles) for w in warnings)


def map_json_text(text: str):
    """Resources given as JSON text (a list), read with Decimal numbers, mapped."""
    return map_features(PatientRecord.from_resources(loads(text)), terminology())


def with_raw_value(obs: dict, literal: str) -> str:
    """The resources as JSON text with the size's value replaced by a JSON literal."""
    return json.dumps(obs).replace('"__VALUE__"', literal)


# ============================================================================ UCUM units
@pytest.mark.parametrize("literal, unit, present", [
    ("50", "mm", True), ("50.0", "mm", True), ("5.0", "cm", True), ("5", "cm", True),
    ("0.05", "m", True), ("0.050", "m", True),
    ("49.9", "mm", False), ("4.99", "cm", False), ("0.0499", "m", False),
])
def test_ucum_units_are_converted_exactly(literal, unit, present):
    obs = tumour_size(P, value="__VALUE__", unit=unit, id="o1")
    text = "[" + ",".join(json.dumps(r) for r in base()) + "," + with_raw_value(obs, literal) + "]"
    f = map_json_text(text)
    size = f.largest_diameter_mm
    assert size.value == Decimal(literal) * {"mm": 1, "cm": 10, "m": 1000}[unit]
    assert isinstance(size.value, Decimal)
    assert size.lower_bound is False
    if present:
        assert size.value == 50 or size.value > 50
    c = Engine.default().classify(f)
    assert crit(c)["largest_ge_50mm"] is present
    assert c.group == (BORDERLINE if present else RESECTABLE)


def test_exact_50mm_from_metres_is_exactly_50():
    text = "[" + ",".join(json.dumps(r) for r in base()) + "," + with_raw_value(
        tumour_size(P, value="__VALUE__", unit="m"), "0.05") + "]"
    size = map_json_text(text).largest_diameter_mm
    assert size.value == Decimal("50") and size.value.is_finite() and not size.lower_bound


@pytest.mark.parametrize("value, unit, present", [
    (Decimal("0.05"), "m", True), (Decimal("5.0"), "cm", True), (Decimal("4.99"), "cm", False),
])
def test_decimal_values_given_in_python_stay_exact(value, unit, present):
    f = features(*base(), tumour_size(P, value=value, unit=unit), json_roundtrip=False)
    assert f.largest_diameter_mm.value == value * {"mm": 1, "cm": 10, "m": 1000}[unit]
    assert crit(Engine.default().classify(f))["largest_ge_50mm"] is present


def test_plain_style_observation_with_value_quantity_is_a_size():
    c = classify(*base(), tumour_size(P, value=Decimal("5.0"), unit="cm", component=False))
    assert crit(c)["largest_ge_50mm"] is True
    assert c.group == BORDERLINE


def test_unknown_unit_leaves_size_unknown_with_a_warning_naming_the_observation():
    f = features(*base(), tumour_size(P, value=2, unit="in", id="o-inch"))
    assert f.largest_diameter_mm.value is None
    assert f.tumour_count.value == 1
    assert warns_about(f.warnings, "Observation/o-inch", "unit")
    c = Engine.default().classify(f)
    assert crit(c)["largest_ge_50mm"] is None
    assert c.group == INDETERMINATE


def test_unknown_unit_next_to_a_known_small_size_is_not_absent():
    f = features(*base(), tumour_size(P, 20), tumour_size(P, value=3, unit="in", id="o-inch"))
    c = Engine.default().classify(f)
    assert crit(c)["largest_ge_50mm"] is None
    assert c.group == INDETERMINATE
    assert warns_about(f.warnings, "Observation/o-inch")


@pytest.mark.parametrize("value", [0, Decimal("0.0"), -5, Decimal("-0.1")])
def test_zero_or_negative_size_is_unknown_with_a_warning(value):
    f = features(*base(), tumour_size(P, value=value, id="o-bad"))
    assert f.largest_diameter_mm.value is None
    assert warns_about(f.warnings, "Observation/o-bad", "positive")
    c = Engine.default().classify(f)
    assert crit(c)["largest_ge_50mm"] is None
    assert c.group == INDETERMINATE


@pytest.mark.parametrize("literal", ['"abc"', "true", "false", '"NaN"', '"Infinity"', "[50]", "{}"])
def test_wrongly_typed_value_makes_the_observation_unreadable_and_counts_lower_bounds(literal):
    bad = tumour_size(P, value="__VALUE__", id="o-bad")
    text = ("[" + ",".join(json.dumps(r) for r in [*base(), tumour_size(P, 20, id="o-ok")]) + ","
            + with_raw_value(bad, literal) + "]")
    f = map_json_text(text)
    assert warns_about(f.warnings, "Observation/o-bad")
    assert f.tumour_count.value == 1 and f.tumour_count.lower_bound
    assert f.largest_diameter_mm.value == 20 and f.largest_diameter_mm.lower_bound
    c = Engine.default().classify(f)
    assert crit(c)["largest_ge_50mm"] is None
    assert crit(c)["tumour_count_ge_4"] is None
    assert c.group == INDETERMINATE


def test_only_an_unreadable_measurement_leaves_count_and_size_unknown():
    bad = tumour_size(P, value="__VALUE__", id="o-bad")
    text = "[" + ",".join(json.dumps(r) for r in base()) + "," + with_raw_value(bad, '"abc"') + "]"
    f = map_json_text(text)
    assert f.tumour_count.value is None and f.largest_diameter_mm.value is None
    assert "Observation/o-bad" in (f.tumour_count.note or "")
    assert Engine.default().classify(f).group == INDETERMINATE


def test_unreadable_measurement_cannot_hide_a_present_factor():
    bad = tumour_size(P, value="__VALUE__", id="o-bad")
    text = ("[" + ",".join(json.dumps(r) for r in [*base(), tumour_size(P, 60)]) + ","
            + with_raw_value(bad, '"abc"') + "]")
    c = Engine.default().classify(map_json_text(text))
    assert crit(c)["largest_ge_50mm"] is True
    assert c.group == BORDERLINE


@pytest.mark.parametrize("comparator, value, expected", [
    (">", 45, None), (">=", 45, None), (">", 55, True), (">=", 50, True), (">", 50, True),
    # An upper bound proves the factor absent when it is below the threshold, or at it
    # when the bound itself is excluded ("< 50 mm"); "<= 50 mm" may be exactly 50.
    ("<", 30, False), ("<=", 30, False), ("<", 50, False), ("<=", 50, None), ("<", 55, None), ("<=", 49.9, False),
])
def test_comparator(comparator, value, expected):
    f = features(*base(), tumour_size(P, value=value, comparator=comparator))
    c = Engine.default().classify(f)
    assert crit(c)["largest_ge_50mm"] is expected
    assert c.group == {True: BORDERLINE, False: RESECTABLE, None: INDETERMINATE}[expected]


def test_lower_bound_size_next_to_an_exact_larger_size():
    c = classify(*base(), tumour_size(P, 20), tumour_size(P, value=30, comparator=">"))
    assert crit(c)["largest_ge_50mm"] is None
    c = classify(*base(), tumour_size(P, 60), tumour_size(P, value=30, comparator=">"))
    assert crit(c)["largest_ge_50mm"] is True


@pytest.mark.parametrize("raw", ["1e300", "1e400", "0.00001", "1e-8", "401"])
def test_implausible_size_is_unknown_with_a_warning_never_a_crash(raw):
    """Sizes outside terminology.plausible_diameter_mm (0.5-400 mm) are data errors."""
    bad = tumour_size(P, value="__VALUE__")
    text = "[" + ",".join(json.dumps(r) for r in base()) + "," + with_raw_value(bad, raw) + "]"
    f = map_json_text(text)
    assert f.largest_diameter_mm.value is None
    assert any("plausible range" in w for w in f.warnings)
    c = Engine.default().classify(f)
    assert c.group == INDETERMINATE and c.criteria_values()["largest_ge_50mm"] is None


def test_plausible_extremes_are_kept():
    for mm, expected in (("0.5", False), ("400", True)):
        f = features(*base(), tumour_size(P, value=Decimal(mm)), json_roundtrip=False)
        assert f.largest_diameter_mm.value == Decimal(mm)
        assert Engine.default().classify(f).criteria_values()["largest_ge_50mm"] is expected


def test_small_positive_size_classifies():
    assert classify(*base(), tumour_size(P, value=Decimal("0.05"), unit="cm")).group == RESECTABLE  # 0.5 mm


# ============================================================================ lesion counting
def test_a_factor_shown_on_an_earlier_study_of_the_recurrence_stays_present():
    older = [tumour_size(P, 60, day="2024-01-15") for _ in range(5)]
    c = classify(*base(), *older, tumour_size(P, 20, day="2024-05-01"))
    f = features(*base(), *older, tumour_size(P, 20, day="2024-05-01"))
    assert f.tumour_count.value == 5
    assert f.largest_diameter_mm.value == 60
    assert crit(c) == {"tumour_count_ge_4": True, "largest_ge_50mm": True, "extrahepatic_disease": False}
    assert c.group == BORDERLINE


def test_a_later_study_that_does_not_account_for_every_lesion_leaves_the_factors_unknown():
    older = [tumour_size(P, 20, day="2024-01-15") for _ in range(3)]
    c = classify(*base(), *older, tumour_size(P, 20, day="2024-05-01"))
    assert crit(c)["tumour_count_ge_4"] is None and crit(c)["largest_ge_50mm"] is None
    assert c.group == INDETERMINATE
    assert warns_about(c.warnings, "not accounted for")


def test_a_lesion_identity_not_measured_again_is_not_accounted_for():
    bs = [body_structure(P, id=f"bs-{i}") for i in "abc"]
    older = [tumour_size(P, 20, day="2024-01-15", focus=f"bs-{i}") for i in "abc"]
    newer = [tumour_size(P, 20, day="2024-05-01", focus=f"bs-{i}") for i in "abd"]
    c = classify(*base(), *bs, body_structure(P, id="bs-d"), *older, *newer)
    assert crit(c)["tumour_count_ge_4"] is None and c.group == INDETERMINATE
    assert warns_about(c.warnings, "BodyStructure/bs-c", "not accounted for")
    newer = [tumour_size(P, 20, day="2024-05-01", focus=f"bs-{i}") for i in "abc"]
    assert classify(*base(), *bs, *older, *newer).group == RESECTABLE


def test_older_imaging_is_superseded_even_when_it_had_fewer_lesions():
    older = [tumour_size(P, 10, day="2024-01-15")]
    newer = [tumour_size(P, 12, day="2024-05-01") for _ in range(4)]
    c = classify(*base(), *older, *newer)
    assert crit(c)["tumour_count_ge_4"] is True


def test_same_focus_twice_on_the_same_date_is_one_lesion_with_the_largest_size():
    bs = body_structure(P, id="bs-a")
    f = features(*base(), bs, tumour_size(P, 30, focus="bs-a"), tumour_size(P, 55, focus="bs-a"))
    assert f.tumour_count.value == 1
    assert f.largest_diameter_mm.value == 55


def test_same_focus_with_different_reference_spellings_is_one_lesion():
    """On the record's own server (the Bundle's fullUrls name it) a relative and an
    absolute, versioned focus are one lesion; where the server of an absolute focus is
    unknown it may be another server's lesion of that id: counted apart (never fewer
    lesions than there may be)."""
    from fhir_adapters.sources.bundle import record_from_bundle

    bs = body_structure(P, id="bs-a")
    resources = (*base(), bs, tumour_size(P, 30, focus="bs-a"),
                 tumour_size(P, 35, focus="https://example.org/fhir/BodyStructure/bs-a/_history/2"))
    f = map_features(record_from_bundle(bundle(*resources)), terminology())
    assert f.tumour_count.value == 1
    assert f.largest_diameter_mm.value == 35
    unknown_server = features(*resources)
    assert unknown_server.tumour_count.value == 2 and unknown_server.largest_diameter_mm.value == 35


def test_distinct_foci_count_separately():
    structures = [body_structure(P, id=f"bs-{i}") for i in range(4)]
    obs = [tumour_size(P, 10, focus=f"bs-{i}") for i in range(4)]
    c = classify(*base(), *structures, *obs)
    assert c.criteria["tumour_count_ge_4"].value == 4
    assert crit(c)["tumour_count_ge_4"] is True


@pytest.mark.parametrize("n, present", [(3, False), (4, True), (5, True), (1, False)])
def test_observations_without_focus_each_count(n, present):
    c = classify(*base(), *[tumour_size(P, 10 + i) for i in range(n)])
    assert c.criteria["tumour_count_ge_4"].value == n
    assert crit(c)["tumour_count_ge_4"] is present
    assert c.group == (BORDERLINE if present else RESECTABLE)


@pytest.mark.parametrize("days", [
    ("2024-05-01T08:00:00+09:00", "2024-04-30T23:00:00Z"),          # one instant, two timezones
    ("2024-05-20T23:30:00-05:00", "2024-05-21T04:30:00Z"),          # across the date line of one zone
    ("2024-05-01", "2024-05-01T10:00:00Z"),                         # a date joins the instants of its day
    ("2024-05-01T10:00:00Z", "2024-05-01T10:00:30Z"),               # one examination, stamped seconds apart
])
def test_one_examination_is_one_study_whatever_the_timezones(days):
    older = tumour_size(P, 15, day="2024-04-20T12:00:00Z")
    f = features(*base(), older, *[tumour_size(P, 20, day=d) for d in days])
    assert f.tumour_count.value == 2
    assert f.tumour_count.lower_bound is False


def test_effective_period_start_is_the_date():
    obs = tumour_size(P, 20, effective={"effectivePeriod": {"start": "2024-05-01T09:00:00Z"}})
    f = features(*base(), obs, tumour_size(P, 15, day="2024-04-01"))
    assert f.tumour_count.value == 1
    assert f.largest_diameter_mm.value == 20


def test_undated_measurement_makes_count_and_size_lower_bounds():
    obs = tumour_size(P, 20, day=None, id="o-undated")
    f = features(*base(), tumour_size(P, 10), obs)
    assert f.tumour_count.lower_bound and f.largest_diameter_mm.lower_bound
    assert warns_about(f.warnings, "Observation/o-undated")
    assert Engine.default().classify(f).group == INDETERMINATE


def test_focus_on_the_condition_does_not_merge_distinct_lesions():
    lm = liver_met(P, id="lm")
    obs = [tumour_size(P, 10 + i, focus="Condition/lm") for i in range(4)]
    c = classify(patient(P), hepatectomy(P), lm, *obs)
    assert crit(c)["tumour_count_ge_4"] is not False
    assert c.group != RESECTABLE


def test_lesions_without_resource_ids_in_a_transaction_bundle_count_separately():
    obs = [tumour_size(P, 10 + i) for i in range(4)]
    for o in obs:
        del o["id"]
    data = bundle(patient(P), hepatectomy(P), liver_met(P), *obs, type="transaction")
    for i, entry in enumerate(data["entry"]):
        entry["fullUrl"] = f"urn:uuid:7f3e0000-0000-4000-8000-00000000000{i}"
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
    c = classify_bundle(data)
    assert crit(c)["tumour_count_ge_4"] is True
    assert c.group == BORDERLINE


def test_month_precision_measurement_that_may_be_the_latest_is_not_dropped():
    c = classify(*base(), tumour_size(P, 20, day="2024-05-15"), tumour_size(P, 70, day="2024-05"))
    assert c.group != RESECTABLE


def test_month_precision_measurement_is_warned():
    f = features(*base(), tumour_size(P, 20, day="2024-05", id="o-month"))
    assert warns_about(f.warnings, "Observation/o-month", "month")


# ============================================================================ reference resection
def test_measurements_on_or_before_the_resection_are_ignored():
    before = [tumour_size(P, 70, day="2023-01-10") for _ in range(4)]
    same_day = [tumour_size(P, 70, day=RESECTION_DAY) for _ in range(4)]
    f = features(*base(), *before, *same_day, tumour_size(P, 20, day="2024-05-01"))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20
    assert Engine.default().classify(f).group == RESECTABLE


def test_only_pre_resection_measurements_leave_count_unknown():
    f = features(*base(), tumour_size(P, 20, day="2023-01-10"))
    assert f.tumour_count.value is None and f.largest_diameter_mm.value is None
    assert Engine.default().classify(f).group == INDETERMINATE


def test_latest_completed_hepatectomy_is_the_reference():
    res = [patient(P), hepatectomy(P, "2021-01-10"), hepatectomy(P, "2023-03-10"), liver_met(P)]
    between = [tumour_size(P, 70, day="2022-05-01") for _ in range(4)]
    f = features(*res, *between, tumour_size(P, 20, day="2024-05-01"))
    assert f.tumour_count.value == 1
    # The later resection's day itself is excluded
    f = features(*res, tumour_size(P, 70, day="2023-03-10"))
    assert f.tumour_count.value is None


@pytest.mark.parametrize("status", ["not-done", "entered-in-error", "preparation", "in-progress", "stopped"])
def test_a_hepatectomy_not_completed_is_not_the_reference(status):
    res = [patient(P), hepatectomy(P, "2023-03-10"), hepatectomy(P, "2024-06-01", status=status), liver_met(P)]
    f = features(*res, tumour_size(P, 20, day="2024-05-01"))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20


def test_without_a_hepatectomy_only_measurements_from_the_recurrence_condition_on_count():
    f = features(patient(P), liver_met(P), tumour_size(P, 20, day="2010-01-01", id="o-2010"),
                 tumour_size(P, 20, day="2024-05-20"))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20
    assert warns_about(f.warnings, "Observation/o-2010", "not counted")
    assert f.adjuvant_chemotherapy.value is None
    c = classify(patient(P), liver_met(P), tumour_size(P, 20, day="2024-05-20"),
                 technical(P, "resectable", day="2024-05-25"))
    assert c.facts["prior_liver_resection"].state == "not-recorded"
    assert c.status == "preliminary" and any(m.fact == "prior_liver_resection" for m in c.missing)


def test_a_non_liver_procedure_is_not_a_resection():
    res = [patient(P), hepatectomy(P, "2024-06-01", code="64368001"), liver_met(P)]
    f = features(*res, tumour_size(P, 20, day="2024-05-20"))
    assert f.tumour_count.value == 1 and f.prior_liver_resection.value is None


def test_undated_hepatectomy_is_not_used_and_warned():
    res = [patient(P), hepatectomy(P, None, id="h-undated"), liver_met(P)]
    f = features(*res, tumour_size(P, 20, day="2024-05-20"))
    assert f.tumour_count.value == 1 and f.prior_liver_resection.value is None
    assert warns_about(f.warnings, "Procedure/h-undated")


# ============================================================================ liver-lesion site
@pytest.mark.parametrize("body_site", ["liver", "liver-segment-v", "liver-right-lobe"])
def test_body_site_liver_counts(body_site):
    f = features(*base(), tumour_size(P, 20, body_site=body_site))
    assert f.tumour_count.value == 1


@pytest.mark.parametrize("location", ["liver", "liver-segment-v"])
def test_focus_body_structure_in_the_liver_counts(location):
    bs = body_structure(P, location, id="bs-1")
    f = features(*base(), bs, tumour_size(P, 20, focus="bs-1", body_site=None))
    assert f.tumour_count.value == 1


def test_body_site_entire_liver_counts():
    entire_liver = {"coding": [{"system": SCT, "code": "181268008", "display": "Entire liver"}]}
    c = classify(*base(), tumour_size(P, 70, body_site=entire_liver), tumour_size(P, 20))
    assert crit(c)["largest_ge_50mm"] is not False
    assert c.group != RESECTABLE


def test_focus_body_structure_in_the_liver_counts_without_a_no_site_fallback():
    """BodyStructure liver: counted even when no liver-recurrence Condition exists."""
    bs = body_structure(P, "liver", id="bs-1")
    f = features(patient(P), hepatectomy(P), bs, tumour_size(P, 20, focus="bs-1", body_site=None))
    assert f.tumour_count.value == 1
    assert f.liver_recurrence.value is False
    assert Engine.default().classify(f).group == INDETERMINATE


def test_focus_body_structure_elsewhere_is_not_a_liver_lesion():
    bs = body_structure(P, "lung", id="bs-lung")
    f = features(*base(), bs, tumour_size(P, 70, focus="bs-lung", body_site=None), tumour_size(P, 20))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20


def test_body_site_lung_is_not_a_liver_lesion():
    f = features(*base(), tumour_size(P, 70, body_site="lung"), tumour_size(P, 20))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20
    assert Engine.default().classify(f).group == RESECTABLE


def test_only_non_liver_measurements_leave_count_unknown():
    f = features(*base(), tumour_size(P, 20, body_site="lung"))
    assert f.tumour_count.value is None
    assert Engine.default().classify(f).group == INDETERMINATE


def test_specimen_measurement_is_not_a_liver_lesion():
    f = features(*base(), tumour_size(P, 70, specimen="spec-1"), tumour_size(P, 20))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20


def test_pathology_method_is_not_a_liver_lesion():
    f = features(*base(), tumour_size(P, 70, method=PATHOLOGY_METHOD, body_site=None), tumour_size(P, 20))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20


def test_no_site_with_a_liver_recurrence_counts():
    f = features(*base(), tumour_size(P, 20, body_site=None), tumour_size(P, 25, body_site=None, component=False))
    assert f.tumour_count.value == 2


@pytest.mark.parametrize("liver", [None, "provisional", "refuted"])
def test_no_site_without_a_confirmed_liver_recurrence_does_not_count(liver):
    res = [patient(P), hepatectomy(P)]
    if liver:
        res.append(liver_met(P, verification=liver))
    f = features(*res, tumour_size(P, 20, body_site=None))
    assert f.tumour_count.value is None
    assert Engine.default().classify(f).group == INDETERMINATE


def test_measurements_alone_are_not_evidence_of_a_liver_recurrence():
    f = features(patient(P), hepatectomy(P), tumour_size(P, 20), tumour_size(P, 30))
    assert f.liver_recurrence.value is False
    c = Engine.default().classify(f)
    assert c.group == INDETERMINATE
    assert c.facts["liver_recurrence"].state == "absent"


# ============================================================================ withdrawn records
@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_withdrawn_observation_is_ignored(status):
    f = features(*base(), tumour_size(P, 80, status=status), tumour_size(P, 20))
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value == 20
    assert Engine.default().classify(f).group == RESECTABLE


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_withdrawn_observation_on_a_later_date_does_not_supersede(status):
    f = features(*base(), tumour_size(P, 20, day="2024-05-01"), tumour_size(P, 10, day="2024-06-01", status=status))
    assert f.largest_diameter_mm.value == 20


@pytest.mark.parametrize("status", ["preliminary", "amended", "corrected", "registered"])
def test_non_withdrawn_observation_status_counts(status):
    f = features(*base(), tumour_size(P, 20, status=status))
    assert f.tumour_count.value == 1


@pytest.mark.parametrize("verification, clinical", [
    ("refuted", "active"), ("entered-in-error", "active"),
    ("confirmed", "resolved"), ("confirmed", "inactive"), ("confirmed", "remission"),
])
def test_withdrawn_or_inactive_extrahepatic_condition_is_ignored(verification, clinical):
    c = classify(*base(), tumour_size(P, 20), extrahepatic(P, verification=verification, clinical=clinical))
    assert crit(c)["extrahepatic_disease"] is False
    assert c.group == RESECTABLE


@pytest.mark.parametrize("verification, clinical", [
    ("refuted", "active"), ("entered-in-error", "active"),
    ("confirmed", "resolved"), ("confirmed", "inactive"), ("confirmed", "remission"),
])
def test_withdrawn_or_inactive_liver_condition_is_no_recurrence(verification, clinical):
    res = [patient(P), hepatectomy(P), liver_met(P, verification=verification, clinical=clinical)]
    f = features(*res, tumour_size(P, 20))
    assert f.liver_recurrence.value is False
    assert Engine.default().classify(f).group == INDETERMINATE


@pytest.mark.parametrize("verification", ["provisional", "differential", "unconfirmed"])
def test_unconfirmed_liver_metastasis_is_unknown_and_indeterminate(verification):
    res = [patient(P), hepatectomy(P), liver_met(P, verification=verification, id="lm-prov")]
    f = features(*res, tumour_size(P, 20))
    assert f.liver_recurrence.value is None
    assert "Condition/lm-prov" in f.liver_recurrence.refs
    c = Engine.default().classify(f)
    assert c.group == INDETERMINATE
    assert c.facts["liver_recurrence"].state == "unknown"
    assert any(m.fact == "liver_recurrence" for m in c.missing)


@pytest.mark.parametrize("verification", ["provisional", "differential", "unconfirmed"])
def test_unconfirmed_extrahepatic_metastasis_is_unknown(verification):
    c = classify(*base(), tumour_size(P, 20), extrahepatic(P, verification=verification))
    assert crit(c)["extrahepatic_disease"] is None
    assert c.group == INDETERMINATE
    assert any(m.fact == "extrahepatic_disease" for m in c.missing)


def test_unconfirmed_extrahepatic_with_another_factor_present_is_borderline():
    c = classify(*base(), tumour_size(P, 60), extrahepatic(P, verification="provisional"))
    assert crit(c)["extrahepatic_disease"] is None
    assert c.group == BORDERLINE


def test_confirmed_extrahepatic_wins_over_a_provisional_one():
    c = classify(*base(), tumour_size(P, 20), extrahepatic(P, verification="provisional"),
                 extrahepatic(P, BONE_MET))
    assert crit(c)["extrahepatic_disease"] is True
    assert c.group == BORDERLINE


def test_an_active_liver_met_wins_over_a_provisional_or_resolved_one():
    res = [patient(P), hepatectomy(P), liver_met(P, verification="provisional"), liver_met(P, clinical="resolved"),
           liver_met(P)]
    assert features(*res, tumour_size(P, 20)).liver_recurrence.value is True


def test_condition_without_statuses_is_active():
    res = [patient(P), hepatectomy(P), liver_met(P, verification=None, clinical=None)]
    assert classify(*res, tumour_size(P, 20)).group == RESECTABLE


# ============================================================================ mCODE generic metastasis
@pytest.mark.parametrize("body_site", ["liver", "liver-segment-v"])
def test_generic_metastasis_with_liver_body_site_is_a_liver_recurrence(body_site):
    res = [patient(P), hepatectomy(P), condition(P, METASTATIC_GENERIC, body_site=body_site, id="mc")]
    f = features(*res, tumour_size(P, 20))
    assert f.liver_recurrence.value is True and f.liver_recurrence.refs == ("Condition/mc",)
    assert f.extrahepatic_disease.value is False
    assert Engine.default().classify(f).group == RESECTABLE


def test_generic_metastasis_with_lung_body_site_is_extrahepatic():
    c = classify(*base(), tumour_size(P, 20), condition(P, METASTATIC_GENERIC, body_site="lung", id="mc"))
    assert crit(c)["extrahepatic_disease"] is True
    assert c.criteria["extrahepatic_disease"].refs == ("Condition/mc",)
    assert c.group == BORDERLINE


def test_generic_metastasis_without_body_site_is_extrahepatic_unknown():
    c = classify(*base(), tumour_size(P, 20), condition(P, METASTATIC_GENERIC, id="mc"))
    assert crit(c)["extrahepatic_disease"] is None
    assert c.group == INDETERMINATE


def test_generic_metastasis_without_body_site_is_not_a_liver_recurrence():
    res = [patient(P), hepatectomy(P), condition(P, METASTATIC_GENERIC)]
    f = features(*res, tumour_size(P, 20))
    assert f.liver_recurrence.value is not True
    assert Engine.default().classify(f).group == INDETERMINATE


def test_generic_metastasis_in_liver_and_lung_is_extrahepatic_disease():
    c = classify(*base(), tumour_size(P, 20), condition(P, METASTATIC_GENERIC, body_site=["liver", "lung"]))
    assert crit(c)["extrahepatic_disease"] is not False
    assert c.group != RESECTABLE


# ============================================================================ ICD-10-CM codes
@pytest.mark.parametrize("code", ["C78.01", "C7801", "c78.01", "C77.2", "C772", "C79.51", "C7951", "C78.6"])
def test_icd10cm_extrahepatic_codes_with_and_without_dots(code):
    c = classify(*base(), tumour_size(P, 20), extrahepatic(P, code, ICD10CM))
    assert crit(c)["extrahepatic_disease"] is True
    assert c.group == BORDERLINE


@pytest.mark.parametrize("code", ["C78.7", "C787"])
def test_icd10cm_c78_7_is_liver_not_extrahepatic(code):
    res = [patient(P), hepatectomy(P), liver_met(P, code=code, system=ICD10CM)]
    f = features(*res, tumour_size(P, 20))
    assert f.liver_recurrence.value is True
    assert f.extrahepatic_disease.value is False
    assert Engine.default().classify(f).group == RESECTABLE


def test_unrelated_condition_is_not_a_metastasis():
    c = classify(*base(), tumour_size(P, 20), condition(P, "C18.7", ICD10CM))  # primary colon cancer
    assert crit(c)["extrahepatic_disease"] is False


# ============================================================================ dataAbsentReason
@pytest.mark.parametrize("where, component", [("component", True), ("observation", True), ("observation", False)])
def test_data_absent_reason_counts_the_lesion_with_unknown_size(where, component):
    f = features(*base(), tumour_size(P, data_absent=where, component=component, id="o-dar"))
    assert f.tumour_count.value == 1
    assert f.largest_diameter_mm.value is None  # never zero
    assert warns_about(f.warnings, "Observation/o-dar")
    c = Engine.default().classify(f)
    assert crit(c)["tumour_count_ge_4"] is False
    assert crit(c)["largest_ge_50mm"] is None
    assert c.group == INDETERMINATE


def test_data_absent_reason_next_to_a_small_lesion_is_not_absent():
    f = features(*base(), tumour_size(P, 20), tumour_size(P, data_absent="component"))
    assert f.tumour_count.value == 2
    assert f.largest_diameter_mm.lower_bound is True
    assert crit(Engine.default().classify(f))["largest_ge_50mm"] is None


def test_data_absent_reason_next_to_a_large_lesion_is_present():
    c = classify(*base(), tumour_size(P, 60), tumour_size(P, data_absent="component"))
    assert crit(c)["largest_ge_50mm"] is True
    assert c.group == BORDERLINE


@pytest.mark.parametrize("where", ["component", "observation"])
def test_data_absent_reason_with_extrahepatic_disease_is_borderline(where):
    c = classify(*base(), tumour_size(P, data_absent=where, component=where == "component"), extrahepatic(P))
    assert crit(c)["largest_ge_50mm"] is None
    assert crit(c)["extrahepatic_disease"] is True
    assert c.group == BORDERLINE


def test_component_without_value_is_unknown_size():
    obs = tumour_size(P, 20)
    del obs["component"][0]["valueQuantity"]
    f = features(*base(), obs)
    assert f.tumour_count.value == 1 and f.largest_diameter_mm.value is None


# ============================================================================ technical resectability
@pytest.mark.parametrize("value, expected", [
    ("resectable", "resectable"), ("unresectable", "unresectable"), (True, "resectable"), (False, "unresectable"),
])
def test_technical_resectability_values(value, expected):
    c = classify(*base(), tumour_size(P, 20), technical(P, value))
    assert c.facts["technical_resectability"].state == expected
    assert c.status == "final"
    assert c.group == (RESECTABLE if expected == "resectable" else UNRESECTABLE)


def test_unresectable_even_with_all_factors_absent_or_unknown():
    assert classify(*base(), technical(P, "unresectable")).group == UNRESECTABLE
    assert classify(*base(), tumour_size(P, 20), technical(P, "unresectable")).group == UNRESECTABLE


def test_technically_resectable_keeps_borderline_with_a_factor():
    c = classify(*base(), tumour_size(P, 60), technical(P, "resectable"))
    assert c.group == BORDERLINE and c.status == "final"


def test_no_assessment_is_preliminary():
    c = classify(*base(), tumour_size(P, 20))
    assert c.facts["technical_resectability"].state == "not-assessed"
    assert c.status == "preliminary" and c.status_note


def test_latest_technical_assessment_wins():
    c = classify(*base(), tumour_size(P, 20), technical(P, "unresectable", "2024-05-20"),
                 technical(P, "resectable", "2024-06-01", id="t-late"))
    assert c.facts["technical_resectability"].state == "resectable"
    assert c.facts["technical_resectability"].refs == ("Observation/t-late",)
    c = classify(*base(), tumour_size(P, 20), technical(P, "resectable", "2024-05-20"),
                 technical(P, "unresectable", "2024-06-01"))
    assert c.group == UNRESECTABLE


def test_technical_assessment_before_the_resection_is_ignored():
    c = classify(*base(), tumour_size(P, 20), technical(P, "unresectable", "2023-01-05"))
    assert c.facts["technical_resectability"].state == "not-assessed"
    assert c.status == "preliminary" and c.group == RESECTABLE


def test_conflicting_technical_assessments_on_the_same_day_are_not_assessed():
    f = features(*base(), tumour_size(P, 20), technical(P, "resectable", "2024-05-20", id="t1"),
                 technical(P, "unresectable", "2024-05-20T15:00:00Z", id="t2"))
    assert f.technical_resectability.value is None
    assert warns_about(f.warnings, "conflicting", "Observation/t1", "Observation/t2")
    c = Engine.default().classify(f)
    assert c.facts["technical_resectability"].state == "not-assessed"
    assert c.status == "preliminary"


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_withdrawn_technical_assessment_is_ignored(status):
    c = classify(*base(), tumour_size(P, 20), technical(P, "unresectable", status=status))
    assert c.facts["technical_resectability"].state == "not-assessed"


def test_unrecognised_technical_value_is_warned_and_not_assessed():
    obs = technical(P, "resectable", id="t-odd")
    obs["valueCodeableConcept"]["coding"][0]["code"] = "maybe"
    f = features(*base(), tumour_size(P, 20), obs)
    assert f.technical_resectability.value is None
    assert warns_about(f.warnings, "Observation/t-odd")


# ============================================================================ adjuvant chemotherapy
def test_oxaliplatin_between_resection_and_recurrence_is_adjuvant():
    c = classify(*base(), tumour_size(P, 20), chemo_admin(P, "2023-05-01", id="ox"))
    assert c.facts["adjuvant_chemotherapy"].state == "given"
    assert "MedicationAdministration/ox" in c.facts["adjuvant_chemotherapy"].refs


@pytest.mark.parametrize("day", ["2023-01-01", RESECTION_DAY, "2024-06-15", "2024-05-01"])
def test_chemo_before_the_resection_or_after_the_recurrence_is_not_adjuvant(day):
    # recurrence: first imaging 2024-05-01, Condition onset 2024-05-10
    c = classify(*base(), tumour_size(P, 20, day="2024-05-01"), chemo_admin(P, day))
    assert c.facts["adjuvant_chemotherapy"].state == "not-given"


def test_no_chemo_after_the_resection_is_not_given():
    c = classify(*base(), tumour_size(P, 60))
    assert c.facts["adjuvant_chemotherapy"].state == "not-given"
    assert "R3-preoperative-chemotherapy" in [r.rule for r in c.recommendations]


@pytest.mark.parametrize("status, state", [("completed", "given"), ("active", "given"), ("stopped", "given"),
                                           ("not-taken", "not-given"), ("entered-in-error", "not-given"),
                                           ("intended", "not-given")])
def test_medication_statement_status(status, state):
    c = classify(*base(), tumour_size(P, 20), chemo_admin(P, "2023-05-01", kind="statement", status=status))
    assert c.facts["adjuvant_chemotherapy"].state == state


@pytest.mark.parametrize("status", ["not-done", "entered-in-error", "stopped"])
def test_medication_administration_not_given(status):
    c = classify(*base(), tumour_size(P, 20), chemo_admin(P, "2023-05-01", status=status))
    assert c.facts["adjuvant_chemotherapy"].state == "not-given"


def test_medication_reference_is_resolved():
    med = medication(id="med-ox")
    c = classify(*base(), tumour_size(P, 20), med, chemo_admin(P, "2023-05-01", medication_ref="Medication/med-ox"))
    assert c.facts["adjuvant_chemotherapy"].state == "given"


def test_medication_reference_to_a_non_chemo_drug_is_not_adjuvant():
    med = medication("161", RXNORM, id="med-apap")  # acetaminophen
    c = classify(*base(), tumour_size(P, 20), med, chemo_admin(P, "2023-05-01", medication_ref="Medication/med-apap"))
    assert c.facts["adjuvant_chemotherapy"].state == "not-given"


def test_chemotherapy_procedure_is_adjuvant():
    proc = hepatectomy(P, "2023-05-01", code="367336001")
    c = classify(*base(), tumour_size(P, 20), proc)
    assert c.facts["adjuvant_chemotherapy"].state == "given"


@pytest.mark.parametrize("kind", ["administration", "statement"])
def test_undated_chemo_is_unknown(kind):
    c = classify(*base(), tumour_size(P, 20), chemo_admin(P, None, kind=kind))
    assert c.facts["adjuvant_chemotherapy"].state == "unknown"


def test_chemo_after_the_resection_with_unknown_recurrence_date_is_unknown():
    res = [patient(P), hepatectomy(P), liver_met(P, onset=None)]
    c = classify(*res, chemo_admin(P, "2023-05-01"))
    assert c.facts["adjuvant_chemotherapy"].state == "unknown"


def test_no_resection_means_no_adjuvant_window():
    c = classify(patient(P), liver_met(P), tumour_size(P, 20), chemo_admin(P, "2023-05-01"))
    assert c.facts["adjuvant_chemotherapy"].state == "unknown"


def test_unreadable_chemo_administration_makes_adjuvant_unknown():
    bad = chemo_admin(P, "2023-05-01")
    del bad["effectiveDateTime"]
    c = classify(*base(), tumour_size(P, 60), bad)
    assert c.facts["adjuvant_chemotherapy"].state == "unknown"


# ============================================================================ evidence
def test_criteria_carry_the_refs_of_their_resources():
    res = [patient(P), hepatectomy(P, id="h1"), liver_met(P, id="lm1")]
    c = classify(*res, tumour_size(P, 20, id="o1"), tumour_size(P, 60, id="o2"),
                 tumour_size(P, 10, day="2024-01-01", id="o-old"), extrahepatic(P, id="ehd1"))
    # every study of the recurrence (after the 2023 resection) supplied the facts
    assert set(c.criteria["tumour_count_ge_4"].refs) == {"Observation/o1", "Observation/o2", "Observation/o-old"}
    assert set(c.criteria["largest_ge_50mm"].refs) == {"Observation/o1", "Observation/o2", "Observation/o-old"}
    assert c.criteria["extrahepatic_disease"].refs == ("Condition/ehd1",)
    assert c.facts["liver_recurrence"].refs == ("Condition/lm1",)
    assert "Observation/o-old" in c.evidence_refs()
    assert "Procedure/h1" in c.facts["adjuvant_chemotherapy"].refs


def test_refs_are_versioned_when_meta_version_id_is_set():
    res = [patient(P), hepatectomy(P), liver_met(P, id="lm1", version="2")]
    c = classify(*res, tumour_size(P, 20, id="o1", version="3"), tumour_size(P, 25, id="o2"))
    assert set(c.criteria["tumour_count_ge_4"].refs) == {"Observation/o1/_history/3", "Observation/o2"}
    assert c.facts["liver_recurrence"].refs == ("Condition/lm1/_history/2",)
    assert c.to_json()["evidence"]["largest_ge_50mm"]["refs"] == list(c.criteria["largest_ge_50mm"].refs)


def test_same_focus_versioned_and_unversioned_is_one_lesion():
    bs = body_structure(P, id="bs-a")
    f = features(*base(), bs, tumour_size(P, 20, focus="bs-a", version="1"), tumour_size(P, 30, focus="bs-a"))
    assert f.tumour_count.value == 1


def test_missing_facts_are_named():
    c = classify(*base(), tumour_size(P, data_absent="component"))
    assert {m.fact for m in c.missing} >= {"largest_ge_50mm", "technical_resectability"}


# ============================================================================ bundle reading
def test_several_patients_is_an_error_naming_both():
    with pytest.raises(BundleError) as exc:
        record_from_bundle(bundle(patient("p1"), patient("p2"), tumour_size("p1", 20)))
    assert "Patient/p1" in str(exc.value) and "Patient/p2" in str(exc.value)


def test_a_resource_of_another_patient_is_ignored_and_named():
    record = record_from_bundle(bundle(patient("p1"), liver_met("p1"), tumour_size("p2", 60, id="o-p2")))
    f = map_features(record, terminology())
    assert f.largest_diameter_mm.value is None
    assert warns_about(f.warnings, "Observation/o-p2", "belongs to Patient/p2")


def test_resources_of_several_patients_without_a_patient_resource_need_a_choice():
    with pytest.raises(BundleError) as exc:
        record_from_bundle(bundle(liver_met("p1"), tumour_size("p2", 20)))
    assert "Patient/p1" in str(exc.value) and "Patient/p2" in str(exc.value) and "--patient" in str(exc.value)
    record = record_from_bundle(bundle(liver_met("p1"), tumour_size("p2", 20)), patient_id="p1")
    assert record.patient_ref == "Patient/p1" and [u.ref for u in record.foreign]


def test_no_patient_at_all_is_an_error():
    with pytest.raises(BundleError):
        record_from_bundle(bundle(medication()))
    with pytest.raises(BundleError):
        record_from_bundle(bundle())


@pytest.mark.parametrize("data", [
    patient("p1"), [bundle(patient("p1"))], "Bundle", None,
    {"resourceType": "Bundle", "type": "nonsense", "entry": []},
    {"resourceType": "Bundle", "type": "collection", "entry": {"resource": patient("p1")}},
    {"resourceType": "Bundle", "type": "collection", "entry": ["x"]},
    {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"id": "x"}}]},
])
def test_not_a_bundle_is_an_error(data):
    with pytest.raises(BundleError):
        record_from_bundle(data)


def test_a_transaction_bundle_works():
    data = bundle(*base(), tumour_size(P, 20), type="transaction", request=True)
    c = classify_bundle(data)
    assert c.patient == "Patient/p1" and c.group == RESECTABLE


def test_deleted_entries_of_a_transaction_are_skipped():
    data = bundle(*base(), tumour_size(P, 20), type="transaction", request=True)
    data["entry"].append({"request": {"method": "DELETE", "url": "Patient/p2"},
                          "resource": patient("p2")})
    assert classify_bundle(data).group == RESECTABLE


def test_a_bundle_with_no_patient_resource_but_one_subject_works():
    data = bundle(hepatectomy(P), liver_met(P), tumour_size(P, 20))
    c = classify_bundle(data)
    assert c.patient == "Patient/p1" and c.group == RESECTABLE


def test_absolute_and_versioned_subject_references_are_one_patient():
    lm = liver_met(P)
    lm["subject"] = {"reference": "https://example.org/fhir/Patient/p1/_history/4"}
    c = classify_bundle(bundle(patient(P), hepatectomy(P), lm, tumour_size(P, 20)))
    assert c.group == RESECTABLE


def test_cli_classify_and_bad_bundle_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(bundle(*base(), tumour_size(P, value=5.0, unit="cm"))))
    assert main(["classify", "--bundle", str(good), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group"] == BORDERLINE and out["criteria"]["largest_ge_50mm"] is True
    two = tmp_path / "two.json"
    two.write_text(json.dumps(bundle(patient("p1"), patient("p2"))))
    assert main(["classify", "--bundle", str(two)]) == 2
    err = capsys.readouterr().err
    assert "Patient/p1" in err and "Patient/p2" in err
    notjson = tmp_path / "bad.json"
    notjson.write_text("{not json")
    assert main(["classify", "--bundle", str(notjson)]) == 2


def test_cli_reads_decimal_sizes_exactly(tmp_path, capsys):
    p = tmp_path / "b.json"
    text = json.dumps(bundle(*base(), tumour_size(P, value="__VALUE__", unit="cm"))).replace('"__VALUE__"', "4.99")
    p.write_text(text)
    assert main(["classify", "--bundle", str(p), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["criteria"]["largest_ge_50mm"] is False and out["group"] == RESECTABLE
