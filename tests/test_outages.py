"""Kafka going away and coming back, a missing topic, and SIGTERM under load — all with real processes."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

import httpx
from helpers import ServiceProcess, command, new_topic, read_topic, ready, service_on, status_of, wait_for


def _post(url: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(url + "/api/v1/commands", json=body, headers=headers, timeout=30)


def _status(url: str, request_id: str) -> str:
    return status_of(url, request_id)["status"]


def test_service_starts_without_kafka_and_recovers_by_itself(own_broker, tmp_path):
    """Kafka down at start: ready (journal), commands 202 at once; Kafka up: the stored one follows, new ones 200."""
    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap, KAFKA_COMMAND_TOPIC="boot", PUBLISH_TIMEOUT="30"
    ).start(wait_ready=False)
    try:
        assert httpx.get(service.url + "/health").json() == {"status": "healthy"}
        body = ready(service.url)
        assert body["ready"] is True and body["kafka_connected"] is False and "Kafka unavailable" in body["reason"]
        # At once: a wait for Kafka (PUBLISH_TIMEOUT=30) would outlast the client's own 5 s timeout.
        stored = httpx.post(service.url + "/api/v1/commands", json=command(payload={"n": 0}), timeout=5)
        assert stored.status_code == 202
        assert stored.json()["status"] == "accepted"
        stored_id = stored.json()["request_id"]

        own_broker.start()
        new_topic(own_broker.bootstrap, name="boot")
        wait_for(lambda: ready(service.url)["kafka_connected"])
        wait_for(lambda: _status(service.url, stored_id) == "published")
        accepted = wait_for(
            lambda: (r := _post(service.url, command(payload={"n": 1}), "n-1")).status_code == 200 and r
        )
        records = read_topic(own_broker.bootstrap, "boot", 2)
        assert [json.loads(r.value)["payload"]["n"] for r in sorted(records, key=lambda r: r.offset)] == [0, 1]
        assert records[-1].offset == accepted.json()["offset"] or accepted.json()["offset"] in {
            r.offset for r in records
        }
    finally:
        service.stop()


def test_broker_stop_gives_202_and_restart_publishes_without_restarting_the_service(own_broker, tmp_path):
    """A running broker stops: 202 (stored) and /ready says Kafka is down; it returns: backlog drains, 200 again."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1")
    try:
        first = _post(service.url, command(payload={"phase": "before"}))
        assert first.status_code == 200
        pid = service.process.pid

        own_broker.stop()
        during = [_post(service.url, command(payload={"phase": "during", "n": n})) for n in range(5)]
        assert [r.status_code for r in during] == [202] * 5
        wait_for(lambda: ready(service.url)["kafka_connected"] is False)
        assert ready(service.url)["ready"] is True and ready(service.url)["backlog"] >= 1

        own_broker.start()
        wait_for(
            lambda: (r := _post(service.url, command(payload={"phase": "after"}), "after-1")).status_code == 200 and r
        )
        assert service.process.pid == pid
        for request_id in [r.json()["request_id"] for r in during]:
            wait_for(lambda rid=request_id: _status(service.url, rid) == "published")
        records = read_topic(own_broker.bootstrap, topic, 7)
        phases = [json.loads(r.value)["payload"].get("n", json.loads(r.value)["payload"]["phase"]) for r in records]
        assert phases == ["before", 0, 1, 2, 3, 4, "after"]
        assert ready(service.url)["backlog"] == 0
    finally:
        service.stop()


def test_missing_topic_holds_commands_and_can_be_created(kafka_bootstrap, tmp_path):
    """A missing topic is one clear log line and kafka_connected false; KAFKA_CREATE_TOPIC=true creates it."""
    name = f"missing-{time.monotonic_ns()}"
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=name)
    service.start(wait_ready=False)
    try:
        wait_for(lambda: "does not exist" in (ready(service.url)["reason"] or ""))
        stored = _post(service.url, command())
        assert stored.status_code == 202
        assert service.log().count('"command topic missing"') == 1
    finally:
        service.stop()

    creating = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=name, KAFKA_CREATE_TOPIC="true",
        KAFKA_TOPIC_PARTITIONS="2", JOURNAL_PATH=service.env["JOURNAL_PATH"],
    ).start()  # fmt: skip
    try:
        assert ready(creating.url)["partitions"] == 2
        wait_for(lambda: _status(creating.url, stored.json()["request_id"]) == "published")
        assert _post(creating.url, command()).status_code == 200
    finally:
        creating.stop()


def test_sigterm_during_load_loses_no_acknowledged_command(kafka_bootstrap, topic, tmp_path):
    """SIGTERM while clients are sending: every 2xx command is in Kafka once (202s after the next start)."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=service.url, timeout=10) as http:
            seq = 0
            while not stop.is_set():
                try:
                    response = http.post("/api/v1/commands", json=command(f"load-{n}", payload={"seq": seq}))
                except httpx.TransportError:
                    return
                seq += 1
                if response.status_code in (200, 202):
                    with lock:
                        acknowledged.append(response.json()["request_id"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acknowledged) > 300, timeout=30, interval=0.05)
    code = service.stop(signal.SIGTERM)
    stop.set()
    for thread in threads:
        thread.join(30)
    # uvicorn re-raises the signal once shutdown is complete, so the exit reads as "terminated by SIGTERM"
    assert code in (0, -signal.SIGTERM), service.log()[-2000:]
    assert '"stopped"' in service.log() and "Application shutdown complete" in service.log()

    again = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic,
        JOURNAL_PATH=service.env["JOURNAL_PATH"],
    ).start()  # fmt: skip
    try:
        wait_for(lambda: ready(again.url)["backlog"] == 0)
    finally:
        again.stop()
    records = read_topic(kafka_bootstrap, topic, len(acknowledged))
    in_kafka = Counter(dict(r.headers)["request_id"].decode() for r in records)
    missing = [rid for rid in acknowledged if rid not in in_kafka]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged commands are not in Kafka"
    assert all(in_kafka[rid] == 1 for rid in acknowledged)
