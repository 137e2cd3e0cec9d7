"""Every error the client raises, from one base; each says whether repeating the call can help.

    PusherClientError                the base; `status` and the service's RFC 9457 `problem` when there was one
    ├── RequestRejected              4xx: the request is wrong; repeating it unchanged fails again
    │   ├── ValidationFailed         400 / 413 / 415 / 422, with the field errors (`errors`)
    │   ├── Unauthorized             401
    │   ├── Forbidden                403
    │   ├── NotFound                 404
    │   └── Conflict                 409: the Idempotency-Key or request_id was used with another command
    ├── RateLimited                  429, still refused when the retry budget ran out (`retry_after`)
    ├── Unavailable                  503, 504, a proxy's 502 or no connection, when the retry budget ran out
    │   └── TLSFailed                TLS refused the connection (a certificate that does not verify): no retries
    ├── ServerError                  500, or 502: Kafka refused the command for good
    ├── CommandFailed                the command ended failed or expired (wait_for, or a 200 saying so)
    └── WaitTimeout                  wait_for: the stage was not reached in time (also a TimeoutError)

A RequestRejected stored nothing; after Unavailable or RateLimited, retrying later with the same Idempotency-Key
is safe.
"""

from __future__ import annotations

from pusher_client.wire import CommandResponse, CommandStatus, FieldError, Problem


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
    """409: the Idempotency-Key, request_id or fanout_id was used before with a different command, or a cancel came
    after the command was handed to Kafka (the problem's `detail` names its status)."""


class RateLimited(PusherClientError):
    """Still over the service's rate limit when the retry budget ran out."""


class Unavailable(PusherClientError):
    """No answer, or 503/504, until the retry budget ran out; retrying later with the same key is safe."""


class TLSFailed(Unavailable):
    """TLS refused the connection for a reason trying again does not cure: the service's certificate does not verify
    against the CA given (verify, PUSHER_CA_FILE) or does not name the URL's host, or the other end answered the
    handshake with an alert or not in TLS. Raised at once, without retries."""


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
