"""The service's exceptions, each answering one RFC 9457 problem.

    PusherError                      500: status, slug, title; `retry_after` when retrying helps
    ├── RequestError                 400: the client's request is wrong (4xx)
    │   ├── MalformedBody            400: not JSON / msgpack, with the byte position
    │   ├── BodyTooLarge             413: over MAX_BODY_BYTES (by Content-Length, or as a chunked body streams)
    │   ├── UnsupportedMediaType     415: a body neither JSON nor MessagePack
    │   ├── ValidationFailed         422: field errors with their paths ($.commands[3].qos)
    │   ├── NotFound                 404: no such route, or no such command for this key
    │   ├── MethodNotAllowed         405: the route exists, not with this method
    │   ├── IdempotencyConflict      409: the key was used before with another body
    │   ├── NotCancellable           409: the command was handed to Kafka (or ended) before it could be cancelled
    │   ├── Unauthorized             401: no valid API key (with WWW-Authenticate)
    │   ├── Forbidden                403: the key lacks the scope, or the device is not its own
    │   ├── RateLimited              429: over RATE_LIMIT (with Retry-After and RateLimit-*)
    │   ├── TooManyWaiters           429: the key holds MAX_WAITERS_PER_KEY long polls and streams already
    │   ├── RequestTimeout           408: the body did not arrive within BODY_TIMEOUT
    │   └── HeadersTooLarge          431: request headers over MAX_HEADER_BYTES
    ├── SinkError                    503: Kafka could not take the command; `uncertain`, `sent` say what it knows
    │   ├── SinkUnavailable          503: no broker reachable / producer not connected (retriable)
    │   ├── SinkTimeout              503: no acknowledgement within PUBLISH_TIMEOUT (retriable)
    │   └── MessageRejected          502: Kafka refused it for good (too large, not authorised, …)
    ├── JournalError                 503: the command could not be made durable locally
    │   ├── JournalFull              503: JOURNAL_MAX_PENDING, JOURNAL_MAX_BYTES or JOURNAL_MAX_DISK reached
    │   └── JournalUnavailable       503: the file cannot be written (disk full, read-only, I/O error)
    ├── Overloaded                   503: LIMIT_CONCURRENCY requests or MAX_WAITERS waiters in flight
    ├── RateLimiterUnavailable       503: RATE_LIMIT_STORAGE does not answer
    └── ShuttingDown                 503: a signal was received; this instance takes no new commands

kafka-python's own errors are translated into these in kafka_sink.py, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field: where (a msgspec path such as `$.commands[3].qos`) and what is wrong."""

    loc: str
    msg: str


class PusherError(Exception):
    """Base of every error the service answers with a problem+json body."""

    status = 500
    slug = "internal-error"
    title = "Internal server error"
    retry_after: int | None = None

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class RequestError(PusherError):
    """The request itself is wrong; repeating it unchanged will fail again."""

    status = 400
    slug = "bad-request"
    title = "Bad request"


class MalformedBody(RequestError):
    """The body could not be decoded."""

    status = 400
    slug = "malformed-body"
    title = "Malformed request body"


class BodyTooLarge(RequestError):
    """The body is larger than MAX_BODY_BYTES."""

    status = 413
    slug = "body-too-large"
    title = "Request body too large"


class UnsupportedMediaType(RequestError):
    """The Content-Type is neither JSON nor msgpack."""

    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class ValidationFailed(RequestError):
    """The body decoded but breaks the schema or a rule; `errors` names each field."""

    status = 422
    slug = "validation-error"
    title = "Validation failed"

    def __init__(self, errors: list[FieldProblem]) -> None:
        detail = "; ".join(f"{e.loc}: {e.msg}" for e in errors[:5])
        super().__init__(detail)
        self.errors = errors


class NotFound(RequestError):
    """No such resource."""

    status = 404
    slug = "not-found"
    title = "Not found"


class SinkError(PusherError):
    """Kafka did not take the command; `retriable` says whether trying again can help."""

    status = 503
    slug = "kafka-unavailable"
    title = "Kafka unavailable"
    retriable = True
    retry_after = 2

    def __init__(self, detail: str, *, uncertain: bool = False, sent: bool = False) -> None:
        super().__init__(detail)
        self.uncertain = uncertain  # the record may have reached Kafka despite the error
        self.sent = sent  # the error came back after the record was sent


class SinkUnavailable(SinkError):
    """No broker is reachable, or the producer is not connected yet."""


class SinkTimeout(SinkError):
    """Kafka did not acknowledge within PUBLISH_TIMEOUT."""

    slug = "kafka-timeout"
    title = "Kafka did not acknowledge in time"


class MessageRejected(SinkError):
    """Kafka refused the record for good (too large, not authorised, invalid topic)."""

    status = 502
    slug = "kafka-rejected"
    title = "Kafka rejected the command"
    retriable = False
    retry_after = None


class MethodNotAllowed(RequestError):
    """The route exists but not with this method."""

    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"


class IdempotencyConflict(RequestError):
    """The Idempotency-Key (or client request_id) was used before with a different body."""

    status = 409
    slug = "idempotency-conflict"
    title = "Idempotency key reused with a different request"


class NotCancellable(RequestError):
    """The command was already handed to Kafka, or already ended: it can no longer be cancelled."""

    status = 409
    slug = "not-cancellable"
    title = "Command can no longer be cancelled"


class JournalError(PusherError):
    """The command could not be made durable in the local journal; nothing was stored."""

    status = 503
    slug = "journal-unavailable"
    title = "Journal unavailable"
    retry_after = 5


class JournalFull(JournalError):
    """Too many commands are waiting for Kafka (JOURNAL_MAX_PENDING / JOURNAL_MAX_BYTES), or they fill the journal's
    files up to JOURNAL_MAX_DISK."""

    slug = "journal-full"
    title = "Journal full"


class JournalUnavailable(JournalError):
    """The journal file cannot be written: disk full, read-only, or an I/O error."""


class Unauthorized(RequestError):
    """No API key, an unknown one or a wrong one: all the same answer."""

    status = 401
    slug = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, {"WWW-Authenticate": 'Bearer realm="preservarium-pusher"'})


class Forbidden(RequestError):
    """A valid key without the right scope, or for a device outside its patterns."""

    status = 403
    slug = "forbidden"
    title = "Forbidden"


class RateLimited(RequestError):
    """Over RATE_LIMIT; Retry-After and RateLimit-* headers say when to come back."""

    status = 429
    slug = "rate-limited"
    title = "Too many requests"


class TooManyWaiters(RequestError):
    """The key (or client address) already holds MAX_WAITERS_PER_KEY long polls and event streams."""

    status = 429
    slug = "too-many-waiters"
    title = "Too many open long polls and event streams"
    retry_after = 5


class Overloaded(PusherError):
    """LIMIT_CONCURRENCY requests, or MAX_WAITERS waiters, are in flight; only what is over the limit is refused."""

    status = 503
    slug = "overloaded"
    title = "Overloaded"
    retry_after = 1


class RequestTimeout(RequestError):
    """The body trickled in slower than BODY_TIMEOUT allows."""

    status = 408
    slug = "request-timeout"
    title = "Request timeout"


class HeadersTooLarge(RequestError):
    """The request's headers together exceed MAX_HEADER_BYTES."""

    status = 431
    slug = "headers-too-large"
    title = "Request header fields too large"


class RateLimiterUnavailable(PusherError):
    """RATE_LIMIT_STORAGE (Redis) does not answer; the request was not processed."""

    status = 503
    slug = "rate-limiter-unavailable"
    title = "Rate limiter unavailable"
    retry_after = 2


class ShuttingDown(PusherError):
    """SIGTERM was received: no new commands are taken (the client should go to another instance or retry)."""

    status = 503
    slug = "shutting-down"
    title = "Shutting down"
    retry_after = 2
