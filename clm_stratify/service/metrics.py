"""Prometheus metrics of the receiver (``GET /metrics``, prometheus_client).

Counters since the process started, and gauges read from the inbox at scrape time (so
a restarted receiver reports the real queue, not zero):

* ``clm_notifications_received_total{style,kind}``: notifications stored (answered 200);
* ``clm_notifications_rejected_total{status}``: requests refused (4xx, and 503 when the
  inbox could not store them);
* ``clm_evaluations_total{action,group}``: evaluations finished (action created, updated,
  unchanged, no-recurrence, failed; group resectable, borderline, unresectable,
  indeterminate, or none);
* ``clm_dead_lettered_total{kind}``: items this process moved to the dead letters;
* ``clm_notification_to_write_seconds``: from the earliest notification an evaluation
  answers to the end of its write-back (histogram);
* ``clm_queue_depth{queue}``: notifications waiting to be resolved, patients pending and
  running; ``clm_dead_letters{kind}``: dead letters in the inbox now;
* ``clm_fhir_server_up``: 1 when the last probe reached the FHIR server (0 unreachable,
  absent before the first probe); ``clm_worker_consecutive_failures{kind}``.

Each receiver has its own registry (no global state: several apps in one test process).
"""

from __future__ import annotations

import sqlite3

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _InboxGauges:
    """Gauges computed from the inbox and the health state when scraped."""

    def __init__(self, inbox, health):
        self.inbox = inbox
        self.health = health

    def collect(self):
        try:
            depth = self.inbox.depth()
        except sqlite3.Error:
            depth = None
        if depth is not None:
            queue = GaugeMetricFamily("clm_queue_depth", "Items waiting in the receiver's inbox", labels=["queue"])
            queue.add_metric(["notifications"], depth.get("notifications_new", 0))
            queue.add_metric(["work_pending"], depth.get("work_pending", 0))
            queue.add_metric(["work_running"], depth.get("work_running", 0))
            yield queue
            dead = GaugeMetricFamily("clm_dead_letters", "Dead letters in the inbox", labels=["kind"])
            dead.add_metric(["patient"], depth.get("work_dead", 0))
            dead.add_metric(["notification"], depth.get("notifications_dead", 0))
            yield dead
        reachable = self.health.fhir.get("reachable")
        if reachable is not None:
            yield GaugeMetricFamily("clm_fhir_server_up", "1 when the last probe reached the FHIR server",
                                    value=1 if reachable else 0)
        failing = GaugeMetricFamily("clm_worker_consecutive_failures", "Failures in a row", labels=["kind"])
        for kind, n in dict(self.health.consecutive).items():
            failing.add_metric([kind], n)
        yield failing


class Metrics:
    def __init__(self, inbox, health):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("clm_notifications_received", "Notifications stored (answered 200)",
                                ["style", "kind"], registry=r)
        self.rejected = Counter("clm_notifications_rejected", "Notification requests refused", ["status"],
                                registry=r)
        self.evaluations = Counter("clm_evaluations", "Evaluations finished", ["action", "group"], registry=r)
        self.dead_lettered = Counter("clm_dead_lettered", "Items moved to the dead letters by this process",
                                     ["kind"], registry=r)
        self.latency = Histogram("clm_notification_to_write_seconds",
                                 "From the earliest notification an evaluation answers to the end of its write "
                                 "(action created or updated) or to the check that found the assessment "
                                 "current (unchanged, no-recurrence)",
                                 ["action"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(_InboxGauges(inbox, health))

    def evaluation(self, action: str, group: str | None, latency: float | None = None) -> None:
        self.evaluations.labels(action=action, group=group or "none").inc()
        if latency is not None and latency >= 0:
            self.latency.labels(action=action).observe(latency)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
