"""The local durable journal: every accepted command is in SQLite (WAL) before any 2xx.

One writer thread owns the writing connection and does group commit: whatever inserts and
status updates are queued when it wakes go into one transaction, so many concurrent requests
share one fsync. Handlers await their insert through an asyncio future; the event loop never
waits on the disk. Reads (status, lists) use a second connection; WAL lets them run beside
the writer.

Idempotency lives here too, because only the writer sees every insert in order: a repeated
Idempotency-Key or client request_id finds the earlier row in the same transaction stream,
so even concurrent duplicates resolve to one row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from errors import JournalError, JournalFull, JournalUnavailable
from schemas import CONNECTOR_STAGES, STAGE_RANK, Status, StatusEvent, from_epoch
from threadbridge import Outbox, outbox_for

log = structlog.get_logger("journal")

FINAL = ("published", "expired", "failed")
_SYNC = {"full": 2, "normal": 1}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id     TEXT NOT NULL UNIQUE,
    idem_key       TEXT UNIQUE,
    body_hash      BLOB NOT NULL,
    device_id      TEXT NOT NULL,
    command_type   TEXT NOT NULL,
    status         TEXT NOT NULL,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    expires_at     REAL,
    record_key     BLOB NOT NULL,
    record_value   BLOB,
    record_headers BLOB,
    topic          TEXT,
    partition      INTEGER,
    "offset"       INTEGER,
    error          TEXT,
    history        TEXT NOT NULL,
    key_id         TEXT,
    origin         TEXT,
    result         TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS status_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    event      BLOB NOT NULL
);
INSERT OR IGNORE INTO meta VALUES ('probe', 0);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(seq) WHERE status = 'accepted';
CREATE INDEX IF NOT EXISTS commands_device ON commands(device_id, seq);
CREATE INDEX IF NOT EXISTS commands_finished ON commands(updated_at) WHERE status != 'accepted';
"""
_ROW = (
    'seq, request_id, device_id, command_type, status, created_at, updated_at, expires_at, topic, partition, "offset", '
    "error, history, body_hash, key_id, origin, result"
)
_HEADERS = msgspec.msgpack.Encoder()
_HEADERS_DECODER = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_EVENT_ENCODER = msgspec.json.Encoder()
SERVICE_SOURCE = "pusher@"  # how this service's instances name themselves in their status events (not proof)
_ADDED_COLUMNS = ("key_id", "origin", "result")  # journals written by earlier versions lack them


class NewCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A validated command with its Kafka record built, ready to be journaled."""

    request_id: str
    idem_key: str | None
    client_request_id: bool
    body_hash: bytes
    device_id: str
    command_type: str
    created_at: float
    expires_at: float | None
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    key_id: str | None = None


class JournalRow(msgspec.Struct, frozen=True, kw_only=True):
    """A command as the journal knows it (without the record bytes)."""

    seq: int
    request_id: str
    device_id: str
    command_type: str
    status: Status
    created_at: float
    updated_at: float
    expires_at: float | None
    topic: str | None
    partition: int | None
    offset: int | None
    error: str | None
    history: list[tuple[str, float, str | None]]
    body_hash: bytes
    key_id: str | None = None
    origin: str | None = None  # the instance or connector that told us of it; None: accepted here
    result: dict | None = None  # what the device answered

    @property
    def stage(self) -> str:
        """The furthest stage reached: of the highest rank, the first one received."""
        return furthest(self.status, self.history)

    @property
    def was_published(self) -> bool:
        """Whether the command reached Kafka (it may have failed later, at the device)."""
        return self.partition is not None or self.stage in ("published", "delivered", "succeeded")


class Pending(msgspec.Struct, kw_only=True):
    """A command still to be published: what the forwarder hands to Kafka."""

    seq: int
    request_id: str
    device_id: str
    created_at: float
    expires_at: float | None
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    handed_at: float | None = None  # when this process first gave it to the producer


def furthest(status: str, history: list) -> str:
    """Of `status` and the stages in `history` (in the order received), the first of the highest rank."""
    best = status
    for step in history:
        if STAGE_RANK.get(step[0], 0) > STAGE_RANK.get(best, 0):
            best = step[0]
    return best


@dataclass(frozen=True, slots=True)
class Accepted:
    """The journal's answer to one insert."""

    outcome: Literal["inserted", "replayed", "conflict", "full", "unavailable"]
    row: JournalRow | None = None
    error: JournalError | None = None


@dataclass(slots=True)
class _Insert:
    outbox: Outbox
    future: asyncio.Future[list[Accepted]]
    items: list[NewCommand]


@dataclass(slots=True)
class _Mark:
    seq: int
    status: str
    at: float
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None


# A status-topic event and whether its signature was verified (an instance's) or it had none (a connector's).
Received = tuple[StatusEvent, bool]


@dataclass(slots=True)
class _Events:
    events: list[Received]
    positions: dict[int, int]  # status topic partition -> next offset to read
    done: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    skipped: int = 0  # events not applied, as untrusted or unstorable (logged; the feed goes on)


@dataclass(slots=True)
class _OutboxSent:
    up_to: int


@dataclass(slots=True)
class _Flush:
    event: threading.Event = field(default_factory=threading.Event)
    outbox: Outbox | None = None  # with `future`: resolved on the event loop instead of (as well as) `event`
    future: asyncio.Future[None] | None = None


_STOP = object()


def _row(values: tuple) -> JournalRow:
    (seq, rid, device, ctype, status, created, updated, expires, topic, part, off, err, hist, body_hash, key_id, origin,
     result) = values  # fmt: skip
    return JournalRow(
        seq=seq,
        request_id=rid,
        device_id=device,
        command_type=ctype,
        status=status,
        created_at=created,
        updated_at=updated,
        expires_at=expires,
        topic=topic,
        partition=part,
        offset=off,
        error=err,
        history=[tuple(h) for h in json.loads(hist)],
        body_hash=body_hash,
        key_id=key_id,
        origin=origin,
        result=json.loads(result) if result else None,
    )


def describe(exc: sqlite3.Error) -> JournalUnavailable:
    """A clear, internals-free reason for a failed write."""
    text = str(exc).lower()
    if "full" in text:
        return JournalUnavailable("The journal's disk is full; nothing was stored")
    if "readonly" in text or "read-only" in text:
        return JournalUnavailable("The journal file is read-only; nothing was stored")
    return JournalUnavailable("The journal cannot be written (I/O error); nothing was stored")


class Journal:
    """The SQLite journal: group-committed inserts and status marks, point reads, retention."""

    def __init__(
        self,
        path: str | Path,
        sync: Literal["full", "normal"] = "full",
        max_pending: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        retention: float = 7 * 86400,
        housekeeping_interval: float = 60.0,
        status_source: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.sync = sync
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.retention = retention
        self.housekeeping_interval = housekeeping_interval
        self.pending_count = 0
        self.commits = 0
        self.journal_id: str | None = None  # made when the file is created: tells this journal's records apart
        self.writable = True
        self.last_error: str | None = None
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: Outbox | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._feed_reader: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._retry_marks: list[_Mark] = []
        self._txn_delta = 0  # pending-count change of the transaction being built
        self.pending_bytes = 0  # record bytes of the commands waiting for Kafka
        self._pending_sizes: dict[int, int] = {}
        self._txn_sizes: dict[int, int] = {}  # seq -> size added (+) or removed (-) by the transaction
        self._txn_bytes = 0  # their sum, kept as it changes (summing per insert made big batches quadratic)
        # With a status topic: every transition is also written to status_outbox, in the same transaction,
        # for the status feed to publish (so a transition is never lost between the journal and Kafka).
        self.status_source = status_source
        self.outbox_written = threading.Event()
        # Request ids someone waits on (long polls, event streams), owned by the event loop and only read
        # here: commits that change them are reported to `on_change` on that loop (see watch_changes).
        self.watched: Mapping[str, object] = {}
        self.on_change: Callable[[list[str]], None] | None = None
        self._watch_outbox: Outbox | None = None
        self._changed: list[str] = []
        self._emitted = False

    # ------------------------------------------------------------------ lifecycle

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={_SYNC[self.sync]}")
        conn.execute("PRAGMA journal_size_limit=67108864")
        got = conn.execute("PRAGMA synchronous").fetchone()[0]
        if got != _SYNC[self.sync]:
            raise JournalError(f"SQLite refused PRAGMA synchronous={self.sync.upper()} (reads back {got})")
        return conn

    def open(self) -> list[Pending]:
        """Open (creating if needed), start the writer thread, and return the commands still to publish."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for place in (self.path.parent, self.path):
            if place.exists() and not os.access(place, os.W_OK):
                raise JournalError(f"{place} is not writable (read-only file system or permissions)")
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(commands)")}
        for column in _ADDED_COLUMNS:
            if column not in columns:
                self._writer.execute(f"ALTER TABLE commands ADD COLUMN {column} TEXT")
        self._writer.execute("INSERT OR IGNORE INTO meta VALUES ('journal_id', ?)", (os.urandom(8).hex(),))
        self.journal_id = self._writer.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]
        self._reader = self._connect()
        rows = self._writer.execute(
            "SELECT seq, request_id, device_id, created_at, expires_at, record_key, record_value, record_headers "
            "FROM commands WHERE status = 'accepted' AND origin IS NULL ORDER BY seq"
        ).fetchall()
        pending = [
            Pending(
                seq=seq,
                request_id=rid,
                device_id=device,
                created_at=created,
                expires_at=expires,
                key=key,
                value=value,
                headers=_HEADERS_DECODER.decode(headers),
            )
            for seq, rid, device, created, expires, key, value, headers in rows
        ]
        self.pending_count = len(pending)
        self._pending_sizes = {p.seq: len(p.value) for p in pending}
        self.pending_bytes = sum(self._pending_sizes.values())
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._thread.start()
        log.info("journal open", path=str(self.path), sync=self.sync, pending=len(pending))
        return pending

    def close(self) -> None:
        """Commit what is queued, checkpoint, and close both connections."""
        if self._thread is not None:
            self._ops.put(_STOP)
            self._thread.join(30)
            self._thread = None
        for conn in (self._reader, self._feed_reader, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._feed_reader = self._writer = None

    # ------------------------------------------------------------------ writes

    def accept(self, items: list[NewCommand]) -> asyncio.Future[list[Accepted]]:
        """Insert commands durably (or find their earlier twins); the future resolves after the commit's fsync."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[list[Accepted]] = self._outbox.loop.create_future()
        self._ops.put(_Insert(self._outbox, future, items))
        return future

    def mark(
        self,
        seq: int,
        status: str,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        error: str | None = None,
    ) -> None:
        """Queue a status transition; it is committed with the writer's next transaction."""
        self._ops.put(_Mark(seq, status, time.time(), topic, partition, offset, error))

    def committed(self) -> asyncio.Future[None]:
        """Resolves once everything queued so far (status marks included) is committed."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[None] = self._outbox.loop.create_future()
        self._ops.put(_Flush(outbox=self._outbox, future=future))
        return future

    def apply_events(self, events: list[Received], positions: dict[int, int], timeout: float = 30.0) -> int | None:
        """Apply status-topic events and store the read positions in one transaction; blocks until committed.

        Returns how many events were not applied (untrusted or unstorable), or None when nothing was committed."""
        op = _Events(events, positions)
        self._ops.put(op)
        if not op.done.wait(timeout) or not op.committed:
            return None
        return op.skipped

    def outbox_sent(self, up_to: int) -> None:
        """Forget the status outbox up to id `up_to`: the status topic has it."""
        self._ops.put(_OutboxSent(up_to))

    def watch_changes(self, on_change: Callable[[list[str]], None], watched: Mapping[str, object]) -> None:
        """Report each commit's changes to request ids in `watched` to `on_change`, on the calling event loop
        (the caller keeps `watched` up to date on that loop; the writer only reads it)."""
        self._watch_outbox = outbox_for(self._watch_outbox)
        self.on_change, self.watched = on_change, watched

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything queued so far is committed (shutdown, tests)."""
        op = _Flush()
        self._ops.put(op)
        return op.event.wait(timeout)

    def _write_loop(self) -> None:
        next_housekeeping = time.monotonic() + self.housekeeping_interval
        stopping = False
        while not stopping:
            timeout = max(0.0, next_housekeeping - time.monotonic()) if self.writable else 1.0
            try:
                ops = [self._ops.get(timeout=timeout)]
            except queue.Empty:
                ops = []
            while len(ops) < 2000:
                try:
                    ops.append(self._ops.get_nowait())
                except queue.Empty:
                    break
            if _STOP in ops:
                stopping = True
                ops = [op for op in ops if op is not _STOP]
            self._commit(ops)
            if not self.writable and not ops:
                self._probe_writable()
            if stopping or time.monotonic() >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = time.monotonic() + self.housekeeping_interval

    def _commit(self, ops: list) -> None:
        inserts = [op for op in ops if isinstance(op, _Insert)]
        marks = self._retry_marks + [op for op in ops if isinstance(op, _Mark)]
        flushes = [op for op in ops if isinstance(op, _Flush)]
        feed = [op for op in ops if isinstance(op, _Events | _OutboxSent)]
        self._retry_marks = []
        if inserts or marks or feed:
            conn = self._writer
            self._txn_delta = 0
            self._txn_sizes = {}
            self._txn_bytes = 0
            self._changed = []
            self._emitted = False
            try:
                conn.execute("BEGIN IMMEDIATE")
                results = [self._insert_all(conn, op.items) for op in inserts]
                for mark in marks:
                    self._apply_mark(conn, mark)
                for op in feed:
                    self._apply_feed(conn, op)
                conn.execute("COMMIT")
                self.commits += 1
            except Exception as exc:  # sqlite3.Error, or a bug: the writer thread must live on either way
                _rollback(conn)
                error = (
                    describe(exc)
                    if isinstance(exc, sqlite3.Error)
                    else JournalUnavailable("The journal could not be written (internal error); nothing was stored")
                )
                self.writable, self.last_error = False, error.detail
                log.error("journal write failed", error=error.detail, sqlite_error=str(exc), exc_info=True)
                self._retry_marks = marks
                results = [[Accepted("unavailable", error=error) for _ in op.items] for op in inserts]
                self._changed = []
                self._emitted = False
            else:
                self.pending_count += self._txn_delta
                for seq, size in self._txn_sizes.items():
                    if size > 0:
                        self._pending_sizes[seq] = size
                    else:
                        self._pending_sizes.pop(seq, None)
                    self.pending_bytes += size
                if not self.writable:
                    log.info("journal writable again")
                self.writable, self.last_error = True, None
            for op, result in zip(inserts, results, strict=True):
                op.outbox.put(_settle, op.future, result)
            for op in feed:
                if isinstance(op, _Events):
                    op.committed = self.writable
                    op.done.set()  # after a failed write too: the consumer reads the events again from Kafka
            self._report_changes()
        for flush in flushes:
            flush.event.set()
            if flush.outbox is not None:
                flush.outbox.put(_settle, flush.future, None)

    def _insert_all(self, conn: sqlite3.Connection, items: list[NewCommand]) -> list[Accepted]:
        results = []
        for item in items:
            existing = self._find_twin(conn, item)
            if existing is not None:
                outcome = "replayed" if existing.body_hash == item.body_hash else "conflict"
                results.append(Accepted(outcome, existing))
                continue
            if self.pending_count + self._txn_delta >= self.max_pending:
                results.append(
                    Accepted("full", error=JournalFull(f"{self.max_pending} commands are waiting for Kafka"))
                )
                continue
            if self.pending_bytes + self._txn_bytes + len(item.value) > self.max_bytes:
                error = JournalFull(f"{self.max_bytes} bytes of commands are waiting for Kafka")
                results.append(Accepted("full", error=error))
                continue
            history = json.dumps([["accepted", item.created_at, None]])
            cursor = conn.execute(
                "INSERT INTO commands (request_id, idem_key, body_hash, device_id, command_type, status, created_at, "
                "updated_at, expires_at, record_key, record_value, record_headers, history, key_id) "
                "VALUES (?, ?, ?, ?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.request_id,
                    item.idem_key,
                    item.body_hash,
                    item.device_id,
                    item.command_type,
                    item.created_at,
                    item.created_at,
                    item.expires_at,
                    item.key,
                    item.value,
                    _HEADERS.encode(item.headers),
                    history,
                    item.key_id,
                ),
            )
            self._txn_delta += 1
            self._txn_sizes[cursor.lastrowid] = len(item.value)
            self._txn_bytes += len(item.value)
            if self.status_source is not None:
                self._emit(
                    conn,
                    ("accepted", item.created_at),
                    (item.request_id, item.device_id, item.command_type, item.created_at, item.expires_at, item.key_id),
                    idempotency_key=item.idem_key,
                    body_hash=item.body_hash.hex(),
                )
            row = JournalRow(
                seq=cursor.lastrowid,
                request_id=item.request_id,
                device_id=item.device_id,
                command_type=item.command_type,
                status="accepted",
                created_at=item.created_at,
                updated_at=item.created_at,
                expires_at=item.expires_at,
                topic=None,
                partition=None,
                offset=None,
                error=None,
                history=[("accepted", item.created_at, None)],
                body_hash=item.body_hash,
                key_id=item.key_id,
            )
            results.append(Accepted("inserted", row))
        return results

    def _find_twin(self, conn: sqlite3.Connection, item: NewCommand) -> JournalRow | None:
        if item.idem_key is not None:
            found = conn.execute(f"SELECT {_ROW} FROM commands WHERE idem_key = ?", (item.idem_key,)).fetchone()
            if found:
                return _row(found)
        if item.client_request_id:
            found = conn.execute(f"SELECT {_ROW} FROM commands WHERE request_id = ?", (item.request_id,)).fetchone()
            if found:
                return _row(found)
        return None

    def _apply_mark(self, conn: sqlite3.Connection, mark: _Mark) -> None:
        detail = mark.error
        if mark.status == "published":
            detail = f"{mark.topic}/{mark.partition}@{mark.offset}"
        updated = conn.execute(
            "UPDATE commands SET status = ?, updated_at = ?, topic = coalesce(?, topic), "
            'partition = coalesce(?, partition), "offset" = coalesce(?, "offset"), error = coalesce(?, error), '
            "history = json_insert(history, '$[#]', json_array(?, ?, ?)), "
            "record_value = CASE WHEN ? IN ('published', 'expired', 'failed') THEN NULL ELSE record_value END "
            "WHERE seq = ? AND status = 'accepted' "
            "RETURNING request_id, device_id, command_type, created_at, expires_at, key_id",
            (
                mark.status,
                mark.at,
                mark.topic,
                mark.partition,
                mark.offset,
                mark.error,
                mark.status,
                mark.at,
                detail,
                mark.status,
                mark.seq,
            ),
        ).fetchone()
        if updated:
            self._changed.append(updated[0])
        if updated and self.status_source is not None:
            self._emit(
                conn,
                (mark.status, mark.at),
                updated,
                topic=mark.topic,
                partition=mark.partition,
                offset=mark.offset,
                error=mark.error[:2000] if mark.error else None,  # the contract's limit
            )
        if updated and mark.status in FINAL:
            self._txn_delta -= 1
            if self._txn_sizes.get(mark.seq, 0) > 0:  # inserted and finished in this same transaction
                self._txn_bytes -= self._txn_sizes.pop(mark.seq)
            else:
                self._txn_sizes[mark.seq] = -self._pending_sizes.get(mark.seq, 0)
                self._txn_bytes += self._txn_sizes[mark.seq]

    def _emit(self, conn: sqlite3.Connection, step: tuple[str, float], command: tuple, **details: object) -> None:
        """Write this instance's transition `step` (status, when) of `command` (request_id, device_id,
        command_type, created_at, expires_at, key_id) to the status outbox, in the transaction under way."""
        request_id, device_id, command_type, created_at, expires_at, key_id = command
        event = StatusEvent(
            request_id=request_id,
            status=step[0],
            at=from_epoch(step[1]),
            source=self.status_source,
            device_id=device_id,
            command_type=command_type,
            created_at=from_epoch(created_at),
            expires_at=from_epoch(expires_at),
            owner=key_id,
            **details,
        )
        conn.execute(
            "INSERT INTO status_outbox (request_id, event) VALUES (?, ?)", (request_id, _EVENT_ENCODER.encode(event))
        )
        self._emitted = True

    def _apply_feed(self, conn: sqlite3.Connection, op: _Events | _OutboxSent) -> None:
        if isinstance(op, _OutboxSent):
            conn.execute("DELETE FROM status_outbox WHERE id <= ?", (op.up_to,))
            return
        for event, signed in op.events:
            # One event that cannot be applied (absurd values) is skipped, not the whole batch, and never
            # the writer thread: a savepoint undoes what it half did.
            conn.execute("SAVEPOINT event")
            try:
                refused = self._apply_event(conn, event, signed)
            except (sqlite3.Error, ValueError, OverflowError, RecursionError, TypeError) as exc:
                conn.execute("ROLLBACK TO event")
                op.skipped += 1
                log.warning("status event skipped", request_id=event.request_id, error=f"{type(exc).__name__}: {exc}")
            else:
                if refused is not None:
                    op.skipped += 1
                    log.debug("status event ignored", request_id=event.request_id, status=event.status, reason=refused)
            conn.execute("RELEASE event")
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(f"status_pos:{p}", o) for p, o in op.positions.items()]
        )

    def _apply_event(self, conn: sqlite3.Connection, event: StatusEvent, signed: bool) -> str | None:
        """One status-topic event: a new row for a command accepted elsewhere, or a step on a known one.
        Returns why it was ignored, or None.

        Only a signed event (an instance's) may make a row or carry a key id, an Idempotency-Key or a body
        hash: anyone who can write the topic could otherwise plant a row that turns a victim's request into a
        replay of a command never sent. An unsigned one (a connector's) may only take a known command of the
        same device to a stage after `published`, with its error and result.

        Repeats change nothing and a status never moves to a lower stage, so events may come late, twice
        or out of order. A row accepted here keeps status 'accepted' until the forwarder marks it (that
        is what the forwarder and the backlog count go by); its API status comes from its history."""
        if not signed:
            if event.status not in CONNECTOR_STAGES:
                return "unsigned, and not a connector's stage"
            event = msgspec.structs.replace(
                event, owner=None, idempotency_key=None, body_hash=None, command_type=None, created_at=None,
                expires_at=None, topic=None, partition=None, offset=None,
            )  # fmt: skip
        at = event.at.timestamp()
        detail = event.error
        if event.status == "published" and event.offset is not None:
            detail = f"{event.topic}/{event.partition}@{event.offset}"
        result = json.dumps(event.result) if event.result is not None else None
        found = conn.execute(
            "SELECT seq, status, history, origin, device_id FROM commands WHERE request_id = ?", (event.request_id,)
        ).fetchone()
        if found is None:
            if not signed:
                return "unsigned, for a command not known here"
            idem = event.idempotency_key
            if idem is not None and conn.execute("SELECT 1 FROM commands WHERE idem_key = ?", (idem,)).fetchone():
                idem = None
            conn.execute(
                "INSERT INTO commands (request_id, idem_key, body_hash, device_id, command_type, status, created_at, "
                'updated_at, expires_at, record_key, topic, partition, "offset", error, history, key_id, origin, '
                "result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, x'', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.request_id,
                    idem,
                    _unhex(event.body_hash),
                    event.device_id,
                    event.command_type or "",
                    event.status,
                    event.created_at.timestamp() if event.created_at else at,
                    at,
                    event.expires_at.timestamp() if event.expires_at else None,
                    event.topic,
                    event.partition,
                    event.offset,
                    event.error,
                    json.dumps([[event.status, at, detail]]),
                    event.owner,
                    event.source,
                    result,
                ),
            )
        else:
            seq, status, history, origin, device_id = found
            if not signed and event.device_id != device_id:
                return "unsigned, naming another device"
            steps = json.loads(history)
            if any(step[0] == event.status for step in steps):
                return None  # a repeat (our own events come back this way too)
            advance = STAGE_RANK[event.status] > STAGE_RANK.get(furthest(status, steps), 0)
            steps.append([event.status, at, detail])
            steps.sort(key=lambda step: STAGE_RANK.get(step[0], 0))  # stable: within a rank, as received
            forward = STAGE_RANK[event.status] > STAGE_RANK.get(status, 0)
            if origin is None and status == "accepted":
                forward = False  # the forwarder's own mark moves it on
            conn.execute(
                "UPDATE commands SET status = ?, updated_at = max(updated_at, ?), history = ?, "
                'topic = coalesce(topic, ?), partition = coalesce(partition, ?), "offset" = coalesce("offset", ?), '
                "error = CASE WHEN ? THEN coalesce(?, error) ELSE error END, "
                "result = CASE WHEN ? THEN coalesce(?, result) ELSE result END, "
                "command_type = CASE WHEN command_type = '' THEN coalesce(?, '') ELSE command_type END, "
                "device_id = CASE WHEN device_id = '' THEN coalesce(?, '') ELSE device_id END "
                "WHERE seq = ?",
                (
                    event.status if forward else status,
                    at,
                    json.dumps(steps),
                    event.topic,
                    event.partition,
                    event.offset,
                    advance,
                    event.error,
                    advance,
                    result,
                    event.command_type,
                    event.device_id,
                    seq,
                ),
            )
        self._changed.append(event.request_id)
        return None

    def _report_changes(self) -> None:
        if self._emitted:
            self.outbox_written.set()
        # Filtered only now, after the commit: a wait registered after that would have read the change itself.
        watched = [rid for rid in self._changed if rid in self.watched] if self.watched else None
        if watched and self.on_change is not None and self._watch_outbox is not None:
            self._watch_outbox.put(self.on_change, watched)
        self._changed = []

    def _probe_writable(self) -> None:
        """While writes fail, try a one-row write each second, so readiness comes back without traffic."""
        try:
            self._writer.execute("BEGIN IMMEDIATE")
            self._writer.execute("UPDATE meta SET value = ? WHERE key = 'probe'", (time.time(),))
            self._writer.execute("COMMIT")
        except sqlite3.Error:
            _rollback(self._writer)
            return
        self.writable, self.last_error = True, None
        log.info("journal writable again")

    def _housekeeping(self) -> None:
        """Purge finished commands past the retention period and checkpoint the WAL."""
        conn = self._writer
        cutoff = time.time() - self.retention
        try:
            while True:
                deleted = conn.execute(
                    "DELETE FROM commands WHERE seq IN (SELECT seq FROM commands "
                    "WHERE status != 'accepted' AND updated_at < ? LIMIT 5000)",
                    (cutoff,),
                ).rowcount
                if deleted < 5000:
                    break
            # Commands accepted by other instances that we never heard more of.
            conn.execute(
                "DELETE FROM commands WHERE status = 'accepted' AND origin IS NOT NULL AND updated_at < ?", (cutoff,)
            )
            if self.status_source is None:  # nobody will publish what an earlier run left there
                conn.execute("DELETE FROM status_outbox")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("journal housekeeping failed", sqlite_error=str(exc))

    # ------------------------------------------------------------------ reads

    def get(self, request_id: str) -> JournalRow | None:
        """One command by request id."""
        found = self._reader.execute(f"SELECT {_ROW} FROM commands WHERE request_id = ?", (request_id,)).fetchone()
        return _row(found) if found else None

    def recent(
        self,
        device_id: str | None,
        status: str | None,
        limit: int,
        before: int | None = None,
        key_id: str | None = None,
    ) -> list[JournalRow]:
        """Newest first, optionally for one device, status and/or API key, paged by `before` (a seq)."""
        filters = [("key_id = ?", key_id), ("device_id = ?", device_id), ("status = ?", status), ("seq < ?", before)]
        used = [(condition, value) for condition, value in filters if value is not None]
        clause = f"WHERE {' AND '.join(c for c, _ in used)}" if used else ""
        rows = self._reader.execute(
            f"SELECT {_ROW} FROM commands {clause} ORDER BY seq DESC LIMIT ?", (*(v for _, v in used), limit)
        ).fetchall()
        return [_row(r) for r in rows]

    def oldest_pending_created_at(self) -> float | None:
        """When the oldest command still waiting for Kafka was accepted."""
        found = self._reader.execute(
            "SELECT created_at FROM commands WHERE status = 'accepted' AND origin IS NULL ORDER BY seq LIMIT 1"
        ).fetchone()
        return found[0] if found else None

    def outbox_size(self) -> int:
        """Status events not yet acknowledged by the status topic."""
        return self._reader.execute("SELECT count(*) FROM status_outbox").fetchone()[0]

    def status_positions(self) -> dict[int, int]:
        """Where the status feed stopped reading, per status topic partition (from the status feed's thread)."""
        conn = self._connect()  # not the event loop's reader: SQLite connections are not shared across threads
        try:
            rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'status_pos:%'").fetchall()
        finally:
            conn.close()
        return {int(key.split(":")[1]): int(value) for key, value in rows}

    def outbox_batch(self, after: int, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        """Status events written after outbox id `after`, oldest first (for the status feed's thread only)."""
        if self._writer is None:  # closed
            return []
        if self._feed_reader is None:
            self._feed_reader = self._connect()
        return self._feed_reader.execute(
            "SELECT id, request_id, event FROM status_outbox WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()


def _unhex(text: str | None) -> bytes:
    try:
        return bytes.fromhex(text) if text else b""
    except ValueError:
        return b""


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _settle(future: asyncio.Future, result: list[Accepted]) -> None:
    if not future.done():
        future.set_result(result)
