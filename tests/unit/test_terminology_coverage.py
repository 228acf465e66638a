"""Terminology coverage: the default code lists recognise each concept in the code systems
real records use, and never a near miss (a biopsy, a transplant, the liver as an
extrahepatic site, a non-UCUM unit).

A hepatectomy coded only in CPT or ICD-10-PCS that is not recognised makes imaging from
before the resection count as the recurrence: these tests pin the lists' real content.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from fhir_adapters.terminology import load_terminology

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10GM = "http://fhir.de/CodeSystem/bfarm/icd-10-gm"
OPS = "http://fhir.de/CodeSystem/bfarm/ops"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"


@pytest.fixture(scope="module")
def t():
    return load_terminology()


def _ids(cases):
    return [f"{s.rsplit('/', 1)[-1]}|{c}" for s, c in cases]


# --------------------------------------------------------------------------- hepatectomy
HEPATECTOMY_YES = [
    (SCT, "107963000"),
    (CPT, "47120"), (CPT, "47122"), (CPT, "47125"), (CPT, "47130"),
    # ICD-10-PCS excision of liver / right lobe / left lobe, non-diagnostic, approaches 0, 3, 4
    (PCS, "0FB00ZZ"), (PCS, "0FB03ZZ"), (PCS, "0FB04ZZ"), (PCS, "0FB04ZG"),
    (PCS, "0FB10ZZ"), (PCS, "0FB13ZZ"), (PCS, "0FB14ZZ"), (PCS, "0FB14ZG"),
    (PCS, "0FB20ZZ"), (PCS, "0FB23ZZ"), (PCS, "0FB24ZZ"), (PCS, "0FB24ZG"),
    # resection, approaches 0 and 4
    (PCS, "0FT00ZZ"), (PCS, "0FT04ZZ"), (PCS, "0FT04ZG"),
    (PCS, "0FT10ZZ"), (PCS, "0FT14ZZ"), (PCS, "0FT14ZG"),
    (PCS, "0FT20ZZ"), (PCS, "0FT24ZZ"), (PCS, "0FT24ZG"),
    (PCS, "0ft24zz"),  # case is ignored
    (ICD9, "50.22"), (ICD9, "5022"), (ICD9, "50.3"), (ICD9, "50.4"),
    (OPS, "5-502"), (OPS, "5-502.0"), (OPS, "5-502.1"), (OPS, "5-502.2"),
]
HEPATECTOMY_NO = [
    # ICD-10-PCS qualifier X = diagnostic excision = biopsy
    (PCS, "0FB00ZX"), (PCS, "0FB03ZX"), (PCS, "0FB04ZX"), (PCS, "0FB10ZX"), (PCS, "0FB13ZX"),
    (PCS, "0FB14ZX"), (PCS, "0FB20ZX"), (PCS, "0FB23ZX"), (PCS, "0FB24ZX"),
    (PCS, "0F500ZZ"), (PCS, "0F503ZZ"),  # destruction (ablation)
    (PCS, "0FY00Z0"),  # liver transplantation
    (PCS, "0FB0"), (PCS, "0FT"),  # table/body-part headers are not codes
    (CPT, "47000"), (CPT, "47100"),  # liver biopsy
    (CPT, "47133"), (CPT, "47135"), (CPT, "47140"),  # donor hepatectomy / transplant
    (CPT, "4712"), (CPT, "471200"),
    (ICD9, "50.11"), (ICD9, "50.12"), (ICD9, "50.14"), (ICD9, "50.24"), (ICD9, "50.59"),
    (ICD9, "50.2"),
    (OPS, "5-501"), (OPS, "5-501.0"), (OPS, "5-50"),
    # right code, wrong system
    (ICD10CM, "47120"), (SCT, "47120"), (CPT, "0FT00ZZ"), (PCS, "47120"), (ICD9, "0FT00ZZ"),
    (ICD10CM, "C78.7"),
]


@pytest.mark.parametrize(("system", "code"), HEPATECTOMY_YES, ids=_ids(HEPATECTOMY_YES))
def test_hepatectomy_codes_are_recognised(t, system, code):
    assert t.hepatectomy_procedure.matches(system, code)


@pytest.mark.parametrize(("system", "code"), HEPATECTOMY_NO, ids=_ids(HEPATECTOMY_NO))
def test_biopsy_ablation_transplant_are_not_a_hepatectomy(t, system, code):
    assert not t.hepatectomy_procedure.matches(system, code)


def test_no_pcs_code_with_diagnostic_qualifier_can_match(t):
    """Every 0FB/0FT liver code of every approach and qualifier X must stay unmatched."""
    for op in "BT":
        for part in "012":
            for approach in "0348X":
                assert not t.hepatectomy_procedure.matches(PCS, f"0F{op}{part}{approach}ZX")
    assert not any(c.system == PCS and c.prefix for c in t.hepatectomy_procedure.codes)


# --------------------------------------------------------------------------- conditions
LIVER_MET_YES = [(SCT, "94381002"), (ICD10CM, "C78.7"), (ICD10, "C78.7"), (ICD10GM, "C78.7"),
                 (ICD10GM, "C787")]
LIVER_MET_NO = [(ICD10GM, "C78.8"), (ICD10GM, "C78.0"), (ICD10GM, "C22.0"), (ICD10GM, "C78"),
                (OPS, "C78.7"), (SCT, "C78.7")]


@pytest.mark.parametrize(("system", "code"), LIVER_MET_YES, ids=_ids(LIVER_MET_YES))
def test_liver_metastasis_codes(t, system, code):
    assert t.liver_metastasis_condition.matches(system, code)


@pytest.mark.parametrize(("system", "code"), LIVER_MET_NO, ids=_ids(LIVER_MET_NO))
def test_not_liver_metastasis(t, system, code):
    assert not t.liver_metastasis_condition.matches(system, code)


EHD_YES = [(sy, c) for sy in (ICD10CM, ICD10, ICD10GM)
           for c in ("C77.2", "C77.9", "C78.00", "C78.01", "C78.0", "C78.1", "C78.2", "C78.3", "C78.4",
                     "C78.5", "C78.6", "C78.8", "C78.89", "C79.5", "C79.9")]
EHD_YES += [(ICD10GM, "C79.84"), (ICD10GM, "C79.88"), (SCT, "94391008")]
EHD_NO = [(sy, c) for sy in (ICD10CM, ICD10, ICD10GM) for c in ("C78.7", "C787", "c78.7", "C78", "C80.0")]
EHD_NO += [(SCT, "94381002"), (ICD10GM, "C22.0"), (OPS, "C78.0")]


@pytest.mark.parametrize(("system", "code"), EHD_YES, ids=_ids(EHD_YES))
def test_extrahepatic_metastasis_codes(t, system, code):
    assert t.extrahepatic_metastasis_condition.matches(system, code)


@pytest.mark.parametrize(("system", "code"), EHD_NO, ids=_ids(EHD_NO))
def test_the_liver_is_never_extrahepatic(t, system, code):
    assert not t.extrahepatic_metastasis_condition.matches(system, code)


def test_liver_metastasis_list_stays_a_token_search(t):
    """pull.py turns these lists into token searches: a prefix would fetch every Condition."""
    assert all(c.code is not None for c in t.liver_metastasis_condition.codes)
    assert all(c.code is not None for c in t.radiology_report_category.codes)


# --------------------------------------------------------------------------- imaging reports
RADIOLOGY_YES = [(LOINC, "LP29684-5")] + [(V2_0074, c) for c in ("RAD", "CT", "NMR", "NMS", "RUS", "RX")]
RADIOLOGY_NO = [(LOINC, "LP7839-6"),  # Pathology
                (V2_0074, "PAT"), (V2_0074, "SP"), (V2_0074, "CP"), (V2_0074, "LAB"), (V2_0074, "CH"),
                (V2_0074, "CUS"), (V2_0074, "OUS"), (V2_0074, "VUS"), (V2_0074, "MR"),
                (LOINC, "RAD"), (V2_0074, "LP29684-5")]


@pytest.mark.parametrize(("system", "code"), RADIOLOGY_YES, ids=_ids(RADIOLOGY_YES))
def test_radiology_report_categories(t, system, code):
    assert t.radiology_report_category.matches(system, code)


@pytest.mark.parametrize(("system", "code"), RADIOLOGY_NO, ids=_ids(RADIOLOGY_NO))
def test_not_radiology_report_categories(t, system, code):
    assert not t.radiology_report_category.matches(system, code)


# --------------------------------------------------------------------------- chemotherapy
CHEMO_PROCEDURE_YES = [(SCT, "367336001"), (SCT, "266719004"), (SCT, "265760000"),
                       (SCT, "461391000124102"), (SCT, "870249004"),
                       (CPT, "96409"), (CPT, "96411"), (CPT, "96413"), (CPT, "96415"), (CPT, "96416"),
                       (CPT, "96417"), (HCPCS, "G0498")]
CHEMO_PROCEDURE_NO = [(CPT, "47120"), (PCS, "0FT00ZZ"), (ICD10CM, "C78.7"), (SCT, "94381002"),
                      (SCT, "107963000"), (CPT, "96365"),  # non-chemotherapy IV infusion
                      (CPT, "96450"),  # intrathecal: not systemic
                      (SCT, "720379009"),  # hepatic arterial infusion: liver-directed, not systemic
                      (HCPCS, "J9190"), (CPT, "9641")]
CHEMO_MEDICATION_YES = [(RXNORM, "4492"), (ATC, "L01BC02"),
                        (HCPCS, "J9190"), (HCPCS, "J9206"), (HCPCS, "J9263"), (HCPCS, "J0640"),
                        (HCPCS, "J8520"), (HCPCS, "J8521"), (HCPCS, "J8522"), (HCPCS, "j9263")]
CHEMO_MEDICATION_NO = [(HCPCS, "J9035"),  # bevacizumab: not in this list (targeted, not cytotoxic)
                       (HCPCS, "J8999"), (HCPCS, "J919"), (CPT, "J9190"), (ATC, "L02"),
                       (ICD10CM, "C78.7"), (CPT, "96413"), (PCS, "0FB00ZZ")]


@pytest.mark.parametrize(("system", "code"), CHEMO_PROCEDURE_YES, ids=_ids(CHEMO_PROCEDURE_YES))
def test_chemotherapy_procedures(t, system, code):
    assert t.chemotherapy_procedure.matches(system, code)


@pytest.mark.parametrize(("system", "code"), CHEMO_PROCEDURE_NO, ids=_ids(CHEMO_PROCEDURE_NO))
def test_not_chemotherapy_procedures(t, system, code):
    assert not t.chemotherapy_procedure.matches(system, code)


@pytest.mark.parametrize(("system", "code"), CHEMO_MEDICATION_YES, ids=_ids(CHEMO_MEDICATION_YES))
def test_chemotherapy_medications(t, system, code):
    assert t.chemotherapy_medication.matches(system, code)


@pytest.mark.parametrize(("system", "code"), CHEMO_MEDICATION_NO, ids=_ids(CHEMO_MEDICATION_NO))
def test_not_chemotherapy_medications(t, system, code):
    assert not t.chemotherapy_medication.matches(system, code)


# --------------------------------------------------------------------------- length units
# Exact UCUM factors to millimetres (ucum-essence: [in_i] = 2.54 cm, [ft_i] = 12 [in_i],
# [yd_i] = 3 [ft_i]).
EXPECTED_MM = {
    "nm": "0.000001",
    "um": "0.001",
    "mm": "1",
    "cm": "10",
    "dm": "100",
    "m": "1000",
    "[in_i]": "25.4",
    "[ft_i]": "304.8",
    "[yd_i]": "914.4",
}


@pytest.mark.parametrize(("unit", "factor"), sorted(EXPECTED_MM.items()))
def test_length_unit_factor_is_exact(t, unit, factor):
    got = t.length_units_to_mm[unit]
    assert isinstance(got, Decimal)
    assert got == Decimal(factor)


def test_length_units_are_exactly_the_expected_ucum_codes(t):
    assert set(t.length_units_to_mm) == set(EXPECTED_MM)


def test_length_units_agree_with_their_ucum_definitions(t):
    f = t.length_units_to_mm
    assert f["[in_i]"] == Decimal("2.54") * f["cm"]
    assert f["[ft_i]"] == 12 * f["[in_i]"]
    assert f["[yd_i]"] == 3 * f["[ft_i]"]
    assert f["um"] * 1000 == f["mm"] == f["nm"] * 1_000_000
    assert f["dm"] == 10 * f["cm"] and f["m"] == 10 * f["dm"]


@pytest.mark.parametrize("unit", ["millimeter", "millimetre", "inch", "inches", "in", "ft", "feet",
                                  "[ft_us]", "[in_us]", "[yd_us]", "µm", "mm ", "MILLIMETER"])
def test_non_ucum_or_inexact_units_are_not_length_units(t, unit):
    assert unit not in t.length_units_to_mm
