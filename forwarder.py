"""Store-and-forward: hands journaled commands to Kafka in acceptance order, and keeps that order.

The rule that keeps every device's commands in order: records reach the producer strictly in
journal order (seq), and a record is handed over only when nothing older is waiting. The one
idempotent producer keeps that order per partition. When a hand-over fails, everything that
failed goes back to the head of the queue in seq order, the sink refuses further records
until the forwarder has taken stock (`sink.resume()`), and only then does sending go on.

A record whose fate is unknown (the process died with it in the producer, or the producer
reported an error after sending) is looked up in Kafka before it is sent again, so a crash does
not publish it twice. Only the same record counts (key, value bytes and every header of ours, the
`pusher-instance` of this journal among them): request ids are unique per journal, not per topic.

Expiry: a command still in the queue when its `expires_at` passes is marked expired and never
sent. A command already inside the producer when Kafka goes away cannot be called back; it
carries `expires_at` (body and header) so connectors refuse it if it arrives late. The sink
stops taking new records as soon as Kafka is seen down, which keeps that window small.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import structlog

from errors import MessageRejected, SinkError
from journal import Journal, Pending
from kafka_sink import Backoff, Delivery, KafkaSink
from metrics import Metrics

log = structlog.get_logger("forwarder")

MAX_IN_FLIGHT = 4096
RECONCILE_MARGIN = 300.0  # seconds before a record's acceptance to start looking for it (clock skew)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a handed-over command ended."""

    status: Literal["published", "expired", "failed"]
    delivery: Delivery | None = None
    error: str | None = None


class Forwarder:
    """Publishes journaled commands in order, retries while Kafka is down, reconciles after a crash."""

    def __init__(
        self, journal: Journal, sink: KafkaSink, stall_after: float, metrics: Metrics, backoff_cap: float = 30.0
    ) -> None:
        self.journal = journal
        self.metrics = metrics
        self.sink = sink
        self.stall_after = stall_after
        self.backoff = Backoff(cap=backoff_cap)
        self._ready: deque[Pending] = deque()
        self._in_flight: dict[int, Pending] = {}
        self._waiters: dict[int, asyncio.Future[Outcome]] = {}
        self._expiries: list[tuple[float, int]] = []
        self._expired: set[int] = set()
        self._uncertain: dict[int, Pending] = {}
        self._recovering = False
        self._probing = False
        self._probe_seq: int | None = None
        self._retry_at = 0.0
        self._last_progress = time.monotonic()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, recovered: list[Pending]) -> None:
        """Take the journal's unfinished commands (their fate unknown) and start forwarding."""
        for pending in recovered:
            self._queue(pending)
            self._uncertain[pending.seq] = pending
        self._task = asyncio.get_running_loop().create_task(self._run(), name="forwarder")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not self._stopping:  # should never happen: say so loudly rather than stop forwarding in silence
            log.error("forwarder stopped unexpectedly", error=repr(task.exception()) if not task.cancelled() else None)

    async def stop(self) -> None:
        """Stop handing records over; what is left stays in the journal for the next start."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------------ state

    @property
    def in_flight(self) -> int:
        """Records handed to the producer and not yet resolved."""
        return len(self._in_flight)

    @property
    def stalled(self) -> bool:
        """Records are in the producer but Kafka has acknowledged nothing for `stall_after` seconds."""
        return bool(self._in_flight) and time.monotonic() - self._last_progress > self.stall_after

    def can_hand_over(self) -> bool:
        """True when a new record may go to the producer right now."""
        return (
            not self._recovering
            and not self._uncertain
            and self.sink.connected
            and len(self._in_flight) < MAX_IN_FLIGHT
            and not (self._probing and self._in_flight)
            and not self.stalled
            and time.monotonic() >= self._retry_at
        )

    # ------------------------------------------------------------------ the send path

    def submit(self, pending: Pending) -> tuple[asyncio.Future[Outcome], bool]:
        """Queue a freshly journaled command; returns its outcome future and whether it went to Kafka at once."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[pending.seq] = future
        if pending.expires_at is not None:
            if pending.expires_at <= time.time():  # it expired while being journaled
                self._finish(pending, Outcome("expired", error="expired before it could be published"))
                return future, False
            heapq.heappush(self._expiries, (pending.expires_at, pending.seq))
        if not self._ready and self.can_hand_over():
            self._hand_over(pending)
            return future, True
        self._ready.append(pending)
        self._wake.set()
        return future, False

    def _queue(self, pending: Pending) -> None:
        self._ready.append(pending)
        if pending.expires_at is not None:
            heapq.heappush(self._expiries, (pending.expires_at, pending.seq))

    def _hand_over(self, pending: Pending) -> None:
        if not self._in_flight:
            self._last_progress = time.monotonic()
        if pending.handed_at is None:
            pending.handed_at = time.time()
        if self._probing:
            self._probe_seq = pending.seq
        self._in_flight[pending.seq] = pending
        future = self.sink.publish(pending.key, pending.value, pending.headers)
        future.add_done_callback(lambda f, p=pending: self._on_done_safely(p, f))

    def _on_done_safely(self, pending: Pending, future: asyncio.Future[Delivery]) -> None:
        """A failing callback must not leave a record neither in flight nor queued: log, requeue, hold."""
        try:
            self._on_done(pending, future)
        except Exception:
            log.exception("handling a kafka outcome failed", command_id=pending.request_id)
            if pending.seq not in {p.seq for p in self._ready}:
                bisect.insort(self._ready, pending, key=lambda p: p.seq)
            self._uncertain[pending.seq] = pending
            self._recovering = True
            self._wake.set()

    def _on_done(self, pending: Pending, future: asyncio.Future[Delivery]) -> None:
        self._in_flight.pop(pending.seq, None)
        error = future.exception()
        alone = self._probing and self._probe_seq == pending.seq
        if error is None:
            self._last_progress = time.monotonic()
            self.backoff.reset()
            self._probing = False
            self._published(pending, future.result())
        elif isinstance(error, MessageRejected) and (alone or not error.sent):
            # Refused before sending (too large), or refused when it was the only record on its way: its own fault.
            self._last_progress = time.monotonic()
            self._finish(pending, Outcome("failed", error=error.detail))
        else:
            # Back to the head of the queue, in seq order; nothing newer is handed over until we take stock.
            bisect.insort(self._ready, pending, key=lambda p: p.seq)
            if isinstance(error, SinkError) and (error.uncertain or error.sent):
                self._uncertain[pending.seq] = pending
                # A refusal after sending may have hit a whole batch: retry one record at a time until one
                # gets through, so that only a record refused on its own is marked failed.
                self._probing = True
            if not self._recovering:  # one backoff step per episode, not per record that failed with it
                log.warning("kafka send failed; holding new commands", error=getattr(error, "detail", str(error)))
                self._recovering = True
                self._retry_at = time.monotonic() + self.backoff.next()
        self._wake.set()

    def _published(self, pending: Pending, delivery: Delivery) -> None:
        self.journal.mark(
            pending.seq, "published", topic=delivery.topic, partition=delivery.partition, offset=delivery.offset
        )
        self._finish(pending, Outcome("published", delivery), journal=False)

    def _finish(self, pending: Pending, outcome: Outcome, journal: bool = True) -> None:
        if journal:
            self.journal.mark(pending.seq, outcome.status, error=outcome.error)
        self.metrics.outcomes[outcome.status].inc()
        if outcome.status == "published":
            self.metrics.publish_latency.observe(max(0.0, time.time() - pending.created_at))
        elif outcome.status == "failed":
            self.metrics.failures.labels("kafka_rejected").inc()
        waiter = self._waiters.pop(pending.seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)
        if outcome.status != "published":
            log.warning(
                f"command {outcome.status}",
                command_id=pending.request_id,
                device_id=pending.device_id,
                error=outcome.error,
            )

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        """Tick every 0.25 s (or when woken) until stop(); nothing but stop() may end this loop."""
        while not self._stopping:
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        await self._wake.wait()
                self._wake.clear()
                await self._step()
            except asyncio.CancelledError:
                if self._stopping:
                    raise
                log.warning("forwarder tick cancelled unexpectedly; going on")
            except Exception:
                log.exception("forwarder step failed")
                self._retry_at = time.monotonic() + self.backoff.next()

    async def _step(self) -> None:
        """One pass: expire what is due, then (Kafka permitting) reconcile, resume and drain, in that order."""
        self._expire_due()
        if self.stalled and not self._recovering:
            # Kafka stopped acknowledging: abort what is in the producer, so that nothing stays there past
            # its expiry; those records are looked up in Kafka and sent again (or expired) when it returns.
            log.warning("kafka made no progress; holding new commands", in_flight=len(self._in_flight))
            self._recovering = True
            self.sink.retire_producer("no acknowledgement within PUBLISH_TIMEOUT")
        if (self._recovering and self._in_flight) or time.monotonic() < self._retry_at:
            return  # wait until every outstanding record has resolved, or for the backoff
        if not (self._uncertain or self._recovering or self._ready) or not self.sink.connected:
            return  # nothing to do, or Kafka is away: checked again on the next tick (0.25 s)
        if self._uncertain:
            await self._reconcile()
            if self._uncertain:
                return
        if self._recovering:
            self.sink.resume()
            self._recovering = False
            log.info("kafka sending resumed", queued=len(self._ready))
        self._drain()

    def _drain(self) -> None:
        now = time.time()
        while self._ready and self.can_hand_over():
            pending = self._ready.popleft()
            if pending.seq in self._expired:
                self._expired.discard(pending.seq)
                continue
            if pending.expires_at is not None and pending.expires_at <= now:
                self._finish(pending, Outcome("expired", error="expired before it could be published"))
                continue
            self._hand_over(pending)

    def _expire_due(self) -> None:
        """Mark queued commands whose expires_at passed; they stay skipped when the queue drains."""
        now = time.time()
        due = []
        while self._expiries and self._expiries[0][0] <= now:
            due.append(heapq.heappop(self._expiries)[1])
        if not due:
            return
        queued = {p.seq: p for p in self._ready}
        for seq in due:
            pending = queued.get(seq)
            # In flight: too late to call back. Uncertain: may be in Kafka already; settled after reconciling.
            if pending is None or seq in self._expired or seq in self._uncertain:
                continue
            self._expired.add(seq)
            self._finish(pending, Outcome("expired", error="expired before it could be published"))

    async def _reconcile(self) -> None:
        """Look the uncertain records up in Kafka; mark the ones found, keep the rest for sending."""
        uncertain = dict(self._uncertain)
        since = min(p.handed_at or p.created_at for p in uncertain.values()) - RECONCILE_MARGIN
        try:
            found = await asyncio.to_thread(self.sink.find_published, list(uncertain.values()), since)
        except Exception as exc:
            self._retry_at = time.monotonic() + self.backoff.next()
            log.warning("reconcile failed; will retry", error=type(exc).__name__)
            return
        for seq, delivery in found.items():
            pending = uncertain[seq]
            self._ready.remove(pending)
            self._published(pending, delivery)
        for seq in uncertain:
            self._uncertain.pop(seq, None)
        self.metrics.outcomes["reconciled"].inc(len(found))
        log.info("reconciled with kafka", checked=len(uncertain), already_published=len(found))
