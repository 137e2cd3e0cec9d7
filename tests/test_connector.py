"""The reference MQTT connector and simulated device (examples/) end to end: the service, a real Kafka broker,
a real mosquitto broker, and every status event read back from the status topic and checked against the contract."""

from __future__ import annotations

import getpass
import importlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from helpers import (
    ROOT,
    STATUS_EVENT_VALIDATOR,
    STATUS_SECRET,
    ServiceProcess,
    command,
    new_topic,
    read_topic,
)
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from kafka_local import free_port, port_open, stop_process
from paho.mqtt.enums import CallbackAPIVersion

EXAMPLES = ROOT / "examples"


class Mosquitto:
    """A mosquitto broker of the tests' own on a free loopback port, with a config file of its own; stopped by
    PID. It runs as the current user (as root it would switch to `mosquitto`, which cannot write the temp folder)."""

    def __init__(self, folder: Path, persistent: bool = False) -> None:
        self.binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        self.port = free_port()
        self.config = folder / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", f"user {getpass.getuser()}"]
        if persistent:
            # Sessions (subscriptions, queued messages) are saved at shutdown and restored at start.
            lines += ["persistence true", f"persistence_location {folder}/"]
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = folder / f"mosquitto-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        """Start it and wait until it listens; fail the test (never skip) when it cannot."""
        if self.binary is None:
            pytest.fail("mosquitto is not installed (scripts/system-packages.sh installs it)", pytrace=False)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mosquitto did not start:\n{self.log_path.read_text(errors='replace')}", pytrace=False)
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop it by PID."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@pytest.fixture(scope="module")
def mqtt_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a mosquitto broker shared by this module's tests."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker.port
    broker.stop()


class Example:
    """One of the examples as a process, logging to its own file."""

    def __init__(self, script: str, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log_start = log_path.stat().st_size if log_path.exists() else 0  # a restart appends to the same file
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(EXAMPLES / script), *args], stdout=log, stderr=subprocess.STDOUT
            )

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the process has printed `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.log_path.name}: no {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, and the process must exit cleanly."""
        code = stop_process(self.process, signal.SIGTERM, timeout=15)
        assert code == 0, f"{self.log_path.name} exited with {code}:\n{self.log()[-3000:]}"

    def log(self) -> str:
        """What this process printed so far."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")


class Setup:
    """The service publishing to a fresh command topic, a fresh status topic, and the examples around them."""

    def __init__(
        self,
        bootstrap: str,
        mqtt_port: int,
        folder: Path,
        status_feed: bool = False,
        status_configs: dict | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.mqtt_port = mqtt_port
        self.folder = folder
        self.command_topic = new_topic(bootstrap)
        # Compacted, as new_status_topic makes it; a test may add limits.
        self.status_topic = new_topic(bootstrap, configs={"cleanup.policy": "compact", **(status_configs or {})})
        self.received_path = folder / "received.jsonl"
        feed = {"KAFKA_STATUS_TOPIC": self.status_topic, "STATUS_TOPIC_SECRET": STATUS_SECRET} if status_feed else {}
        self.service = ServiceProcess(
            folder, KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_COMMAND_TOPIC=self.command_topic, **feed
        )
        self.examples: list[Example] = []

    def post(self, body: dict) -> dict:
        """POST a command to the service, which must publish it at once (200)."""
        response = httpx.post(self.service.url + "/api/v1/commands", json=body, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def inject(self, records: list[tuple[bytes | None, bytes | None, str | None]], partition: int) -> None:
        """Write (key, value, request_id header) records straight to the command topic, past the service, as
        anyone who can write the topic could."""
        producer = KafkaProducer(bootstrap_servers=self.bootstrap)
        try:
            for key, value, request_id in records:
                headers = [("request_id", request_id.encode())] if request_id else []
                producer.send(self.command_topic, key=key, value=value, headers=headers, partition=partition).get(10)
        finally:
            producer.close()

    def answer(self, device_id: str, answer: dict) -> None:
        """Publish an answer on the device's response topic, as a device would, and wait for the broker's ack."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"answer-{device_id}")
        client.connect("127.0.0.1", self.mqtt_port)
        client.loop_start()
        try:
            client.publish(f"devices/{device_id}/responses", json.dumps(answer), qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()

    def start_device(self, *device_ids: str, mqtt_port: int | None = None) -> Example:
        """The simulated device(s), subscribed."""
        port = mqtt_port or self.mqtt_port
        args = [*device_ids, "--received", str(self.received_path), "--mqtt-port", str(port)]
        device = Example("simulated_device.py", args, self.folder / "device.log")
        self.examples.append(device)
        device.wait_for("ready")
        return device

    def start_connector(self, mqtt_port: int | None = None) -> Example:
        """The MQTT connector, consuming the command topic in a group of its own; back once it holds partitions,
        which the first assignment must already give it (an empty one means a second rebalance on every start)."""
        args = [
            "--bootstrap", self.bootstrap,
            "--command-topic", self.command_topic,
            "--status-topic", self.status_topic,
            "--group", f"mqtt-connector-{self.command_topic}",
            "--mqtt-port", str(mqtt_port or self.mqtt_port),
            "--mqtt-client-id", f"mqtt-connector-{self.command_topic}",
        ]  # fmt: skip
        connector = Example("mqtt_connector.py", args, self.folder / "connector.log")
        self.examples.append(connector)
        connector.wait_for(f"partitions assigned: ['{self.command_topic}-", timeout=30)
        assert "partitions assigned: []" not in connector.log(), connector.log()
        return connector

    def events(self, count: int) -> dict[str, list[dict]]:
        """Read `count` events from the status topic (and any surplus), each checked against the contract;
        their statuses and bodies, by request id, in the order reported."""
        by_request: dict[str, list[dict]] = {}
        for record in read_topic(self.bootstrap, self.status_topic, count, timeout=90):
            event = json.loads(record.value)
            STATUS_EVENT_VALIDATOR.validate(event)
            assert record.key == event["request_id"].encode()
            assert event["source"] == "mqtt-connector"
            assert datetime.fromisoformat(event["at"]).tzinfo is not None
            by_request.setdefault(event["request_id"], []).append(event)
        assert sum(map(len, by_request.values())) == count, self.logs()
        return by_request

    def received(self) -> list[dict]:
        """Every message the simulated devices received, in order."""
        if not self.received_path.exists():
            return []
        return [json.loads(line) for line in self.received_path.read_text().splitlines()]

    def logs(self) -> str:
        """The examples' output, for a failing assertion."""
        return "\n".join(f"--- {e.log_path.name}\n{e.log()[-3000:]}" for e in self.examples)

    def close(self) -> None:
        """Stop the examples, newest first, and the service."""
        while self.examples:
            self.examples.pop().stop()
        self.service.stop()


@pytest.fixture
def setup(kafka_bootstrap: str, mqtt_port: int, tmp_path: Path) -> Iterator[Setup]:
    """The service running; the examples started by the test."""
    built = Setup(kafka_bootstrap, mqtt_port, tmp_path)
    built.service.start()
    yield built
    built.close()


def statuses(events: list[dict]) -> list[str]:
    """The statuses of a command's events, in the order reported."""
    return [event["status"] for event in events]


def test_command_is_delivered_once_and_succeeds(setup: Setup) -> None:
    """A posted command reaches the device once, exactly as posted; the connector reports delivered, then
    succeeded with the device's result. After a restart it sends nothing again."""
    setup.start_device("thermostat-1")
    connector = setup.start_connector()
    payload = {"setpoint": 21.5, "schedule": [{"from": "06:00", "to": "22:00"}], "label": "séjour"}
    sent = setup.post(command("thermostat-1", command_type="config_update", payload=payload, qos=1))

    events = setup.events(2)[sent["request_id"]]
    assert statuses(events) == ["delivered", "succeeded"]
    assert events[0]["command_type"] == "config_update"
    assert events[1]["result"] == {"applied": payload}
    assert setup.received() == [
        {
            "device_id": "thermostat-1",
            "topic": "devices/thermostat-1/commands",
            "qos": 1,
            "retain": False,
            "command": {"request_id": sent["request_id"], "command_type": "config_update", "payload": payload},
        }
    ]

    connector.stop()
    setup.start_connector()
    again = setup.post(command("thermostat-1", command_type="reboot"))
    events = setup.events(4)
    assert statuses(events[sent["request_id"]]) == ["delivered", "succeeded"]
    assert statuses(events[again["request_id"]]) == ["delivered", "succeeded"]
    assert [line["command"]["request_id"] for line in setup.received()] == [sent["request_id"], again["request_id"]]


def partition_of(device_id: str, partitions: int = 3) -> int:
    """The partition Kafka's default partitioner (the service's) gives a device's commands."""
    return (murmur2(device_id.encode()) & 0x7FFFFFFF) % partitions


def record(device_id: str, request_id: str, **changes) -> bytes:
    """A command record's value as the service writes it, with some fields changed (None: left out)."""
    value = {
        "request_id": request_id,
        "device_id": device_id,
        "command_type": "set",
        "payload": {},
        "protocol": "mqtt",
        "parser_script_ref": None,
        "metadata": {},
        "timestamp": datetime.now(UTC).isoformat(),
        "expires_at": None,
    }
    value.update(changes)
    return json.dumps({k: v for k, v in value.items() if v is not None or k not in changes}).encode()


def test_failures_are_reported_with_their_reason(setup: Setup) -> None:
    """A command the device fails is reported delivered, then failed with the device's error and result. The
    service refuses a topic that is not the device's own; a record naming one anyway, written straight to Kafka,
    is reported rejected by the connector and never sent."""
    setup.start_device("valve-7", "valve-8")
    setup.start_connector()
    failing = setup.post(command("valve-7", command_type="fail", payload={"position": 40}))
    refused = httpx.post(
        setup.service.url + "/api/v1/commands", json=command("valve-8", metadata={"topic": "devices/valve-7/commands"})
    )
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == "$.metadata.topic"
    metadata = {"topic": "devices/valve-7/commands", "retain": True}
    setup.inject([(b"valve-8", record("valve-8", "foreign-topic", metadata=metadata), None)], 0)

    events = setup.events(3)
    assert statuses(events[failing["request_id"]]) == ["delivered", "failed"]
    assert events[failing["request_id"]][1]["error"] == "simulated failure"
    assert events[failing["request_id"]][1]["result"] == {"refused": {"position": 40}}
    assert statuses(events["foreign-topic"]) == ["rejected"]
    assert "Must be the device's topic 'devices/valve-8/commands'" in events["foreign-topic"][0]["error"]
    assert [line["command"]["request_id"] for line in setup.received()] == [failing["request_id"]]


def test_poison_records_are_rejected_and_the_partition_moves_on(setup: Setup) -> None:
    """Records the connector can never deliver, written straight to a partition, are each reported rejected with
    the reason (or skipped when they carry no request id) and committed; the next command on that partition, for
    another device, is delivered. A float QoS used to crash the MQTT client and stop the partition for good."""
    setup.start_device("lamp-2", "dev-x")
    partition = partition_of("lamp-2")
    poison = {
        "not-json": (b"dev-x", b"{not json", "not-json"),
        "tombstone": (b"dev-x", None, "tombstone"),
        "float-qos": (b"dev-x", record("dev-x", "float-qos", metadata={"qos": 1.0}), None),
        "bool-qos": (b"dev-x", record("dev-x", "bool-qos", metadata={"qos": True}), None),
        "wildcard": (b"dev-x", record("dev-x", "wildcard", metadata={"topic": "devices/+/commands"}), None),
        "sys-topic": (b"dev-x", record("dev-x", "sys-topic", metadata={"topic": "$SYS/x"}), None),
        "other-device": (
            b"dev-x",
            record("dev-x", "other-device", metadata={"topic": "devices/lamp-2/commands"}),
            None,
        ),
        "nested-id": (b"a/commands/x", record("a/commands/x", "nested-id"), None),
        "no-type": (b"dev-x", record("dev-x", "no-type", command_type=None), None),
        "list-payload": (b"dev-x", record("dev-x", "list-payload", payload=[1]), None),
        "naive-expiry": (b"dev-x", record("dev-x", "naive-expiry", expires_at="2030-01-01T00:00:00"), None),
        "nan-payload": (
            b"dev-x",
            record("dev-x", "nan-payload").replace(b'"payload": {}', b'"payload": {"x": NaN}'),
            None,
        ),
    }
    reasons = {
        "not-json": "not JSON",
        "tombstone": "not JSON",
        "float-qos": "metadata.qos must be the integer 0, 1 or 2, not 1.0",
        "bool-qos": "metadata.qos must be the integer 0, 1 or 2, not True",
        "wildcard": "wildcards",
        "sys-topic": "Must not start with $",
        "other-device": "Must be the device's topic 'devices/dev-x/commands'",
        "nested-id": "below the topic of device 'a'",
        "no-type": "command_type must be a string",
        "list-payload": "payload must be a JSON object",
        "naive-expiry": "expires_at must be an ISO 8601 time with an offset",
        "nan-payload": "payload is not plain JSON",
    }
    unreportable = (b"dev-x", json.dumps({"request_id": 7, "protocol": "mqtt"}).encode(), None)
    setup.inject([*poison.values(), unreportable], partition)
    setup.start_connector()
    good = setup.post(command("lamp-2", command_type="set_led", payload={"state": "on"}, qos=1))
    assert good["partition"] == partition

    events = setup.events(len(poison) + 2)
    for request_id, reason in reasons.items():
        assert statuses(events[request_id]) == ["rejected"], request_id
        assert reason in events[request_id][0]["error"], (request_id, events[request_id][0]["error"])
    assert events["nested-id"][0]["device_id"] == "a/commands/x"
    assert statuses(events[good["request_id"]]) == ["delivered", "succeeded"]
    assert [(line["device_id"], line["command"]["request_id"]) for line in setup.received()] == [
        ("lamp-2", good["request_id"])
    ]
    assert "no request_id to report it under" in setup.logs()


def test_an_oversize_device_result_does_not_block_later_answers(kafka_bootstrap, mqtt_port, tmp_path) -> None:
    """A device result over MAX_RESULT_BYTES, or one the status topic refuses as too large, is reported as
    {"omitted": "too large"}; the answers behind it are reported as usual."""
    built = Setup(kafka_bootstrap, mqtt_port, tmp_path, status_configs={"max.message.bytes": "100000"})
    built.service.start()
    try:
        built.start_device("lamp-5")
        built.start_connector()
        huge = built.post(command("quiet-1", command_type="dump"))
        large = built.post(command("quiet-2", command_type="dump"))
        assert statuses(built.events(2)[huge["request_id"]]) == ["delivered"]  # nobody listens on quiet-*
        # Over the connector's bound (and over Kafka's default 1 MB), then under it but over the topic's limit.
        built.answer("quiet-1", {"request_id": huge["request_id"], "ok": True, "result": {"blob": "x" * 1_500_000}})
        built.answer("quiet-2", {"request_id": large["request_id"], "ok": True, "result": {"blob": "y" * 150_000}})
        after = built.post(command("lamp-5", command_type="set_led", payload={"state": "off"}))

        events = built.events(6)
        for sent in (huge, large):
            assert statuses(events[sent["request_id"]]) == ["delivered", "succeeded"]
            assert events[sent["request_id"]][1]["result"] == {"omitted": "too large"}
        assert statuses(events[after["request_id"]]) == ["delivered", "succeeded"]
        assert events[after["request_id"]][1]["result"] == {"applied": {"state": "off"}}
    finally:
        built.close()


def test_a_producer_that_fails_for_good_is_replaced(setup: Setup) -> None:
    """When the status producer fails with an error it would only repeat (here: it was closed), the record is
    read again later and a new producer reports it; the connector keeps running."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        connector_module = importlib.import_module("mqtt_connector")
    finally:
        sys.path.remove(str(EXAMPLES))
    setup.inject([(b"dev-x", record("dev-x", "after-failure", metadata={"qos": 1.5}), None)], 0)
    [consumed] = read_topic(setup.bootstrap, setup.command_topic, 1)
    options = connector_module.parse_args(
        ["--bootstrap", setup.bootstrap, "--status-topic", setup.status_topic, "--mqtt-port", str(setup.mqtt_port)]
    )
    connector = connector_module.Connector(options)
    try:
        connector.producer.close()
        assert connector.handle(consumed) is False
        assert connector.handle(consumed) is True
    finally:
        connector.close()
    events = setup.events(1)
    assert statuses(events["after-failure"]) == ["rejected"]


def test_expired_command_never_reaches_the_device(setup: Setup) -> None:
    """A command whose expires_at passed before the connector read it is reported expired and not published;
    the device's next command goes through."""
    setup.start_device("meter-3")
    stale = setup.post(command("meter-3", command_type="set_tariff", payload={"tariff": "night"}, ttl_seconds=1))
    expires_at = datetime.fromisoformat(stale["expires_at"])
    time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
    fresh = setup.post(command("meter-3", command_type="set_tariff", payload={"tariff": "day"}))
    setup.start_connector()

    events = setup.events(3)
    assert statuses(events[stale["request_id"]]) == ["expired"]
    assert events[stale["request_id"]][0]["error"] == "expired before delivery"
    assert events[stale["request_id"]][0]["command_type"] == "set_tariff"
    assert statuses(events[fresh["request_id"]]) == ["delivered", "succeeded"]
    # Both went to one partition (key: device_id), so the stale one was handled first: the device never saw it.
    assert [line["command"]["request_id"] for line in setup.received()] == [fresh["request_id"]]


def test_command_waits_while_the_mqtt_broker_is_down(setup: Setup, tmp_path: Path) -> None:
    """While the MQTT broker is unreachable the connector reports nothing and commits nothing; once it is back
    the command is delivered, once."""
    broker = Mosquitto(tmp_path, persistent=True).start()
    try:
        setup.start_device("pump-2", mqtt_port=broker.port)
        broker.stop()  # the device's session, with its subscription, is saved and comes back with the broker
        setup.start_connector(mqtt_port=broker.port)
        sent = setup.post(command("pump-2", command_type="start", payload={"rpm": 1200}))
        assert read_topic(setup.bootstrap, setup.status_topic, 1, timeout=2) == []

        broker.start()
        events = setup.events(2)[sent["request_id"]]
        assert statuses(events) == ["delivered", "succeeded"]
        assert [line["command"]["payload"] for line in setup.received()] == [{"rpm": 1200}]
        assert "not connected to the MQTT broker" in setup.logs()
    finally:
        setup.close()
        broker.stop()


def test_a_connector_started_before_its_topic_exists_waits_for_it(kafka_bootstrap, mqtt_port, tmp_path) -> None:
    """Started before the command topic exists, the connector says it is waiting, and joins its group once the
    topic is there: its first assignment already holds the topic's partitions."""
    name = f"cmd-{uuid.uuid4().hex[:12]}"
    args = ["--bootstrap", kafka_bootstrap, "--command-topic", name, "--group", f"mqtt-connector-{name}",
            "--mqtt-port", str(mqtt_port), "--mqtt-client-id", f"mqtt-connector-{name}"]  # fmt: skip
    connector = Example("mqtt_connector.py", args, tmp_path / "connector.log")
    try:
        connector.wait_for(f"waiting for the command topic {name} to exist")
        assert "partitions assigned" not in connector.log()
        new_topic(kafka_bootstrap, name=name)
        connector.wait_for(f"partitions assigned: ['{name}-0', '{name}-1', '{name}-2']", timeout=30)
        assert "partitions assigned: []" not in connector.log(), connector.log()
    finally:
        connector.stop()


def test_end_to_end_the_service_follows_the_command_to_the_device(kafka_bootstrap, mqtt_port, tmp_path) -> None:
    """With the status topic on, the service itself shows the whole lifecycle: POST, then a long poll for
    `succeeded` answers with accepted → published → delivered → succeeded and the device's result, the event
    stream replays the same, and the device got exactly the posted payload once. An expired command ends
    `expired` at the service too, and never reaches the device."""
    built = Setup(kafka_bootstrap, mqtt_port, tmp_path, status_feed=True)
    built.service.start()
    url = built.service.url + "/api/v1/commands"
    try:
        built.start_device("lamp-9")
        connector = built.start_connector()
        payload = {"state": "on", "brightness": 80, "colour": [255, 200, 120]}
        sent = built.post(command("lamp-9", command_type="set_led", payload=payload))
        rid = sent["request_id"]
        body = httpx.get(f"{url}/{rid}/status", params={"wait_for": "succeeded", "timeout": 30}, timeout=40).json()
        assert body["status"] == "succeeded", built.logs()
        assert [step["status"] for step in body["history"]] == ["accepted", "published", "delivered", "succeeded"]
        assert body["result"] == {"applied": payload}
        assert [line["command"] for line in built.received()] == [
            {"request_id": rid, "command_type": "set_led", "payload": payload}
        ]
        stream = httpx.get(f"{url}/{rid}/events", timeout=10).text
        assert [line[7:] for line in stream.splitlines() if line.startswith("event: ")] == [
            "accepted",
            "published",
            "delivered",
            "succeeded",
        ]

        connector.stop()
        built.examples.remove(connector)
        stale = built.post(command("lamp-9", command_type="set_led", payload={"state": "off"}, ttl_seconds=1))
        time.sleep(1.2)
        built.start_connector()
        body = httpx.get(
            f"{url}/{stale['request_id']}/status", params={"wait_for": "succeeded", "timeout": 30}, timeout=40
        ).json()
        assert body["status"] == "expired" and body["error"] == "expired before delivery"
        assert [line["command"]["request_id"] for line in built.received()] == [rid]
    finally:
        built.close()
