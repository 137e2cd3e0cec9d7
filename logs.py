"""structlog, configured once: JSON lines in containers and pipes, a readable console on a TTY."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar

import msgspec
import structlog


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Route structlog and the stdlib loggers (uvicorn, kafka-python) to stdout, one format for all."""
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(serializer=_json)
    # The service's own lines (two per request) go through msgspec straight to bytes: a third of the cost
    # of json.dumps to a str, encoded again by print().
    fast = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(serializer=_json_bytes)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelNamesMapping()[level]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, fast],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout) if console else _LinesLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(redact_secrets)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # uvicorn's own lines (start-up, shutdown, protocol errors) come here too, at LOG_LEVEL: under `uvicorn
    # pusher:app` its command line has given its loggers handlers and levels of their own (text, on stderr).
    for name in _UVICORN_LOGGERS:
        uvicorn_log = logging.getLogger(name)
        uvicorn_log.handlers.clear()
        uvicorn_log.setLevel(logging.NOTSET)
        uvicorn_log.propagate = True
    logging.captureWarnings(True)  # a library's warning is a log line like any other, not text on stderr
    # kafka-python logs each failed reconnect at ERROR, dozens a second in an outage; our own lines
    # say when Kafka comes and goes and why a command failed. LOG_LEVEL=DEBUG shows its lines again.
    # (Its ERROR lines are still made, for the sink to watch for refused credentials.)
    kafka_log = logging.getLogger("kafka")
    kafka_log.setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.ERROR)
    kafka_log.propagate = numeric <= logging.DEBUG


_ENCODER = msgspec.json.Encoder(enc_hook=str)
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
_held: ContextVar[list[bytes] | None] = ContextVar("held_log_lines", default=None)


class _LinesLogger(structlog.BytesLogger):
    """structlog's BytesLogger to stdout, except that lines made inside `lines_together()` are held for it."""

    def __init__(self, *_: object) -> None:
        super().__init__(sys.stdout.buffer)

    def msg(self, message: bytes) -> None:
        """Write one line, or hold it for the enclosing `lines_together()`."""
        held = _held.get()
        if held is None:
            super().msg(message)
        else:
            held.append(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


@contextlib.contextmanager
def lines_together() -> Iterator[None]:
    """Write the lines logged inside in one write: a write and a flush for each line of a batch would take a
    fifth of the event loop's time on it. Only for code that does not await inside."""
    held: list[bytes] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
        if held:
            _LinesLogger().msg(b"\n".join(held))


def _json_bytes(event: dict, **_: object) -> bytes:
    return _ENCODER.encode(event)


def _json(event: dict, **_: object) -> str:
    """The same JSON as the service's own lines, as the str the stdlib's formatter returns."""
    return _ENCODER.encode(event).decode()


# A repr'd string is quoted with ' or " (whichever it does not contain), with backslash escapes.
_SECRET = re.compile(
    r"""(['"](?:sasl_plain_password|ssl_password|sasl_oauth_token_provider)['"]:\s*)"""
    r"""(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|[^,}\s]+)"""
)


def redact_secrets(record: logging.LogRecord) -> bool:
    """Mask passwords in kafka-python's lines (it logs its whole configuration at DEBUG)."""
    if record.name.startswith("kafka"):
        message = record.getMessage()
        masked = _SECRET.sub(r"\1'***'", message)
        if masked != message:
            record.msg, record.args = masked, None
    return True
