"""Who is served now: requests in flight, and waiters (long polls, event streams) on a budget of their own.

A request takes one of LIMIT_CONCURRENCY slots while it runs; /health and /ready take none, so a probe
answers however busy the service is. A request that starts waiting for a command's next transition gives
its slot back and takes one of MAX_WAITERS instead, at most MAX_WAITERS_PER_KEY per key (or per client
address without keys): waiting clients can never keep a command POST, /health or /ready from answering.
Whatever is over a budget is refused at once (503 Overloaded, 429 TooManyWaiters); what is under it is
served. Revoking a key ends its waiters. Everything here runs on the event loop, so plain counters suffice.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Iterable

from errors import Overloaded, TooManyWaiters

PROBES = frozenset({"/health", "/ready"})  # answer at once, under any load and while shutting down


class Bell:
    """What wakes one waiter: a change to its command, its end, or shutdown. An `asyncio.Event` for a single
    waiter, without the Event's dict and deque (~700 bytes less for each of thousands); `Alarms.wait` waits on it."""

    __slots__ = ("_future", "rung")

    def __init__(self) -> None:
        self.rung = False
        self._future: asyncio.Future | None = None

    def set(self) -> None:
        """Ring it: the waiter wakes, and a later wait returns at once until `clear()`."""
        self.rung = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    def clear(self) -> None:
        """Forget the last ring."""
        self.rung = False


class Alarms:
    """Ends the waits on bells at their deadlines from one timer of the event loop, set for the earliest: a uvloop
    timer for each waiter would hold ~600 bytes more, and there may be thousands. A wait that ends early leaves its
    entry behind, marked; the marked ones are dropped once they are half the heap."""

    def __init__(self) -> None:
        self._heap: list[list] = []  # [deadline (loop time), tie-breaker, the wait's future or None once it ended]
        self._live = 0
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    async def wait(self, bell: Bell, timeout: float) -> bool:
        """Wait until `bell` rings or `timeout` seconds pass; whether it rang."""
        if bell.rung:
            return True
        loop = asyncio.get_running_loop()
        bell._future = future = loop.create_future()
        entry = [loop.time() + timeout, next(self._order), future]
        self._add(loop, entry)
        try:
            await future
        finally:
            bell._future = None
            if entry[2] is not None:
                entry[2] = None
                self._live -= 1
        return bell.rung

    def _add(self, loop: asyncio.AbstractEventLoop, entry: list) -> None:
        heap = self._heap
        if len(heap) > 64 and len(heap) > 2 * self._live:
            heap[:] = [kept for kept in heap if kept[2] is not None]
            heapq.heapify(heap)
        heapq.heappush(heap, entry)
        self._live += 1
        if entry[0] < self._timer_at:
            self._arm(loop, entry[0])

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._due, loop)
        self._timer_at = at

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        # uvloop rounds a timer to the millisecond and may fire it up to half of one early: what is due within
        # one is due now (re-arming for less would spin until the clock ticks).
        heap, now = self._heap, loop.time() + 0.001
        while heap and (heap[0][2] is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)
            future = entry[2]
            if future is not None:
                entry[2] = None
                self._live -= 1
                if not future.done():
                    future.set_result(None)
        if heap:
            self._arm(loop, heap[0][0])


class Waiter:
    """One open long poll or event stream. `ended` says why it must answer now ("revoked": its key was revoked;
    "disconnected": its client is gone); `wake` is set when that happens."""

    __slots__ = ("ended", "wake", "who")

    def __init__(self, who: str) -> None:
        self.who = who
        self.ended: str | None = None
        self.wake: Bell | None = None

    def end(self, reason: str) -> None:
        """Mark it ended for `reason` and wake it, so it answers (or stops) now."""
        self.ended = self.ended or reason
        if self.wake is not None:
            self.wake.set()

    def disconnected(self) -> None:
        """Its client went away."""
        self.end("disconnected")


class Admission:
    """The request and waiter budgets; the request middleware admits, the waiting handlers convert."""

    def __init__(self, limit_concurrency: int, max_waiters: int, max_waiters_per_key: int) -> None:
        self.limit_concurrency = limit_concurrency
        self.max_waiters = max_waiters
        self.max_waiters_per_key = max_waiters_per_key
        self.in_flight = 0
        self.waiting = 0
        self._waiters: dict[str, set[Waiter]] = {}

    def admit(self, state: dict, path: str) -> None:
        """Take a request slot for this request (none for the probes), or refuse it with 503."""
        if path in PROBES:
            return
        if self.in_flight >= self.limit_concurrency:
            raise Overloaded(f"{self.limit_concurrency} requests are in flight (LIMIT_CONCURRENCY); retry shortly")
        self.in_flight += 1
        state["admitted"] = True

    def wait(self, state: dict, who: str) -> Waiter:
        """Turn this request into a waiter of `who` ("key:ID" or "addr:HOST"), or refuse it (429 / 503)."""
        mine = self._waiters.setdefault(who, set())
        if len(mine) >= self.max_waiters_per_key:
            raise TooManyWaiters(
                f"At most {self.max_waiters_per_key} long polls and event streams may be open per key "
                "(MAX_WAITERS_PER_KEY); close one or poll less often"
            )
        if self.waiting >= self.max_waiters:
            raise Overloaded(f"{self.max_waiters} long polls and event streams are open (MAX_WAITERS); retry shortly")
        waiter = Waiter(who)
        mine.add(waiter)
        self.waiting += 1
        if state.pop("admitted", False):
            self.in_flight -= 1
        state["waiter"] = waiter
        return waiter

    def done(self, state: dict) -> None:
        """The request has answered: give back whichever slot it holds."""
        if state.pop("admitted", False):
            self.in_flight -= 1
        waiter: Waiter | None = state.pop("waiter", None)
        if waiter is not None:
            mine = self._waiters.get(waiter.who)
            if mine is not None and waiter in mine:
                mine.discard(waiter)
                self.waiting -= 1
                if not mine:
                    del self._waiters[waiter.who]

    def revoke(self, key_ids: Iterable[str]) -> int:
        """End the waiters of these keys; the number ended."""
        ended = 0
        for key_id in key_ids:
            for waiter in self._waiters.get(f"key:{key_id}", ()):
                waiter.end("revoked")
                ended += 1
        return ended
