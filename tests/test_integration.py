"""The service as a real process against a real Apache Kafka broker, read back with a real consumer."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import pytest
from helpers import ServiceProcess, command, read_topic

from openapi import PLAN_BATCH_EXAMPLE, PLAN_EXAMPLE

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _value(record) -> dict:
    return json.loads(record.value)


def _headers(record) -> dict[str, bytes]:
    return dict(record.headers)


def test_plan_single_example_lands_in_kafka_field_for_field(service, kafka_bootstrap, topic):
    """The plan's curl example answers 200 with an offset, and the record is exactly the wire contract."""
    response = httpx.post(service.url + "/api/v1/commands", json=PLAN_EXAMPLE, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["status"] == "published"
    assert body["topic"] == topic and body["offset"] >= 0 and body["partition"] in (0, 1, 2)

    [record] = read_topic(kafka_bootstrap, topic, 1)
    assert (record.partition, record.offset) == (body["partition"], body["offset"])
    assert record.key == b"efento_device_001"
    value = _value(record)
    assert set(value) == {
        "request_id", "device_id", "command_type", "payload", "protocol",
        "parser_script_ref", "metadata", "timestamp", "expires_at",
    }  # fmt: skip
    for field in ("device_id", "command_type", "payload", "protocol", "parser_script_ref"):
        assert value[field] == PLAN_EXAMPLE[field]
    assert value["request_id"] == body["request_id"]
    assert value["metadata"] == {}
    assert value["timestamp"] == body["timestamp"] and value["timestamp"].endswith("Z")
    assert value["expires_at"] is None
    headers = _headers(record)
    assert headers["request_id"] == body["request_id"].encode()
    assert headers["content-type"] == b"application/json"
    assert headers["traceparent"] == TRACEPARENT.encode()


def test_plan_batch_example_publishes_both_in_order(service, kafka_bootstrap, topic):
    """The plan's batch example answers 200 and both commands are in Kafka with their metadata."""
    response = httpx.post(service.url + "/api/v1/commands/batch", json=PLAN_BATCH_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["total_commands"], body["successful"], body["failed"]) == (2, 2, 0)
    records = {r.key: r for r in read_topic(kafka_bootstrap, topic, 2)}
    assert set(records) == {b"device_001", b"device_002"}
    second = _value(records[b"device_002"])
    assert second["metadata"] == {"topic": "devices/device_002/commands"}
    assert second["payload"] == {"version": "1.2.3"}
    assert [r["request_id"] for r in body["results"]] == [
        _value(records[b"device_001"])["request_id"],
        second["request_id"],
    ]
    # No traceparent came in: one was made, shared by the batch's records.
    made = {_headers(r)["traceparent"] for r in records.values()}
    assert len(made) == 1 and re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-01", made.pop())


def test_protocol_options_are_merged_into_metadata(service, kafka_bootstrap, topic):
    """qos/retain (mqtt) and confirmable (coap) travel inside metadata, next to the caller's keys."""
    mqtt = command("m1", qos=1, retain=True, metadata={"topic": "devices/m1/commands", "qos": 1})
    coap = command("c1", protocol="coap", confirmable=False, request_id="client-chosen-1")
    for body in (mqtt, coap):
        assert httpx.post(service.url + "/api/v1/commands", json=body).status_code == 200
    records = {r.key: _value(r) for r in read_topic(kafka_bootstrap, topic, 2)}
    assert records[b"m1"]["metadata"] == {"topic": "devices/m1/commands", "qos": 1, "retain": True}
    assert records[b"c1"]["metadata"] == {"confirmable": False}
    assert records[b"c1"]["request_id"] == "client-chosen-1"


def test_msgpack_body_is_published_like_json(service, kafka_bootstrap, topic):
    """An application/msgpack body gives the same Kafka record as JSON."""
    body = msgspec.msgpack.encode(command("mp1", payload={"level": 3}))
    response = httpx.post(
        service.url + "/api/v1/commands", content=body, headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 200, response.text
    [record] = read_topic(kafka_bootstrap, topic, 1)
    assert _value(record)["payload"] == {"level": 3}


def test_batch_with_invalid_items_publishes_the_valid_ones_in_order(service, kafka_bootstrap, topic):
    """Invalid items fail alone with their field errors (207); the valid ones land in request order."""
    items = [
        command("dev-b", payload={"n": 0}),
        command("dev-b", protocol="zigbee"),
        command("dev-b", payload={"n": 1}),
        {"device_id": "dev-b", "command_type": "x", "payload": {}, "protocol": "coap", "qos": 1},
        command("dev-b", payload={"n": 2}),
    ]
    response = httpx.post(service.url + "/api/v1/commands/batch", json={"commands": items})
    assert response.status_code == 207, response.text
    body = response.json()
    assert (body["total_commands"], body["successful"], body["failed"]) == (5, 3, 2)
    assert [r["success"] for r in body["results"]] == [True, False, True, False, True]
    assert body["results"][1]["error"]["errors"] == [
        {"loc": "$.commands[1].protocol", "msg": "Must be one of: mqtt, coap"}
    ]
    assert body["results"][3]["error"]["errors"][0]["loc"] == "$.commands[3].qos"
    records = read_topic(kafka_bootstrap, topic, 3)
    assert [_value(r)["payload"]["n"] for r in sorted(records, key=lambda r: r.offset)] == [0, 1, 2]


def test_status_of_published_and_unknown_commands(service, kafka_bootstrap, topic):
    """A published command's status names its offset; an unknown id is a 404 problem."""
    sent = httpx.post(service.url + "/api/v1/commands", json=command("s1")).json()
    status = httpx.get(f"{service.url}/api/v1/commands/{sent['request_id']}/status")
    assert status.status_code == 200
    body = status.json()
    assert body["status"] == "published" and body["device_id"] == "s1" and body["command_type"] == "reboot"
    assert (body["topic"], body["partition"], body["offset"]) == (topic, sent["partition"], sent["offset"])
    missing = httpx.get(f"{service.url}/api/v1/commands/nope/status")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_a_read_right_after_a_200_finds_the_command_published(service):
    """Read your writes: 16 clients each POST and at once read the command's status back, or list their device's
    commands (all of them, the published ones, or the accepted ones). Every read finds the command published at
    the offset the 200 named (and no list of accepted commands holds it), though the 200 went out when Kafka
    acknowledged, before the journal committed the mark (reads that did not wait for the mark: 289 of 2,400
    stale)."""

    def client(n: int) -> list[str]:
        stale = []
        with httpx.Client(base_url=service.url, timeout=30) as http:
            for i in range(150):
                device = f"ryw-{n}-{i % 5}"
                sent = http.post("/api/v1/commands", json=command(device)).json()
                expected = [("published", sent["offset"])]
                if i % 3:
                    body = http.get(f"/api/v1/commands/{sent['request_id']}/status").json()
                    seen = [(body["status"], body["offset"])]
                else:
                    status = ("published", None, "accepted")[i // 3 % 3]
                    params = {"device_id": device} | ({"status": status} if status else {})
                    listed = http.get("/api/v1/commands", params=params).json()
                    seen = [
                        (c["status"], c["offset"]) for c in listed["items"] if c["request_id"] == sent["request_id"]
                    ]
                    expected = [] if status == "accepted" else expected
                if seen != expected:
                    stale.append(f"{sent['request_id']}: {seen}")
        return stale

    with ThreadPoolExecutor(16) as pool:
        stale = [line for lines in pool.map(client, range(16)) for line in lines]
    assert not stale, f"{len(stale)} of {16 * 150} reads after a 200 did not find it published: {stale[:5]}"


def test_one_device_keeps_its_order_while_others_are_sent_concurrently(service, kafka_bootstrap, topic):
    """1,000 commands to one device arrive in order on one partition while 4 other devices are busy."""
    stop = threading.Event()

    def noise(device: str) -> int:
        sent = 0
        with httpx.Client(base_url=service.url) as client:
            while not stop.is_set():
                assert client.post("/api/v1/commands", json=command(device)).status_code == 200
                sent += 1
        return sent

    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(noise, f"other-{i}") for i in range(4)]
        with httpx.Client(base_url=service.url) as client:
            for seq in range(1000):
                response = client.post("/api/v1/commands", json=command("ordered", payload={"seq": seq}))
                assert response.status_code == 200
        stop.set()
        noise_count = sum(f.result() for f in others)

    records = read_topic(kafka_bootstrap, topic, 1000 + noise_count)
    mine = [r for r in records if r.key == b"ordered"]
    assert len({r.partition for r in mine}) == 1
    assert [_value(r)["payload"]["seq"] for r in sorted(mine, key=lambda r: r.offset)] == list(range(1000))
    assert len(records) == 1000 + noise_count


def test_service_metrics_and_status_move_with_traffic(service):
    """/api/v1/status and /api/v1/metrics count real commands."""
    for _ in range(3):
        httpx.post(service.url + "/api/v1/commands", json=command())
    httpx.post(service.url + "/api/v1/commands", json=command(protocol="nope"))
    status = httpx.get(service.url + "/api/v1/status").json()
    assert status["kafka_connected"] is True and status["commands_processed"] == 3
    assert status["uptime_seconds"] > 0 and status["partitions"] == 3
    metrics = httpx.get(service.url + "/api/v1/metrics").json()
    assert metrics["commands_processed"] == 3 and metrics["commands_rejected"] == 1


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_when_kafka_is_up(service, path):
    """/health and /ready are 200 while the topic is reachable."""
    assert httpx.get(service.url + path).status_code == 200


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        series, _, rest = metric.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if series == name and found == wanted:
            return float(value)
    return 0.0


def test_prometheus_metrics_move_as_commands_flow(service):
    """/metrics counts requests by route template, commands by outcome, latency, and reads the gauges live."""
    before = httpx.get(service.url + "/metrics").text
    assert _sample(before, "pusher_kafka_connected") == 1.0
    assert 'pusher_build_info{commit="' in before and 'version="1.0.0"' in before
    for n in range(4):
        assert httpx.post(service.url + "/api/v1/commands", json=command(payload={"n": n})).status_code == 200
    httpx.post(service.url + "/api/v1/commands", json=command(protocol="nope"))
    httpx.post(service.url + "/api/v1/commands", json=command(), headers={"Idempotency-Key": "m1"})
    httpx.post(service.url + "/api/v1/commands", json=command(), headers={"Idempotency-Key": "m1"})
    httpx.get(service.url + "/api/v1/commands/nope/status")
    after = httpx.get(service.url + "/metrics").text
    assert _sample(after, "pusher_commands_total", outcome="accepted") == 5
    assert _sample(after, "pusher_commands_total", outcome="published") == 5
    assert _sample(after, "pusher_commands_total", outcome="rejected") == 1
    assert _sample(after, "pusher_commands_total", outcome="replayed") == 1
    assert _sample(after, "pusher_publish_latency_seconds_count") == 5
    assert _sample(after, "pusher_http_requests_total", route="/api/v1/commands", method="POST", status="200") >= 5
    assert (
        _sample(
            after,
            "pusher_http_requests_total",
            route="/api/v1/commands/{request_id}/status",
            method="GET",
            status="404",
        )
        == 1
    )
    assert _sample(after, "pusher_journal_backlog") == 0 and _sample(after, "pusher_producer_in_flight") == 0
    as_json = httpx.get(service.url + "/api/v1/metrics").json()
    assert (
        as_json["commands_accepted"] == 5 and as_json["commands_processed"] == 5 and as_json["commands_replayed"] == 1
    )


def test_one_process_per_core_each_with_its_own_journal(kafka_bootstrap, topic, tmp_path):
    """The supported way to use more cores: N processes, own port and journal each, one topic."""
    processes = [
        ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
        for _ in range(2)
    ]
    try:
        assert processes[0].env["JOURNAL_PATH"] != processes[1].env["JOURNAL_PATH"]
        sent = [
            httpx.post(p.url + "/api/v1/commands", json=command(f"core-{i}", payload={"n": n})).json()["request_id"]
            for n in range(10)
            for i, p in enumerate(processes)
        ]
    finally:
        for p in processes:
            p.stop()
    in_kafka = {dict(r.headers)["request_id"].decode() for r in read_topic(kafka_bootstrap, topic, 20)}
    assert in_kafka == set(sent)
