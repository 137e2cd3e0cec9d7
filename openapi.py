"""The OpenAPI 3.1 document, built from the wire Structs and the settings that narrow them."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import (
    STAGE_RANK,
    VERSION,
    BatchCommandRequest,
    BatchCommandResponse,
    CommandList,
    CommandMessage,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    Counters,
    Health,
    Problem,
    Readiness,
    ServiceStatus,
    StatusChange,
)

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
