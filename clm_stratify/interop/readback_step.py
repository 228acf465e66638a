"""Step 3 of ``clm-stratify interop``: read every patient back with the pipeline's own
searches, check paging (``_count=2``) and the patient filter, and the media types of the
server's replies (the behaviour probes of this step are in :mod:`.behaviour_probes`)."""

from __future__ import annotations

from collections import Counter

from clm_stratify.interop.checks import FAIL, PASS, SKIP, WARN, Check, short_list
from clm_stratify.interop.run_state import FixturePatient, RunState
from clm_stratify.interop import probes
from clm_stratify.interop.probes import ref_of
from fhir_adapters.sources.pull import Searches, fetch_patient, referenced_searches, subject_identifier
from fhir_adapters.fhir.client import FhirError, FhirTruncated
from fhir_adapters.fhir.reference import PatientIdentity

_FILTER_TITLE = "search filter by patient (Observation)"


class ReadBackStep(RunState):
    """The ``read.*`` checks."""

    def expected_read(self, p: FixturePatient) -> set[str]:
        """What fetch_patient must return for ``p`` from a correct server."""
        patient = p.patient.reference
        want = {patient}
        raw_patient = next((r for r in p.resources if ref_of(r) == patient), None)
        mine = PatientIdentity.of_patient(raw_patient).identifiers
        # resources that name the patient only by identifier are found by subject:identifier
        named = [{**r, "subject": {"reference": patient}} for r in p.resources
                 if "subject" in r and subject_identifier(r) in mine]
        for rtype, params in Searches(self.rules.terminology).for_patients([p.patient.id]):
            want |= probes.local_search(p.resources, rtype, params, patient)
            want |= probes.local_search(named, rtype, params, patient)
        have = {ref_of(r) for r in p.resources}
        for rtype, params in referenced_searches([r for r in p.resources if ref_of(r) in want]):
            want |= {f"{rtype}/{i}" for i in params["_id"].split(",")} & have
        return want

    def read_back(self) -> None:
        problems: list[str] = []
        total = 0
        before = self.client.round_trips
        with self.timed() as t:
            for p in self.patients:
                want = self.expected_read(p)
                try:
                    got = {ref_of(r) for r in fetch_patient(self.client, p.patient, self.rules.terminology)}
                except FhirError as exc:
                    problems.append(f"{p.fixture}: {exc}")
                    continue
                total += len(got)
                if got != want:
                    by_id = {ref_of(r) for r in p.resources if "subject" in r and not (r["subject"] or {}).get(
                        "reference") and subject_identifier(r)}
                    missing = [m + (" (its subject names the patient by identifier only: the "
                                    "subject:identifier / patient:identifier search did not find it)"
                                    if m in by_id else "") for m in sorted(want - got)]
                    problems.append(f"{p.fixture}: missing {missing or 'none'}, "
                                    f"unexpected {sorted(got - want) or 'none'}")
        trips = self.client.round_trips - before
        mode = "batch" if self.client.capabilities().batch else "parallel searches"
        self.check("read.fetch-patient", "read back with the pipeline's searches", FAIL if problems else PASS,
                   short_list(problems, 3) if problems else
                   f"{len(self.patients)} patients, {total} resources, all as expected "
                   f"({trips} round trips, {mode})", seconds=t[0])

    def paging(self) -> None:
        p = max(self.patients, key=lambda x: sum(r["resourceType"] == "Observation" for r in x.resources))
        patient = p.patient.reference
        want = probes.local_search(p.resources, "Observation", {}, patient)
        query = f"Observation?patient={p.patient.id}&_count=2"
        title = "paging (_count=2, next links)"
        with self.timed() as t:
            try:
                res = probes.search_pages(self.client, "Observation", {"patient": p.patient.id, "_count": "2"},
                                          max_pages=50)
            except FhirError as exc:
                self.check("read.paging", title, FAIL, f"{query}: the search failed: {exc}", exc.outcome, t[0])
                if isinstance(exc, FhirTruncated):
                    self.quirk("paging-absent", f"{query}: {exc}", "none possible: the search fails "
                               "(FhirTruncated) rather than classify from a partial record")
                self.report.checks.append(Check("read.patient-filter", self._step, _FILTER_TITLE, SKIP,
                                                f"not run: {query} failed"))
                return
        foreign = [r for r in res.resources if probes.owner_of(r) != patient]
        mine = [ref_of(r) for r in res.resources if probes.owner_of(r) == patient]
        dups = sorted(k for k, n in Counter(mine).items() if n > 1)
        missing = sorted(want - set(mine))
        cut = res.cut_short()
        links = sum(res.has_next)
        how = (f"{res.pages} pages: {links} next links followed"
               + (f", then _offset from page {cut[0] + 1} (page {cut[0]} had no next link)"
                  if cut and cut[0] < res.pages else ""))
        if len(want) < 3:
            self.check("read.paging", title, WARN, f"{query}: only {len(want)} Observations in the chosen fixtures: "
                       "paging not exercised", seconds=t[0])
        elif foreign and res.truncated:
            self.check("read.paging", title, WARN, f"{query}: the patient filter was ignored and the pages never "
                       f"ended ({res.pages} pages read): paging not checked", seconds=t[0])
        else:
            bad = missing or dups
            self.check("read.paging", title, FAIL if bad else PASS,
                       f"{query}: {len(set(mine))} of the patient's {len(want)} Observations in {how}"
                       + (f"; missing {missing}" if missing else "") + (f"; repeated {dups}" if dups else "")
                       + ("" if bad else "; all came back once"), seconds=t[0])
        self._paging_quirks(query, res, cut, missing)
        text = "; ".join(dict.fromkeys(res.warnings))
        if not mine:
            self.check("read.patient-filter", _FILTER_TITLE, FAIL,
                       f"{query} returned none of the patient's {len(want)} Observations"
                       + (f" ({len(foreign)} of other patients)" if foreign else "") + ": the filter is not "
                       "shown to work")
        else:
            self.check("read.patient-filter", _FILTER_TITLE, WARN if foreign else PASS,
                       (f"{query} returned {len(foreign)} Observations of other patients"
                        + (f" (server: {text})" if text else " with no warning")
                        + "; fallback: pull drops resources whose subject is another patient")
                       if foreign else f"{query} returned {len(set(mine))} Observations, all the patient's")
        if foreign:
            self.quirk("search-parameter-ignored",
                       "Observation?patient= returned other patients' Observations"
                       + ("" if text else " (silently: no warning in the searchset)"),
                       "pull drops every resource whose subject is another patient", text)

    def _paging_quirks(self, query: str, res: probes.SearchPages, cut: tuple[int, int] | None,
                       missing: list[str]) -> None:
        """Name what the server did with paging: each quirk only when it happened."""
        if any(size > 2 for size in res.page_sizes):
            self.quirk("count-not-honoured", f"{query} gave pages of {', '.join(map(str, res.page_sizes))} "
                       "resources", "pages are followed whatever their size")
        if res.totals and all(x is None for x in res.totals):
            self.quirk("bundle-total-absent", f"{query}: no Bundle.total on any of {res.pages} pages",
                       "Bundle.total is not needed while next links come; without them a full last page "
                       "is checked with _offset")
        if cut:
            page, received = cut
            said = (f"Bundle.total {res.total}" if res.total is not None else
                    "no Bundle.total, and the page was full")
            continued = page < res.pages
            self.quirk("paging-absent", f"{query}: page {page} had no next link after {received} resources "
                       f"({said})",
                       (f"the client went on with _offset: {len(res.resources)} resources in {res.pages} requests"
                        + ("" if not missing else f", still missing {len(missing)}")) if continued else
                       "none: the search stopped there (results left out)")
        elif res.total is not None and res.total != len(res.resources) and not res.truncated:
            self.quirk("bundle-total-inaccurate", f"{query}: Bundle.total says {res.total}, "
                       f"{len(res.resources)} came back (all pages, next links followed)",
                       "Bundle.total is only used to notice a search cut short")
        if res.next_link_lengths and max(res.next_link_lengths) > probes.LONG_LINK_CHARS:
            self.quirk("long-next-links", f"{query}: next links of up to {max(res.next_link_lengths)} characters",
                       "next links are followed verbatim (never rebuilt); all pages came back"
                       if not missing else "next links are followed verbatim")

    def media_types(self, recorder: probes.ReplyRecorder) -> None:
        types = dict(recorder.media_types)
        self.report.info["media_types"] = types
        others = {m: n for m, n in types.items() if m != probes.FHIR_JSON}
        if not types:
            return
        if not others:
            self.check("read.media-type", "reply media type", PASS, f"{probes.FHIR_JSON} ({types[probes.FHIR_JSON]} "
                       "replies)")
            return
        plain = others.get("application/json")
        bad = {m: n for m, n in others.items() if m != "application/json"}
        self.check("read.media-type", "reply media type", FAIL if bad else WARN,
                   ", ".join(f"{m}: {n} replies (e.g. {recorder.examples.get(m)})" for m, n in others.items())
                   + "; accepted: any JSON media type")
        if plain:
            self.quirk("application-json-content-type", f"{plain} replies were application/json",
                       "accepted: the client takes application/fhir+json, application/json and other "
                       "application/*+json")
