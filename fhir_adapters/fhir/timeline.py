"""FHIR dates and dateTimes as spans of the UTC timeline.

A dateTime with a time (FHIR requires its timezone) is an instant; a date is that
calendar day; a month or a year is the whole month or year. Dates without a time have
no timezone in FHIR and are read as days of the UTC calendar. Comparing spans, not
local calendar dates, keeps one examination written in two timezones one instant.

    >>> a = When.of(dt.datetime(2023, 5, 20, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))))
    >>> b = When.of(dt.datetime(2023, 5, 21, 4, 30, tzinfo=dt.timezone.utc))
    >>> a == b, a.key
    (True, '2023-05-21T04:30:00+00:00')
    >>> When.of("2024-02").end.date(), When.of("2024-02").fine
    (datetime.date(2024, 3, 1), False)
    >>> When.of(dt.date(2023, 3, 10)).relation(When.of(dt.date(2023, 3, 10)))   # same day: not after
    'before'
    >>> When.of("2023-03").relation(When.of(dt.date(2023, 3, 10)))
    'uncertain'
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

UTC = dt.timezone.utc


_TEXT_FORMATS = {"instant": "%Y-%m-%dT%H:%M:%SZ", "day": "%Y-%m-%d", "month": "%Y-%m", "year": "%Y"}


@dataclass(frozen=True)
class When:
    """A span [start, end) of the UTC timeline; an instant has start == end."""

    start: dt.datetime
    end: dt.datetime
    precision: Literal["instant", "day", "month", "year"]

    @classmethod
    def of(cls, value: Any) -> "When | None":
        """The span of a FHIR date/dateTime/instant value as fhir.resources gives it
        (aware datetime, date, or a partial date string); None when it is no date."""
        try:
            return cls._of(value)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00: before the UTC calendar starts
            return None

    @classmethod
    def _of(cls, value: Any) -> "When | None":
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:  # not valid FHIR; read as UTC rather than drop it
                value = value.replace(tzinfo=UTC)
            t = value.astimezone(UTC)
            return cls(t, t, "instant")
        if isinstance(value, dt.date):
            start = dt.datetime(value.year, value.month, value.day, tzinfo=UTC)
            return cls(start, start + dt.timedelta(days=1), "day")
        text = str(value)
        try:
            if len(text) == 4:
                y = int(text)
                return cls(dt.datetime(y, 1, 1, tzinfo=UTC), dt.datetime(y + 1, 1, 1, tzinfo=UTC), "year")
            if len(text) == 7:
                y, m = int(text[:4]), int(text[5:7])
                start = dt.datetime(y, m, 1, tzinfo=UTC)
                end = dt.datetime(y + m // 12, m % 12 + 1, 1, tzinfo=UTC)
                return cls(start, end, "month")
            if len(text) == 10:
                return cls._of(dt.date.fromisoformat(text))
            return cls._of(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            return None

    @classmethod
    def of_element(cls, resource: Any, *fields: str) -> "When | None":
        """The span of the first of ``fields`` present (a Period gives its start, or its
        end when it has no start)."""
        for name in fields:
            value = getattr(resource, name, None)
            if value is None:
                continue
            if name.endswith("Period"):
                value = value.start or value.end
            return cls.of(value)
        return None

    @property
    def fine(self) -> bool:
        """Precise to the day or better."""
        return self.precision in ("instant", "day")

    @property
    def key(self) -> str:
        """A study key for measurements that name no study: the instant in UTC, or the day."""
        if self.precision == "instant":
            return self.start.isoformat()
        return f"{self.precision}:{self.start.date().isoformat()}"

    @property
    def text(self) -> str:
        return self.start.strftime(_TEXT_FORMATS[self.precision])

    def after(self, other: "When") -> bool:
        """Certainly later than ``other`` (a day is not after an instant of that day)."""
        return self.start >= other.end and self.start > other.start

    def relation(self, boundary: "When") -> Literal["after", "before", "uncertain"]:
        """Where this span lies against a boundary event (the reference resection):
        ``after`` it, ``before`` it (or on its day), or ``uncertain`` (a month or year
        that straddles it)."""
        if self.after(boundary):
            return "after"
        if self.fine and boundary.fine:
            return "before"
        if self.end <= boundary.end:
            return "before"
        return "uncertain"

    def near(self, other: "When", tolerance: dt.timedelta) -> bool:
        """Overlapping, or no further apart than ``tolerance``."""
        try:
            return self.start - tolerance <= other.end and other.start - tolerance <= self.end
        except OverflowError:  # at the first days of the calendar
            return self.start <= other.end and other.start <= self.end

    def union(self, other: "When") -> "When":
        """The span covering both (named by the earlier one's precision)."""
        first = min(self, other, key=When.sort_key)
        return When(first.start, max(self.end, other.end), first.precision)

    def sort_key(self) -> tuple[dt.datetime, dt.datetime]:
        return (self.start, self.end)
