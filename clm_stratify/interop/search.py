"""Searching and reply recording for ``clm-stratify interop``: a search that follows
``next`` links verbatim and records what each page looked like (sizes, ``Bundle.total``,
link lengths, warnings), and a hook that counts the media types of the server's replies."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from fhir_adapters.fhir.client import FhirClient
from clm_stratify.interop.run_data import ref_of

#: a ``next`` link longer than this is reported as a long continuation token.
LONG_LINK_CHARS = 1000
FHIR_JSON = "application/fhir+json"


# --------------------------------------------------------------------------- recording replies

class ReplyRecorder:
    """Counts the media types of the server's replies (a ``requests`` response hook).

    >>> rec = ReplyRecorder(FhirClient("http://127.0.0.1:1/fhir"))   # doctest: +SKIP
    >>> rec.media_types                                             # doctest: +SKIP
    Counter({'application/fhir+json': 212, 'application/json': 3})
    """

    def __init__(self, client: FhirClient):
        self.client = client
        self.media_types: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self._lock = threading.Lock()
        client.session.hooks.setdefault("response", []).append(self._hook)

    def _hook(self, resp: Any, *args: Any, **kwargs: Any) -> Any:
        if resp.content:
            mime = resp.headers.get("Content-Type", "").split(";")[0].strip().lower() or "(none)"
            with self._lock:
                self.media_types[mime] += 1
                path = resp.request.path_url.split("?")[0] if resp.request is not None else ""
                self.examples.setdefault(mime, f"{resp.request.method if resp.request else ''} {path}".strip())
        return resp

    def close(self) -> None:
        hooks = self.client.session.hooks.get("response", [])
        if self._hook in hooks:
            hooks.remove(self._hook)


# --------------------------------------------------------------------------- searching

@dataclass
class SearchPages:
    """What a search returned, page by page (bounded)."""

    resources: list[dict] = field(default_factory=list)
    pages: int = 0
    page_sizes: list[int] = field(default_factory=list)
    totals: list[int | None] = field(default_factory=list)
    has_next: list[bool] = field(default_factory=list)      # per page: did it carry a next link?
    next_link_lengths: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def ids(self) -> list[str]:
        return [ref_of(r) for r in self.resources]

    @property
    def total(self) -> int | None:
        """``Bundle.total`` of the first page (None when absent)."""
        return self.totals[0] if self.totals else None

    def cut_short(self) -> tuple[int, int] | None:
        """(page number, resources received so far) of the first page that had no ``next``
        link although more followed: ``Bundle.total`` said more exist (or the page was full),
        and the client went on with ``_offset``; or, on the last page, ``Bundle.total`` says
        more exist than came back. None when the server paged properly."""
        received = 0
        for i, (size, nxt) in enumerate(zip(self.page_sizes, self.has_next)):
            received += size
            if nxt:
                continue
            if i + 1 < self.pages or (isinstance(self.total, int) and received < self.total):
                return i + 1, received
        return None


def search_pages(client: FhirClient, rtype: str, params: Mapping[str, str], *, max_pages: int = 100,
                 strict: bool = False, complete: bool = True) -> SearchPages:
    """Run a search following ``next`` links verbatim, recording what each page looked like.

    ``complete`` (default) is how the project searches: a page without a ``next`` link
    that leaves results out is followed by ``_offset`` pages, or the search raises
    :class:`~fhir_adapters.fhir.errors.FhirTruncated`; ``complete=False`` takes exactly
    what the server sent."""
    out = SearchPages()
    pages = client.search_pages(rtype, dict(params), strict=strict, complete=complete)
    try:
        for bundle in pages:
            out.pages += 1
            entries = [e for e in bundle.get("entry") or []
                       if (e.get("search") or {}).get("mode") != "outcome" and isinstance(e.get("resource"), dict)]
            out.resources += [e["resource"] for e in entries]
            out.page_sizes.append(len(entries))
            total = bundle.get("total")
            out.totals.append(total if isinstance(total, int) and not isinstance(total, bool) else None)
            nxt = next((link.get("url") for link in bundle.get("link") or []
                        if link.get("relation") == "next" and link.get("url")), None)
            out.has_next.append(bool(nxt))
            if nxt:
                out.next_link_lengths.append(len(nxt))
            if out.pages >= max_pages:     # a bound (next links, or the client's _offset pages)
                out.truncated = bool(nxt) or (isinstance(out.total, int) and len(out.resources) < out.total)
                break
    finally:
        pages.close()
    out.warnings = list(client.last_search_warnings)
    return out
