"""The send path: a validated command becomes a Kafka record, is published, and its outcome is recorded.

A reader follows a command from HTTP to Kafka through pusher.py (decode, answer) and this
module (build the record, publish, wait, remember). Nothing here touches kafka-python.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict
from datetime import UTC, datetime

import structlog

from errors import PusherError, SinkError, SinkTimeout
from kafka_sink import Delivery, KafkaSink
from schemas import (
    JSON_ENCODER,
    BatchCommandResponse,
    CommandMessage,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    Counters,
    merged_metadata,
    problem_for,
)
from settings import Settings

log = structlog.get_logger("dispatch")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class StatusIndex:
    """The most recent command statuses of this process, oldest evicted first (the journal makes it durable)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, CommandStatus] = OrderedDict()

    def put(self, status: CommandStatus) -> None:
        """Record or replace a command's status."""
        self._items[status.request_id] = status
        self._items.move_to_end(status.request_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> CommandStatus | None:
        """The command's status, or None when unknown (never seen, or evicted)."""
        return self._items.get(request_id)

    def __len__(self) -> int:
        return len(self._items)


class Dispatcher:
    """Publishes commands through the sink, waits for Kafka's acknowledgement, and keeps the counters."""

    def __init__(self, settings: Settings, sink: KafkaSink) -> None:
        self.settings = settings
        self.sink = sink
        self.index = StatusIndex(settings.status_index_size)
        self.counters = Counters()
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self._latency_total_ms = 0.0

    def _record(self, cmd: CommandRequest, request_id: str, now: datetime, traceparent: str | None):
        message = CommandMessage(
            request_id=request_id,
            device_id=cmd.device_id,
            command_type=cmd.command_type,
            payload=cmd.payload,
            protocol=cmd.protocol,
            parser_script_ref=cmd.parser_script_ref,
            metadata=merged_metadata(cmd),
            timestamp=now,
        )
        headers = [("request_id", request_id.encode()), ("content-type", b"application/json")]
        if traceparent:
            headers.append(("traceparent", traceparent.encode()))
        return cmd.device_id.encode(), JSON_ENCODER.encode(message), headers

    def _start(self, cmd: CommandRequest, traceparent: str | None) -> tuple[str, datetime, asyncio.Future[Delivery]]:
        request_id = cmd.request_id or str(uuid.uuid4())
        now = utc_now()
        key, value, headers = self._record(cmd, request_id, now, traceparent)
        return request_id, now, self.sink.publish(key, value, headers)

    async def push(self, cmd: CommandRequest, traceparent: str | None = None) -> CommandResponse:
        """Publish one command and wait for Kafka's ack; raises SinkError when it is not acknowledged."""
        request_id, now, future = self._start(cmd, traceparent)
        started = time.perf_counter()
        try:
            delivery = await asyncio.wait_for(future, self.settings.publish_timeout)
        except (SinkError, TimeoutError) as exc:
            error = exc if isinstance(exc, SinkError) else SinkTimeout("Kafka did not acknowledge in time")
            self._failed(cmd, request_id, now, error)
            raise error from None
        return self._published(cmd, request_id, now, delivery, started)

    async def push_batch(
        self, items: list[CommandRequest | PusherError], traceparent: str | None = None
    ) -> BatchCommandResponse:
        """Publish every valid item in order and wait for all acks; invalid items fail alone."""
        self.counters.batches += 1
        started = time.perf_counter()
        pending = [item if isinstance(item, PusherError) else (item, *self._start(item, traceparent)) for item in items]
        futures = [entry[3] for entry in pending if not isinstance(entry, PusherError)]
        if futures:
            await asyncio.wait(futures, timeout=self.settings.publish_timeout)
        results: list[CommandResponse] = []
        for entry in pending:
            if isinstance(entry, PusherError):
                results.append(failed_result(None, entry, "rejected"))
                continue
            cmd, request_id, now, future = entry
            if future.done() and future.exception() is None:
                results.append(self._published(cmd, request_id, now, future.result(), started))
                continue
            error = future.exception() if future.done() else SinkTimeout("Kafka did not acknowledge in time")
            future.cancel()
            self._failed(cmd, request_id, now, error)
            results.append(failed_result(request_id, error, "failed"))
        successful = sum(r.success for r in results)
        return BatchCommandResponse(
            total_commands=len(results), successful=successful, failed=len(results) - successful, results=results
        )

    def _published(
        self, cmd: CommandRequest, request_id: str, now: datetime, delivery: Delivery, started: float
    ) -> CommandResponse:
        self.counters.commands_processed += 1
        self._latency_total_ms += (time.perf_counter() - started) * 1000
        self.counters.publish_latency_ms_avg = round(self._latency_total_ms / self.counters.commands_processed, 3)
        self._remember(cmd, request_id, now, "published", delivery=delivery)
        return CommandResponse(
            success=True,
            request_id=request_id,
            status="published",
            message="Command published to Kafka",
            timestamp=now,
            topic=delivery.topic,
            partition=delivery.partition,
            offset=delivery.offset,
        )

    def _failed(self, cmd: CommandRequest, request_id: str, now: datetime, error: BaseException) -> None:
        self.counters.commands_failed += 1
        if isinstance(error, SinkError) and error.retriable:
            self.counters.kafka_unavailable += 1
        detail = error.detail if isinstance(error, PusherError) else "unexpected error"
        self.last_error, self.last_error_at = detail, utc_now()
        self._remember(cmd, request_id, now, "failed", error=detail)

    def _remember(
        self,
        cmd: CommandRequest,
        request_id: str,
        now: datetime,
        status: str,
        delivery: Delivery | None = None,
        error: str | None = None,
    ) -> None:
        """Keep the outcome in the status index and log it, one line per command."""
        where = asdict(delivery) if delivery else {}
        self.index.put(
            CommandStatus(
                request_id=request_id,
                device_id=cmd.device_id,
                command_type=cmd.command_type,
                status=status,
                created_at=now,
                updated_at=utc_now(),
                error=error,
                **where,
            )
        )
        (log.info if delivery else log.warning)(
            f"command {status}",
            command_id=request_id,
            device_id=cmd.device_id,
            command_type=cmd.command_type,
            error=error,
            **where,
        )

    def rejected(self, count: int = 1) -> None:
        """Count commands refused by validation."""
        self.counters.commands_rejected += count


def failed_result(request_id: str | None, error: BaseException, status: str) -> CommandResponse:
    """A batch item's failure, carrying its problem."""
    problem = problem_for(error)
    return CommandResponse(
        success=False, request_id=request_id, status=status, message=problem.title, timestamp=utc_now(), error=problem
    )
