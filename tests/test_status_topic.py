"""The shared status topic, long polls and event streams, and two instances on one broker (real Kafka)."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from datetime import UTC, datetime

import httpx
import jsonschema_rs
import msgspec
import pytest
from helpers import (
    STATUS_CONTRACT,
    STATUS_EVENT_VALIDATOR,
    STATUS_SECRET,
    ServiceProcess,
    command,
    keys_file,
    new_status_topic,
    new_topic,
    read_topic,
    run_cli,
    wait_for,
)
from kafka import KafkaProducer

from pusher_client import CommandFailed, PusherClient, WaitTimeout
from schemas import status_event_schema
from settings import Secret
from status_feed import sign
from validation import decode_command


def _service(tmp_path, bootstrap: str, topic: str, status_topic: str, name: str, **env: str) -> ServiceProcess:
    return ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_COMMAND_TOPIC=topic, KAFKA_STATUS_TOPIC=status_topic,
        INSTANCE_ID=name, **{"STATUS_TOPIC_SECRET": STATUS_SECRET, **env},
    ).start()  # fmt: skip


class Connector:
    """Reports stages on the status topic as a connector would (key: request_id; value: the contract's JSON)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")

    def report(self, request_id: str, device_id: str, status: str, **extra) -> dict:
        event = {
            "request_id": request_id,
            "status": status,
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "source": "test-connector",
            "device_id": device_id,
            **extra,
        }
        STATUS_EVENT_VALIDATOR.validate(event)
        self.producer.send(self.topic, key=request_id.encode(), value=json.dumps(event).encode()).get(10)
        return event

    def close(self) -> None:
        self.producer.close()


@pytest.fixture
def status_topic(kafka_bootstrap: str) -> str:
    """A fresh compacted status topic."""
    return new_status_topic(kafka_bootstrap)


@pytest.fixture
def connector(kafka_bootstrap: str, status_topic: str):
    """Something that reports connector stages."""
    reporter = Connector(kafka_bootstrap, status_topic)
    yield reporter
    reporter.close()


def _statuses(body: dict) -> list[str]:
    return [step["status"] for step in body["history"]]


def test_the_contract_file_is_the_schema_the_service_builds():
    """contract/status-event.schema.json is written from schemas.StatusEvent: they cannot drift apart."""
    assert status_event_schema() == STATUS_CONTRACT
    jsonschema_rs.meta.validate(STATUS_CONTRACT)


def test_own_transitions_go_out_and_connector_stages_come_back(
    kafka_bootstrap, topic, status_topic, connector, tmp_path
):
    """accepted and published are on the status topic (valid per the contract); delivered and succeeded
    reported by a connector come back, repeats and a late lower stage change nothing, the result is kept."""
    service = _service(tmp_path, kafka_bootstrap, topic, status_topic, "solo")
    try:
        posted = httpx.post(f"{service.url}/api/v1/commands", json=command("fb-1", payload={"v": 1})).json()
        rid = posted["request_id"]
        records = read_topic(kafka_bootstrap, status_topic, 2)
        events = [json.loads(r.value) for r in records]
        for event in events:
            STATUS_EVENT_VALIDATOR.validate(event)
        assert [dict(r.headers)["pusher-signature"] for r in records] == [
            sign(Secret(STATUS_SECRET), r.value) for r in records
        ]
        assert [(e["status"], e["request_id"], e["source"]) for e in events] == [
            ("accepted", rid, "pusher@solo"),
            ("published", rid, "pusher@solo"),
        ]
        assert events[1]["offset"] == posted["offset"] and events[0]["device_id"] == "fb-1"

        absurd = [
            b"not json",
            b'{"request_id": "x"}',
            b'{"request_id": "x", "status": "teleported"}',
            None,  # a tombstone
            b'{"request_id": "x", "status": "delivered", "at": "9999-12-31T23:59:59-23:59", "source": "c"}',
            b'{"request_id": "x", "status": "delivered", "at": "2026-01-01T00:00:00Z", "source": "c", "result": '
            + b'{"a": ' * 3000
            + b"1"
            + b"}" * 3001,
            b'{"request_id": "x", "status": "published", "at": "2026-01-01T00:00:00Z", "source": "c", "offset": '
            + str(2**63).encode()
            + b"}",
        ]
        for bad in absurd:
            connector.producer.send(status_topic, key=b"x", value=bad).get(10)  # skipped, and the feed goes on
        connector.report(rid, "fb-1", "delivered")
        connector.report(rid, "fb-1", "delivered")  # a repeat
        connector.report(rid, "fb-1", "succeeded", result={"applied": {"v": 1}})
        connector.report(rid, "fb-1", "delivered")  # late, and lower than succeeded
        body = httpx.get(
            f"{service.url}/api/v1/commands/{rid}/status", params={"wait_for": "succeeded", "timeout": 20}, timeout=30
        ).json()
        assert body["status"] == "succeeded"
        assert _statuses(body) == ["accepted", "published", "delivered", "succeeded"]
        assert body["result"] == {"applied": {"v": 1}}
        time.sleep(0.5)  # the late repeat is applied by now, and must not have moved anything
        again = httpx.get(f"{service.url}/api/v1/commands/{rid}/status").json()
        assert again["status"] == "succeeded" and _statuses(again) == _statuses(body)
        listed = httpx.get(f"{service.url}/api/v1/commands", params={"device_id": "fb-1"}).json()["items"]
        assert [(i["request_id"], i["status"]) for i in listed] == [(rid, "succeeded")]
        feed = httpx.get(f"{service.url}/api/v1/status").json()["status_feed"]
        assert feed["consuming"] is True and feed["events_published"] == 2 and feed["events_ignored"] == len(absurd)
        assert feed["events_applied"] == 6  # our own two, four from the connector
        exposition = httpx.get(f"{service.url}/metrics").text
        assert f'pusher_status_events_total{{direction="ignored"}} {len(absurd)}.0' in exposition
        assert "pusher_status_outbox 0.0" in exposition  # both events acknowledged by the status topic
    finally:
        service.stop()


def test_long_poll_waits_for_the_stage_and_answers_at_its_timeout(
    kafka_bootstrap, topic, status_topic, connector, tmp_path
):
    """wait_for answers as soon as the stage is reached, or with the current status when the time is up; a
    terminal stage ends any wait."""
    service = _service(tmp_path, kafka_bootstrap, topic, status_topic, "poll")
    url = f"{service.url}/api/v1/commands"
    try:
        rid = httpx.post(url, json=command("fb-2")).json()["request_id"]
        assert httpx.get(f"{url}/{rid}/status", params={"wait_for": "published"}).json()["status"] == "published"
        started = time.monotonic()
        timed_out = httpx.get(f"{url}/{rid}/status", params={"wait_for": "delivered", "timeout": 1}, timeout=10)
        assert timed_out.status_code == 200 and timed_out.json()["status"] == "published"
        assert time.monotonic() - started >= 0.9

        answered: dict = {}

        def poll() -> None:
            answered["body"] = httpx.get(
                f"{url}/{rid}/status", params={"wait_for": "succeeded", "timeout": 30}, timeout=40
            ).json()

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.5)
        assert poller.is_alive()
        connector.report(rid, "fb-2", "rejected", error="device offline for good")
        poller.join(20)
        assert not poller.is_alive()
        assert answered["body"]["status"] == "rejected" and answered["body"]["error"] == "device offline for good"
    finally:
        service.stop()


def test_event_stream_sends_each_transition_then_ends(kafka_bootstrap, topic, status_topic, connector, tmp_path):
    """Server-Sent Events: one event per transition as it happens, ending after the last; Last-Event-ID resumes."""
    service = _service(tmp_path, kafka_bootstrap, topic, status_topic, "sse")
    url = f"{service.url}/api/v1/commands"
    try:
        rid = httpx.post(url, json=command("fb-3")).json()["request_id"]
        seen: list[tuple[str, dict]] = []

        def follow() -> None:
            with httpx.stream("GET", f"{url}/{rid}/events", timeout=30) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                event = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        seen.append((event, json.loads(line[6:])))

        follower = threading.Thread(target=follow)
        follower.start()
        wait_for(lambda: len(seen) >= 2, timeout=10)
        connector.report(rid, "fb-3", "delivered")
        wait_for(lambda: len(seen) >= 3, timeout=10)
        connector.report(rid, "fb-3", "succeeded", result={"ok": True})
        follower.join(15)
        assert not follower.is_alive(), "the stream did not end after the last stage"
        assert [e for e, _ in seen] == ["accepted", "published", "delivered", "succeeded"]
        assert seen[-1][1]["result"] == {"ok": True} and seen[0][1]["request_id"] == rid

        resumed = httpx.get(f"{url}/{rid}/events", headers={"Last-Event-ID": "published"}, timeout=10).text
        assert [line[7:] for line in resumed.splitlines() if line.startswith("event: ")] == ["delivered", "succeeded"]
        # All seen: 204, which tells EventSource to stop reconnecting.
        assert httpx.get(f"{url}/{rid}/events", headers={"Last-Event-ID": "succeeded"}).status_code == 204
        unknown = httpx.get(f"{url}/nope/events")
        assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    finally:
        service.stop()


def test_two_instances_share_status_and_idempotency(kafka_bootstrap, topic, status_topic, connector, tmp_path):
    """Commands go to A; B answers their status (long poll included) and the device's list, and a retry of the
    same Idempotency-Key at B is a replay, not a second send. An instance started later catches up."""
    a = _service(tmp_path, kafka_bootstrap, topic, status_topic, "a")
    b = _service(tmp_path, kafka_bootstrap, topic, status_topic, "b")
    late = None
    try:
        headers = {"Idempotency-Key": "fb-two-1"}
        first = httpx.post(f"{a.url}/api/v1/commands", json=command("fb-4", payload={"n": 1}), headers=headers)
        assert first.status_code == 200
        rid = first.json()["request_id"]
        at_b = wait_for(lambda: _get(b.url, rid), timeout=20)
        assert at_b["device_id"] == "fb-4" and at_b["command_type"] == "reboot"
        connector.report(rid, "fb-4", "delivered")
        body = httpx.get(
            f"{b.url}/api/v1/commands/{rid}/status", params={"wait_for": "delivered", "timeout": 20}, timeout=30
        ).json()
        assert _statuses(body) == ["accepted", "published", "delivered"]
        assert body["partition"] == first.json()["partition"] and body["offset"] == first.json()["offset"]
        listed = httpx.get(f"{b.url}/api/v1/commands", params={"device_id": "fb-4"}).json()["items"]
        assert [i["request_id"] for i in listed] == [rid]

        retry = httpx.post(f"{b.url}/api/v1/commands", json=command("fb-4", payload={"n": 1}), headers=headers)
        assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["request_id"] == rid and retry.json()["replayed"] is True
        conflict = httpx.post(f"{b.url}/api/v1/commands", json=command("fb-4", payload={"n": 2}), headers=headers)
        assert conflict.status_code == 409

        connector.report(rid, "fb-4", "succeeded", result={"applied": {"n": 1}})
        wait_for(lambda: (_get(a.url, rid) or {}).get("status") == "succeeded", timeout=20)
        late = _service(tmp_path, kafka_bootstrap, topic, status_topic, "late")
        caught_up = wait_for(lambda: _get(late.url, rid), timeout=20)
        assert caught_up["status"] == "succeeded" and caught_up["result"] == {"applied": {"n": 1}}
    finally:
        for service in (a, b, late):
            if service is not None:
                service.stop()
    assert len(read_topic(kafka_bootstrap, topic, 1, timeout=5)) == 1  # sent once, by A


def _get(url: str, request_id: str) -> dict | None:
    response = httpx.get(f"{url}/api/v1/commands/{request_id}/status", timeout=5)
    return response.json() if response.status_code == 200 else None


def test_a_query_parameter_given_twice_is_a_422_naming_it(service):
    """`?timeout=1&timeout=600` has no one meaning: the status and list reads refuse it, naming the parameter,
    rather than keep one of them silently."""
    rid = httpx.post(f"{service.url}/api/v1/commands", json=command("fb-6")).json()["request_id"]
    twice = [("wait_for", "published"), ("timeout", "1"), ("timeout", "2")]
    for url, params, field in (
        (f"{service.url}/api/v1/commands/{rid}/status", twice, "query.timeout"),
        (f"{service.url}/api/v1/commands", [("limit", "1"), ("limit", "5")], "query.limit"),
    ):
        response = httpx.get(url, params=params)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert [e["loc"] for e in response.json()["errors"]] == [field]


def test_bad_waits_are_clear_422s(service):
    """Without a status topic, waiting for a connector's stage is refused (it would never come), as is an absurd
    timeout or an unknown stage; each names the query field. A timeout above LONG_POLL_MAX is cut to it."""
    rid = httpx.post(f"{service.url}/api/v1/commands", json=command("fb-5")).json()["request_id"]
    url = f"{service.url}/api/v1/commands/{rid}/status"
    for params, field in (
        ({"wait_for": "delivered"}, "query.wait_for"),
        ({"wait_for": "published", "timeout": 3601}, "query.timeout"),
        ({"wait_for": "arrived"}, "query.wait_for"),
    ):
        response = httpx.get(url, params=params)
        assert response.status_code == 422, params
        assert response.headers["content-type"] == "application/problem+json"
        assert [e["loc"] for e in response.json()["errors"]] == [field], params
    assert httpx.get(url, params={"wait_for": "published", "timeout": 500}).json()["status"] == "published"
    # Without a status topic nothing comes after published: a wait for an end answers at once, not at its timeout.
    started = time.monotonic()
    assert httpx.get(url, params={"wait_for": "failed", "timeout": 30}, timeout=40).json()["status"] == "published"
    assert time.monotonic() - started < 20  # far below the 30 s it asked to wait


def test_client_and_cli_wait_for_the_device_stages(kafka_bootstrap, topic, status_topic, connector, tmp_path):
    """PusherClient.wait_for and `pusher status --wait --until` follow a command to delivered and succeeded;
    a rejected one raises CommandFailed (exit 1); a stage not reached in time is WaitTimeout (exit 6)."""
    service = _service(tmp_path, kafka_bootstrap, topic, status_topic, "client")
    client = PusherClient(service.url)
    try:
        result = client.push_command("fb-6", "reboot", {"now": True}, "mqtt")
        with pytest.raises(WaitTimeout):
            client.wait_for(result.request_id, until="delivered", timeout=0.5)
        threading.Timer(0.5, connector.report, (result.request_id, "fb-6", "delivered")).start()
        assert client.wait_for(result.request_id, until="delivered", timeout=20).status == "delivered"
        connector.report(result.request_id, "fb-6", "succeeded", result={"rebooted": True})
        waited = run_cli(
            "status", result.request_id, "--wait", "--until", "succeeded", "--timeout", "20", url=service.url
        )
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["result"] == {"rebooted": True}

        doomed = client.push_command("fb-6", "reboot", {}, "mqtt")
        connector.report(doomed.request_id, "fb-6", "rejected", error="unknown command")
        with pytest.raises(CommandFailed) as failed:
            client.wait_for(doomed.request_id, until="succeeded", timeout=20)
        assert failed.value.command.status == "rejected"
        refused = run_cli("status", doomed.request_id, "--wait", "--until", "succeeded", url=service.url)
        assert refused.returncode == 1
        pending = client.push_command("fb-6", "reboot", {}, "mqtt")
        timed_out = run_cli(
            "status", pending.request_id, "--wait", "--until", "delivered", "--timeout", "0.5", url=service.url
        )
        assert timed_out.returncode == 6
    finally:
        client.close()
        service.stop()


def test_transitions_survive_a_crash_before_they_reach_the_status_topic(own_broker, tmp_path):
    """Commands accepted while Kafka is down: a SIGTERM does not wait for Kafka (the events stay in the
    journal's outbox), nor does a SIGKILL lose them; after the restart the status topic gets every transition
    of every command."""
    own_broker.start()
    status_topic = new_status_topic(own_broker.bootstrap)
    service = _service(tmp_path, own_broker.bootstrap, new_topic(own_broker.bootstrap), status_topic, "crashy")
    own_broker.stop()
    url = f"{service.url}/api/v1/commands"
    sent = [httpx.post(url, json=command(f"crash-{i}"), timeout=20).json() for i in range(3)]
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 15, "shutdown waited for the absent Kafka"
    service.start(wait_ready=False)
    sent += [httpx.post(url, json=command(f"crash-{i}"), timeout=20).json() for i in range(3, 6)]
    assert {c["status"] for c in sent} == {"accepted"}
    service.stop(signal.SIGKILL)
    own_broker.start()
    service.start()
    try:
        events = [json.loads(r.value) for r in read_topic(own_broker.bootstrap, status_topic, 12, timeout=60)]
    finally:
        service.stop()
    by_status = {(e["request_id"], e["status"]) for e in events}
    assert by_status == {(c["request_id"], s) for c in sent for s in ("accepted", "published")}


# ---------------------------------------------------------------- what the status topic may be trusted with

_HASH_ENCODER = msgspec.json.Encoder(order="sorted")


def _body_hash(body: dict) -> str:
    """The hash the service journals for a request body (what a retry is compared by)."""
    return hashlib.sha256(_HASH_ENCODER.encode(decode_command(json.dumps(body).encode(), "json"))).hexdigest()


def _write(producer: KafkaProducer, topic: str, event: dict, secret: str | None = None) -> None:
    """Put `event` on the status topic, signed with `secret` when given, as an instance holding it would."""
    value = json.dumps(event).encode()
    headers = [("pusher-signature", sign(Secret(secret), value))] if secret else []
    producer.send(topic, key=event["request_id"].encode(), value=value, headers=headers).get(10)


def _event(request_id: str, status: str, device_id: str, **extra) -> dict:
    at = datetime.now(UTC).isoformat()
    return {"request_id": request_id, "status": status, "at": at, "device_id": device_id, **extra}


def _feed(url: str, **headers: str) -> dict:
    return httpx.get(f"{url}/api/v1/status", headers=headers, timeout=5).json()["status_feed"]


def _settled(url: str, events: int, **headers: str) -> dict:
    """Wait until the feed has applied or ignored `events` events; its counters."""
    return wait_for(lambda: (f := _feed(url, **headers))["events_applied"] + f["events_ignored"] >= events and f)


def test_a_forged_event_never_turns_a_real_request_into_a_replay(kafka_bootstrap, topic, status_topic, tmp_path):
    """Events planting another key's future Idempotency-Key or request_id with its body hash, unsigned (however
    they name their source) or with a signature made without the secret, are ignored and counted: the victim's
    requests are new commands, answered 200 and really in Kafka, and the planted ids do not exist."""
    service = _service(
        tmp_path, kafka_bootstrap, topic, status_topic, "victim", API_KEYS_FILE=keys_file(tmp_path / "keys.toml")
    )
    writer, admin = {"X-API-Key": "ppk_writer-secret"}, {"X-API-Key": "ppk_admin-secret"}
    bodies = [command("victim-dev", payload={"n": i}) for i in range(3)]
    bodies[2]["request_id"] = "victim-order-2"
    owned = {"source": "pusher@victim", "owner": "writer", "topic": topic, "partition": 0, "offset": 0}
    forged = [
        (_event("planted-0", "published", "victim-dev", idempotency_key="writer\x1fkey-0", **owned), None),
        (_event("planted-1", "published", "victim-dev", idempotency_key="writer\x1fkey-1", **owned), "x" * 40),
        (_event("victim-order-2", "published", "victim-dev", **owned), None),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for (event, secret), body in zip(forged, bodies, strict=True):
            _write(producer, status_topic, {**event, "body_hash": _body_hash(body)}, secret)
        _settled(service.url, len(forged), **admin)
        answers = [
            httpx.post(f"{service.url}/api/v1/commands", json=body, headers={**writer, "Idempotency-Key": f"key-{i}"})
            for i, body in enumerate(bodies)
        ]
        assert [(a.status_code, a.json().get("replayed", False)) for a in answers] == [(200, False)] * 3
        assert not any("idempotent-replayed" in a.headers for a in answers)
        for planted in ("planted-0", "planted-1"):
            assert httpx.get(f"{service.url}/api/v1/commands/{planted}/status", headers=admin).status_code == 404
        sent = {a.json()["request_id"] for a in answers}
        assert "victim-order-2" in sent and not sent & {"planted-0", "planted-1"}
        assert _feed(service.url, **admin)["events_ignored"] == len(forged)
        metrics = httpx.get(f"{service.url}/metrics", headers=admin).text
        assert f'pusher_status_events_total{{direction="ignored"}} {len(forged)}.0' in metrics
    finally:
        producer.close()
        service.stop()
    in_kafka = [dict(r.headers)["request_id"].decode() for r in read_topic(kafka_bootstrap, topic, 3)]
    assert sorted(in_kafka) == sorted(sent)


def test_a_connector_event_naming_another_device_does_not_move_the_command(
    kafka_bootstrap, topic, status_topic, connector, tmp_path
):
    """A device (or its connector) cannot settle another device's command: an unsigned event whose device_id is
    not the command's is ignored and counted; the same event for the right device is applied."""
    service = _service(tmp_path, kafka_bootstrap, topic, status_topic, "devices")
    try:
        rid = httpx.post(f"{service.url}/api/v1/commands", json=command("device-a")).json()["request_id"]
        before = _settled(service.url, 2)  # our own accepted and published, back from the topic
        connector.report(rid, "device-zzz", "succeeded", result={"forged": True})
        after = _settled(service.url, before["events_applied"] + before["events_ignored"] + 1)
        assert after["events_ignored"] == before["events_ignored"] + 1
        body = httpx.get(f"{service.url}/api/v1/commands/{rid}/status").json()
        assert body["status"] == "published" and body["result"] is None
        connector.report(rid, "device-a", "delivered")
        body = httpx.get(
            f"{service.url}/api/v1/commands/{rid}/status", params={"wait_for": "delivered", "timeout": 20}, timeout=30
        ).json()
        assert _statuses(body) == ["accepted", "published", "delivered"]
    finally:
        service.stop()


def test_events_signed_by_another_instance_are_applied_and_the_previous_secret_verifies(
    kafka_bootstrap, topic, status_topic, tmp_path
):
    """With STATUS_TOPIC_SECRET rotated (the old one in STATUS_TOPIC_SECRET_PREVIOUS): events signed with either
    are another instance's and make rows, keys included (a retry of theirs here is a replay); one signed with any
    other secret is ignored; this instance signs its own with the new secret only."""
    new_secret = "the-rotated-status-topic-secret-0123456789"
    service = _service(
        tmp_path, kafka_bootstrap, topic, status_topic, "rotated",
        STATUS_TOPIC_SECRET=new_secret, STATUS_TOPIC_SECRET_PREVIOUS=STATUS_SECRET,
    )  # fmt: skip
    body = command("remote-dev", payload={"remote": True})
    remote = {"source": "pusher@elsewhere", "command_type": "reboot"}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        accepted = _event("remote-0", "accepted", "remote-dev", idempotency_key="k-remote", body_hash=_body_hash(body))
        _write(producer, status_topic, {**accepted, **remote}, STATUS_SECRET)
        _write(producer, status_topic, {**_event("remote-1", "published", "remote-dev"), **remote}, new_secret)
        _write(producer, status_topic, {**_event("remote-2", "published", "remote-dev"), **remote}, "y" * 40)
        assert _settled(service.url, 3)["events_ignored"] == 1
        assert _get(service.url, "remote-0")["status"] == "accepted"
        assert _get(service.url, "remote-1")["status"] == "published"
        assert _get(service.url, "remote-2") is None
        retry = httpx.post(f"{service.url}/api/v1/commands", json=body, headers={"Idempotency-Key": "k-remote"})
        assert retry.headers["Idempotent-Replayed"] == "true" and retry.json()["request_id"] == "remote-0"
        own = httpx.post(f"{service.url}/api/v1/commands", json=command("own-dev")).json()["request_id"]
        records = [r for r in read_topic(kafka_bootstrap, status_topic, 5) if r.key == own.encode()]
        assert len(records) == 2
        for record in records:
            signature = dict(record.headers)["pusher-signature"]
            assert signature == sign(Secret(new_secret), record.value) != sign(Secret(STATUS_SECRET), record.value)
    finally:
        producer.close()
        service.stop()
    assert [r.key for r in read_topic(kafka_bootstrap, topic, 1, timeout=3)] == [b"own-dev"]  # the replay sent nothing
