"""The OpenAPI 3.1 document, derived rather than restated.

Its paths and methods are the app's route table; its query parameters are the Structs that validate the query
(their msgspec JSON Schema); its bodies and answers are the wire Structs, narrowed by the settings. What a route
cannot say of itself (summary, headers, answers) is in OPERATIONS, one entry per handler, keyed by its name.
A route without an entry stops the app from being built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.convertors import FloatConvertor, IntegerConvertor
from starlette.routing import BaseRoute, Route

from admission import PROBES
from schemas import (
    SSE_KEEPALIVE,
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
    FanoutRequest,
    FanoutResponse,
    FanoutStatus,
    Health,
    ListQuery,
    Problem,
    Readiness,
    ServiceStatus,
    StatusChange,
    StatusQuery,
)

if TYPE_CHECKING:
    from settings import Settings

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

PLAN_FANOUT_EXAMPLE = {
    "device_ids": ["thermostat_001", "thermostat_002", "thermostat_003"],
    "command_type": "set_temperature",
    "payload": {"setpoint": 21.5},
    "protocol": "mqtt",
    "coalesce_key": "setpoint",
}

_SCHEMA_TYPES = (
    CommandRequest,
    BatchCommandRequest,
    FanoutRequest,
    FanoutResponse,
    FanoutStatus,
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


_UNAVAILABLE = {
    **_problem(
        "Not stored: the journal is full or cannot be written, or LIMIT_CONCURRENCY requests are in flight; "
        "retrying with the same key is safe"
    ),
    "headers": _RETRY_AFTER,
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when this answers a repeated request",
        "schema": {"type": "string"},
    }
}
_SEND_PARAMETERS = [
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
_WAITERS = {
    "429": {
        **_problem("MAX_WAITERS_PER_KEY waits are open for this key (or over RATE_LIMIT)"),
        "headers": _RETRY_AFTER,
    },
    "503": {
        **_problem("LIMIT_CONCURRENCY requests in flight, or MAX_WAITERS waits open"),
        "headers": _RETRY_AFTER,
    },
}


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _plain(operation_id: str, tag: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    """An operation without parameters or body whose answer is `ok` (200)."""
    return {"operationId": operation_id, "summary": summary, "tags": [tag], "responses": {"200": ok}}


# Per handler (the route's name): what the route table cannot say. `query` names the Struct that validates the
# query string; its fields become the query parameters.
OPERATIONS: dict[str, dict[str, Any]] = {
    "push_command": {
        "operationId": "pushCommand",
        "summary": "Push a single command to a device",
        "tags": ["commands"],
        "parameters": _SEND_PARAMETERS,
        "requestBody": _body("CommandRequest", PLAN_EXAMPLE),
        "responses": {
            "200": {**_json("CommandResponse", "Published: Kafka acknowledged it (acks=all)"), "headers": _REPLAYED},
            "202": {
                **_json("CommandResponse", "Stored in the journal (fsynced); published when Kafka acks"),
                "headers": _REPLAYED,
            },
            **_BODY_ERRORS,
            "409": _problem("The Idempotency-Key or request_id was used with a different body"),
            "502": _problem("Kafka refused the command for good; its status is `failed`"),
            "503": _UNAVAILABLE,
        },
    },
    "list_commands": {
        "operationId": "listCommands",
        "summary": "Recent commands, newest first (optionally one device's, one status)",
        "tags": ["commands"],
        "query": ListQuery,
        "responses": {"200": _json("CommandList", "A page of commands"), "422": _BODY_ERRORS["422"]},
    },
    "push_commands_batch": {
        "operationId": "pushCommandsBatch",
        "summary": "Push several commands; each item is validated and published on its own, in order",
        "tags": ["commands"],
        "parameters": _SEND_PARAMETERS,
        "requestBody": _body("BatchCommandRequest", PLAN_BATCH_EXAMPLE),
        "responses": {
            "200": _json("BatchCommandResponse", "Every command was published"),
            "202": _json("BatchCommandResponse", "Every command was stored; some are not in Kafka yet"),
            "207": _json("BatchCommandResponse", "Some commands failed; see each result"),
            **_BODY_ERRORS,
            "503": _UNAVAILABLE,
        },
    },
    "push_fanout": {
        "operationId": "pushFanout",
        "summary": "Push one command to many devices: one command each, journaled together, all or none",
        "description": "Each device gets an ordinary command of its own (its own request_id; its Kafka record "
        "carries the `fanout_id`). The answer comes once all are journaled, never waiting for Kafka; follow it at "
        "the Location (GET /api/v1/fanouts/{fanout_id}) or list its commands with `?fanout_id=`. The key must be "
        "allowed every device (403 names the refused ones, nothing is stored); RATE_LIMIT counts one unit per device.",
        "tags": ["commands"],
        "parameters": _SEND_PARAMETERS[:1],
        "requestBody": _body("FanoutRequest", PLAN_FANOUT_EXAMPLE),
        "responses": {
            "202": {
                **_json(
                    "FanoutResponse", "Every command stored in the journal (fsynced); each published when Kafka acks"
                ),
                "headers": _REPLAYED
                | {"Location": {"description": "Where the fan-out is followed", "schema": {"type": "string"}}},
            },
            **_BODY_ERRORS,
            "409": _problem("The Idempotency-Key or fanout_id was used with a different body"),
            "503": _UNAVAILABLE,
        },
    },
    "get_fanout": {
        "operationId": "getFanout",
        "summary": "A fan-out: how many of its commands are in each status, and whether every one has ended",
        "tags": ["commands"],
        "responses": {"200": _json("FanoutStatus", "Known fan-out"), "404": _problem("Unknown fanout_id")},
    },
    "cancel_command": {
        "operationId": "cancelCommand",
        "summary": "Cancel a command still waiting in the journal (never sent)",
        "description": "200 with status `cancelled` if it had not been handed to Kafka yet; a repeat answers the "
        "same. 409 names its status once it was handed to Kafka (or ended otherwise: expired, superseded).",
        "tags": ["commands"],
        "responses": {
            "200": _json("CommandStatus", "Cancelled: it will never be sent"),
            "404": _problem("Unknown request id"),
            "409": _problem("Already handed to Kafka, or already ended; `detail` names its status"),
        },
    },
    "get_command_status": {
        "operationId": "getCommandStatus",
        "summary": "A command's current status and every transition; with `wait_for`, a long poll",
        "description": "With `wait_for`, the answer comes as soon as the command reaches that stage, a "
        "later one or an end (`failed`, `rejected`, `expired`), or after `timeout` seconds with the status "
        "it has then. `delivered`, `succeeded` and `rejected` come from connectors through the status topic "
        "(KAFKA_STATUS_TOPIC); without it, waiting for them is a 422.",
        "tags": ["commands"],
        "query": StatusQuery,
        "responses": {
            "200": _json("CommandStatus", "Known command"),
            "404": _problem("Unknown request id"),
            "422": _problem("Bad wait_for or timeout"),
            **_WAITERS,
        },
    },
    "command_events": {
        "operationId": "streamCommandEvents",
        "summary": "Server-Sent Events: one per transition as it happens; the stream ends after the last",
        "description": "Each event has `id` and `event` set to the status and `data` a StatusChange. "
        f"A reconnect with `Last-Event-ID` resumes after that stage. A comment line every {SSE_KEEPALIVE:g} s "
        "keeps proxies from closing an idle stream. Without a status topic `published` is the last stage; a "
        "stream lasts EVENT_STREAM_MAX seconds at most.",
        "tags": ["commands"],
        "parameters": [{"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}}],
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
            **_WAITERS,
        },
    },
    "health": _plain("health", "health", "Liveness", _json("Health", "The process answers")),
    "ready": {
        "operationId": "ready",
        "summary": "Readiness: the journal accepts commands (says whether Kafka is reachable)",
        "tags": ["health"],
        "responses": {"200": _json("Readiness", "Ready"), "503": _json("Readiness", "Not ready, with the reason")},
    },
    "service_status": _plain("serviceStatus", "health", "Detailed service status", _json("ServiceStatus", "Status")),
    "metrics": _plain(
        "metrics", "health", "Service counters and backlog as JSON", _json("Counters", "Counters since start")
    ),
    "prometheus_metrics": _plain(
        "prometheusMetrics",
        "health",
        "Every metric in the Prometheus text format, for a scraper",
        _text("text/plain", "Prometheus exposition format"),
    ),
    "openapi": _plain(
        "openapi",
        "docs",
        "This document",
        {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
    ),
    "docs": _plain("docs", "docs", "Interactive API docs (Swagger UI)", _text("text/html", "The docs page")),
    "docs_init": _plain("docsInit", "docs", "The docs page's start-up script", _text("text/javascript", "JavaScript")),
}


def _query_parameters(query: type[msgspec.Struct]) -> list[dict[str, Any]]:
    """A query Struct's fields as OpenAPI query parameters, each with the field's msgspec JSON Schema."""
    _, components = msgspec.json.schema_components([query], ref_template="#/components/schemas/{name}")
    schema = components[query.__name__]
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in schema["properties"].items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": field_schema}
        if "description" in field_schema:
            parameter["description"] = field_schema["description"]
        parameters.append(parameter)
    return parameters


def _path_parameters(route: Route) -> list[dict[str, Any]]:
    """The route's `{name}` segments, typed by their Starlette convertor."""
    types = {IntegerConvertor: "integer", FloatConvertor: "number"}
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": types.get(type(convertor), "string")}}
        for name, convertor in route.param_convertors.items()
    ]


def _operation(route: Route) -> dict[str, Any]:
    """The route's entry of OPERATIONS as an OpenAPI operation, its parameters completed from the route."""
    operation = copy.deepcopy(OPERATIONS[route.name])
    query = operation.pop("query", None)
    parameters = _path_parameters(route) + (_query_parameters(query) if query else [])
    parameters += operation.get("parameters", [])
    if parameters:
        operation["parameters"] = parameters
    return operation


def openapi_document(routes: Iterable[BaseRoute], settings: Settings, open_paths: frozenset[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (Starlette's route table; mounts are not operations), narrowed by
    the settings; with API keys on, `open_paths` are the paths served without one."""
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template="#/components/schemas/{name}")
    components["CommandRequest"]["properties"]["protocol"] = {"enum": list(settings.allowed_protocols)}
    components["BatchCommandRequest"]["properties"]["commands"] |= {"minItems": 1, "maxItems": settings.max_batch}
    components["FanoutRequest"]["properties"]["protocol"] = {"enum": list(settings.allowed_protocols)}
    components["FanoutRequest"]["properties"]["device_ids"] |= {"maxItems": settings.max_fanout, "uniqueItems": True}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):  # the docs' static files
            continue
        for method in sorted(route.methods - {"HEAD"}):  # Starlette answers HEAD wherever GET is
            path, operation = route.path, _operation(route)
            paths.setdefault(path, {})[method.lower()] = operation
            responses = operation["responses"]
            responses.setdefault("500", _problem("Unexpected error; fixed body, details in the log"))
            responses.setdefault("431", _problem("Request headers over MAX_HEADER_BYTES"))
            if path not in PROBES:  # the probes are never refused for load
                responses.setdefault(
                    "503", {**_problem("LIMIT_CONCURRENCY requests are in flight"), "headers": _RETRY_AFTER}
                )
            if operation.get("requestBody"):
                responses.setdefault("408", _problem("The body did not arrive within BODY_TIMEOUT"))
            if settings.auth and path in open_paths:
                operation["security"] = []
            elif settings.auth:
                responses.setdefault("401", {**_problem("No valid API key"), "headers": _WWW_AUTHENTICATE})
                responses.setdefault("403", _problem("The key lacks the scope, or may not command this device"))
            if settings.rate_limit and path.startswith("/api/v1/commands"):
                responses.setdefault("429", {**_problem("Over RATE_LIMIT"), "headers": _RETRY_AFTER})
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Preservarium Pusher API",
            "version": VERSION,
            "description": "Send commands to IoT devices over HTTP; they are published to Kafka for the "
            "MQTT and CoAP connectors. Errors are RFC 9457 application/problem+json.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    # Without keys there is no scheme at all: an empty one still makes Swagger UI show an Authorize button.
    if settings.auth:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": settings.api_key_header},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        document["security"] = [{"apiKey": []}, {"bearer": []}]
    return document
