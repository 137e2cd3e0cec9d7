"""Prometheus metrics: one registry per app, read by /metrics (text format) and /api/v1/metrics (JSON)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def build_commit(root: Path | None = None) -> str:
    """The git commit this tree was built from: BUILD_COMMIT, else .git/HEAD when present, else 'unknown'."""
    root = root or Path(__file__).resolve().parent
    if os.environ.get("BUILD_COMMIT"):
        return os.environ["BUILD_COMMIT"]
    try:
        head = (root / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            return (root / ".git" / head[5:]).read_text().strip()[:12]
        return head[:12]
    except OSError:
        return "unknown"


class Metrics:
    """Every figure the service reports, as Prometheus collectors in a registry of its own."""

    def __init__(self, version: str) -> None:
        self.registry = r = CollectorRegistry()
        # The process's own figures, as every Prometheus client reports them: python_gc_* (collections by
        # generation) and process_* (resident memory, CPU seconds, open files).
        GCCollector(registry=r)
        ProcessCollector(registry=r)
        self.requests = Counter(
            "pusher_http_requests", "HTTP requests by route template, method and status", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "pusher_http_request_duration_seconds", "HTTP request duration", ["route", "method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.commands = Counter(
            "pusher_commands", "Commands by outcome: accepted, published, expired, failed, replayed, rejected",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "pusher_command_failures", "Commands not stored or not published, by reason", ["reason"], registry=r
        )
        self.publish_latency = Histogram(
            "pusher_publish_latency_seconds", "From acceptance over HTTP to Kafka's acknowledgement",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.backlog = Gauge(
            "pusher_journal_backlog", "Commands journaled and not yet acknowledged by Kafka", registry=r
        )
        self.oldest_pending = Gauge(
            "pusher_journal_oldest_pending_age_seconds", "Age of the oldest command waiting for Kafka", registry=r
        )
        self.kafka_connected = Gauge("pusher_kafka_connected", "1 while Kafka is reachable, else 0", registry=r)
        self.in_flight = Gauge("pusher_producer_in_flight", "Records handed to the producer, not yet acknowledged",
                               registry=r)  # fmt: skip
        status_events = Counter(
            "pusher_status_events", "Status topic events: published by this instance (out), applied (in), ignored "
            "(not valid per the contract)", ["direction"], registry=r,
        )  # fmt: skip
        self.status_events = {d: status_events.labels(d) for d in ("out", "in", "ignored")}
        self.http_in_flight = Gauge(
            "pusher_http_in_flight",
            "Requests being served, of LIMIT_CONCURRENCY (probes and waiters not counted)",
            registry=r,
        )
        self.waiters = Gauge("pusher_waiters", "Open long polls and event streams, of MAX_WAITERS", registry=r)
        self.status_outbox = Gauge(
            "pusher_status_outbox", "Status events written by this instance, not yet on the status topic", registry=r
        )
        self.journal_disk = Gauge(
            "pusher_journal_disk_bytes", "The journal's database file and WAL on disk, as last measured", registry=r
        )
        self.journal_disk_ceiling = Gauge(
            "pusher_journal_disk_ceiling_bytes", "JOURNAL_MAX_DISK, the most those may take (0: no ceiling)", registry=r
        )
        self._pruned: Callable[[], int] = lambda: 0
        r.register(
            _CounterOf(
                "pusher_journal_pruned_commands",
                "Finished commands deleted before JOURNAL_RETENTION to stay under JOURNAL_MAX_DISK",
                lambda: self._pruned(),
            )
        )
        # Every known series exists from the start at 0, so rate() and increase() see the first event.
        # Children bound once: labels() takes a lock and a lookup on every call, and these count every command.
        self.outcomes = {
            outcome: self.commands.labels(outcome)
            for outcome in (
                "accepted",
                "published",
                "expired",
                "failed",
                "cancelled",
                "superseded",
                "replayed",
                "rejected",
                "reconciled",
            )
        }
        self._http: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        for reason in ("kafka_rejected", "journal_full", "journal_unavailable"):
            self.failures.labels(reason)
        Info("pusher_build", "Version and git commit of this build", registry=r).info(
            {"version": version, "commit": build_commit()}
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its duration (route is the template, so the series stay few)."""
        children = self._http.get((route, method, status))
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.request_duration.labels(route, method))
            self._http[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(
        self,
        backlog: Callable[[], float],
        oldest_pending_created_at: Callable[[], float | None],
        kafka_connected: Callable[[], bool],
        in_flight: Callable[[], int],
        status_outbox: Callable[[], int] | None = None,
    ) -> None:
        """Gauges read at scrape time from the journal, the sink and the forwarder: each callable returns a figure
        its owner keeps in memory, since a scrape runs on the event loop (no SQL, no waiting)."""
        self.backlog.set_function(backlog)
        self.oldest_pending.set_function(lambda: max(0.0, time.time() - (oldest_pending_created_at() or time.time())))
        self.kafka_connected.set_function(lambda: 1.0 if kafka_connected() else 0.0)
        self.in_flight.set_function(in_flight)
        if status_outbox is not None:
            self.status_outbox.set_function(status_outbox)

    def watch_journal_disk(self, size: Callable[[], int], ceiling: int, pruned: Callable[[], int]) -> None:
        """The journal's size on disk and the finished commands pruned to keep it under its ceiling: figures the
        journal's writer keeps, read at scrape time."""
        self.journal_disk.set_function(size)
        self.journal_disk_ceiling.set(ceiling)
        self._pruned = pruned

    def watch_admission(self, in_flight: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Gauges of the request and waiter budgets, read at scrape time."""
        self.http_in_flight.set_function(in_flight)
        self.waiters.set_function(waiting)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has not been seen yet)."""
        return self.registry.get_sample_value(name, labels or None) or 0.0


class _CounterOf:
    """A counter whose count its owner keeps (prometheus_client's Counter only counts what it is told)."""

    def __init__(self, name: str, documentation: str, count: Callable[[], int]) -> None:
        self.name, self.documentation, self.count = name, documentation, count

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, value=self.count())]
