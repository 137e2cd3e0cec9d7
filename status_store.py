"""The journal's side of the status topic: this instance's transitions into the status outbox, and the
topic's events onto the commands they name.

The writing functions run on the journal's writer thread, with its connection, inside the transaction under
way (journal.Journal calls them): one writer applying events and accepting commands in one order is what
keeps idempotency race-free when the same command arrives here and through the topic at once.

Trust: only a signed event (an instance's) may make a row or carry a key id, an Idempotency-Key or a body
hash; an unsigned one (a connector's) may only move a known command of its own device to a connector's
stage (see `apply_event`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field

import msgspec
import structlog

from journal_schema import furthest
from schemas import CONNECTOR_STAGES, STAGE_RANK, StatusEvent, from_epoch

log = structlog.get_logger("journal")

_EVENT_ENCODER = msgspec.json.Encoder()

# A status-topic event and whether its signature was verified (an instance's) or it had none (a connector's).
Received = tuple[StatusEvent, bool]


@dataclass(slots=True)
class Events:
    """Status-topic events for the writer to apply, with the read positions to store in the same transaction."""

    events: list[Received]
    positions: dict[int, int]  # status topic partition -> next offset to read
    done: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    skipped: int = 0  # events not applied, as untrusted or unstorable (logged; the feed goes on)


@dataclass(slots=True)
class OutboxSent:
    """The status topic acknowledged the outbox up to this id: the writer forgets it."""

    up_to: int


def emit(conn: sqlite3.Connection, source: str, step: tuple[str, float], command: tuple, **details: object) -> None:
    """Write `source`'s transition `step` (status, when) of `command` (request_id, device_id, command_type,
    created_at, expires_at, key_id) to the status outbox, in the transaction under way."""
    request_id, device_id, command_type, created_at, expires_at, key_id = command
    event = StatusEvent(
        request_id=request_id,
        status=step[0],
        at=from_epoch(step[1]),
        source=source,
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


def forget_sent(conn: sqlite3.Connection, up_to: int) -> int:
    """Delete the outbox up to id `up_to`; returns how many events that removed."""
    return conn.execute("DELETE FROM status_outbox WHERE id <= ?", (up_to,)).rowcount


def apply_feed(conn: sqlite3.Connection, op: Events, changed: list[str]) -> None:
    """Apply a poll's events one by one and store the read positions; the request ids changed go to `changed`."""
    for event, signed in op.events:
        # One event that cannot be applied (absurd values) is skipped, not the whole batch, and never
        # the writer thread: a savepoint undoes what it half did.
        conn.execute("SAVEPOINT event")
        try:
            refused = apply_event(conn, event, signed, changed)
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


def apply_event(conn: sqlite3.Connection, event: StatusEvent, signed: bool, changed: list[str]) -> str | None:
    """One status-topic event: a new row for a command accepted elsewhere, or a step on a known one.
    Returns why it was ignored, or None; a row it changed has its request id added to `changed`.

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
            expires_at=None, topic=None, partition=None, offset=None, not_before=None, fanout_id=None,
            superseded_by=None,
        )  # fmt: skip
    at = event.at.timestamp()
    detail = event.error
    if event.status == "published" and event.offset is not None:
        detail = f"{event.topic}/{event.partition}@{event.offset}"
    elif event.status == "superseded":
        detail = event.superseded_by
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
            "result, not_before, fanout_id, superseded_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, x'', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                event.not_before.timestamp() if event.not_before else None,
                event.fanout_id,
                event.superseded_by,
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
            "device_id = CASE WHEN device_id = '' THEN coalesce(?, '') ELSE device_id END, "
            "superseded_by = coalesce(superseded_by, ?), not_before = coalesce(not_before, ?), "
            "fanout_id = coalesce(fanout_id, ?) WHERE seq = ?",
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
                event.superseded_by,
                event.not_before.timestamp() if event.not_before else None,
                event.fanout_id,
                seq,
            ),
        )
    changed.append(event.request_id)
    return None


def outbox_after(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, str, bytes]]:
    """Status events written after outbox id `after`, oldest first: (id, request_id, event)."""
    return conn.execute(
        "SELECT id, request_id, event FROM status_outbox WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
    ).fetchall()


def read_positions(conn: sqlite3.Connection) -> dict[int, int]:
    """Where the status feed stopped reading, per status topic partition."""
    rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'status_pos:%'").fetchall()
    return {int(key.split(":")[1]): int(value) for key, value in rows}


def _unhex(text: str | None) -> bytes:
    try:
        return bytes.fromhex(text) if text else b""
    except ValueError:
        return b""
