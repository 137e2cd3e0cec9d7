"""Store-and-forward: hands journaled commands to Kafka in acceptance order, and keeps that order.

The rule that keeps every device's commands in order: records reach the producer strictly in release order
(acceptance; a held command's due time, see below), and a record is handed over only when nothing released
before it is waiting. The one idempotent producer keeps that order per partition. When a hand-over fails,
everything that failed goes back to the head of the queue in release order, the sink refuses further records
until the forwarder has taken stock (`sink.resume()`), and only then does sending go on.

A record whose fate is unknown (the process died with it in the producer, or the producer reported an error
after sending) is looked up in Kafka before it is sent again, so a crash does not publish it twice. Which ones
those can be, the journal says: a command is marked `handed` before it can reach a producer (in its insert, when
it may go straight out, else in a commit just before), so a command that waited out an outage and a restart is
known never to have left, and needs no look-up. Only the same record counts (key, value bytes and every header
of ours, the `pusher-instance` of this journal among them): request ids are unique per journal, not per topic.

Deliver at: a command with `not_before` ahead waits in a heap until it is due; it then joins the queue, so the
queue is in release order (due time, then acceptance) and a device's commands reach Kafka in that order.

Latest wins and cancel: a command still queued here (never handed to the producer, not uncertain) can be taken
back: superseded by a newer command of its device with the same `coalesce_key`, or cancelled by its sender. Both
happen on the event loop, where hand-overs happen too, so a command is either taken back or handed over, never
both. Commands recovered at start-up that may be in Kafka already are only superseded once reconciled (at hand-
over).

A long queue: past KEEP_LOADED queued commands, a plain one (journal.plain: due, never handed over, no expiry
and no coalesce_key) joins the queue by its seq alone, in a `_Spill` (8 bytes a command), and is read back whole
from the journal when the queue reaches it; the others keep what the queue needs and leave their record in the
journal. A restart spills every plain command it recovers. So a long outage's backlog costs memory by the
commands that need it, not by its length.

Expiry: a command still in the queue when its `expires_at` passes is marked expired and never sent. A command
already inside the producer when Kafka goes away cannot be called back; it carries `expires_at` (body and
header) so connectors refuse it if it arrives late. The sink stops taking new records as soon as Kafka is seen
down, which keeps that window small.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Literal

import structlog

from errors import MessageRejected, SinkError
from journal import Backlog, Journal, Pending, plain
from kafka_sink import Backoff, Delivery, KafkaSink
from metrics import Metrics

log = structlog.get_logger("forwarder")

MAX_IN_FLIGHT = 4096
# Queued commands kept whole in memory; past them a plain command is kept by its seq alone and one that needs more
# (held, expiring, coalescing) keeps only what the queue needs; both are read back from the journal to be sent.
KEEP_LOADED = 4096
RECONCILE_MARGIN = 300.0  # seconds before a record's acceptance to start looking for it (clock skew)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a handed-over command ended."""

    status: Literal["published", "expired", "failed", "cancelled", "superseded"]
    delivery: Delivery | None = None
    error: str | None = None
    superseded_by: str | None = None  # the request id of the command that replaced it


@dataclass(slots=True)
class _Group:
    """The queued commands of one device and coalesce_key, and the newest command known with them."""

    latest: Pending
    queued: dict[int, Pending]  # seq -> command, still queued here


class _Spill:
    """Plain commands queued one after the other, kept by their seqs alone (ascending, so found by bisection) from
    the release order `first` on. `taken` of them have left for the producer; the rest are read back when the
    queue reaches them."""

    __slots__ = ("first", "seqs", "taken")

    def __init__(self, seqs: array, first: int) -> None:
        self.seqs = seqs
        self.first = first
        self.taken = 0

    @property
    def order(self) -> int:
        """The release order of its next command (what keeps the queue sorted)."""
        return self.first + self.taken

    @property
    def left(self) -> int:
        return len(self.seqs) - self.taken

    def take(self, count: int) -> _Spill:
        """The next `count` commands, as a spill of their own (handed back to the queue whole if they cannot go)."""
        piece = _Spill(self.seqs[self.taken : self.taken + count], self.order)
        self.taken += len(piece.seqs)
        return piece

    def holds(self, seq: int) -> bool:
        """Whether `seq` is here and not taken yet."""
        at = bisect.bisect_left(self.seqs, seq, self.taken)
        return at < len(self.seqs) and self.seqs[at] == seq


def _due(pending: Pending) -> float:
    """When a command is due: its not_before, or its acceptance."""
    return max(pending.created_at, pending.not_before or 0.0)


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
        # Every command queued here: due ones in _ready (release order), the others in _held until due. An entry of
        # _ready whose command left _waiting (expired, cancelled, superseded, reconciled) is skipped when reached.
        self._waiting: dict[int, Pending] = {}
        self._ready: deque[Pending | _Spill] = deque()
        self._spilled_last = 0  # the highest seq spilled so far: a spill's seqs ascend
        self._gone: set[int] = set()  # spilled commands cancelled before the queue reached them
        self._held: list[tuple[float, int]] = []  # (not_before, seq), soonest first
        self._released = 0  # how many commands joined _ready: the next one's `order`
        self._groups: dict[tuple[str, str], _Group] = {}  # (device_id, coalesce_key) -> its queued commands
        self._staged: list[Pending] = []  # leaving the queue: handed over once the journal has recorded it
        self._staged_spill: _Spill | None = None  # spilled commands leaving with them, read back first
        self._staging_tasks: set[asyncio.Task] = set()
        self._in_flight: dict[int, Pending] = {}
        self._waiters: dict[int, asyncio.Future[Outcome]] = {}
        self._expiries: list[tuple[float, int]] = []
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

    def start(self, recovered: Backlog | list[Pending]) -> None:
        """Take the journal's unfinished commands and start forwarding. Those due may have reached Kafka before
        the restart (their fate is unknown until reconciled); those held for later cannot have."""
        if not isinstance(recovered, Backlog):
            recovered = Backlog(pending=recovered)
        now = time.time()
        due = []
        for pending in recovered.pending:
            if pending.expires_at is not None:
                heapq.heappush(self._expiries, (pending.expires_at, pending.seq))
            if pending.handed:  # may be in Kafka: looked up there first
                self._uncertain[pending.seq] = pending
            if pending.not_before is not None and pending.not_before > now and not pending.handed:
                self._enqueue(pending, now)
            else:
                due.append(pending)
        # In release order (due time, then acceptance): the plain ones, oldest first, are merged in by acceptance.
        due.sort(key=lambda p: (_due(p), p.seq))
        at = 0
        for seq, created in zip(recovered.plain_seqs, recovered.plain_created, strict=True):
            while at < len(due) and (_due(due[at]), due[at].seq) < (created, seq):
                self._enqueue(due[at], now)
                at += 1
            self._spill(seq)
        for pending in due[at:]:
            self._enqueue(pending, now)
        for group in list(self._groups.values()):  # latest wins among the held ones already
            self._supersede_older(group.latest)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="forwarder")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not self._stopping:  # should never happen: say so loudly rather than stop forwarding in silence
            log.error("forwarder stopped unexpectedly", error=repr(task.exception()) if not task.cancelled() else None)

    async def stop(self) -> None:
        """Stop handing records over; what is left stays in the journal for the next start."""
        self._stopping = True
        for task in list(self._staging_tasks):  # what they held is still queued in the journal
            task.cancel()
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
    def queued(self) -> int:
        """Commands queued here, spilled ones included (counted by walking the queue: for logs and tests)."""
        spills = [item for item in self._ready if isinstance(item, _Spill)]
        cancelled = sum(1 for seq in self._gone if any(spill.holds(seq) for spill in spills))
        return len(self._waiting) + sum(spill.left for spill in spills) - cancelled

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

    def submit(self, pending: Pending) -> tuple[asyncio.Future[Outcome], bool, list[str]]:
        """Queue a freshly journaled command; returns its outcome future, whether it went to Kafka at once, and the
        request ids of the earlier commands it superseded (its coalesce_key)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[pending.seq] = future
        superseded = self._supersede_older(pending) if pending.coalesce_key is not None else []
        # Held commands due by now join the queue first: due earlier, they go before this one, tick or no tick.
        self._release_due()
        now = time.time()
        if pending.expires_at is not None:
            if pending.expires_at <= now:  # it expired while being journaled
                self._finish(pending, Outcome("expired", error="expired before it could be published"))
                return future, False, superseded
            heapq.heappush(self._expiries, (pending.expires_at, pending.seq))
        if pending.handed and _due(pending) <= now and self.may_hand_over():
            self._hand_over(pending)
            return future, True, superseded
        self._enqueue(pending, now)
        self._wake.set()
        return future, False, superseded

    def forget(self, seq: int) -> None:
        """Nobody waits for command `seq`'s outcome any more (its request was answered)."""
        self._waiters.pop(seq, None)

    def may_hand_over(self) -> bool:
        """Whether a command due now would go straight to the producer: nothing queued before it and Kafka taking
        records. The journal records such a command as `handed` in its own insert (see `_stage` for the others)."""
        return not self._staging and self._ready_head() is None and self.can_hand_over()

    def withdraw(self, seq: int, request_id: str = "", device_id: str = "") -> bool:
        """Cancel command `seq` if it is still queued here (never handed to the producer): True if it was. Its ids
        name it in the log when it was spilled (then only its seq is here)."""
        pending = self._waiting.get(seq)
        if pending is None:
            if seq > self._spilled_last or seq in self._gone:
                return False
            if not any(isinstance(item, _Spill) and item.holds(seq) for item in self._ready):
                return False
            self._gone.add(seq)  # skipped when the queue reaches it
            pending = Pending(
                seq=seq, request_id=request_id, device_id=device_id, created_at=0.0, expires_at=None, key=None,
                value=None, headers=None,
            )  # fmt: skip
            self._finish(pending, Outcome("cancelled"))
            return True
        if not self._touchable(pending):
            return False
        self._drop(pending, Outcome("cancelled"))
        return True

    # ------------------------------------------------------------------ the queue

    def _enqueue(self, pending: Pending, now: float) -> None:
        """Queue a command: released at once when due, else held until then; past KEEP_LOADED a plain one is
        spilled."""
        if len(self._waiting) >= KEEP_LOADED and plain(pending) and pending.seq > self._spilled_last:
            self._spill(pending.seq)
            return
        if len(self._waiting) >= KEEP_LOADED and pending.seq not in self._uncertain:
            pending.key = pending.value = pending.headers = None  # the journal has it
        self._join(pending)
        if pending.not_before is not None and pending.not_before > now:
            heapq.heappush(self._held, (pending.not_before, pending.seq))
        else:
            self._release(pending)

    def _join(self, pending: Pending) -> None:
        """Count a command as queued here (in its coalesce group too)."""
        self._waiting[pending.seq] = pending
        if pending.coalesce_key is not None:
            group = self._groups.setdefault((pending.device_id, pending.coalesce_key), _Group(pending, {}))
            group.queued[pending.seq] = pending
            if pending.seq > group.latest.seq:
                group.latest = pending

    def _spill(self, seq: int) -> None:
        """Queue a plain command by its seq alone, last."""
        tail = self._ready[-1] if self._ready else None
        if isinstance(tail, _Spill) and tail.first + len(tail.seqs) == self._released and seq > tail.seqs[-1]:
            tail.seqs.append(seq)
        else:
            self._ready.append(_Spill(array("q", [seq]), self._released))
        self._released += 1
        self._spilled_last = max(self._spilled_last, seq)

    def _release(self, pending: Pending) -> None:
        self._number(pending)
        self._ready.append(pending)

    def _number(self, pending: Pending) -> None:
        """Give a command that has come due its place in the release order (the order a failed hand-over keeps)."""
        pending.order = self._released
        self._released += 1

    def _release_due(self) -> None:
        """Move the held commands that are due to the queue, soonest first (then in acceptance order)."""
        now = time.time()
        while self._held and self._held[0][0] <= now:
            pending = self._waiting.get(heapq.heappop(self._held)[1])
            if pending is not None:  # else it left meanwhile (cancelled, superseded, expired)
                self._release(pending)

    def _ready_head(self) -> Pending | _Spill | None:
        """The first entry of the queue still waiting: a command, or a spill with commands left (entries of
        commands that left are dropped on the way)."""
        while self._ready:
            head = self._ready[0]
            if isinstance(head, _Spill):
                while head.left and head.seqs[head.taken] in self._gone:  # cancelled while spilled
                    self._gone.discard(head.seqs[head.taken])
                    head.taken += 1
                if head.left:
                    return head
            elif self._waiting.get(head.seq) is head:
                return head
            self._ready.popleft()
        return None

    def _leave(self, pending: Pending) -> None:
        """The command is no longer queued here (handed over or finished)."""
        self._waiting.pop(pending.seq, None)
        if pending.coalesce_key is not None:
            key = (pending.device_id, pending.coalesce_key)
            group = self._groups.get(key)
            if group is not None:
                group.queued.pop(pending.seq, None)
                if not group.queued:
                    del self._groups[key]

    def _drop(self, pending: Pending, outcome: Outcome) -> None:
        """Finish a queued command without sending it."""
        self._leave(pending)
        self._finish(pending, outcome)

    def _touchable(self, pending: Pending) -> bool:
        """Whether a queued command may be taken back: never handed to a producer, and not of unknown fate."""
        return pending.handed_at is None and pending.seq not in self._uncertain

    def _supersede_older(self, newer: Pending) -> list[str]:
        """Latest wins: every older command queued here with newer's device and coalesce_key that may still be
        taken back ends superseded by `newer`. Returns their request ids."""
        group = self._groups.get((newer.device_id, newer.coalesce_key))
        if group is None:
            return []
        superseded = []
        for older in [p for p in group.queued.values() if p.seq < newer.seq and self._touchable(p)]:
            self._drop(older, Outcome("superseded", superseded_by=newer.request_id))
            superseded.append(older.request_id)
        group = self._groups.get((newer.device_id, newer.coalesce_key))
        if group is not None and newer.seq > group.latest.seq:  # older ones of unknown fate are left: see _drain
            group.latest = newer
        return superseded

    def _hand_over(self, pending: Pending) -> None:
        if pending.order < 0:  # straight from submit(): due now, after everything released before it
            self._number(pending)
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
            if pending.seq not in self._waiting:
                self._requeue(pending)
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
            # Back to the head of the queue, in release order; nothing newer is handed over until we take stock.
            self._requeue(pending)
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

    def _requeue(self, pending: Pending) -> None:
        """A command the producer gave back goes back to its place in the queue (it was handed over: it is never
        taken back now, so it joins no coalesce group)."""
        self._waiting[pending.seq] = pending
        bisect.insort(self._ready, pending, key=lambda p: p.order)

    def _published(self, pending: Pending, delivery: Delivery) -> None:
        self.journal.mark(
            pending.seq,
            pending.request_id,
            "published",
            topic=delivery.topic,
            partition=delivery.partition,
            offset=delivery.offset,
            size=len(pending.value) if pending.value is not None else None,
        )
        self._finish(pending, Outcome("published", delivery), journal=False)

    def _finish(self, pending: Pending, outcome: Outcome, journal: bool = True) -> None:
        if journal:
            size = len(pending.value) if pending.value is not None else None  # else the journal reads it
            self.journal.mark(
                pending.seq,
                pending.request_id,
                outcome.status,
                error=outcome.error,
                superseded_by=outcome.superseded_by,
                size=size,
            )
        self.metrics.outcomes[outcome.status].inc()
        if outcome.status == "published":
            self.metrics.publish_latency.observe(max(0.0, time.time() - pending.created_at))
        elif outcome.status == "failed":
            self.metrics.failures.labels("kafka_rejected").inc()
        waiter = self._waiters.pop(pending.seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)
        if outcome.status in ("cancelled", "superseded"):
            log.info(
                f"command {outcome.status}",
                command_id=pending.request_id,
                device_id=pending.device_id,
                superseded_by=outcome.superseded_by,
            )
        elif outcome.status != "published":
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
        self._release_due()
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
            log.info("kafka sending resumed", queued=self.queued)
        self._drain()

    @property
    def _staging(self) -> bool:
        """The journal is recording a hand-over: nothing overtakes it."""
        return bool(self._staged) or self._staged_spill is not None

    def _drain(self) -> None:
        if self._staging:
            return
        now = time.time()
        staged: list[Pending] = []
        spill = None
        while (
            self.can_hand_over()
            and len(self._in_flight) + len(staged) < MAX_IN_FLIGHT
            and (pending := self._ready_head()) is not None
        ):
            if isinstance(pending, _Spill):  # the rest waits for these to be read back
                # One at a time while probing (see _on_done): the rest would only be read back to be put back.
                spill = pending.take(1 if self._probing else MAX_IN_FLIGHT - len(self._in_flight) - len(staged))
                break
            self._ready.popleft()
            if pending.expires_at is not None and pending.expires_at <= now:
                self._drop(pending, Outcome("expired", error="expired before it could be published"))
                continue
            newer = self._newer(pending)
            if newer is not None:  # a command recovered at start-up, replaced since (or meanwhile)
                self._drop(pending, Outcome("superseded", superseded_by=newer.request_id))
                continue
            self._leave(pending)
            if pending.handed and pending.value is not None and not staged:
                self._hand_over(pending)
            else:  # after one that waits for the journal, the rest wait too: the order holds
                staged.append(pending)
        if staged or spill is not None:
            self._staged, self._staged_spill = staged, spill
            task = asyncio.get_running_loop().create_task(self._stage(staged, spill), name="forwarder-stage")
            self._staging_tasks.add(task)
            task.add_done_callback(self._staging_tasks.discard)

    async def _stage(self, staged: list[Pending], spill: _Spill | None) -> None:
        """Hand `staged`, then the commands of `spill`, over, in order, once the journal has recorded that they may
        reach Kafka (a crash after that looks them up in Kafka before sending them again, never taking them for
        unsent) and the records it kept for them are read back."""
        spilled = list(spill.seqs) if spill is not None else []
        unrecorded = [p.seq for p in staged if not p.handed] + spilled
        unloaded = [p.seq for p in staged if p.value is None]
        read: list[Pending] | None = None
        try:
            recorded = self.journal.record_handover(unrecorded) if unrecorded else None
            records = await self.journal.records(unloaded) if unloaded else {}
            read = await self.journal.queued(spilled) if spilled else []
            ok = await recorded if recorded is not None else True
            ok = ok and len(records) == len(unloaded)
        except Exception as exc:  # the journal closed or failed: they stay queued, nothing is lost
            log.warning("reading back queued commands failed", error=f"{type(exc).__name__}: {exc}")
            ok, records = False, {}
        finally:
            self._staged, self._staged_spill = [], None
        if spill is not None and read is None:  # not read back: they go back to their place, as they were
            bisect.insort(self._ready, spill, key=lambda p: p.order)
        elif spill is not None:  # one not read back was finished meanwhile (the journal says so): nothing to send
            for pending in read:
                pending.order = spill.first + bisect.bisect_left(spill.seqs, pending.seq)
            missing = set(spilled) - {pending.seq for pending in read} - self._gone if len(read) < len(spilled) else ()
            if missing:  # only a cancel finishes a spilled command: say so if something else did
                log.warning("spilled commands no longer waiting", count=len(missing), seqs=sorted(missing)[:10])
            if self._gone:  # cancelled while spilled, perhaps too late for the read to see it
                read = [pending for pending in read if pending.seq not in self._gone]
                self._gone.difference_update(spilled)
            staged += read
        for pending in staged:
            if pending.seq in records:
                pending.key, pending.value, pending.headers = records[pending.seq]
            pending.handed = pending.handed or ok
            if ok and self.can_hand_over():
                self._hand_over(pending)
            else:
                self._put_back(pending)
        if not ok:
            log.warning("the journal could not record a hand-over; holding commands", queued=len(staged))
            self._retry_at = time.monotonic() + self.backoff.next()
        self._wake.set()

    def _put_back(self, pending: Pending) -> None:
        """A command taken off the queue but never handed over goes back to its place, as it was."""
        self._join(pending)
        bisect.insort(self._ready, pending, key=lambda p: p.order)

    def _newer(self, pending: Pending) -> Pending | None:
        """A newer command with pending's device and coalesce_key, if pending may still be taken back."""
        if pending.coalesce_key is None or not self._touchable(pending):
            return None
        group = self._groups.get((pending.device_id, pending.coalesce_key))
        return group.latest if group is not None and group.latest.seq > pending.seq else None

    def _expire_due(self) -> None:
        """Mark queued commands whose expires_at passed; they stay skipped when the queue drains."""
        now = time.time()
        due = []
        while self._expiries and self._expiries[0][0] <= now:
            due.append(heapq.heappop(self._expiries)[1])
        if not due:
            return
        for seq in due:
            pending = self._waiting.get(seq)
            # In flight: too late to call back. Uncertain: may be in Kafka already; settled after reconciling.
            if pending is None or seq in self._uncertain:
                continue
            self._drop(pending, Outcome("expired", error="expired before it could be published"))

    async def _reconcile(self) -> None:
        """Look the uncertain records up in Kafka; mark the ones found, keep the rest for sending."""
        uncertain = dict(self._uncertain)
        # Nothing was handed over before it was due: a held command is looked for from its due time on.
        since = min(p.handed_at or _due(p) for p in uncertain.values()) - RECONCILE_MARGIN
        try:
            found = await asyncio.to_thread(self.sink.find_published, list(uncertain.values()), since)
        except Exception as exc:
            self._retry_at = time.monotonic() + self.backoff.next()
            log.warning("reconcile failed; will retry", error=type(exc).__name__)
            return
        for seq, delivery in found.items():
            pending = uncertain[seq]
            self._leave(pending)
            self._published(pending, delivery)
        for seq in uncertain:
            self._uncertain.pop(seq, None)
        self.metrics.outcomes["reconciled"].inc(len(found))
        log.info("reconciled with kafka", checked=len(uncertain), already_published=len(found))
