"""Build the RiskAssessment (and its Provenance) for one classification.

Both are built as R4B models, so they are validated before they leave the program,
and checked against the invariants the models do not enforce (ras-2).

Shape (README, "RiskAssessment written back"):

* ``id``: deterministic per patient and rule set (``clmrs-`` + 40 hex chars), so a
  re-run, or a new rule-set version, updates the same resource (its history keeps the
  earlier versions): exactly one current assessment per patient and rule set.
  ``identifier`` carries the same key readably (:func:`assessment_key`), for servers
  that assign ids.
* ``status``: ``preliminary`` / ``final`` from the engine.
* ``method``: the rule set (id, version); ``code``: what was assessed.
* ``condition``: the liver-recurrence Condition; ``basis``: every resource behind a fact.
* ``prediction[0]``: ``qualitativeRisk`` = the group in the project CodeSystem
  :data:`GROUP_SYSTEM`; for a group with a cohort figure, ``outcome`` = overall survival,
  ``probabilityDecimal`` = the cohort 5-year OS as a **fraction** (0.673, the convention
  of HL7's own examples; ras-2 checked), ``whenRange`` the rule set's horizon in years
  (UCUM ``a``), ``rationale`` citing the study. Texts and figures come from the rule set.
* ``mitigation``: the recommendations; ``note``: reason, factors, other facts, missing
  facts, cohort estimate with its caveat, status note, warnings (the text report's words,
  :mod:`engine.explain`); ``text``: all of it as a generated XHTML narrative
  (:mod:`fhir_adapters.writeback.narrative`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.riskassessment import RiskAssessment

from engine import explain
from engine.classify import Classification
from fhir_adapters.project import (ASSESSMENT_SYSTEM, GROUP_SYSTEM, IDENTIFIER_SYSTEM, RULESET_HASH_SYSTEM,
                                   RULESET_SYSTEM, TAG, TAG_SYSTEM, VERSION)
from fhir_adapters.writeback.narrative import check_xhtml, narrative, normal_text
UCUM = "http://unitsofmeasure.org"
# How a data warning starts in the note (says_same_clinically skips these).
_WARNING_NOTE = "Data warning: "

_KEY_CHARS = re.compile(r"[A-Za-z0-9\-._/]{1,200}")


def assessment_key(patient: str, ruleset_id: str) -> str:
    """The identifier value: one current RiskAssessment per patient and rule set.

    No rule-set version in it (a new version updates the same assessment; its history
    keeps the old one) and none of the characters a token search treats specially
    (``| , $ \\``: some servers split on ``|`` even when escaped), so the assessment is
    found again on any conforming server.

    >>> assessment_key("Patient/p1", "clm-recurrence-resectability")
    'clm-recurrence-resectability/Patient/p1'
    """
    key = f"{ruleset_id}/{patient}"
    if not _KEY_CHARS.fullmatch(key):
        raise ValueError(f"cannot build an assessment identifier from rule set {ruleset_id!r} and {patient!r}: "
                         "only A-Z a-z 0-9 - . _ / are allowed")
    return key


def assessment_id(patient: str, ruleset_id: str) -> str:
    """Deterministic resource id (FHIR ids: ``[A-Za-z0-9-.]{1,64}``), per patient and rule set.

    >>> assessment_id("Patient/p1", "clm-recurrence-resectability")
    'clmrs-cf284bb9a118c47d03deba37dc08076752f32dbb'
    """
    digest = hashlib.sha256(assessment_key(patient, ruleset_id).encode()).hexdigest()
    return f"clmrs-{digest[:40]}"


def legacy_key(patient: str, ruleset_id: str, ruleset_version: str) -> str:
    """The identifier value releases before 0.2 wrote (``Patient/<id>|<rule set>|<version>``):
    read only, to take over an assessment they left (see :func:`is_legacy_of`)."""
    return f"{patient}|{ruleset_id}|{ruleset_version}"


def legacy_id(patient: str, ruleset_id: str, ruleset_version: str) -> str:
    """The resource id those releases wrote for ``legacy_key``."""
    return "clmrs-" + hashlib.sha256(legacy_key(patient, ruleset_id, ruleset_version).encode()).hexdigest()[:40]


def is_legacy_of(found: dict, ra: dict) -> bool:
    """``found`` is an assessment an earlier release wrote for ``ra``'s patient and rule set
    (any version): it is taken over (updated, or replaced by ``ra``'s id) so that one
    assessment stays current after an upgrade."""
    subject = ra["subject"]["reference"]
    prefix = f"{subject}|{ra['method']['coding'][0]['code']}|"
    idents = found.get("identifier") if isinstance(found.get("identifier"), list) else []
    return (any(isinstance(i, dict) and i.get("system") == IDENTIFIER_SYSTEM and str(i.get("value", "")).startswith(prefix)
                for i in idents)
            and (found.get("subject") or {}).get("reference") == subject)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def _fraction(percent: Decimal) -> Decimal:
    return (percent / Decimal(100)).normalize()


def _notes(r: Classification) -> list[dict]:
    """The note: the text report's words (engine.explain), one annotation per part."""
    factors = "; ".join(explain.factor_text(c) for c in r.criteria.values())
    facts = "; ".join(explain.factor_text(c) for c in r.facts.values())
    notes = [f"{explain.headline(r)}: {explain.reason_text(r)}", f"Prognostic factors at recurrence: {factors}.",
             f"Other facts: {facts}."]
    if r.missing:
        notes.append("Missing facts: " + " ".join(explain.missing_texts(r)))
    cohort = explain.cohort_text(r)
    if cohort:
        notes.append(cohort)
    if r.status_note:
        notes.append(r.status_note)
    notes += [f"{_WARNING_NOTE}{w}" for w in r.warnings]
    return [{"text": n} for n in notes]


def build_risk_assessment(r: Classification, *, occurrence: str | None = None, check: bool = True) -> dict:
    """The RiskAssessment for ``r`` as validated R4 JSON (a dict). ``check`` False: not
    validated here (a population run's output, validated by the write-back step before
    it leaves the program)."""
    if not r.patient:
        raise ValueError("cannot write a RiskAssessment without a patient")
    rs = r.ruleset
    prediction: dict[str, Any] = {
        "qualitativeRisk": {"coding": [{"system": GROUP_SYSTEM, "code": r.group,
                                         "display": r.group_label}], "text": r.group_label},
    }
    if r.cohort_survival:
        s = r.cohort_survival
        prediction.update({
            "outcome": {"text": s.outcome},
            "probabilityDecimal": _fraction(s.five_year_os_percent),
            "whenRange": {"low": {"value": s.horizon_years, "unit": "years", "system": UCUM, "code": "a"},
                          "high": {"value": s.horizon_years, "unit": "years", "system": UCUM, "code": "a"}},
            "rationale": (f"Cohort 5-year overall survival of the {s.group} group: {s.five_year_os_percent} % "
                          f"(p {s.p_value} across groups) in {rs.citation} doi:{rs.doi}, PMID {rs.pmid}. "
                          f"{s.caveat}"),
        })
    else:
        prediction["rationale"] = f"{r.reason} No cohort survival figure applies. Source: doi:{rs.doi}."
    liver = r.facts["liver_recurrence"]
    ra: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": assessment_id(r.patient, rs.id),
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": TAG}]},
        "text": narrative(r),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": assessment_key(r.patient, rs.id)}],
        "status": r.status,
        "method": {"coding": [{"system": RULESET_SYSTEM, "code": rs.id, "version": rs.version, "display": rs.title}],
                   "text": f"{rs.title}, rule set {rs.id} {rs.version} (doi:{rs.doi})"},
        "code": {"coding": [{"system": ASSESSMENT_SYSTEM, "code": "recurrent-clm-resectability",
                             "display": "Resectability of recurrent colorectal liver metastases"}]},
        "subject": {"reference": r.patient},
        "occurrenceDateTime": occurrence or _now(),
        "prediction": [prediction],
        "note": _notes(r),
    }
    if liver.state == "present" and liver.refs:
        ra["condition"] = {"reference": liver.refs[0]}
    basis = r.evidence_refs()
    if basis:
        ra["basis"] = [{"reference": ref} for ref in basis]
    if r.recommendations:
        ra["mitigation"] = "\n".join(f"- {rec.text}" for rec in r.recommendations)
    return validated(ra) if check else ra


def validated(resource: dict) -> dict:
    """Validate with the R4B model (raises pydantic.ValidationError), check ras-2 and the
    narrative (txt-1, txt-2: :func:`~fhir_adapters.writeback.narrative.check_xhtml`)."""
    model = {"RiskAssessment": RiskAssessment, "Provenance": Provenance}[resource["resourceType"]]
    model.model_validate(resource)
    if "text" in resource:   # the R4B model does not look into the XHTML
        check_xhtml(resource["text"]["div"])
    for p in resource.get("prediction", []):
        value = p.get("probabilityDecimal")
        if value is not None and not (0 <= value <= 1):
            raise ValueError(f"probabilityDecimal {value} is not a fraction in [0, 1] (project convention; ras-2)")
    return resource


def build_provenance(ra: dict, r: Classification, *, activity: str, target: str | None = None,
                     recorded: str | None = None, check: bool = True) -> dict:
    """Provenance of a RiskAssessment write: this software, the basis, the rule-set hash."""
    rs = r.ruleset
    entities = [{"role": "source", "what": {"reference": ref}} for ref in r.evidence_refs()]
    entities.append({"role": "derivation", "what": {
        "identifier": {"system": RULESET_HASH_SYSTEM, "value": rs.sha256},
        "display": f"rule set {rs.id} {rs.version} sha256:{rs.sha256}"}})
    provenance = {
        "resourceType": "Provenance",
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": TAG}]},
        "target": [{"reference": target or f"RiskAssessment/{ra['id']}"}],
        "recorded": recorded or _now(),
        "activity": _activity(activity),
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "assembler", "display": "Assembler"}]},
            "who": {"display": f"clm-stratify {VERSION}"},
        }],
        "entity": entities,
    }
    return validated(provenance) if check else provenance


def with_activity(provenance: dict, *, activity: str, target: str) -> dict:
    """A Provenance built earlier (a population run's output), for the write it now
    records: its activity (CREATE / UPDATE) and target."""
    return {**provenance, "target": [{"reference": target}], "activity": _activity(activity)}


# The v3-DataOperation codes a write records, with the code system's displays.
_DATA_OPERATIONS = {"CREATE": "create", "UPDATE": "revise"}


def _activity(code: str) -> dict:
    if code not in _DATA_OPERATIONS:
        raise ValueError(f"Provenance activity {code!r}: expected one of {', '.join(_DATA_OPERATIONS)}")
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": code,
                        "display": _DATA_OPERATIONS[code]}]}


# Fields that make two RiskAssessments "the same assessment" (not the time it was made).
_SIGNIFICANT = ("identifier", "status", "method", "code", "subject", "condition", "basis", "prediction",
                "mitigation", "note")


def same_assessment(current: dict | None, new: dict) -> bool:
    """True when ``current`` (read from the server) already says what ``new`` says. The
    narrative is compared by what it says (:func:`~fhir_adapters.writeback.narrative.normal_text`),
    not by its markup, which a server may serialise again in its own way."""
    if current is None:
        return False
    return (all(_normal(current.get(k)) == _normal(new.get(k)) for k in _SIGNIFICANT)
            and normal_text(current.get("text")) == normal_text(new.get("text")))


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, (Decimal, float, int)) and not isinstance(value, bool):
        return Decimal(str(value)).normalize()
    return value


# What a RiskAssessment asserts clinically: all of _SIGNIFICANT but the data warnings of
# the run that made it (notes that begin "Data warning: ", and the narrative that repeats them).
_CLINICAL = ("identifier", "status", "method", "code", "subject", "condition", "prediction", "mitigation")


def says_same_clinically(current: dict | None, new: dict) -> bool:
    """True when ``current`` asserts what ``new`` asserts: group and cohort figure, status,
    rule set (id, version), factor states and values, missing facts, recommendations and
    basis (as a set). Unlike :func:`same_assessment` (whether to write), the warnings about
    how the data was read are not compared: an assessment made from a record that could
    see more, or less, with the same result, says the same (a basis resource only one of
    them has is a difference)."""
    if current is None:
        return False

    def basis(ra: dict) -> set:
        return {str(_normal(b)) for b in ra.get("basis") or []}

    def notes(ra: dict) -> list:
        return [_normal(n) for n in ra.get("note") or []
                if not (isinstance(n, dict) and str(n.get("text", "")).startswith(_WARNING_NOTE))]

    return (all(_normal(current.get(k)) == _normal(new.get(k)) for k in _CLINICAL)
            and basis(current) == basis(new) and notes(current) == notes(new))
