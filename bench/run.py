"""`make bench`: the service against its ceilings in one run, as ratios; writes bench/RESULTS.md, docs/development.md.

Targets, each started in turn on this machine against the same broker:
  noop     a Starlette route that only reads and decodes the body (the HTTP ceiling)
  raw      kafka-python producing the same JSON directly (the Kafka-client ceiling)
  floor    Starlette + msgspec + kafka-python answering 200 after Kafka's ack, with nothing else (no journal,
           keys, limits, metrics or logs): a bound on what any 200-after-ack service on this stack can reach
  service  this service as users run it: journal FULL, API keys and a generous rate limit on, metrics on
  prefilled  the same over a journal of --prefill finished commands (bench/prefill.py): single commands, then
           with 5 % status reads and 1 % list reads (each read timed on its own): reads beside the writer
  seed     the seed plan's FastAPI + pydantic app with `.get()` in the handler, and without it
  outage   --outage-commands accepted while Kafka (a broker of the scenario's own) is down, a restart, the drain when
           it returns, and the topic read back (bench/outage.py)
  waiters  --waiters long polls open at once: the service's RSS growth, and the single row with and without them
           (bench/waiters.py)
  fleet    batches over --fleet-devices distinct device ids: the service's RSS beyond what 1,000 devices take
           (bench/fleet.py)
Load comes from wrk in its own process (bench/load.lua), except the service's fan-out row: --fanouts fan-outs to
MAX_FANOUT devices one after the other from httpx, each timed from its POST until GET /api/v1/fanouts/{id} says done
(a few huge requests, which wrk is not made for). Every figure is the median of --runs rounds (the fan-out row's, of
every fan-out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import goals  # noqa: E402
import httpx  # noqa: E402
from fleet import fleet as run_fleet  # noqa: E402
from helpers import KEYS, ServiceProcess, new_topic  # noqa: E402
from kafka_local import KAFKA_VERSION, LocalKafka  # noqa: E402
from measure import Load, Row, Sampler, kafka_count, median, rss_mb, wrk  # noqa: E402
from names import (  # noqa: E402
    ASYNC,
    BATCH,
    FANOUT,
    FANOUT_LOAD,
    FLOOR,
    NOOP,
    PREFILLED_LOAD,
    PUSHER,
    RAW,
    SEED_GET,
    SEED_NO_GET,
    SINGLE,
    TWO_PROCESSES,
    prefilled_target,
)
from outage import outage as run_outage  # noqa: E402
from targets import (  # noqa: E402
    SEED_RUNTIME,
    Uvicorn,
    delivery_check,
    outcome_totals,
    runtime_python,
    seed_python,
    service_env,
    settled,
)
from waiters import waiters as run_waiters  # noqa: E402

API_KEY = KEYS["writer"][0]
TARGETS = ("noop", "raw", "floor", "service", "prefilled", "multicore", "seed", "outage", "waiters", "fleet")
SERVICE_ROWS = ("single-16", "single-64", "async", "batch", "mixed", "fanout")  # --rows chooses among them


# ---------------------------------------------------------------- the run


class Bench:
    """Every target in turn, `runs` rounds, on one broker."""

    def __init__(self, bootstrap: str, seconds: float, warmup: float, raw_count: int, log_dir: Path,
                 service_rows: tuple[str, ...] = SERVICE_ROWS, prefill: int = 1_000_000,
                 fanouts: int = 5, outage_commands: int = 100_000, waiters: int = 10_000,
                 fleet_devices: int = 1_000_000) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.service_rows = service_rows
        self.prefill = prefill
        self.fanouts = fanouts
        self.outage_commands = outage_commands
        self.waiter_count = waiters
        self.fleet_devices = fleet_devices
        self._prefilled: Path | None = None  # the filled journal, made once and copied for each round
        self.seconds = seconds
        self.warmup = warmup
        self.raw_count = raw_count
        self.log_dir = log_dir
        self.rows: dict[tuple[str, str, int | None], Row] = {}
        self.extra: dict[str, list[float]] = defaultdict(list)  # figures by name, one per round
        self.notes: dict[str, list[str]] = defaultdict(list)  # what a scenario found wrong, by scenario
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
                self.measure(self.row(NOOP, "single", connections), app.url, app.pid, connections)

    def raw(self) -> None:
        """The Kafka-client ceiling."""
        topic = new_topic(self.bootstrap)
        command = [self.python, str(BENCH / "raw_producer.py"), self.bootstrap, topic, str(self.raw_count)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        row = self.row(RAW, "producer", None)
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
            for connections in (16, 64):
                self.measure(self.row(FLOOR, "single", connections), app.url, app.pid, connections, topic=topic)
            self.measure(self.row(FLOOR, BATCH, 16, per_request=100), app.url, app.pid, 16, "batch",
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
                self.measure(self.row(ASYNC, "single", 64), url, pid, 64,
                             BENCH_PREFER="respond-async", **common)  # fmt: skip
            if "batch" in self.service_rows:
                self.measure(self.row(PUSHER, BATCH, 16, per_request=100), url, pid, 16, "batch", **common)
            if "mixed" in self.service_rows:
                self.measure(self.row(PUSHER, "mixed, 5 % status reads", 64), url, pid, 64, "mixed", **common)
            if "fanout" in self.service_rows:
                self.fanout(self.row(PUSHER, FANOUT_LOAD, 1, per_request=FANOUT), service, topic)
        finally:
            service.stop()

    def prefilled(self) -> None:
        """This service over a journal of --prefill finished commands (the writer key's, over the 1,000 devices
        the load uses): single commands alone, then with 5 % status reads and 1 % reads of a device's list (each
        read timed on its own), 64 conns."""
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
            pid, common = service.process.pid, {"service": service, "topic": topic, "BENCH_API_KEY": API_KEY}
            target = prefilled_target(self.prefill)
            self.measure(self.row(target, "single", 64), service.url, pid, 64, **common)
            self.measure(self.row(target, PREFILLED_LOAD, 64), service.url, pid, 64, "mixed", BENCH_LISTS="1",
                         **common)  # fmt: skip
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
            row = self.row(TWO_PROCESSES, "single", 64)
            row.rates.append(sum(x.rate for x in loads))
            row.p99.append(max(x.p99_ms for x in loads))
            row.p50.append(max(x.p50_ms for x in loads))
            row.non2xx.append(sum(x.non2xx + x.socket_errors for x in loads))
            row.checks.append("—")
        finally:
            for service in services:
                service.stop()

    def outage(self) -> None:
        """A long Kafka outage, a restart and the drain (bench/outage.py)."""
        run_outage(self, self.outage_commands)

    def waiters(self) -> None:
        """Many long polls open beside the single-command load (bench/waiters.py)."""
        run_waiters(self, self.waiter_count)

    def fleet(self) -> None:
        """Commands over a great many distinct devices (bench/fleet.py)."""
        run_fleet(self, self.fleet_devices)

    def seed(self) -> None:
        """The seed plan's app, with `.get()` and without."""
        python = seed_python()
        for fire_and_forget, label in (("0", SEED_GET), ("1", SEED_NO_GET)):
            topic = new_topic(self.bootstrap)
            env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "KAFKA_COMMAND_TOPIC": topic,
                   "SEED_FIRE_AND_FORGET": fire_and_forget}  # fmt: skip
            with Uvicorn("seed_app:app", self.log_dir, python, **env) as app:
                self.measure(self.row(label, "single", 64), app.url, app.pid, 64, topic=topic)


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _per_second(value: float) -> str:
    return _fmt(value, 2 if value < 10 else 0)  # a fan-out takes seconds: its requests/s need decimals


def report(bench: Bench, runs: int, found: list[goals.Goal], chart: str) -> str:
    """The markdown table of every row, the goals with their chart (the image at `chart`) and the run's facts."""
    rows = bench.rows

    def rate(target: str, load: str, connections: int | None) -> float | None:
        row = rows.get((target, load, connections))
        return row.rate if row is not None and row.rates else None

    lines = [
        "| target | load | conns | req/s | commands/s | ratio | p50 ms | p99 ms | p99.9 ms | non-2xx | peak RSS MB"
        " | CPU cores | CPU µs/cmd | Kafka count |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    batch = rows.get((PUSHER, BATCH, 16))
    for row in rows.values():
        if row.load == "producer":
            reference, against = row.rate, "producer"
        elif row.load.startswith("batch"):
            reference, against = rate(RAW, "producer", None), "producer"
        elif row.load == FANOUT_LOAD:
            reference, against = batch.commands if batch else None, "batch of 100"
        elif row.target == TWO_PROCESSES:
            reference, against = rate(SINGLE, "single", 64), "1 process"
        else:
            reference, against = rate(NOOP, "single", row.connections or 64), "no-op"
        counted = row.commands if row.per_request > 1 else row.rate  # batches and fan-outs count commands
        ratio = f"{counted / reference:.3f}× {against}" if reference else "—"
        checks = sorted(set(row.checks))
        lines.append(
            f"| {row.target} | {row.load} | {row.connections or '—'} | {_per_second(row.rate)} "
            f"| {_fmt(row.commands)} "
            f"| {ratio} | {_fmt(median(row.p50), 1)} | {_fmt(median(row.p99), 1)} "
            f"| {_fmt(median(row.p999), 1)} | {_fmt(median(row.non2xx))} | {_fmt(median(row.rss))} "
            f"| {_fmt(median(row.cpu), 2)} | {_fmt(median(row.cpu_per_command))} | {', '.join(checks)} |"
        )
    lines += ["", goals.table(found), "", f"![Each goal as measured ÷ goal; past the line is met]({chart})", ""]
    lines.append(_facts(runs, bench))
    return "\n".join(lines)


def _versions(python: str, *packages: str) -> str:
    """ "name version, …" of `packages` as installed for the interpreter `python`."""
    code = (
        "import sys\nfrom importlib import metadata\nfor name in sys.argv[1:]:\n"
        "    try:\n        print(name, metadata.version(name))\n"
        "    except metadata.PackageNotFoundError:\n        print(name, 'not installed')"
    )
    done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, check=True)
    return ", ".join(done.stdout.splitlines())


def _facts(runs: int, bench: Bench) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    shown = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    wrk_version = "wrk " + (re.search(r"wrk (?:debian/)?([0-9][^ ]*)", shown) or ["", "?"])[1]
    load = bench.extra["load_average"] or [0.0]
    packages = _versions(
        bench.python, "starlette", "uvicorn", "uvloop", "httptools", "msgspec", "kafka-python", "crc32c"
    )
    if SEED_RUNTIME.exists():
        packages += ", " + _versions(seed_python(), "fastapi", "pydantic")
    return (
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} × {cpu}, {memory} GiB, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; Apache Kafka "
        f"{KAFKA_VERSION if not os.environ.get('KAFKA_BOOTSTRAP_SERVERS') else '(given broker)'} on loopback; "
        f"{wrk_version} with 1 thread. The machine's 1-minute load average, read as each target started: "
        f"{min(load):.1f}–{max(load):.1f} (median {median(load):.1f}; the bench alone keeps it near 1–2). "
        f"Medians of {runs} round(s), {bench.seconds:g} s timed after "
        f"{bench.warmup:g} s warm-up each. {packages}. Ratios are to the no-op route at the same connections, "
        "to the raw producer for the batch, to one process for two, to the service's batch of 100 for the fan-out. "
        "A goal is computed round by round (its rows measured in the same round) and shown as the median with the "
        "rounds' range; CPU per command is the process's CPU time, all threads, over the commands answered 2xx. "
        "Kafka count: every 2xx command is in Kafka once (the topic's count equals the service's own published "
        "count, and the client's 2xx count within the requests still in flight when wrk stopped counting). "
        + fanout_summary(bench)
        + outage_summary(bench)
        + waiters_summary(bench)
        + fleet_summary(bench)
    ).rstrip()


def fanout_summary(bench: Bench) -> str:
    """What the fan-out row's figures are, each fan-out's, and the service's RSS around them ("" without the row)."""
    row, batch = bench.rows.get((PUSHER, FANOUT_LOAD, 1)), bench.rows.get((PUSHER, BATCH, 16))
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


def outage_summary(bench: Bench) -> str:
    """The outage scenario's figures round by round ("" when it did not run)."""
    extra = bench.extra
    if not extra["outage_accept_rate"]:
        return ""

    def each(name: str, digits: int = 0) -> str:
        return ", ".join(f"{value:,.{digits}f}" for value in extra[name])

    found = "; ".join(dict.fromkeys(bench.notes["outage"])) or "every command once, each device in order"
    return (
        f" Outage, each round on a broker of its own: {bench.outage_commands:,} commands accepted (respond-async, "
        f"64 connections) while Kafka was down at {each('outage_accept_rate')} cmd/s; restart (SIGTERM, then a "
        f"new process) to /ready with that backlog {each('outage_ready', 2)} s; Kafka back: the service reconnected "
        f"in {each('outage_reconnect', 2)} s and drained at {each('outage_drain_rate')} cmd/s "
        f"({each('outage_drain_seconds', 1)} s from the broker answering to an empty backlog); peak RSS "
        f"(VmHWM) {each('outage_peak_rss_accepting')} MB while accepting, {each('outage_peak_rss_restarted')} MB "
        f"from the restart to the end of the drain; the topic read back: {found}."
    )


def waiters_summary(bench: Bench) -> str:
    """The waiters scenario's figures round by round ("" when it did not run)."""
    extra = bench.extra
    if not extra["waiters_open"]:
        return ""

    def each(name: str) -> str:
        return ", ".join(f"{value:,.0f}" for value in extra[name])

    found = "; ".join(dict.fromkeys(bench.notes["waiters"]))
    return (
        f" Waiters: {bench.waiter_count:,} long polls on held commands, one connection each, open at once "
        f"({each('waiters_open')} counted by the service); its RSS {each('waiters_rss_before')} MB before them, "
        f"+{each('waiters_rss_growth')} MB with them; single commands at 64 connections "
        f"{each('waiters_single_with')} cmd/s with them, {each('waiters_single_without')} without (the mean of "
        f"the rows before and after them).{' ' + found + '.' if found else ''}"
    )


def fleet_summary(bench: Bench) -> str:
    """The fleet scenario's figures round by round ("" when it did not run)."""
    extra = bench.extra
    if not extra["fleet_rss_growth"]:
        return ""
    found = "; ".join(dict.fromkeys(bench.notes["fleet"]))
    chunks = "; ".join(bench.notes["fleet_rss"])
    return (
        f" Fleet: batches of 100 (16 connections) in chunks of a tenth of {bench.fleet_devices:,} devices, after two "
        f"chunks over 1,000 devices; the service's RSS in MB after each chunk, published and settled, round by round: "
        f"{chunks} (the third figure on is the fleet's); "
        f"{', '.join(f'{v:,.0f}' for v in extra['fleet_rate'])} cmd/s overall.{' ' + found + '.' if found else ''}"
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
    parser.add_argument("--outage-commands", type=int, default=100_000, help="accepted during the outage (100000)")
    parser.add_argument("--waiters", type=int, default=10_000, help="long polls open at once (10000)")
    parser.add_argument("--fleet-devices", type=int, default=1_000_000, help="distinct devices (1000000)")
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
                          args.fanouts, args.outage_commands, args.waiters, args.fleet_devices)  # fmt: skip
            for round_number in range(1, args.runs + 1):
                for target in targets:
                    print(f"round {round_number}/{args.runs}: {target}", file=sys.stderr, flush=True)
                    bench.extra["load_average"].append(os.getloadavg()[0])
                    getattr(bench, target)()
            bench.extra["load_average"].append(os.getloadavg()[0])
        finally:
            if broker is not None:
                broker.stop()
    found = goals.goals(bench)
    if set(targets) != set(TARGETS) or service_rows != SERVICE_ROWS:
        for row in bench.rows.values():
            rounds = ", ".join(_per_second(r) for r in row.rates)
            checks = ", ".join(sorted(set(row.checks)))
            reads = "".join(f" {kind} p99 {_fmt(median(values), 1)} ms" for kind, values
                            in (("status", row.status_p99), ("list", row.list_p99)) if values)  # fmt: skip
            print(f"{row.target} | {row.load} | {row.connections} | {_per_second(row.rate)} req/s "
                  f"{row.commands:,.0f} cmd/s | p50 {_fmt(median(row.p50), 1)} p99 {_fmt(median(row.p99), 1)} ms"
                  f"{reads} | non-2xx {row.non2xx} | CPU {_fmt(median(row.cpu), 2)} cores, "
                  f"{_fmt(median(row.cpu_per_command))} µs/cmd | rounds {rounds} | {checks}")  # fmt: skip
        summaries = (outage_summary(bench), waiters_summary(bench), fleet_summary(bench))
        for summary in (fanout_summary(bench), *(text.strip() for text in summaries)):
            if summary:
                print(summary)
        print()
        print(goals.table(found))
        return
    print(report(bench, args.runs, found, "goals.svg"))
    if not args.no_write:
        title = f"Goals, measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (medians of {args.runs} rounds)"
        (BENCH / "goals.svg").write_text(goals.svg(found, title))
        replace_between_markers(BENCH / "RESULTS.md", report(bench, args.runs, found, "goals.svg"))
        replace_between_markers(ROOT / "docs" / "development.md", report(bench, args.runs, found, "../bench/goals.svg"))


if __name__ == "__main__":
    main()
