"""The benchmark suite itself runs (short), so `make bench` does not rot; its figures are not judged here."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT


def test_bench_runs_and_checks_kafka(kafka_bootstrap):
    """bench/run.py drives the no-op route, the floor and the service with wrk, the service with a fan-out to
    MAX_FANOUT devices, and every 2xx command is in Kafka once."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--only", "noop,floor,service", "--runs", "1",
         "--seconds", "1", "--warmup", "1", "--fanouts", "1", "--no-write"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.strip()]
    service_rows = [line for line in rows if line.startswith("pusher")]
    assert len(service_rows) == 6 and all(line.endswith("| ok") for line in service_rows), rows
    assert any(line.startswith("pusher | fan-out to 10,000 devices | 1 |") for line in service_rows), rows
    assert any(line.startswith("Fan-out: 1 per round to 10,000 devices") for line in rows), rows
    assert any(line.startswith("no-op Starlette route | single | 64 |") for line in rows), rows
    floor_rows = [line for line in rows if line.startswith("floor")]
    assert len(floor_rows) == 2 and all(line.endswith("| ok") for line in floor_rows), rows
