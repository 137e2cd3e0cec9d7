"""Shutting down as operators need it: drain on the first signal, exit at once on the second (real processes)."""

from __future__ import annotations

import signal
import time

import httpx
from helpers import ServiceProcess, command, wait_for
from kafka_local import free_port


def test_first_sigterm_drains_then_exits(tmp_path):
    """SIGTERM: /ready false and new commands 503 (health still 200) for SHUTDOWN_DRAIN, then a clean exit."""
    service = ServiceProcess(tmp_path, SHUTDOWN_DRAIN="2", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(
        wait_ready=False
    )
    assert httpx.post(service.url + "/api/v1/commands", json=command()).status_code == 202
    service.process.send_signal(signal.SIGTERM)
    ready = wait_for(lambda: (r := httpx.get(service.url + "/ready")).status_code == 503 and r, timeout=5)
    assert ready.json()["reason"] == "shutting down"
    refused = httpx.post(service.url + "/api/v1/commands", json=command())
    assert refused.status_code == 503 and refused.json()["type"] == "/problems/shutting-down"
    assert refused.headers["retry-after"]
    assert httpx.get(service.url + "/health").status_code == 200
    started = time.monotonic()
    code = service.process.wait(30)
    assert code == 0 and time.monotonic() - started < 15
    assert '"stopped"' in service.log()


def test_second_sigterm_exits_at_once(tmp_path):
    """A second signal does not wait for the drain or the graceful shutdown."""
    service = ServiceProcess(tmp_path, SHUTDOWN_DRAIN="30", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(
        wait_ready=False
    )
    service.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(service.url + "/ready").status_code == 503, timeout=5)
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    service.process.wait(10)
    assert time.monotonic() - started < 3
    assert "second signal: exiting now" in service.log()
