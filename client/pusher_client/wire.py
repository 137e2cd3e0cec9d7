"""The wire types the client and the server share: the Structs of the HTTP API's requests, answers and
statuses, and the constants they rest on. Needs only msgspec.

The server's schemas.py re-exports them beside its own types (the status topic's events, the Kafka record,
readiness and service status), so both sides decode the same shapes from one definition.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

VERSION = "1.0.0"


def new_id() -> str:
    """A time-ordered UUID (version 7) as text: 48 bits of Unix milliseconds, then 74 random bits. The ids
    either side makes (request and fan-out ids, idempotency keys) sort by when they were made, so the
    journal's unique indexes on them grow at their end: random ones would land all over an index of
    millions, each insert touching a page of its own. Built from bytes: a `uuid.UUID` costs more."""
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    raw[6] = raw[6] & 0x0F | 0x70  # version 7
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 9562 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# `$` alone would let one trailing newline through (Python's re); the look-aheads forbid it.
_NO_CONTROL = r"^(?!.*[\x00-\x1f\x7f-\x9f])"
DeviceId = Annotated[str, Meta(min_length=1, max_length=255, pattern=_NO_CONTROL, examples=["efento_device_001"])]
CommandType = Annotated[str, Meta(min_length=1, max_length=128, pattern=_NO_CONTROL, examples=["config_update"])]
Protocol = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$(?!\n)", examples=["coap"])]
ScriptRef = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=255,
        pattern=r"^(?!.*\.\.)[^/\\\x00-\x1f\x7f-\x9f]+$(?!\n)",
        description="A plain file name: no '/', '\\' or '..'.",
        examples=["efento_bidirectional_parser.py"],
    ),
]
RequestId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._~:-]+$(?!\n)",
        description="Client-chosen id (letters, digits, . _ ~ : -); one is generated when absent.",
    ),
]
Qos = Annotated[int, Meta(ge=0, le=2, description="MQTT QoS; only with protocol mqtt.")]
Status = Literal[
    "accepted", "published", "delivered", "succeeded", "failed", "rejected", "expired", "cancelled", "superseded"
]
# How far along each status is: a command's status only ever moves to a higher rank, so late, repeated or
# out-of-order events change nothing. The last rank is terminal.
STAGE_RANK: dict[str, int] = {
    "accepted": 0,
    "published": 1,
    "delivered": 2,
    "succeeded": 3,
    "failed": 3,
    "rejected": 3,
    "expired": 3,
    "cancelled": 3,  # withdrawn by its sender before it was handed to Kafka: never sent
    "superseded": 3,  # replaced by a newer command of the same device and coalesce_key: never sent
}
TERMINAL = frozenset(s for s, rank in STAGE_RANK.items() if rank == 3)
MAX_TTL = 30 * 86400
MAX_SCHEDULE = 30 * 86400  # how far ahead `not_before` may lie, in seconds
CoalesceKey = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern=_NO_CONTROL,
        description="Latest wins: accepting this command supersedes every earlier command of the same device with "
        "the same coalesce_key that has not been handed to Kafka yet (they end `superseded`, never sent).",
        examples=["setpoint"],
    ),
]
NotBefore = Annotated[
    datetime,
    Meta(
        tz=True,
        description="Deliver at: held in the journal until this time (with a UTC offset, at most 30 days ahead), "
        "then sent in its device's order by due time, then acceptance. A TTL counts from it.",
    ),
]


class CommandRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """A command for one device, as posted to POST /api/v1/commands."""

    device_id: DeviceId
    command_type: CommandType
    payload: dict[str, Any]
    protocol: Protocol
    parser_script_ref: ScriptRef | None = None
    metadata: (
        Annotated[
            dict[str, Any],
            Meta(
                description="Free keys for the connectors. `topic` (MQTT) must be the device's topic "
                "(MQTT_TOPIC_TEMPLATE) or below it; `qos` (0-2), `retain` and `confirmable` are typed as the "
                "fields of the same name."
            ),
        ]
        | None
    ) = None
    qos: Qos | None = None
    retain: bool | None = None
    confirmable: Annotated[bool, Meta(description="CoAP confirmable; only with protocol coap.")] | None = None
    request_id: RequestId | None = None
    ttl_seconds: (
        Annotated[int, Meta(ge=1, le=MAX_TTL, description="Expire this many seconds after acceptance.")] | None
    ) = None
    expires_at: Annotated[datetime, Meta(tz=True, description="Expire at this time (with a UTC offset).")] | None = None
    coalesce_key: CoalesceKey | None = None
    not_before: NotBefore | None = None


class FanoutRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """One command for many devices, as posted to POST /api/v1/commands/fanout: each device gets a command of its
    own (its own request_id), journaled together, all or none."""

    device_ids: Annotated[
        list[DeviceId], Meta(min_length=1, description="1 to MAX_FANOUT distinct devices, each sent the command.")
    ]
    command_type: CommandType
    payload: dict[str, Any]
    protocol: Protocol
    parser_script_ref: ScriptRef | None = None
    metadata: (
        Annotated[
            dict[str, Any],
            Meta(
                description="As a command's. A `topic` is derived per device: `{device_id}` in it is replaced by each "
                "device's id, and the result must be that device's topic or below it."
            ),
        ]
        | None
    ) = None
    qos: Qos | None = None
    retain: bool | None = None
    confirmable: bool | None = None
    fanout_id: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=128,
                pattern=r"^[A-Za-z0-9._~:-]+$(?!\n)",
                description="Client-chosen id of the fan-out (letters, digits, . _ ~ : -); one is generated when "
                "absent. Sending it again replays the fan-out.",
            ),
        ]
        | None
    ) = None
    ttl_seconds: (
        Annotated[int, Meta(ge=1, le=MAX_TTL, description="Expire this many seconds after acceptance.")] | None
    ) = None
    expires_at: Annotated[datetime, Meta(tz=True, description="Expire at this time (with a UTC offset).")] | None = None
    coalesce_key: CoalesceKey | None = None
    not_before: NotBefore | None = None


class FanoutResponse(Struct, kw_only=True, omit_defaults=True):
    """A fan-out journaled: follow it at GET /api/v1/fanouts/{fanout_id} (the answer's Location)."""

    fanout_id: str
    total: int
    status: Literal["accepted"]
    message: str
    timestamp: datetime
    not_before: datetime | None = None
    expires_at: datetime | None = None
    replayed: bool = False
    superseded: list[str] = []


class FanoutStatus(Struct, kw_only=True):
    """Where a fan-out's commands are: how many in each status, and whether every one has reached an end."""

    fanout_id: str
    command_type: str
    created_at: datetime
    total: int
    counts: Annotated[dict[str, int], Meta(description="Commands per status (only statuses with any).")]
    finished: Annotated[int, Meta(description="Commands that reached an end (nothing more will happen to them).")]
    done: Annotated[bool, Meta(description="Every command has reached an end.")]


class BatchCommandRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """Several commands, validated and published one by one, in order."""

    commands: list[CommandRequest]


class FieldError(Struct):
    """Where a field is (msgspec path) and what is wrong with it."""

    loc: str
    msg: str


class Problem(Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem details object (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    http_request_id: str | None = None  # the HTTP request's X-Request-ID (a command's id is `request_id`)
    errors: list[FieldError] | None = None


class CommandResponse(Struct, kw_only=True, omit_defaults=True):
    """The outcome of one command; in a batch, a failed item carries `error` instead of an offset."""

    success: bool
    request_id: str | None
    status: Status
    message: str
    timestamp: datetime
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    expires_at: datetime | None = None
    not_before: datetime | None = None
    replayed: bool = False
    superseded: Annotated[
        list[str], Meta(description="The request ids of the earlier commands this one superseded (coalesce_key).")
    ] = []
    error: Problem | None = None


class BatchCommandResponse(Struct, kw_only=True):
    """The outcomes of a batch, in request order."""

    total_commands: int
    successful: int
    failed: int
    results: list[CommandResponse]


class Transition(Struct):
    """One step of a command's lifecycle."""

    status: Status
    at: datetime
    detail: str | None = None


class CommandStatus(Struct, kw_only=True):
    """A command as the journal knows it: current status and every transition with its time."""

    request_id: str
    device_id: str
    command_type: str
    status: Status
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None
    history: list[Transition] = []
    result: Annotated[dict[str, Any], Meta(description="What the device answered (from its connector).")] | None = None
    not_before: Annotated[datetime, Meta(description="When it is due (held until then).")] | None = None
    coalesce_key: str | None = None
    superseded_by: Annotated[str, Meta(description="The request id of the command that replaced it.")] | None = None
    fanout_id: Annotated[str, Meta(description="The fan-out it is part of.")] | None = None


class StatusChange(Struct, kw_only=True, omit_defaults=True):
    """One transition, as GET /api/v1/commands/{request_id}/events streams it (the SSE `data`)."""

    request_id: str
    status: Status
    at: datetime
    detail: str | None = None
    result: dict[str, Any] | None = None


class CommandList(Struct, kw_only=True):
    """A page of commands, newest first; pass `next_before` as `before` for the next page."""

    items: list[CommandStatus]
    next_before: int | None = None


class Health(Struct):
    """Liveness: the process answers."""

    status: Literal["healthy"]
