"""A small, careful FHIR R4 REST client (JSON only): the FHIR interactions (read, search
with paging, batch, transaction, update, create, delete) over
:class:`fhir_adapters.fhir.transport.Transport`, which sends every request (retries,
back-off, error mapping, logging: see its module for the decisions)::

    from fhir_adapters.fhir.client import FhirClient, FhirConflict
    from fhir_adapters.fhir.auth import SmartBackendServices, load_private_key

    auth = SmartBackendServices("clm-stratify", load_private_key("key.pem"),
                                base_url="https://fhir.example.org/r4")
    fhir = FhirClient("https://fhir.example.org/r4", auth)
    fhir.capabilities().fhir_version                        # '4.0.1'
    for obs in fhir.search("Observation", {"patient": "p1", "_count": "100"}):
        ...                                                  # every page, next links followed verbatim
    status, body = fhir.update(risk_assessment, if_match='W/"3"')   # FhirConflict on 409/412

Replies are parsed with exact decimals (:mod:`fhir_adapters.fhir.codec`); failures are
:mod:`fhir_adapters.fhir.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import urljoin

import requests

from fhir_adapters.fhir.capabilities import ServerCapabilities
from fhir_adapters.fhir.codec import dumps, loads
from fhir_adapters.fhir.errors import (FhirConflict, FhirError, FhirServerUnavailable, FhirTruncated,
                                      operation_outcome_text)
from fhir_adapters.fhir.search import (MAX_OFFSET_PAGES, MAX_PAGES, MAX_STALE_PAGES, Completeness, count_of,
                                      results_cut)
from fhir_adapters.fhir.transport import Transport, strip_query

__all__ = [
    "FhirClient", "FhirError", "FhirServerUnavailable", "FhirConflict", "FhirTruncated",
    "dumps", "loads", "operation_outcome_text",
]

_RTYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_RID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _malformed(bundle: dict) -> str | None:
    """What makes a Bundle unusable (its parts of the wrong JSON type), or None. Such a
    Bundle is an error, never read in part."""
    if not isinstance(bundle.get("link", []), list) or not all(isinstance(x, dict) for x in bundle.get("link", [])):
        return "link is not a list of objects"
    for i, link in enumerate(bundle.get("link", [])):
        if not isinstance(link.get("relation"), str) or not isinstance(link.get("url", ""), str):
            return f"link[{i}] has a relation or url that is not a string"
    total = bundle.get("total")
    if "total" in bundle and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        return f"total is not a non-negative integer ({str(total)[:40]!r})"
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        return "entry is not a list"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return f"entry[{i}] is not an object"
        for key in ("resource", "search", "response", "request"):
            if key in entry and not isinstance(entry[key], dict):
                return f"entry[{i}].{key} is not an object"
    return None


class FhirClient(Transport):
    """FHIR R4 REST client (see :class:`~fhir_adapters.fhir.transport.Transport` for the arguments).

    >>> fhir = FhirClient("http://127.0.0.1:8080/fhir/", retries=2, backoff=0.1)
    >>> fhir.base_url
    'http://127.0.0.1:8080/fhir'
    """


    def capabilities(self, refresh: bool = False) -> ServerCapabilities:
        """The server's CapabilityStatement (``GET [base]/metadata``), parsed, cached after the first call.

        >>> fhir.capabilities().fhir_version                   # doctest: +SKIP
        '4.0.1'
        """
        if self._capabilities is None or refresh:
            self._capabilities = ServerCapabilities.parse(self._json(self.request("GET", "metadata")) or {})
        return self._capabilities

    @property
    def known_capabilities(self) -> ServerCapabilities | None:
        """The capabilities this client has read or been given, without asking the server."""
        return self._capabilities

    def use_capabilities(self, caps: ServerCapabilities) -> None:
        """Capabilities of this server read earlier (another client's, a cache's): not asked again."""
        self._capabilities = caps

    def read(self, rtype: str, rid: str) -> dict | None:
        """``GET [type]/[id]``; None when the server answers 404 (unknown) or 410 (deleted).

        >>> fhir.read("Patient", "does-not-exist") is None      # doctest: +SKIP
        True
        """
        try:
            return self._json(self.request("GET", self._path(rtype, rid)))
        except FhirError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def search(self, rtype: str, params: Mapping[str, str] | Sequence[tuple[str, str]] = (), *,
               strict: bool = False) -> Iterator[dict]:
        """Yield the resources of a search across all pages.

        Entries with ``search.mode == "outcome"`` (server warnings such as an ignored
        unknown parameter) are not yielded; their text goes to
        :attr:`last_search_warnings` (reset when the iteration starts). An outcome that
        says results are missing (:func:`~fhir_adapters.fhir.search.results_cut`: an error,
        or a code such as ``incomplete`` or ``too-costly``) raises :class:`FhirTruncated`
        instead: a partial answer is never taken for the whole. ``match`` and
        ``include`` entries are both yielded. ``strict=True`` sends
        ``Prefer: handling=strict`` so that unknown parameters fail with a 400
        :class:`FhirError` instead. ``Bundle.total`` is never used.

        >>> [o["id"] for o in fhir.search("Observation", {"patient": "p1", "_count": "2"})]  # doctest: +SKIP
        ['o1', 'o2', 'o3']
        """
        for bundle in self.search_pages(rtype, params, strict=strict):
            for entry in bundle.get("entry") or []:
                if (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                if entry.get("resource") is not None:
                    yield entry["resource"]

    def search_pages(self, rtype: str, params: Mapping[str, str] | Sequence[tuple[str, str]] = (), *,
                     strict: bool = False, complete: bool = True) -> Iterator[dict]:
        """Yield the raw searchset Bundles of a search, page by page (see :meth:`search`).

        ``complete`` (default): when a page without a ``next`` link leaves results out
        (:class:`~fhir_adapters.fhir.search.Completeness`), the search goes on with
        ``_offset``, or raises :class:`FhirTruncated` naming what the server did; so does
        a page whose outcome entry says results are missing.
        ``complete=False`` yields exactly what the server sent (the interop probes).
        """
        if not _RTYPE.fullmatch(rtype):
            raise ValueError(f"not a FHIR resource type: {rtype!r}")
        headers = {"Prefer": "handling=strict"} if strict else {}
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        self.last_search_warnings = []
        first = self._bundle(self.request("GET", rtype, params=pairs or None, headers=headers))
        yield from self._pages(first, headers, (rtype, pairs) if complete else None, check=complete)

    def follow_pages(self, bundle: dict, query: tuple[str, Sequence[tuple[str, str]]] | None = None) -> Iterator[dict]:
        """Yield ``bundle`` (a first searchset page, e.g. from a batch response) and the pages after it.

        ``query`` (``(type, params)`` of the search that gave ``bundle``) lets a search the
        server cut short go on with ``_offset``; without it such a search raises
        :class:`FhirTruncated`.

        >>> first = fhir.batch([{"request": {"method": "GET", "url": "Observation?patient=p1"}}])[0]
        ... # doctest: +SKIP
        >>> pages = list(fhir.follow_pages(first["resource"], ("Observation", [("patient", "p1")])))  # doctest: +SKIP
        """
        self.last_search_warnings = []
        yield from self._pages(bundle, {}, (query[0], list(query[1])) if query else None, check=True)

    def _pages(self, bundle: dict, headers: Mapping[str, str], query: tuple[str, list[tuple[str, str]]] | None,
               *, check: bool) -> Iterator[dict]:
        seen: set[str] = set()
        completeness = Completeness(count_of(query[1]) if query else None)
        stale = 0
        while True:
            problem = _malformed(bundle) if isinstance(bundle, dict) else "not a JSON object"
            if problem:   # a searchset inside a batch reply is not checked by _bundle
                raise FhirError(f"malformed searchset Bundle: {problem}", url=self.base_url, method="GET")
            self._outcomes(bundle, check)
            page, matches, new = completeness.add(bundle)
            stale = stale + 1 if new == 0 else 0
            if stale > MAX_STALE_PAGES:
                raise FhirError(f"the server keeps sending next links with nothing new ({stale} pages in a row "
                                f"repeat earlier results or are empty): stopped following them", url=self.base_url,
                                method="GET")
            if completeness.pages > MAX_PAGES:
                raise FhirError(f"a search ran past {MAX_PAGES} pages: stopped following next links",
                                url=self.base_url, method="GET")
            yield page if check else bundle
            nxt = next((link.get("url") for link in bundle.get("link") or []
                        if link["relation"].lower() == "next" and link.get("url")), None)  # (IANA: case-insensitive)
            if nxt is None:
                if check:
                    yield from self._continue_with_offset(completeness, matches, query, headers)
                return
            if not nxt.lower().startswith(("http://", "https://")):
                nxt = urljoin(self.base_url + "/", nxt)  # a relative link: resolve, do not rebuild
            if nxt in seen:
                raise FhirError(f"the server sent the same next link twice (paging loop): {strip_query(nxt)}",
                                url=strip_query(nxt), method="GET")
            seen.add(nxt)
            bundle = self._bundle(self.request("GET", nxt, headers=headers))

    def _outcomes(self, bundle: dict, check: bool) -> None:
        """A page's outcome entries: their text to :attr:`last_search_warnings`, or (``check``)
        :class:`FhirTruncated` when one says results are missing."""
        for entry in bundle.get("entry") or []:
            if (entry.get("search") or {}).get("mode") != "outcome":
                continue
            cut = results_cut(entry.get("resource")) if check else None
            if cut:
                raise FhirTruncated(f"search incomplete: the server says results are missing ({cut})",
                                    url=self.base_url, method="GET",
                                    outcome=operation_outcome_text(entry.get("resource")))
            text = operation_outcome_text(entry.get("resource"))
            if text:
                self.last_search_warnings.append(text)

    def _continue_with_offset(self, completeness: Completeness, last_matches: int,
                              query: tuple[str, list[tuple[str, str]]] | None,
                              headers: Mapping[str, str]) -> Iterator[dict]:
        """The rest of a search the server cut short without a ``next`` link (see
        :mod:`fhir_adapters.fhir.search`)."""
        reason = completeness.shortfall(last_matches)
        if reason is None:
            return
        url = f"{self.base_url}/{query[0]}" if query else self.base_url
        if query is None:
            raise FhirTruncated(f"search incomplete: {reason}", url=url, method="GET")
        rtype, pairs = query
        for _ in range(MAX_OFFSET_PAGES):
            params = [(k, v) for k, v in pairs if k != "_offset"] + [("_offset", str(completeness.matched))]
            bundle = self._bundle(self.request("GET", rtype, params=params, headers=headers))
            self._outcomes(bundle, True)
            page, matches, new = completeness.add(bundle)
            if new == 0:
                if matches:
                    raise FhirTruncated(f"{rtype} search incomplete: {reason}, and the server ignored _offset "
                                        f"(it sent the same results again)", url=url, method="GET")
                if completeness.total is not None and completeness.matched < completeness.total:
                    raise FhirTruncated(f"{rtype} search incomplete: {reason}, and _offset={completeness.matched} "
                                        f"returned nothing", url=url, method="GET")
                return
            yield page
            if completeness.done(matches):
                return
        raise FhirTruncated(f"{rtype} search incomplete: more than {MAX_OFFSET_PAGES} _offset pages",
                            url=url, method="GET")

    def _bundle(self, resp: requests.Response) -> dict:
        body = self._json(resp)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            kind = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            raise FhirError(f"{resp.request.method} {strip_query(resp.url)}: expected a Bundle, got {kind}",
                            status=resp.status_code, url=strip_query(resp.url),
                            outcome=operation_outcome_text(body), method=resp.request.method or "")
        problem = _malformed(body)
        if problem:
            raise FhirError(f"{resp.request.method} {strip_query(resp.url)}: malformed Bundle: {problem}",
                            status=resp.status_code, url=strip_query(resp.url), method=resp.request.method or "")
        return body

    def batch(self, requests: Sequence[dict]) -> list[dict]:
        """POST a ``batch`` Bundle; return the response entries in request order.

        Each entry's own ``response.status`` says whether it worked (a batch is not
        atomic). A batch of only GETs is retried like a GET.

        >>> fhir.batch([{"request": {"method": "GET", "url": "Observation?patient=p1"}},
        ...             {"request": {"method": "GET", "url": "Condition?patient=p1"}}])  # doctest: +SKIP
        [{'resource': {'resourceType': 'Bundle', 'type': 'searchset', ...}, 'response': {'status': '200 OK'}}, ...]
        """
        entries = list(requests)
        only_gets = all((e.get("request") or {}).get("method", "").upper() in ("GET", "HEAD") for e in entries)
        return self._bundle_post("batch", entries, idempotent=only_gets or None)

    def transaction(self, entries: Sequence[dict]) -> list[dict]:
        """POST a ``transaction`` Bundle (all or nothing); return the response entries.

        A failed transaction raises :class:`FhirError` (:class:`FhirConflict` for
        409/412) with the server's OperationOutcome text; nothing was stored.

        >>> fhir.transaction([
        ...     {"resource": ra, "request": {"method": "PUT", "url": "RiskAssessment/clm-1"}},
        ...     {"resource": prov, "request": {"method": "POST", "url": "Provenance"}}])  # doctest: +SKIP
        [{'response': {'status': '201 Created', ...}}, {'response': {'status': '201 Created', ...}}]
        """
        return self._bundle_post("transaction", list(entries), idempotent=None)

    def _bundle_post(self, kind: str, entries: list[dict], idempotent: bool | None) -> list[dict]:
        body = {"resourceType": "Bundle", "type": kind, "entry": entries}
        reply = self._bundle(self.request("POST", "", json_body=body, idempotent=idempotent))
        out = reply.get("entry") or []
        if len(out) != len(entries):
            raise FhirError(f"{kind}-response has {len(out)} entries for {len(entries)} requests",
                            url=self.base_url, method="POST")
        return out

    def update(self, resource: dict, *, if_match: str | None = None) -> tuple[int, dict | None]:
        """``PUT [type]/[id]`` (create-or-update by id); returns ``(200 or 201, body or None)``.

        ``if_match`` (e.g. ``'W/"3"'``) makes it version-aware: a mismatch raises
        :class:`FhirConflict` (412, or 409 on older servers).

        >>> fhir.update({"resourceType": "Patient", "id": "p1", "active": True})  # doctest: +SKIP
        (201, {'resourceType': 'Patient', 'id': 'p1', 'meta': {'versionId': '1', ...}, ...})
        """
        rtype, rid = resource.get("resourceType", ""), resource.get("id", "")
        headers = {"If-Match": if_match} if if_match else None
        resp = self.request("PUT", self._path(rtype, rid), json_body=resource, headers=headers)
        return resp.status_code, self._json(resp)

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> tuple[int, dict | None]:
        """``POST [type]``; returns ``(201, created)``, or ``(200, existing)`` for a matched conditional create.

        ``if_none_exist`` is the query part, e.g. ``"_id=clm-1"`` or ``"identifier=s|v"``;
        several matches raise :class:`FhirConflict` (412). Not retried after an unknown
        outcome (see the module docstring).

        >>> fhir.create(observation)                               # doctest: +SKIP
        (201, {'resourceType': 'Observation', 'id': '7f3c...', ...})
        """
        rtype = resource.get("resourceType", "")
        if not _RTYPE.fullmatch(str(rtype)):
            raise ValueError(f"not a FHIR resource type: {rtype!r}")
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        resp = self.request("POST", rtype, json_body=resource, headers=headers)
        return resp.status_code, self._json(resp)

    def delete(self, rtype: str, rid: str) -> int:
        """``DELETE [type]/[id]``; returns the status (404/410 are returned, not raised: already gone).

        >>> fhir.delete("RiskAssessment", "clm-1")                  # doctest: +SKIP
        200
        """
        try:
            return self.request("DELETE", self._path(rtype, rid)).status_code
        except FhirError as exc:
            if exc.status in (404, 410):
                return exc.status
            raise

    def ping(self, timeout: float = 3.0, *, path: str = "metadata",
             params: dict[str, str] | None = None) -> str | None:
        """One ``GET metadata?_summary=true`` (or ``path`` with ``params``), no retries, a
        short timeout: None when the server answered 2xx, else one line saying what
        happened, ending with ``HTTP <status>`` when it answered (for a health check).

        >>> FhirClient("http://127.0.0.1:9/fhir").ping(timeout=0.5)   # doctest: +ELLIPSIS
        'GET http://127.0.0.1:9/fhir/metadata: ...'
        """
        url = self.url(path)
        try:
            resp = self.session.get(url, params={"_summary": "true"} if params is None else params,
                                    auth=self.auth, timeout=timeout,
                                    verify=self.verify, headers={"Accept": "application/fhir+json",
                                                                 "User-Agent": self.user_agent})
        except requests.exceptions.SSLError as exc:
            return f"GET {url}: TLS error: {type(exc).__name__}"
        except requests.Timeout:
            return f"GET {url}: no answer within {timeout:g} s"
        except requests.RequestException as exc:
            return f"GET {url}: {'connection refused' if 'refused' in str(exc).lower() else type(exc).__name__}"
        except Exception as exc:   # an auth that cannot fetch its token, and the like
            return f"GET {url}: {type(exc).__name__}: {str(exc)[:200]}"
        with resp:
            if resp.status_code >= 300:
                return f"GET {url}: HTTP {resp.status_code}"
        return None

    @staticmethod
    def _path(rtype: str, rid: str) -> str:
        """``Type/id`` after checking both (an id like ``../x`` or ``a?b`` must not reach the URL)."""
        if not _RTYPE.fullmatch(str(rtype)):
            raise ValueError(f"not a FHIR resource type: {rtype!r}")
        if not _RID.fullmatch(str(rid)):
            raise ValueError(f"not a valid FHIR id (1-64 of A-Z a-z 0-9 - .): {rid!r}")
        return f"{rtype}/{rid}"
