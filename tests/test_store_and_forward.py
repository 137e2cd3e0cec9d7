"""The journal's promise end to end: real broker, real service processes, real files, real kills."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
from helpers import (
    ServiceProcess,
    command,
    new_topic,
    read_to_end,
    read_topic,
    ready,
    record_figure,
    record_figures,
    service_on,
    status_of,
    wait_for,
)
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from journal import Journal, NewCommand


def _by_request_id(records) -> Counter:
    return Counter(dict(r.headers)["request_id"].decode() for r in records)


def _assert_device_order(records) -> None:
    """Within each device, `payload.seq` rises with the offset."""
    per_device = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        per_device[record.key].append(json.loads(record.value)["payload"]["seq"])
    for device, seqs in per_device.items():
        assert seqs == sorted(seqs), f"{device!r} out of order: {seqs[:20]}"


def test_outage_10000_commands_are_202_then_in_kafka_exactly_once_in_order(own_broker, tmp_path):
    """Kafka stopped: 10,000 commands → all 202; Kafka back → all in Kafka exactly once, each device in order."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1")
    try:
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])

        def send(devices: list[str]) -> list[tuple[int, str]]:
            answers = []
            with httpx.Client(base_url=service.url, timeout=30) as http:
                for seq in range(10_000 // 50):
                    for device in devices:
                        response = http.post("/api/v1/commands", json=command(device, payload={"seq": seq}))
                        answers.append((response.status_code, response.json().get("request_id")))
            return answers

        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            groups = [[f"dev-{g}-{i}" for i in range(10)] for g in range(5)]
            answers = [a for part in pool.map(send, groups) for a in part]
        record_figure("outage_accept_commands_per_s_full_sync", round(len(answers) / (time.monotonic() - started)))
        assert len(answers) == 10_000
        assert Counter(code for code, _ in answers) == {202: 10_000}
        assert ready(service.url)["backlog"] == 10_000
        metrics = httpx.get(service.url + "/api/v1/metrics").json()
        assert metrics["backlog"] == 10_000 and metrics["commands_accepted"] == 10_000
        assert metrics["oldest_pending_age_seconds"] > 0
        status = httpx.get(service.url + "/api/v1/status").json()
        assert status["backlog"] == 10_000 and status["kafka_connected"] is False and status["journal_writable"]

        own_broker.start()
        recovery = service.wait_drained(timeout=180)
        record_figure("outage_recovery_seconds_10000", round(recovery, 2))
        metrics = httpx.get(service.url + "/api/v1/metrics").json()
        assert metrics["backlog"] == 0 and metrics["commands_processed"] == 10_000
        assert metrics["oldest_pending_age_seconds"] is None
        records = read_topic(own_broker.bootstrap, topic, 10_000)
        counts = _by_request_id(records)
        assert len(records) == 10_000 and set(counts) == {rid for _, rid in answers}
        assert max(counts.values()) == 1
        _assert_device_order(records)
    finally:
        service.stop()


def test_a_long_backlog_comes_back_after_a_crash_and_drains_once_in_order_around_a_cancel(own_broker, tmp_path):
    """Kafka down: more commands than the forwarder keeps whole (the plain ones wait in the journal alone), with a
    setpoint among them; SIGKILL, start again. One recovered from the middle is cancelled (200), a newer setpoint
    supersedes the recovered one, more commands come after the restart; Kafka back: every other command is in
    Kafka once, each device in order."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1")
    devices = [f"spill-{n}" for n in range(8)]

    def send(pair: int, seqs: range) -> list[str]:
        ids = []
        with httpx.Client(base_url=service.url, timeout=30) as http:
            for seq in seqs:
                device = devices[2 * pair + seq % 2]
                response = http.post("/api/v1/commands", json=command(device, payload={"seq": seq}))
                assert response.status_code == 202, response.text
                ids.append(response.json()["request_id"])
        return ids

    try:
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])
        with ThreadPoolExecutor(4) as pool:
            before = [rid for ids in pool.map(send, range(4), [range(1300)] * 4) for rid in ids]
        setpoint = httpx.post(service.url + "/api/v1/commands", timeout=30,
                              json=command("spill-thermo", payload={"seq": 0}, coalesce_key="sp"))  # fmt: skip
        assert setpoint.status_code == 202
        service.stop(signal.SIGKILL)
        service.start(wait_ready=False)
        doomed = before[2600]  # recovered in the middle of the backlog
        cancelled = httpx.delete(f"{service.url}/api/v1/commands/{doomed}", timeout=30)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        assert httpx.delete(f"{service.url}/api/v1/commands/{doomed}", timeout=30).json()["status"] == "cancelled"
        newer = httpx.post(service.url + "/api/v1/commands", timeout=30,
                           json=command("spill-thermo", payload={"seq": 1}, coalesce_key="sp"))  # fmt: skip
        assert newer.json()["superseded"] == [setpoint.json()["request_id"]]
        with ThreadPoolExecutor(4) as pool:
            after = [rid for ids in pool.map(send, range(4), [range(1300, 1400)] * 4) for rid in ids]
        assert ready(service.url)["backlog"] == len(before) + len(after)  # one cancelled, one setpoint replaced
        own_broker.start()
        service.wait_drained(timeout=180)
        expected = {*before, *after, newer.json()["request_id"]} - {doomed}
        records = read_topic(own_broker.bootstrap, topic, len(expected))
        counts = _by_request_id(records)
        assert set(counts) == expected and max(counts.values()) == 1
        _assert_device_order(records)
        assert status_of(service.url, doomed)["status"] == "cancelled"
    finally:
        service.stop()


def test_a_backlog_drains_once_in_order_when_the_topic_takes_smaller_batches_than_the_producer_makes(
    own_broker, tmp_path
):
    """The topic's max.message.bytes shrinks below the producer's batch (256 KiB) after it connected, then Kafka
    goes away and a backlog builds: the broker refuses the drain's large batches, kafka-python splits them and sends
    them again, and every command is in Kafka once, each device in order."""
    topic, service = service_on(own_broker, tmp_path)

    def send(worker: int) -> list[str]:  # each worker has two devices of its own: their order is its order
        with httpx.Client(base_url=service.url, timeout=30) as http:
            answers = [
                http.post(
                    "/api/v1/commands",
                    json=command(f"split-{worker}-{seq % 2}", payload={"seq": seq, "pad": "x" * 400}),
                )
                for seq in range(600)
            ]
        assert {a.status_code for a in answers} == {202}, answers[0].text
        return [a.json()["request_id"] for a in answers]

    try:
        admin = KafkaAdminClient(bootstrap_servers=own_broker.bootstrap)
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": "20000"})])
        admin.close()
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])
        with ThreadPoolExecutor(4) as pool:
            sent = [rid for ids in pool.map(send, range(4)) for rid in ids]
        own_broker.start()
        service.wait_drained(timeout=180)
        records = read_topic(own_broker.bootstrap, topic, len(sent))
        counts = _by_request_id(records)
        assert set(counts) == set(sent) and max(counts.values()) == 1
        _assert_device_order(records)
    finally:
        service.stop()


def test_sigkill_ten_times_under_load_loses_nothing_and_doubles_nothing(kafka_bootstrap, topic, tmp_path):
    """SIGKILL ×10 during 20,000 commands from clients retrying with the same Idempotency-Key until a 2xx."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    per_client, clients = 2_500, 8
    answered: dict[str, str] = {}  # idempotency key -> request id of its 2xx
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=service.url, timeout=10) as http:
            for seq in range(per_client):
                key = f"c{n}-{seq}"
                body = command(f"kill-dev-{n}", payload={"seq": seq})
                while True:
                    try:
                        response = http.post("/api/v1/commands", json=body, headers={"Idempotency-Key": key})
                        if response.status_code in (200, 202):
                            with lock:
                                answered[key] = response.json()["request_id"]
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.02)

    kills = 0
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, n) for n in range(clients)]
        while kills < 10:
            time.sleep(random.uniform(0.8, 1.6))
            service.stop(signal.SIGKILL)
            kills += 1
            service.start(wait_ready=False)
        for future in futures:
            future.result()
    try:
        service.wait_drained(timeout=120)
    finally:
        service.stop()

    records = read_topic(kafka_bootstrap, topic, len(answered))
    counts = _by_request_id(records)
    missing = [key for key, rid in answered.items() if rid not in counts]
    duplicates = sum(c - 1 for c in counts.values())
    record_figures(
        {
            "kill_test_commands": len(answered),
            "kill_test_kills": kills,
            "kill_test_duplicates": duplicates,
            "kill_test_missing": len(missing),
        }
    )
    assert len(answered) == per_client * clients
    assert not missing, f"{len(missing)} commands answered 2xx are not in Kafka"
    assert set(counts) == set(answered.values()), "Kafka holds commands nobody was answered for"
    assert duplicates == 0, f"{duplicates} duplicates"
    _assert_device_order(records)


def test_ttl_expires_during_outage_and_is_never_sent(own_broker, tmp_path):
    """A 1 s TTL command stored during an outage is marked expired and never reaches Kafka."""
    topic, service = service_on(own_broker, tmp_path)
    try:
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])
        short = httpx.post(service.url + "/api/v1/commands", json=command("ttl-dev", ttl_seconds=1)).json()
        kept = httpx.post(service.url + "/api/v1/commands", json=command("ttl-dev", ttl_seconds=600)).json()
        assert short["status"] == "accepted" and short["expires_at"]
        wait_for(lambda: status_of(service.url, short["request_id"])["status"] == "expired", timeout=10)
        own_broker.start()
        wait_for(lambda: status_of(service.url, kept["request_id"])["status"] == "published")
        records = read_topic(own_broker.bootstrap, topic, 1)
        assert [dict(r.headers)["request_id"].decode() for r in records] == [kept["request_id"]]
        history = [t["status"] for t in status_of(service.url, short["request_id"])["history"]]
        assert history == ["accepted", "expired"]
    finally:
        service.stop()


def test_ttl_command_caught_inside_the_producer_by_an_outage_is_not_sent_late(own_broker, tmp_path):
    """Kafka dies before the service notices: the command is already in the producer. Past PUBLISH_TIMEOUT the
    producer is aborted; when Kafka returns the command is looked up, not found, and expired — never sent."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1")
    try:
        own_broker.stop(signal.SIGKILL)
        url = service.url + "/api/v1/commands"
        short = httpx.post(url, json=command("late", payload={"seq": 0}, ttl_seconds=2)).json()
        kept = httpx.post(url, json=command("late", payload={"seq": 1}, ttl_seconds=600)).json()
        assert (short["status"], kept["status"]) == ("accepted", "accepted")
        time.sleep(3)
        own_broker.start()
        wait_for(lambda: status_of(service.url, kept["request_id"])["status"] == "published")
        assert status_of(service.url, short["request_id"])["status"] == "expired"
        records = read_topic(own_broker.bootstrap, topic, 1)
        assert [dict(r.headers)["request_id"].decode() for r in records] == [kept["request_id"]]
    finally:
        service.stop()


def test_expires_at_travels_in_body_and_header(service, kafka_bootstrap, topic):
    """expires_at (from ttl_seconds) is in the Kafka value and in an `expires_at` header, ISO 8601 UTC."""
    response = httpx.post(service.url + "/api/v1/commands", json=command(ttl_seconds=60))
    assert response.status_code == 200
    [record] = read_topic(kafka_bootstrap, topic, 1)
    value = json.loads(record.value)
    assert value["expires_at"] == response.json()["expires_at"] and value["expires_at"].endswith("Z")
    assert dict(record.headers)["expires_at"].decode() == value["expires_at"]


def test_idempotency_replay_conflict_and_fifty_concurrent_duplicates(service, kafka_bootstrap, topic):
    """A replay returns the original result marked Idempotent-Replayed; another body is 409; 50 at once → 1 message."""
    url = service.url + "/api/v1/commands"
    first = httpx.post(url, json=command("idem"), headers={"Idempotency-Key": "key-1"})
    again = httpx.post(url, json=command("idem"), headers={"Idempotency-Key": "key-1"})
    assert first.status_code == 200 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.json()["offset"] == first.json()["offset"] and again.json()["status"] == "published"
    conflict = httpx.post(url, json=command("idem", payload={"x": 1}), headers={"Idempotency-Key": "key-1"})
    assert conflict.status_code == 409 and conflict.headers["content-type"] == "application/problem+json"

    by_request_id = [httpx.post(url, json=command("idem", request_id="rid-7")) for _ in range(2)]
    assert by_request_id[1].headers["idempotent-replayed"] == "true"
    assert httpx.post(url, json=command("idem", request_id="rid-7", payload={"y": 2})).status_code == 409

    def post(_):
        return httpx.post(url, json=command("burst"), headers={"Idempotency-Key": "burst-key"}, timeout=30)

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(post, range(50)))
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json()["request_id"] for r in responses}) == 1
    records = read_topic(kafka_bootstrap, topic, 3)
    assert Counter(r.key for r in records) == {b"idem": 2, b"burst": 1}


def test_batch_idempotency_key_covers_each_item(service, kafka_bootstrap, topic):
    """Retrying a whole batch with its Idempotency-Key publishes nothing new."""
    body = {"commands": [command("b1"), command("b2")]}
    url = service.url + "/api/v1/commands/batch"
    first = httpx.post(url, json=body, headers={"Idempotency-Key": "batch-1"})
    again = httpx.post(url, json=body, headers={"Idempotency-Key": "batch-1"})
    assert first.status_code == 200 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert [r["request_id"] for r in again.json()["results"]] == [r["request_id"] for r in first.json()["results"]]
    assert len(read_topic(kafka_bootstrap, topic, 2)) == 2


def test_prefer_respond_async_answers_after_the_commit(service):
    """`Prefer: respond-async` answers 202 right after the journal commit; the command is published anyway."""
    response = httpx.post(service.url + "/api/v1/commands", json=command("async"), headers={"Prefer": "respond-async"})
    assert response.status_code == 202 and response.headers["preference-applied"] == "respond-async"
    wait_for(lambda: status_of(service.url, response.json()["request_id"])["status"] == "published", timeout=10)


def test_journal_full_is_503_then_recovers(own_broker, tmp_path):
    """At JOURNAL_MAX_PENDING commands waiting for Kafka: 503 with Retry-After; Kafka back: room again."""
    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=own_broker.bootstrap, KAFKA_COMMAND_TOPIC="full", JOURNAL_MAX_PENDING="5"
    ).start(wait_ready=False)
    try:
        url = service.url + "/api/v1/commands"
        stored = [httpx.post(url, json=command("full-dev", payload={"seq": i})) for i in range(5)]
        assert [r.status_code for r in stored] == [202] * 5
        refused = httpx.post(url, json=command("full-dev", payload={"seq": 5}))
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["type"] == "/problems/journal-full"
        own_broker.start()
        new_topic(own_broker.bootstrap, name="full")
        service.wait_drained()
        assert httpx.post(url, json=command("full-dev", payload={"seq": 6})).status_code == 200
    finally:
        service.stop()


def test_permanent_kafka_error_fails_alone(kafka_bootstrap, tmp_path):
    """A command Kafka will never take (too large for the topic) is `failed` with the reason; later ones flow."""
    topic = new_topic(kafka_bootstrap, configs={"max.message.bytes": "2000"})
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    try:
        url = service.url + "/api/v1/commands"
        big = httpx.post(url, json=command("perm", payload={"blob": "x" * 5000}))
        assert big.status_code == 502 and big.json()["type"] == "/problems/kafka-rejected"
        failed = httpx.get(service.url + "/api/v1/commands?device_id=perm").json()["items"][0]
        assert failed["status"] == "failed" and "larger than the topic's 2000 bytes" in failed["error"]
        after = httpx.post(url, json=command("perm", payload={"small": 1}))
        assert after.status_code == 200
    finally:
        service.stop()


def test_refusal_by_the_broker_does_not_poison_later_commands(kafka_bootstrap, topic, tmp_path):
    """The topic's limit shrinks behind our back: Kafka itself refuses the record; the next ones still flow."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    try:
        url = service.url + "/api/v1/commands"
        assert httpx.post(url, json=command("shrink", payload={"seq": 0})).status_code == 200
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": "2000"})])
        admin.close()
        big = httpx.post(url, json=command("shrink", payload={"seq": 1, "blob": "x" * 5000}))
        assert big.status_code == 502, big.text
        after = [httpx.post(url, json=command("shrink", payload={"seq": n})) for n in (2, 3)]
        assert [r.status_code for r in after] == [200, 200], [r.text for r in after]
    finally:
        service.stop()
    records = read_topic(kafka_bootstrap, topic, 3)
    assert [json.loads(r.value)["payload"]["seq"] for r in sorted(records, key=lambda r: r.offset)] == [0, 2, 3]


def test_status_and_device_list_survive_a_restart(kafka_bootstrap, topic, tmp_path):
    """After a restart the status (with every transition) and the per-device list come from the journal."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    sent = [
        httpx.post(service.url + "/api/v1/commands", json=command("listed", payload={"seq": i})).json()
        for i in range(5)
    ]
    httpx.post(service.url + "/api/v1/commands", json=command("other"))
    service.stop()
    service.start()
    try:
        status = status_of(service.url, sent[0]["request_id"])
        assert status["status"] == "published" and status["offset"] == sent[0]["offset"]
        assert [t["status"] for t in status["history"]] == ["accepted", "published"]
        page = httpx.get(service.url + "/api/v1/commands", params={"device_id": "listed", "limit": 3}).json()
        assert [c["request_id"] for c in page["items"]] == [s["request_id"] for s in reversed(sent)][:3]
        rest = httpx.get(
            service.url + "/api/v1/commands", params={"device_id": "listed", "before": page["next_before"]}
        ).json()
        assert [c["request_id"] for c in rest["items"]] == [sent[1]["request_id"], sent[0]["request_id"]]
        assert rest["next_before"] is None
        published = httpx.get(service.url + "/api/v1/commands", params={"status": "published"}).json()["items"]
        assert len(published) == 6
        bad = httpx.get(service.url + "/api/v1/commands", params={"limit": 0, "status": "lost"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"].startswith("query.")
    finally:
        service.stop()


def test_restart_reconciles_records_already_in_kafka(kafka_bootstrap, topic, tmp_path):
    """A journaled command that reached Kafka before a crash is found there and not sent again. The others are
    sent, though records with their request_id header are in the topic: one with another body, one with the same
    key and body but another instance's header. Only the same record, every header of ours included, counts."""
    journal_path = tmp_path / "journal.db"
    journal = Journal(journal_path)
    journal.open()

    def record(request_id: str, instance: str = f"test/{journal.journal_id}") -> NewCommand:
        value = json.dumps({"request_id": request_id, "payload": {"seq": 0}}).encode()
        return NewCommand(
            request_id=request_id,
            idem_key=None,
            client_request_id=False,
            body_hash=b"h",
            device_id="rec",
            command_type="reboot",
            created_at=time.time(),
            expires_at=None,
            key=b"rec",
            value=value,
            headers=[
                ("request_id", request_id.encode()),
                ("pusher-instance", instance.encode()),
                ("body-sha256", hashlib.sha256(value).hexdigest().encode()),
            ],
        )

    landed, lost, forged, copied = (str(uuid.uuid4()) for _ in range(4))
    ours = [record(landed), record(lost), record(forged), record(copied)]

    async def accept_all() -> None:
        await journal.accept(ours)

    asyncio.run(accept_all())
    journal.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    metadata = producer.send(topic, key=b"rec", value=ours[0].value, headers=ours[0].headers).get(10)
    producer.send(topic, key=b"rec", value=b'{"payload": "other"}', headers=[("request_id", forged.encode())]).get(10)
    theirs = record(copied, instance="elsewhere/0123456789abcdef")
    producer.send(topic, key=b"rec", value=theirs.value, headers=theirs.headers).get(10)
    producer.close()

    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, JOURNAL_PATH=str(journal_path)
    ).start()
    try:
        service.wait_drained()
        assert status_of(service.url, landed)["offset"] == metadata.offset
        for request_id in (lost, forged, copied):
            assert status_of(service.url, request_id)["offset"] > metadata.offset + 2
    finally:
        service.stop()
    counts = _by_request_id(read_to_end(kafka_bootstrap, topic))  # drained: everything sent is in the topic
    assert counts == {landed: 1, lost: 1, forged: 2, copied: 2}


def test_two_instances_with_one_request_id_each_send_their_own_after_a_crash(kafka_bootstrap, tmp_path):
    """Request ids are unique per journal, not per topic. Instance B journals order-42 and is killed (SIGKILL)
    before sending it; instance A sends its own order-42. After B's restart its command, of unknown fate, is
    looked up in Kafka: A's record is not B's. Each is in Kafka exactly once, with its instance and body hash."""
    topic = f"cmd-{uuid.uuid4().hex[:12]}"  # not there yet: B can only journal
    body = command("orders", request_id="order-42", payload={"qty": 1})
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_COMMAND_TOPIC": topic}
    b = ServiceProcess(tmp_path, INSTANCE_ID="b", **env).start(wait_ready=False)
    assert httpx.post(b.url + "/api/v1/commands", json=body, timeout=30).status_code == 202
    b.stop(signal.SIGKILL)
    new_topic(kafka_bootstrap, name=topic)
    a = ServiceProcess(tmp_path, INSTANCE_ID="a", **env).start()
    try:
        assert httpx.post(a.url + "/api/v1/commands", json=body, timeout=30).status_code == 200
        b.start()
        b.wait_drained()
        at_b = status_of(b.url, "order-42")
    finally:
        a.stop()
        b.stop()
    records = read_topic(kafka_bootstrap, topic, 2)
    assert _by_request_id(records) == {"order-42": 2}
    by_instance = Counter(dict(r.headers)["pusher-instance"].decode().split("/")[0] for r in records)
    assert by_instance == {"a": 1, "b": 1}
    for record in records:
        headers = dict(record.headers)
        assert headers["request_id"] == b"order-42"
        assert headers["body-sha256"] == hashlib.sha256(record.value).hexdigest().encode()
    [b_record] = [r for r in records if dict(r.headers)["pusher-instance"].startswith(b"b/")]
    assert at_b["status"] == "published" and at_b["offset"] == b_record.offset


def test_full_disk_is_a_clear_503_and_the_service_recovers(kafka_bootstrap, topic, tmp_path):
    """The journal's file system (a 2 MiB tmpfs, far smaller than JOURNAL_MAX_DISK) fills up: 503
    journal-unavailable with Retry-After, never a 500, the process up, and one ERROR line for the whole episode
    however many commands are refused; space back: 2xx again by itself, the file intact, every command answered
    2xx in it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    assert mounted.returncode == 0, f"mounting a tmpfs needs root: {mounted.stderr.decode()}"
    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, JOURNAL_PATH=str(disk / "j.db")
    ).start()
    try:
        url = service.url + "/api/v1/commands"
        answers = [httpx.post(url, json=command("disk")) for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5
        filler = disk / "filler"
        # Unbuffered: no bytes are left to flush at close, where a full disk would raise again.
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        during = [httpx.post(url, json=command("disk", payload={"blob": "y" * 20_000})) for _ in range(30)]
        answers += during
        refused = [a for a in during if a.status_code == 503]
        assert len(refused) > 1 and {a.status_code for a in during} <= {200, 202, 503}, [a.status_code for a in during]
        problem = refused[0].json()
        assert problem["type"] == "/problems/journal-unavailable" and "disk is full" in problem["detail"]
        assert refused[0].headers["retry-after"]
        body = ready(service.url)
        assert body["ready"] is False and "disk is full" in body["reason"]
        assert httpx.get(service.url + "/health").status_code == 200
        filler.unlink()
        answers.append(wait_for(lambda: (a := httpx.post(url, json=command("disk"))).status_code == 200 and a))
        assert ready(service.url)["ready"] is True
        service.stop()
        lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
        [error] = [line for line in lines if line["level"] == "error"]
        assert error["event"] == "journal write failed" and "disk is full" in error["error"]
        [again] = [line for line in lines if line["event"] == "journal writable again"]
        assert again["refused"] >= len(refused)
        stored = [a.json()["request_id"] for a in answers if a.status_code in (200, 202)]
        with contextlib.closing(sqlite3.connect(disk / "j.db")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            found = dict(conn.execute("SELECT request_id, status FROM commands"))
        assert {rid: found.get(rid) for rid in stored} == dict.fromkeys(stored, "published")
    finally:
        service.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)


SMALL_DISK = {"JOURNAL_MAX_DISK": "2MiB", "JOURNAL_MAX_BYTES": "1MiB"}


def _files_on_disk(path) -> int:
    """The journal's database file and its WAL, as the disk has them now."""
    return sum(os.stat(f"{path}{suffix}").st_size for suffix in ("", "-wal") if os.path.exists(f"{path}{suffix}"))


def _figures(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("pusher_"))}


def test_a_small_disk_ceiling_holds_while_kafka_takes_everything(kafka_bootstrap, topic, tmp_path):
    """JOURNAL_MAX_DISK=2MiB and 20,000 commands in batches, about ten times what it holds: every one reaches
    Kafka exactly once; the journal's files are under the ceiling as the writer measures them after each commit
    (the metric), and also as another thread finds them, looking every millisecond throughout; the oldest
    finished commands were pruned to make room (their status is gone, the newest kept)."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, **SMALL_DISK)
    service.start()
    journal, sent, sizes, measured, done = service.env["JOURNAL_PATH"], [], [], [], threading.Event()

    def look() -> None:
        while not done.wait(0.001):
            with contextlib.suppress(OSError):  # the WAL truncated under our feet
                sizes.append(_files_on_disk(journal))

    looking = threading.Thread(target=look)
    looking.start()
    try:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            for batch in range(200):
                body = {"commands": [command(f"dev-{i % 20}", payload={"seq": batch}) for i in range(100)]}
                answer = http.post("/api/v1/commands/batch", json=body)
                assert answer.status_code in (200, 202), answer.text
                sent += [result["request_id"] for result in answer.json()["results"]]
                measured.append(_figures(service.url)["pusher_journal_disk_bytes"])
        service.wait_drained()
        figures = _figures(service.url)
        assert figures["pusher_journal_disk_ceiling_bytes"] == 2 * 1024**2
        assert 0 < figures["pusher_journal_disk_bytes"] <= 2 * 1024**2
        assert figures["pusher_journal_pruned_commands_total"] > 15_000
        assert httpx.get(f"{service.url}/api/v1/commands/{sent[0]}/status").status_code == 404
        assert status_of(service.url, sent[-1])["status"] == "published"
    finally:
        done.set()
        looking.join()
        service.stop()
    record_figures(
        {
            "disk_ceiling_2mib_largest_seen": max(sizes),
            "disk_ceiling_2mib_looks": len(sizes),
            "disk_ceiling_2mib_pruned": int(figures["pusher_journal_pruned_commands_total"]),
        }
    )
    assert max(measured) <= 2 * 1024**2 and sum(size > 1024**2 for size in measured) > 100, max(measured)
    over = [size for size in sizes if size > 2 * 1024**2]
    assert over == [] and sum(size > 1024**2 for size in sizes) > len(sizes) // 2, (len(over), max(sizes))
    records = read_topic(kafka_bootstrap, topic, len(sent), timeout=60)
    assert _by_request_id(records) == dict.fromkeys(sent, 1)


def test_commands_waiting_for_kafka_fill_the_ceiling_then_503_and_nothing_is_lost(own_broker, tmp_path):
    """Kafka down and JOURNAL_MAX_DISK=2MiB: commands are stored (202) until waiting ones alone fill the ceiling,
    then refused with 503 journal-full, Retry-After and a detail naming JOURNAL_MAX_DISK, the files under the
    ceiling; Kafka back, every command answered 202 reaches it exactly once and new ones are taken again."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1", **SMALL_DISK)
    try:
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])
        stored, refused = [], None
        with httpx.Client(base_url=service.url, timeout=30) as http:
            for seq in range(20_000):
                answer = http.post("/api/v1/commands", json=command(f"dev-{seq % 10}", payload={"seq": seq}))
                if answer.status_code == 503:
                    refused = answer
                    break
                assert answer.status_code == 202, answer.text
                stored.append(answer.json()["request_id"])
        assert refused is not None, "the ceiling was never reached"
        problem = refused.json()
        assert problem["type"] == "/problems/journal-full" and "JOURNAL_MAX_DISK" in problem["detail"]
        assert int(refused.headers["retry-after"]) > 0
        assert ready(service.url)["backlog"] == len(stored) > 1000
        record_figure("disk_ceiling_2mib_waiting_at_503", len(stored))
        assert _files_on_disk(service.env["JOURNAL_PATH"]) <= 2 * 1024**2
        own_broker.start()
        service.wait_drained(timeout=120)
        after = httpx.post(service.url + "/api/v1/commands", json=command("dev-after", payload={"seq": 0}))
        assert after.status_code == 200, after.text
    finally:
        service.stop()
    records = read_topic(own_broker.bootstrap, topic, len(stored) + 1, timeout=60)
    assert _by_request_id(records) == dict.fromkeys([*stored, after.json()["request_id"]], 1)
    _assert_device_order([r for r in records if r.key != b"dev-after"])
