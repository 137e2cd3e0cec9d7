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
from collections.abc import Iterable

from errors import Overloaded, TooManyWaiters

PROBES = frozenset({"/health", "/ready"})  # answer at once, under any load and while shutting down


class Waiter:
    """One open long poll or event stream. `ended` says why it must answer now ("revoked": its key was revoked;
    "disconnected": its client is gone); `wake` is set when that happens."""

    __slots__ = ("ended", "wake", "who")

    def __init__(self, who: str) -> None:
        self.who = who
        self.ended: str | None = None
        self.wake: asyncio.Event | None = None

    def end(self, reason: str) -> None:
        """Mark it ended for `reason` and wake it, so it answers (or stops) now."""
        self.ended = self.ended or reason
        if self.wake is not None:
            self.wake.set()


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
