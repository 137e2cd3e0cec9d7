"""The outage scenario: a long Kafka outage with the service taking commands all along, then a restart, then Kafka
back and the backlog drained, and the topic read back.

On a broker of its own (it is stopped and started), with the service in its benchmark configuration:
  1. Kafka stopped; once the service says so (/ready), `count` commands (Prefer: respond-async, 64 connections,
     wrk) are accepted: the accept rate;
  2. the service stopped (SIGTERM) and started again on the same journal: the time from the new process to /ready
     answering 200 with that backlog;
  3. Kafka started again (once it answers): the drain rate, from the first command that leaves the backlog to the
     last (how long the service took to reconnect is reported beside it);
  4. the topic read back to its end: every command the journal accepted is there exactly once, and each device's
     commands are in the journal's order (acceptance, `seq`).
The service's peak RSS is each process's own high-water mark (VmHWM), so nothing between two samples is missed.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import httpx
from helpers import KEYS, ServiceProcess, new_topic, read_to_end
from kafka_local import LocalKafka
from measure import peak_rss_mb, wrk
from targets import service_env

API_KEY = KEYS["writer"][0]


class Run(Protocol):
    """What the scenario needs from the run."""

    log_dir: Path
    python: str
    extra: dict[str, list[float]]
    notes: dict[str, list[str]]


def _ready_body(url: str) -> dict | None:
    try:
        answer = httpx.get(url + "/ready", timeout=2)
    except httpx.TransportError:
        return None
    return {"status": answer.status_code, **answer.json()}


def _wait(url: str, predicate, timeout: float, interval: float = 0.02) -> tuple[float, dict]:
    """Poll /ready until `predicate(body)`; (seconds it took, that body)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        body = _ready_body(url)
        if body is not None and predicate(body):
            return time.monotonic() - started, body
        time.sleep(interval)
    raise RuntimeError(f"/ready of {url} not as expected within {timeout:g} s: {_ready_body(url)}")


def journal_order(path: Path) -> list[tuple[str, str]]:
    """(request_id, device_id) of every command in the journal at `path`, in acceptance order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT request_id, device_id FROM commands ORDER BY seq").fetchall()
    finally:
        conn.close()


def delivery_problems(accepted: Iterable[tuple[str, str]], published: Iterable[tuple[str, str]]) -> list[str]:
    """What is wrong with the topic (`published`: (device_id, request_id) in partition and offset order) against
    the journal (`accepted`: (request_id, device_id) in acceptance order): commands missing, twice, unknown, or a
    device's commands (those there, first copies) out of their acceptance order. Empty when every command is there
    once, in order."""
    expected: dict[str, list[str]] = defaultdict(list)
    for request_id, device in accepted:
        expected[device].append(request_id)
    found: dict[str, list[str]] = defaultdict(list)
    for device, request_id in published:
        found[device].append(request_id)
    wanted = {request_id for ids in expected.values() for request_id in ids}
    counts = Counter(request_id for ids in found.values() for request_id in ids)
    problems = []
    if missing := wanted - counts.keys():
        problems.append(f"{len(missing)} accepted but not in Kafka (e.g. {min(missing)})")
    if twice := [request_id for request_id, n in counts.items() if n > 1]:
        problems.append(f"{len(twice)} in Kafka more than once (e.g. {min(twice)})")
    if unknown := counts.keys() - wanted:
        problems.append(f"{len(unknown)} in Kafka that the journal never accepted (e.g. {min(unknown)})")
    disordered = []
    for device, ids in found.items():
        seen = list(dict.fromkeys(request_id for request_id in ids if request_id in wanted))  # first copies
        present = set(seen)
        if seen != [request_id for request_id in expected.get(device, []) if request_id in present]:
            disordered.append(device)
    if disordered:
        problems.append(f"{len(disordered)} devices out of acceptance order (e.g. {min(disordered)})")
    return problems


def outage(run: Run, count: int) -> None:
    """One round of the scenario; its figures go into run.extra (outage_*), its findings into run.notes."""
    broker = LocalKafka(run.log_dir / f"kafka-outage-{uuid.uuid4().hex[:8]}").start()
    journal = run.log_dir / f"outage-{uuid.uuid4().hex[:8]}.db"
    service: ServiceProcess | None = None
    try:
        topic = new_topic(broker.bootstrap)
        # The backlog may hold the whole outage and a little more; the default (100,000) is the scenario's count.
        env = service_env(broker.bootstrap, topic, run.log_dir) | {
            "JOURNAL_PATH": str(journal),
            "JOURNAL_MAX_PENDING": str(count + count // 10),
        }
        service = ServiceProcess(run.log_dir, run.python, **env).start()
        broker.stop()
        _wait(service.url, lambda body: not body["kafka_connected"], timeout=120)
        load = wrk(service.url, 64, 1800, limit=count, BENCH_API_KEY=API_KEY, BENCH_PREFER="respond-async")
        _, body = _wait(service.url, lambda body: True, timeout=10)
        backlog = body["backlog"]
        peak_accepting = peak_rss_mb(service.process.pid)
        service.stop()

        service = ServiceProcess(run.log_dir, run.python, **env)
        started = time.monotonic()
        service.start(wait_ready=False)
        _wait(service.url, lambda body: body["status"] == 200, timeout=60)
        ready = time.monotonic() - started

        broker.start()
        waited, body = _wait(service.url, lambda body: body["backlog"] < backlog, timeout=300, interval=0.01)
        drained, _ = _wait(service.url, lambda body: body["backlog"] == 0, timeout=1800, interval=0.05)
        peak_restarted = peak_rss_mb(service.process.pid)
        service.stop()
        service = None
        records = read_to_end(broker.bootstrap, topic, timeout=600)
        published = [(r.key.decode(), json.loads(r.value)["request_id"]) for r in records]
        problems = delivery_problems(journal_order(journal), published)
        if load.ok != count or backlog != count:
            problems.insert(0, f"{load.ok:,} of {count:,} answered 2xx, backlog {backlog:,}")
    finally:
        if service is not None:
            service.stop()
        broker.stop()
    run.extra["outage_accept_rate"].append(load.rate)
    run.extra["outage_ready"].append(ready)
    run.extra["outage_drain_rate"].append(body["backlog"] / drained if drained else 0.0)
    run.extra["outage_reconnect"].append(waited)
    run.extra["outage_drain_seconds"].append(waited + drained)
    run.extra["outage_peak_rss"].append(max(peak_accepting, peak_restarted))
    run.extra["outage_peak_rss_accepting"].append(peak_accepting)
    run.extra["outage_peak_rss_restarted"].append(peak_restarted)
    run.extra["outage_delivered"].append(0.0 if problems else 1.0)
    run.notes["outage"].extend(problems)
