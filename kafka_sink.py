"""The one kafka-python producer of the process, on its own thread, with its futures bridged into asyncio.

`KafkaSink.publish()` only puts a job on a queue and returns an asyncio future: the event
loop never blocks on Kafka. The sender thread owns the producer (creating it, and trying
again while no broker answers); a monitor thread checks the command topic's metadata for
`/ready` and creates the topic when asked to. kafka-python's errors become the `SinkError`s
of errors.py here, and nowhere else.

Order: once one record could not be handed to the producer, the sink holds, refusing every
later record, until the forwarder calls `resume()` after putting the failed ones back in
front. Otherwise a later command to a device could overtake an earlier one. The producer
never gives a record up on its own (its delivery timeout is effectively infinite): while
Kafka is away, records already inside it wait there and go out, in order, when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from enum import Enum

import kafka.errors as kerr
import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from errors import MessageRejected, SinkError, SinkTimeout, SinkUnavailable
from journal import Pending
from settings import Settings
from threadbridge import Outbox, outbox_for, resolve

log = structlog.get_logger("kafka_sink")

# Errors that no retry will cure: the record is refused for good.
_PERMANENT = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.TopicAuthorizationFailedError,
    kerr.ClusterAuthorizationFailedError,
    kerr.InvalidTopicError,
    kerr.InvalidRecordError,
    kerr.UnsupportedForMessageFormatError,
)
# Errors about the producer's own state (sequence numbers, epoch): the record is not at fault.
_PRODUCER_STATE = (
    kerr.OutOfOrderSequenceNumberError,
    kerr.InvalidProducerEpochError,
    kerr.UnknownProducerIdError,
    kerr.ProducerFencedError,
    kerr.IllegalStateError,
)
_STOP = object()
_WAKE = object()
_NO_BROKER = "no Kafka broker answers at KAFKA_BOOTSTRAP_SERVERS"


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where Kafka stored a record."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class SinkHealth:
    """What the monitor last saw of Kafka."""

    connected: bool
    reason: str | None
    partitions: int | None
    brokers: int
    topic_missing: bool = False
    max_message_bytes: int | None = None
    auth_failed: bool = False  # Kafka refused our credentials: a configuration error, not an outage


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 0.2, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        """The next delay, growing with each failure."""
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        """Back to the shortest delay after a success."""
        self.attempt = 0


class SinkState(Enum):
    """The sink's lifecycle; publishing is allowed only while RUNNING."""

    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(slots=True)
class _Job:
    outbox: Outbox
    future: asyncio.Future[Delivery]
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    generation: int = 0


def translate(exc: BaseException, sent: bool) -> SinkError:
    """Map a kafka-python error to our SinkError; `sent` errors leave the record's fate uncertain."""
    name = type(exc).__name__
    if isinstance(exc, SinkError):
        return exc
    refused_by_broker = (
        sent
        and isinstance(exc, kerr.BrokerResponseError)
        and not exc.retriable
        and not isinstance(exc, _PRODUCER_STATE)
    )
    if isinstance(exc, _PERMANENT) or refused_by_broker:
        return MessageRejected(f"Kafka refused the record: {name}", sent=sent)
    if isinstance(exc, kerr.KafkaTimeoutError):
        return SinkTimeout("Kafka did not acknowledge the command in time", uncertain=sent)
    return SinkUnavailable(f"Kafka is unavailable ({name})", uncertain=sent)


class KafkaSink:
    """Publishes records to the command topic through one idempotent producer (acks=all)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.kafka_command_topic
        self.state = SinkState.NEW
        self._producer: KafkaProducer | None = None
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._outbox: Outbox | None = None
        self._stop = threading.Event()
        self._health = SinkHealth(False, "not checked yet", None, 0)
        self._wake_monitor = threading.Event()
        self._holding = threading.Event()  # set: refuse records until resume()
        self._connect_backoff = Backoff(base=1.0, cap=30.0)
        self._auth_watch = _AuthFailureWatch()
        # Each producer gets a generation; after its first error it is retired (replaced before the next
        # send), and its other records' errors only mean "fate unknown".
        self._generation = 0
        self._retired: set[int] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the sender and monitor threads; Kafka need not be up."""
        if self.state is not SinkState.NEW:
            raise RuntimeError(f"sink cannot start from state {self.state.value}")
        self.state = SinkState.RUNNING
        logging.getLogger("kafka").addHandler(self._auth_watch)
        for target, name in ((self._sender_loop, "kafka-sender"), (self._monitor_loop, "kafka-monitor")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what the producer holds (acknowledged sends are never lost) and stop the threads."""
        if self.state is not SinkState.RUNNING:
            self.state = SinkState.CLOSED
            return
        self.state = SinkState.CLOSED
        logging.getLogger("kafka").removeHandler(self._auth_watch)
        self._stop.set()
        self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout)
            except kerr.KafkaTimeoutError:
                # Kafka did not take everything in time: what is left stays in the journal for the next start.
                log.warning("producer not flushed in time; unacknowledged commands stay journaled")
                _abort(self._producer)
            except Exception:  # closing must not mask the shutdown
                log.exception("producer close failed")
            self._producer = None

    @property
    def health(self) -> SinkHealth:
        """The monitor's latest view of Kafka."""
        return self._health

    @property
    def connected(self) -> bool:
        """True when a producer exists and the command topic's metadata was reachable at the last check."""
        return self._producer is not None and self._health.connected

    # ------------------------------------------------------------------ publishing

    def publish(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future[Delivery]:
        """Queue one record; the future resolves with its Delivery or a SinkError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()
        refusal = None
        if self.state is not SinkState.RUNNING:
            refusal = SinkUnavailable("The service is shutting down")
        elif self._producer is None:
            refusal = SinkUnavailable("Not connected to Kafka yet")
        elif self._health.topic_missing:
            refusal = SinkUnavailable(f"The command topic {self.topic!r} does not exist")
        if refusal is not None:
            self._holding.set()
            future.set_exception(refusal)
        elif self._health.max_message_bytes and _record_size(key, value, headers) > self._health.max_message_bytes:
            future.set_exception(
                MessageRejected(
                    f"Kafka refused the record: larger than the topic's {self._health.max_message_bytes} bytes"
                )
            )
        else:
            self._outbox = outbox_for(self._outbox)
            self._jobs.put(_Job(self._outbox, future, key, value, headers))
        return future

    def resume(self) -> None:
        """Take records again after a refusal; the caller has put the refused ones back in order."""
        self._holding.clear()

    def _sender_loop(self) -> None:
        while not self._stop.is_set():
            if self._producer is None:
                self._producer = self._connect()
                if self._producer is None:
                    self._fail_queued(SinkUnavailable("Not connected to Kafka"))
                    # No tight loop against a broker that refuses us (bad credentials) or is away.
                    self._stop.wait(self._connect_backoff.next())
                    continue
                self._connect_backoff.reset()
            job = self._jobs.get()
            if job is _STOP:
                break
            if self._generation in self._retired:
                self._replace_producer()
            if job is not _WAKE:
                self._send(job)
        self._fail_queued(SinkUnavailable("The service is shutting down"))

    def retire_producer(self, reason: str) -> None:
        """Give up the current producer: its unacknowledged records fail as uncertain, and a new one is made."""
        with self._lock:
            if self._generation in self._retired:
                return
            self._retired.add(self._generation)
            self._holding.set()
        log.warning("retiring the kafka producer", reason=reason)
        self._jobs.put(_WAKE)

    def _replace_producer(self) -> None:
        """After an error kafka-python's idempotent producer may refuse (or reorder) the rest of a partition;
        a new producer starts clean. Records still in the old one fail as uncertain and are reconciled."""
        old, self._producer = self._producer, None
        if old is not None:
            _abort(old)
        self._producer = self._connect()

    def _connect(self) -> KafkaProducer | None:
        s = self.settings
        if not self._any_broker_listens():
            self._set_health(SinkHealth(False, _NO_BROKER, None, 0))
            return None
        try:
            producer = KafkaProducer(
                bootstrap_servers=s.kafka_bootstrap_servers.split(","),
                client_id=s.kafka_client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=s.kafka_linger_ms,
                batch_size=min(s.kafka_batch_size, self._health.max_message_bytes or s.kafka_batch_size),
                compression_type=None if s.kafka_compression == "none" else s.kafka_compression,
                # The journal holds every record until it is acknowledged, so the producer may keep
                # retrying (idempotently, in order) for as long as Kafka is away.
                delivery_timeout_ms=2**31 - 1,
                request_timeout_ms=int(s.kafka_producer_timeout * 1000),
                max_block_ms=int(min(s.publish_timeout, 5.0) * 1000),
                bootstrap_timeout_ms=int(min(s.kafka_producer_timeout, 5.0) * 1000),
                allow_auto_create_topics=False,
                # kafka-python backs reconnects off up to 30 s by default: after an outage the backlog
                # would wait that long. A small gateway reconnecting every 2 s costs nothing.
                reconnect_backoff_max_ms=2000,
                **security_options(s),
            )
        except Exception as exc:
            health = self._unreachable(exc)
            self._set_health(health)
            log.warning("kafka producer not connected", error=type(exc).__name__, reason=health.reason)
            return None
        coalesce_wakeups(producer)
        self._generation += 1
        log.info("kafka producer connected", bootstrap=s.kafka_bootstrap_servers, generation=self._generation)
        self._wake_monitor.set()
        return producer

    def _send(self, job: _Job) -> None:
        if self._holding.is_set():
            job.outbox.put(resolve, job.future, None, SinkUnavailable("Held after a failed send"))
            return
        job.generation = self._generation
        try:
            record = self._producer.send(self.topic, value=job.value, key=job.key, headers=job.headers)
        except Exception as exc:
            error = translate(exc, sent=False)
            if not isinstance(error, MessageRejected):  # a refused record leaves the order of the rest intact
                self._holding.set()
            job.outbox.put(resolve, job.future, None, error)
            return
        record.add_callback(self._on_ack, job)
        record.add_errback(self._on_error, job)

    def _on_ack(self, job: _Job, metadata) -> None:
        delivery = Delivery(metadata.topic, metadata.partition, metadata.offset)
        job.outbox.put(resolve, job.future, delivery, None)

    def _on_error(self, job: _Job, exc: BaseException) -> None:
        with self._lock:
            first = job.generation not in self._retired
        if first:
            error = translate(exc, sent=True)
            self.retire_producer(f"{type(exc).__name__} after sending")
        else:
            # The producer was already retired: this record may only have failed along with another.
            error = SinkUnavailable("The producer was replaced; outcome unknown", uncertain=True)
        job.outbox.put(resolve, job.future, None, error)

    def _fail_queued(self, error: SinkError) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job is not _WAKE:  # a wake-up has no future to fail
                self._holding.set()
                job.outbox.put(resolve, job.future, None, error)

    # ------------------------------------------------------------------ reconciliation

    def find_published(self, pending: list[Pending], since: float, idle_timeout: float = 30.0) -> dict[int, Delivery]:
        """Read the command topic from `since` (epoch seconds) to its end; return where each of `pending` (by seq)
        already is.

        Blocking (run it in a thread). Only the same record counts: key, value bytes and every one of our headers
        (`pusher-instance`, `body-sha256`, `request_id`…). A request id alone proves nothing: another instance,
        or anyone who can write the topic, may have put a record with that header there.
        """
        by_value: dict[bytes, list[Pending]] = {}
        for item in pending:
            by_value.setdefault(item.value, []).append(item)
        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers.split(","),
            client_id=f"{self.settings.kafka_client_id}-reconcile",
            enable_auto_commit=False,
            request_timeout_ms=int(self.settings.kafka_producer_timeout * 1000),
            **security_options(self.settings),
        )
        try:
            partitions = [
                TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or ())
            ]
            if not partitions:
                raise SinkUnavailable(f"No partitions known for {self.topic!r}")
            consumer.assign(partitions)
            starts = consumer.offsets_for_times({tp: int(since * 1000) for tp in partitions})
            ends = consumer.end_offsets(partitions)
            remaining = {}
            for tp in partitions:
                start = starts.get(tp)
                if start is not None and start.offset < ends[tp]:
                    consumer.seek(tp, start.offset)
                    remaining[tp] = ends[tp]
            found: dict[int, Delivery] = {}
            last_progress = time.monotonic()
            while remaining:
                # However much there is to read, give up only when reading stops making progress.
                if time.monotonic() - last_progress > idle_timeout:
                    raise SinkTimeout("Reading the command topic back made no progress")
                polled = consumer.poll(timeout_ms=500)
                if polled:
                    last_progress = time.monotonic()
                for tp, records in polled.items():
                    for record in records:
                        for item in by_value.get(record.value, ()):
                            if item.seq not in found and _same_record(record, item):
                                found[item.seq] = Delivery(tp.topic, tp.partition, record.offset)
                for tp in list(remaining):
                    if consumer.position(tp) >= remaining[tp]:
                        del remaining[tp]
            return found
        finally:
            consumer.close()

    # ------------------------------------------------------------------ monitoring

    def _monitor_loop(self) -> None:
        admin: KafkaAdminClient | None = None
        while not self._stop.is_set():
            try:
                if admin is None and not self._any_broker_listens():
                    self._set_health(SinkHealth(False, _NO_BROKER, None, 0))
                elif admin is None:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.settings.kafka_bootstrap_servers.split(","),
                        client_id=f"{self.settings.kafka_client_id}-monitor",
                        request_timeout_ms=5000,
                        bootstrap_timeout_ms=5000,
                        reconnect_backoff_max_ms=2000,
                        **security_options(self.settings),
                    )
                if admin is not None:
                    self._set_health(self._check_topic(admin))
            except Exception as exc:
                self._set_health(self._unreachable(exc))
                if admin is not None:
                    _quiet_close(admin)
                    admin = None
            interval = 2.0 if self._health.connected else (15.0 if self._health.auth_failed else 1.0)
            self._wake_monitor.wait(interval)
            self._wake_monitor.clear()
        if admin is not None:
            _quiet_close(admin)

    def _check_topic(self, admin: KafkaAdminClient) -> SinkHealth:
        topics = admin.describe_topics([self.topic])
        brokers = len(admin.describe_cluster().get("brokers", []))
        topic = topics[0] if topics else {}
        missing = topic.get("error_code", 3) != 0
        if missing and self.settings.kafka_create_topic:
            self._create_topic(admin)
            topic = admin.describe_topics([self.topic])[0]
            missing = topic.get("error_code", 3) != 0
        if missing:
            reason = f"topic {self.topic!r} does not exist (set KAFKA_CREATE_TOPIC=true to create it)"
            if self._health.reason != reason:
                log.error("command topic missing", topic=self.topic)
            return SinkHealth(False, reason, None, brokers, topic_missing=True)
        partitions = len(topic.get("partitions", []))
        max_bytes = self._max_message_bytes(admin)
        if self._producer is None:
            return SinkHealth(False, "producer not connected yet", partitions, brokers)
        return SinkHealth(True, None, partitions, brokers, max_message_bytes=max_bytes)

    def _max_message_bytes(self, admin: KafkaAdminClient) -> int | None:
        resource = ConfigResource(ConfigResourceType.TOPIC, self.topic, ["max.message.bytes"])
        found = admin.describe_configs([resource], config_filter="all")
        value = found.get("topic", {}).get(self.topic, {}).get("max.message.bytes", {}).get("value")
        return int(value) if value else None

    def _create_topic(self, admin: KafkaAdminClient) -> None:
        s = self.settings
        spec = {"num_partitions": s.kafka_topic_partitions, "replication_factor": s.kafka_topic_replication}
        try:
            admin.create_topics({self.topic: spec}, wait_for_metadata=True)
            log.info("command topic created", topic=self.topic, **spec)
        except kerr.TopicAlreadyExistsError:
            pass

    def _unreachable(self, exc: BaseException) -> SinkHealth:
        """Health after a failed connection; refused credentials are told apart from an outage."""
        refused = isinstance(exc, kerr.SaslAuthenticationFailedError | kerr.UnsupportedSaslMechanismError)
        if refused or time.monotonic() - self._auth_watch.last_seen < 60:
            return SinkHealth(
                False, "Kafka refused our credentials (SASL authentication failed)", None, 0, auth_failed=True
            )
        return SinkHealth(False, f"cannot reach Kafka ({type(exc).__name__})", None, 0)

    def _any_broker_listens(self) -> bool:
        """A plain TCP probe first: kafka-python leaks sockets when a client's bootstrap fails."""
        for server in self.settings.kafka_bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                socket.create_connection((host.strip("[]") or "localhost", int(port or 9092)), timeout=1).close()
                return True
            except (OSError, ValueError):
                continue
        return False

    def _set_health(self, health: SinkHealth) -> None:
        if health.connected != self._health.connected or health.reason != self._health.reason:
            log.info("kafka readiness changed", ready=health.connected, reason=health.reason)
        self._health = health


def security_options(settings: Settings) -> dict[str, object]:
    """kafka-python's TLS / SASL options from KAFKA_SECURITY_PROTOCOL and friends (shared by every client)."""
    options: dict[str, object] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol.startswith("SASL"):
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password.value,
        }
    if settings.kafka_security_protocol.endswith("SSL"):
        options |= {
            "ssl_cafile": settings.kafka_ssl_cafile,
            "ssl_certfile": settings.kafka_ssl_certfile,
            "ssl_keyfile": settings.kafka_ssl_keyfile,
            "ssl_password": settings.kafka_ssl_password.value if settings.kafka_ssl_password else None,
        }
    return options


class _AuthFailureWatch(logging.Handler):
    """kafka-python reports refused SASL credentials only in its log (the client then times out bootstrapping),
    so the sink listens there to tell a configuration error from an outage."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.last_seen = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if "SaslAuthenticationFailed" in record.getMessage():
            self.last_seen = time.monotonic()


def coalesce_wakeups(producer: KafkaProducer) -> None:
    """Wake the producer's network thread once per look at its accumulator, not once per record.

    kafka-python wakes that thread (a socket write, which gives the GIL away to whichever thread wants it) for every
    record appended behind a batch that cannot leave yet: with idempotence a partition has one batch in flight, so a
    drain woke it once per record, and the thread that appends waited for the GIL back each time. One wake-up
    outstanding is enough: the flag is cleared just before the network thread looks at the accumulator (nothing
    between that look and its next wait reads the wake-up socket), so a record appended after the look wakes it
    again. kafka-python has no public call for this; tests/test_kafka_sink.py checks in its source what this needs.
    """
    sender = producer._sender
    wake, look = sender.wakeup, sender._send_producer_data
    outstanding = False

    def wakeup() -> None:
        nonlocal outstanding
        if not outstanding:
            outstanding = True
            wake()

    def send_producer_data(*args, **kwargs):
        nonlocal outstanding
        outstanding = False
        return look(*args, **kwargs)

    sender.wakeup, sender._send_producer_data = wakeup, send_producer_data


def _abort(producer: KafkaProducer) -> None:
    """Close a producer at once, failing what it still holds. kafka-python has no public call for this:
    close(0) flushes first and raises while records are pending."""
    try:
        producer._sender.force_close()
        producer._sender.join(5)
        producer.close(timeout=0)
    except Exception:
        log.debug("aborting the producer", exc_info=True)


def _quiet_close(admin: KafkaAdminClient) -> None:
    try:
        admin.close()
    except Exception:
        logging.getLogger(__name__).debug("admin close failed", exc_info=True)


def _same_record(record, item: Pending) -> bool:
    """Whether a consumed record is `item` as we sent it (its value already compared)."""
    return record.key == item.key and set(item.headers) <= set(record.headers or ())


def _record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """An upper estimate of the record batch Kafka will see for one record (v2 format overheads)."""
    return 61 + 32 + len(key) + len(value) + sum(len(name) + len(data) + 10 for name, data in headers)
