"""What the journal's file holds: its tables, how a file of an earlier version is brought up to date, and a
command row as it reads back.

The schema only grows: `migrate` creates whatever is missing (tables, added columns, indexes) in one
transaction, so a journal written by any earlier version opens in place, and a current one is left as it is.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Literal

import msgspec

from errors import JournalError
from schemas import STAGE_RANK, Status

Sync = Literal["full", "normal"]
_SYNC = {"full": 2, "normal": 1}

_TABLES = (
    """CREATE TABLE IF NOT EXISTS commands (
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
)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    """CREATE TABLE IF NOT EXISTS fanouts (
    fanout_id    TEXT PRIMARY KEY,
    idem_key     TEXT UNIQUE,
    body_hash    BLOB NOT NULL,
    key_id       TEXT,
    command_type TEXT NOT NULL,
    total        INTEGER NOT NULL,
    created_at   REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS status_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    event      BLOB NOT NULL
)""",
    "INSERT OR IGNORE INTO meta VALUES ('probe', 0)",
)
# Columns of `commands` that a journal of an early version lacks: added (NULL in its rows) when it opens.
_ADDED_COLUMNS = (
    ("key_id", "TEXT"),
    ("origin", "TEXT"),
    ("result", "TEXT"),
    ("not_before", "REAL"),  # deliver at: held until then
    ("coalesce_key", "TEXT"),
    ("superseded_by", "TEXT"),  # the request id of the command that replaced it
    ("fanout_id", "TEXT"),
    # 1: this command may have been handed to a producer, so after a crash it may be in Kafka already (it is looked
    # up there before it is sent again); NULL: no process ever handed it over. Written before any hand-over.
    ("handed", "INTEGER"),
)
# The command list (journal_reads.fetch_recent) filters by equality on key, device and status and pages newest
# first by seq. Each of them has an index ending in seq, so a page is read from an index however many finished
# rows the file holds; the other filters are checked on the rows it gives. commands_status also finds the
# commands still waiting for Kafka (status 'accepted'). Every index costs the writer on each command: the key's
# and the status's grow at their ends (cheap), a device's lands anywhere in its index, so there is one of those.
_INDEXES = (
    "DROP INDEX IF EXISTS commands_pending",  # (seq) WHERE status = 'accepted': commands_status covers it
    "CREATE INDEX IF NOT EXISTS commands_status ON commands(status, seq)",
    "CREATE INDEX IF NOT EXISTS commands_device ON commands(device_id, seq)",
    "CREATE INDEX IF NOT EXISTS commands_key ON commands(key_id, seq) WHERE key_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS commands_finished ON commands(updated_at) WHERE status != 'accepted'",
    "CREATE INDEX IF NOT EXISTS commands_fanout ON commands(fanout_id, seq) WHERE fanout_id IS NOT NULL",
)


def connect(path: Path, sync: Sync) -> sqlite3.Connection:
    """A connection to the journal in WAL mode, at the durability asked for (read back, not assumed)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={_SYNC[sync]}")
    conn.execute("PRAGMA journal_size_limit=67108864")
    got = conn.execute("PRAGMA synchronous").fetchone()[0]
    if got != _SYNC[sync]:
        raise JournalError(f"SQLite refused PRAGMA synchronous={sync.upper()} (reads back {got})")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Create what the file lacks (tables, columns, indexes) in one transaction; rows already there stay."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _TABLES:
            conn.execute(statement)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(commands)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in columns:
                conn.execute(f"ALTER TABLE commands ADD COLUMN {column} {kind}")
                if column == "handed":  # an earlier version did not say: any waiting command may be in Kafka
                    conn.execute("UPDATE commands SET handed = 1 WHERE status = 'accepted'")
        for statement in _INDEXES:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


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
    not_before: float | None = None
    coalesce_key: str | None = None
    superseded_by: str | None = None
    fanout_id: str | None = None

    @property
    def stage(self) -> str:
        """The furthest stage reached: of the highest rank, the first one received."""
        return furthest(self.status, self.history)

    @property
    def was_published(self) -> bool:
        """Whether the command reached Kafka (it may have failed later, at the device)."""
        return self.partition is not None or self.stage in ("published", "delivered", "succeeded")


def furthest(status: str, history: list) -> str:
    """Of `status` and the stages in `history` (in the order received), the first of the highest rank."""
    best = status
    for step in history:
        if STAGE_RANK.get(step[0], 0) > STAGE_RANK.get(best, 0):
            best = step[0]
    return best


# The columns a JournalRow is read from, in the order `row_from` takes them.
ROW_COLUMNS = (
    'seq, request_id, device_id, command_type, status, created_at, updated_at, expires_at, topic, partition, "offset", '
    "error, history, body_hash, key_id, origin, result, not_before, coalesce_key, superseded_by, fanout_id"
)


def row_from(values: tuple) -> JournalRow:
    """The JournalRow of one result row of `SELECT {ROW_COLUMNS}`."""
    (seq, rid, device, ctype, status, created, updated, expires, topic, part, off, err, hist, body_hash, key_id, origin,
     result, not_before, coalesce_key, superseded_by, fanout_id) = values  # fmt: skip
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
        not_before=not_before,
        coalesce_key=coalesce_key,
        superseded_by=superseded_by,
        fanout_id=fanout_id,
    )


class FanoutRow(msgspec.Struct, frozen=True, kw_only=True):
    """A fan-out as the journal knows it: what it was, for whom, how many commands."""

    fanout_id: str
    body_hash: bytes
    key_id: str | None
    command_type: str
    total: int
    created_at: float


FANOUT_COLUMNS = "fanout_id, body_hash, key_id, command_type, total, created_at"


def fanout_from(values: tuple) -> FanoutRow:
    """The FanoutRow of one result row of `SELECT {FANOUT_COLUMNS}`."""
    fanout_id, body_hash, key_id, command_type, total, created_at = values
    return FanoutRow(
        fanout_id=fanout_id,
        body_hash=body_hash,
        key_id=key_id,
        command_type=command_type,
        total=total,
        created_at=created_at,
    )
