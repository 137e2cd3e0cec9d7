"""The deadlines of waits (admission.Alarms): every wait ends by its deadline, in deadline order, early ends
leave nothing growing behind, and a bell rung before the deadline ends its wait at once."""

from __future__ import annotations

import asyncio
import itertools

from admission import Alarms, Bell


def test_waits_end_at_their_deadlines_in_order_and_a_ring_ends_one_early():
    """Ten waits with deadlines out of order end in deadline order, each not before its deadline; a rung bell
    ends its wait at once and says it rang."""

    async def scenario() -> tuple[list[int], dict[int, float], list[bool], bool]:
        loop, alarms, ended, deadlines, rang = asyncio.get_running_loop(), Alarms(), [], {}, []

        async def wait(index: int, timeout: float) -> None:
            # Each deadline counts from when its wait starts: on a busy machine the ten may start many ms apart.
            deadlines[index] = loop.time() + timeout
            rang.append(await alarms.wait(Bell(), timeout))
            assert loop.time() >= deadlines[index] - 0.005  # never before its deadline
            ended.append(index)

        bell = Bell()
        early = asyncio.ensure_future(alarms.wait(bell, 60))
        timeouts = [0.09, 0.01, 0.05, 0.03, 0.07, 0.02, 0.1, 0.04, 0.08, 0.06]
        waits = [asyncio.ensure_future(wait(i, t)) for i, t in enumerate(timeouts)]
        await asyncio.sleep(0)
        bell.set()
        rung = await asyncio.wait_for(early, 1)
        await asyncio.gather(*waits)
        return ended, deadlines, rang, rung

    ended, deadlines, rang, rung = asyncio.run(scenario())
    assert sorted(ended) == list(range(10))
    # In deadline order (within the millisecond the alarms treat as one instant).
    assert all(deadlines[a] <= deadlines[b] + 0.001 for a, b in itertools.pairwise(ended)), (ended, deadlines)
    assert rang == [False] * 10 and rung is True


def test_waits_that_end_early_leave_no_growing_heap():
    """100,000 waits with an hour's deadline, each rung at once: the alarms keep a bounded heap, not one entry
    per wait that ever was."""

    async def scenario() -> int:
        alarms, largest = Alarms(), 0
        for _ in range(1000):
            bells = [Bell() for _ in range(100)]
            waits = [asyncio.ensure_future(alarms.wait(bell, 3600)) for bell in bells]
            await asyncio.sleep(0)
            for bell in bells:
                bell.set()
            assert await asyncio.gather(*waits) == [True] * 100
            largest = max(largest, len(alarms._heap))
        return largest

    assert asyncio.run(scenario()) <= 300


def test_a_cancelled_wait_is_forgotten():
    """A wait whose task is cancelled (its request ended) no longer counts, and the next wait still ends on time."""

    async def scenario() -> bool:
        alarms = Alarms()
        cancelled = asyncio.ensure_future(alarms.wait(Bell(), 0.01))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert alarms._live == 0
        return await asyncio.wait_for(alarms.wait(Bell(), 0.02), 1)

    assert asyncio.run(scenario()) is False
