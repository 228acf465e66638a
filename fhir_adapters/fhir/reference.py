"""One FHIR reference type, and the one answer to "whose resource is this?".

A patient travels through the program as one type, :class:`PatientRef` (a Patient's
logical id on the server being read), from a notification or the command line to the
RiskAssessment. Every place that needs the patient of a resource asks
:func:`patient_of` (grouping a search or an export by patient) or a
:class:`PatientIdentity` (is this resource evidence for *this* patient?). The rules are those of clinical-basis.md, "Whose data
it is": a resource is evidence for a patient only when its ``subject`` (or
``patient``) reference resolves to that patient: a relative reference, an absolute URL
of the same server, or a ``urn:uuid`` that is the Patient's ``fullUrl`` in the same
Bundle. A reference by identifier or display only, to a contained or missing
resource, to a Group, or no subject at all is *unattributable*. A reference to another
Patient, or an identifier that is not one of this Patient's, is *foreign*.

    >>> Reference.parse("https://x.org/fhir/Patient/7/_history/2")
    Reference(kind='absolute', resource_type='Patient', id='7', base='https://x.org/fhir', version='2', text='https://x.org/fhir/Patient/7/_history/2')
    >>> Reference.parse("Patient/7").local
    'Patient/7'
    >>> Reference.parse("urn:uuid:0b1c").kind, Reference.parse("#tumour").kind
    ('urn', 'contained')
    >>> patient_of({"resourceType": "Observation", "subject": {"reference": "Patient/7"}})
    PatientRef(id='7')
    >>> patient_of({"resourceType": "Observation", "subject": {"identifier": {"value": "7"}}}) is None
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal

_LITERAL = re.compile(r"^(?:(?P<base>https?://.+?)/)?(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
                      r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?/?\Z")

# Resource types that are not about one patient (shared by every record that cites them).
SHARED_TYPES = ("Medication",)
# Where a resource names its patient, in order.
SUBJECT_ELEMENTS = ("subject", "patient")


_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_id(text: str) -> bool:
    """A FHIR logical id: 1-64 of ``A-Z a-z 0-9 - .``."""
    return _ID.fullmatch(text) is not None


@dataclass(frozen=True, order=True)
class PatientRef:
    """One patient on the FHIR server being read: its logical id. ``str()`` and
    :attr:`reference` give ``Patient/<id>``.

    >>> PatientRef.parse("Patient/p-1") == PatientRef.parse("p-1") == PatientRef.parse("http://h/fhir/Patient/p-1")
    True
    >>> str(PatientRef("p-1")), PatientRef("p-1").reference
    ('Patient/p-1', 'Patient/p-1')
    >>> PatientRef.parse("Observation/1")
    Traceback (most recent call last):
    ValueError: not a Patient id or reference: 'Observation/1'
    """

    id: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise ValueError(f"not a FHIR id (1-64 of A-Z a-z 0-9 - .): {self.id!r}")

    @classmethod
    def parse(cls, text: str) -> "PatientRef":
        """``<id>``, ``Patient/<id>`` or an absolute ``.../Patient/<id>[/_history/n]`` URL."""
        if isinstance(text, str) and _ID.fullmatch(text):
            return cls(text)
        ref = Reference.parse(text) if isinstance(text, str) else None
        if ref is None or ref.resource_type != "Patient" or ref.id is None:
            raise ValueError(f"not a Patient id or reference: {text!r}")
        return cls(ref.id)

    @property
    def reference(self) -> str:
        return f"Patient/{self.id}"

    def __str__(self) -> str:
        return self.reference


@dataclass(frozen=True)
class Reference:
    """A parsed ``Reference.reference`` string."""

    kind: Literal["relative", "absolute", "urn", "contained", "unparsed"]
    resource_type: str | None = None
    id: str | None = None
    base: str | None = None
    version: str | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "Reference":
        if text.startswith("#"):
            return cls("contained", id=text[1:] or None, text=text)
        if text.startswith("urn:uuid:") or text.startswith("urn:oid:"):
            return cls("urn", text=text)
        m = _LITERAL.match(text)
        if m is None:
            return cls("unparsed", text=text)
        return cls("absolute" if m["base"] else "relative", m["type"], m["id"],
                   m["base"].rstrip("/") if m["base"] else None, m["version"], text)

    @property
    def local(self) -> str | None:
        """``Type/id`` without base or version (None for urn, contained, unparsed)."""
        return f"{self.resource_type}/{self.id}" if self.resource_type and self.id else None


def normalise_base(url: str | None) -> str | None:
    return url.rstrip("/") if url else None


def subject_element(resource: dict) -> tuple[str | None, Any]:
    """(element name, value) of the first subject element present."""
    for name in SUBJECT_ELEMENTS:
        if name in resource:
            return name, resource[name]
    return None, None


def patient_of(resource: dict, base: str | None = None) -> PatientRef | None:
    """The patient ``resource`` belongs to, when its subject is a literal reference to a
    Patient (relative, or absolute on ``base`` when a base is given); a Patient is its
    own. None otherwise (ask a :class:`PatientIdentity` why)."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return PatientRef(rid) if isinstance(rid, str) and _ID.fullmatch(rid) else None
    _, subject = subject_element(resource)
    text = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(text, str):
        return None
    ref = Reference.parse(text)
    if ref.resource_type != "Patient":
        return None
    if ref.kind == "relative" or (ref.kind == "absolute" and (base is None or ref.base == normalise_base(base))):
        return PatientRef(ref.id)  # type: ignore[arg-type]
    return None


@dataclass(frozen=True)
class Attribution:
    """Whether a resource is evidence for the patient: ``own``, ``unattributable``
    (it cannot be shown to be this patient's) or ``foreign`` (it is someone else's)."""

    kind: Literal["own", "unattributable", "foreign"]
    why: str | None = None


OWN = Attribution("own")


@dataclass(frozen=True)
class PatientIdentity:
    """The patient a record is about, and every way a reference can name them."""

    id: str | None = None                                   # the Patient's logical id
    full_urls: frozenset[str] = frozenset()                # the Patient entry's fullUrl(s)
    bases: frozenset[str] = frozenset()                    # servers on which Patient/id is this patient
    identifiers: frozenset[tuple[str | None, str]] = frozenset()
    other_patients: frozenset[str] = frozenset()           # fullUrls of other patients in the same input

    @property
    def ref(self) -> str | None:
        """How results name the patient: ``Patient/<id>``, else the Patient's fullUrl."""
        if self.id:
            return f"Patient/{self.id}"
        return next(iter(sorted(self.full_urls)), None)

    @classmethod
    def of_patient(cls, patient: dict | None, *, patient_id: str | None = None, full_url: str | None = None,
                   bases: Iterable[str] = (), other_patients: Iterable[str] = ()) -> "PatientIdentity":
        """The identity of a Patient resource (or of a bare id when there is none)."""
        identifiers: set[tuple[str | None, str]] = set()
        pid = patient_id
        if isinstance(patient, dict):
            if isinstance(patient.get("id"), str) and patient["id"]:
                pid = pid or patient["id"]
            idents = patient.get("identifier")
            for ident in idents if isinstance(idents, list) else []:
                if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                    system = ident.get("system") if isinstance(ident.get("system"), str) else None
                    identifiers.add((system, ident["value"]))
        urls = {full_url} if full_url else set()
        all_bases = {b for b in map(normalise_base, bases) if b}
        if full_url:
            parsed = Reference.parse(full_url)
            if parsed.kind == "absolute" and parsed.resource_type == "Patient":
                all_bases.add(parsed.base)  # type: ignore[arg-type]
        return cls(pid, frozenset(urls), frozenset(all_bases), frozenset(identifiers), frozenset(other_patients))

    @property
    def patient(self) -> PatientRef | None:
        """The patient as a :class:`PatientRef` (None when the id is unknown or not a FHIR id)."""
        return PatientRef(self.id) if self.id and _ID.fullmatch(self.id) else None

    def attribute(self, resource: dict) -> Attribution:
        """Is ``resource`` (raw JSON) this patient's? See the module docstring."""
        rtype = resource.get("resourceType")
        if rtype in SHARED_TYPES:
            return OWN
        if rtype == "Patient":
            rid = resource.get("id")
            return OWN if (self.id and rid == self.id) or not self.id else Attribution("foreign", f"Patient/{rid}")
        name, subject = subject_element(resource)
        if subject is None:
            return Attribution("unattributable", "no subject")
        if not isinstance(subject, dict):
            return Attribution("unattributable", f"{name} is not a Reference")
        text = subject.get("reference")
        ident = subject.get("identifier")
        known = None  # does the identifier name this patient? (None: no identifier, or nothing to compare)
        shown = ""
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system") if isinstance(ident.get("system"), str) else None
            shown = f"{system}|{ident['value']}" if system else ident["value"]
            if (system, ident["value"]) in self.identifiers or (
                    system is None and any(v == ident["value"] for _, v in self.identifiers)):
                known = True
            elif self.identifiers and (system is None or system in {s for s, _ in self.identifiers}):
                known = False  # an identifier of the same kind, with another value: someone else's
        if isinstance(text, str) and text:
            by_reference = self._by_reference(name, Reference.parse(text))
            if by_reference.kind == "own" and known is False:
                return Attribution("unattributable", f"{name} reference names this patient but its identifier "
                                                     f"{shown} is not theirs")
            if by_reference.kind == "foreign" and known is True:
                return Attribution("unattributable", f"{name} reference names {by_reference.why} but its identifier "
                                                     f"{shown} is this patient's")
            return by_reference
        if shown:
            if known is False:
                return Attribution("foreign", f"the patient with identifier {shown}")
            return Attribution("unattributable", f"{name} given only by identifier {shown}")
        if isinstance(subject.get("display"), str):
            return Attribution("unattributable", f"{name} given only by display")
        return Attribution("unattributable", f"{name} has no reference")

    def _by_reference(self, name: str, ref: Reference) -> Attribution:
        if ref.kind == "contained":
            return Attribution("unattributable", f"{name} {ref.text} is a contained resource")
        if ref.kind == "urn":
            if ref.text in self.full_urls:
                return OWN
            if ref.text in self.other_patients:
                return Attribution("foreign", ref.text)
            return Attribution("unattributable", f"{name} {ref.text} does not resolve in this record")
        if ref.kind == "unparsed":
            return Attribution("unattributable", f"{name} {ref.text!r} is not a resolvable reference")
        if ref.resource_type != "Patient":
            return Attribution("unattributable", f"{name} is a {ref.resource_type}, not a Patient")
        if ref.kind == "absolute":
            if ref.text.split("/_history/")[0].rstrip("/") in self.full_urls:
                return OWN
            if ref.base not in self.bases:
                return Attribution("unattributable", f"{name} {ref.text} is on another server")
        if self.id and ref.id == self.id:
            return OWN
        return Attribution("foreign", ref.local)


def plain_ref(reference: str | None) -> str | None:
    """A reference without base URL or version: ``http://x/fhir/Patient/1/_history/2`` -> ``Patient/1``
    (a urn, contained or unparsed reference is returned as it is).

    >>> plain_ref("http://x/fhir/Patient/1/_history/2"), plain_ref("urn:uuid:1"), plain_ref(None)
    ('Patient/1', 'urn:uuid:1', None)
    """
    if not reference:
        return None
    return Reference.parse(reference).local or reference
