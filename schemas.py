"""Every request, response, problem and Kafka message as a msgspec Struct, their codecs, and the OpenAPI document."""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

import mqtt_topics
from errors import FieldProblem, MalformedBody, PusherError, ValidationFailed

# The wire types the client shares are defined once, in pusher_client.wire; the server's modules import them from
# here, beside the server's own types below.
from pusher_client.wire import (
    MAX_TTL,
    STAGE_RANK,
    TERMINAL,  # noqa: F401 (re-exported)
    VERSION,
    BatchCommandRequest,
    BatchCommandResponse,
    CommandList,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    CommandType,
    DeviceId,
    FieldError,
    Health,
    Problem,
    Qos,
    RequestId,
    Status,
    StatusChange,
    Transition,  # noqa: F401 (re-exported)
)

# What a connector may report on the status topic (unsigned): the stages after Kafka.
CONNECTOR_STAGES = frozenset(s for s, rank in STAGE_RANK.items() if rank >= 2)
PROTOCOL_OPTIONS = {"qos": "mqtt", "retain": "mqtt", "confirmable": "coap"}
_INT64 = 2**63


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


def problem_for(error: BaseException, request_id: str | None = None, instance: str | None = None) -> Problem:
    """The problem+json body for an error; anything not ours gets the fixed 500 body."""
    if not isinstance(error, PusherError):
        error = PusherError("An unexpected error occurred; the log has the details under this request id")
    errors = getattr(error, "errors", None)
    return Problem(
        type=f"/problems/{error.slug}",
        title=error.title,
        status=error.status,
        detail=error.detail,
        instance=instance,
        request_id=request_id,
        errors=[FieldError(loc=e.loc, msg=e.msg) for e in errors] if errors else None,
    )


JSON_ENCODER = msgspec.json.Encoder()
MSGPACK_ENCODER = msgspec.msgpack.Encoder()
_DECODERS = {
    "json": {
        CommandRequest: msgspec.json.Decoder(CommandRequest),
        _BatchEnvelope: msgspec.json.Decoder(_BatchEnvelope),
    },
    "msgpack": {
        CommandRequest: msgspec.msgpack.Decoder(CommandRequest),
        _BatchEnvelope: msgspec.msgpack.Decoder(_BatchEnvelope),
    },
}


def _decode(body: bytes, kind: type, fmt: str, prefix: str = "$") -> Any:
    """Decode `body` as `kind`; malformed → MalformedBody, wrong shape → ValidationFailed."""
    try:
        return _DECODERS[fmt][kind].decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed([field_problem(str(exc), prefix)]) from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(_malformed_detail(str(exc), fmt)) from None
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"Body is not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise MalformedBody("Body is nested too deeply") from None


def _malformed_detail(message: str, fmt: str) -> str:
    if message == "Input data was truncated":
        return "Body is empty or truncated"
    return message.replace("JSON is malformed", "Body is not valid JSON").replace(
        "MessagePack data is malformed", "Body is not valid MessagePack"
    )


_PATH = re.compile(r"^(?P<msg>.*?)(?: - at (?:`key` in )?`(?P<loc>\$[^`]*)`)?$", re.S)


_PATTERN_HINTS = {
    "parser_script_ref": "Must be a plain file name: no '/', '\\', '..' or control characters",
    "request_id": "Only letters, digits and . _ ~ : - are allowed",
    "protocol": "Only lowercase letters, digits, '_' and '-' are allowed",
}


def field_problem(message: str, prefix: str) -> FieldProblem:
    """Split msgspec's 'msg - at `$.path`' and root the path at `prefix`."""
    match = _PATH.match(message)
    msg, loc = match["msg"], match["loc"] or "$"
    if "matching regex" in msg:
        msg = _PATTERN_HINTS.get(loc.rsplit(".", 1)[-1], "Must not contain control characters")
    if msg.startswith("Object contains unknown field"):
        field = msg.split("`")[1]
        loc, msg = f"{loc}.{field}", "Unknown field"
    elif msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        loc, msg = f"{loc}.{field}", "Field required"
    return FieldProblem(loc=prefix + loc[1:], msg=msg)


def decode_command(body: bytes, fmt: str) -> CommandRequest:
    """Decode one command body (JSON or msgpack)."""
    return _decode(body, CommandRequest, fmt)


def decode_batch(body: bytes, fmt: str) -> list[msgspec.Raw]:
    """Decode the batch envelope only; its items stay raw for item-by-item validation."""
    return _decode(body, _BatchEnvelope, fmt).commands


def decode_batch_item(raw: msgspec.Raw, fmt: str, index: int) -> CommandRequest:
    """Decode one raw batch item; error paths read `$.commands[index]…`."""
    return _decode(bytes(raw), CommandRequest, fmt, prefix=f"$.commands[{index}]")


def check_command(
    cmd: CommandRequest,
    allowed_protocols: tuple[str, ...],
    max_depth: int,
    prefix: str = "$",
    topic_template: str = mqtt_topics.DEFAULT_TEMPLATE,
) -> list[FieldProblem]:
    """The rules a Struct cannot express: protocol, per-protocol options, metadata, MQTT topic, depth."""
    problems: list[FieldProblem] = []
    for field in ("device_id", "command_type"):
        value = getattr(cmd, field)
        # Format characters are never ASCII: the common case skips the per-character look-up.
        if not value.isascii() and any(unicodedata.category(ch) == "Cf" for ch in value):
            problems.append(FieldProblem(f"{prefix}.{field}", "Must not contain invisible format characters"))
    if cmd.protocol not in allowed_protocols:
        problems.append(FieldProblem(f"{prefix}.protocol", f"Must be one of: {', '.join(allowed_protocols)}"))
    metadata = cmd.metadata or {}
    for option, protocol in PROTOCOL_OPTIONS.items():
        value = getattr(cmd, option)
        if value is None:
            continue
        if cmd.protocol != protocol:
            problems.append(FieldProblem(f"{prefix}.{option}", f"Only allowed with protocol {protocol}"))
        elif option in metadata and metadata[option] != value:
            problems.append(
                FieldProblem(f"{prefix}.{option}", f"Conflicts with metadata.{option}={metadata[option]!r}")
            )
    problems.extend(_metadata_problems(cmd, topic_template, prefix))
    for field in ("payload", "metadata"):
        value = getattr(cmd, field)
        if value is not None:
            where = _find_unsafe_value(value, max_depth, f"{prefix}.{field}")
            if where:
                problems.append(where)
    expiry = expiry_problem(cmd, datetime.now(UTC), prefix)
    if expiry:
        problems.append(expiry)
    return problems


def _metadata_problems(cmd: CommandRequest, topic_template: str, prefix: str) -> list[FieldProblem]:
    """metadata's typed keys, and the MQTT topic: the device's own topic or one below it."""
    topic: Any = msgspec.UNSET
    if cmd.metadata and all(isinstance(key, str) for key in cmd.metadata):  # other keys: _find_unsafe_value
        try:
            topic = msgspec.convert(cmd.metadata, _MetadataOptions).topic
        except msgspec.ValidationError as exc:
            return [field_problem(str(exc), f"{prefix}.metadata")]
    if cmd.protocol != "mqtt" and topic is msgspec.UNSET:
        return []
    problem = mqtt_topics.device_id_problem(topic_template, cmd.device_id)
    if problem:
        return [FieldProblem(f"{prefix}.device_id", problem)]
    problem = None if topic is msgspec.UNSET else mqtt_topics.topic_problem(topic_template, cmd.device_id, topic)
    return [FieldProblem(f"{prefix}.metadata.topic", problem)] if problem else []


def _find_unsafe_value(value: Any, max_depth: int, loc: str, depth: int = 1) -> FieldProblem | None:
    """First place where `value` is not plain JSON, nests deeper than `max_depth`, or overflows 64 bits.

    JSON bodies can only hold plain JSON, but MessagePack can also carry binary, extension
    types, non-string keys and NaN; the Kafka record is JSON, so those are refused here.
    """
    if isinstance(value, dict | list):
        if depth > max_depth:
            return FieldProblem(loc, f"Nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return FieldProblem(loc, "Object keys must be strings")
                found = _find_unsafe_value(item, max_depth, f"{loc}.{key}", depth + 1)
                if found:
                    return found
        else:
            for index, item in enumerate(value):
                found = _find_unsafe_value(item, max_depth, f"{loc}[{index}]", depth + 1)
                if found:
                    return found
        return None
    if value is None or isinstance(value, str | bool):
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else FieldProblem(loc, "Integer outside the signed 64-bit range")
    if isinstance(value, float):
        return None if math.isfinite(value) else FieldProblem(loc, "Numbers must be finite (no NaN or Infinity)")
    return FieldProblem(loc, f"Not a JSON value ({type(value).__name__})")


def expiry_problem(cmd: CommandRequest, now: datetime, prefix: str = "$") -> FieldProblem | None:
    """ttl_seconds and expires_at exclude each other, and expires_at must lie ahead (at most MAX_TTL)."""
    if cmd.ttl_seconds is not None and cmd.expires_at is not None:
        return FieldProblem(f"{prefix}.expires_at", "Give ttl_seconds or expires_at, not both")
    if cmd.expires_at is not None:
        if cmd.expires_at <= now:
            return FieldProblem(f"{prefix}.expires_at", "Already in the past")
        if (cmd.expires_at - now).total_seconds() > MAX_TTL:
            return FieldProblem(f"{prefix}.expires_at", f"At most {MAX_TTL} seconds ahead")
    return None


def merged_metadata(cmd: CommandRequest) -> dict[str, Any]:
    """The command's metadata with its protocol options (qos, retain, confirmable) folded in."""
    metadata = dict(cmd.metadata or {})
    for option in PROTOCOL_OPTIONS:
        value = getattr(cmd, option)
        if value is not None:
            metadata[option] = value
    return metadata


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
