"""CDS Hooks prefetch: the templates the service asks for, and one patient's record from
what the CDS client sent, completed on its FHIR server.

The templates are :func:`fhir_adapters.sources.pull.patient_queries` with the patient id
the token ``{{context.patientId}}``: the same reads and searches ``run`` makes, so a
site's own codes are prefetched too. One more, ``assessment``, finds the current
RiskAssessment (for the card's link; never needed to classify): searched by subject
first, then identifier (the product's own lookup order), and only results carrying our
identifier and subject count (:func:`fhir_adapters.writeback.strategy.is_ours`), so a
server that ignores ``identifier`` and returns every assessment is still read right.
It is read like the others, but never refused: a prefetch that is paged, cut or failed
leaves the question to the FHIR server, or (without one) "could not check"
(:attr:`Gathered.assessments` None, :attr:`Gathered.assessments_why` saying why).

Reading a prefetch key (decisions):

* absent (the client did not satisfy it): searched on ``fhirServer`` with the
  ``fhirAuthorization`` bearer token; without them, 412 (a record is never classified
  with a search missing: a silently partial record is an error this product must not make);
* ``null``: the spec's "no data" for that template. Taken at its word when there is no
  FHIR server to ask; searched again when there is (a client may send null on failure);
* a searchset Bundle with a ``next`` link or a ``total`` beyond its matches is continued
  on the FHIR server (the client's own paging, checked like every search of the product);
  without a FHIR server, 412;
* an OperationOutcome (the client's way to say a prefetch failed), or a Bundle carrying
  an outcome entry that says results are missing (an error, or a warning such as
  ``incomplete`` or ``too-costly``: :func:`fhir_adapters.fhir.search.results_cut`): as
  absent, searched again on the FHIR server, else 412 naming the outcome. An outcome that
  is a warning only (an ignored parameter) does not stop a prefetch;
* anything else (a Bundle of another type, a resource of the wrong type, a Patient of
  another id, a ``total`` that is not a non-negative integer, a link relation that is
  not a string): 400, the request is malformed. A ``next`` relation is matched
  case-insensitively (IANA link relations).

Then what the first results lead to (resources naming the patient only by identifier,
referenced Medications and BodyStructures) comes from the FHIR server; without one, a
missing Medication or BodyStructure is a 412, and resources named by identifier only
cannot be seen (a note on the record, as when a server refuses that search). Resources
of another patient are the record's to refuse (:class:`PatientRecord` attribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.reference import PatientIdentity, PatientRef
from fhir_adapters.fhir.search import results_cut
from fhir_adapters.project import IDENTIFIER_SYSTEM
from fhir_adapters.sources.pull import (IDENTIFIER_SEARCH_REFUSED, Searches, dependents, patient_queries,
                                        patient_record, referenced_searches)
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology
from fhir_adapters.writeback.resources import assessment_key

PATIENT_TOKEN = "{{context.patientId}}"
ASSESSMENT_KEY = "assessment"


class CdsError(Exception):
    """A request the service answers with an HTTP error (``status``) and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Template:
    """One prefetch template: a read (``params`` None) or a search."""

    key: str
    rtype: str
    params: tuple[tuple[str, str], ...] | None

    def url(self, patient_id: str) -> str:
        if self.params is None:
            return f"{self.rtype}/{patient_id}"
        return f"{self.rtype}?{urlencode([(k, v.replace(PATIENT_TOKEN, patient_id)) for k, v in self.params], safe='|,:/{}')}"

    @property
    def text(self) -> str:
        """The template as discovery shows it."""
        return self.url(PATIENT_TOKEN)

    def query(self, patient_id: str) -> tuple[str, list[tuple[str, str]]]:
        return self.rtype, [(k, v.replace(PATIENT_TOKEN, patient_id)) for k, v in self.params or ()]


def templates(terminology: Terminology) -> list[Template]:
    """The templates the mapping needs, from the terminology (see the module docstring)."""
    reads, searches = patient_queries(terminology, PATIENT_TOKEN)
    out = [Template(r.split("/")[0].lower(), r.split("/")[0], None) for r in reads]
    out += [Template(rtype[0].lower() + rtype[1:], rtype, tuple(params.items())) for rtype, params in searches]
    return out


def assessment_template(ruleset_id: str) -> Template:
    """The current RiskAssessment of the patient for this rule set, by its identifier."""
    value = assessment_key("Patient/ID", ruleset_id).replace("Patient/ID", f"Patient/{PATIENT_TOKEN}")
    return Template(ASSESSMENT_KEY, "RiskAssessment", (("subject", f"Patient/{PATIENT_TOKEN}"),
                                                       ("identifier", f"{IDENTIFIER_SYSTEM}|{value}")))


def discovery_prefetch(terminology: Terminology, ruleset_id: str) -> dict[str, str]:
    return {t.key: t.text for t in [*templates(terminology), assessment_template(ruleset_id)]}


@dataclass
class Gathered:
    """One patient's resources, and where each template's answer came from."""

    resources: list[dict] = field(default_factory=list)
    from_prefetch: list[str] = field(default_factory=list)
    from_server: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    assessments: list[dict] | None = None     # the ``assessment`` prefetch's answer, when complete
    assessments_why: str = "the assessment prefetch was not sent"   # why it is None


_ABSENT = object()


def _bundle_resources(key: str, bundle: dict) -> tuple[list[dict], str | None, bool]:
    """(resources, why an outcome entry says results are missing or None, is incomplete)
    of a prefetched searchset Bundle."""
    entries = bundle.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CdsError(400, f"prefetch {key}: Bundle.entry is not a list of objects")
    links = bundle.get("link", [])
    if not isinstance(links, list) or not all(isinstance(x, dict) for x in links):
        raise CdsError(400, f"prefetch {key}: Bundle.link is not a list of objects")
    if not all(isinstance(x.get("relation"), str) for x in links):
        raise CdsError(400, f"prefetch {key}: a Bundle.link relation is not a string")
    total = bundle.get("total")
    if "total" in bundle and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise CdsError(400, f"prefetch {key}: Bundle.total is not a non-negative integer ({str(total)[:40]!r})")
    resources, cut, matches = [], None, 0
    for i, entry in enumerate(entries):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise CdsError(400, f"prefetch {key}: entry[{i}] has no resource object")
        mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
        if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
            cut = cut or results_cut(resource)
            continue
        matches += mode != "include"
        resources.append(resource)
    incomplete = any(x["relation"].lower() == "next" for x in links) or (total is not None and total > matches)
    return resources, cut, incomplete


class Prefetch:
    """Reads one request's prefetch against the templates, asking ``client`` (the CDS
    client's FHIR server with its token, or None) for what is missing."""

    def __init__(self, terminology: Terminology, patient: PatientRef, prefetch: dict[str, Any] | None,
                 client: FhirClient | None, no_client_why: str) -> None:
        self.terminology = terminology
        self.patient = patient
        self.prefetch = prefetch or {}
        self.client = client
        self.no_client_why = no_client_why
        self.gathered = Gathered()

    def _server(self, template: Template, why: str) -> list[dict]:
        if self.client is None:
            raise CdsError(412, f"prefetch {template.key} ({template.text}) {why}, "
                                f"and {self.no_client_why}")
        self.gathered.from_server.append(template.key)
        if template.params is None:
            found = self.client.read(template.rtype, self.patient.id)
            return [found] if found is not None else []
        return list(self.client.search(*template.query(self.patient.id)))

    def _continue(self, template: Template, bundle: dict) -> list[dict]:
        """A prefetched page the client paged or cut short: the rest from the FHIR server."""
        if self.client is None:
            raise CdsError(412, f"prefetch {template.key} is incomplete (a next link, or a total beyond its "
                                f"entries), and {self.no_client_why}")
        self.gathered.from_server.append(template.key)
        out = []
        for page in self.client.follow_pages(bundle, template.query(self.patient.id)):
            out += [e["resource"] for e in page.get("entry") or [] if isinstance(e.get("resource"), dict)
                    and (e.get("search") or {}).get("mode") != "outcome"]
        return out

    def read(self, template: Template) -> list[dict]:
        """The resources of one template."""
        value = self.prefetch.get(template.key, _ABSENT)
        if value is _ABSENT:
            return self._server(template, "was not sent")
        if value is None:
            if self.client is not None:
                return self._server(template, "is null")
            self.gathered.from_prefetch.append(template.key)
            return []
        if not isinstance(value, dict):
            raise CdsError(400, f"prefetch {template.key}: a {type(value).__name__}, not a FHIR resource or null")
        rtype = value.get("resourceType")
        if rtype == "OperationOutcome":
            return self._server(template, "failed at the CDS client (an OperationOutcome)")
        if template.params is None:
            if rtype != template.rtype or value.get("id") != self.patient.id:
                raise CdsError(400, f"prefetch {template.key}: expected {template.rtype}/{self.patient.id}, "
                                    f"got {rtype}/{value.get('id')}")
            self.gathered.from_prefetch.append(template.key)
            return [value]
        if rtype != "Bundle" or value.get("type") != "searchset":
            raise CdsError(400, f"prefetch {template.key}: expected a searchset Bundle, got "
                                f"{rtype or 'no resourceType'}{' ' + str(value.get('type')) if rtype == 'Bundle' else ''}")
        resources, cut, incomplete = _bundle_resources(template.key, value)
        if cut:
            return self._server(template, f"carries an OperationOutcome saying results are missing ({cut})")
        if incomplete:
            return self._continue(template, value)
        self.gathered.from_prefetch.append(template.key)
        return resources

    def gather(self) -> Gathered:
        try:
            for template in templates(self.terminology):
                self.gathered.resources += self.read(template)
            self.gathered.resources = self._dependents(self.gathered.resources)
        except FhirError as exc:
            raise CdsError(412, f"the FHIR server {self.client.base_url if self.client else ''} could not give "
                                f"the data the service needs: {exc}") from None
        self.gathered.assessments, self.gathered.assessments_why = self._assessments()
        return self.gathered

    def _dependents(self, resources: list[dict]) -> list[dict]:
        if self.client is not None:
            return dependents(self.client, self.terminology, resources)
        wanted = referenced_searches(resources)
        if wanted:
            names = "; ".join(f"{rtype}?_id={p['_id']}" for rtype, p in wanted)
            raise CdsError(412, f"the prefetch references resources it does not hold ({names}), and "
                                f"{self.no_client_why}")
        patients = [r for r in resources if r.get("resourceType") == "Patient"]
        if patients and Searches(self.terminology).by_identifier(PatientIdentity.of_patient(patients[0]).identifiers):
            resources = resources + [{"resourceType": IDENTIFIER_SEARCH_REFUSED, "problem":
                                      f"prefetch cannot carry them and {self.no_client_why}"}]
        return resources

    def _assessments(self) -> tuple[list[dict] | None, str]:
        """The ``assessment`` prefetch's RiskAssessments when it is the whole answer; else
        None and why not (the caller then asks the FHIR server, or cannot tell)."""
        value = self.prefetch.get(ASSESSMENT_KEY, _ABSENT)
        if value is _ABSENT:
            return None, "the assessment prefetch was not sent"
        if value is None:
            return ([], "") if self.client is None else (None, "the assessment prefetch is null")
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle" or value.get("type") != "searchset":
            return None, "the assessment prefetch is not a searchset Bundle"
        try:
            resources, cut, incomplete = _bundle_resources(ASSESSMENT_KEY, value)
        except CdsError as exc:
            return None, str(exc)
        if cut:
            return None, f"the assessment prefetch says results are missing ({cut})"
        if incomplete:
            return None, "the assessment prefetch is incomplete (a next link, or a total beyond its entries)"
        return [r for r in resources if r.get("resourceType") == "RiskAssessment"], ""

    def record(self, fhir_server: str | None) -> PatientRecord:
        """The patient's record (its identity on ``fhir_server``, when one was named)."""
        resources = self.gathered.resources
        if self.client is not None:
            return patient_record(self.client, self.patient, resources)
        patient = next((r for r in resources if r.get("resourceType") == "Patient"
                        and r.get("id") == self.patient.id), None)
        identity = PatientIdentity.of_patient(patient, patient_id=self.patient.id,
                                              bases=[fhir_server.rstrip("/")] if fhir_server else [])
        record = PatientRecord.from_resources([r for r in resources if r.get("resourceType") != IDENTIFIER_SEARCH_REFUSED],
                                              identity)
        record.notes += [f"resources that name this patient only by identifier cannot be seen ({r['problem']})"
                         for r in resources if r.get("resourceType") == IDENTIFIER_SEARCH_REFUSED]
        return record
