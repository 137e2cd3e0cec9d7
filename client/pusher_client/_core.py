"""What the sync and asyncio clients share, without I/O: the requests to make, how to read the answers, when
to retry and how long to wait. The clients (client.py) only send, and sleep as this says.
"""

from __future__ import annotations

import os
import random
import re
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import httpx
import msgspec

from pusher_client.errors import (
    _ERRORS_BY_STATUS,
    CommandFailed,
    PusherClientError,
    RequestRejected,
    ServerError,
    TLSFailed,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from pusher_client.wire import (
    STAGE_RANK,
    TERMINAL,
    VERSION,
    BatchCommandResponse,
    CommandList,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    FanoutRequest,
    FanoutResponse,
    FanoutStatus,
    Problem,
    new_id,
)

Command = CommandRequest | Mapping[str, Any]  # a CommandRequest, or a dict of its fields
# How the service's certificate is checked: True (the system's CAs), a CA file (or directory) to trust instead,
# a ready SSLContext, or False (no check at all: only when asked for explicitly, never from the environment).
Verify = bool | str | os.PathLike[str] | ssl.SSLContext
# This client's certificate: a PEM file holding it and its key, (cert, key), or (cert, key, key password).
Cert = str | os.PathLike[str] | tuple[str, str] | tuple[str, str, str]
CommandResult = CommandResponse
BatchResult = BatchCommandResponse
DEFAULT_URL = "http://127.0.0.1:8000"
# Lifecycle stages in order; a command that reached a later stage has passed the earlier ones. `delivered`
# and `succeeded` are reported by connectors, through the service's status topic (KAFKA_STATUS_TOPIC).
FINAL_FAILURES = tuple(s for s in STAGE_RANK if s in TERMINAL and s != "succeeded")
STAGES = tuple(s for s in STAGE_RANK if s not in FINAL_FAILURES)
LONG_POLL = 25.0  # seconds one wait_for request may hold (the service allows LONG_POLL_MAX, 60 by default)


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

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        retry: RetryPolicy,
        verify: Verify | None = None,
        cert: Cert | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("PUSHER_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PUSHER_API_KEY") or None
        self.retry = retry
        self.ssl_context = tls_context(
            verify if verify is not None else os.environ.get("PUSHER_CA_FILE") or True,
            cert if cert is not None else _cert_from_environment(),
        )
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

    def fanout(self, fanout: FanoutRequest | Mapping[str, Any], idempotency_key: str | None) -> _Call:
        """POST /api/v1/commands/fanout."""
        fields = msgspec.structs.asdict(fanout) if isinstance(fanout, msgspec.Struct) else dict(fanout)
        body = _encode({name: value for name, value in fields.items() if value is not None})
        return _Call("POST", "/api/v1/commands/fanout", FanoutResponse, body, _send_headers(idempotency_key, False))

    def fanout_status(self, fanout_id: str) -> _Call:
        """GET /api/v1/fanouts/{fanout_id}."""
        return _Call("GET", f"/api/v1/fanouts/{_path_segment(fanout_id)}", FanoutStatus)

    def cancel(self, request_id: str) -> _Call:
        """DELETE /api/v1/commands/{request_id} (a repeat answers the same: safe to retry)."""
        return _Call("DELETE", f"/api/v1/commands/{_path_segment(request_id)}", CommandStatus)

    def status(self, request_id: str, wait_for: str | None = None, timeout: float = 0.0) -> _Call:
        """GET /api/v1/commands/{request_id}/status, as a long poll for `wait_for` when given."""
        path = f"/api/v1/commands/{_path_segment(request_id)}/status"
        if wait_for is None:
            return _Call("GET", path, CommandStatus)
        params = {"wait_for": wait_for, "timeout": round(timeout, 3)}
        return _Call("GET", path, CommandStatus, params=params, read_timeout=timeout + 10.0)

    def list(
        self, device_id: str | None, status: str | None, limit: int, before: int | None, fanout_id: str | None = None
    ) -> _Call:
        """GET /api/v1/commands?device_id=&status=&fanout_id=&limit=&before=."""
        params = {"device_id": device_id, "status": status, "fanout_id": fanout_id, "limit": limit, "before": before}
        return _Call("GET", "/api/v1/commands", CommandList, params={k: v for k, v in params.items() if v is not None})

    def retry_wait(
        self,
        attempt: int,
        started: float,
        response: httpx.Response | httpx.TransportError,
        retry: RetryPolicy | None = None,
    ) -> float | None:
        """Seconds to wait before trying again, or None when this outcome (an answer, or a transport error) is
        final, or the budget is spent."""
        if isinstance(response, httpx.Response) and not _retriable(response):
            return None
        if isinstance(response, httpx.TransportError) and _tls_error(response) is not None:
            return None  # a certificate that does not verify does not verify on the next try either
        policy = retry or self.retry
        retry_after = _retry_after(response) if isinstance(response, httpx.Response) else None
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
        """The error for a call that never got an answer: TLSFailed when TLS refused the connection."""
        tls = _tls_error(exc)
        if isinstance(tls, ssl.SSLCertVerificationError):
            return TLSFailed(
                f"TLS with {self.base_url}: the service's certificate does not verify "
                f"({getattr(tls, 'verify_message', None) or tls}); "
                "trust the CA that signed it (verify=, PUSHER_CA_FILE, --ca-file)"
            )
        if tls is not None:
            return TLSFailed(f"TLS with {self.base_url} failed: {getattr(tls, 'reason', None) or tls}")
        message = f"No answer from {self.base_url}{call.path}: {type(exc).__name__}: {exc}".rstrip(": ")
        # A service that requires client certificates closes a connection without one it trusts, saying nothing:
        # in the handshake (TLS 1.2) or when the request is read (1.3).
        dropped = isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)
        if self.base_url.startswith("https:") and (dropped or any(isinstance(e, ssl.SSLError) for e in _chain(exc))):
            message += "; a service that requires client certificates closes connections without one it trusts"
        return Unavailable(message)


def tls_context(verify: Verify, cert: Cert | None) -> ssl.SSLContext:
    """The client's TLS context: the service's certificate checked as `verify` says, `cert` presented when given.
    A CA or certificate file that does not load is a ValueError naming it."""
    try:
        if isinstance(verify, bool | ssl.SSLContext):
            context = httpx.create_ssl_context(verify)  # True: httpx's own default (certifi, or SSL_CERT_FILE)
        elif os.path.isdir(verify):
            context = ssl.create_default_context(capath=verify)
        else:
            context = ssl.create_default_context(cafile=verify)
    except OSError as exc:  # ssl.SSLError is one
        raise ValueError(f"CA file {os.fspath(verify)!r}: {_load_error(exc)}") from None
    if cert is not None:
        parts = (cert,) if isinstance(cert, str | os.PathLike) else tuple(cert)
        try:
            context.load_cert_chain(*parts)
        except OSError as exc:
            files = " with key ".join(repr(os.fspath(part)) for part in parts[:2])
            raise ValueError(f"client certificate {files}: {_load_error(exc)}") from None
    return context


def _cert_from_environment() -> Cert | None:
    certfile, keyfile = os.environ.get("PUSHER_CLIENT_CERT"), os.environ.get("PUSHER_CLIENT_KEY")
    if keyfile and not certfile:
        raise ValueError("PUSHER_CLIENT_KEY is set without PUSHER_CLIENT_CERT")
    if not certfile:
        return None
    return (certfile, keyfile) if keyfile else certfile


def _load_error(exc: OSError) -> str:
    """Why a certificate file did not load, in words (OpenSSL's reason, else the OS error)."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", str(exc.args[-1]))
        return f"not PEM, or not a certificate with its key ({reason})"
    return exc.strerror or str(exc)


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a transport error when trying again cannot help: a certificate that does not verify,
    an alert, a protocol the other end does not speak. An end of stream in the handshake is not one of them: a
    restarting service does that too."""
    transient = ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    return next((e for e in _chain(exc) if isinstance(e, ssl.SSLError) and not isinstance(e, transient)), None)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception and those behind it (httpx's error, httpcore's, the socket's or ssl's)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def _command_arguments(arguments: Mapping[str, Any], kind: type[msgspec.Struct] = CommandRequest) -> dict[str, Any]:
    """The fields of a `kind` body among a method's arguments (`locals()`); the others are the call's options."""
    return {name: arguments[name] for name in kind.__struct_fields__ if name in arguments}


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
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key or new_id()}
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
