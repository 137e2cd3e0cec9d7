"""The ASGI app: routes → thin handlers, their shared state, and the lifespan that owns the journal and Kafka.

The request middleware is middleware.py; the process (uvicorn, signals, the drain) is server.py. Run it with
`make run`, `python -m pusher`, or `uvicorn pusher:app`; importing this module builds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from admission import Admission, Bell, Waiter
from dispatch import Dispatcher, Watchers, command_status, finished, reached
from errors import (
    FieldProblem,
    Forbidden,
    JournalError,
    MethodNotAllowed,
    NotFound,
    PusherError,
    RequestError,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from forwarder import Forwarder
from journal import SERVICE_SOURCE, Journal, JournalRow
from kafka_sink import KafkaSink
from metrics import Metrics
from middleware import RequestContextMiddleware, problem_response
from openapi import openapi_document
from schemas import (
    JSON_ENCODER,
    MSGPACK_ENCODER,
    SSE_KEEPALIVE,
    STAGE_RANK,
    TERMINAL,
    VERSION,
    CommandList,
    CommandRequest,
    FanoutStatus,
    Health,
    ListQuery,
    Readiness,
    ServiceStatus,
    StatusChange,
    StatusFeedState,
    StatusQuery,
    from_epoch,
)
from security import ApiKey, ApiKeyMiddleware, Keyring, RateLimiter, require
from settings import Settings, load_settings
from status_feed import StatusFeed
from validation import (
    check_command,
    check_fanout,
    decode_batch,
    decode_batch_item,
    decode_command,
    decode_fanout,
    fanout_children,
    field_problem,
)

log = structlog.get_logger("pusher")

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_JSON_TYPES = {"application/json"}
_MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}


class JSONResponse(Response):
    """A response encoded with the shared msgspec encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """The content as JSON bytes."""
        return JSON_ENCODER.encode(content)


def _answer_type(request: Request) -> str:
    """The media type of a command, status or list answer: a MessagePack type the Accept header names with a
    higher q than application/json, else JSON (wildcards say "anything": a MessagePack type named beside them
    wins; an Accept naming neither still gets JSON, never a 406)."""
    accept = request.headers.get("accept", "")
    if "msgpack" not in accept:  # nearly every request: nothing to weigh
        return "application/json"
    json_q = msgpack_q = 0.0
    msgpack_type: str | None = None
    for part in accept.split(","):
        media_type, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media_type = media_type.lower()
        if media_type in _MSGPACK_TYPES and q > msgpack_q:
            msgpack_type, msgpack_q = media_type, q
        elif media_type in _JSON_TYPES:
            json_q = max(json_q, q)
    return msgpack_type if msgpack_type and msgpack_q > json_q else "application/json"


def _answer(request: Request, content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A command, status or list answer, in MessagePack when the Accept header prefers it, else in JSON (problems
    stay problem+json)."""
    media_type = _answer_type(request)
    encoder = JSON_ENCODER if media_type == "application/json" else MSGPACK_ENCODER
    return Response(encoder.encode(content), status, {**(headers or {}), "Vary": "Accept"}, media_type)


_STATUS_ROUTE = "/api/v1/commands/{request_id}/status"


def _status_path(request: Request, request_id: str) -> str:
    """Where the status of command `request_id` is read (a 202's Location). Filled in, not looked up with
    `url_path_for`, which walks every route on every 202; ids hold no character a path must escape."""
    return request.scope.get("root_path", "") + _STATUS_ROUTE.format(request_id=request_id)


# ---------------------------------------------------------------- handlers


def _body_format(request: Request) -> str:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in _JSON_TYPES or media_type.endswith("+json"):
        return "json"
    if media_type in _MSGPACK_TYPES:
        return "msgpack"
    raise UnsupportedMediaType(
        f"Content-Type {media_type or '(none)'!r} is not supported; send application/json or application/msgpack"
    )


def _traceparent(request: Request) -> str:
    """The caller's W3C traceparent, or a new one, so every command can be traced into Kafka."""
    value = request.headers.get("traceparent", "").strip().lower()
    if _TRACEPARENT.fullmatch(value):
        return value
    # Trace ids need to be unique, not secret: the fast generator, not a system call per id.
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-01"


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed(
            [FieldProblem("header Idempotency-Key", "1 to 255 visible ASCII characters (no spaces or controls)")]
        )
    return key


def _prefers_async(request: Request) -> bool:
    """RFC 7240 `Prefer: respond-async`."""
    prefs = {p.strip().split("=")[0].lower() for h in request.headers.getlist("prefer") for p in h.split(",")}
    return "respond-async" in prefs


def _dispatcher(request: Request) -> Dispatcher:
    """The send path: state(request).dispatcher."""
    return state(request).dispatcher


def _answer_headers(replayed: bool, prefer_async: bool) -> dict[str, str]:
    """The headers a command answer carries for a replay and for an honoured `Prefer: respond-async`."""
    headers = {}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if prefer_async:
        headers["Preference-Applied"] = "respond-async"
    return headers


async def push_command(request: Request) -> Response:
    """POST /api/v1/commands: validate, journal, publish; 200 published, 202 stored for later."""
    key = require(request.scope["state"], "commands:write")
    limits = await _rate_limit(request, key, 1)  # charged before any work, so refused requests count too
    fmt = _body_format(request)
    dispatcher = _dispatcher(request)
    idem_key = _idempotency_key(request)
    cmd = decode_command(await request.body(), fmt)
    _check(cmd, dispatcher.settings)
    if key is not None and not key.may_command(cmd.device_id):
        raise Forbidden(f"This API key may not command device {cmd.device_id!r}")
    prefer_async = _prefers_async(request)
    note = request.scope["state"].setdefault("log", {})  # the command's fields join this request's log line
    answer = await dispatcher.push(cmd, idem_key, prefer_async, _traceparent(request), key.id if key else None, note)
    headers = _answer_headers(answer.response.replayed, prefer_async) | limits
    if answer.http_status == 202:  # stored, not yet in Kafka: where to follow it
        headers["Location"] = _status_path(request, answer.response.request_id)
    return _answer(request, answer.response, answer.http_status, headers)


async def push_commands_batch(request: Request) -> Response:
    """POST /api/v1/commands/batch: each item validated on its own; 200 / 202 / 207."""
    key = require(request.scope["state"], "commands:write")
    limits = await _rate_limit(request, key, 1)
    fmt = _body_format(request)
    dispatcher = _dispatcher(request)
    settings = dispatcher.settings
    idem_key = _idempotency_key(request)
    raw_items = decode_batch(await request.body(), fmt)
    if not raw_items:
        raise ValidationFailed([FieldProblem("$.commands", "Must hold at least one command")])
    if len(raw_items) > settings.max_batch:
        raise ValidationFailed([FieldProblem("$.commands", f"At most MAX_BATCH={settings.max_batch} commands")])
    items: list[CommandRequest | PusherError] = []
    for index, raw in enumerate(raw_items):
        try:
            cmd = decode_batch_item(raw, fmt, index)
            _check(cmd, settings, f"$.commands[{index}]")
            if key is not None and not key.may_command(cmd.device_id):
                raise Forbidden(f"This API key may not command device {cmd.device_id!r}")
            items.append(cmd)
        except RequestError as exc:  # counted with the batch's other refused items once it is answered
            items.append(exc)
    if len(raw_items) > 1:  # one unit per command: the first was charged on arrival
        limits = await _rate_limit(request, key, len(raw_items) - 1, spent=1)
    prefer_async = _prefers_async(request)
    body, status = await dispatcher.push_batch(
        items, idem_key, prefer_async, _traceparent(request), key.id if key else None
    )
    # No Location, even for a 202: it names one resource, and each result carries its own request_id.
    headers = _answer_headers(any(r.replayed for r in body.results), prefer_async) | limits
    return _answer(request, body, status, headers)


async def push_fanout(request: Request) -> Response:
    """POST /api/v1/commands/fanout: one command for many devices, journaled whole; 202 with the fan-out's id."""
    key = require(request.scope["state"], "commands:write")
    limits = await _rate_limit(request, key, 1)
    fmt = _body_format(request)
    dispatcher = _dispatcher(request)
    settings = dispatcher.settings
    idem_key = _idempotency_key(request)
    fanout = decode_fanout(await request.body(), fmt)
    children = fanout_children(fanout)
    problems = check_fanout(
        fanout,
        children,
        settings.allowed_protocols,
        settings.max_payload_depth,
        settings.max_fanout,
        settings.mqtt_topic_template,
    )
    if problems:
        raise ValidationFailed(problems)
    if key is not None:
        refused = [device_id for device_id in fanout.device_ids if not key.may_command(device_id)]
        if refused:
            named = ", ".join(repr(device_id) for device_id in refused[:20])
            more = f" and {len(refused) - 20} more" if len(refused) > 20 else ""
            raise Forbidden(f"This API key may not command {len(refused)} of these devices: {named}{more}")
    if len(fanout.device_ids) > 1:  # one unit per device: the first was charged on arrival
        limits = await _rate_limit(request, key, len(fanout.device_ids) - 1, "$.device_ids", spent=1)
    note = request.scope["state"].setdefault("log", {})
    body, replayed = await dispatcher.push_fanout(
        fanout, children, idem_key, _traceparent(request), key.id if key else None, note
    )
    headers = _answer_headers(replayed, False) | limits
    path = request.app.url_path_for("get_fanout", fanout_id=body.fanout_id)
    headers["Location"] = request.scope.get("root_path", "") + str(path)
    return _answer(request, body, 202, headers)


async def get_fanout(request: Request) -> Response:
    """GET /api/v1/fanouts/{fanout_id}: how many of its commands are in each status, and whether all have ended."""
    key = require(request.scope["state"], "commands:read")
    await _rate_limit(request, key, 1)
    fanout_id = request.path_params["fanout_id"]
    found = await _dispatcher(request).journal.fanout(fanout_id)
    if found is None or (key is not None and not key.allows("admin") and found[0].key_id != key.id):
        raise NotFound(f"No fan-out with fanout_id {fanout_id!r} is known")
    fanout, counts = found
    feedback = bool(state(request).settings.kafka_status_topic)
    ended = sum(n for status, n in counts.items() if status in TERMINAL or (status == "published" and not feedback))
    body = FanoutStatus(
        fanout_id=fanout.fanout_id,
        command_type=fanout.command_type,
        created_at=from_epoch(fanout.created_at),
        total=fanout.total,
        counts=counts,
        finished=ended,
        done=ended >= fanout.total,
    )
    return _answer(request, body)


async def cancel_command(request: Request) -> Response:
    """DELETE /api/v1/commands/{request_id}: cancel a command still waiting in the journal; 200 `cancelled`
    (again on a repeat), 409 once it was handed to Kafka or ended otherwise, 404 unknown or another key's."""
    key = require(request.scope["state"], "commands:write")
    await _rate_limit(request, key, 1)
    request_id = request.path_params["request_id"]
    dispatcher = _dispatcher(request)
    row = await dispatcher.read(request_id)
    if row is None or (key is not None and not key.allows("admin") and row.key_id != key.id):
        raise NotFound(f"No command with request_id {request_id!r} is known")
    return _answer(request, command_status(await dispatcher.cancel(row)))


async def _rate_limit(
    request: Request, key: ApiKey | None, cost: int, counted: str = "$.commands", spent: int = 0
) -> dict[str, str]:
    """Spend `cost` units of RATE_LIMIT for this key (or client address); RateLimit-* headers for the answer.

    `spent`: the units this request already spent on arrival. A request larger than a window as a whole can never
    fit: it is refused naming `counted` (422), never with a 429 that no retry could get past."""
    limiter = state(request).limiter
    if limiter is None:
        return {}
    return await limiter.hit(_caller(request, key), cost, counted, spent)


def _caller(request: Request, key: ApiKey | None) -> str:
    """Whom a limit counts: the key ("key:ID"), or without keys the client address ("addr:HOST")."""
    return f"key:{key.id}" if key else f"addr:{request.client.host if request.client else 'unknown'}"


def _check(cmd: CommandRequest, settings: Settings, prefix: str = "$") -> None:
    problems = check_command(
        cmd, settings.allowed_protocols, settings.max_payload_depth, prefix, settings.mqtt_topic_template
    )
    if problems:
        raise ValidationFailed(problems)


_BEYOND_KAFKA = ("delivered", "succeeded", "rejected")


async def _readable_row(request: Request) -> JournalRow:
    """The command named in the path, if this request's key may read it (else 404)."""
    key = require(request.scope["state"], "commands:read")
    await _rate_limit(request, key, 1)
    request_id = request.path_params["request_id"]
    row = await _dispatcher(request).read(request_id)
    # Another key's command does not exist for this key (object-level authorization).
    if row is None or (key is not None and not key.allows("admin") and row.key_id != key.id):
        raise NotFound(f"No command with request_id {request_id!r} is known")
    return row


QueryT = TypeVar("QueryT")


def _query(request: Request, kind: type[QueryT]) -> QueryT:
    """The query string as `kind`; a 422 naming the parameter that is wrong, or given more than once (which one
    would count is a guess: `?timeout=1&timeout=600`)."""
    params = request.query_params
    for name in params:
        if len(params.getlist(name)) > 1:
            raise ValidationFailed([FieldProblem(f"query.{name}", "given more than once")])
    try:
        return msgspec.convert(dict(params), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationFailed([field_problem(str(exc), "query")]) from None


async def get_command_status(request: Request) -> Response:
    """GET /api/v1/commands/{request_id}/status[?wait_for=&timeout=]: status and history; optionally a long poll."""
    require(request.scope["state"], "commands:read")  # who asks comes before what is asked
    query = _query(request, StatusQuery)
    settings = state(request).settings
    if query.wait_for in _BEYOND_KAFKA and not settings.kafka_status_topic:
        raise ValidationFailed(
            [
                FieldProblem(
                    "query.wait_for", "connectors report this stage through KAFKA_STATUS_TOPIC, which is not set"
                )
            ]
        )
    row = await _readable_row(request)
    feedback = bool(settings.kafka_status_topic)
    if query.wait_for is msgspec.UNSET or reached(row.stage, query.wait_for, feedback) or query.timeout == 0:
        return _answer(request, command_status(row))
    waiter = _wait(request)
    journal = state(request).journal
    watchers = state(request).watchers
    deadline = time.monotonic() + min(query.timeout, settings.long_poll_max)
    request_id = row.request_id
    with _Watch(request, waiter, request_id) as changed:
        row = await journal.get(request_id)  # read again once watched: no change slips in between
        while row and not reached(row.stage, query.wait_for, feedback) and not watchers.closed and not waiter.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            row = None  # while it waits, a long poll holds no row: it is read again on every change
            await watchers.alarms.wait(changed, remaining)
            changed.clear()
            row = await journal.get(request_id)
    if waiter.ended == "revoked":
        raise Unauthorized("This API key was revoked while the request waited")
    if row is None:  # finished, then pruned (JOURNAL_MAX_DISK) while it waited
        raise NotFound(f"No command with request_id {request_id!r} is known")
    return _answer(request, command_status(row))


class _Watch:
    """A waiting request's watch on its command: a bell rung by every change to it, at shutdown, and by the end of
    its waiter (key revoked, or client gone). A small class, not generator context managers: it is held by each
    of what may be thousands of waiters. Under server.py the connection says when the client is gone
    (http_protocol.client_gone); under another server (`uvicorn pusher:app`) a task listens for the disconnect,
    ~2 KB more for each waiter."""

    __slots__ = ("bell", "listening", "request", "request_id", "request_state", "waiter", "watchers")

    def __init__(self, request: Request, waiter: Waiter, request_id: str) -> None:
        self.watchers = state(request).watchers
        self.request = request
        self.request_state = request.scope.setdefault("state", {})
        self.waiter = waiter
        self.request_id = request_id
        self.listening: asyncio.Future | None = None

    def __enter__(self) -> Bell:
        gone = self.request_state.get("client_gone")
        if gone is None:  # a connection that does not report it
            self.listening = asyncio.ensure_future(self._listen())
        elif gone:
            self.waiter.disconnected()
        self.request_state["on_client_gone"] = self.waiter.disconnected
        self.bell = self.waiter.wake = self.watchers.watch(self.request_id)
        return self.bell

    def __exit__(self, *_: object) -> None:
        self.request_state.pop("on_client_gone", None)
        self.watchers.unwatch(self.request_id, self.bell)
        if self.listening is not None:
            self.listening.cancel()

    async def _listen(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.waiter.disconnected()


def _wait(request: Request) -> Waiter:
    """Make this request a waiter of its key (or, without keys, of its client address)."""
    key: ApiKey | None = request.scope["state"].get("principal")
    return state(request).admission.wait(request.scope["state"], _caller(request, key))


def _unsent(row: JournalRow, sent: set[str]) -> list[StatusChange]:
    """The transitions not streamed yet, in stage order, with one end only: the one that counts."""
    stage = row.stage
    changes = []
    for status, at, detail in sorted(row.history, key=lambda step: STAGE_RANK.get(step[0], 0)):
        if status in sent or (status in TERMINAL and status != stage):
            continue
        result = row.result if status == stage and status in TERMINAL else None
        changes.append(
            StatusChange(request_id=row.request_id, status=status, at=from_epoch(at), detail=detail, result=result)
        )
    return changes


async def command_events(request: Request) -> Response:
    """GET /api/v1/commands/{request_id}/events: Server-Sent Events, one per transition, until the last (at
    most EVENT_STREAM_MAX seconds; a reconnect with Last-Event-ID goes on where it stopped)."""
    row = await _readable_row(request)
    journal = state(request).journal
    watchers = state(request).watchers
    settings = state(request).settings
    feedback = bool(settings.kafka_status_topic)
    # A reconnecting EventSource sends the id of the last event it got: the status; go on after it.
    last = request.headers.get("last-event-id", "")
    sent = {s for s in STAGE_RANK if STAGE_RANK[s] <= STAGE_RANK[last]} if last in STAGE_RANK else set()
    if finished(row.stage, feedback) and not _unsent(row, sent):
        # Finished, and the client has it all. A stream that just closed would make EventSource reconnect
        # every few seconds for ever; 204 tells it to stop.
        return Response(status_code=204)
    waiter = _wait(request)
    deadline = time.monotonic() + settings.event_stream_max
    request_id = row.request_id

    async def stream() -> AsyncIterator[bytes]:
        with _Watch(request, waiter, request_id) as changed:
            while True:
                current = await journal.get(request_id)  # the first read once watched: no change slips in between
                if current is None:  # finished, then pruned (JOURNAL_MAX_DISK)
                    return
                for change in _unsent(current, sent):
                    sent.add(change.status)
                    encoded = change.status.encode()
                    yield b"id: %s\nevent: %s\ndata: %s\n\n" % (encoded, encoded, JSON_ENCODER.encode(change))
                remaining = deadline - time.monotonic()
                if finished(current.stage, feedback) or watchers.closed or waiter.ended or remaining <= 0:
                    return
                del current  # while it waits, a stream holds no row
                if not await watchers.alarms.wait(changed, min(SSE_KEEPALIVE, remaining)):
                    yield b": keep-alive\n\n"
                changed.clear()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def list_commands(request: Request) -> Response:
    """GET /api/v1/commands?device_id=&status=&limit=&before=: recent commands, newest first."""
    key = require(request.scope["state"], "commands:read")  # who asks comes before what is asked
    query = _query(request, ListQuery)
    await _rate_limit(request, key, 1)
    owner = key.id if key is not None and not key.allows("admin") else None
    dispatcher = _dispatcher(request)
    status = _or_none(query.status)
    read = functools.partial(
        dispatcher.journal.recent,
        _or_none(query.device_id),
        status,
        query.limit + 1,
        _or_none(query.before),
        owner,
        _or_none(query.fanout_id),
    )
    rows = await dispatcher.listed(read, status)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    return _answer(
        request, CommandList(items=[command_status(r) for r in rows], next_before=rows[-1].seq if more else None)
    )


def _or_none(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


async def health(request: Request) -> Response:
    """GET /health: liveness, independent of Kafka."""
    return JSONResponse(Health(status="healthy"))


async def ready(request: Request) -> Response:
    """GET /ready: 200 while the journal accepts commands; says when Kafka is down (they are stored meanwhile)."""
    sink = state(request).sink
    journal = state(request).journal
    h = sink.health
    # A Kafka outage is what the journal is for; refused credentials are a configuration error.
    ok = journal.writable and state(request).accepting and not h.auth_failed
    reason = None
    if not state(request).accepting:
        reason = "shutting down"
    elif not journal.writable:
        reason = journal.last_error
    elif h.auth_failed:
        reason = h.reason
    elif not sink.connected:
        reason = f"Kafka unavailable ({h.reason}); commands are journaled and forwarded when it returns"
    settings = state(request).settings
    detailed = not settings.auth or settings.metrics_public  # figures are for operators, not for anyone
    body = Readiness(
        ready=ok,
        kafka_connected=sink.connected,
        journal_writable=journal.writable,
        reason=reason,
        topic=sink.topic if detailed else None,
        partitions=h.partitions if detailed else None,
        backlog=journal.pending_count if detailed else None,
    )
    return JSONResponse(body, 200 if ok else 503)


async def service_status(request: Request) -> Response:
    """GET /api/v1/status: version, uptime, Kafka and journal state, counters, backlog; the configuration too
    for an admin key (or without keys): anonymous readers (METRICS_PUBLIC) see no settings or file paths."""
    _require_metrics(request)
    key: ApiKey | None = request.scope["state"].get("principal")
    operator = key.allows("admin") if key else not state(request).settings.auth
    dispatcher = _dispatcher(request)
    sink = state(request).sink
    counters = dispatcher.snapshot()
    return JSONResponse(
        ServiceStatus(
            service="preservarium-pusher",
            version=VERSION,
            kafka_connected=sink.connected,
            journal_writable=dispatcher.journal.writable,
            uptime_seconds=round(time.monotonic() - state(request).started, 3),
            commands_processed=counters.commands_processed,
            commands_failed=counters.commands_failed,
            backlog=counters.backlog,
            oldest_pending_age_seconds=counters.oldest_pending_age_seconds,
            last_error=dispatcher.last_error,
            last_error_at=dispatcher.last_error_at,
            command_topic=sink.topic,
            partitions=sink.health.partitions,
            brokers=sink.health.brokers,
            status_feed=_feed_state(state(request).status_feed),
            configuration=dispatcher.settings.masked() if operator else None,
        )
    )


def _feed_state(feed: StatusFeed | None) -> StatusFeedState | None:
    if feed is None:
        return None
    return StatusFeedState(
        topic=feed.topic,
        consuming=feed.consuming,
        events_published=feed.published,
        events_applied=feed.applied,
        events_ignored=feed.ignored,
    )


async def metrics(request: Request) -> Response:
    """GET /api/v1/metrics: the command counters and backlog as JSON."""
    _require_metrics(request)
    return JSONResponse(_dispatcher(request).snapshot())


def _require_metrics(request: Request) -> None:
    if not state(request).settings.metrics_public:
        require(request.scope["state"], "admin")


async def prometheus_metrics(request: Request) -> Response:
    """GET /metrics: every metric in the Prometheus text format."""
    _require_metrics(request)
    return Response(state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 document."""
    return Response(state(request).openapi, media_type="application/json")


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Preservarium Pusher API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>
"""
_DOCS_INIT = "window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui', deepLinking: true});\n"


async def docs(request: Request) -> Response:
    """GET /docs: interactive API docs, served from the swagger-ui-bundle package (no CDN)."""
    return HTMLResponse(_DOCS_PAGE)


async def docs_init(request: Request) -> Response:
    """The docs page's start-up script (kept out of the HTML so a strict CSP can forbid inline scripts)."""
    return Response(_DOCS_INIT, media_type="text/javascript")


# ---------------------------------------------------------------- errors


def route_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's 404/405 as problem+json."""
    error = NotFound(f"No route for {request.method} {request.url.path}")
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    response = problem_response(error, request.scope.get("state", {}).get("request_id"), request.url.path)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


class _Endpoint:
    """A route's handler as an ASGI app: a PusherError it raises answers its own problem+json, here, inside the
    middleware (CORS) that dresses every answer. One frame for each request where Starlette's `request_response`
    and its exception layer stack five with their closures (held by every waiting long poll, and paid by every
    command)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler
        self.__name__ = handler.__name__  # the route's name (url_path_for, the OpenAPI operation)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except PusherError as exc:
            response = problem_response(exc, scope.get("state", {}).get("request_id"), request.url.path)
        await response(scope, receive, send)


class _RouteErrors:
    """Answers the router's 404 and 405 (raised before any answer starts) with problem+json."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except HTTPException as exc:
            await route_error(Request(scope, receive, send), exc)(scope, receive, send)


class _App(Starlette):
    """Starlette without its outer error page and its exception layer: the handlers' errors are answered by
    _Endpoint, the router's by _RouteErrors, and anything else by RequestContextMiddleware (500 problem+json,
    logged). Two layers and their closures fewer on every request."""

    def build_middleware_stack(self) -> ASGIApp:
        """The user middleware around the router, with nothing of Starlette's own."""
        app: ASGIApp = _RouteErrors(self.router)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


# ---------------------------------------------------------------- app


@dataclass(slots=True)
class AppState:
    """What the handlers, the middleware and the server share, typed. create_app makes the fields up to
    `accepting`; the lifespan adds the rest at start-up (reading one before raises AttributeError)."""

    settings: Settings
    metrics: Metrics
    admission: Admission
    limiter: RateLimiter | None
    keyring: Keyring | None
    openapi: bytes  # the OpenAPI document, encoded once
    accepting: bool = True  # False from the first shutdown signal: only the probes are answered
    journal: Journal = field(init=False)
    sink: KafkaSink = field(init=False)
    status_feed: StatusFeed | None = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    watchers: Watchers = field(init=False)
    started: float = field(init=False)  # time.monotonic() at start-up


def app_state(app: Starlette) -> AppState:
    """The shared state of an app create_app made."""
    return app.state.pusher


def state(request: Request) -> AppState:
    """The shared state of the app serving `request`: how a handler reaches the journal, the sink, the settings."""
    return request.app.state.pusher


_COMMAND_ROUTES = frozenset(
    {"/api/v1/commands", "/api/v1/commands/batch", "/api/v1/commands/fanout"}
)  # where a POST sends commands


def _route(method: str, path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
    """A route answering `method` on `path` with `handler`."""
    return Route(path, _Endpoint(handler), methods=[method])


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; the lifespan opens the journal, starts the sink and forwarder, and closes them in reverse."""
    settings = settings or load_settings()
    routes = [
        _route("POST", "/api/v1/commands", push_command),
        _route("GET", "/api/v1/commands", list_commands),
        _route("POST", "/api/v1/commands/batch", push_commands_batch),
        _route("POST", "/api/v1/commands/fanout", push_fanout),
        _route("DELETE", "/api/v1/commands/{request_id}", cancel_command),
        _route("GET", "/api/v1/fanouts/{fanout_id}", get_fanout),
        _route("GET", _STATUS_ROUTE, get_command_status),
        _route("GET", "/api/v1/commands/{request_id}/events", command_events),
        _route("GET", "/health", health),
        _route("GET", "/ready", ready),
        _route("GET", "/api/v1/status", service_status),
        _route("GET", "/api/v1/metrics", metrics),
        _route("GET", "/metrics", prometheus_metrics),
        _route("GET", "/openapi.json", openapi),
        _route("GET", "/docs", docs),
        _route("GET", "/docs/init.js", docs_init),
        Mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets"),
    ]
    keyring = Keyring(settings.api_keys_file) if settings.auth else None
    admission = Admission(settings.limit_concurrency, settings.max_waiters, settings.max_waiters_per_key)
    shared = AppState(
        settings=settings,
        metrics=Metrics(VERSION),
        admission=admission,
        limiter=RateLimiter(settings.rate_limit, settings.rate_limit_storage) if settings.rate_limit else None,
        keyring=keyring,
        openapi=b"",  # built from the routes below, once the app has them
    )
    shared.metrics.watch_admission(lambda: admission.in_flight, lambda: admission.waiting)
    app = _App(routes=routes, lifespan=lambda _: _lifespan(shared))
    app.state.pusher = shared
    # Served without a key when keys are on (the docs' assets too, by their prefix).
    open_paths = {"/health", "/ready", "/docs", "/docs/init.js", "/openapi.json"}
    if settings.metrics_public:
        open_paths |= {"/metrics", "/api/v1/metrics", "/api/v1/status"}
    shared.openapi = JSON_ENCODER.encode(openapi_document(app.routes, settings, frozenset(open_paths)))
    if keyring is not None:
        app.add_middleware(
            ApiKeyMiddleware, keyring=keyring, header=settings.api_key_header, open_paths=frozenset(open_paths)
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", settings.api_key_header, "Authorization", "Idempotency-Key", "Prefer"],
            expose_headers=["X-Request-ID", "Idempotent-Replayed", "Retry-After", "RateLimit-Remaining", "Location"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=shared.metrics,
        admission=admission,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        max_header_bytes=settings.max_header_bytes,
        accepting=lambda: shared.accepting,
        routes=app.router.routes,  # the router's own list: a route added later is matched too
        commands=_COMMAND_ROUTES,
    )
    return app


@contextlib.asynccontextmanager
async def _lifespan(shared: AppState) -> AsyncIterator[None]:
    """Open the journal, start the sink, the forwarder and the status feed; at the end close them in reverse."""
    settings, metrics = shared.settings, shared.metrics
    journal = Journal(
        settings.journal_path,
        settings.journal_sync,
        settings.journal_max_pending,
        settings.journal_max_bytes,
        settings.journal_retention,
        status_source=f"{SERVICE_SOURCE}{settings.instance_id}" if settings.kafka_status_topic else None,
        max_disk=settings.journal_max_disk,
    )
    try:
        recovered = await asyncio.to_thread(journal.open)
    except (JournalError, sqlite3.Error, OSError) as exc:
        log.error("journal cannot be opened", path=settings.journal_path, error=str(exc))
        raise RuntimeError(f"journal {settings.journal_path} cannot be opened: {exc}") from None
    sink = KafkaSink(settings)
    sink.start()
    forwarder = Forwarder(journal, sink, settings.publish_timeout, metrics, settings.forward_backoff_max)
    forwarder.start(recovered)
    # The forwarder holds each recovered command only until it is finished; a list kept here for the life of
    # the process would keep every one, with the record read back into it to be sent (~1.6 KB a command).
    recovered_count = len(recovered)
    del recovered
    metrics.watch(
        backlog=lambda: journal.pending_count,
        oldest_pending_created_at=lambda: journal.oldest_pending_created_at,
        kafka_connected=lambda: sink.connected,
        in_flight=lambda: forwarder.in_flight,
        status_outbox=(lambda: journal.outbox_size) if settings.kafka_status_topic else None,
    )
    metrics.watch_journal_disk(lambda: journal.disk_bytes, settings.journal_max_disk, lambda: journal.pruned)
    status_feed = StatusFeed(settings, journal, metrics) if settings.kafka_status_topic else None
    if status_feed is not None:
        status_feed.start()
    shared.journal, shared.sink, shared.status_feed = journal, sink, status_feed
    shared.watchers = Watchers(journal)
    shared.dispatcher = Dispatcher(settings, journal, forwarder, metrics)
    shared.started = time.monotonic()
    shared.accepting = True
    _reload_keys_on_sighup(shared.keyring, shared.admission)
    if not settings.auth and settings.auth_enabled is False:
        log.warning(
            "AUTH_ENABLED=false: anyone who reaches this port can command every device", api_host=settings.api_host
        )
    log.info(
        "started",
        topic=settings.kafka_command_topic,
        bootstrap=settings.kafka_bootstrap_servers,
        journal=settings.journal_path,
        recovered=recovered_count,
    )
    try:
        yield
    finally:
        shared.accepting = False
        await forwarder.stop()
        # Flush the producer off the loop, so its acknowledgements can still be journaled.
        await asyncio.to_thread(sink.close, settings.shutdown_timeout)
        for _ in range(3):
            await asyncio.sleep(0)
        if status_feed is not None:
            await asyncio.to_thread(status_feed.close)
        await asyncio.to_thread(journal.close)
        if shared.limiter is not None:
            await shared.limiter.close()
        log.info("stopped", backlog=journal.pending_count)


def _reload_keys_on_sighup(keyring: Keyring | None, admission: Admission) -> None:
    """SIGHUP re-reads API_KEYS_FILE, so keys rotate without a restart (a bad file keeps the old keys); a key
    that is gone or changed ends its open long polls and event streams."""
    if keyring is None:
        return

    def reload() -> None:
        before = keyring.keys
        try:
            keyring.reload()
        except ValueError as exc:
            log.error("api keys not reloaded; the previous keys stay", error=str(exc))
            return
        revoked = {key.id for key in before if key not in keyring.keys}
        if revoked:
            log.info("api keys revoked", keys=sorted(revoked), waiters_ended=admission.revoke(revoked))

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals off the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


def main() -> None:
    """Run the service as a process (server.main): `python -m pusher`, the `pusher-server` command."""
    import server  # the process sits above the app: imported only when a process is started

    server.main()


def __getattr__(name: str) -> Starlette:
    """`pusher.app`, built from the environment on first use (`uvicorn pusher:app`), so that importing this module
    builds nothing and a bad setting stops that start with its one line (exit 2)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import server

    app = globals()["app"] = server.app_for_uvicorn()
    return app


if __name__ == "__main__":
    main()
