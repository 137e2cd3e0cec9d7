"""The shared status topic: this instance's transitions out, every instance's and connector's in.

Out: the journal writes each transition into its status outbox in the same transaction as the
transition itself; a thread here publishes the outbox in order and forgets only what Kafka
acknowledged, so a crash can repeat an event but never lose one. In: a consumer assigned every
partition of the topic (no consumer group: every instance reads everything) applies the events to
the journal and stores its read position in the same transaction, so any instance answers for any
command. Both directions tolerate repeats, since a status never moves back to a lower stage.

Trust: anyone who can write the topic could write an event. Instances sign theirs (HMAC-SHA256 of the
record's value under STATUS_TOPIC_SECRET, hex, in the header `pusher-signature`); an event whose signature
does not verify is ignored, and an unsigned one (a connector's) is applied only as far as the journal
lets a connector speak (status_store.apply_event).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import sqlite3
import threading
import time
from typing import Literal

import kafka.errors as kerr
import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from journal import Journal
from kafka_sink import Backoff, coalesce_wakeups, security_options
from metrics import Metrics
from schemas import STATUS_EVENT_DECODER, StatusEvent
from settings import Secret, Settings
from status_store import Received

log = structlog.get_logger("status_feed")
_TOPIC_CHECK = 30.0  # how often the consumer looks for new partitions of the status topic
SIGNATURE_HEADER = "pusher-signature"
Signature = Literal["valid", "none", "bad"]


def sign(secret: Secret, value: bytes) -> bytes:
    """The signature of a status record: hex HMAC-SHA256 of its value bytes under `secret`."""
    return hmac.new(secret.value.encode(), value, hashlib.sha256).hexdigest().encode()


def signature(headers: list[tuple[str, bytes]], value: bytes | None, secrets: list[Secret]) -> Signature:
    """`valid`: the record carries one signature, made with one of `secrets`; `none`: no signature (a
    connector's event); `bad`: anything else (a forgery, or an instance with another secret)."""
    signatures = [data for name, data in headers or () if name == SIGNATURE_HEADER]
    if not signatures:
        return "none"
    if len(signatures) > 1 or not isinstance(signatures[0], bytes) or not isinstance(value, bytes):
        return "bad"
    valid = any(hmac.compare_digest(sign(secret, value), signatures[0]) for secret in secrets)
    return "valid" if valid else "bad"


def _checked(event: StatusEvent) -> StatusEvent:
    """The event, if its times are ones we can store and show; a far-future `at` would also pin the row forever."""
    for when in (event.at, event.created_at, event.expires_at):
        if when is not None and not _EARLIEST <= when.timestamp() <= _LATEST:
            raise ValueError(f"time out of range: {when.isoformat()}")
    if event.at.timestamp() > time.time() + _SKEW:
        raise ValueError(f"`at` is in the future: {event.at.isoformat()}")
    return event


_EARLIEST, _LATEST = 0.0, 253_402_214_400.0  # 1970 .. 9999-12-30: every time shown stays a valid datetime
_SKEW = 3600.0  # clocks of hosts writing the topic may disagree, but not by more than an hour


class StatusFeed:
    """Publishes the journal's status outbox to KAFKA_STATUS_TOPIC and applies the topic back to it."""

    def __init__(self, settings: Settings, journal: Journal, metrics: Metrics) -> None:
        self.settings = settings
        self.journal = journal
        self.metrics = metrics
        self.topic = settings.kafka_status_topic
        self._secrets = [s for s in (settings.status_topic_secret, settings.status_topic_secret_previous) if s]
        if settings.status_topic_secret is None:  # load_settings refuses this; a Settings built by hand might not
            raise ValueError("KAFKA_STATUS_TOPIC needs STATUS_TOPIC_SECRET")
        self.consuming = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def published(self) -> int:
        """Events this instance put on the status topic (as the metrics count them)."""
        return self._counted("out")

    @property
    def applied(self) -> int:
        """Events read from the status topic and applied to the journal."""
        return self._counted("in")

    @property
    def ignored(self) -> int:
        """Events read from the status topic and not applied (bad signature, undecodable, untrusted)."""
        return self._counted("ignored")

    def _counted(self, direction: str) -> int:
        return int(self.metrics.value("pusher_status_events_total", direction=direction))

    def start(self) -> None:
        """Start the publishing and the consuming thread."""
        for target, name in ((self._publish_loop, "status-out"), (self._consume_loop, "status-in")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 5.0) -> None:
        """Stop both threads, waiting at most `timeout` for a publish under way: what it has not finished
        stays in the outbox and goes at the next start, so shutdown need not wait for an absent Kafka."""
        self._stop.set()
        self.journal.outbox_written.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def _options(self) -> dict[str, object]:
        s = self.settings
        return {
            "bootstrap_servers": s.kafka_bootstrap_servers.split(","),
            "client_id": f"{s.kafka_client_id}-status",
            "reconnect_backoff_max_ms": 2000,
            **security_options(s),
        }

    # ------------------------------------------------------------------ out

    def _publish_loop(self) -> None:
        producer: KafkaProducer | None = None
        backoff = Backoff(0.2, 5.0)
        sent_up_to = 0
        while not self._stop.is_set():
            self.journal.outbox_written.clear()
            try:
                batch = self.journal.outbox_batch(sent_up_to)
            except sqlite3.Error as exc:
                log.warning("status outbox not readable", error=str(exc))
                self._stop.wait(1.0)
                continue
            if not batch:
                self.journal.outbox_written.wait(1.0)
                continue
            try:
                if producer is None:
                    producer = KafkaProducer(acks="all", enable_idempotence=True, linger_ms=5, **self._options())
                    coalesce_wakeups(producer)
                secret = self._secrets[0]  # the current one; a previous one only verifies
                futures = [
                    producer.send(
                        self.topic, key=rid.encode(), value=event, headers=[(SIGNATURE_HEADER, sign(secret, event))]
                    )
                    for _, rid, event in batch
                ]
                producer.flush(timeout=self.settings.kafka_producer_timeout)
                for future in futures:
                    if future.failed():
                        raise future.exception
            except Exception as exc:  # anything: the outbox keeps the events, and they go again
                log.warning("status events not published yet", error=type(exc).__name__, detail=str(exc)[:200])
                if producer is not None:
                    with contextlib.suppress(Exception):
                        producer.close(timeout=0.5)
                    producer = None
                self._stop.wait(backoff.next())
                continue
            backoff.reset()
            sent_up_to = batch[-1][0]
            self._count("out", len(batch))
            self.journal.outbox_sent(sent_up_to)
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=1.0)

    # ------------------------------------------------------------------ in

    def _consume_loop(self) -> None:
        consumer: KafkaConsumer | None = None
        backoff = Backoff(0.2, 5.0)
        next_check = 0.0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    # earliest: a stored position that is gone (topic recreated, records deleted) restarts
                    # from the oldest event kept, never silently from the newest
                    consumer = KafkaConsumer(
                        group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **self._options()
                    )
                    next_check = 0.0
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + (_TOPIC_CHECK if self._assign(consumer) else 1.0)
                if not consumer.assignment():
                    self._stop.wait(1.0)
                    continue
                polled = consumer.poll(timeout_ms=500, max_records=2000)
                if polled and not self._apply(polled):
                    next_check = 0.0  # not stored (the journal cannot be written): read again, after a pause
                    self._stop.wait(backoff.next())
                    continue
                backoff.reset()
            except Exception as exc:  # the broker went away, or worse: start over from the stored positions
                log.warning("status topic not readable", error=type(exc).__name__, detail=str(exc)[:200])
                self.consuming = False
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()
                    consumer = None
                self._stop.wait(backoff.next())
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close()

    def _assign(self, consumer: KafkaConsumer) -> bool:
        """Assign every partition of the topic, at the positions stored in the journal; False while it is missing."""
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            if self.settings.kafka_create_topic:
                self._create_topic()
            else:
                log.warning("status topic missing: create it (compacted) or set KAFKA_CREATE_TOPIC", topic=self.topic)
            return False
        wanted = {TopicPartition(self.topic, p) for p in partitions}
        consumer.assign(sorted(wanted))
        stored = self.journal.status_positions()
        for tp in wanted:
            if tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        if not self.consuming:
            log.info("status topic assigned", topic=self.topic, partitions=len(wanted))
        self.consuming = True
        return True

    def _apply(self, polled: dict) -> bool:
        """Decode and apply one poll's events; False when the journal did not store them."""
        events: list[Received] = []
        positions: dict[int, int] = {}
        for tp, records in polled.items():
            for record in records:
                positions[tp.partition] = record.offset + 1
                signed = signature(record.headers, record.value, self._secrets)
                if signed == "bad":
                    self._count("ignored", 1)
                    log.warning(
                        "status event with a bad signature ignored", partition=tp.partition, offset=record.offset
                    )
                    continue
                try:
                    events.append((_checked(STATUS_EVENT_DECODER.decode(record.value)), signed == "valid"))
                except Exception as exc:  # whatever is in there (tombstones, absurd nesting), the feed goes on
                    self._count("ignored", 1)
                    log.warning(
                        "status event ignored",
                        partition=tp.partition,
                        offset=record.offset,
                        error=f"{type(exc).__name__}: {str(exc)[:300]}",
                    )
        skipped = self.journal.apply_events(events, positions)
        if skipped is None:
            return False
        self._count("ignored", skipped)
        self._count("in", len(events) - skipped)
        return True

    def _count(self, direction: str, n: int) -> None:
        if n:
            self.metrics.status_events[direction].inc(n)

    def _create_topic(self) -> None:
        s = self.settings
        spec = {
            "num_partitions": s.kafka_topic_partitions,
            "replication_factor": s.kafka_topic_replication,
            # Compaction keeps one event per command, the last written, which need not be the furthest stage
            # (events race). Leaving events alone for as long as the journal keeps commands means an
            # instance reading the topic from the start sees every stage of every command it could be asked of.
            "configs": {"cleanup.policy": "compact", "min.compaction.lag.ms": str(int(s.journal_retention * 1000))},
        }
        admin = KafkaAdminClient(**self._options())
        try:
            admin.create_topics({self.topic: spec}, wait_for_metadata=True)
            log.info("status topic created", topic=self.topic, partitions=s.kafka_topic_partitions)
        except kerr.TopicAlreadyExistsError:
            pass
        finally:
            admin.close()
