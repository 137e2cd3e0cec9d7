"""The ASGI app: routes → thin handlers, the request middleware, and the lifespan that owns Kafka.

Run it with `make run`, `python -m pusher`, or `uvicorn pusher:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import random
import re
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Annotated, Any

import msgspec
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from admission import Admission, Waiter
from dispatch import Dispatcher, Watchers, command_status, finished, reached
from errors import (
    BodyTooLarge,
    FieldProblem,
    Forbidden,
    HeadersTooLarge,
    JournalError,
    MethodNotAllowed,
    NotFound,
    PusherError,
    RequestError,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from forwarder import Forwarder
from http_protocol import http_protocol
from journal import SERVICE_SOURCE, Journal, JournalRow
from kafka_sink import KafkaSink
from logs import configure_logging
from metrics import Metrics
from schemas import (
    JSON_ENCODER,
    STAGE_RANK,
    TERMINAL,
    VERSION,
    CommandList,
    CommandRequest,
    DeviceId,
    Health,
    Readiness,
    ServiceStatus,
    Status,
    StatusChange,
    StatusFeedState,
    check_command,
    decode_batch,
    decode_batch_item,
    decode_command,
    field_problem,
    from_epoch,
    openapi_document,
    problem_for,
)
from security import ApiKey, ApiKeyMiddleware, Keyring, RateLimiter, new_key, require
from settings import Settings, SettingsError, load_settings
from status_feed import StatusFeed

log = structlog.get_logger("pusher")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_JSON_TYPES = {"application/json"}
_MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}


class JSONResponse(Response):
    """A response encoded with the shared msgspec encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return JSON_ENCODER.encode(content)


def problem_response(error: BaseException, request_id: str | None, instance: str | None) -> Response:
    """The RFC 9457 answer for an error, with Retry-After when retrying helps."""
    problem = problem_for(error, request_id, instance)
    headers = dict(getattr(error, "headers", {}))
    retry_after = getattr(error, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    return Response(
        JSON_ENCODER.encode(problem), problem.status, headers=headers, media_type="application/problem+json"
    )


# ---------------------------------------------------------------- middleware


class RequestContextMiddleware:
    """Request id, admission, body size and time limits, the one summary log line per request, the fixed 500."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        admission: Admission,
        max_body_bytes: int,
        body_timeout: float = 10.0,
        max_header_bytes: int = 16384,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        # It labels one request's log line and answer: unique, not secret, so the fast generator.
        request_id = given if _REQUEST_ID.fullmatch(given) else f"{random.getrandbits(128):032x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        try:
            # httptools has no header-size limit of its own: refuse oversized headers before any work.
            if sum(len(name) + len(value) for name, value in scope["headers"]) > self.max_header_bytes:
                raise HeadersTooLarge(f"Request headers exceed MAX_HEADER_BYTES ({self.max_header_bytes} bytes)")
            self.admission.admit(state, scope["path"])
            length = headers.get(b"content-length")
            app_state = getattr(scope.get("app"), "state", None)
            if not getattr(app_state, "accepting", True) and scope["path"] not in ("/health", "/ready"):
                raise ShuttingDown("This instance is shutting down; send the request again (here or elsewhere)")
            # A very long digit string is over any limit; never hand it to int() (it caps digits).
            if length is not None and (not length.isdigit() or len(length) > 18 or int(length) > self.max_body_bytes):
                error = BodyTooLarge(f"Body exceeds MAX_BODY_BYTES ({self.max_body_bytes} bytes)")
                if not length.isdigit():
                    error = RequestError("Content-Length is not a number")
                await problem_response(error, request_id, scope["path"])(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except PusherError as exc:  # raised by middleware below (auth, body limit), outside Starlette's handlers
            if not response_started:
                await problem_response(exc, request_id, scope["path"])(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", path=scope["path"])
            if not response_started:
                await problem_response(RuntimeError(), request_id, scope["path"])(scope, receive, send_with_id)
        finally:
            self.admission.done(state)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            duration = time.perf_counter() - started
            self.metrics.observe_request(route, scope["method"], status, duration)
            log.info(
                "request",
                method=scope["method"],
                route=route,
                status=status,
                duration_ms=round(duration * 1000, 3),
                key_id=getattr(state.get("principal"), "id", None),
                **state.get("log", {}),
            )
            structlog.contextvars.unbind_contextvars("request_id", "key_id")

    def _limited(self, receive: Receive) -> Receive:
        """Count streamed (chunked) body bytes and stop at the limit; a body must arrive within BODY_TIMEOUT."""
        received = 0
        deadline: float | None = None
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, complete
            if complete:
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_timeout
            message = await _before(deadline, receive(), loop)
            if message is None:
                raise RequestTimeout(f"The body did not arrive within BODY_TIMEOUT ({self.body_timeout:g} s)")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(f"Body exceeds MAX_BODY_BYTES ({self.max_body_bytes} bytes)")
                complete = not message.get("more_body", False)
            return message

        return limited_receive


async def _before(deadline: float, receiving: Awaitable[Message], loop: asyncio.AbstractEventLoop) -> Message | None:
    """Await `receiving` until the loop time `deadline`; None if it passed. `asyncio.timeout` does the same at
    several times the cost per call (it showed in profiles), and nearly every body has arrived already."""
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_at(deadline, expire)
    try:
        return await receiving
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            return None
        raise
    finally:
        timer.cancel()


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
    return request.app.state.dispatcher


def _headers(replayed: bool, prefer_async: bool) -> dict[str, str]:
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
    try:
        idem_key = _idempotency_key(request)
        cmd = decode_command(await request.body(), fmt)
        _check(cmd, dispatcher.settings)
    except RequestError:
        dispatcher.rejected()
        raise
    if key is not None and not key.may_command(cmd.device_id):
        raise Forbidden(f"This API key may not command device {cmd.device_id!r}")
    prefer_async = _prefers_async(request)
    note = request.scope["state"].setdefault("log", {})  # the command's fields join this request's log line
    answer = await dispatcher.push(cmd, idem_key, prefer_async, _traceparent(request), key.id if key else None, note)
    headers = _headers(answer.response.replayed, prefer_async) | limits
    return JSONResponse(answer.response, answer.http_status, headers=headers)


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
        except RequestError as exc:
            dispatcher.rejected()
            items.append(exc)
    if len(raw_items) > 1:  # one unit per command: the first was charged on arrival
        limits = await _rate_limit(request, key, len(raw_items) - 1)
    prefer_async = _prefers_async(request)
    body, status = await dispatcher.push_batch(
        items, idem_key, prefer_async, _traceparent(request), key.id if key else None
    )
    headers = _headers(any(r.replayed for r in body.results), prefer_async) | limits
    return JSONResponse(body, status, headers=headers)


async def _rate_limit(request: Request, key: ApiKey | None, cost: int) -> dict[str, str]:
    """Spend `cost` units of RATE_LIMIT for this key (or client address); RateLimit-* headers for the answer."""
    limiter: RateLimiter | None = request.app.state.limiter
    if limiter is None:
        return {}
    who = f"key:{key.id}" if key else f"addr:{request.client.host if request.client else 'unknown'}"
    return await limiter.hit(who, cost)


def _check(cmd: CommandRequest, settings: Settings, prefix: str = "$") -> None:
    problems = check_command(
        cmd, settings.allowed_protocols, settings.max_payload_depth, prefix, settings.mqtt_topic_template
    )
    if problems:
        raise ValidationFailed(problems)


class _StatusQuery(msgspec.Struct, forbid_unknown_fields=True):
    wait_for: Status | msgspec.UnsetType = msgspec.UNSET
    timeout: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0


_BEYOND_KAFKA = ("delivered", "succeeded", "rejected")


async def _readable_row(request: Request) -> JournalRow:
    """The command named in the path, if this request's key may read it (else 404)."""
    key = require(request.scope["state"], "commands:read")
    await _rate_limit(request, key, 1)
    request_id = request.path_params["request_id"]
    row = await _dispatcher(request).journal.get(request_id)
    # Another key's command does not exist for this key (object-level authorization).
    if row is None or (key is not None and not key.allows("admin") and row.key_id != key.id):
        raise NotFound(f"No command with request_id {request_id!r} is known")
    return row


async def get_command_status(request: Request) -> Response:
    """GET /api/v1/commands/{request_id}/status[?wait_for=&timeout=]: status and history; optionally a long poll."""
    require(request.scope["state"], "commands:read")  # who asks comes before what is asked
    try:
        query = msgspec.convert(dict(request.query_params), _StatusQuery, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationFailed([field_problem(str(exc), "query")]) from None
    settings: Settings = request.app.state.settings
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
    if query.wait_for is msgspec.UNSET or reached(row, query.wait_for, feedback) or query.timeout == 0:
        return JSONResponse(command_status(row))
    waiter = _wait(request)
    journal: Journal = request.app.state.journal
    watchers: Watchers = request.app.state.watchers
    deadline = time.monotonic() + min(query.timeout, settings.long_poll_max)
    with watchers.watching(row.request_id) as changed, _ends_on_disconnect(request, waiter):
        waiter.wake = changed
        row = await journal.get(row.request_id) or row  # read again once watched: no change slips in between
        while not reached(row, query.wait_for, feedback) and not watchers.closed and not waiter.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
            changed.clear()
            row = await journal.get(row.request_id) or row
    if waiter.ended == "revoked":
        raise Unauthorized("This API key was revoked while the request waited")
    return JSONResponse(command_status(row))


@contextlib.contextmanager
def _ends_on_disconnect(request: Request, waiter: Waiter) -> Iterator[None]:
    """While inside, a client that goes away ends `waiter` at once, giving its slot back (a waiter would
    otherwise notice only when it next writes)."""

    async def listen() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        waiter.end("disconnected")

    listening = asyncio.ensure_future(listen())
    try:
        yield
    finally:
        listening.cancel()


def _wait(request: Request) -> Waiter:
    """Make this request a waiter of its key (or, without keys, of its client address)."""
    key: ApiKey | None = request.scope["state"].get("principal")
    who = f"key:{key.id}" if key else f"addr:{request.client.host if request.client else 'unknown'}"
    return request.app.state.admission.wait(request.scope["state"], who)


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
    journal: Journal = request.app.state.journal
    watchers: Watchers = request.app.state.watchers
    settings: Settings = request.app.state.settings
    feedback = bool(settings.kafka_status_topic)
    # A reconnecting EventSource sends the id of the last event it got: the status; go on after it.
    last = request.headers.get("last-event-id", "")
    sent = {s for s in STAGE_RANK if STAGE_RANK[s] <= STAGE_RANK[last]} if last in STAGE_RANK else set()
    if finished(row, feedback) and not _unsent(row, sent):
        # Finished, and the client has it all. A stream that just closed would make EventSource reconnect
        # every few seconds for ever; 204 tells it to stop.
        return Response(status_code=204)
    waiter = _wait(request)
    deadline = time.monotonic() + settings.event_stream_max

    async def stream() -> AsyncIterator[bytes]:
        with watchers.watching(row.request_id) as changed, _ends_on_disconnect(request, waiter):
            waiter.wake = changed
            current = await journal.get(row.request_id) or row  # read again once watched: no change slips in between
            while True:
                for change in _unsent(current, sent):
                    sent.add(change.status)
                    encoded = change.status.encode()
                    yield b"id: %s\nevent: %s\ndata: %s\n\n" % (encoded, encoded, JSON_ENCODER.encode(change))
                remaining = deadline - time.monotonic()
                if finished(current, feedback) or watchers.closed or waiter.ended or remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(changed.wait(), min(_SSE_KEEPALIVE, remaining))
                except TimeoutError:
                    yield b": keep-alive\n\n"
                changed.clear()
                current = await journal.get(current.request_id) or current

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


_SSE_KEEPALIVE = 15.0


class _ListQuery(msgspec.Struct, forbid_unknown_fields=True):
    # UNSET, not None: a lax conversion would read the text "null" as None, i.e. as "no filter".
    device_id: DeviceId | msgspec.UnsetType = msgspec.UNSET
    status: Status | msgspec.UnsetType = msgspec.UNSET
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    before: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | msgspec.UnsetType = msgspec.UNSET


async def list_commands(request: Request) -> Response:
    """GET /api/v1/commands?device_id=&status=&limit=&before=: recent commands, newest first."""
    try:
        query = msgspec.convert(dict(request.query_params), _ListQuery, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationFailed([field_problem(str(exc), "query")]) from None
    key = require(request.scope["state"], "commands:read")
    await _rate_limit(request, key, 1)
    owner = key.id if key is not None and not key.allows("admin") else None
    dispatcher = _dispatcher(request)
    rows = await dispatcher.journal.recent(
        _or_none(query.device_id), _or_none(query.status), query.limit + 1, _or_none(query.before), owner
    )
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    return JSONResponse(
        CommandList(items=[command_status(r) for r in rows], next_before=rows[-1].seq if more else None)
    )


def _or_none(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


async def health(request: Request) -> Response:
    """GET /health: liveness, independent of Kafka."""
    return JSONResponse(Health(status="healthy"))


async def ready(request: Request) -> Response:
    """GET /ready: 200 while the journal accepts commands; says when Kafka is down (they are stored meanwhile)."""
    sink: KafkaSink = request.app.state.sink
    journal: Journal = request.app.state.journal
    h = sink.health
    # A Kafka outage is what the journal is for; refused credentials are a configuration error.
    ok = journal.writable and request.app.state.accepting and not h.auth_failed
    reason = None
    if not request.app.state.accepting:
        reason = "shutting down"
    elif not journal.writable:
        reason = journal.last_error
    elif h.auth_failed:
        reason = h.reason
    elif not sink.connected:
        reason = f"Kafka unavailable ({h.reason}); commands are journaled and forwarded when it returns"
    settings: Settings = request.app.state.settings
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
    operator = key.allows("admin") if key else not request.app.state.settings.auth
    dispatcher = _dispatcher(request)
    sink: KafkaSink = request.app.state.sink
    counters = dispatcher.snapshot()
    return JSONResponse(
        ServiceStatus(
            service="preservarium-pusher",
            version=VERSION,
            kafka_connected=sink.connected,
            journal_writable=dispatcher.journal.writable,
            uptime_seconds=round(time.monotonic() - request.app.state.started, 3),
            commands_processed=counters.commands_processed,
            commands_failed=counters.commands_failed,
            backlog=counters.backlog,
            oldest_pending_age_seconds=counters.oldest_pending_age_seconds,
            last_error=dispatcher.last_error,
            last_error_at=dispatcher.last_error_at,
            command_topic=sink.topic,
            partitions=sink.health.partitions,
            brokers=sink.health.brokers,
            status_feed=_feed_state(request.app.state.status_feed),
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
    if not request.app.state.settings.metrics_public:
        require(request.scope["state"], "admin")


async def prometheus_metrics(request: Request) -> Response:
    """GET /metrics: every metric in the Prometheus text format."""
    _require_metrics(request)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 document."""
    return Response(request.app.state.openapi, media_type="application/json")


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


async def on_pusher_error(request: Request, exc: Exception) -> Response:
    """Every PusherError answers its own problem+json."""
    return problem_response(exc, request.scope.get("state", {}).get("request_id"), request.url.path)


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405 as problem+json."""
    assert isinstance(exc, HTTPException)
    error = NotFound(f"No route for {request.method} {request.url.path}")
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    response = problem_response(error, request.scope.get("state", {}).get("request_id"), request.url.path)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


# ---------------------------------------------------------------- app


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; the lifespan opens the journal, starts the sink and forwarder, and closes them in reverse."""
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        journal = Journal(
            settings.journal_path,
            settings.journal_sync,
            settings.journal_max_pending,
            settings.journal_max_bytes,
            settings.journal_retention,
            status_source=f"{SERVICE_SOURCE}{settings.instance_id}" if settings.kafka_status_topic else None,
        )
        try:
            recovered = await asyncio.to_thread(journal.open)
        except (JournalError, sqlite3.Error, OSError) as exc:
            log.error("journal cannot be opened", path=settings.journal_path, error=str(exc))
            raise RuntimeError(f"journal {settings.journal_path} cannot be opened: {exc}") from None
        sink = KafkaSink(settings)
        sink.start()
        metrics: Metrics = app.state.metrics
        forwarder = Forwarder(journal, sink, settings.publish_timeout, metrics, settings.forward_backoff_max)
        forwarder.start(recovered)
        metrics.watch(
            backlog=lambda: journal.pending_count,
            oldest_pending_created_at=lambda: journal.oldest_pending_created_at,
            kafka_connected=lambda: sink.connected,
            in_flight=lambda: forwarder.in_flight,
            status_outbox=(lambda: journal.outbox_size) if settings.kafka_status_topic else None,
        )
        status_feed = StatusFeed(settings, journal, metrics) if settings.kafka_status_topic else None
        if status_feed is not None:
            status_feed.start()
        app.state.journal, app.state.sink, app.state.status_feed = journal, sink, status_feed
        app.state.watchers = Watchers(journal)
        app.state.dispatcher = Dispatcher(settings, journal, forwarder, metrics)
        app.state.started = time.monotonic()
        app.state.accepting = True
        _reload_keys_on_sighup(keyring, admission)
        if not settings.auth and settings.auth_enabled is False:
            log.warning(
                "AUTH_ENABLED=false: anyone who reaches this port can command every device", api_host=settings.api_host
            )
        log.info(
            "started",
            topic=settings.kafka_command_topic,
            bootstrap=settings.kafka_bootstrap_servers,
            journal=settings.journal_path,
            recovered=len(recovered),
        )
        try:
            yield
        finally:
            app.state.accepting = False
            await forwarder.stop()
            # Flush the producer off the loop, so its acknowledgements can still be journaled.
            await asyncio.to_thread(sink.close, settings.shutdown_timeout)
            for _ in range(3):
                await asyncio.sleep(0)
            if status_feed is not None:
                await asyncio.to_thread(status_feed.close)
            await asyncio.to_thread(journal.close)
            if app.state.limiter is not None:
                await app.state.limiter.close()
            log.info("stopped", backlog=journal.pending_count)

    routes = [
        Route("/api/v1/commands", push_command, methods=["POST"]),
        Route("/api/v1/commands", list_commands, methods=["GET"]),
        Route("/api/v1/commands/batch", push_commands_batch, methods=["POST"]),
        Route("/api/v1/commands/{request_id}/status", get_command_status, methods=["GET"]),
        Route("/api/v1/commands/{request_id}/events", command_events, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/api/v1/status", service_status, methods=["GET"]),
        Route("/api/v1/metrics", metrics, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/init.js", docs_init, methods=["GET"]),
        Mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={PusherError: on_pusher_error, HTTPException: on_http_error},
    )
    app.state.settings = settings
    app.state.metrics = app_metrics = Metrics(VERSION)
    app.state.openapi = JSON_ENCODER.encode(
        openapi_document(
            settings.api_key_header if settings.auth else None,
            bool(settings.rate_limit),
            settings.allowed_protocols,
            settings.max_batch,
        )
    )
    app.state.admission = admission = Admission(
        settings.limit_concurrency, settings.max_waiters, settings.max_waiters_per_key
    )
    app_metrics.watch_admission(lambda: admission.in_flight, lambda: admission.waiting)
    app.state.limiter = RateLimiter(settings.rate_limit, settings.rate_limit_storage) if settings.rate_limit else None
    keyring = Keyring(settings.api_keys_file) if settings.auth else None
    if keyring is not None:
        open_paths = {"/health", "/ready", "/docs", "/openapi.json"}
        if settings.metrics_public:
            open_paths |= {"/metrics", "/api/v1/metrics", "/api/v1/status"}
        app.add_middleware(
            ApiKeyMiddleware, keyring=keyring, header=settings.api_key_header, open_paths=frozenset(open_paths)
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", settings.api_key_header, "Authorization", "Idempotency-Key", "Prefer"],
            expose_headers=["X-Request-ID", "Idempotent-Replayed", "Retry-After", "RateLimit-Remaining"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=app_metrics,
        admission=admission,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        max_header_bytes=settings.max_header_bytes,
    )
    return app


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


def _settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"pusher: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def keygen(argv: list[str]) -> None:
    """`python -m pusher keygen [ID] [SCOPE,…] [--keys-file PATH]`: print a new key once, and add its entry to
    PATH (it holds only hashes, so it may be readable by the service's user) or print the entry for API_KEYS_FILE."""
    keys_file = None
    if "--keys-file" in argv:
        at = argv.index("--keys-file")
        keys_file, argv = (argv[at + 1 : at + 2] or [""])[0], argv[:at] + argv[at + 2 :]
        if not keys_file:
            raise SystemExit("pusher keygen: --keys-file needs a path")
    key_id = argv[0] if argv else f"key-{uuid.uuid4().hex[:8]}"
    scopes = argv[1].split(",") if len(argv) > 1 else ["commands:write", "commands:read"]
    secret, entry = new_key(key_id, scopes)
    print(f"API key (shown once; store it now):\n\n  {secret}\n")
    if keys_file is None:
        print(f"Add to API_KEYS_FILE:\n\n{entry}")
        return
    fd = os.open(keys_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with os.fdopen(fd, "a") as file:
        file.write(("\n" if file.tell() else "") + entry)
    print(f"Added key {key_id!r} to {keys_file}; a running service reads it on SIGHUP (kill -HUP PID).")


def main() -> None:
    """Run the service with uvicorn (uvloop, httptools with head limits) on API_HOST:API_PORT."""
    if sys.argv[1:2] == ["keygen"]:
        keygen(sys.argv[2:])
        return
    settings = _settings_or_exit()
    # `kill -USR1 PID` prints every thread's stack to stderr: how to see where a stuck process stands.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app = create_app(settings)
    except ValueError as exc:  # an unreadable API_KEYS_FILE
        print(f"pusher: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http=http_protocol(settings.header_timeout, settings.max_header_bytes),
        timeout_keep_alive=settings.keepalive_timeout,  # typed int; a float works (call_later)
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)),
        limit_concurrency=None,  # the app's Admission counts requests and waiters apart (uvicorn counts both)
        h11_max_incomplete_event_size=16 * 1024,
    )
    DrainingServer(config, app, settings.shutdown_drain).run()


class DrainingServer(uvicorn.Server):
    """uvicorn with the shutdown this service promises. The first SIGTERM/SIGINT stops taking commands (503,
    /ready false) for SHUTDOWN_DRAIN seconds, so load balancers move away, then shuts down gracefully:
    in-flight requests finish and the producer is flushed within SHUTDOWN_TIMEOUT. A second signal exits at
    once — safe, because everything answered 2xx is in Kafka or in the journal already."""

    def __init__(self, config: uvicorn.Config, app: Starlette, drain: float) -> None:
        super().__init__(config)
        self.app_state = app.state
        self.drain = drain
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        """Note the event loop, which the signal handler hands its work to."""
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """First signal: drain, then stop; second: stop now.

        This runs as a signal handler, in the middle of whatever the event loop was doing; that may be
        writing a log line under the log writer's (non-reentrant) lock. So it takes no lock itself: no
        logging, no threads here. It sets flags and hands the rest to the loop."""
        if self.draining:
            self.force_exit = self.should_exit = True
            self._on_loop(log.warning, "second signal: exiting now")
            return
        self.draining = True
        self.app_state.accepting = False
        if self.loop is None:  # before startup: nothing to drain
            self.should_exit = True
            return
        self._on_loop(self._drain_then_exit)

    def _on_loop(self, call: Any, *args: Any) -> None:
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                self.loop.call_soon_threadsafe(call, *args)

    def _drain_then_exit(self) -> None:
        log.info("signal received: refusing new commands", drain_seconds=self.drain)
        if self.drain > 0:
            self.loop.call_later(self.drain, self._exit)
        else:
            self._exit()

    def _exit(self) -> None:
        self.should_exit = True
        watchers = getattr(self.app_state, "watchers", None)
        if watchers is not None:  # long polls and event streams answer now instead of holding the shutdown
            watchers.close()


if __name__ == "__main__":
    main()
else:
    app = create_app(_settings_or_exit())
