"""The request middleware: what every HTTP request goes through before and after its handler.

Its request id (echoed or made), admission to a request slot, the shutting-down refusal, the header and body
size limits and the body's deadline, the route template it matched, the one summary log line, the request
metrics (and a refused command request counted once), and the fixed 500 for anything unexpected. Every
refusal here answers with `problem_response`, the one RFC 9457 renderer the handlers' errors use too.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from admission import PROBES, Admission
from errors import BodyTooLarge, HeadersTooLarge, PusherError, RequestError, RequestTimeout, ShuttingDown
from metrics import Metrics
from schemas import JSON_ENCODER
from validation import problem_for

log = structlog.get_logger("pusher")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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


class RequestContextMiddleware:
    """Request id, admission, body size and time limits, the one summary log line per request, the fixed 500.

    `accepting()` turns False at shutdown: every request but the probes is refused (503) from then on.
    `routes` are the app's, so a request answered here, before the router, still counts under its route
    template; a 4xx answer to a POST on one of the `commands` templates counts one rejected command."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        admission: Admission,
        max_body_bytes: int,
        body_timeout: float = 10.0,
        max_header_bytes: int = 16384,
        accepting: Callable[[], bool] = lambda: True,
        routes: Sequence[BaseRoute] = (),
        commands: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes
        self.accepting = accepting
        self.routes = routes
        self.commands = commands

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
            if not self.accepting() and scope["path"] not in PROBES:
                raise ShuttingDown("This instance is shutting down; send the request again (here or elsewhere)")
            # A very long digit string is over any limit; never hand it to int() (it caps digits).
            if length is not None and (not length.isdigit() or len(length) > 18 or int(length) > self.max_body_bytes):
                error = BodyTooLarge(f"Body exceeds MAX_BODY_BYTES ({self.max_body_bytes} bytes)")
                if not length.isdigit():
                    error = RequestError("Content-Length is not a number")
                await problem_response(error, request_id, scope["path"])(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except PusherError as exc:  # raised by middleware below (auth, body limit), or once an answer has started
            if not response_started:
                await problem_response(exc, request_id, scope["path"])(scope, receive, send_with_id)
            else:  # a stream cut off: the client sees it end; the log says why
                log.exception("error after the answer started", path=scope["path"])
        except Exception:
            log.exception("unhandled error", path=scope["path"])
            if not response_started:
                await problem_response(RuntimeError(), request_id, scope["path"])(scope, receive, send_with_id)
        finally:
            self.admission.done(state)
            route = self._route(scope)
            duration = time.perf_counter() - started
            self.metrics.observe_request(route, scope["method"], status, duration)
            if 400 <= status < 500 and route in self.commands and scope["method"] == "POST":
                self.metrics.outcomes["rejected"].inc()
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

    def _route(self, scope: Scope) -> str:
        """The template of the route the request matched; for one answered before the router (a 413 by
        Content-Length, a 401, a 503), the route it would have matched; "unmatched" when there is none."""
        route = scope.get("route")
        if route is None:
            for candidate in self.routes:
                match, _ = candidate.matches(scope)
                if match is Match.FULL:
                    route = candidate
                    break
                if match is Match.PARTIAL and route is None:  # the router's choice too: a 405 on this route
                    route = candidate
        return getattr(route, "path", None) or "unmatched"

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
    several times the cost per call, and nearly every body has arrived already."""
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
