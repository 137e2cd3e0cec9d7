"""The local durable journal: every accepted command is in SQLite (WAL) before any 2xx.

One writer thread owns the writing connection and does group commit: whatever inserts and
status updates are queued when it wakes go into one transaction, so many concurrent requests
share one fsync. Handlers await their insert through an asyncio future; the event loop never
waits on the disk. Reads (status, lists) run on a reader thread with a second connection
(journal_reads.py); WAL lets them run beside the writer. The figures the metrics show (backlog,
oldest pending command, status outbox) are kept by the writer as it commits, so reading them
runs no SQL.

Idempotency lives here too, because only the writer sees every insert in order: a repeated
Idempotency-Key or client request_id finds the earlier row in the same transaction stream,
so even concurrent duplicates resolve to one row. Status-topic events are applied by the same
writer, in the same order (status_store.py).
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
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
import structlog

import journal_schema
from errors import JournalError, JournalFull, JournalUnavailable
from journal_reads import Reader, fetch_fanout, fetch_queued, fetch_recent, fetch_records, fetch_row, seq_chunks
from journal_schema import FANOUT_COLUMNS, ROW_COLUMNS, FanoutRow, JournalRow, Sync, fanout_from, row_from
from journal_space import (
    FREED_PER_COMMAND,
    OPS_PER_COMMIT,
    PER_CHANGE,
    PER_COMMAND,
    PRUNE_CHUNK,
    Ceiling,
    files_size,
    page_counts,
    prune,
)
from schemas import from_epoch
from status_store import Events, OutboxSent, Received, apply_feed, emit, forget_sent, outbox_after, read_positions
from threadbridge import Outbox, outbox_for, resolve

log = structlog.get_logger("journal")

# The statuses a command accepted here ends in; the last two are never sent.
FINAL = ("published", "expired", "failed", "cancelled", "superseded")
HEADERS_ENCODER = msgspec.msgpack.Encoder()
HEADERS_DECODER = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
# A status transition of a waiting command: its history grows by one step and, once final, its record goes.
_MARK = (
    "UPDATE commands SET status = ?, updated_at = ?, topic = coalesce(?, topic), "
    'partition = coalesce(?, partition), "offset" = coalesce(?, "offset"), error = coalesce(?, error), '
    "superseded_by = coalesce(?, superseded_by), history = json_insert(history, '$[#]', json_array(?, ?, ?)), "
    "record_value = CASE WHEN ? THEN NULL ELSE record_value END "
    "WHERE seq = ? AND status = 'accepted'"
)
# The same, with what the status topic's event needs of the command (status_store.emit)
_MARK_RETURNING = _MARK + " RETURNING request_id, device_id, command_type, created_at, expires_at, key_id"
SERVICE_SOURCE = "pusher@"  # how this service's instances name themselves in their status events (not proof)
FAILURE_REMINDER = 60.0  # seconds between the log lines that say the journal is still not writable


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
    not_before: float | None = None
    coalesce_key: str | None = None
    fanout_id: str | None = None
    handed: bool = True  # it may go to the producer without another commit (see Forwarder.may_hand_over)


class NewFanout(msgspec.Struct, frozen=True, kw_only=True):
    """A validated fan-out: its own row, journaled with its commands, all or none."""

    fanout_id: str
    idem_key: str | None
    client_fanout_id: bool
    body_hash: bytes
    key_id: str | None
    command_type: str
    created_at: float


class Pending(msgspec.Struct, kw_only=True):
    """A command still to be published: what the forwarder hands to Kafka. Its record (key, value, headers) is
    None while a long queue keeps it in the journal only (Forwarder.KEEP_LOADED); it is read back to be sent."""

    seq: int
    request_id: str
    device_id: str
    created_at: float
    expires_at: float | None
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    handed_at: float | None = None  # when this process first gave it to the producer
    not_before: float | None = None  # held until then
    coalesce_key: str | None = None
    order: int = -1  # the forwarder's release order (due time, then acceptance); -1 until it is due
    handed: bool = False  # the journal says it may have been handed over (else it must say so before a hand-over)


def plain(pending: Pending) -> bool:
    """A command the forwarder needs nothing of but its place in the queue until it is sent: due on acceptance,
    never handed over, no expiry and no coalesce_key. A long backlog of such commands stays in the journal only."""
    held, expiring, coalescing = pending.not_before, pending.expires_at, pending.coalesce_key
    return not pending.handed and held is None and expiring is None and coalescing is None


@dataclass(slots=True)
class Backlog:
    """The commands still to publish, as `Journal.open` finds them: the plain ones (see `plain`) only by seq and
    acceptance time, oldest first (16 bytes a command), every other one whole."""

    pending: list[Pending] = field(default_factory=list)
    plain_seqs: array = field(default_factory=lambda: array("q"))
    plain_created: array = field(default_factory=lambda: array("d"))

    def __len__(self) -> int:
        return len(self.pending) + len(self.plain_seqs)


@dataclass(frozen=True, slots=True)
class Accepted:
    """The journal's answer to one insert."""

    outcome: Literal["inserted", "replayed", "conflict", "full", "unavailable"]
    row: JournalRow | None = None
    error: JournalError | None = None


@dataclass(frozen=True, slots=True)
class FanoutAccepted:
    """The journal's answer to a fan-out: its commands journaled (all of them), replayed, or refused whole."""

    outcome: Literal["inserted", "replayed", "conflict", "full", "unavailable"]
    fanout: FanoutRow | None = None
    rows: list[JournalRow] = field(default_factory=list)  # the commands, in device order, when inserted
    error: JournalError | None = None


@dataclass(slots=True)
class _Insert:
    outbox: Outbox
    future: asyncio.Future[list[Accepted]]
    items: list[NewCommand]
    fanout: NewFanout | None = None  # with it, `future` resolves to one FanoutAccepted


@dataclass(slots=True)
class _Mark:
    seq: int
    request_id: str
    status: str
    at: float
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None
    superseded_by: str | None = None
    size: int | None = None  # its record's bytes, when the caller knows them (else read before the record goes)


@dataclass(slots=True)
class _Handover:
    """Commands about to be handed to the producer: recorded as such before they are (resolves True once committed)."""

    seqs: list[int]
    outbox: Outbox
    future: asyncio.Future[bool]


@dataclass(slots=True)
class _Flush:
    event: threading.Event = field(default_factory=threading.Event)
    outbox: Outbox | None = None  # with `future`: resolved on the event loop instead of (as well as) `event`
    future: asyncio.Future[None] | None = None


_STOP = object()


def describe(exc: sqlite3.Error) -> JournalUnavailable:
    """A clear, internals-free reason for a failed write."""
    text = str(exc).lower()
    if "full" in text:
        return JournalUnavailable("The journal's disk is full; nothing was stored")
    if "readonly" in text or "read-only" in text:
        return JournalUnavailable("The journal file is read-only; nothing was stored")
    return JournalUnavailable("The journal cannot be written (I/O error); nothing was stored")


class Journal:
    """The SQLite journal: group-committed inserts and status marks, reads on their own thread, retention."""

    def __init__(
        self,
        path: str | Path,
        sync: Sync = "full",
        max_pending: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        retention: float = 7 * 86400,
        housekeeping_interval: float = 60.0,
        status_source: str | None = None,
        max_disk: int = 512 * 1024 * 1024,
    ) -> None:
        self.path = Path(path)
        self.sync = sync
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.retention = retention
        self.housekeeping_interval = housekeeping_interval
        self.max_disk = max_disk  # JOURNAL_MAX_DISK, 0: no ceiling (journal_space.py)
        self.ceiling: Ceiling | None = None  # made at open, once the file's page size is known
        self.disk_bytes = 0  # the database file and its WAL on disk, as the writer last measured them
        self.pruned = 0  # finished commands deleted to stay under the ceiling, since open
        self.commits = 0
        self.journal_id: str | None = None  # made when the file is created: tells this journal's records apart
        self.writable = True
        self.last_error: str | None = None
        # While writes fail: since when, the commands refused meanwhile, and when the log is next reminded.
        self._failing_since: float | None = None
        self._refused = 0
        self._remind_at = 0.0
        self.reads = Reader(self.path, sync)
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: Outbox | None = None
        self._writer: sqlite3.Connection | None = None
        self._feed_reader: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._retry_marks: list[_Mark] = []
        # Marks queued (on the loop) and marks through a commit (on the writer): each counter has one writer.
        self._marks_queued = 0
        self._marks_tried = 0
        # What waits for Kafka, kept by the writer as it commits (the metrics read these, never SQL):
        self.pending_count = 0
        self.pending_bytes = 0  # their record bytes
        self.oldest_pending_created_at: float | None = None
        self._oldest_seq: int | None = None  # the oldest one's, looked up again when it is finished
        self._oldest_stale = False  # a look-up failed: read it again after the next commit
        # The transaction being built: what it changes in the figures above, applied once it commits.
        self._txn_delta = 0  # pending-count change
        self._txn_sizes: dict[int, int] = {}  # seq -> size added (+) or removed (-)
        self._txn_bytes = 0  # their sum, kept as it changes so that a big batch is not summed again per insert
        self._txn_inserted: list[tuple[int, float]] = []  # (seq, created_at) of its inserts
        self._txn_oldest_gone = False  # it finishes the oldest command waiting
        self._txn_emitted = 0  # status events it writes to the outbox
        self._txn_forgotten = 0  # and those it deletes from it, acknowledged by the status topic
        self._txn_pruned = 0  # finished commands it deletes to make room
        # Under a ceiling: the database's pages and the room left under its share (pages; negative: over it) at the
        # last commit, and as the transaction being built measured them (room None: not known, measure it).
        self._pages = 0
        self._room: int | None = None
        self._txn_pages = 0
        self._txn_room: int | None = None
        self._no_room: str | None = None  # while set, new commands are refused with this reason (nothing fits)
        # With a status topic: every transition is also written to status_outbox, in the same transaction,
        # for the status feed to publish (so a transition is never lost between the journal and Kafka).
        self.status_source = status_source
        self.outbox_size = 0  # status events not yet acknowledged by the status topic
        self.outbox_written = threading.Event()
        # Request ids someone waits on (long polls, event streams), owned by the event loop and only read
        # here: commits that change them are reported to `on_change` on that loop (see watch_changes).
        self.watched: Mapping[str, object] = {}
        self.on_change: Callable[[list[str]], None] | None = None
        self._watch_outbox: Outbox | None = None
        self._changed: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def _connect(self) -> sqlite3.Connection:
        return journal_schema.connect(self.path, self.sync)

    def open(self) -> Backlog:
        """Open (creating or upgrading the file if needed), start the writer and reader threads, and return the
        commands still to publish."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for place in (self.path.parent, self.path):
            if place.exists() and not os.access(place, os.W_OK):
                raise JournalError(f"{place} is not writable (read-only file system or permissions)")
        self._writer = self._connect()
        journal_schema.migrate(self._writer)
        self._writer.execute("INSERT OR IGNORE INTO meta VALUES ('journal_id', ?)", (os.urandom(8).hex(),))
        self.journal_id = self._writer.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]
        if self.max_disk:
            self.ceiling = Ceiling(self.max_disk, self._writer.execute("PRAGMA page_size").fetchone()[0])
            self.ceiling.configure(self._writer)
            self._prune_to_ceiling()  # what an earlier run, or a higher ceiling, left over it
            if self._pages * self.ceiling.page_size > self.max_disk:
                log.warning(
                    "journal file larger than JOURNAL_MAX_DISK: it will not grow, and only VACUUM (service stopped) "
                    "shrinks it",
                    path=str(self.path),
                    file_bytes=self._pages * self.ceiling.page_size,
                    max_disk=self.max_disk,
                )
        self._measure()
        # Only a command that may be in Kafka already comes with its record (to be looked up there); the others'
        # are read back when they are sent, and a plain one is kept by its seq alone, so a restart with a long
        # backlog holds little of it in memory.
        rows = self._writer.execute(
            "SELECT seq, request_id, device_id, created_at, expires_at, not_before, coalesce_key, handed, "
            "CASE WHEN handed THEN record_key END, CASE WHEN handed THEN record_value END, "
            "CASE WHEN handed THEN record_headers END, length(record_value) "
            "FROM commands WHERE status = 'accepted' AND origin IS NULL ORDER BY seq"
        )  # iterated, not fetched whole: a long backlog's rows never sit in memory all at once
        backlog = Backlog()
        count = total = 0
        for row in rows:
            seq, created, expires, not_before, coalesce_key, handed = row[0], *row[3:8]
            count, total = count + 1, total + (row[-1] or 0)
            if count == 1:
                self._oldest_seq, self.oldest_pending_created_at = seq, created
            if not handed and not_before is None and expires is None and coalesce_key is None:  # plain()
                backlog.plain_seqs.append(seq)
                backlog.plain_created.append(created)
            else:
                backlog.pending.append(_pending_from(row))
        self.pending_count, self.pending_bytes = count, total
        self.outbox_size = self._writer.execute("SELECT count(*) FROM status_outbox").fetchone()[0]
        self.reads.start()
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._thread.start()
        log.info("journal open", path=str(self.path), sync=self.sync, pending=len(backlog))
        return backlog

    def close(self) -> None:
        """Commit what is queued, checkpoint, and close every connection."""
        self.reads.close()
        if self._thread is not None:
            self._ops.put(_STOP)
            self._thread.join(30)
            self._thread = None
        for conn in (self._feed_reader, self._writer):
            if conn is not None:
                conn.close()
        self._feed_reader = self._writer = None

    # ------------------------------------------------------------------ writes

    def accept(self, items: list[NewCommand]) -> asyncio.Future[list[Accepted]]:
        """Insert commands durably (or find their earlier twins); the future resolves after the commit's fsync."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[list[Accepted]] = self._outbox.loop.create_future()
        self._ops.put(_Insert(self._outbox, future, items))
        return future

    def accept_fanout(self, fanout: NewFanout, items: list[NewCommand]) -> asyncio.Future[FanoutAccepted]:
        """Insert a fan-out and all its commands in one transaction, or none of them (an earlier fan-out with the
        same Idempotency-Key or fanout_id is found instead); resolves after the commit's fsync."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[FanoutAccepted] = self._outbox.loop.create_future()
        self._ops.put(_Insert(self._outbox, future, items, fanout))
        return future

    def mark(
        self,
        seq: int,
        request_id: str,
        status: str,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        error: str | None = None,
        superseded_by: str | None = None,
        size: int | None = None,
    ) -> None:
        """Queue a status transition; it is committed with the writer's next transaction. `size`: the command's
        record bytes, when known (else the writer reads them)."""
        self._marks_queued += 1
        self._ops.put(_Mark(seq, request_id, status, time.time(), topic, partition, offset, error, superseded_by, size))

    def record_handover(self, seqs: list[int]) -> asyncio.Future[bool]:
        """Record that these commands are about to be handed to the producer; True once that is committed (False
        when the journal cannot be written: then they must not be handed over)."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[bool] = self._outbox.loop.create_future()
        self._ops.put(_Handover(seqs, self._outbox, future))
        return future

    def marks_pending(self) -> bool:
        """Whether a status mark queued so far has not been through a commit yet."""
        return self._marks_tried != self._marks_queued

    def committed(self) -> asyncio.Future[None]:
        """Resolves once everything queued so far (status marks included) is committed."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[None] = self._outbox.loop.create_future()
        self._ops.put(_Flush(outbox=self._outbox, future=future))
        return future

    def apply_events(self, events: list[Received], positions: dict[int, int], timeout: float = 30.0) -> int | None:
        """Apply status-topic events and store the read positions in one transaction; blocks until committed.

        Returns how many events were not applied (untrusted or unstorable), or None when nothing was committed."""
        op = Events(events, positions)
        self._ops.put(op)
        if not op.done.wait(timeout) or not op.committed:
            return None
        return op.skipped

    def outbox_sent(self, up_to: int) -> None:
        """Forget the status outbox up to id `up_to`: the status topic has it."""
        self._ops.put(OutboxSent(up_to))

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
            most = OPS_PER_COMMIT if self.ceiling is None else self.ceiling.changes_per_commit
            while len(ops) < most:
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
        fresh_marks = [op for op in ops if isinstance(op, _Mark)]
        marks = self._retry_marks + fresh_marks
        flushes = [op for op in ops if isinstance(op, _Flush)]
        feed = [op for op in ops if isinstance(op, Events | OutboxSent)]
        handovers = [op for op in ops if isinstance(op, _Handover)]
        self._retry_marks = []
        if inserts or marks or feed or handovers:
            conn = self._writer
            self._start_txn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                for op in handovers:
                    for places, chunk in seq_chunks(op.seqs):
                        conn.execute(
                            f"UPDATE commands SET handed = 1 WHERE seq IN ({places}) AND status = 'accepted'", chunk
                        )
                for mark in marks:
                    self._apply_mark(conn, mark)
                for op in feed:
                    if isinstance(op, OutboxSent):
                        self._txn_forgotten += forget_sent(conn, op.up_to)
                    else:
                        apply_feed(conn, op, self._changed)
                if self.ceiling is None:
                    results = self._insert_ops(conn, inserts)
                else:  # last, so that what the marks finished can be pruned to make room for them
                    changes = len(marks) + sum(len(op.events) for op in feed if isinstance(op, Events))
                    results = self._insert_within_ceiling(conn, inserts, changes)
                conn.execute("COMMIT")
                self.commits += 1
            except Exception as exc:  # sqlite3.Error, or a bug: the writer thread must live on either way
                _rollback(conn)
                error = (
                    describe(exc)
                    if isinstance(exc, sqlite3.Error)
                    else JournalUnavailable("The journal could not be written (internal error); nothing was stored")
                )
                self._write_failed(error, exc, sum(len(op.items) for op in inserts))
                self._retry_marks = marks
                results = [
                    [Accepted("unavailable", error=error) for _ in op.items]
                    if op.fanout is None
                    else FanoutAccepted("unavailable", error=error)
                    for op in inserts
                ]
                self._start_txn()  # nothing of it happened
                self._room = None
            else:
                self._count_txn()
                self._measure(commit=True)
                if not self.writable:
                    self._writable_again()
            for op, result in zip(inserts, results, strict=True):
                op.outbox.put(resolve, op.future, result)
            for op in handovers:
                op.outbox.put(resolve, op.future, self.writable)
            for op in feed:
                if isinstance(op, Events):
                    op.committed = self.writable
                    op.done.set()  # after a failed write too: the consumer reads the events again from Kafka
            self._report_changes()
        self._marks_tried += len(fresh_marks)  # committed, or kept to retry: a flush cannot hurry them either way
        for flush in flushes:
            flush.event.set()
            if flush.outbox is not None:
                flush.outbox.put(resolve, flush.future, None)

    def _start_txn(self) -> None:
        """Forget what the transaction being built would change: a new one starts (or the last rolled back)."""
        self._txn_delta = 0
        self._txn_sizes = {}
        self._txn_bytes = 0
        self._txn_inserted = []
        self._txn_oldest_gone = False
        self._txn_emitted = 0
        self._txn_forgotten = 0
        self._txn_pruned = 0
        self._txn_room = None
        self._changed = []

    def _count_txn(self) -> None:
        """The transaction committed: move the backlog figures by what it changed."""
        self.pending_count += self._txn_delta
        self.pending_bytes += self._txn_bytes
        if self._txn_oldest_gone or (self._oldest_seq is None and self._txn_inserted):
            self._oldest_stale = True
        if self._oldest_stale:
            self._look_up_oldest()
        self.outbox_size += self._txn_emitted - self._txn_forgotten
        self.pruned += self._txn_pruned
        if self._txn_room is not None:
            self._pages, self._room = self._txn_pages, self._txn_room

    def _look_up_oldest(self) -> None:
        """Read which command waits longest, by the index on (status, seq): a few pages, once a commit at most, and
        nothing kept per command. A read that fails leaves the figure as it was, to be read after the next commit:
        the writer thread goes on."""
        try:
            found = self._writer.execute(
                "SELECT seq, created_at FROM commands WHERE status = 'accepted' AND origin IS NULL ORDER BY seq LIMIT 1"
            ).fetchone()
        except sqlite3.Error as exc:
            log.warning("reading the oldest waiting command failed", sqlite_error=str(exc))
            return
        self._oldest_stale = False
        self._oldest_seq, self.oldest_pending_created_at = found or (None, None)

    def _insert_ops(self, conn: sqlite3.Connection, inserts: list[_Insert]) -> list[list[Accepted] | FanoutAccepted]:
        return [
            self._insert_all(conn, op.items) if op.fanout is None else self._insert_fanout(conn, op) for op in inserts
        ]

    def _insert_within_ceiling(
        self, conn: sqlite3.Connection, inserts: list[_Insert], changes: int
    ) -> list[list[Accepted] | FanoutAccepted]:
        """The transaction's new commands, within the database's share of JOURNAL_MAX_DISK: finished commands are
        pruned first to make room for them; if they still do not fit, none is stored (full), while replays and
        conflicts are answered as ever. `changes`: the status marks and events already applied in the transaction."""
        ceiling = self.ceiling
        need = ceiling.pages(sum(len(item.value) + PER_COMMAND for op in inserts for item in op.items))
        # The room known at the last commit, less what this transaction's changes may have taken. Far enough from
        # the ceiling the estimates (generous) are enough: nothing is measured, and the room known goes down by
        # them, until a commit nearer the ceiling measures it again.
        room = None if self._room is None else self._room - ceiling.pages(changes * PER_CHANGE)
        if room is not None and room >= need + ceiling.headroom:
            self._txn_pages, self._txn_room = self._pages, room - need
            return self._insert_ops(conn, inserts)
        self._make_room(conn, need)
        if not inserts:
            return []
        for attempt in (1, 2):
            conn.execute("SAVEPOINT inserts")
            saved = self._txn_saved()
            results = self._insert_ops(conn, inserts)
            if self._fits(conn):
                conn.execute("RELEASE inserts")
                return results
            after = self._txn_room
            conn.execute("ROLLBACK TO inserts")
            conn.execute("RELEASE inserts")
            self._txn_restore(saved)
            used = self._measure_room(conn) - after  # the pages they took
            if attempt == 2 or not self._make_room(conn, used):
                break
        self._no_room = (
            f"JOURNAL_MAX_DISK ({ceiling.limit} bytes) is reached: {self.pending_count} commands wait for Kafka and "
            "no finished command is left to prune"
        )
        try:
            results = self._insert_ops(conn, inserts)  # no new row: twins still found
        finally:
            self._no_room = None
        self._measure_room(conn)
        return results

    def _measure_room(self, conn: sqlite3.Connection) -> int:
        """The database's pages and the room under its share, as the transaction under way has them; the room."""
        pages, free = page_counts(conn)
        self._txn_pages, self._txn_room = pages, self.ceiling.budget - (pages - free)  # the share as it is now
        return self._txn_room

    def _fits(self, conn: sqlite3.Connection) -> bool:
        """Whether the transaction so far keeps the database within its share: no more pages in use, and a file no
        larger (than the share, or than the file already was when an earlier, higher ceiling left it larger)."""
        return self._measure_room(conn) >= 0 and self._txn_pages <= max(self.ceiling.budget, self._pages)

    def _make_room(self, conn: sqlite3.Connection, need: int, most: int | None = None) -> int:
        """When fewer than `need` pages are free under the database's share, prune finished commands, oldest first,
        until `need` and some headroom are (or none is left, or `most` went); returns how many were pruned."""
        ceiling = self.ceiling
        room = self._measure_room(conn)
        pruned = 0
        if room >= need:
            return 0
        target = need + 2 * ceiling.headroom  # beyond the next commits' need: they need not measure again
        while room < target and (most is None or pruned < most):
            missing = (target - room) * ceiling.page_size
            gone = prune(conn, min(PRUNE_CHUNK, missing // FREED_PER_COMMAND + 1))
            if not gone:
                break
            pruned += gone
            room = self._measure_room(conn)
        self._txn_pruned += pruned
        return pruned

    def _prune_to_ceiling(self) -> None:
        """Outside the commits (at open, in housekeeping): prune until the database is back within its share, with
        headroom, a transaction per few thousand commands so that none grows the WAL much. A failure (a full disk)
        is left for the commits to report: they prune too."""
        conn = self._writer
        pruned = True
        while pruned:
            self._start_txn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                pruned = self._make_room(conn, 0, most=10 * PRUNE_CHUNK)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                self._start_txn()
                self._room = None
                log.warning("journal pruning failed", sqlite_error=str(exc))
                return
            self._count_txn()

    def _measure(self, commit: bool = False) -> None:
        """The files' size on disk, after a `commit` or housekeeping. A transaction whose WAL took the files past the
        ceiling is checkpointed at once, and the WAL truncated (SQLite would only have done so at its next start);
        the database's share leaves room for a WAL that large from then on (journal_space.Ceiling.saw_wal)."""
        db, wal = files_size(self.path)
        if commit and self.ceiling is not None and self.ceiling.saw_wal(wal):
            self._room = None  # measured again at the next commit, against the smaller share
        if self.ceiling is not None and wal > self.ceiling.wal_limit and db + wal > self.max_disk:
            try:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("journal checkpoint failed", sqlite_error=str(exc))
            db, wal = files_size(self.path)
        self.disk_bytes = db + wal

    def _txn_saved(self) -> tuple[int, int, int, int]:
        """The transaction's figures that inserts change, to put back if they are rolled back to a savepoint."""
        return self._txn_delta, self._txn_bytes, len(self._txn_inserted), self._txn_emitted

    def _txn_restore(self, saved: tuple[int, int, int, int]) -> None:
        self._txn_delta, self._txn_bytes, inserted, self._txn_emitted = saved
        for seq, _ in self._txn_inserted[inserted:]:
            self._txn_sizes.pop(seq, None)
        del self._txn_inserted[inserted:]

    def _insert_all(self, conn: sqlite3.Connection, items: list[NewCommand]) -> list[Accepted]:
        results = []
        for item in items:
            existing = self._find_twin(conn, item)
            if existing is not None:
                outcome = "replayed" if existing.body_hash == item.body_hash else "conflict"
                results.append(Accepted(outcome, existing))
                continue
            if self._no_room is not None:
                results.append(Accepted("full", error=JournalFull(self._no_room)))
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
            results.append(Accepted("inserted", self._insert(conn, item)))
        return results

    def _insert_fanout(self, conn: sqlite3.Connection, op: _Insert) -> FanoutAccepted:
        """A fan-out's row and every one of its commands, or (full, or a twin found) none of them."""
        fanout, items = op.fanout, op.items
        twin = self._find_fanout_twin(conn, fanout)
        if twin is not None:
            return FanoutAccepted("replayed" if twin.body_hash == fanout.body_hash else "conflict", twin)
        if self._no_room is not None:
            return FanoutAccepted("full", error=JournalFull(f"{self._no_room}; a fan-out is journaled whole"))
        if self.pending_count + self._txn_delta + len(items) > self.max_pending:
            error = JournalFull(f"{self.max_pending} commands are waiting for Kafka; a fan-out is journaled whole")
            return FanoutAccepted("full", error=error)
        size = sum(len(item.value) for item in items)
        if self.pending_bytes + self._txn_bytes + size > self.max_bytes:
            error = JournalFull(
                f"{self.max_bytes} bytes of commands are waiting for Kafka; a fan-out is journaled whole"
            )
            return FanoutAccepted("full", error=error)
        conn.execute(
            "INSERT INTO fanouts (fanout_id, idem_key, body_hash, key_id, command_type, total, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                fanout.fanout_id,
                fanout.idem_key,
                fanout.body_hash,
                fanout.key_id,
                fanout.command_type,
                len(items),
                fanout.created_at,
            ),
        )
        row = FanoutRow(
            fanout_id=fanout.fanout_id,
            body_hash=fanout.body_hash,
            key_id=fanout.key_id,
            command_type=fanout.command_type,
            total=len(items),
            created_at=fanout.created_at,
        )
        return FanoutAccepted("inserted", row, [self._insert(conn, item) for item in items])

    def _find_fanout_twin(self, conn: sqlite3.Connection, fanout: NewFanout) -> FanoutRow | None:
        if fanout.idem_key is not None:
            found = conn.execute(
                f"SELECT {FANOUT_COLUMNS} FROM fanouts WHERE idem_key = ?", (fanout.idem_key,)
            ).fetchone()
            if found:
                return fanout_from(found)
        if fanout.client_fanout_id:
            found = conn.execute(
                f"SELECT {FANOUT_COLUMNS} FROM fanouts WHERE fanout_id = ?", (fanout.fanout_id,)
            ).fetchone()
            if found:
                return fanout_from(found)
        return None

    def _insert(self, conn: sqlite3.Connection, item: NewCommand) -> JournalRow:
        """One new command row, its backlog figures and its `accepted` status event, in the transaction under way."""
        history = json.dumps([["accepted", item.created_at, None]])
        cursor = conn.execute(
            "INSERT INTO commands (request_id, idem_key, body_hash, device_id, command_type, status, created_at, "
            "updated_at, expires_at, record_key, record_value, record_headers, history, key_id, not_before, "
            "coalesce_key, fanout_id, handed) VALUES (?, ?, ?, ?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                HEADERS_ENCODER.encode(item.headers),
                history,
                item.key_id,
                item.not_before,
                item.coalesce_key,
                item.fanout_id,
                1 if item.handed else None,
            ),
        )
        self._txn_delta += 1
        self._txn_sizes[cursor.lastrowid] = len(item.value)
        self._txn_bytes += len(item.value)
        self._txn_inserted.append((cursor.lastrowid, item.created_at))
        if self.status_source is not None:
            self._txn_emitted += 1
            emit(
                conn,
                self.status_source,
                ("accepted", item.created_at),
                (item.request_id, item.device_id, item.command_type, item.created_at, item.expires_at, item.key_id),
                idempotency_key=item.idem_key,
                body_hash=item.body_hash.hex(),
                not_before=from_epoch(item.not_before),
                fanout_id=item.fanout_id,
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
            not_before=item.not_before,
            coalesce_key=item.coalesce_key,
            fanout_id=item.fanout_id,
        )
        return row

    def _find_twin(self, conn: sqlite3.Connection, item: NewCommand) -> JournalRow | None:
        if item.idem_key is not None:
            found = conn.execute(f"SELECT {ROW_COLUMNS} FROM commands WHERE idem_key = ?", (item.idem_key,)).fetchone()
            if found:
                return row_from(found)
        if item.client_request_id:
            return fetch_row(conn, item.request_id)
        return None

    def _apply_mark(self, conn: sqlite3.Connection, mark: _Mark) -> None:
        detail = mark.error
        if mark.status == "published":
            detail = f"{mark.topic}/{mark.partition}@{mark.offset}"
        elif mark.status == "superseded":
            detail = mark.superseded_by
        size = mark.size
        if size is None and mark.status in FINAL:  # read before the update lets the record go
            found = conn.execute("SELECT length(record_value) FROM commands WHERE seq = ?", (mark.seq,)).fetchone()
            size = (found[0] or 0) if found else 0
        # The row comes back only for the status topic's event: RETURNING costs about as much as the update.
        cursor = conn.execute(
            _MARK if self.status_source is None else _MARK_RETURNING,
            (
                mark.status,
                mark.at,
                mark.topic,
                mark.partition,
                mark.offset,
                mark.error,
                mark.superseded_by,
                mark.status,
                mark.at,
                detail,
                mark.status in FINAL,  # its record is in Kafka or never will be: the bytes can go
                mark.seq,
            ),
        )
        if self.status_source is None:
            updated = cursor.rowcount == 1
        else:
            row = cursor.fetchone()
            updated = row is not None
            if updated:
                self._txn_emitted += 1
                emit(
                    conn,
                    self.status_source,
                    (mark.status, mark.at),
                    row,
                    topic=mark.topic,
                    partition=mark.partition,
                    offset=mark.offset,
                    error=mark.error[:2000] if mark.error else None,  # the contract's limit
                    superseded_by=mark.superseded_by,
                )
        if updated:
            self._changed.append(mark.request_id)
        if updated and mark.status in FINAL:
            self._txn_delta -= 1
            self._txn_oldest_gone = self._txn_oldest_gone or mark.seq == self._oldest_seq
            if self._txn_sizes.get(mark.seq, 0) > 0:  # inserted and finished in this same transaction
                self._txn_bytes -= self._txn_sizes.pop(mark.seq)
            else:
                self._txn_sizes[mark.seq] = -size
                self._txn_bytes -= size

    def _report_changes(self) -> None:
        if self._txn_emitted:
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
        self._writable_again()

    def _write_failed(self, error: JournalUnavailable, exc: Exception, refused: int) -> None:
        """A commit failed: one ERROR line when writes start failing (or fail for another reason), a reminder a
        minute while they go on, never a line per refused command: a full disk must not fill the log too."""
        now = time.monotonic()
        self._refused += refused
        if self.writable or error.detail != self.last_error:
            self._failing_since = self._failing_since or now
            self._remind_at = now + FAILURE_REMINDER
            # A traceback only helps with an error of our own; SQLite's message says what the disk did.
            trace = {} if isinstance(exc, sqlite3.Error) else {"exc_info": exc}
            log.error("journal write failed", error=error.detail, sqlite_error=str(exc), **trace)
        elif now >= self._remind_at:
            self._remind_at = now + FAILURE_REMINDER
            log.warning(
                "journal still not writable",
                error=error.detail,
                refused=self._refused,
                seconds=round(now - self._failing_since),
            )
        self.writable, self.last_error = False, error.detail

    def _writable_again(self) -> None:
        seconds = round(time.monotonic() - self._failing_since, 1) if self._failing_since else None
        log.info("journal writable again", refused=self._refused, seconds=seconds)
        self.writable, self.last_error = True, None
        self._refused, self._failing_since = 0, None

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
            conn.execute(  # fan-outs none of whose commands is left
                "DELETE FROM fanouts WHERE created_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM commands WHERE commands.fanout_id = fanouts.fanout_id)",
                (cutoff,),
            )
            # Commands accepted by other instances that we never heard more of.
            conn.execute(
                "DELETE FROM commands WHERE status = 'accepted' AND origin IS NOT NULL AND updated_at < ?", (cutoff,)
            )
            if self.status_source is None:  # nobody will publish what an earlier run left there
                conn.execute("DELETE FROM status_outbox")
                self.outbox_size = 0
            if self.ceiling is not None:
                self.ceiling.next_interval()
                self._room = None
                self._prune_to_ceiling()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("journal housekeeping failed", sqlite_error=str(exc))
        self._measure()

    # ------------------------------------------------------------------ reads

    async def get(self, request_id: str) -> JournalRow | None:
        """One command by request id (read on the reader thread)."""
        return await self.reads.submit(fetch_row, request_id)

    async def recent(
        self,
        device_id: str | None,
        status: str | None,
        limit: int,
        before: int | None = None,
        key_id: str | None = None,
        fanout_id: str | None = None,
    ) -> list[JournalRow]:
        """Newest first, optionally for one device, status and/or API key, paged by `before` (a seq); read on
        the reader thread."""
        equal = {"device_id": device_id, "status": status, "key_id": key_id, "fanout_id": fanout_id}
        return await self.reads.submit(fetch_recent, limit, before, equal)

    async def records(self, seqs: list[int]) -> dict[int, tuple[bytes, bytes, list[tuple[str, bytes]]]]:
        """The Kafka records (key, value, headers) of waiting commands, by seq (read on the reader thread)."""
        found = await self.reads.submit(fetch_records, seqs)
        return {seq: (key, value, HEADERS_DECODER.decode(headers)) for seq, key, value, headers in found}

    async def queued(self, seqs: list[int]) -> list[Pending]:
        """The commands among `seqs` still waiting to be published, whole (records read back), in seq order (read
        on the reader thread)."""
        return [_pending_from(row) for row in await self.reads.submit(fetch_queued, seqs)]

    async def fanout(self, fanout_id: str) -> tuple[FanoutRow, dict[str, int]] | None:
        """A fan-out and how many of its commands are in each status (read on the reader thread)."""
        return await self.reads.submit(fetch_fanout, fanout_id)

    def status_positions(self) -> dict[int, int]:
        """Where the status feed stopped reading, per status topic partition (from the status feed's thread)."""
        conn = self._connect()  # a connection of the calling thread's own
        try:
            return read_positions(conn)
        finally:
            conn.close()

    def outbox_batch(self, after: int, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        """Status events written after outbox id `after`, oldest first (for the status feed's thread only)."""
        if self._writer is None:  # closed
            return []
        if self._feed_reader is None:
            self._feed_reader = self._connect()
        return outbox_after(self._feed_reader, after, limit)


def _pending_from(row: tuple) -> Pending:
    """A Pending from a row of (seq, request_id, device_id, created_at, expires_at, not_before, coalesce_key,
    handed, record_key, record_value, record_headers), the record possibly left out (None), more columns ignored."""
    seq, rid, device, created, expires, not_before, coalesce_key, handed, key, value, headers = row[:11]
    return Pending(
        seq=seq,
        request_id=rid,
        device_id=device,
        created_at=created,
        expires_at=expires,
        key=key,
        value=value,
        headers=HEADERS_DECODER.decode(headers) if headers is not None else None,
        not_before=not_before,
        coalesce_key=coalesce_key,
        handed=bool(handed),
    )


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
