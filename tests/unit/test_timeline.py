"""FHIR dates on the UTC timeline (fhir_adapters/fhir/timeline.py)."""

from __future__ import annotations

import datetime as dt
import doctest

import pytest

from fhir_adapters.fhir import timeline
from fhir_adapters.fhir.timeline import When


def w(text: str) -> When:
    when = When.of(text if len(text) in (4, 7) else (dt.date.fromisoformat(text) if len(text) == 10
                                                      else dt.datetime.fromisoformat(text)))
    assert when is not None
    return when


def test_doctests():
    assert doctest.testmod(timeline).failed == 0


@pytest.mark.parametrize("a, b", [
    ("2023-05-20T23:30:00-05:00", "2023-05-21T04:30:00+00:00"),
    ("2024-01-01T00:00:00+14:00", "2023-12-31T10:00:00+00:00"),
    ("2024-01-01T00:00:00-12:00", "2024-01-01T12:00:00+00:00"),
])
def test_one_instant_in_any_timezone_is_equal(a, b):
    assert w(a) == w(b) and w(a).key == w(b).key


@pytest.mark.parametrize("value, boundary, where", [
    ("2023-03-11", "2023-03-10", "after"),
    ("2023-03-10", "2023-03-10", "before"),                        # same day as the resection
    ("2023-03-10T23:00:00+00:00", "2023-03-10", "before"),
    ("2023-03-11T00:00:00+00:00", "2023-03-10", "after"),
    ("2023-03-10T15:00:00+00:00", "2023-03-10T09:00:00+00:00", "after"),
    ("2023-03", "2023-03-10", "uncertain"),                        # a month that straddles it
    ("2023-02", "2023-03-10", "before"),
    ("2023-04", "2023-03-10", "after"),
    ("2023", "2023-03-10", "uncertain"),
])
def test_relation_to_the_resection(value, boundary, where):
    assert w(value).relation(w(boundary)) == where


def test_near_and_union():
    a, b = w("2024-05-01T10:00:00+00:00"), w("2024-05-01T10:40:00+00:00")
    assert a.near(b, dt.timedelta(minutes=60)) and not a.near(b, dt.timedelta(minutes=30))
    assert w("2024-05-01").near(a, dt.timedelta(0))
    u = a.union(b)
    assert (u.start, u.end) == (a.start, b.end)


def test_not_a_date():
    assert When.of("yesterday") is None and When.of(None) is None
