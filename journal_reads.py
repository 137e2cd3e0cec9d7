"""The journal's read side: status and list queries on a thread of their own, answered on the event loop.

The reader owns its connection, on its own thread: in WAL mode it sees committed transactions only and
never waits for the writer. A caller on the event loop gets a future; the thread runs the query and hands
the result back through a threadbridge.Outbox, so results reach the loop in bursts and the loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from errors import JournalUnavailable
from journal_schema import FANOUT_COLUMNS, ROW_COLUMNS, FanoutRow, JournalRow, Sync, connect, fanout_from, row_from
from threadbridge import Outbox, outbox_for, resolve

_STOP = object()
Query = Callable[..., Any]  # (connection, *arguments) -> result, run on the reader's thread


class Reader:
    """One thread and its connection, running the queries the event loop submits, in order."""

    def __init__(self, path: Path, sync: Sync) -> None:
        self.path = path
        self.sync = sync
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: Outbox | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the reading connection and start the thread."""
        conn = connect(self.path, self.sync)
        self._thread = threading.Thread(target=self._read_loop, args=(conn,), name="journal-reader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Answer what is queued, then stop the thread and close its connection."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(_STOP)
            thread.join(30)
        while True:  # queued while it stopped: nobody will run them
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                _, _, outbox, future = job
                outbox.put(resolve, future, None, JournalUnavailable("The journal is closed"))

    def submit(self, query: Query, *args: Any) -> asyncio.Future[Any]:
        """Run `query(connection, *args)` on the reader's thread; the future resolves on the calling loop."""
        self._outbox = outbox_for(self._outbox)
        future: asyncio.Future[Any] = self._outbox.loop.create_future()
        if self._thread is None:
            future.set_exception(JournalUnavailable("The journal is closed"))
        else:
            self._jobs.put((query, args, self._outbox, future))
        return future

    def _read_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while (job := self._jobs.get()) is not _STOP:
                query, args, outbox, future = job
                try:
                    result = query(conn, *args)
                except Exception as exc:  # the caller's to handle; the reader goes on
                    outbox.put(resolve, future, None, exc)
                else:
                    outbox.put(resolve, future, result)
        finally:
            conn.close()


def fetch_row(conn: sqlite3.Connection, request_id: str) -> JournalRow | None:
    """One command by request id."""
    found = conn.execute(f"SELECT {ROW_COLUMNS} FROM commands WHERE request_id = ?", (request_id,)).fetchone()
    return row_from(found) if found else None


# The command list's equality filters: only these columns are ever named in its SQL.
LIST_FILTERS = ("key_id", "device_id", "status", "fanout_id")


def fetch_recent(
    conn: sqlite3.Connection, limit: int, before: int | None, equal: Mapping[str, str | None]
) -> list[JournalRow]:
    """Newest first, up to `limit` rows whose LIST_FILTERS columns equal `equal`'s values (None or absent: any),
    with seq below `before` when given."""
    named = [column for column in LIST_FILTERS if equal.get(column) is not None]
    # A device's or a fan-out's commands are few beside a key's or a status's: with one of those, its index is the
    # one to read. SQLite has no statistics to tell; the unary + keeps it from reading the other index instead.
    narrow = "device_id" in named or "fanout_id" in named
    used = [(f"+{c} = ?" if c in ("key_id", "status") and narrow else f"{c} = ?", equal[c]) for c in named]
    if before is not None:
        used.append(("seq < ?", before))
    clause = f"WHERE {' AND '.join(c for c, _ in used)}" if used else ""
    rows = conn.execute(
        f"SELECT {ROW_COLUMNS} FROM commands {clause} ORDER BY seq DESC LIMIT ?", (*(v for _, v in used), limit)
    ).fetchall()
    return [row_from(r) for r in rows]


def fetch_fanout(conn: sqlite3.Connection, fanout_id: str) -> tuple[FanoutRow, dict[str, int]] | None:
    """A fan-out and how many of its commands are in each status (its index holds them together)."""
    found = conn.execute(f"SELECT {FANOUT_COLUMNS} FROM fanouts WHERE fanout_id = ?", (fanout_id,)).fetchone()
    if found is None:
        return None
    counts = conn.execute(
        "SELECT status, count(*) FROM commands WHERE fanout_id = ? GROUP BY status", (fanout_id,)
    ).fetchall()
    return fanout_from(found), dict(counts)


def seq_chunks(seqs: Sequence[int]) -> Iterator[tuple[str, Sequence[int]]]:
    """`seqs` 500 at a time (SQLite's bound-parameter limit), each chunk with its `?,?,…` placeholders."""
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        yield ",".join("?" * len(chunk)), chunk


def _by_seqs(conn: sqlite3.Connection, columns: str, where: str, seqs: list[int]) -> list[tuple]:
    """`SELECT columns` of the commands among `seqs` that match `where`, in seq order, each by primary key."""
    found = []
    for places, chunk in seq_chunks(seqs):
        found += conn.execute(
            f"SELECT {columns} FROM commands WHERE seq IN ({places}) AND {where} ORDER BY seq", chunk
        ).fetchall()
    return found


def fetch_records(conn: sqlite3.Connection, seqs: list[int]) -> list[tuple[int, bytes, bytes, bytes]]:
    """(seq, record_key, record_value, record_headers) of the waiting commands among `seqs`."""
    return _by_seqs(conn, "seq, record_key, record_value, record_headers", "record_value IS NOT NULL", seqs)


def fetch_queued(conn: sqlite3.Connection, seqs: list[int]) -> list[tuple]:
    """The waiting commands among `seqs`, with their records, in seq order."""
    columns = (
        "seq, request_id, device_id, created_at, expires_at, not_before, coalesce_key, handed, record_key, "
        "record_value, record_headers"
    )
    return _by_seqs(conn, columns, "status = 'accepted' AND record_value IS NOT NULL", seqs)
