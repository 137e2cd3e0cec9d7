"""Every request, response, problem and Kafka message as a msgspec Struct, the constants and types they share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# The wire types the client shares are defined once, in pusher_client.wire; the server's modules import them from
# here, beside the server's own types below.
from pusher_client.wire import (
    MAX_SCHEDULE,  # noqa: F401 (re-exported)
    MAX_TTL,  # noqa: F401 (re-exported)
    STAGE_RANK,
    TERMINAL,  # noqa: F401 (re-exported)
    VERSION,  # noqa: F401 (re-exported)
    BatchCommandRequest,  # noqa: F401 (re-exported)
    BatchCommandResponse,  # noqa: F401 (re-exported)
    CommandList,  # noqa: F401 (re-exported)
    CommandRequest,  # noqa: F401 (re-exported)
    CommandResponse,  # noqa: F401 (re-exported)
    CommandStatus,  # noqa: F401 (re-exported)
    CommandType,
    DeviceId,
    FanoutRequest,  # noqa: F401 (re-exported)
    FanoutResponse,  # noqa: F401 (re-exported)
    FanoutStatus,  # noqa: F401 (re-exported)
    FieldError,  # noqa: F401 (re-exported)
    Health,  # noqa: F401 (re-exported)
    Problem,  # noqa: F401 (re-exported)
    Qos,
    RequestId,
    Status,
    StatusChange,  # noqa: F401 (re-exported)
    Transition,  # noqa: F401 (re-exported)
)

# What a connector may report on the status topic (unsigned): the stages after Kafka. `cancelled` and `superseded`
# mean "never sent": only the service that held the command can say that.
CONNECTOR_STAGES = frozenset(s for s, rank in STAGE_RANK.items() if rank >= 2) - {"cancelled", "superseded"}
PROTOCOL_OPTIONS = {"qos": "mqtt", "retain": "mqtt", "confirmable": "coap"}


def from_epoch(epoch: float | None) -> datetime | None:
    """Seconds since the epoch as an aware UTC datetime (None stays None)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


class _MetadataOptions(Struct):
    """The keys of `metadata` that connectors act on, typed; every other key passes as it is."""

    topic: str | msgspec.UnsetType = msgspec.UNSET
    qos: Qos | msgspec.UnsetType = msgspec.UNSET
    retain: bool | msgspec.UnsetType = msgspec.UNSET
    confirmable: bool | msgspec.UnsetType = msgspec.UNSET


class _BatchEnvelope(Struct, forbid_unknown_fields=True):
    """The batch body with items left undecoded, so that each item is validated on its own."""

    commands: list[msgspec.Raw]


# The service signs its own events (record header `pusher-signature`, see status_feed.py); an unsigned event, a
# connector's, may only move a known command of the same device_id on to one of CONNECTOR_STAGES.
class StatusEvent(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """One lifecycle transition of a command on the status topic (record key: its request_id, UTF-8)."""

    request_id: RequestId
    status: Annotated[Status, Meta(description="The stage reached; a status never goes back to a lower stage.")]
    at: Annotated[datetime, Meta(tz=True, description="When the transition happened (ISO 8601 with offset).")]
    source: Annotated[
        str, Meta(min_length=1, max_length=255, description="Who reports it: `pusher@<instance>` or a connector name.")
    ]
    device_id: Annotated[DeviceId, Meta(description="The command's device; an event naming another device is ignored.")]
    command_type: CommandType | None = None
    created_at: Annotated[datetime, Meta(tz=True, description="When the command was accepted.")] | None = None
    expires_at: (
        Annotated[datetime, Meta(tz=True, description="When the command expires (the command's own field).")] | None
    ) = None
    topic: Annotated[str, Meta(description="Set by the service on `published`: the Kafka command topic.")] | None = None
    partition: (
        Annotated[int, Meta(ge=0, lt=2**31, description="Set by the service on `published`: the Kafka partition.")]
        | None
    ) = None
    offset: (
        Annotated[int, Meta(ge=0, le=2**63 - 1, description="Set by the service on `published`: the Kafka offset.")]
        | None
    ) = None
    error: Annotated[str, Meta(max_length=2000, description="Why it failed, was rejected or expired.")] | None = None
    result: Annotated[dict[str, Any], Meta(description="What the device answered.")] | None = None
    owner: Annotated[str, Meta(description="The API key id that sent it (set by the service).")] | None = None
    idempotency_key: (
        Annotated[str, Meta(description="Set by the service, so a retry at another instance replays.")] | None
    ) = None
    body_hash: Annotated[str, Meta(description="Set by the service: hex SHA-256 of the accepted body.")] | None = None
    not_before: Annotated[datetime, Meta(tz=True, description="Set by the service: when it is due.")] | None = None
    fanout_id: Annotated[str, Meta(max_length=128, description="Set by the service: its fan-out.")] | None = None
    superseded_by: (
        Annotated[str, Meta(max_length=128, description="Set by the service on `superseded`: the replacing command.")]
        | None
    ) = None


STATUS_EVENT_DECODER = msgspec.json.Decoder(StatusEvent)


def status_event_schema() -> dict[str, Any]:
    """The status topic's event contract as a JSON Schema (the file in contract/ is this, written out)."""
    schema = msgspec.json.schema(StatusEvent)
    body = schema["$defs"]["StatusEvent"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://preservarium.dev/pusher/status-event.schema.json",
        **body,
        "title": "Preservarium Pusher status event",
    }


class Readiness(Struct, kw_only=True, omit_defaults=True):
    """Readiness: the journal accepts commands (Kafka may be down: they are stored and forwarded).

    With API keys on, topic, partitions and backlog are shown only when METRICS_PUBLIC is true."""

    ready: bool
    kafka_connected: bool
    journal_writable: bool
    reason: str | None = None
    topic: str | None = None
    partitions: int | None = None
    backlog: int | None = None


class Counters(Struct, kw_only=True):
    """Command counters since the process started, and the backlog now."""

    commands_accepted: int = 0
    commands_processed: int = 0
    commands_failed: int = 0
    commands_expired: int = 0
    commands_rejected: int = 0
    commands_replayed: int = 0
    commands_cancelled: int = 0
    commands_superseded: int = 0
    backlog: int = 0
    oldest_pending_age_seconds: float | None = None
    publish_latency_ms_avg: float = 0.0


class StatusFeedState(Struct, kw_only=True):
    """The status topic as this instance sees it (counts since start)."""

    topic: str
    consuming: bool
    events_published: int
    events_applied: int
    events_ignored: int


class ServiceStatus(Struct, kw_only=True):
    """Detailed service status."""

    service: str
    version: str
    kafka_connected: bool
    journal_writable: bool
    uptime_seconds: float
    commands_processed: int
    commands_failed: int
    backlog: int
    oldest_pending_age_seconds: float | None
    last_error: str | None
    last_error_at: datetime | None
    command_topic: str
    partitions: int | None
    brokers: int = 0
    status_feed: StatusFeedState | None = None
    configuration: dict[str, Any] | None = None  # for an admin key, or when keys are off


class CommandMessage(Struct, kw_only=True):
    """The Kafka record value the MQTT and CoAP connectors read (every key always present, but `fanout_id`: only in
    the commands of a fan-out)."""

    request_id: str
    device_id: str
    command_type: str
    payload: dict[str, Any]
    protocol: str
    parser_script_ref: str | None
    metadata: dict[str, Any]
    timestamp: datetime
    expires_at: datetime | None = None
    fanout_id: str | msgspec.UnsetType = msgspec.UNSET


class StatusQuery(Struct, forbid_unknown_fields=True):
    """The query of GET /api/v1/commands/{request_id}/status: without `wait_for` it answers at once."""

    wait_for: (
        Annotated[Status, Meta(description="Answer once the command reaches this stage, a later one or an end.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    timeout: Annotated[
        float, Meta(ge=0, le=3600, description="Seconds a `wait_for` may hold the request (cut to LONG_POLL_MAX).")
    ] = 30.0


class ListQuery(Struct, forbid_unknown_fields=True):
    """The query of GET /api/v1/commands: optional filters, and the page."""

    # UNSET, not None: a lax conversion would read the text "null" as None, i.e. as "no filter".
    device_id: DeviceId | msgspec.UnsetType = msgspec.UNSET
    status: Status | msgspec.UnsetType = msgspec.UNSET
    fanout_id: (
        Annotated[str, Meta(min_length=1, max_length=128, description="Only the commands of this fan-out.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    limit: Annotated[int, Meta(ge=1, le=500)] = 50
    before: (
        Annotated[int, Meta(ge=1, le=2**63 - 1, description="`next_before` of the previous page.")] | msgspec.UnsetType
    ) = msgspec.UNSET


# Seconds between the comment lines that keep an idle event stream open through proxies.
SSE_KEEPALIVE = 15.0
JSON_ENCODER = msgspec.json.Encoder()
MSGPACK_ENCODER = msgspec.msgpack.Encoder()
