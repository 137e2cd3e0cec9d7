"""What the benchmark runs and how it checks it: the interpreters (the service's runtime as users install it, the
seed plan's stack), a reference app under uvicorn, the service's configuration, and the check that Kafka holds
every command answered 2xx, once."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import ServiceProcess, keys_file
from kafka_local import free_port, stop_process
from measure import BENCH, kafka_count

ROOT = BENCH.parent
RUNTIME = ROOT / ".cache" / "bench-runtime"
SEED_RUNTIME = ROOT / ".cache" / "bench-seed"


def _venv(path: Path, requirements: Path, *editable: Path) -> str:
    """A virtualenv at `path` with `requirements` (and `editable` packages, without their dependencies), built
    again whenever one of those files changes; its interpreter."""
    stamp = path / "requirements.sha256"
    files = dict.fromkeys([requirements, ROOT / "requirements.txt", *(p / "pyproject.toml" for p in editable)])
    wanted = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(requirements)], check=True)
        for package in editable:
            subprocess.run([*pip, "--no-deps", "-e", str(package)], check=True)
        stamp.write_text(wanted)
    return str(path / "bin" / "python")


def runtime_python() -> str:
    """An interpreter with only requirements.txt and the client package (whose wire types the service imports)
    installed, as the image has them: the development tools (rich, pygments, …) would be imported by structlog
    and counted in the service's memory."""
    return _venv(RUNTIME, ROOT / "requirements.txt", ROOT / "client")


def seed_python() -> str:
    """An interpreter with the service's runtime and the seed plan's FastAPI + pydantic (bench/requirements.txt),
    kept apart so that neither the service's runtime nor the development virtualenv carries them."""
    return _venv(SEED_RUNTIME, BENCH / "requirements.txt")


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
