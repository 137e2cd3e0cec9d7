"""The process: settings read once, uvicorn with this service's connection limits, signals and the drain.

`python -m pusher` (and the `pusher-server` command, and the container) end in `main()` here. The app it
serves is pusher.py's; this module adds what only a process has: its command line (`keygen`), the one-line
refusal of a bad setting (exit 2), the listener's TLS (HTTPS, client certificates), faulthandler on SIGUSR1,
and the shutdown that drains on the first SIGTERM and exits on the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import gc
import os
import re
import signal
import ssl
import sys
import uuid
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette

from http_protocol import http_protocol
from logs import configure_logging
from pusher import app_state, create_app
from security import new_key
from settings import Settings, SettingsError, load_settings

log = structlog.get_logger("pusher")


def settings_or_exit() -> Settings:
    """The settings from the environment, logging configured by them; a bad value prints its one line, exit 2."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"pusher: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def app_or_exit(settings: Settings) -> Starlette:
    """The app for `settings`; an unreadable API_KEYS_FILE prints its one line, exit 2."""
    try:
        return create_app(settings)
    except ValueError as exc:
        print(f"pusher: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def app_for_uvicorn() -> Starlette:
    """The app of `uvicorn pusher:app`, from the environment. uvicorn makes that listener itself (its --ssl-*
    options), so API_TLS_* would be ignored there: they stop the start instead of serving plain HTTP."""
    settings = settings_or_exit()
    if settings.https:
        print(
            "pusher: API_TLS_CERTFILE is applied by `python -m pusher`; under `uvicorn pusher:app` unset API_TLS_* "
            "and give uvicorn --ssl-certfile and --ssl-keyfile (and --ssl-ca-certs with --ssl-cert-reqs 2)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return app_or_exit(settings)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS, or None for plain HTTP: API_TLS_CERTFILE and API_TLS_KEYFILE served with TLS 1.2 at
    least; with API_TLS_CLIENT_CAFILE, a client certificate signed by that CA is required in the handshake.
    A certificate, key or CA that does not load is a SettingsError naming the variable."""
    if not settings.https:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    secret = settings.api_tls_keyfile_password
    password = secret.value if secret is not None else ""  # never None: OpenSSL would prompt on the terminal
    try:
        context.load_cert_chain(settings.api_tls_certfile, settings.api_tls_keyfile, lambda: password)
    except OSError as exc:  # ssl.SSLError is one
        hint = "" if secret is not None else "; an encrypted key needs API_TLS_KEYFILE_PASSWORD"
        raise SettingsError(
            f"API_TLS_CERTFILE={settings.api_tls_certfile!r} with API_TLS_KEYFILE={settings.api_tls_keyfile!r}: "
            f"not a PEM certificate and its private key ({_reason(exc)}){hint}"
        ) from None
    if settings.api_tls_client_cafile:
        try:
            context.load_verify_locations(cafile=settings.api_tls_client_cafile)
        except OSError as exc:
            raise SettingsError(
                f"API_TLS_CLIENT_CAFILE={settings.api_tls_client_cafile!r} is invalid: not PEM CA certificates "
                f"({_reason(exc)})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError) -> str:
    """OpenSSL's reason (`KEY_VALUES_MISMATCH`), or the error's text without OpenSSL's C file and line."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", str(exc.args[-1]))
    return exc.strerror or str(exc)


def tls_or_exit(settings: Settings) -> ssl.SSLContext | None:
    """tls_context(settings); one that does not load prints its one line, exit 2."""
    try:
        return tls_context(settings)
    except SettingsError as exc:
        print(f"pusher: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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
    settings = settings_or_exit()
    tls = tls_or_exit(settings)
    # `kill -USR1 PID` prints every thread's stack to stderr: how to see where a stuck process stands.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    app = app_or_exit(settings)
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
        # The context is built (and its files checked) above, so a bad one is a settings error, not a traceback.
        ssl_context_factory=None if tls is None else lambda config, default: tls,
    )
    DrainingServer(config, app, settings.shutdown_drain, handshake_timeout=settings.header_timeout).run()


def settle_garbage_collector() -> None:
    """Once started: what start-up made (modules, the app, a recovered backlog) lives as long as the process, so it
    leaves the collector's sight (`gc.freeze`), and the youngest generation is collected every 10,000 container
    allocations instead of 700. Under load a full collection walked all of it, ~50 ms of the event loop each,
    ~35 times in 20 s, and the young ones ran thousands of times: ~12 % of a core in all. Cycles are still
    collected, only later; everything else is freed by reference counting as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000)


class DrainingServer(uvicorn.Server):
    """uvicorn with the shutdown this service promises. The first SIGTERM/SIGINT stops taking commands (503,
    /ready false) for SHUTDOWN_DRAIN seconds, so load balancers move away, then shuts down gracefully:
    in-flight requests finish and the producer is flushed within SHUTDOWN_TIMEOUT. A second signal exits at
    once — safe, because everything answered 2xx is in Kafka or in the journal already."""

    def __init__(self, config: uvicorn.Config, app: Starlette, drain: float, handshake_timeout: float = 60.0) -> None:
        super().__init__(config)
        self.app_state = app_state(app)
        self.drain = drain
        self.handshake_timeout = handshake_timeout
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        """Note the event loop, which the signal handler hands its work to; listen; then settle the collector."""
        self.loop = asyncio.get_running_loop()
        await self._listen(sockets)
        settle_garbage_collector()

    async def _listen(self, sockets: list | None) -> None:
        """uvicorn's start-up, with the TLS handshake bounded."""
        if not self.config.is_ssl:
            await super().startup(sockets)
            return
        loop = self.loop
        # The protocol's head deadline starts when the handshake is done; until then only the loop's
        # ssl_handshake_timeout (60 s by default) bounds a socket, and uvicorn passes none. The listeners made
        # here get HEADER_TIMEOUT, so a client that never ends its handshake holds a connection no longer
        # than one that never ends its head (http_protocol.py counts both from the accept).
        loop.create_server = functools.partial(loop.create_server, ssl_handshake_timeout=self.handshake_timeout)
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server

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
        watchers = getattr(self.app_state, "watchers", None)  # unset when the lifespan never started
        if watchers is not None:  # long polls and event streams answer now instead of holding the shutdown
            watchers.close()
