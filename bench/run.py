"""`make bench`: the service against its ceilings in one run, as ratios; writes bench/RESULTS.md, docs/development.md.

Targets, each started in turn on this machine against the same broker:
  noop     a Starlette route that only reads and decodes the body (the HTTP ceiling)
  raw      kafka-python producing the same JSON directly (the Kafka-client ceiling)
  floor    Starlette + msgspec + kafka-python answering 200 after Kafka's ack, with nothing else (no journal,
           keys, limits, metrics or logs): a bound on what any 200-after-ack service on this stack can reach
  service  this service as users run it: journal FULL, API keys and a generous rate limit on, metrics on
  prefilled  the same over a journal of --prefill finished commands (bench/prefill.py), single commands
           with 5 % status reads and 1 % list reads: what reads cost beside the writer on a full journal
  seed     the seed plan's FastAPI + pydantic app with `.get()` in the handler, and without it
Load comes from wrk in its own process (bench/load.lua), except the service's fan-out row: --fanouts fan-outs to
MAX_FANOUT devices one after the other from httpx, each timed from its POST until GET /api/v1/fanouts/{id} says done
(a few huge requests, which wrk is not made for). Every figure is the median of --runs rounds (the fan-out row's, of
every fan-out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import httpx  # noqa: E402
from helpers import KEYS, ServiceProcess, keys_file, new_topic  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402
from kafka_local import KAFKA_VERSION, LocalKafka, free_port, stop_process  # noqa: E402

from settings import Settings  # noqa: E402

API_KEY = KEYS["writer"][0]
FLOOR = "floor: Starlette + kafka-python, 200 after ack"
TARGETS = ("noop", "raw", "floor", "service", "prefilled", "multicore", "seed")
SINGLE = "pusher (200 after Kafka ack)"
PREFILLED_LOAD = "single + 5 % status, 1 % list reads"
SERVICE_ROWS = ("single-16", "single-64", "async", "batch", "mixed", "fanout")  # --rows chooses among them
FANOUT = Settings().max_fanout  # devices per fan-out: the most the service takes by default
FANOUT_LOAD = f"fan-out to {FANOUT:,} devices"
RUNTIME = ROOT / ".cache" / "bench-runtime"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def runtime_python() -> str:
    """An interpreter with only requirements.txt and the client package (whose wire types the service imports)
    installed, as the image has them: the development tools (rich, pygments, …) would be imported by structlog
    and counted in the service's memory."""
    stamp = RUNTIME / "requirements.sha256"
    wanted = hashlib.sha256(
        (ROOT / "requirements.txt").read_bytes() + (ROOT / "client" / "pyproject.toml").read_bytes()
    ).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(RUNTIME)], check=True)
        pip = [str(RUNTIME / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)
        subprocess.run([*pip, "--no-deps", "-e", str(ROOT / "client")], check=True)
        stamp.write_text(wanted)
    return str(RUNTIME / "bin" / "python")


# ---------------------------------------------------------------- measuring a process


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
        self.cpu_cores = (cpu_seconds(self.pid) - self._cpu0) / (time.monotonic() - self._t0)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.pid))


def rss_mb(pid: int) -> float:
    """Resident set size now, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
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


# ---------------------------------------------------------------- load


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
    reads: int = 0  # status reads issued (mixed load)

    @property
    def ok(self) -> int:
        """Requests answered 2xx."""
        return self.requests - self.non2xx

    @property
    def rate(self) -> float:
        """2xx requests per second."""
        return self.ok / self.seconds


def wrk(url: str, connections: int, seconds: float, mode: str = "single", **env: str) -> Load:
    """Run wrk with bench/load.lua against `url` and read its BENCH line."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(BENCH / "load.lua"), url]  # fmt: skip
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_RUN": uuid.uuid4().hex[:8], **env}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 120)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {done.stdout}\n{done.stderr}")
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
    )


@dataclass
class Row:
    """One line of the results table: a target under one load, over every round."""

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
    rss: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def add(self, load: Load, sampler: Sampler | None, check: str) -> None:
        """Record one round."""
        self.rates.append(load.rate)
        self.p50.append(load.p50_ms)
        self.p99.append(load.p99_ms)
        self.p999.append(load.p999_ms)
        self.non2xx.append(load.non2xx + load.socket_errors)
        self.read_shares.append(load.reads / load.ok if load.ok else 0.0)
        if sampler is not None:
            self.rss.append(sampler.peak_rss_mb)
            self.cpu.append(sampler.cpu_cores)
        self.checks.append(check)

    @property
    def rate(self) -> float:
        """Median requests/s."""
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def commands(self) -> float:
        """Median commands/s (reads, in a mixed load, are not commands)."""
        return self.rate * self.per_request * (1 - (median(self.read_shares) or 0.0))


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- targets


class Uvicorn:
    """A reference app under uvicorn (uvloop, httptools, one worker), as the service runs."""

    def __init__(self, app: str, log_dir: Path, python: str = sys.executable, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [python, "-m", "uvicorn", app, "--app-dir", str(BENCH), "--port", str(self.port),
                   "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]  # fmt: skip
        with open(log_dir / f"{app.split(':')[0]}-{self.port}.log", "ab") as log:
            self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"{app} exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"{app} did not listen within 30 s")

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def stop(self) -> None:
        """Stop it."""
        stop_process(self.process)

    def __enter__(self) -> Uvicorn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def service_env(bootstrap: str, topic: str, log_dir: Path) -> dict[str, str]:
    """The default configuration the goals are set for: journal FULL, keys, a generous rate limit, metrics."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_COMMAND_TOPIC": topic,
        "JOURNAL_SYNC": "full",
        "API_KEYS_FILE": keys_file(log_dir / "keys.toml"),
        "RATE_LIMIT": "1000000/second",
        "METRICS_PUBLIC": "true",
    }


def settled(bootstrap: str, topic: str, timeout: float = 60.0) -> None:
    """Wait until `topic` stops growing (a reference app's warm-up requests still finishing)."""
    last, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = kafka_count(bootstrap, topic)
        if count == last:
            return
        last = count
        time.sleep(1)


def outcome_totals(url: str) -> dict[str, int]:
    """The service's own command counters by outcome (accepted, published, expired, failed, …)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r'^pusher_commands_total\{outcome="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {outcome: int(float(value)) for outcome, value in found}


def delivery_check(bootstrap: str, topic: str, before: int, service: ServiceProcess | None,
                   totals_before: dict[str, int], ok_commands: int, in_flight: int) -> str:  # fmt: skip
    """Kafka holds every 2xx command once: its count matches the service's own (exactly) and the client's 2xx
    (never fewer; a few more are requests the server finished after wrk stopped counting)."""
    if service is not None:
        service.wait_drained()
    added = kafka_count(bootstrap, topic) - before
    problems = []
    if service is not None:
        totals = outcome_totals(service.url)
        published = totals.get("published", 0) - totals_before.get("published", 0)
        accepted = totals.get("accepted", 0) - totals_before.get("accepted", 0)
        if added != published:
            problems.append(f"kafka {added} != service's published {published}")
        if accepted != added:  # every command the journal took (2xx) reached Kafka: none expired or failed
            problems.append(f"service accepted {accepted} but kafka got {added}")
    # Below the 2xx count would be a lost command; the upper slack covers requests (and, mixed, status reads)
    # still in flight when wrk stopped counting.
    if not ok_commands <= added <= ok_commands + 2 * in_flight:
        problems.append(f"kafka {added} vs 2xx commands {ok_commands} (+{in_flight} in flight)")
    return "ok" if not problems else "; ".join(problems)


# ---------------------------------------------------------------- the run


class Bench:
    """Every target in turn, `runs` rounds, on one broker."""

    def __init__(self, bootstrap: str, seconds: float, warmup: float, raw_count: int, log_dir: Path,
                 service_rows: tuple[str, ...] = SERVICE_ROWS, prefill: int = 1_000_000,
                 fanouts: int = 5) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.service_rows = service_rows
        self.prefill = prefill
        self.fanouts = fanouts
        self._prefilled: Path | None = None  # the filled journal, made once and copied for each round
        self.seconds = seconds
        self.warmup = warmup
        self.raw_count = raw_count
        self.log_dir = log_dir
        self.rows: dict[tuple[str, str, int | None], Row] = {}
        self.extra: dict[str, list[float]] = {"idle_rss": [], "start_to_ready": [], "fanout_rss_before": [],
                                              "fanout_rss_after": []}  # fmt: skip
        self.python = runtime_python()

    def row(self, target: str, load: str, connections: int | None, per_request: int = 1) -> Row:
        """The table row for this target and load."""
        key = (target, load, connections)
        return self.rows.setdefault(key, Row(target, load, connections, per_request))

    def measure(self, row: Row, url: str, pid: int, connections: int, mode: str = "single",
                service: ServiceProcess | None = None, topic: str | None = None, **env: str) -> None:  # fmt: skip
        """Warm up, then one timed wrk run with the server sampled and Kafka checked."""
        wrk(url, connections, self.warmup, mode, **env)
        if service is not None:
            service.wait_drained()
        elif topic is not None:
            settled(self.bootstrap, topic)
        before = kafka_count(self.bootstrap, topic) if topic else 0
        totals_before = outcome_totals(service.url) if service else {}
        with Sampler(pid) as sampler:
            load = wrk(url, connections, self.seconds, mode, **env)
        check = "—"
        if topic is not None:
            ok_commands = (load.ok - load.reads) * row.per_request
            check = delivery_check(self.bootstrap, topic, before, service, totals_before,
                                   ok_commands, connections * row.per_request)  # fmt: skip
        row.add(load, sampler, check)

    def fanout(self, row: Row, service: ServiceProcess, topic: str) -> None:
        """--fanouts fan-outs to FANOUT devices, one after the other: each timed from its POST until the service says
        it is done (every command published), with its 202 (all of them journaled) as the row's p50; RSS before and
        after, and Kafka checked."""
        body = json.dumps({"device_ids": [f"device_{i:05d}" for i in range(FANOUT)], "command_type": "config_update",
                           "payload": {"measurement_interval": 600}, "protocol": "mqtt"})  # fmt: skip
        pid = service.process.pid
        service.wait_drained()
        before, totals_before = kafka_count(self.bootstrap, topic), outcome_totals(service.url)
        self.extra["fanout_rss_before"].append(rss_mb(pid))
        headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
        accepted = refused = 0
        with httpx.Client(base_url=service.url, headers=headers, timeout=120) as client, Sampler(pid) as sampler:
            for _ in range(self.fanouts):
                started = time.monotonic()
                answer = client.post("/api/v1/commands/fanout", content=body)
                journaled = time.monotonic() - started
                if answer.status_code != 202:
                    refused += 1
                    continue
                accepted += 1
                while not client.get(answer.headers["Location"]).raise_for_status().json()["done"]:
                    if time.monotonic() - started > 600:
                        raise RuntimeError(f"fan-out {answer.json()['fanout_id']} not done within 600 s")
                    time.sleep(0.05)
                row.rates.append(1 / (time.monotonic() - started))
                row.p50.append(journaled * 1000)
        self.extra["fanout_rss_after"].append(rss_mb(pid))
        row.non2xx.append(refused)
        row.rss.append(sampler.peak_rss_mb)
        row.cpu.append(sampler.cpu_cores)
        row.checks.append(delivery_check(self.bootstrap, topic, before, service, totals_before, accepted * FANOUT, 0))

    def noop(self) -> None:
        """The HTTP ceiling at 16 and 64 connections."""
        with Uvicorn("noop_app:app", self.log_dir, self.python) as app:
            for connections in (16, 64):
                self.measure(self.row("no-op Starlette route", "single", connections), app.url, app.pid, connections)

    def raw(self) -> None:
        """The Kafka-client ceiling."""
        topic = new_topic(self.bootstrap)
        command = [self.python, str(BENCH / "raw_producer.py"), self.bootstrap, topic, str(self.raw_count)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        row = self.row("kafka-python producer, no HTTP", "producer", None)
        row.rates.append(figures["rate"])
        row.rss.append(figures["rss_mb"])
        row.cpu.append(figures["cpu"])
        count = kafka_count(self.bootstrap, topic)
        row.checks.append("ok" if count == self.raw_count + 1 else f"kafka {count} != {self.raw_count} + 1")

    def floor(self) -> None:
        """The floor for a 200 after Kafka's ack on this stack: Starlette + msgspec + kafka-python, nothing else."""
        topic = new_topic(self.bootstrap)
        with Uvicorn("floor_app:app", self.log_dir, self.python,
                     KAFKA_BOOTSTRAP_SERVERS=self.bootstrap, KAFKA_COMMAND_TOPIC=topic) as app:  # fmt: skip
            self.measure(self.row(FLOOR, "single", 64), app.url, app.pid, 64, topic=topic)
            self.measure(self.row(FLOOR, "batch of 100", 16, per_request=100), app.url, app.pid, 16, "batch",
                         topic=topic)  # fmt: skip

    def service(self) -> None:
        """This service: single at 16 and 64, respond-async, batch of 100, mixed reads, fan-outs (those of --rows);
        start and idle figures."""
        topic = new_topic(self.bootstrap)
        started = time.monotonic()
        env = service_env(self.bootstrap, topic, self.log_dir)
        service = ServiceProcess(self.log_dir, self.python, **env).start()
        self.extra["start_to_ready"].append(time.monotonic() - started)
        try:
            time.sleep(1)
            self.extra["idle_rss"].append(rss_mb(service.process.pid))
            pid, url = service.process.pid, service.url
            common = {"service": service, "topic": topic, "BENCH_API_KEY": API_KEY}
            for connections in (16, 64):
                if f"single-{connections}" in self.service_rows:
                    self.measure(self.row(SINGLE, "single", connections), url, pid, connections, **common)
            if "async" in self.service_rows:
                self.measure(self.row("pusher, Prefer: respond-async (202)", "single", 64), url, pid, 64,
                             BENCH_PREFER="respond-async", **common)  # fmt: skip
            if "batch" in self.service_rows:
                self.measure(self.row("pusher", "batch of 100", 16, per_request=100), url, pid, 16, "batch", **common)
            if "mixed" in self.service_rows:
                self.measure(self.row("pusher", "mixed, 5 % status reads", 64), url, pid, 64, "mixed", **common)
            if "fanout" in self.service_rows:
                self.fanout(self.row("pusher", FANOUT_LOAD, 1, per_request=FANOUT), service, topic)
        finally:
            service.stop()

    @property
    def prefilled_target(self) -> str:
        """The prefilled row's name."""
        return f"pusher over {self.prefill:,} finished commands"

    def prefilled(self) -> None:
        """This service over a journal of --prefill finished commands (the writer key's, over the 1,000 devices
        the load uses): single commands with 5 % status reads and 1 % reads of a device's list, 64 conns."""
        if self._prefilled is None:
            self._prefilled = self.log_dir / "prefilled-template.db"
            subprocess.run([self.python, str(BENCH / "prefill.py"), str(self._prefilled), "--count", str(self.prefill)],
                           check=True, timeout=1800)  # fmt: skip
        journal = self.log_dir / f"prefilled-{uuid.uuid4().hex[:8]}.db"
        shutil.copyfile(self._prefilled, journal)  # each round starts from the same file
        topic = new_topic(self.bootstrap)
        env = service_env(self.bootstrap, topic, self.log_dir) | {"JOURNAL_PATH": str(journal)}
        service = ServiceProcess(self.log_dir, self.python, **env).start()
        try:
            row = self.row(self.prefilled_target, PREFILLED_LOAD, 64)
            self.measure(row, service.url, service.process.pid, 64, "mixed", service=service, topic=topic,
                         BENCH_API_KEY=API_KEY, BENCH_LISTS="1")  # fmt: skip
        finally:
            service.stop()
            for leftover in self.log_dir.glob(f"{journal.name}*"):
                leftover.unlink()

    def multicore(self) -> None:
        """Two processes (one per core), each its own journal, 32 connections each: summed."""
        topic = new_topic(self.bootstrap)
        services = [
            ServiceProcess(self.log_dir, self.python, **service_env(self.bootstrap, topic, self.log_dir)).start()
            for _ in range(2)
        ]
        try:
            loads: list[Load] = []
            for service in services:
                wrk(service.url, 32, self.warmup, BENCH_API_KEY=API_KEY)
            threads = [
                threading.Thread(target=lambda s=s: loads.append(wrk(s.url, 32, self.seconds, BENCH_API_KEY=API_KEY)))
                for s in services
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            row = self.row("pusher, 2 processes (one per core)", "single", 64)
            row.rates.append(sum(x.rate for x in loads))
            row.p99.append(max(x.p99_ms for x in loads))
            row.p50.append(max(x.p50_ms for x in loads))
            row.non2xx.append(sum(x.non2xx + x.socket_errors for x in loads))
            row.checks.append("—")
        finally:
            for service in services:
                service.stop()

    def seed(self) -> None:
        """The seed plan's app, with `.get()` and without."""
        for fire_and_forget, label in (("0", "seed plan: FastAPI + .get()"), ("1", "seed plan without .get()")):
            topic = new_topic(self.bootstrap)
            env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "KAFKA_COMMAND_TOPIC": topic,
                   "SEED_FIRE_AND_FORGET": fire_and_forget}  # fmt: skip
            with Uvicorn("seed_app:app", self.log_dir, **env) as app:
                self.measure(self.row(label, "single", 64), app.url, app.pid, 64, topic=topic)


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _per_second(value: float) -> str:
    return _fmt(value, 2 if value < 10 else 0)  # a fan-out takes seconds: its requests/s need decimals


def report(bench: Bench, runs: int) -> str:
    """The markdown table, the goals and the run's facts."""
    rows = bench.rows
    noop = {c: rows[("no-op Starlette route", "single", c)].rate for c in (16, 64)}
    raw = rows[("kafka-python producer, no HTTP", "producer", None)].rate
    floor = rows[(FLOOR, "single", 64)]
    floor_batch = rows[(FLOOR, "batch of 100", 16)].commands
    batch = rows[("pusher", "batch of 100", 16)].commands
    lines = [
        "| target | load | conns | req/s | commands/s | ratio | p50 ms | p99 ms | p99.9 ms | non-2xx | peak RSS MB"
        " | CPU cores | Kafka count |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows.values():
        if row.load == "producer":
            ratio, against = 1.0, "producer"
        elif row.load.startswith("batch"):
            ratio, against = row.commands / raw, "producer"
        elif row.load == FANOUT_LOAD:
            ratio, against = row.commands / batch, "batch of 100"
        elif "2 processes" in row.target:
            ratio, against = row.rate / rows[(SINGLE, "single", 64)].rate, "1 process"
        else:
            ratio, against = row.rate / noop[row.connections or 64], "no-op"
        checks = sorted(set(row.checks))
        lines.append(
            f"| {row.target} | {row.load} | {row.connections or '—'} | {_per_second(row.rate)} "
            f"| {_fmt(row.commands)} "
            f"| {ratio:.3f}× {against} | {_fmt(median(row.p50), 1)} | {_fmt(median(row.p99), 1)} "
            f"| {_fmt(median(row.p999), 1)} | {_fmt(median(row.non2xx))} | {_fmt(median(row.rss))} "
            f"| {_fmt(median(row.cpu), 2)} | {', '.join(checks)} |"
        )
    single = rows[(SINGLE, "single", 64)]
    prefilled = rows[(bench.prefilled_target, PREFILLED_LOAD, 64)].rate
    seed_get = rows[("seed plan: FastAPI + .get()", "single", 64)].rate
    seed_ff = rows[("seed plan without .get()", "single", 64)].rate
    asynchronous = rows[("pusher, Prefer: respond-async (202)", "single", 64)].rate
    multi = rows[("pusher, 2 processes (one per core)", "single", 64)].rate
    idle, ready = median(bench.extra["idle_rss"]), median(bench.extra["start_to_ready"])
    goals = [
        ("single, 200 after ack, 64 conns ≥ 0.30× no-op", single.rate / noop[64], 0.30, "×"),
        ("its p99 ≤ 20 ms", median(single.p99) or 0, 20, "ms≤"),
        ("(the floor: Starlette + kafka-python alone ≥ 0.30× no-op)", floor.rate / noop[64], 0.30, "×"),
        ("(the floor's p99 ≤ 20 ms)", median(floor.p99) or 0, 20, "ms≤"),
        ("≥ 1.5× the seed plan without .get()", single.rate / seed_ff, 1.5, "×"),
        ("≥ 60× the seed plan as written", single.rate / seed_get, 60, "×"),
        ("batch of 100 ≥ 0.70× the raw producer", batch / raw, 0.70, "×"),
        ("(the floor's batch of 100 ≥ 0.70× the raw producer)", floor_batch / raw, 0.70, "×"),
        ("respond-async ≥ 0.40× no-op", asynchronous / noop[64], 0.40, "×"),
        ("idle RSS ≤ 50 MB", idle or 0, 50, "MB≤"),
        ("RSS under 64-connection load ≤ 100 MB", median(single.rss) or 0, 100, "MB≤"),
        ("start to /ready ≤ 1 s", ready or 0, 1, "s≤"),
        ("2 processes ≥ 1.6× one", multi / single.rate, 1.6, "×"),
        (f"reads over {bench.prefill:,} finished commands ≥ 0.90× single", prefilled / single.rate, 0.90, "×"),
    ]
    lines += ["", "| goal | measured | met |", "| --- | ---: | :---: |"]
    for name, value, target, unit in goals:
        met = value <= target if unit.endswith("≤") else value >= target
        # Rounded toward missing the goal, so a miss never prints as the goal itself (0.2997 as "0.30").
        shown = (math.floor if unit == "×" else math.ceil)(round(value * 100, 6)) / 100
        shown = f"{shown:.2f}×" if unit == "×" else f"{shown:.2f} {unit[:-1]}"
        lines.append(f"| {name} | {shown} | {'yes' if met else 'no'} |")
    lines += ["", _facts(runs, bench)]
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _facts(runs: int, bench: Bench) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    shown = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    wrk_version = "wrk " + (re.search(r"wrk (?:debian/)?([0-9][^ ]*)", shown) or ["", "?"])[1]
    names = ("starlette", "uvicorn", "uvloop", "httptools", "msgspec", "kafka-python", "crc32c", "fastapi", "pydantic")
    packages = ", ".join(f"{p} {_version(p)}" for p in names)
    return (
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} × {cpu}, {memory} GiB, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; Apache Kafka "
        f"{KAFKA_VERSION if not os.environ.get('KAFKA_BOOTSTRAP_SERVERS') else '(given broker)'} on loopback; "
        f"{wrk_version} with 1 thread. Medians of {runs} round(s), {bench.seconds:g} s timed after "
        f"{bench.warmup:g} s warm-up each. {packages}. Ratios are to the no-op route at the same connections, "
        "to the raw producer for the batch, to one process for two, to the service's batch of 100 for the fan-out. "
        "Kafka count: every 2xx command is in Kafka once (the topic's count equals the service's own published "
        "count, and the client's 2xx count within the requests still in flight when wrk stopped counting). "
        + fanout_summary(bench)
    ).rstrip()


def fanout_summary(bench: Bench) -> str:
    """What the fan-out row's figures are, each fan-out's, and the service's RSS around them ("" without the row)."""
    row, batch = bench.rows.get(("pusher", FANOUT_LOAD, 1)), bench.rows.get(("pusher", "batch of 100", 16))
    if row is None:
        return ""
    ratio = (
        f", {row.commands / batch.commands:.3f}× the batch of 100's {batch.commands:,.0f}"
        if batch and batch.rate
        else ""
    )
    each = ", ".join(f"{r * FANOUT:,.0f}" for r in row.rates)
    return (
        f"Fan-out: {bench.fanouts} per round to {FANOUT:,} devices, one after the other from httpx, each timed from "
        f"its POST until GET /api/v1/fanouts/{{id}} says done (polled every 50 ms): {row.commands:,.0f} commands/s "
        f"(each: {each}){ratio}; its p50 is the 202 (all {FANOUT:,} journaled, one fsync): "
        f"{_fmt(median(row.p50))} ms (each: {', '.join(f'{ms:,.0f}' for ms in row.p50)}); the service's RSS "
        f"{_fmt(median(bench.extra['fanout_rss_before']))} MB before the fan-outs, "
        f"{_fmt(median(bench.extra['fanout_rss_after']))} after, {_fmt(median(row.rss))} at peak."
    )


def replace_between_markers(path: Path, text: str) -> None:
    """Put `text` between <!-- bench:start --> and <!-- bench:end --> in `path` (appended when absent)."""
    content = path.read_text() if path.exists() else ""
    block = f"<!-- bench:start -->\n{text}\n<!-- bench:end -->"
    if "<!-- bench:start -->" in content:
        content = re.sub(r"<!-- bench:start -->.*?<!-- bench:end -->", lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)


def main() -> None:
    """Run the suite and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rounds; every figure is the median (3)")
    parser.add_argument("--seconds", type=float, default=10, help="timed seconds per load (10)")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up seconds before each (3)")
    parser.add_argument("--raw-count", type=int, default=200_000, help="records the raw producer sends (200000)")
    parser.add_argument("--only", help=f"comma-separated targets: {','.join(TARGETS)}")
    parser.add_argument("--rows", help=f"with the service target, only these rows: {','.join(SERVICE_ROWS)}")
    parser.add_argument("--prefill", type=int, default=1_000_000, help="finished commands in the prefilled journal")
    parser.add_argument("--fanouts", type=int, default=5, help="fan-outs per round in the fan-out row (5)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and docs alone")
    args = parser.parse_args()
    targets = args.only.split(",") if args.only else list(TARGETS)
    service_rows = tuple(args.rows.split(",")) if args.rows else SERVICE_ROWS
    if unknown := set(targets) - set(TARGETS) or set(service_rows) - set(SERVICE_ROWS):
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="pusher-bench-") as tmp:
        log_dir = Path(tmp)
        broker = None
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = LocalKafka(log_dir / "kafka").start()
            bootstrap = broker.bootstrap
        try:
            bench = Bench(bootstrap, args.seconds, args.warmup, args.raw_count, log_dir, service_rows, args.prefill,
                          args.fanouts)  # fmt: skip
            for round_number in range(1, args.runs + 1):
                for target in targets:
                    print(f"round {round_number}/{args.runs}: {target}", file=sys.stderr, flush=True)
                    getattr(bench, target)()
        finally:
            if broker is not None:
                broker.stop()
    if set(targets) != set(TARGETS) or service_rows != SERVICE_ROWS:
        for row in bench.rows.values():
            rounds = ", ".join(_per_second(r) for r in row.rates)
            checks = ", ".join(sorted(set(row.checks)))
            print(f"{row.target} | {row.load} | {row.connections} | {_per_second(row.rate)} req/s "
                  f"{row.commands:,.0f} cmd/s | p50 {_fmt(median(row.p50), 1)} p99 {_fmt(median(row.p99), 1)} ms "
                  f"| non-2xx {row.non2xx} | CPU {_fmt(median(row.cpu), 2)} | rounds {rounds} | {checks}")  # fmt: skip
        if summary := fanout_summary(bench):
            print(summary)
        return
    table = report(bench, args.runs)
    print(table)
    if not args.no_write:
        replace_between_markers(BENCH / "RESULTS.md", table)
        replace_between_markers(ROOT / "docs" / "development.md", table)


if __name__ == "__main__":
    main()
