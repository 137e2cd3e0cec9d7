"""A reference MQTT connector: commands from the Kafka command topic to devices over MQTT, and what happened to
them back to the Kafka status topic.

    python examples/mqtt_connector.py --bootstrap localhost:9092 --mqtt-host localhost

For each command record with protocol "mqtt" it reports, on the status topic:

- `expired`   its `expires_at` has passed: it is not published;
- `rejected`  it cannot be published as given: not JSON, a field of the wrong type, a topic that is not the
              device's own (mqtt_topics.py), an impossible QoS, or a message the MQTT client refuses;
- `delivered` the MQTT broker acknowledged the publish;
- `succeeded` / `failed`  the device answered on `devices/{device_id}/responses`.

A command's offset is committed only once its event is on the status topic, and a device's answer is
acknowledged to the MQTT broker only once its event is, so a crash or restart repeats work rather than losing it.
Delivery to devices is therefore at least once: the MQTT body carries the request_id for a device to spot a repeat.
No record stops a partition: one that can never be delivered is reported `rejected` (or, without a request_id to
report it under, logged) and committed; a device result over MAX_RESULT_BYTES is reported as OMITTED.

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
import re
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata
from kafka.errors import KafkaError, MessageSizeTooLargeError
from paho.mqtt.enums import CallbackAPIVersion

# The service's own topic rule (mqtt_topics.py at the top of the repository), so both check topics alike.
sys.path.append(str(Path(__file__).resolve().parent.parent))
import mqtt_topics

ANSWER_TOPIC_FILTER = "devices/+/responses"
MAX_ERROR_LENGTH = 2000  # the event contract's limit
MAX_RESULT_BYTES = 256 * 1024  # a larger device result would sit at the head of the answers if Kafka refused it
OMITTED = {"omitted": "too large"}
# The event contract's request_id, and its text fields (device_id ≤ 255, command_type ≤ 128, no control characters).
REQUEST_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

log = logging.getLogger("mqtt_connector")


class PublishRefused(ValueError):
    """The command cannot be published as given; retrying would not help."""


def utc_now() -> str:
    """The current time in ISO 8601 UTC, e.g. 2026-11-29T10:00:00.123456Z."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_text(value: object, limit: int) -> bool:
    """True for a string of 1 to `limit` characters without control characters (the event contract's text)."""
    return isinstance(value, str) and 0 < len(value) <= limit and not CONTROL.search(value)


def read_command(value: bytes | None) -> dict[str, Any]:
    """The JSON object in a record's value; PublishRefused when there is none."""
    try:
        command = json.loads(value)  # type: ignore[arg-type]  # None (a tombstone) is refused below
    except (TypeError, ValueError, RecursionError) as exc:
        raise PublishRefused(f"the record is not JSON: {exc}") from None
    if not isinstance(command, dict):
        raise PublishRefused("the record is not a JSON object")
    return command


def identity(
    command: dict[str, Any], key: bytes | None, headers: list[tuple[str, bytes]]
) -> tuple[str | None, str | None]:
    """The command's request_id and device_id as the contract allows them in an event (None where it does not),
    taken from the record's header and key when the value has no usable ones."""
    request_id = command.get("request_id")
    if not (isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id)):
        found = (dict(headers or ()).get("request_id") or b"").decode(errors="replace")
        request_id = found if REQUEST_ID.fullmatch(found) else None
    device_id = command.get("device_id")
    if not is_text(device_id, 255):
        device_id = (key or b"").decode(errors="replace")
    return request_id, device_id if is_text(device_id, 255) else None


def is_expired(command: dict[str, Any]) -> bool:
    """True when the command's `expires_at` has passed (null: it never expires); PublishRefused when unreadable."""
    expires_at = command.get("expires_at")
    if expires_at is None:
        return False
    try:
        when = datetime.fromisoformat(expires_at)
    except (TypeError, ValueError):
        when = None
    if when is None or when.tzinfo is None:
        raise PublishRefused(f"expires_at must be an ISO 8601 time with an offset, or null, not {expires_at!r}")
    return when <= datetime.now(UTC)


def mqtt_message(command: dict[str, Any], template: str) -> tuple[str, bytes, int, bool]:
    """Where and how to publish a command: MQTT topic, body, QoS and retain flag; PublishRefused when it cannot be."""
    if not (isinstance(command.get("request_id"), str) and REQUEST_ID.fullmatch(command["request_id"])):
        raise PublishRefused("request_id must be 1 to 128 of A-Z a-z 0-9 . _ ~ : -")
    for field, limit in (("device_id", 255), ("command_type", 128)):
        if not is_text(command.get(field), limit):
            raise PublishRefused(f"{field} must be a string of 1 to {limit} characters without control characters")
    if not isinstance(command.get("payload"), dict):
        raise PublishRefused("payload must be a JSON object")
    metadata = command.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise PublishRefused("metadata must be a JSON object or null")
    problem = mqtt_topics.device_id_problem(template, command["device_id"])
    if problem:
        raise PublishRefused(f"device_id: {problem}")
    topic = metadata.get("topic", mqtt_topics.device_topic(template, command["device_id"]))
    problem = mqtt_topics.topic_problem(template, command["device_id"], topic)
    if problem:
        raise PublishRefused(f"metadata.topic {topic!r}: {problem}")
    qos = metadata.get("qos", 1)
    retain = metadata.get("retain", False)
    if type(qos) is not int or qos not in (0, 1, 2):  # not a bool, not 1.0: paho would fail on either
        raise PublishRefused(f"metadata.qos must be the integer 0, 1 or 2, not {qos!r}")
    if not isinstance(retain, bool):
        raise PublishRefused(f"metadata.retain must be true or false, not {retain!r}")
    body = {"request_id": command["request_id"], "command_type": command["command_type"], "payload": command["payload"]}
    try:
        encoded = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:  # NaN or Infinity, which Python's JSON reader lets in
        raise PublishRefused(f"payload is not plain JSON: {exc}") from None
    return topic, encoded, qos, retain


def status_event(
    source: str,
    status: str,
    request_id: str,
    device_id: str | None,
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
    }
    if device_id is not None:
        event["device_id"] = device_id
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
    except (ValueError, RecursionError):
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("request_id"), str):
        return None
    if not REQUEST_ID.fullmatch(answer["request_id"]) or not isinstance(answer.get("ok"), bool):
        return None
    device_id = device_id if is_text(device_id, 255) else None
    result = answer.get("result")
    result = result if isinstance(result, dict) else None
    if result is not None and len(json.dumps(result, separators=(",", ":"))) > MAX_RESULT_BYTES:
        result = OMITTED
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
        self.producer = self._producer()
        self.consumer = KafkaConsumer(
            bootstrap_servers=options.bootstrap.split(","),
            client_id=self.source,
            group_id=options.group,
            enable_auto_commit=False,
            auto_offset_reset=options.offset_reset,
        )

    def _producer(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self.options.bootstrap.split(","),
            client_id=self.source,
            acks="all",
            enable_idempotence=True,
            allow_auto_create_topics=False,
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
        try:
            self.consumer.subscribe([self.options.command_topic], listener=_LogAssignment())
            self.wait_for_command_topic()
            log.info("consuming %s as group %s", self.options.command_topic, self.options.group)
            while self.running:
                self.handle_commands()
                self.report_answers()
        finally:
            self.close()

    def wait_for_command_topic(self) -> None:
        """Wait, once subscribed, until the consumer has read the command topic's metadata (or stop() is called).
        Joining the group before it has leaves the first assignment empty, and each start then takes a second
        rebalance, which can wait out a session."""
        next_log = time.monotonic()
        while self.running:
            try:
                if self.options.command_topic in self.consumer.topics():
                    return
                why = "to exist"
            except KafkaError as exc:  # Kafka went away meanwhile: asked again
                why = f"({exc})"
            if time.monotonic() >= next_log:
                log.info("waiting for the command topic %s %s", self.options.command_topic, why)
                next_log = time.monotonic() + 30
            time.sleep(1)

    def stop(self) -> None:
        """Finish the command at hand, then stop."""
        self.running = False

    def handle_commands(self) -> None:
        """Poll the command topic once; handle each record and commit its offset."""
        for partition, records in self.consumer.poll(timeout_ms=100).items():
            for record in records:
                if not self.running:
                    return  # the rest stays uncommitted: the next start reads it again
                if not self.handle(record):
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

    def handle(self, record: Any) -> bool:
        """Handle one command record; True once its outcome is on the status topic, or it can never have one
        (not ours, or nothing to report it under); False to read it again later."""
        refused = None
        try:
            command = read_command(record.value)
        except PublishRefused as exc:
            command, refused = {}, exc
        if refused is None and command.get("protocol") != "mqtt":
            return True  # another connector's
        request_id, device_id = identity(command, record.key, record.headers)
        if request_id is None:
            log.warning("skipping offset %s of %s: no request_id to report it under", record.offset, record.topic)
            return True
        try:
            event = self.deliver(command, request_id, device_id, refused)
            self.report(event)
        except (KafkaError, ConnectionError, TimeoutError) as exc:
            log.warning("command %s not handled yet: %s", request_id, exc)
            return False
        log.info("command %s for %s %s %s", request_id, device_id, event["status"], event.get("error", ""))
        return True

    def deliver(
        self, command: dict[str, Any], request_id: str, device_id: str | None, refused: PublishRefused | None = None
    ) -> dict[str, Any]:
        """Publish a command unless it expired or cannot be published; return the event that says which."""
        command_type = command.get("command_type")
        event = functools.partial(
            status_event,
            self.source,
            request_id=request_id,
            device_id=device_id,
            command_type=command_type if is_text(command_type, 128) else None,
        )
        if refused is not None:
            return event("rejected", error=str(refused))
        try:
            if is_expired(command):
                return event("expired", error="expired before delivery")
            self.publish(*mqtt_message(command, self.options.topic_template))
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
        except (RuntimeError, OSError) as exc:  # the connection, not the message
            raise ConnectionError(str(exc)) from exc
        except Exception as exc:  # paho's verdict on the message (topic, size, …): it will never take it
            raise PublishRefused(f"the MQTT client refused it: {exc!r}") from exc
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
        """Put an event on the status topic (key: its request_id) and wait until Kafka has it.

        A result the topic refuses as too large is reported as OMITTED instead. After an error that the same
        producer would only repeat (kafka-python also treats a refused record so), a new producer takes its place;
        the caller tries again later."""
        try:
            self._send(event)
        except KafkaError as exc:
            if not exc.retriable:
                self._replace_producer(exc)
            if not isinstance(exc, MessageSizeTooLargeError) or event.get("result") in (None, OMITTED):
                raise
            log.warning("result of %s too large for %s: omitted", event["request_id"], self.options.status_topic)
            self.report({**event, "result": OMITTED})

    def _send(self, event: dict[str, Any]) -> None:
        value = json.dumps(event, separators=(",", ":")).encode()
        self.producer.send(self.options.status_topic, key=event["request_id"].encode(), value=value).get(timeout=30)

    def _replace_producer(self, error: KafkaError) -> None:
        log.warning("replacing the Kafka producer after %r", error)
        old = self.producer
        try:
            old.close(timeout=0)
        except Exception as exc:  # it is being dropped anyway
            log.warning("closing the old producer: %r", exc)
        self.producer = self._producer()

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
    parser.add_argument(
        "--topic-template",
        default=env("MQTT_TOPIC_TEMPLATE", mqtt_topics.DEFAULT_TEMPLATE),
        help="a device's command topic; the same as the service's MQTT_TOPIC_TEMPLATE",
    )
    options = parser.parse_args(argv)
    problem = mqtt_topics.template_problem(options.topic_template)
    if problem:
        parser.error(f"--topic-template {options.topic_template!r}: {problem}")
    return options


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
