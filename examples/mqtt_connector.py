"""A reference MQTT connector: commands from the Kafka command topic to devices over MQTT, and what happened to
them back to the Kafka status topic.

    python examples/mqtt_connector.py --bootstrap localhost:9092 --mqtt-host localhost

For each command record with protocol "mqtt" it reports, on the status topic:

- `expired`   its `expires_at` has passed: it is not published;
- `rejected`  it cannot be published as given (e.g. a wildcard in `metadata["topic"]`);
- `delivered` the MQTT broker acknowledged the publish;
- `succeeded` / `failed`  the device answered on `devices/{device_id}/responses`.

A command's offset is committed only once its event is on the status topic, and a device's answer is
acknowledged to the MQTT broker only once its event is, so a crash or restart repeats work rather than losing it.
Delivery to devices is therefore at least once: the MQTT body carries the request_id for a device to spot a repeat.

Its events are unsigned, as every connector's: the service applies one only to a command it knows of the same
device_id, so each names the command's device (an answer: the device whose MQTT topic it came on).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata
from kafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion

COMMAND_TOPIC_TEMPLATE = "devices/{device_id}/commands"
ANSWER_TOPIC_FILTER = "devices/+/responses"
MAX_ERROR_LENGTH = 2000  # the event contract's limit

log = logging.getLogger("mqtt_connector")


class PublishRefused(ValueError):
    """The command cannot be published as given; retrying would not help."""


def utc_now() -> str:
    """The current time in ISO 8601 UTC, e.g. 2026-11-29T10:00:00.123456Z."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_expired(command: dict[str, Any]) -> bool:
    """True when the command's `expires_at` has passed (null: it never expires)."""
    expires_at = command.get("expires_at")
    return expires_at is not None and datetime.fromisoformat(expires_at) <= datetime.now(UTC)


def mqtt_message(command: dict[str, Any]) -> tuple[str, bytes, int, bool]:
    """Where and how to publish a command: MQTT topic, body, QoS and retain flag, read from its metadata."""
    metadata = command.get("metadata") or {}
    topic = metadata.get("topic") or COMMAND_TOPIC_TEMPLATE.format(device_id=command["device_id"])
    qos = metadata.get("qos", 1)
    retain = metadata.get("retain", False)
    if not isinstance(topic, str) or "+" in topic or "#" in topic:
        raise PublishRefused(f"metadata.topic must be an MQTT topic name without wildcards, not {topic!r}")
    if isinstance(qos, bool) or qos not in (0, 1, 2):
        raise PublishRefused(f"metadata.qos must be 0, 1 or 2, not {qos!r}")
    if not isinstance(retain, bool):
        raise PublishRefused(f"metadata.retain must be true or false, not {retain!r}")
    body = {"request_id": command["request_id"], "command_type": command["command_type"], "payload": command["payload"]}
    return topic, json.dumps(body, separators=(",", ":")).encode(), qos, retain


def status_event(
    source: str,
    status: str,
    request_id: str,
    device_id: str,
    *,
    command_type: str | None = None,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One event for the status topic (contract/status-event.schema.json); optional fields only when known."""
    event: dict[str, Any] = {
        "request_id": request_id,
        "status": status,
        "at": utc_now(),
        "source": source,
        "device_id": device_id,
    }
    if command_type is not None:
        event["command_type"] = command_type
    if error is not None:
        event["error"] = error[:MAX_ERROR_LENGTH]
    if result is not None:
        event["result"] = result
    return event


def answer_event(source: str, topic: str, body: bytes) -> dict[str, Any] | None:
    """The `succeeded` or `failed` event for a device's answer; None when the answer cannot be read."""
    device_id = topic.removeprefix("devices/").removesuffix("/responses")
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("request_id"), str):
        return None
    if not isinstance(answer.get("ok"), bool):
        return None
    result = answer.get("result")
    result = result if isinstance(result, dict) else None
    if answer["ok"]:
        return status_event(source, "succeeded", answer["request_id"], device_id, result=result)
    error = str(answer.get("error") or "the device reported a failure")
    return status_event(source, "failed", answer["request_id"], device_id, error=error, result=result)


class Connector:
    """Consumes the command topic, publishes to MQTT, and reports each transition on the status topic."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.source = options.source
        self.running = True
        # Device answers arrive on the MQTT network thread; the main thread reports them, so each command's
        # `delivered` always reaches the status topic before its answer does.
        self.answers: collections.deque[mqtt.MQTTMessage] = collections.deque()
        self.mqtt = self._mqtt_client()
        self.producer = KafkaProducer(
            bootstrap_servers=options.bootstrap.split(","),
            client_id=self.source,
            acks="all",
            enable_idempotence=True,
            allow_auto_create_topics=False,
        )
        self.consumer = KafkaConsumer(
            bootstrap_servers=options.bootstrap.split(","),
            client_id=self.source,
            group_id=options.group,
            enable_auto_commit=False,
            auto_offset_reset=options.offset_reset,
        )

    def _mqtt_client(self) -> mqtt.Client:
        # A persistent session (clean_session=False, a fixed client id) makes the broker keep device answers
        # while the connector is away; manual_ack leaves them unacknowledged until they are reported.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.options.mqtt_client_id,
            clean_session=False,
            manual_ack=True,
        )
        client.on_connect = self._on_mqtt_connect
        client.on_message = lambda _client, _userdata, message: self.answers.append(message)
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        return client

    def _on_mqtt_connect(self, client: mqtt.Client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt connection refused: %s", reason_code)
            return
        log.info("mqtt connected to %s:%s", self.options.mqtt_host, self.options.mqtt_port)
        client.subscribe(ANSWER_TOPIC_FILTER, qos=1)

    def run(self) -> None:
        """Handle commands and device answers until stop() is called."""
        self.mqtt.connect_async(self.options.mqtt_host, self.options.mqtt_port, keepalive=30)
        self.mqtt.loop_start()
        self.consumer.subscribe([self.options.command_topic], listener=_LogAssignment())
        log.info("consuming %s as group %s", self.options.command_topic, self.options.group)
        try:
            while self.running:
                self.handle_commands()
                self.report_answers()
        finally:
            self.close()

    def stop(self) -> None:
        """Finish the command at hand, then stop."""
        self.running = False

    def handle_commands(self) -> None:
        """Poll the command topic once; handle each record and commit its offset."""
        for partition, records in self.consumer.poll(timeout_ms=100).items():
            for record in records:
                if not self.running:
                    return  # the rest stays uncommitted: the next start reads it again
                if not self.handle(record.value):
                    # Not handled (MQTT or Kafka unreachable): read it again after a pause, in order.
                    self.consumer.seek(partition, record.offset)
                    time.sleep(1)
                    break
                try:
                    self.consumer.commit({partition: OffsetAndMetadata(record.offset + 1, "", -1)})
                except KafkaError as exc:
                    # The partition went to another member, which reads from the last committed offset.
                    log.warning("commit failed, %s will be handled again: %s", partition, exc)
                    break
                self.report_answers()

    def handle(self, value: bytes) -> bool:
        """Handle one command record; True once its outcome is on the status topic (or it is not ours)."""
        try:
            command = json.loads(value)
            request_id, device_id = command["request_id"], command["device_id"]
        except (ValueError, TypeError, KeyError):
            log.warning("skipping a record that is not a command")
            return True
        if command.get("protocol") != "mqtt":
            return True
        try:
            event = self.deliver(command)
            self.report(event)
        except (KafkaError, ConnectionError, TimeoutError) as exc:
            log.warning("command %s not handled yet: %s", request_id, exc)
            return False
        log.info("command %s for %s %s", request_id, device_id, event["status"])
        return True

    def deliver(self, command: dict[str, Any]) -> dict[str, Any]:
        """Publish a command unless it expired or cannot be published; return the event that says which."""
        event = functools.partial(
            status_event,
            self.source,
            request_id=command["request_id"],
            device_id=command["device_id"],
            command_type=command["command_type"],
        )
        if is_expired(command):
            return event("expired", error="expired before delivery")
        try:
            self.publish(*mqtt_message(command))
        except PublishRefused as exc:
            return event("rejected", error=str(exc))
        return event("delivered")

    def publish(self, topic: str, body: bytes, qos: int, retain: bool) -> None:
        """Publish to the MQTT broker and wait for its acknowledgement (for QoS 0: until the message is sent)."""
        if not self.mqtt.is_connected():
            raise ConnectionError("not connected to the MQTT broker")
        try:
            info = self.mqtt.publish(topic, body, qos=qos, retain=retain)
            info.wait_for_publish(timeout=self.options.publish_timeout)
        except ValueError as exc:  # paho's verdict on the topic or the size
            raise PublishRefused(str(exc)) from exc
        except RuntimeError as exc:
            raise ConnectionError(str(exc)) from exc
        if not info.is_published():
            raise TimeoutError(f"the MQTT broker did not acknowledge within {self.options.publish_timeout:g} s")

    def report_answers(self) -> None:
        """Report the device answers received so far, acknowledging each to the MQTT broker once reported."""
        while self.answers:
            message = self.answers[0]
            event = answer_event(self.source, message.topic, message.payload)
            if event is None:
                log.warning("ignoring an unreadable answer on %s", message.topic)
            else:
                try:
                    self.report(event)
                except KafkaError as exc:
                    log.warning("answer on %s not reported yet: %s", message.topic, exc)
                    return
                log.info("command %s %s", event["request_id"], event["status"])
            self.answers.popleft()
            self.mqtt.ack(message.mid, message.qos)

    def report(self, event: dict[str, Any]) -> None:
        """Put an event on the status topic (key: its request_id) and wait until Kafka has it."""
        value = json.dumps(event, separators=(",", ":")).encode()
        self.producer.send(self.options.status_topic, key=event["request_id"].encode(), value=value).get(timeout=30)

    def close(self) -> None:
        """Leave the consumer group, report the answers at hand, and disconnect."""
        self.consumer.close(autocommit=False)
        self.report_answers()
        self.producer.close(timeout=10)
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


class _LogAssignment(ConsumerRebalanceListener):
    def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))

    def on_partitions_revoked(self, revoked) -> None:
        log.info("partitions revoked: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options from the command line; each defaults to an environment variable, then to a local setup."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=env("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"))
    parser.add_argument("--command-topic", default=env("KAFKA_COMMAND_TOPIC", "device_commands"))
    parser.add_argument("--status-topic", default=env("KAFKA_STATUS_TOPIC", "device_commands.status"))
    parser.add_argument("--group", default=env("CONNECTOR_GROUP", "mqtt-connector"), help="Kafka consumer group")
    parser.add_argument(
        "--offset-reset",
        default=env("CONNECTOR_OFFSET_RESET", "earliest"),
        choices=["earliest", "latest"],
        help="where a new consumer group starts reading",
    )
    parser.add_argument("--source", default=env("CONNECTOR_SOURCE", "mqtt-connector"), help="`source` of its events")
    parser.add_argument("--mqtt-host", default=env("MQTT_HOST", "localhost"))
    parser.add_argument("--mqtt-port", type=int, default=int(env("MQTT_PORT", "1883")))
    parser.add_argument(
        "--mqtt-client-id",
        default=env("MQTT_CLIENT_ID", "mqtt-connector"),
        help="one per running instance: the broker keeps its session (device answers) under this id",
    )
    parser.add_argument("--publish-timeout", type=float, default=float(env("MQTT_PUBLISH_TIMEOUT", "10")))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the connector until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    connector = Connector(parse_args(sys.argv[1:] if argv is None else argv))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: connector.stop())
    connector.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
