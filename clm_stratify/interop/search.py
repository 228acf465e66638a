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
    next_link_lengths: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def ids(self) -> list[str]:
        return [ref_of(r) for r in self.resources]


def search_pages(client: FhirClient, rtype: str, params: Mapping[str, str], *, max_pages: int = 100,
                 strict: bool = False) -> SearchPages:
    """Run a search following ``next`` links verbatim, recording what each page looked like."""
    out = SearchPages()
    pages = client.search_pages(rtype, dict(params), strict=strict)
    try:
        for bundle in pages:
            out.pages += 1
            entries = [e for e in bundle.get("entry") or []
                       if (e.get("search") or {}).get("mode") != "outcome" and isinstance(e.get("resource"), dict)]
            out.resources += [e["resource"] for e in entries]
            out.page_sizes.append(len(entries))
            out.totals.append(bundle.get("total"))
            nxt = next((link.get("url") for link in bundle.get("link") or []
                        if link.get("relation") == "next" and link.get("url")), None)
            if nxt:
                out.next_link_lengths.append(len(nxt))
            if out.pages >= max_pages and nxt:
                out.truncated = True
                break
    finally:
        pages.close()
    out.warnings = list(client.last_search_warnings)
    return out
