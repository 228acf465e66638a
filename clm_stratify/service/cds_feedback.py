"""CDS Hooks 2.0 feedback (``POST /cds-services/{id}/feedback``): what the clinician did
with a card, checked against the spec and counted.

The body is ``{"feedback": [Feedback, ...]}``; each Feedback has ``card`` (the card's
``uuid``), ``outcome`` ``accepted`` or ``overridden``, ``acceptedSuggestions``
(``[{"id": ...}]``), an optional ``overrideReason`` (``reason`` a Coding, ``userComment``
text) and ``outcomeTimestamp`` (RFC 3339 in UTC). The spec requires
``acceptedSuggestions`` for ``accepted``, but our cards have no suggestions: ``accepted``
is taken with it, without it or with it empty (the card accepted as a whole). A body
that is not that is a 400 naming what is wrong. Nothing is stored and only counts are logged
(a user comment or a card id is never written to the log): the service has nothing to
learn from a card's fate, but a CDS client that sends feedback must get its 200.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from clm_stratify.service.cds_prefetch import CdsError

# RFC 3339 section 5.6 date-time, in UTC ("Z" or +00:00), as the spec asks.
_UTC_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]00:00)")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)   # the spec allows extensions


class Coding(_Open):
    code: StrictStr
    system: StrictStr | None = None
    display: StrictStr | None = None


class OverrideReason(_Open):
    reason: Coding | None = None
    userComment: StrictStr | None = None


class AcceptedSuggestion(_Open):
    id: StrictStr


class Feedback(_Open):
    card: StrictStr = Field(min_length=1)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: StrictStr

    @model_validator(mode="after")
    def _utc_timestamp(self) -> "Feedback":
        if not _UTC_TIME.fullmatch(self.outcomeTimestamp):
            raise ValueError(f"outcomeTimestamp {self.outcomeTimestamp!r} is not an RFC 3339 date-time in UTC")
        return self


class FeedbackRequest(_Open):
    feedback: list[Feedback]


def parse_feedback(body: Any) -> FeedbackRequest:
    """The feedback body, checked; :class:`CdsError` 400 naming the first problems."""
    if not isinstance(body, dict):
        raise CdsError(400, "the feedback body is not a JSON object")
    try:
        return FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise CdsError(400, f"not CDS Hooks feedback: {problems}") from None


def counts(req: FeedbackRequest) -> str:
    """``2 accepted, 1 overridden (1 with a reason)``: what may be logged."""
    by = Counter(f.outcome for f in req.feedback)
    reasons = sum(1 for f in req.feedback if f.overrideReason is not None)
    text = ", ".join(f"{by[o]} {o}" for o in ("accepted", "overridden") if by[o])
    return text + (f" ({reasons} with a reason)" if reasons else "")
