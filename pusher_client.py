"""Python client for the Preservarium Pusher HTTP API, synchronous and asyncio, with retries that never double-send.

    PusherClientError                the base; `status` and the service's RFC 9457 `problem` when there was one
    ├── RequestRejected              4xx: the request is wrong; repeating it unchanged fails again
    │   ├── ValidationFailed         400 / 413 / 415 / 422, with the field errors (`errors`)
    │   ├── Unauthorized             401
    │   ├── Forbidden                403
    │   ├── NotFound                 404
    │   └── Conflict                 409: the Idempotency-Key or request_id was used with another command
    ├── RateLimited                  429, still refused when the retry budget ran out (`retry_after`)
    ├── Unavailable                  503, 504, a proxy's 502 or no connection, when the retry budget ran out
    ├── ServerError                  500, or 502: Kafka refused the command for good
    ├── CommandFailed                the command ended failed or expired (wait_for, or a 200 saying so)
    └── WaitTimeout                  wait_for: the stage was not reached in time (also a TimeoutError)

Every call that sends commands carries an Idempotency-Key, made once per call and reused by each of its
retries, so a retry after a lost answer is answered from the service's journal instead of publishing again.
Needs only httpx and msgspec.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

import httpx
import msgspec

from schemas import (
    STAGE_RANK,
    TERMINAL,
    VERSION,
    BatchCommandResponse,
    CommandList,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    FieldError,
    Health,
    Problem,
)

__all__ = [
    "AsyncPusherClient",
    "BatchResult",
    "CommandFailed",
    "CommandRequest",
    "CommandResult",
    "CommandStatus",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PusherClient",
    "PusherClientError",
    "RateLimited",
    "RequestRejected",
    "RetryPolicy",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "WaitTimeout",
]

Command = CommandRequest | Mapping[str, Any]  # a CommandRequest, or a dict of its fields
CommandResult = CommandResponse
BatchResult = BatchCommandResponse
DEFAULT_URL = "http://127.0.0.1:8000"
# Lifecycle stages in order; a command that reached a later stage has passed the earlier ones. `delivered`
# and `succeeded` are reported by connectors, through the service's status topic (KAFKA_STATUS_TOPIC).
FINAL_FAILURES = tuple(s for s in STAGE_RANK if s in TERMINAL and s != "succeeded")
STAGES = tuple(s for s in STAGE_RANK if s not in FINAL_FAILURES)
LONG_POLL = 25.0  # seconds one wait_for request may hold (the service allows LONG_POLL_MAX, 60 by default)


# ---------------------------------------------------------------- errors


class PusherClientError(Exception):
    """Base of every error the client raises."""

    def __init__(
        self, message: str, status: int | None = None, problem: Problem | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem
        self.retry_after = retry_after


class RequestRejected(PusherClientError):
    """The service refused the request itself (4xx); nothing was stored."""


class ValidationFailed(RequestRejected):
    """The command breaks the schema or a rule; `errors` names each field ($.commands[3].qos)."""

    @property
    def errors(self) -> list[FieldError]:
        """The field errors the service listed."""
        return list(self.problem.errors or []) if self.problem else []


class Unauthorized(RequestRejected):
    """No API key, or one the service does not know."""


class Forbidden(RequestRejected):
    """The API key lacks the scope, or may not command this device."""


class NotFound(RequestRejected):
    """No such command (or it belongs to another API key)."""


class Conflict(RequestRejected):
    """The Idempotency-Key or request_id was used before with a different command."""


class RateLimited(PusherClientError):
    """Still over the service's rate limit when the retry budget ran out."""


class Unavailable(PusherClientError):
    """No answer, or 503/504, until the retry budget ran out; retrying later with the same key is safe."""


class ServerError(PusherClientError):
    """A 5xx that retrying does not cure: an internal error, or Kafka refusing the command for good (502)."""


class CommandFailed(PusherClientError):
    """The command ended `failed`, `rejected` or `expired`: seen by wait_for (`command` is its CommandStatus,
    with history), or answered so when sending (`command` is the CommandResult, e.g. a replay of a command
    Kafka refused)."""

    def __init__(self, command: CommandStatus | CommandResponse) -> None:
        error = command.error.detail if isinstance(command.error, Problem) else command.error
        detail = error or getattr(command, "message", None) or "no detail"
        super().__init__(f"Command {command.request_id} ended {command.status}: {detail}")
        self.command = command


class WaitTimeout(PusherClientError, TimeoutError):
    """wait_for: the stage was not reached within the timeout; `command` is the last status seen."""

    def __init__(self, command: CommandStatus, until: str, timeout: float) -> None:
        super().__init__(f"Command {command.request_id} is {command.status}, not {until}, after {timeout:g} s")
        self.command = command


_ERRORS_BY_STATUS: dict[int, type[PusherClientError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: ValidationFailed,
    415: ValidationFailed,
    422: ValidationFailed,
    429: RateLimited,
    503: Unavailable,
    504: Unavailable,
}


# ---------------------------------------------------------------- retries


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How long one call keeps retrying: connection errors, 408, 429, 503, 504 and a proxy's 502."""

    attempts: int = 8  # tries in all, the first included
    deadline: float = 30.0  # seconds for the whole call, waits included
    backoff: float = 0.1  # first wait; doubles each time, with jitter
    max_backoff: float = 5.0

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before try `attempt + 1`: the server's Retry-After when it gave one, else jittered backoff."""
        if retry_after is not None:
            return retry_after
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


NO_RETRY = RetryPolicy(attempts=1)


class _Call(NamedTuple):
    """One HTTP request to make, and the Struct its 2xx body decodes into."""

    method: str
    path: str
    kind: type
    content: bytes | None = None
    headers: dict[str, str] | None = None
    params: dict[str, Any] | None = None
    read_timeout: float | None = None  # for a long poll: longer than the client's usual timeout

    def arguments(self) -> dict[str, Any]:
        """The call as httpx's `request()` arguments (a long poll's read timeout outlasts its wait)."""
        timeout = httpx.USE_CLIENT_DEFAULT if self.read_timeout is None else httpx.Timeout(10.0, read=self.read_timeout)
        return {
            "method": self.method,
            "url": self.path,
            "content": self.content,
            "headers": self.headers,
            "params": self.params,
            "timeout": timeout,
        }


class _Core:
    """What the sync and asyncio clients share: building requests, reading answers, deciding on retries."""

    def __init__(self, base_url: str | None, api_key: str | None, retry: RetryPolicy) -> None:
        self.base_url = (base_url or os.environ.get("PUSHER_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PUSHER_API_KEY") or None
        self.retry = retry
        self.headers = {"User-Agent": f"preservarium-pusher-client/{VERSION}", "Accept": "application/json"}
        if self.api_key:  # Bearer works whatever API_KEY_HEADER the service names
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def push(self, command: Command, idempotency_key: str | None, respond_async: bool) -> _Call:
        """POST /api/v1/commands."""
        body = _encode(_command_fields(command))
        return _Call("POST", "/api/v1/commands", CommandResponse, body, _send_headers(idempotency_key, respond_async))

    def push_batch(self, commands: Iterable[Command], idempotency_key: str | None, respond_async: bool) -> _Call:
        """POST /api/v1/commands/batch."""
        body = _encode({"commands": [_command_fields(c) for c in commands]})
        headers = _send_headers(idempotency_key, respond_async)
        return _Call("POST", "/api/v1/commands/batch", BatchCommandResponse, body, headers)

    def status(self, request_id: str, wait_for: str | None = None, timeout: float = 0.0) -> _Call:
        """GET /api/v1/commands/{request_id}/status, as a long poll for `wait_for` when given."""
        path = f"/api/v1/commands/{_path_segment(request_id)}/status"
        if wait_for is None:
            return _Call("GET", path, CommandStatus)
        params = {"wait_for": wait_for, "timeout": round(timeout, 3)}
        return _Call("GET", path, CommandStatus, params=params, read_timeout=timeout + 10.0)

    def list(self, device_id: str | None, status: str | None, limit: int, before: int | None) -> _Call:
        """GET /api/v1/commands?device_id=&status=&limit=&before=."""
        params = {"device_id": device_id, "status": status, "limit": limit, "before": before}
        return _Call("GET", "/api/v1/commands", CommandList, params={k: v for k, v in params.items() if v is not None})

    def retry_wait(
        self, attempt: int, started: float, response: httpx.Response | None, retry: RetryPolicy | None = None
    ) -> float | None:
        """Seconds to wait before trying again, or None when this outcome is final (or the budget is spent)."""
        if response is not None and not _retriable(response):
            return None
        policy = retry or self.retry
        retry_after = _retry_after(response) if response is not None else None
        wait = policy.wait(attempt, retry_after)
        if attempt + 1 >= policy.attempts or time.monotonic() - started + wait > policy.deadline:
            return None
        return wait

    def result(self, call: _Call, response: httpx.Response) -> Any:
        """The decoded 2xx body, or the typed error for anything else."""
        if response.is_success:
            try:
                result = msgspec.json.decode(response.content, type=call.kind)
            except msgspec.DecodeError as exc:
                raise ServerError(f"Unreadable answer from {call.path}: {exc}", response.status_code) from None
            # A 200 can carry an end that is no success: expired before publishing, or the replay of a
            # command Kafka refused (the first answer was lost). The caller must not take it for sent.
            if isinstance(result, CommandResponse) and not result.success:
                raise CommandFailed(result)
            return result
        raise _error_for(response)

    def unreachable(self, call: _Call, exc: httpx.TransportError) -> Unavailable:
        """The error for a call that never got an answer."""
        return Unavailable(f"No answer from {self.base_url}{call.path}: {type(exc).__name__}: {exc}".rstrip(": "))


def _command_fields(command: Command) -> dict[str, Any]:
    fields = msgspec.structs.asdict(command) if isinstance(command, msgspec.Struct) else dict(command)
    return {name: value for name, value in fields.items() if value is not None}


def _encode(body: Any) -> bytes:
    try:
        return msgspec.json.encode(body)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValidationFailed(f"The command cannot be encoded as JSON: {exc}") from None


def _send_headers(idempotency_key: str | None, respond_async: bool) -> dict[str, str]:
    # One key per logical call: every retry of this call carries the same one.
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if respond_async:
        headers["Prefer"] = "respond-async"
    return headers


def _path_segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _problem(response: httpx.Response) -> Problem | None:
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        return msgspec.json.decode(response.content, type=Problem)
    except msgspec.DecodeError:
        return None


def _retriable(response: httpx.Response) -> bool:
    status = response.status_code
    if status == 502:  # ours means Kafka refused the command for good; a proxy's means try again
        return _problem(response) is None
    return status in (408, 429, 503, 504)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_for(response: httpx.Response) -> PusherClientError:
    problem = _problem(response)
    status = response.status_code
    kind = _ERRORS_BY_STATUS.get(status) or (RequestRejected if status < 500 else ServerError)
    if status in (408, 502) and problem is None:  # a proxy's, or a body too slow: try later, nothing refused
        kind = Unavailable
    if problem is not None:
        message = f"{status} {problem.title}: {problem.detail}"
    else:
        message = f"{status} {response.reason_phrase}: {response.text[:200]}".rstrip(": ")
    return kind(message, status, problem, _retry_after(response))


class _Wait:
    """One `wait_for`: the long polls to make and when to stop; the clients only send them and sleep."""

    def __init__(self, core: _Core, request_id: str, until: str, timeout: float) -> None:
        if until not in STAGES:
            raise ValueError(f"until must be one of {', '.join(STAGES)}, not {until!r}")
        self.core, self.request_id, self.until, self.timeout = core, request_id, until, timeout
        self.deadline = time.monotonic() + timeout
        self.asked = self.started = 0.0

    def next_poll(self) -> _Call:
        """The next long poll, holding at most LONG_POLL seconds and never past the deadline."""
        self.asked, self.started = min(max(0.0, self.deadline - time.monotonic()), LONG_POLL), time.monotonic()
        return self.core.status(self.request_id, self.until, self.asked)

    def pause_after(self, command: CommandStatus) -> float | None:
        """None when `command` reached the stage; else seconds to pause before the next poll. Raises
        CommandFailed at a failed end and WaitTimeout past the deadline."""
        if command.status in FINAL_FAILURES:
            raise CommandFailed(command)
        if STAGES.index(command.status) >= STAGES.index(self.until):
            return None
        now = time.monotonic()
        if self.deadline - now <= 0:
            raise WaitTimeout(command, self.until, self.timeout)
        # A long poll answered well before its time without the stage (a service shutting down, or one that
        # does not hold polls) is not asked again at once: half a second's pause, within the deadline.
        if now - self.started >= self.asked - 1.0:
            return 0.0
        return max(0.0, min(0.5, self.deadline - now))


# ---------------------------------------------------------------- clients


class PusherClient:
    """Blocking client; one per application, reused across calls and threads (httpx pools connections).

    base_url and api_key default to $PUSHER_URL and $PUSHER_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._core = _Core(base_url, api_key, retry or RetryPolicy())
        self.base_url = self._core.base_url
        self._http = httpx.Client(base_url=self.base_url, headers=self._core.headers, timeout=timeout)

    def __enter__(self) -> PusherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def push_command(
        self,
        device_id: str,
        command_type: str,
        payload: Mapping[str, Any],
        protocol: str,
        *,
        parser_script_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        qos: int | None = None,
        retain: bool | None = None,
        confirmable: bool | None = None,
        request_id: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command: `status` is "published" (Kafka acknowledged) or "accepted" (journaled, to follow)."""
        fields = locals()
        command = {name: fields[name] for name in CommandRequest.__struct_fields__ if name in fields}
        return self.send(command, idempotency_key=idempotency_key, respond_async=respond_async)

    def send(
        self,
        command: Command,
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command given as a CommandRequest or a dict of its fields."""
        return self._request(self._core.push(command, idempotency_key, respond_async))

    def push_commands(
        self,
        commands: Iterable[Command],
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> BatchResult:
        """Send several commands in one request; each item succeeds or fails on its own (see `results`)."""
        return self._request(self._core.push_batch(commands, idempotency_key, respond_async))

    def get_status(self, request_id: str) -> CommandStatus:
        """A command's current status and history."""
        return self._request(self._core.status(request_id))

    def list_commands(
        self, device_id: str | None = None, status: str | None = None, *, limit: int = 50, before: int | None = None
    ) -> CommandList:
        """Recent commands, newest first; pass `next_before` as `before` for the next page."""
        return self._request(self._core.list(device_id, status, limit, before))

    def wait_for(self, request_id: str, until: str = "published", timeout: float = 30.0) -> CommandStatus:
        """Wait (long polls) until the command reaches `until`; raises CommandFailed or WaitTimeout otherwise."""
        wait = _Wait(self._core, request_id, until, timeout)
        while True:
            command = self._request(wait.next_poll())
            pause = wait.pause_after(command)
            if pause is None:
                return command
            time.sleep(pause)

    def health(self, retry: RetryPolicy | None = None) -> Health:
        """GET /health: the service answers (retrying as `retry` says, default the client's policy)."""
        return self._request(_Call("GET", "/health", Health), retry)

    def _request(self, call: _Call, retry: RetryPolicy | None = None) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                response = self._http.request(**call.arguments())
            except httpx.TransportError as exc:
                wait = self._core.retry_wait(attempt, started, None, retry)
                if wait is None:
                    raise self._core.unreachable(call, exc) from exc
            else:
                wait = self._core.retry_wait(attempt, started, response, retry)
                if wait is None:
                    return self._core.result(call, response)
            time.sleep(wait)
            attempt += 1


class AsyncPusherClient:
    """asyncio client with the same methods as PusherClient, each a coroutine."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._core = _Core(base_url, api_key, retry or RetryPolicy())
        self.base_url = self._core.base_url
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._core.headers, timeout=timeout)

    async def __aenter__(self) -> AsyncPusherClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def push_command(
        self,
        device_id: str,
        command_type: str,
        payload: Mapping[str, Any],
        protocol: str,
        *,
        parser_script_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        qos: int | None = None,
        retain: bool | None = None,
        confirmable: bool | None = None,
        request_id: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command: `status` is "published" (Kafka acknowledged) or "accepted" (journaled, to follow)."""
        fields = locals()
        command = {name: fields[name] for name in CommandRequest.__struct_fields__ if name in fields}
        return await self.send(command, idempotency_key=idempotency_key, respond_async=respond_async)

    async def send(
        self,
        command: Command,
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command given as a CommandRequest or a dict of its fields."""
        return await self._request(self._core.push(command, idempotency_key, respond_async))

    async def push_commands(
        self,
        commands: Iterable[Command],
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> BatchResult:
        """Send several commands in one request; each item succeeds or fails on its own (see `results`)."""
        return await self._request(self._core.push_batch(commands, idempotency_key, respond_async))

    async def get_status(self, request_id: str) -> CommandStatus:
        """A command's current status and history."""
        return await self._request(self._core.status(request_id))

    async def list_commands(
        self, device_id: str | None = None, status: str | None = None, *, limit: int = 50, before: int | None = None
    ) -> CommandList:
        """Recent commands, newest first; pass `next_before` as `before` for the next page."""
        return await self._request(self._core.list(device_id, status, limit, before))

    async def wait_for(self, request_id: str, until: str = "published", timeout: float = 30.0) -> CommandStatus:
        """Wait (long polls) until the command reaches `until`; raises CommandFailed or WaitTimeout otherwise."""
        wait = _Wait(self._core, request_id, until, timeout)
        while True:
            command = await self._request(wait.next_poll())
            pause = wait.pause_after(command)
            if pause is None:
                return command
            await asyncio.sleep(pause)

    async def health(self, retry: RetryPolicy | None = None) -> Health:
        """GET /health: the service answers (retrying as `retry` says, default the client's policy)."""
        return await self._request(_Call("GET", "/health", Health), retry)

    async def _request(self, call: _Call, retry: RetryPolicy | None = None) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                response = await self._http.request(**call.arguments())
            except httpx.TransportError as exc:
                wait = self._core.retry_wait(attempt, started, None, retry)
                if wait is None:
                    raise self._core.unreachable(call, exc) from exc
            else:
                wait = self._core.retry_wait(attempt, started, response, retry)
                if wait is None:
                    return self._core.result(call, response)
            await asyncio.sleep(wait)
            attempt += 1
