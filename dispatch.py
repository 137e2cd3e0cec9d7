"""The send path: journal first, then Kafka.

A validated command becomes its Kafka record here, is written to the journal (group-committed,
fsynced), handed to the forwarder, and answered: 200 when Kafka acknowledged it within
PUBLISH_TIMEOUT, 202 when it is safely journaled and will follow. A reader follows a command
from HTTP to Kafka through pusher.py (decode, answer), this module, and forwarder.py.
Nothing here touches kafka-python or sqlite3.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import structlog

from admission import Alarms, Bell
from errors import IdempotencyConflict, MessageRejected, NotCancellable, PusherError
from forwarder import Forwarder, Outcome
from journal import Accepted, FanoutAccepted, Journal, JournalRow, NewCommand, NewFanout, Pending
from metrics import Metrics
from pusher_client.wire import new_id
from schemas import (
    JSON_ENCODER,
    STAGE_RANK,
    TERMINAL,
    BatchCommandResponse,
    CommandMessage,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    Counters,
    FanoutRequest,
    FanoutResponse,
    Transition,
    from_epoch,
)
from settings import Settings
from validation import merged_metadata, problem_for

log = structlog.get_logger("dispatch")
_HASH_ENCODER = msgspec.json.Encoder(order="sorted")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


async def wait_done(futures: Collection[asyncio.Future], timeout: float) -> None:
    """Wait until every future is done or `timeout` seconds passed, never cancelling them: `asyncio.wait`
    without its per-call set, coroutine checks and per-future bookkeeping, which cost more than the wait."""
    pending = sum(not future.done() for future in futures)
    if not pending:
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def one_done(_: object = None) -> None:
        nonlocal pending
        pending -= 1
        if pending <= 0 and not waiter.done():
            waiter.set_result(None)

    def timed_out() -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(timeout, timed_out)
    for future in futures:
        if not future.done():
            future.add_done_callback(one_done)
    try:
        await waiter
    finally:
        timer.cancel()
        for future in futures:
            future.remove_done_callback(one_done)


@dataclass(slots=True)
class Stored:
    """A journaled command: the journal's verdict, its outcome future, whether it went to Kafka at once, and the
    request ids of the earlier commands it superseded."""

    accepted: Accepted
    future: asyncio.Future[Outcome] | None = None
    handed_over: bool = False
    superseded: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Answer:
    """A command's result and, when it failed, the error a single request answers with (a batch keeps the error's
    problem in the result alone)."""

    response: CommandResponse
    error: PusherError | None = None

    @property
    def http_status(self) -> int:
        """The status a single request earns: 202 stored for later, 200 otherwise, or the error's own."""
        if self.error is not None:
            return self.error.status
        return 202 if self.response.status == "accepted" else 200


class Dispatcher:
    """Journals commands, hands them to the forwarder, waits briefly for Kafka, and keeps the counters."""

    def __init__(self, settings: Settings, journal: Journal, forwarder: Forwarder, metrics: Metrics) -> None:
        self.settings = settings
        self.journal = journal
        self.forwarder = forwarder
        self.metrics = metrics
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        # Names this journal's records in the command topic, for reconciliation: request ids are unique per
        # journal only, so another instance's record with the same request_id is not ours.
        self.instance = f"{settings.instance_id}/{journal.journal_id}".encode()

    # ------------------------------------------------------------------ building records

    def _new_command(
        self,
        cmd: CommandRequest,
        idem_key: str | None,
        traceparent: str | None,
        now: datetime,
        key_id: str | None,
        fanout_id: str | None = None,
        may_hand_over: bool = True,
    ) -> NewCommand:
        request_id = cmd.request_id or new_id()
        expires_at = cmd.expires_at.astimezone(UTC) if cmd.expires_at else None
        not_before = cmd.not_before.astimezone(UTC) if cmd.not_before else None
        ttl = cmd.ttl_seconds or (self.settings.default_ttl or None)
        if expires_at is None and ttl:  # a TTL counts from when the command is due
            expires_at = max(now, not_before or now) + timedelta(seconds=ttl)
        message = CommandMessage(
            request_id=request_id,
            device_id=cmd.device_id,
            command_type=cmd.command_type,
            payload=cmd.payload,
            protocol=cmd.protocol,
            parser_script_ref=cmd.parser_script_ref,
            metadata=merged_metadata(cmd),
            timestamp=now,
            expires_at=expires_at,
            fanout_id=fanout_id or msgspec.UNSET,
        )
        value = JSON_ENCODER.encode(message)
        headers = [
            ("request_id", request_id.encode()),
            ("content-type", b"application/json"),
            ("pusher-instance", self.instance),
            ("body-sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        if traceparent:
            headers.append(("traceparent", traceparent.encode()))
        if expires_at is not None:
            headers.append(("expires_at", JSON_ENCODER.encode(expires_at)[1:-1]))
        if fanout_id is not None:
            headers.append(("fanout_id", fanout_id.encode()))
        return NewCommand(
            request_id=request_id,
            # Keys are per API key: one client's key can neither replay nor block another's.
            idem_key=f"{key_id}\x1f{idem_key}" if idem_key and key_id else idem_key,
            key_id=key_id,
            client_request_id=cmd.request_id is not None,
            body_hash=hashlib.sha256(_HASH_ENCODER.encode(cmd)).digest(),
            device_id=cmd.device_id,
            command_type=cmd.command_type,
            created_at=now.timestamp(),
            expires_at=expires_at.timestamp() if expires_at else None,
            key=cmd.device_id.encode(),
            value=value,
            headers=headers,
            not_before=not_before.timestamp() if not_before else None,
            coalesce_key=cmd.coalesce_key,
            fanout_id=fanout_id,
            # Recorded as handed in its own insert when it may go straight to the producer; else the forwarder
            # records it just before it hands it over (a command held for later never goes straight out).
            handed=may_hand_over and (not_before is None or not_before <= now),
        )

    # ------------------------------------------------------------------ the send path

    async def push(
        self,
        cmd: CommandRequest,
        idem_key: str | None = None,
        prefer_async: bool = False,
        traceparent: str | None = None,
        key_id: str | None = None,
        note: dict | None = None,
    ) -> Answer:
        """Journal one command, then wait up to PUBLISH_TIMEOUT for Kafka; raises the error of a failed one (409 /
        503 / 502).

        The command's log fields go into `note` when given (the request's line), else into a line of their own."""
        new = self._new_command(cmd, idem_key, traceparent, utc_now(), key_id, None, self.forwarder.may_hand_over())
        [stored] = await self._store([new])
        if stored.handed_over and not prefer_async:
            await wait_done((stored.future,), self.settings.publish_timeout)
        answer = self._answer(new, stored)
        self._answered([stored])
        if stored.superseded or (
            stored.accepted.outcome == "inserted" and answer.response.status in ("failed", "expired")
        ):
            await self._settled()
        self._log(cmd, answer.response, traceparent, note)
        if answer.error is not None:
            raise answer.error
        return answer

    async def push_batch(
        self,
        items: list[CommandRequest | PusherError],
        idem_key: str | None = None,
        prefer_async: bool = False,
        traceparent: str | None = None,
        key_id: str | None = None,
    ) -> tuple[BatchCommandResponse, int]:
        """Journal every valid item in one transaction, hand them over in order, wait once for all."""
        now = utc_now()
        may_hand_over = self.forwarder.may_hand_over()
        news = {
            # \x1f cannot occur in an Idempotency-Key, so no single request can collide with a batch item.
            i: self._new_command(
                item, f"{idem_key}\x1f{i}" if idem_key else None, traceparent, now, key_id, None, may_hand_over
            )
            for i, item in enumerate(items)
            if not isinstance(item, PusherError)
        }
        stored = dict(zip(news, await self._store(list(news.values())), strict=True)) if news else {}
        accepted = {i: one.accepted for i, one in stored.items()}
        waiting = {one.future for one in stored.values() if one.handed_over}
        if waiting and not prefer_async:
            await wait_done(waiting, self.settings.publish_timeout)
        results = [
            failed_result(None, item, "rejected")
            if isinstance(item, PusherError)
            else self._answer(news[i], stored[i]).response
            for i, item in enumerate(items)
        ]
        self._answered(stored.values())
        if any(one.superseded for one in stored.values()) or any(
            r.status in ("failed", "expired") for i, r in enumerate(results) if i in news
        ):
            await self._settled()
        for item, result in zip(items, results, strict=True):
            if not isinstance(item, PusherError):
                self._log(item, result, traceparent)
        if (
            accepted
            and all(a.outcome in ("full", "unavailable") for a in accepted.values())
            and len(news) == len(items)
        ):
            raise next(iter(accepted.values())).error
        rejected = sum(r.status == "rejected" for r in results)
        if rejected:  # each refused item once; a batch refused whole is counted by the request middleware
            self.metrics.outcomes["rejected"].inc(rejected)
        successful = sum(r.success for r in results)
        body = BatchCommandResponse(
            total_commands=len(results), successful=successful, failed=len(results) - successful, results=results
        )
        if body.failed:
            return body, 207
        return body, 202 if any(r.status == "accepted" for r in results) else 200

    def _store(self, news: list[NewCommand]) -> asyncio.Future[list[Stored]]:
        """Journal, then hand to the forwarder. The hand-over runs in the journal's completion callback, not
        in the request's coroutine, so a cancelled request cannot strand a stored command."""
        stored: asyncio.Future[list[Stored]] = asyncio.get_running_loop().create_future()

        def journaled(done: asyncio.Future[list[Accepted]]) -> None:
            try:
                result = [self._submit(n, a) for n, a in zip(news, done.result(), strict=True)]
            except BaseException as exc:  # never leave the request waiting (what is journaled goes at restart)
                if not stored.done():
                    stored.set_exception(exc)
                raise
            if not stored.done():
                stored.set_result(result)

        self.journal.accept(news).add_done_callback(journaled)
        return stored

    async def push_fanout(
        self,
        request: FanoutRequest,
        children: list[CommandRequest],
        idem_key: str | None = None,
        traceparent: str | None = None,
        key_id: str | None = None,
        note: dict | None = None,
    ) -> tuple[FanoutResponse, bool]:
        """Journal a fan-out's commands (`children`, one per device, in order) in one transaction, all or none, and
        hand them over; answers at once (never waits for Kafka). Returns the answer and whether it is a replay; raises
        409 for a reused fanout_id or Idempotency-Key with another body, 503 when it cannot be journaled whole."""
        now = utc_now()
        fanout = NewFanout(
            fanout_id=request.fanout_id or new_id(),
            idem_key=f"{key_id}\x1f{idem_key}" if idem_key and key_id else idem_key,
            client_fanout_id=request.fanout_id is not None,
            body_hash=hashlib.sha256(_HASH_ENCODER.encode(request)).digest(),
            key_id=key_id,
            command_type=request.command_type,
            created_at=now.timestamp(),
        )
        may_hand_over = self.forwarder.may_hand_over()
        news = [
            self._new_command(child, None, traceparent, now, key_id, fanout.fanout_id, may_hand_over)
            for child in children
        ]
        journaled, stored = await self._store_fanout(fanout, news)
        if journaled.outcome in ("replayed", "conflict") and journaled.fanout.key_id != key_id:
            raise IdempotencyConflict("This fanout_id is already used")  # another key's: say nothing of it
        if journaled.outcome == "conflict":
            raise IdempotencyConflict(
                f"This key was used for fanout_id {journaled.fanout.fanout_id!r} with a different body"
            )
        if journaled.outcome in ("full", "unavailable"):
            self.metrics.failures.labels(f"journal_{journaled.outcome}").inc()
            self._note_error(journaled.error.detail)
            raise journaled.error
        self._answered(stored)
        superseded = [rid for one in stored for rid in one.superseded]
        if superseded:
            await self._settled()
        first = journaled.rows[0] if journaled.rows else None
        replayed = journaled.outcome == "replayed"
        response = FanoutResponse(
            fanout_id=journaled.fanout.fanout_id,
            total=journaled.fanout.total,
            status="accepted",
            message="Fan-out stored: one command per device, each published when Kafka acknowledges it",
            timestamp=from_epoch(journaled.fanout.created_at),
            not_before=from_epoch(first.not_before) if first else None,
            expires_at=from_epoch(first.expires_at) if first else None,
            replayed=replayed,
            superseded=superseded,
        )
        fields = {
            "fanout_id": response.fanout_id,
            "command_type": request.command_type,
            "devices": response.total,
            "outcome": "replayed" if replayed else "accepted",
            "traceparent": traceparent,
        }
        if note is not None:
            note.update(fields)
        else:
            log.info("fanout", **fields)
        if replayed:
            self.metrics.outcomes["replayed"].inc()
        return response, replayed

    def _store_fanout(
        self, fanout: NewFanout, news: list[NewCommand]
    ) -> asyncio.Future[tuple[FanoutAccepted, list[Stored]]]:
        """Journal a fan-out whole, then hand its commands to the forwarder (in the journal's completion callback,
        like _store, so a cancelled request cannot strand them)."""
        stored: asyncio.Future[tuple[FanoutAccepted, list[Stored]]] = asyncio.get_running_loop().create_future()

        def journaled(done: asyncio.Future[FanoutAccepted]) -> None:
            try:
                accepted = done.result()
                result = [
                    self._submit(new, Accepted("inserted", row)) for new, row in zip(news, accepted.rows, strict=False)
                ]
            except BaseException as exc:  # never leave the request waiting (what is journaled goes at restart)
                if not stored.done():
                    stored.set_exception(exc)
                raise
            if not stored.done():
                stored.set_result((accepted, result))

        self.journal.accept_fanout(fanout, news).add_done_callback(journaled)
        return stored

    async def cancel(self, row: JournalRow) -> JournalRow:
        """Cancel a command still waiting here (never handed to Kafka): its row, now `cancelled` (also when it was
        already); raises NotCancellable (409) naming its status otherwise."""
        if row.origin is None and row.status == "accepted":
            # On the loop, like every hand-over: it is one or the other.
            self.forwarder.withdraw(row.seq, row.request_id, row.device_id)
        await self._settled()  # the cancellation, or whatever happened to it instead, is in the journal
        current = await self.journal.get(row.request_id) or row
        stage = current.stage
        if stage == "cancelled":
            return current
        if stage in TERMINAL and not current.was_published:
            why = f"it already ended {stage}"
        elif current.origin is not None and stage == "accepted":
            why = "it was accepted by another instance, which holds it"
        else:
            why = "it was already handed to Kafka"
        raise NotCancellable(f"Command {row.request_id!r} cannot be cancelled: {why} (status: {stage})")

    def _answered(self, stored: Iterable[Stored]) -> None:
        """The request has its answer: the forwarder need not keep an outcome for what is still on its way (a long
        backlog would hold one per command)."""
        for one in stored:
            if one.future is not None and not one.future.done():
                self.forwarder.forget(one.accepted.row.seq)

    async def read(self, request_id: str) -> JournalRow | None:
        """One command, with every outcome already answered in it: a 200 goes out when Kafka acknowledges, before
        the `published` mark is committed, and a read right after it must not find the command still `accepted`."""
        unsettled = self.journal.marks_pending()  # before the read: a mark committed after this is in its snapshot
        row = await self.journal.get(request_id)
        if row is not None and row.status == "accepted" and unsettled:
            await self._settled()
            row = await self.journal.get(request_id)
        return row

    async def listed(self, read: Callable[[], Awaitable[list[JournalRow]]], status: str | None) -> list[JournalRow]:
        """A list (`read`, filtered by `status` or not) with every outcome already answered in it, as `read` above.
        A pending mark can only move a listed command on from `accepted`, unless the list is filtered by another
        status: then it could add one, so that list waits for queued marks first. Any other list waits, and reads
        again, only when it found a command still `accepted` while marks were queued."""
        unsettled = self.journal.marks_pending()
        if unsettled and status not in (None, "accepted"):
            await self._settled()
            unsettled = False
        rows = await read()
        if unsettled and any(row.status == "accepted" for row in rows):
            await self._settled()
            rows = await read()
        return rows

    async def _settled(self) -> None:
        """Before answering that a command ended failed or expired, wait until the journal says so too: a retry
        that reads the journal must not find it still `accepted` (and answer 202)."""
        await wait_done((self.journal.committed(),), self.settings.publish_timeout)

    def _submit(self, new: NewCommand, accepted: Accepted) -> Stored:
        """Give a freshly journaled command to the forwarder."""
        if accepted.outcome != "inserted":
            return Stored(accepted)
        self.metrics.outcomes["accepted"].inc()
        pending = Pending(
            seq=accepted.row.seq,
            request_id=new.request_id,
            device_id=new.device_id,
            created_at=new.created_at,
            expires_at=new.expires_at,
            key=new.key,
            value=new.value,
            headers=new.headers,
            not_before=new.not_before,
            coalesce_key=new.coalesce_key,
            handed=new.handed,  # what its journal row says: only then may it go straight to the producer
        )
        return Stored(accepted, *self.forwarder.submit(pending))

    def _answer(self, new: NewCommand, stored: Stored) -> Answer:
        """What became of a journaled command: stored, published, replayed, or failed with its error."""
        accepted, future = stored.accepted, stored.future
        if accepted.outcome in ("replayed", "conflict") and accepted.row.key_id != new.key_id:
            # Another API key's command: say nothing about it.
            return _failed(None, IdempotencyConflict("This request_id is already used"), "rejected")
        if accepted.outcome == "replayed":
            self.metrics.outcomes["replayed"].inc()
            return _replay(accepted.row)
        if accepted.outcome == "conflict":
            error = IdempotencyConflict(
                f"This key was used for request_id {accepted.row.request_id!r} with a different body"
            )
            return _failed(accepted.row.request_id, error, "rejected")
        if accepted.outcome in ("full", "unavailable"):
            self.metrics.failures.labels(f"journal_{accepted.outcome}").inc()
            self._note_error(accepted.error.detail)
            return _failed(None, accepted.error, "failed")
        expires = from_epoch(new.expires_at)
        created = from_epoch(new.created_at)
        if future is None or not future.done():
            response = _accepted(new.request_id, created, expires, from_epoch(new.not_before))
            return Answer(msgspec.structs.replace(response, superseded=stored.superseded))
        outcome = future.result()
        if outcome.status == "published":
            d = outcome.delivery
            response = CommandResponse(
                success=True,
                request_id=new.request_id,
                status="published",
                message="Command published to Kafka",
                timestamp=created,
                topic=d.topic,
                partition=d.partition,
                offset=d.offset,
                expires_at=expires,
                superseded=stored.superseded,
            )
            return Answer(response)
        self._note_error(outcome.error)
        if outcome.status == "expired":
            return Answer(
                CommandResponse(
                    success=False,
                    request_id=new.request_id,
                    status="expired",
                    message="Command expired before it could be published",
                    timestamp=created,
                    expires_at=expires,
                )
            )
        return _failed(new.request_id, MessageRejected(f"{outcome.error} (request_id {new.request_id!r})"), "failed")

    def _log(
        self, cmd: CommandRequest, response: CommandResponse, traceparent: str | None, note: dict | None = None
    ) -> None:
        """The command's ids, type and outcome (never its payload unless LOG_PAYLOADS=true): added to `note`
        (the request's own log line) when given, else a line of its own (one per command of a batch)."""
        fields = {
            "command_id": response.request_id,
            "device_id": cmd.device_id,
            "command_type": cmd.command_type,
            "outcome": response.status,
            "traceparent": traceparent,
        }
        if self.settings.log_payloads:
            fields["payload"] = cmd.payload
        if note is not None:
            note.update(fields)
        else:
            log.info("command", **fields)

    def _note_error(self, detail: str | None) -> None:
        self.last_error, self.last_error_at = detail, utc_now()

    # ------------------------------------------------------------------ reads

    def snapshot(self) -> Counters:
        """The counters as JSON, read from the same Prometheus metrics /metrics shows."""
        m = self.metrics
        oldest = self.journal.oldest_pending_created_at
        count = m.value("pusher_publish_latency_seconds_count")
        return Counters(
            commands_accepted=int(m.value("pusher_commands_total", outcome="accepted")),
            commands_processed=int(m.value("pusher_commands_total", outcome="published")),
            commands_failed=int(m.value("pusher_commands_total", outcome="failed")),
            commands_expired=int(m.value("pusher_commands_total", outcome="expired")),
            commands_rejected=int(m.value("pusher_commands_total", outcome="rejected")),
            commands_replayed=int(m.value("pusher_commands_total", outcome="replayed")),
            commands_cancelled=int(m.value("pusher_commands_total", outcome="cancelled")),
            commands_superseded=int(m.value("pusher_commands_total", outcome="superseded")),
            backlog=self.journal.pending_count,
            oldest_pending_age_seconds=None if oldest is None else round(max(0.0, time.time() - oldest), 3),
            publish_latency_ms_avg=round(m.value("pusher_publish_latency_seconds_sum") / count * 1000, 3)
            if count
            else 0.0,
        )


class Watchers:
    """Long polls and event streams waiting for a command's next transition (lives on the event loop)."""

    def __init__(self, journal: Journal) -> None:
        self.closed = False
        self.alarms = Alarms()  # the deadlines of their waits
        # A list, not a set: nearly always one waiter per command, and a set of one is 216 bytes.
        self._waiting: dict[str, list[Bell]] = {}
        journal.watch_changes(self.changed, self._waiting)

    def changed(self, request_ids: list[str]) -> None:
        """The journal committed a change to these commands: wake whoever waits on them."""
        for request_id in request_ids:
            for bell in self._waiting.get(request_id, ()):
                bell.set()

    def watch(self, request_id: str) -> Bell:
        """A bell rung on every change to `request_id` (clear it after waking), and at shutdown; `unwatch` it."""
        bell = Bell()
        if self.closed:
            bell.set()
        self._waiting.setdefault(request_id, []).append(bell)
        return bell

    def unwatch(self, request_id: str, bell: Bell) -> None:
        """Stop ringing `bell` for `request_id`."""
        waiting = self._waiting.get(request_id)
        if waiting is not None and bell in waiting:
            waiting.remove(bell)
            if not waiting:
                del self._waiting[request_id]

    def close(self) -> None:
        """Shutting down: every waiter answers with what it has now."""
        self.closed = True
        for bells in self._waiting.values():
            for bell in bells:
                bell.set()


def reached(stage: str, wanted: str, feedback: bool) -> bool:
    """Whether a wait for `wanted` is over for a command at `stage`: it got there, further, or to an end."""
    return STAGE_RANK[stage] >= STAGE_RANK[wanted] or finished(stage, feedback)


def finished(stage: str, feedback: bool) -> bool:
    """Whether nothing more will happen to a command at `stage`. Without `feedback` (a status topic),
    `published` is an end too: nobody would report anything after it."""
    return stage in TERMINAL or (stage == "published" and not feedback)


def command_status(row: JournalRow) -> CommandStatus:
    """A journal row as the status API shows it."""
    return CommandStatus(
        request_id=row.request_id,
        device_id=row.device_id,
        command_type=row.command_type,
        status=row.stage,
        created_at=from_epoch(row.created_at),
        updated_at=from_epoch(row.updated_at),
        expires_at=from_epoch(row.expires_at),
        topic=row.topic,
        partition=row.partition,
        offset=row.offset,
        error=row.error,
        history=[Transition(status=s, at=from_epoch(at), detail=detail) for s, at, detail in row.history],
        result=row.result,
        not_before=from_epoch(row.not_before),
        coalesce_key=row.coalesce_key,
        superseded_by=row.superseded_by,
        fanout_id=row.fanout_id,
    )


def _accepted(
    request_id: str, created: datetime, expires: datetime | None, not_before: datetime | None = None
) -> CommandResponse:
    held = not_before is not None and not_before > utc_now()
    return CommandResponse(
        success=True,
        request_id=request_id,
        status="accepted",
        message="Command stored; it is held until not_before, then published"
        if held
        else "Command stored; it will be published when Kafka acknowledges it",
        timestamp=created,
        expires_at=expires,
        not_before=not_before,
    )


def _replay(row: JournalRow) -> Answer:
    """The original result of a repeated request, with its current status."""
    created, expires = from_epoch(row.created_at), from_epoch(row.expires_at)
    stage = row.stage
    if stage == "accepted":
        response = _accepted(row.request_id, created, expires, from_epoch(row.not_before))
        return Answer(msgspec.structs.replace(response, replayed=True))
    # The request's own job was to get the command into Kafka: a command that got there and then failed
    # at the device was still sent (its status says what became of it).
    response = CommandResponse(
        success=row.was_published,
        request_id=row.request_id,
        status=stage,
        message=_REPLAY_MESSAGES[stage].format(error=row.error),
        timestamp=created,
        topic=row.topic,
        partition=row.partition,
        offset=row.offset,
        expires_at=expires,
        replayed=True,
    )
    return Answer(response)


_REPLAY_MESSAGES = {
    "published": "Command published to Kafka",
    "delivered": "Command delivered to the device",
    "succeeded": "The device carried the command out",
    "rejected": "The connector rejected the command: {error}",
    "expired": "Command expired before it could be delivered",
    "failed": "Command failed: {error}",
    "cancelled": "Command cancelled before it was sent",
    "superseded": "Command superseded by a newer one before it was sent",
}


def _failed(request_id: str | None, error: PusherError, status: str) -> Answer:
    """A failed command's answer: its result carrying the error's problem, and the error itself."""
    return Answer(failed_result(request_id, error, status), error)


def failed_result(request_id: str | None, error: BaseException, status: str) -> CommandResponse:
    """A failed command's result, carrying its problem."""
    problem = problem_for(error)
    return CommandResponse(
        success=False, request_id=request_id, status=status, message=problem.title, timestamp=utc_now(), error=problem
    )
