"""The forwarder's queue on a real journal: release order (due time, then acceptance), latest wins, cancel and the
commands recovered at start-up. The sink here only records what it is handed and acknowledges it at once; what
reaches a real Kafka is tested in test_fleet.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from test_journal import accept, new

from errors import SinkUnavailable
from forwarder import KEEP_LOADED, Forwarder
from journal import Journal, Pending
from kafka_sink import Delivery
from metrics import Metrics


class RecordingSink:
    """Takes every record at once and acknowledges it on the next turn of the loop; `up` False holds them all."""

    topic = "commands"

    def __init__(self, up: bool = True) -> None:
        self.connected = up
        self.handed: list[bytes] = []  # record values, in the order handed over

    def publish(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future[Delivery]:
        """Record the value and acknowledge it."""
        future = asyncio.get_running_loop().create_future()
        self.handed.append(value)
        future.set_result(Delivery(self.topic, 0, len(self.handed) - 1))
        return future

    def resume(self) -> None:
        """Nothing to resume."""

    def find_published(self, pending: list[Pending], since: float) -> dict[int, Delivery]:
        """Nothing recovered was published before."""
        return {}


def pending(seq: int, name: str, device: str = "d1", **extra) -> Pending:
    fields = dict(seq=seq, request_id=name, device_id=device, created_at=time.time(), expires_at=None, key=b"d",
                  value=name.encode(), headers=[])  # fmt: skip
    fields.update(extra)
    return Pending(**fields)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.open()
    yield j
    j.close()


def run(scenario) -> None:
    """Run `scenario(started)`; every forwarder it appends to `started` is stopped, also when it fails (the
    forwarder's loop ends on stop() only)."""

    async def guarded() -> None:
        started: list[Forwarder] = []
        try:
            await scenario(started)
        finally:
            for forwarder in started:
                await forwarder.stop()

    asyncio.run(guarded())


def test_held_commands_go_in_due_order_then_acceptance_and_immediate_ones_at_once(journal):
    """A due in 0.6 s, B due in 0.3 s, C now, D due with A but accepted after it: handed C, B, A, D."""

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink()
        forwarder = Forwarder(journal, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        forwarder.start([])
        now = time.time()
        for seq, name, due in ((1, "A", now + 0.6), (2, "B", now + 0.3), (3, "C", None), (4, "D", now + 0.6)):
            _, handed, _ = forwarder.submit(pending(seq, name, not_before=due, handed=due is None))
            assert handed is (due is None)
        deadline = time.monotonic() + 30
        while len(sink.handed) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.handed == [b"C", b"B", b"A", b"D"]

    run(scenario)


def test_latest_wins_among_queued_commands_and_never_touches_a_handed_one(journal):
    """Kafka down: three setpoints with one coalesce_key leave only the last queued, each naming its successor;
    another key and another device are untouched. Once a command is handed over, a newer one supersedes nothing."""

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink(up=False)
        forwarder = Forwarder(journal, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        forwarder.start([])
        futures = {}
        answers = {}
        for seq, name, device, key in ((1, "s1", "d1", "sp"), (2, "other", "d1", "mode"), (3, "s2", "d1", "sp"),
                                       (4, "elsewhere", "d2", "sp"), (5, "s3", "d1", "sp")):  # fmt: skip
            futures[name], _, answers[name] = forwarder.submit(pending(seq, name, device, coalesce_key=key))
        assert answers == {"s1": [], "other": [], "s2": ["s1"], "elsewhere": [], "s3": ["s2"]}
        assert futures["s1"].result().status == "superseded" and futures["s1"].result().superseded_by == "s2"
        assert futures["s2"].result().superseded_by == "s3"
        sink.connected = True
        deadline = time.monotonic() + 30
        while len(sink.handed) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.handed == [b"other", b"elsewhere", b"s3"]
        _, handed, superseded = forwarder.submit(pending(6, "s4", coalesce_key="sp", handed=True))
        assert handed and superseded == []  # s3 is in Kafka: never touched

    run(scenario)


def test_cancel_takes_back_only_what_is_still_queued(journal):
    """withdraw: True for a held or queued command (never handed), False once handed over or unknown."""

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink()
        forwarder = Forwarder(journal, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        forwarder.start([])
        held, _, _ = forwarder.submit(pending(1, "held", not_before=time.time() + 3600))
        _, handed, _ = forwarder.submit(pending(2, "sent", handed=True))
        assert handed
        assert forwarder.withdraw(1) is True and held.result().status == "cancelled"
        assert forwarder.withdraw(1) is False and forwarder.withdraw(2) is False and forwarder.withdraw(99) is False
        await asyncio.sleep(0.6)  # a few ticks: nothing else is handed over
        assert sink.handed == [b"sent"]

    run(scenario)


def test_recovered_held_commands_are_never_uncertain_and_latest_wins_among_them(journal):
    """At start-up a command still ahead of its due time cannot have reached Kafka: it waits without reconciling,
    and of two held with one coalesce_key the newer wins at once; a due one is reconciled, then sent."""

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink()
        forwarder = Forwarder(journal, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        later = time.time() + 0.4
        forwarder.start(
            [
                pending(1, "old-sp", not_before=later, coalesce_key="sp", handed=False),
                pending(2, "due", handed=True),
                pending(3, "new-sp", not_before=later, coalesce_key="sp", handed=False),
            ]
        )
        assert sorted(p.request_id for p in forwarder._waiting.values()) == ["due", "new-sp"]
        assert set(forwarder._uncertain) == {2}
        deadline = time.monotonic() + 30
        while len(sink.handed) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.handed == [b"due", b"new-sp"]

    run(scenario)


def test_the_journal_marks_the_new_end_states_and_frees_the_backlog(journal):
    """cancelled and superseded are ends: the backlog figures drop and the record bytes are let go."""
    rows = accept(journal, new("a"), new("b"))
    assert journal.pending_count == 2
    journal.mark(rows[0].row.seq, rows[0].row.request_id, "cancelled")
    journal.mark(rows[1].row.seq, rows[1].row.request_id, "superseded", superseded_by="c")
    journal.flush()
    assert journal.pending_count == 0 and journal.pending_bytes == 0
    cancelled = asyncio.run(journal.get("a"))
    superseded = asyncio.run(journal.get("b"))
    assert cancelled.status == "cancelled" and superseded.superseded_by == "c"
    assert superseded.history[-1] == ("superseded", superseded.history[-1][1], "c")
    reopened = Journal(journal.path)
    assert len(reopened.open()) == 0
    reopened.close()


def test_a_command_never_handed_over_stays_known_as_such_across_a_restart(journal):
    """Kafka down: a command journaled as not handed is never looked up in Kafka after a restart, so it can still be
    cancelled or superseded; when Kafka is back its hand-over is recorded in the journal before the record leaves."""
    [waiting, replaced, cancelled] = [a.row for a in accept(journal, new("w", handed=False, value=b"w"),
                                      new("r", handed=False, coalesce_key="sp"), new("c", handed=False))]  # fmt: skip
    recovered = journal.flush() and Journal(journal.path)
    journal.close()
    pendings = recovered.open()  # the plain ones by their seqs alone, "r" (it has a coalesce_key) whole
    assert [(p.request_id, p.handed) for p in pendings.pending] == [("r", False)]
    assert list(pendings.plain_seqs) == [waiting.seq, cancelled.seq]

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink(up=False)
        forwarder = Forwarder(recovered, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        forwarder.start(pendings)
        assert not forwarder._uncertain  # nothing to look up in Kafka
        assert forwarder.withdraw(cancelled.seq) is True
        _, _, superseded = forwarder.submit(pending(99, "r2", coalesce_key="sp", handed=False))
        assert superseded == ["r"]
        sink.connected = True
        deadline = time.monotonic() + 30
        while len(sink.handed) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.handed == [b"w", b"r2"]

    try:
        run(scenario)
        recovered.flush()
        assert asyncio.run(recovered.get("c")).status == "cancelled"
        assert asyncio.run(recovered.get("r")).superseded_by == "r2"
        with sqlite3.connect(journal.path) as conn:
            assert conn.execute("SELECT handed FROM commands WHERE seq = ?", (waiting.seq,)).fetchone() == (1,)
            assert conn.execute("SELECT handed FROM commands WHERE seq = ?", (replaced.seq,)).fetchone() == (None,)
    finally:
        recovered.close()


def test_commands_handed_over_at_once_keep_their_order_when_kafka_gives_them_back(journal):
    """Three commands go straight to the producer, which fails them (in reverse): they go back in their order."""

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink()
        forwarder = Forwarder(journal, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        forwarder.start([])
        failing = []
        sink.publish = lambda key, value, headers: (
            failing.append(asyncio.get_running_loop().create_future()) or (failing[-1])
        )
        for seq, name in ((1, "first"), (2, "second"), (3, "third")):
            assert forwarder.submit(pending(seq, name, handed=True))[1] is True
        for future in reversed(failing):
            future.set_exception(SinkUnavailable("Kafka went away"))
        await asyncio.sleep(0)
        assert [p.request_id for p in forwarder._ready] == ["first", "second", "third"]

    run(scenario)


def test_a_long_queue_keeps_its_records_in_the_journal_and_sends_them_in_order(journal):
    """Past KEEP_LOADED queued commands, a plain command is kept by its seq alone and one with a coalesce_key keeps
    no record; when Kafka takes records again each is read back and sent, in order, once, but for the one
    cancelled while spilled."""
    count = KEEP_LOADED + 300
    news = [new(f"q{n}", handed=False, value=b"%d" % n) for n in range(count)]
    news[count - 200] = new("c", handed=False, value=b"c", coalesce_key="sp")  # splits the spill in two
    rows = [a.row for a in accept(journal, *news)]
    journal.flush()
    cancelled = rows[count - 100]

    async def scenario(started: list[Forwarder]) -> None:
        sink = RecordingSink(up=False)
        forwarder = Forwarder(journal, sink, 5.0, Metrics("test"))
        started.append(forwarder)
        forwarder.start([])
        for row, command in zip(rows, news, strict=True):  # as the send path gives them, while Kafka is down
            forwarder.submit(pending(row.seq, row.request_id, value=command.value, handed=False,
                                     coalesce_key=command.coalesce_key))  # fmt: skip
        assert len(forwarder._waiting) == KEEP_LOADED + 1  # the first ones whole, and "c"
        assert forwarder._waiting[rows[count - 200].seq].value is None  # its record stays in the journal
        assert forwarder.queued == count
        assert forwarder.withdraw(cancelled.seq, cancelled.request_id, "d1") is True
        assert forwarder.withdraw(cancelled.seq) is False and forwarder.queued == count - 1
        sink.connected = True
        deadline = time.monotonic() + 60
        while len(sink.handed) < count - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sink.handed == [command.value for command in news if command.request_id != cancelled.request_id]
        assert forwarder.queued == 0 and not forwarder._gone

    run(scenario)
    assert journal.flush()
    assert asyncio.run(journal.recent(None, "accepted", 10)) == []  # every one marked published, or cancelled
    assert asyncio.run(journal.get(cancelled.request_id)).status == "cancelled"


def test_a_restart_loads_the_record_only_of_a_command_that_may_be_in_kafka(journal):
    """A command that never left the journal comes back without its record (read back when sent); one that may
    have reached Kafka comes with it, to be looked up there."""
    accept(journal, new("never-left", handed=False), new("maybe-sent", handed=True))
    journal.close()
    reopened = Journal(journal.path)
    try:
        backlog = reopened.open()
        assert [(p.request_id, p.value) for p in backlog.pending] == [("maybe-sent", b'{"x": 1}')]
        assert len(backlog.plain_seqs) == 1  # "never-left": its seq alone
        assert reopened.pending_bytes == 2 * len(b'{"x": 1}')  # the budget still counts both
    finally:
        reopened.close()
