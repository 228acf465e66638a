"""Fetch what the mapping needs from a FHIR server, in as few round trips as it allows.

One patient: a ``batch`` Bundle of searches (one round trip plus any further pages);
a server without batch gets the same searches in parallel. A population: the patients
with a liver-metastasis Condition, then their data for many patients per search
(``patient=a,b,c``), grouped back by patient.

The searches are built from the terminology (:class:`Searches`), so a site's own codes
are fetched too. Resources that other resources point at (focus BodyStructures,
Medications) are fetched by id afterwards: ``BodyStructure?patient=`` is not supported
everywhere, and a server that silently ignores a search parameter returns everyone's
resources. Whose each resource is, is decided once, by :mod:`fhir_adapters.fhir.reference`:
a record is built with the patient's identity (its id on this server, its
identifiers), so a resource the server returned that names someone else is ignored and
named, and one that names no one is unattributable (never evidence of absence).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlencode

from fhir_adapters.fhir.batch import read_entry, search_entry
from fhir_adapters.fhir.client import FhirClient, FhirError
from fhir_adapters.fhir.search import token
from fhir_adapters.sources.history import deleted_since, patient_of_deleted
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.fhir.reference import SHARED_TYPES, PatientIdentity, PatientRef, patient_of, plain_ref, subject_element
from fhir_adapters.terminology import CodeList, Terminology

log = logging.getLogger("clm_stratify.pull")

PAGE_SIZE = 500
# A pseudo resource a record receives when the server refused the identifier searches.
IDENTIFIER_SEARCH_REFUSED = "clm-stratify:identifier-search-refused"
# Resource types searched per patient, and the search parameter naming the patient.
PATIENT_SEARCHES = (
    ("Observation", "patient"),
    ("Condition", "patient"),
    ("Procedure", "patient"),
    ("MedicationAdministration", "patient"),
    ("MedicationStatement", "patient"),
    ("DiagnosticReport", "patient"),
)


def token_list(*lists: CodeList) -> str | None:
    """``system|code,...`` for a token search; None when a list has prefixes (fetch all)."""
    tokens = []
    for cl in lists:
        for c in cl.codes:
            if c.code is None:
                return None
            tokens.append(token(c.system, c.code))
    return ",".join(dict.fromkeys(tokens))


@dataclass(frozen=True)
class Searches:
    """The searches of the pipeline, for one terminology."""

    terminology: Terminology

    def for_patients(self, patient_ids: list[str]) -> list[tuple[str, dict[str, str]]]:
        return self._per_patient(",".join(patient_ids), "")

    def by_identifier(self, identifiers: Iterable[tuple[str | None, str]]) -> list[tuple[str, dict[str, str]]]:
        """The same searches for resources that name the patient only by identifier
        (``subject:identifier``): a patient search never returns them, and they must be
        seen to be distrusted."""
        tokens = ",".join(sorted({token(s, v) for s, v in identifiers}))
        return self._per_patient(tokens, ":identifier") if tokens else []

    def _per_patient(self, who: str, modifier: str) -> list[tuple[str, dict[str, str]]]:
        t = self.terminology
        out = []
        for rtype, param in PATIENT_SEARCHES:
            params = {f"{param}{modifier}": who, "_count": str(PAGE_SIZE)}
            if rtype == "Observation":
                codes = token_list(t.tumour_size_observation, t.longest_dimension,
                                   t.technical_resectability_observation)
                if codes:
                    params["code"] = codes
            if rtype == "DiagnosticReport":
                categories = token_list(t.radiology_report_category)
                if categories:
                    params["category"] = categories
            out.append((rtype, params))
        return out

    def watched(self) -> list[tuple[str, dict[str, str]]]:
        """What re-classifies a patient: one search per trigger of the terminology
        (``triggers``): the searches a Subscription watches, and that a receiver re-runs
        (with ``_lastUpdated``) when a notification carries no payload or events were
        missed. A trigger without code lists, or with a list a token search cannot hold
        (ICD-10 prefixes), watches every resource of its type."""
        t = self.terminology
        out = []
        for trigger in t.triggers:
            codes = token_list(*t.code_lists_of(trigger)) if trigger.code_lists else None
            out.append((trigger.resource, {trigger.parameter: codes} if codes and trigger.parameter else {}))
        return out

    def recurrence_conditions(self) -> dict[str, str]:
        t = self.terminology
        codes = token_list(t.liver_metastasis_condition, t.metastasis_condition_generic)
        params = {"_count": str(PAGE_SIZE), "_elements": "subject"}
        if codes:
            params["code"] = codes
        return params


def _url(rtype: str, params: dict[str, str]) -> str:
    return f"{rtype}?{urlencode(params, safe='|,:/')}"


def _resources_of(client: FhirClient, page: dict, query: tuple[str, dict[str, str]] | None) -> Iterator[dict]:
    """The resources of a searchset page from a batch reply and the pages after it. An
    outcome entry left here is a warning only: one that says results are missing has made
    :meth:`FhirClient.follow_pages` raise ``FhirTruncated`` (the patient fails, never a
    partial record)."""
    for bundle in client.follow_pages(page, (query[0], list(query[1].items())) if query else None):
        for entry in bundle.get("entry", []) or []:
            if (entry.get("search") or {}).get("mode") == "outcome":
                continue
            resource = entry.get("resource")
            if isinstance(resource, dict):
                yield resource


def _run_searches(client: FhirClient, searches: list[tuple[str, dict[str, str]]],
                  extra_reads: Iterable[str] = ()) -> list[dict]:
    """Every resource the searches (and reads ``Type/id``) return, de-duplicated."""
    reads = list(extra_reads)
    found: dict[str, dict] = {}
    if client.capabilities().batch:
        entries = [{"request": {"method": "GET", "url": _url(t, p)}} for t, p in searches]
        entries += [{"request": {"method": "GET", "url": r}} for r in reads]
        try:
            responses = client.batch(entries)
        except FhirError as exc:
            if exc.status != 403:
                raise
            # Some servers (SEKMET) demand create rights on every type for any POST to the
            # base, even a batch of reads: a read-scoped token then searches one by one.
            return _run_searches_one_by_one(client, searches, reads)
        for i, response in enumerate(responses):
            # (fhir.batch: only a whole searchset, or a read's resource or 404/410, is a result)
            if i < len(searches):
                page = search_entry(client.base_url, i, searches[i][0], response)
                items = list(_resources_of(client, page, searches[i]))
            else:
                items = [r] if (r := read_entry(client.base_url, i, reads[i - len(searches)], response)) else []
            for res in items:
                found[f"{res.get('resourceType')}/{res.get('id')}"] = res
        return list(found.values())
    return _run_searches_one_by_one(client, searches, reads)


def _run_searches_one_by_one(client: FhirClient, searches: list[tuple[str, dict[str, str]]],
                             reads: list[str]) -> list[dict]:
    """The same searches without batch: in parallel, on the client's pooled session."""
    found: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda s: list(client.search(*s)), searches))
        results += list(pool.map(lambda r: [x] if (x := client.read(*r.split("/", 1))) else [], reads))
    for items in results:
        for res in items:
            found[f"{res.get('resourceType')}/{res.get('id')}"] = res
    return list(found.values())


def referenced_searches(resources: list[dict]) -> list[tuple[str, dict[str, str]]]:
    """Searches by id for the Medications and focus BodyStructures not yet fetched."""
    have = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    wanted: dict[str, set[str]] = defaultdict(set)
    for r in resources:
        refs = [(r.get("medicationReference") or {}).get("reference")]
        refs += [f.get("reference") for f in r.get("focus", []) if isinstance(f, dict)]
        for ref in map(plain_ref, refs):
            if ref and ref not in have and ref.split("/")[0] in ("Medication", "BodyStructure"):
                rtype, rid = ref.split("/", 1)
                wanted[rtype].add(rid)
    return [(rtype, {"_id": ",".join(sorted(ids))}) for rtype, ids in sorted(wanted.items())]


def _with_references(client: FhirClient, resources: list[dict]) -> list[dict]:
    extra = referenced_searches(resources)
    if extra:
        resources += _run_searches(client, extra)
    return resources


def patient_record(client: FhirClient, ref: PatientRef, resources: list[dict]) -> PatientRecord:
    """The record of the patient on this server from the resources fetched for it."""
    patient = next((r for r in resources if r.get("resourceType") == "Patient" and r.get("id") == ref.id), None)
    identity = PatientIdentity.of_patient(patient, patient_id=ref.id, bases=[client.base_url])
    record = PatientRecord.from_resources([r for r in resources if r.get("resourceType") != IDENTIFIER_SEARCH_REFUSED],
                                          identity)
    record.notes += [f"the server refused a search by subject identifier ({r['problem']}): resources that name "
                     "this patient only by identifier cannot be seen" for r in resources
                     if r.get("resourceType") == IDENTIFIER_SEARCH_REFUSED]
    return record


def patient_queries(terminology: Terminology, patient_id: str) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """What :func:`fetch_patient` asks first for one patient: the reads (``Patient/<id>``)
    and the searches. The CDS Hooks prefetch templates are these, with the id a token.

    >>> from fhir_adapters.terminology import load_terminology
    >>> reads, searches = patient_queries(load_terminology(), "p1")
    >>> reads, [rtype for rtype, _ in searches][:2]
    (['Patient/p1'], ['Observation', 'Condition'])
    """
    return [f"Patient/{patient_id}"], Searches(terminology).for_patients([patient_id])


def dependents(client: FhirClient, terminology: Terminology, resources: list[dict]) -> list[dict]:
    """``resources`` with what they lead to: resources that name the patient only by
    identifier, and the Medications and focus BodyStructures referenced."""
    resources = resources + _named_by_identifier(client, terminology, resources)
    return _with_references(client, resources)


def fetch_patient(client: FhirClient, ref: PatientRef, terminology: Terminology) -> list[dict]:
    """All resources the mapping needs for one patient."""
    reads, searches = patient_queries(terminology, ref.id)
    return dependents(client, terminology, _run_searches(client, searches, extra_reads=reads))


def _identifiers(patient: dict) -> set[tuple[str | None, str]]:
    return set(PatientIdentity.of_patient(patient).identifiers)


def subject_identifier(resource: dict) -> tuple[str | None, str] | None:
    _, subject = subject_element(resource)
    ident = subject.get("identifier") if isinstance(subject, dict) else None
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return (ident.get("system") if isinstance(ident.get("system"), str) else None, ident["value"])
    return None


def _refused(exc: FhirError) -> bool:
    """The server answered the search with a 4xx (it does not support it), as opposed to a
    fault (5xx, connection) that a retry may cure."""
    if exc.status is not None:
        return 400 <= exc.status < 500
    return bool(re.search(r"failed: 4\d\d", str(exc)))


def _named_by_identifier(client: FhirClient, terminology: Terminology, resources: list[dict]) -> list[dict]:
    """Resources whose subject names one of the fetched patients by identifier only.
    Only those whose identifier really is one of theirs are kept (a server that ignores
    the ``:identifier`` modifier returns everyone's); a server that refuses the search is
    named in a note on each record (``IDENTIFIER_SEARCH_REFUSED``)."""
    wanted = set().union(*(_identifiers(r) for r in resources if r.get("resourceType") == "Patient"))
    searches = Searches(terminology).by_identifier(wanted)
    if not searches:
        return []
    have = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    try:
        found = _run_searches(client, searches)
    except FhirError as exc:
        if not _refused(exc):
            raise  # a transient fault: the patient is retried, never classified without these
        log.warning("the server cannot search by subject identifier (%s): resources that name a patient "
                    "only by identifier cannot be seen", exc)
        return [{"resourceType": IDENTIFIER_SEARCH_REFUSED, "problem": str(exc)[:200]}]
    return [r for r in found if f"{r.get('resourceType')}/{r.get('id')}" not in have
            and subject_identifier(r) in wanted | {(None, v) for _, v in wanted}]


def patient_of_focus(client: FhirClient, focus: str) -> PatientRef | None:
    """The patient of a notification's focus (``Type/id``): the Patient itself, else the
    subject of the resource as read now, else, when it is gone (404/410: deleted), the
    subject of its newest version in the instance history. None when no version names a
    patient by a literal reference (or the server keeps no history)."""
    rtype, _, rid = focus.partition("/")
    if rtype == "Patient":
        try:
            return PatientRef(rid)
        except ValueError:
            return None
    resource = client.read(rtype, rid)          # checks rtype and rid before they reach a URL
    if resource is not None:
        return patient_of(resource, client.base_url)
    return patient_of_deleted(client, rtype, rid)


def changed_patients_since(client: FhirClient, terminology: Terminology,
                           since: str) -> tuple[set[PatientRef], str | None]:
    """Patients with a watched resource updated after ``since`` (an instant), or deleted
    since then (type history, where the server serves it: a search cannot see a deleted
    resource), and the latest ``meta.lastUpdated`` seen (the next watermark)."""
    patients: set[PatientRef] = set()
    latest: str | None = None
    watched = Searches(terminology).watched()
    for rtype, params in watched:
        query = {**params, "_lastUpdated": f"ge{since}", "_count": str(PAGE_SIZE)}
        for resource in client.search(rtype, query):
            subject = patient_of(resource, client.base_url)
            if subject:
                patients.add(subject)
            updated = (resource.get("meta") or {}).get("lastUpdated")
            if isinstance(updated, str) and (latest is None or updated > latest):
                latest = updated
    for rtype in dict.fromkeys(rtype for rtype, _ in watched):
        for rid, when in deleted_since(client, rtype, since):
            subject = patient_of_deleted(client, rtype, rid)
            if subject:
                patients.add(subject)
            if when and (latest is None or when > latest):
                latest = when
    return patients, latest


def mentions_metastasis(record: PatientRecord, terminology: Terminology) -> bool:
    """The record has a Condition of its own coded as a (liver) metastasis: the same
    cohort as :func:`patients_with_liver_metastasis`, for data fetched in bulk."""
    lists = (terminology.liver_metastasis_condition, terminology.metastasis_condition_generic)
    return any(cl.matches(c.system, c.code) for cond in record.conditions
               for c in (cond.code.coding or [] if cond.code else []) for cl in lists) or any(
        u.resource_type == "Condition" and any(cl.matches_any(u.codings) for cl in lists) for u in record.unreadable)


def patients_with_liver_metastasis(client: FhirClient, terminology: Terminology) -> list[PatientRef]:
    """The patients with a (liver-)metastasis Condition, in a stable order."""
    found: dict[PatientRef, None] = {}
    for condition in client.search("Condition", Searches(terminology).recurrence_conditions()):
        subject = patient_of(condition, client.base_url)
        if subject:
            found[subject] = None
    return list(found)


def fetch_population(client: FhirClient, patients: list[PatientRef], terminology: Terminology,
                     chunk: int = 50) -> Iterator[tuple[PatientRef, PatientRecord | FhirError]]:
    """(patient, record) for each patient, fetched ``chunk`` patients per search.

    A chunk that fails yields the error for each of its patients; the others go on.
    """
    searches = Searches(terminology)
    for start in range(0, len(patients), chunk):
        refs = patients[start:start + chunk]
        ids = [r.id for r in refs]
        try:
            # (No subject:identifier searches here: a population run reads what Bulk export
            # reads, so both paths give the same record; see fetch_patient.)
            resources = _run_searches(client, searches.for_patients(ids) + [("Patient", {"_id": ",".join(ids)})])
            resources = _with_references(client, resources)
        except FhirError as exc:
            for ref in refs:
                yield ref, exc
            continue
        for ref, own in group_by_patient(resources, refs, client.base_url).items():
            yield ref, patient_record(client, ref, own)


def group_by_patient(resources: list[dict], patients: list[PatientRef],
                     base: str | None) -> dict[PatientRef, list[dict]]:
    """The resources of a multi-patient search, per patient. Shared resources
    (Medication) go to everyone; resources that name none of these patients by a literal
    reference go to everyone too, where each record names them as unattributable (or
    ignores them as someone else's): nothing is dropped unseen. Resources of patients
    outside ``patients`` (a search parameter the server ignored) are left out."""
    by_patient: dict[PatientRef, list[dict]] = {ref: [] for ref in patients}
    by_identifier = {ident: owner for r in resources if r.get("resourceType") == "Patient"
                     and (owner := patient_of(r)) in by_patient for ident in _identifiers(r)}
    everyone: list[dict] = []
    for r in resources:
        owner = patient_of(r, base)
        ident = subject_identifier(r)
        if owner is None and ident is not None and ident in by_identifier:
            by_patient[by_identifier[ident]].append(r)
        elif owner in by_patient:
            by_patient[owner].append(r)
        elif r.get("resourceType") in SHARED_TYPES or (owner is None and r.get("resourceType") != "Patient"):
            everyone.append(r)
    return {ref: own + everyone for ref, own in by_patient.items()}
