"""Real parts for the tests: the service as a process, topics, and a consumer that reads back."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import jsonschema_rs
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka_local import free_port, stop_process

from security import hash_key

ROOT = Path(__file__).resolve().parent.parent
STATUS_CONTRACT = json.loads((ROOT / "contract" / "status-event.schema.json").read_text())
# The status topic's contract, compiled once; formats (date-time) checked too.
STATUS_EVENT_VALIDATOR = jsonschema_rs.validator_for(STATUS_CONTRACT, validate_formats=True)
# STATUS_TOPIC_SECRET of every test instance that shares a status topic (they must agree to trust each other).
STATUS_SECRET = "status-topic-secret-for-the-tests-0123456789"
# API keys for tests that turn authentication on: id → (secret, scopes, device patterns)
KEYS = {
    "writer": ("ppk_writer-secret", ["commands:write", "commands:read"], None),
    "reader": ("ppk_reader-secret", ["commands:read"], None),
    "site-a": ("ppk_site-a-secret", ["commands:write", "commands:read"], ["site-a/*"]),
    "admin": ("ppk_admin-secret", ["admin"], None),
}


def keys_file(path, keys=KEYS) -> str:
    """Write an API_KEYS_FILE holding `keys` and return its path."""
    lines = []
    for key_id, (secret, scopes, devices) in keys.items():
        lines += ["[[keys]]", f'id = "{key_id}"', f'sha256 = "{hash_key(secret)}"', f"scopes = {json.dumps(scopes)}"]
        if devices:
            lines.append(f"devices = {json.dumps(devices)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def new_topic(
    bootstrap: str, partitions: int = 3, name: str | None = None, configs: dict | None = None, replication: int = 1
) -> str:
    """Create a fresh topic (one per test keeps tests independent) and return its name."""
    name = name or f"cmd-{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        spec = {"num_partitions": partitions, "replication_factor": replication, "configs": configs or {}}
        admin.create_topics({name: spec}, wait_for_metadata=True)
    finally:
        admin.close()
    return name


def new_status_topic(bootstrap: str) -> str:
    """A fresh compacted status topic."""
    return new_topic(bootstrap, configs={"cleanup.policy": "compact"})


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list:
    """Read every record of `topic` from the beginning until `count` arrived (or more, or the timeout)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + 10
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic) or set()
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        records: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            if len(records) >= count:
                # one more short poll, so that surplus (duplicate) records are seen too
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(batch)
                break
        return records
    finally:
        consumer.close()


def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every record of `topic` up to its end offsets when called, in (partition, offset) order: what a check that
    something is NOT in the topic needs, without waiting out a timeout."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = wait_for(lambda: consumer.partitions_for_topic(topic), timeout=10)
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        ends = consumer.end_offsets(assignment)
        records: list = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} not read to its end {ends} within {timeout}s")
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records.extend(r for r in batch if r.offset < ends[tp])
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


class ServiceProcess:
    """The service as users run it (`python -m pusher`, by default with this interpreter), on a free port,
    with its own log file. With API_TLS_CERTFILE in `env` its url is https://, and its own probes use
    `ssl_context` (the test's CA, and a client certificate where one is required)."""

    def __init__(
        self, log_dir: Path, python: str = sys.executable, ssl_context: ssl.SSLContext | None = None, **env: str
    ) -> None:
        self.python = python
        self.port = free_port()
        self.url = f"{'https' if env.get('API_TLS_CERTFILE') else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = ssl_context or True
        self.log_path = Path(log_dir) / f"pusher-{self.port}.log"
        self.env = {
            **os.environ,
            "API_HOST": "127.0.0.1",
            "API_PORT": str(self.port),
            "LOG_FORMAT": "json",
            "ENV_FILE": "/nonexistent",
            "JOURNAL_PATH": str(Path(log_dir) / f"journal-{self.port}.db"),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ServiceProcess:
        """Start the process and wait for /health (and, unless told not to, for /ready with Kafka connected)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "pusher"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        path = "/ready" if wait_ready else "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + path, timeout=1, verify=self.verify)
                if response.status_code == 200 and (not wait_ready or response.json()["kafka_connected"]):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.process.kill()  # a start that failed must not leave the process running after the test
        self.process.wait()
        raise RuntimeError(f"service not answering {path} within {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process and wait for it; return its exit code. A process that ignores SIGTERM is killed
        and the test fails: a service that does not stop when told is a bug, not something to wait out."""
        if self.process is None:
            return 0
        process, self.process = self.process, None
        code = stop_process(process, sig, timeout)
        if sig == signal.SIGTERM and code == -signal.SIGKILL:
            raise AssertionError(f"the service did not exit within {timeout:g} s of SIGTERM:\n{self.log()[-3000:]}")
        return code

    def wait_drained(self, timeout: float = 120.0) -> float:
        """Wait until nothing is waiting for Kafka; return how long it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if httpx.get(self.url + "/ready", timeout=2, verify=self.verify).json()["backlog"] == 0:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"backlog not drained within {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """What the process printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def command(device_id: str = "device_001", **extra) -> dict:
    """A valid command body, overridable field by field."""
    body = {"device_id": device_id, "command_type": "reboot", "payload": {}, "protocol": "mqtt"}
    body.update(extra)
    return body


def record_figure(name: str, value: float | int | str) -> None:
    """Keep a measured figure in .cache/figures.json (README quotes them)."""
    record_figures({name: value})


def record_figures(measured: dict[str, float | int | str]) -> None:
    """Keep measured figures in .cache/figures.json, in one read and one write, under a lock (test workers
    write at once)."""
    path = ROOT / ".cache" / "figures.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / "figures.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        figures = json.loads(path.read_text()) if path.exists() else {}
        figures.update(measured)
        path.write_text(json.dumps(figures, indent=2, sort_keys=True))


def run_cli(*args: str, url: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `pusher ARGS` (the client package's command) against `url`."""
    return subprocess.run(
        [sys.executable, "-m", "pusher_client.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PUSHER_URL": url, "PUSHER_API_KEY": "", **env},
    )


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def ready(url: str) -> dict:
    """The service's /ready body."""
    return httpx.get(url + "/ready", timeout=5).json()


def status_of(url: str, request_id: str) -> dict:
    """A command's status body."""
    return httpx.get(f"{url}/api/v1/commands/{request_id}/status", timeout=5).json()


def service_on(broker, log_dir: Path, **env: str) -> tuple[str, ServiceProcess]:
    """Start `broker`, make a fresh topic on it, and start the service publishing there; (topic, service)."""
    broker.start()
    topic = new_topic(broker.bootstrap)
    service = ServiceProcess(log_dir, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap, KAFKA_COMMAND_TOPIC=topic, **env)
    return topic, service.start()


class AnswerDropper:
    """A TCP proxy in front of the service that cuts every other connection (the first `drops` times) as soon
    as the answer starts: the service did the work, the client never hears of it (a flaky link, a crashed
    load balancer), and the retry on the next connection gets through."""

    def __init__(self, upstream_port: int, drops: int = 1) -> None:
        self.upstream_port = upstream_port
        self.drops = drops
        self.dropped = 0
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop taking connections."""
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                drop = self.connections % 2 == 0 and self.dropped < self.drops
                self.dropped += drop
                self.connections += 1
            threading.Thread(target=self._serve, args=(client, drop), daemon=True).start()

    def _serve(self, client: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if drop:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
