"""The waiters scenario: many clients waiting at once (long polls) beside the usual single-command load.

The service runs with MAX_WAITERS, MAX_WAITERS_PER_KEY and LIMIT_CONCURRENCY raised to allow them and LONG_POLL_MAX
at an hour. `count` commands are journaled held (not_before an hour ahead, batches of MAX_BATCH), so none of them
is published while the scenario runs; then:
  1. the single-command row (64 connections), without waiters;
  2. `count` long polls opened (GET …/status?wait_for=published, one connection each, from a thread of this
     process) and counted by the service's own gauge; its RSS before and after: the growth;
  3. the single-command row again, with them all waiting;
  4. the long polls closed, and the row once more without them (the "without" figure is the mean of 1 and 4, so a
     drift over the scenario does not count against either side).
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import httpx
from helpers import KEYS, ServiceProcess, new_topic
from measure import Row, rss_mb
from names import SINGLE
from targets import service_env

from settings import Settings

API_KEY = KEYS["writer"][0]


class Run(Protocol):
    """What the scenario needs from the run."""

    bootstrap: str
    log_dir: object
    python: str
    extra: dict[str, list[float]]
    notes: dict[str, list[str]]

    def row(self, target: str, load: str, connections: int | None, per_request: int = 1) -> Row: ...

    def measure(self, row: Row, url: str, pid: int, connections: int, mode: str = "single", service=None,
                topic: str | None = None, **env: str) -> None: ...  # fmt: skip


class _Poll(asyncio.Protocol):
    """One long poll: the request written once connected; any answer before it is closed means it stopped waiting."""

    def __init__(self, request: bytes, polls: LongPolls) -> None:
        self.request = request
        self.polls = polls

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.polls.transports.append(transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.polls.closing:
            self.polls.answered += 1
            self.polls.first_answer = self.polls.first_answer or data[:200].decode("latin-1")


class LongPolls:
    """`paths` held open as long polls on their own event loop in a thread, until `close()`."""

    def __init__(self, port: int, paths: list[str]) -> None:
        self.port = port
        self.paths = paths
        self.transports: list[asyncio.Transport] = []
        self.answered = 0  # polls answered while they should still be waiting
        self.first_answer = ""
        self.closing = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def open(self) -> None:
        """Connect and send every poll (256 connecting at a time, below the listen backlog)."""
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(timeout=600)

    async def _open(self) -> None:
        gate = asyncio.Semaphore(256)

        async def one(path: str) -> None:
            request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\n\r\n").encode()
            async with gate:
                await self.loop.create_connection(lambda: _Poll(request, self), "127.0.0.1", self.port)

        await asyncio.gather(*(one(path) for path in self.paths))

    def close(self) -> None:
        """Close every connection and stop the thread."""
        self.closing = True

        def close_all() -> None:
            for transport in self.transports:
                transport.close()

        self.loop.call_soon_threadsafe(close_all)
        time.sleep(0.5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def _waiting(url: str) -> int:
    """The service's own count of open waiters (pusher_waiters)."""
    found = re.search(r"^pusher_waiters ([0-9.e+]+)$", httpx.get(url + "/metrics", timeout=10).text, re.M)
    return int(float(found.group(1))) if found else -1


def _hold(url: str, count: int, run_id: str) -> list[str]:
    """Journal `count` commands held an hour (batches of MAX_BATCH); their request ids."""
    due = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ids = [f"waiter-{run_id}-{i}" for i in range(count)]
    size = Settings().max_batch
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for start in range(0, count, size):
            commands = [{"device_id": f"waiter_{i:05d}", "command_type": "config_update", "protocol": "coap",
                         "payload": {"measurement_interval": 600}, "request_id": request_id, "not_before": due}
                        for i, request_id in enumerate(ids[start:start + size], start)]  # fmt: skip
            client.post("/api/v1/commands/batch", content=json.dumps({"commands": commands})).raise_for_status()
    return ids


def _raise_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files (the service started from it inherits it) up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            raise RuntimeError(f"{wanted} open files wanted for the waiters scenario; the hard limit is {hard}")


def waiters(run: Run, count: int) -> None:
    """One round of the scenario; its figures go into run.extra (waiters_*), its rows into run.rows."""
    _raise_open_files(count + 4096)  # each side of the connections, this process and the service, holds `count`
    topic = new_topic(run.bootstrap)
    room = str(count + 1000)
    env = service_env(run.bootstrap, topic, run.log_dir) | {
        "MAX_WAITERS": room,
        "MAX_WAITERS_PER_KEY": room,
        "LIMIT_CONCURRENCY": room,
        "LONG_POLL_MAX": "3600",
    }
    service = ServiceProcess(run.log_dir, run.python, **env).start()
    polls: LongPolls | None = None
    try:
        pid, url = service.process.pid, service.url
        ids = _hold(url, count, topic[-8:])
        without = run.row(f"{SINGLE}, beside {count:,} held commands", "single", 64)
        with_them = run.row(f"{SINGLE}, {count:,} long polls open", "single", 64)
        run.measure(without, url, pid, 64, topic=topic, BENCH_API_KEY=API_KEY)
        before = rss_mb(pid)
        polls = LongPolls(service.port, [f"/api/v1/commands/{i}/status?wait_for=published&timeout=3600" for i in ids])
        polls.open()
        deadline = time.monotonic() + 120
        while (waiting := _waiting(url)) < count and time.monotonic() < deadline and not polls.answered:
            time.sleep(0.2)
        time.sleep(2)  # the last ones settled
        after = rss_mb(pid)
        run.measure(with_them, url, pid, 64, topic=topic, BENCH_API_KEY=API_KEY)
        still = _waiting(url)
        answered, first = polls.answered, polls.first_answer
        polls.close()
        polls = None
        run.measure(without, url, pid, 64, topic=topic, BENCH_API_KEY=API_KEY)
    finally:
        if polls is not None:
            polls.close()
        service.stop()
    if waiting < count or still < count:
        run.notes["waiters"].append(f"{waiting:,} of {count:,} waiting when opened, {still:,} after the load")
    if answered:
        run.notes["waiters"].append(f"{answered:,} polls answered while they should have waited: {first!r}")
    run.extra["waiters_open"].append(min(waiting, still))
    run.extra["waiters_rss_before"].append(before)
    run.extra["waiters_rss_growth"].append(after - before)
    run.extra["waiters_single_with"].append(with_them.rates[-1])
    run.extra["waiters_single_without"].append((without.rates[-1] + without.rates[-2]) / 2)
