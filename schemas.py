"""Every request, response, problem and Kafka message as a msgspec Struct, their codecs, and the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

VERSION = "1.0.0"

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
Status = Literal["accepted", "published", "delivered", "succeeded", "failed", "rejected", "expired"]
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
}
TERMINAL = frozenset(s for s, rank in STAGE_RANK.items() if rank == 3)
# What a connector may report on the status topic (unsigned): the stages after Kafka.
CONNECTOR_STAGES = frozenset(s for s, rank in STAGE_RANK.items() if rank >= 2)
MAX_TTL = 30 * 86400
PROTOCOL_OPTIONS = {"qos": "mqtt", "retain": "mqtt", "confirmable": "coap"}


def from_epoch(epoch: float | None) -> datetime | None:
    """Seconds since the epoch as an aware UTC datetime (None stays None)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


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


class BatchCommandRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """Several commands, validated and published one by one, in order."""

    commands: list[CommandRequest]


class _MetadataOptions(Struct):
    """The keys of `metadata` that connectors act on, typed; every other key passes as it is."""

    topic: str | msgspec.UnsetType = msgspec.UNSET
    qos: Qos | msgspec.UnsetType = msgspec.UNSET
    retain: bool | msgspec.UnsetType = msgspec.UNSET
    confirmable: bool | msgspec.UnsetType = msgspec.UNSET


class _BatchEnvelope(Struct, forbid_unknown_fields=True):
    """The batch body with items left undecoded, so that each item is validated on its own."""

    commands: list[msgspec.Raw]


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
    request_id: str | None = None
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
    replayed: bool = False
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


class StatusChange(Struct, kw_only=True, omit_defaults=True):
    """One transition, as GET /api/v1/commands/{request_id}/events streams it (the SSE `data`)."""

    request_id: str
    status: Status
    at: datetime
    detail: str | None = None
    result: dict[str, Any] | None = None


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


class CommandList(Struct, kw_only=True):
    """A page of commands, newest first; pass `next_before` as `before` for the next page."""

    items: list[CommandStatus]
    next_before: int | None = None


class Health(Struct):
    """Liveness: the process answers."""

    status: Literal["healthy"]


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
    """The Kafka record value the MQTT and CoAP connectors read (every key always present)."""

    request_id: str
    device_id: str
    command_type: str
    payload: dict[str, Any]
    protocol: str
    parser_script_ref: str | None
    metadata: dict[str, Any]
    timestamp: datetime
    expires_at: datetime | None = None


JSON_ENCODER = msgspec.json.Encoder()
MSGPACK_ENCODER = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------- OpenAPI 3.1

PLAN_EXAMPLE = {
    "device_id": "efento_device_001",
    "command_type": "config_update",
    "payload": {"measurement_interval": 600},
    "protocol": "coap",
    "parser_script_ref": "efento_bidirectional_parser.py",
}
PLAN_BATCH_EXAMPLE = {
    "commands": [
        {
            "device_id": "device_001",
            "command_type": "reboot",
            "payload": {},
            "protocol": "coap",
            "parser_script_ref": "device_parser.py",
        },
        {
            "device_id": "device_002",
            "command_type": "update",
            "payload": {"version": "1.2.3"},
            "protocol": "mqtt",
            "parser_script_ref": "mqtt_parser.py",
            "metadata": {"topic": "devices/device_002/commands"},
        },
    ]
}

_SCHEMA_TYPES = (
    CommandRequest,
    BatchCommandRequest,
    CommandResponse,
    BatchCommandResponse,
    CommandStatus,
    CommandList,
    Problem,
    Health,
    Readiness,
    ServiceStatus,
    Counters,
    CommandMessage,
    StatusChange,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}
_BODY_ERRORS = {
    "400": _problem("Malformed body (not JSON / MessagePack), with the byte position"),
    "413": _problem("Body larger than MAX_BODY_BYTES"),
    "415": _problem("Content-Type is not application/json or application/msgpack"),
    "422": _problem("Validation failed; `errors` lists each field by path"),
}


def _body(name: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": _ref(name), "example": example},
            "application/msgpack": {"schema": _ref(name)},
        },
    }


def openapi_document(
    api_key_header: str | None = None,
    rate_limited: bool = False,
    allowed_protocols: tuple[str, ...] = ("mqtt", "coap"),
    max_batch: int = 500,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document, built from the Structs above and the settings that narrow them."""
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template="#/components/schemas/{name}")
    components["CommandRequest"]["properties"]["protocol"] = {"enum": list(allowed_protocols)}
    components["BatchCommandRequest"]["properties"]["commands"] |= {"minItems": 1, "maxItems": max_batch}
    unavailable = {
        **_problem(
            "Not stored: the journal is full or cannot be written, or LIMIT_CONCURRENCY requests are in flight; "
            "retrying with the same key is safe"
        ),
        "headers": _RETRY_AFTER,
    }
    replayed = {
        "Idempotent-Replayed": {
            "description": "`true` when this answers a repeated request",
            "schema": {"type": "string"},
        }
    }
    send_parameters = [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "Retrying with the same key never publishes twice (kept JOURNAL_RETENTION); "
            "the same key with another body is a 409. In a batch each item is keyed by the key and its index.",
            "schema": {"type": "string", "maxLength": 255},
        },
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": "`respond-async` (RFC 7240): answer 202 right after the journal commit.",
            "schema": {"type": "string"},
        },
    ]
    paths: dict[str, Any] = {
        "/api/v1/commands": {
            "post": {
                "operationId": "pushCommand",
                "summary": "Push a single command to a device",
                "tags": ["commands"],
                "parameters": send_parameters,
                "requestBody": _body("CommandRequest", PLAN_EXAMPLE),
                "responses": {
                    "200": {
                        **_json("CommandResponse", "Published: Kafka acknowledged it (acks=all)"),
                        "headers": replayed,
                    },
                    "202": {
                        **_json("CommandResponse", "Stored in the journal (fsynced); published when Kafka acks"),
                        "headers": replayed,
                    },
                    **_BODY_ERRORS,
                    "409": _problem("The Idempotency-Key or request_id was used with a different body"),
                    "502": _problem("Kafka refused the command for good; its status is `failed`"),
                    "503": unavailable,
                },
            },
            "get": {
                "operationId": "listCommands",
                "summary": "Recent commands, newest first (optionally one device's, one status)",
                "tags": ["commands"],
                "parameters": [
                    {"name": "device_id", "in": "query", "required": False, "schema": {"type": "string"}},
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": list(STAGE_RANK)},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "required": False,
                        "description": "`next_before` of the previous page",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                    },
                ],
                "responses": {"200": _json("CommandList", "A page of commands"), "422": _BODY_ERRORS["422"]},
            },
        },
        "/api/v1/commands/batch": {
            "post": {
                "operationId": "pushCommandsBatch",
                "summary": "Push several commands; each item is validated and published on its own, in order",
                "tags": ["commands"],
                "parameters": send_parameters,
                "requestBody": _body("BatchCommandRequest", PLAN_BATCH_EXAMPLE),
                "responses": {
                    "200": _json("BatchCommandResponse", "Every command was published"),
                    "202": _json("BatchCommandResponse", "Every command was stored; some are not in Kafka yet"),
                    "207": _json("BatchCommandResponse", "Some commands failed; see each result"),
                    **_BODY_ERRORS,
                    "503": unavailable,
                },
            }
        },
        "/api/v1/commands/{request_id}/status": {
            "get": {
                "operationId": "getCommandStatus",
                "summary": "A command's current status and every transition; with `wait_for`, a long poll",
                "description": "With `wait_for`, the answer comes as soon as the command reaches that stage, a "
                "later one or an end (`failed`, `rejected`, `expired`), or after `timeout` seconds with the status "
                "it has then. `delivered`, `succeeded` and `rejected` come from connectors through the status topic "
                "(KAFKA_STATUS_TOPIC); without it, waiting for them is a 422.",
                "tags": ["commands"],
                "parameters": [
                    {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "wait_for", "in": "query", "required": False, "schema": {"enum": list(STAGE_RANK)}},
                    {
                        "name": "timeout",
                        "in": "query",
                        "required": False,
                        "description": "Seconds a `wait_for` may hold the request (longer is cut to LONG_POLL_MAX, 60)",
                        "schema": {"type": "number", "minimum": 0, "maximum": 3600, "default": 30},
                    },
                ],
                "responses": {
                    "200": _json("CommandStatus", "Known command"),
                    "404": _problem("Unknown request id"),
                    "422": _problem("Bad wait_for or timeout"),
                    "429": {
                        **_problem("MAX_WAITERS_PER_KEY waits are open for this key (or over RATE_LIMIT)"),
                        "headers": _RETRY_AFTER,
                    },
                    "503": {
                        **_problem("LIMIT_CONCURRENCY requests in flight, or MAX_WAITERS waits open"),
                        "headers": _RETRY_AFTER,
                    },
                },
            }
        },
        "/api/v1/commands/{request_id}/events": {
            "get": {
                "operationId": "streamCommandEvents",
                "summary": "Server-Sent Events: one per transition as it happens; the stream ends after the last",
                "description": "Each event has `id` and `event` set to the status and `data` a StatusChange. "
                "A reconnect with `Last-Event-ID` resumes after that stage. A comment line every 15 s keeps "
                "proxies from closing an idle stream. Without a status topic `published` is the last stage; a "
                "stream lasts EVENT_STREAM_MAX seconds at most.",
                "tags": ["commands"],
                "parameters": [
                    {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "The event stream",
                        # Each event as a whole (SSE fields); `data` holds a StatusChange as JSON.
                        "content": {
                            "text/event-stream": {
                                "schema": {
                                    "type": "object",
                                    "required": ["id", "event", "data"],
                                    "properties": {
                                        "id": {"enum": list(STAGE_RANK)},
                                        "event": {"enum": list(STAGE_RANK)},
                                        "data": {
                                            "type": "string",
                                            "contentMediaType": "application/json",
                                            "contentSchema": _ref("StatusChange"),
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "404": _problem("Unknown request id"),
                    "429": {
                        **_problem("MAX_WAITERS_PER_KEY waits are open for this key (or over RATE_LIMIT)"),
                        "headers": _RETRY_AFTER,
                    },
                    "503": {
                        **_problem("LIMIT_CONCURRENCY requests in flight, or MAX_WAITERS waits open"),
                        "headers": _RETRY_AFTER,
                    },
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness",
                "tags": ["health"],
                "responses": {"200": _json("Health", "The process answers")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: the journal accepts commands (says whether Kafka is reachable)",
                "tags": ["health"],
                "responses": {
                    "200": _json("Readiness", "Ready"),
                    "503": _json("Readiness", "Not ready, with the reason"),
                },
            }
        },
        "/api/v1/status": {
            "get": {
                "operationId": "serviceStatus",
                "summary": "Detailed service status",
                "tags": ["health"],
                "responses": {"200": _json("ServiceStatus", "Status")},
            }
        },
        "/api/v1/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Service counters and backlog as JSON",
                "tags": ["health"],
                "responses": {"200": _json("Counters", "Counters since start")},
            }
        },
    }
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.setdefault("500", _problem("Unexpected error; fixed body, details in the log"))
            responses.setdefault("431", _problem("Request headers over MAX_HEADER_BYTES"))
            if path not in ("/health", "/ready"):  # the probes are never refused for load
                responses.setdefault(
                    "503", {**_problem("LIMIT_CONCURRENCY requests are in flight"), "headers": _RETRY_AFTER}
                )
            if operation.get("requestBody"):
                responses.setdefault("408", _problem("The body did not arrive within BODY_TIMEOUT"))
            if path in ("/health", "/ready") or not api_key_header:
                operation["security"] = []
            else:
                responses.setdefault("401", {**_problem("No valid API key"), "headers": _WWW_AUTHENTICATE})
                responses.setdefault("403", _problem("The key lacks the scope, or may not command this device"))
            if rate_limited and path.startswith("/api/v1/commands"):
                responses.setdefault("429", {**_problem("Over RATE_LIMIT"), "headers": _RETRY_AFTER})
    security_schemes = {}
    if api_key_header:
        security_schemes = {
            "apiKey": {"type": "apiKey", "in": "header", "name": api_key_header},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Preservarium Pusher API",
            "version": VERSION,
            "description": "Send commands to IoT devices over HTTP; they are published to Kafka for the "
            "MQTT and CoAP connectors. Errors are RFC 9457 application/problem+json.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": security_schemes},
        "security": [{"apiKey": []}, {"bearer": []}] if api_key_header else [],
    }
