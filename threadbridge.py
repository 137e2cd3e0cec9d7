"""Results from worker threads (the journal's writer and reader, Kafka's callbacks) handed to the event loop
in bursts.

`loop.call_soon_threadsafe` per result wakes the loop once per result (a write to its self-pipe, a GIL
hand-over, a pass of the loop), which under load costs a large share of the service's CPU. An Outbox
wakes the loop once for everything that arrived since its last pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


class Outbox:
    """Calls queued from any thread, run on one event loop in order, many per wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, call: Callable[..., Any], *args: Any) -> None:
        """Run `call(*args)` on the loop soon (from any thread)."""
        with self._lock:
            self._calls.append((call, args))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for call, args in calls:
            try:
                call(*args)
            except Exception as exc:  # one failing call must not drop the ones after it
                self.loop.call_exception_handler({"message": "Outbox call failed", "exception": exc})


def outbox_for(current: Outbox | None) -> Outbox:
    """`current` when it serves the running loop, else a new Outbox for it."""
    loop = asyncio.get_running_loop()
    return current if current is not None and current.loop is loop else Outbox(loop)


def resolve(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Give `future` its result (or `error`), on its loop via an Outbox, unless its waiter stopped waiting."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
