"""Measuring for the benchmark: a process's memory and CPU from /proc, a wrk load (bench/load.lua), a row of rounds.

A load runs for a time (`wrk(url, connections, seconds)`) or until `limit` requests were answered (then wrk is
stopped as soon as load.lua says so, and the rate is counted over those requests alone).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

BENCH = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Sampler:
    """Peak RSS and CPU of one process while a load runs (read from /proc every 100 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Sampler:
        self._cpu0, self._t0 = cpu_seconds(self.pid), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_used = cpu_seconds(self.pid) - self._cpu0
        self.cpu_cores = self.cpu_used / (time.monotonic() - self._t0)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.pid))
            except FileNotFoundError:  # the process ended (a restart under watch): the next one is another Sampler
                return


def rss_mb(pid: int) -> float:
    """Resident set size now, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size since it started (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def kafka_count(bootstrap: str, topic: str) -> int:
    """Records in `topic` (the sum of its partitions' end offsets)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(partitions).values())
    finally:
        consumer.close()


@dataclass
class Load:
    """What one wrk run measured."""

    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    reads: int = 0  # status and list reads issued (mixed load)
    status_p99_ms: float | None = None  # of the status reads alone (mixed load)
    list_p99_ms: float | None = None  # of the list reads alone (mixed load with lists)

    @property
    def ok(self) -> int:
        """Requests answered 2xx."""
        return self.requests - self.non2xx

    @property
    def rate(self) -> float:
        """2xx requests per second."""
        return self.ok / self.seconds


def wrk(url: str, connections: int, seconds: float, mode: str = "single", limit: int = 0, **env: str) -> Load:
    """Run wrk with bench/load.lua against `url` and read its BENCH line; with `limit`, only until that many
    requests were answered (`seconds` is then the most it may take)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(BENCH / "load.lua"), url]  # fmt: skip
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_RUN": uuid.uuid4().hex[:8], "BENCH_LIMIT": str(limit), **env}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        timer = threading.Timer(seconds + 120, process.kill)
        timer.start()
        lines = []
        try:
            for line in process.stdout:
                lines.append(line)
                if line.startswith("LIMIT"):  # load.lua saw the last answer it was waiting for: stop now
                    process.send_signal(signal.SIGINT)
            stderr = process.stderr.read()
        finally:
            timer.cancel()
    line = next((x for x in lines if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {''.join(lines)}\n{stderr}")
    raw = json.loads(line[6:])
    return Load(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        non2xx=raw["non2xx"],
        socket_errors=raw["socket_errors"] + raw["timeouts"],
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000,
        reads=raw["reads"],
        status_p99_ms=raw["status_p99_us"] / 1000 if raw["status_reads"] else None,
        list_p99_ms=raw["list_p99_us"] / 1000 if raw["list_reads"] else None,
    )


@dataclass
class Row:
    """One line of the results table: a target under one load, over every round (lists in round order)."""

    target: str
    load: str
    connections: int | None
    per_request: int = 1  # commands per request (batch)
    rates: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    p999: list[float] = field(default_factory=list)
    non2xx: list[int] = field(default_factory=list)
    read_shares: list[float] = field(default_factory=list)  # of the 2xx answers, the share that were reads
    status_p99: list[float] = field(default_factory=list)  # mixed load: the status reads' own p99, ms
    list_p99: list[float] = field(default_factory=list)  # mixed load with lists: the list reads' own p99, ms
    rss: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    cpu_per_command: list[float] = field(default_factory=list)  # µs of CPU (all threads) per command
    checks: list[str] = field(default_factory=list)

    def add(self, load: Load, sampler: Sampler | None, check: str) -> None:
        """Record one round."""
        self.rates.append(load.rate)
        self.p50.append(load.p50_ms)
        self.p99.append(load.p99_ms)
        self.p999.append(load.p999_ms)
        self.non2xx.append(load.non2xx + load.socket_errors)
        self.read_shares.append(load.reads / load.ok if load.ok else 0.0)
        if load.status_p99_ms is not None:
            self.status_p99.append(load.status_p99_ms)
        if load.list_p99_ms is not None:
            self.list_p99.append(load.list_p99_ms)
        if sampler is not None:
            self.rss.append(sampler.peak_rss_mb)
            self.cpu.append(sampler.cpu_cores)
            commands = (load.ok - load.reads) * self.per_request
            if commands:
                self.cpu_per_command.append(sampler.cpu_used / commands * 1e6)
        self.checks.append(check)

    @property
    def rate(self) -> float:
        """Median requests/s."""
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def commands(self) -> float:
        """Median commands/s (reads, in a mixed load, are not commands)."""
        return self.rate * self.per_request * (1 - (median(self.read_shares) or 0.0))

    def round_commands(self) -> list[float]:
        """Commands/s of each round."""
        shares = self.read_shares or [0.0] * len(self.rates)
        return [rate * self.per_request * (1 - share) for rate, share in zip(self.rates, shares, strict=False)]


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None
