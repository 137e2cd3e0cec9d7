"""structlog, configured once: JSON lines in containers and pipes, a readable console on a TTY."""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import threading

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


class _LinesLogger(structlog.BytesLogger):
    """structlog's BytesLogger to stdout, except that lines made on a running event loop are written together
    once per pass of the loop: a write and a flush per line were about 6 % of the loop's time under load (a batch's
    lines, one per command, a fifth). Lines made elsewhere (another thread, before the loop runs) go out at once."""

    def __init__(self, *_: object) -> None:
        super().__init__(sys.stdout.buffer)

    def msg(self, message: bytes) -> None:
        """Write one line now, or hold it for the end of this pass of the running event loop."""
        loop = asyncio._get_running_loop()
        if loop is None:
            write_held_lines()  # a loop's last pass may have ended before writing its lines: they came first
            super().msg(message)
            return
        held = _pass.__dict__.setdefault("lines", [])
        held.append(message)
        if len(held) == 1:  # the first line of this pass: write them all in the next
            loop.call_soon(write_held_lines)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_pass = threading.local()  # one event loop per thread: each holds its own pass's lines


def write_held_lines() -> None:
    """Write the lines this thread's event loop has held (once per pass; again at exit, for what is left)."""
    held = _pass.__dict__.pop("lines", None)
    if held:
        structlog.BytesLogger(sys.stdout.buffer).msg(b"\n".join(held))


atexit.register(write_held_lines)


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
