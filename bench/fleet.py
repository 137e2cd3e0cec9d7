"""The fleet scenario: commands to a great many distinct devices, to show that nothing the service keeps per device
grows without bound in memory.

One service in its benchmark configuration; wrk sends batches of 100 (16 connections) in chunks of a tenth of the
fleet, each chunk until its last batch is answered, and the service's RSS is read once the chunk is published
(backlog 0) and has settled:
  1. two chunks over the 1,000 devices every other row uses: the baseline, once the allocator has reached the
     high-water mark that this volume of commands gives;
  2. ten chunks over `devices` distinct new device ids, each chunk new ids: the RSS after each.
The growth is the RSS after the last chunk over the baseline's; something kept per device would add ~100 bytes or
more for each of them (100 MB or more for a million), so a growth within noise (a few MB) says there is none.
"""

from __future__ import annotations

import time
from typing import Protocol

from helpers import KEYS, ServiceProcess, new_topic
from measure import kafka_count, rss_mb, wrk
from targets import service_env

API_KEY = KEYS["writer"][0]
BATCH = 100


class Run(Protocol):
    """What the scenario needs from the run."""

    bootstrap: str
    log_dir: object
    python: str
    extra: dict[str, list[float]]
    notes: dict[str, list[str]]


def fleet(run: Run, devices: int) -> None:
    """One round of the scenario; its figures go into run.extra (fleet_*)."""
    topic = new_topic(run.bootstrap)
    service = ServiceProcess(run.log_dir, run.python, **service_env(run.bootstrap, topic, run.log_dir)).start()
    chunk = max(devices // 10, BATCH)
    sent = answered = 0
    rss: list[float] = []
    started = time.monotonic()

    def one_chunk(fleet_size: int, offset: int) -> None:
        nonlocal sent, answered
        load = wrk(service.url, 16, 1800, "batch", limit=chunk // BATCH, BENCH_API_KEY=API_KEY,
                   BENCH_DEVICES=str(fleet_size), BENCH_DEVICE_OFFSET=str(offset))  # fmt: skip
        sent += chunk
        answered += load.ok * BATCH
        service.wait_drained(timeout=600)
        time.sleep(1)
        rss.append(rss_mb(service.process.pid))

    try:
        for _ in range(2):
            one_chunk(1000, 0)
        for offset in range(0, devices, chunk):
            one_chunk(devices, offset)
        seconds = time.monotonic() - started
    finally:
        service.stop()
    if (published := kafka_count(run.bootstrap, topic)) != answered or answered != sent:
        run.notes["fleet"].append(f"{sent:,} sent, {answered:,} answered 2xx, {published:,} in Kafka")
    run.extra["fleet_rss_baseline"].append(rss[1])
    run.extra["fleet_rss_first"].append(rss[2])
    run.extra["fleet_rss_last"].append(rss[-1])
    run.extra["fleet_rss_growth"].append(rss[-1] - rss[1])
    run.extra["fleet_rate"].append(sent / seconds)
    run.notes["fleet_rss"].append(" → ".join(f"{value:.0f}" for value in rss))
