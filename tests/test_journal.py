"""The journal on a real SQLite file: durability settings, group commit, idempotency, limits, failures."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from helpers import ROOT
from kafka_local import free_port
from structlog.testing import capture_logs

from errors import JournalError
from journal import Accepted, Journal, NewCommand, NewFanout
from kafka_sink import Backoff
from schemas import StatusEvent
from status_store import Received


def new(request_id: str, device: str = "d1", body: bytes = b"h", idem_key: str | None = None, **extra) -> NewCommand:
    fields = dict(
        request_id=request_id,
        idem_key=idem_key,
        client_request_id=False,
        body_hash=body,
        device_id=device,
        command_type="reboot",
        created_at=time.time(),
        expires_at=None,
        key=device.encode(),
        value=b'{"x": 1}',
        headers=[("request_id", request_id.encode())],
    )
    fields.update(extra)
    return NewCommand(**fields)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.db")
    j.open()
    yield j
    j.close()


def accept(journal: Journal, *items: NewCommand):
    return asyncio.run(_accepted(journal, list(items)))


async def _accepted(journal: Journal, items: list[NewCommand]):
    return await journal.accept(items)


def get(journal: Journal, request_id: str):
    """One row, read as the service reads it: on the journal's reader thread, awaited on an event loop."""
    return asyncio.run(journal.get(request_id))


def recent(journal: Journal, *args, **kwargs):
    """A list page, read on the journal's reader thread."""
    return asyncio.run(journal.recent(*args, **kwargs))


def test_synchronous_full_is_set_and_checked(tmp_path):
    """FULL by default and NORMAL on request, each read back from SQLite; WAL mode on."""
    for sync, code in (("full", 2), ("normal", 1)):
        j = Journal(tmp_path / f"{sync}.db", sync=sync)
        j.open()
        assert j._writer.execute("PRAGMA synchronous").fetchone()[0] == code
        assert j._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        j.close()


def test_accepted_commands_survive_reopening_and_come_back_as_pending(tmp_path):
    """What was accepted is pending after a reopen, in acceptance order, with its record bytes."""
    j = Journal(tmp_path / "j.db")
    j.open()
    accept(j, new("a"), new("b", device="d2"))
    j.mark(1, "a", "published", topic="t", partition=0, offset=7)
    j.close()
    j = Journal(tmp_path / "j.db")
    pending = j.open().pending  # handed (the default here): whole
    try:
        assert [p.request_id for p in pending] == ["b"]
        assert pending[0].key == b"d2" and pending[0].headers == [("request_id", b"b")]
        assert j.pending_count == 1
        row = get(j, "a")
        assert (row.status, row.partition, row.offset) == ("published", 0, 7)
        assert [h[0] for h in row.history] == ["accepted", "published"]
    finally:
        j.close()


def test_marks_apply_in_order_the_first_final_one_wins_and_published_ones_keep_their_place(tmp_path):
    """Marks land as given, whether a commit takes them one by one or many at once: a published step names its
    topic/partition@offset, a command's record bytes go once it is final, and only its first final mark counts."""
    j = Journal(tmp_path / "j.db")
    j.open()
    try:
        accept(j, *(new(f"c{n}", device=f"d{n}") for n in range(1, 6)))
        each = j.pending_bytes // 5
        before = time.time()
        j.mark(1, "c1", "published", topic="t", partition=0, offset=7)
        j.mark(2, "c2", "published", topic="t", partition=3, offset=12)
        j.mark(3, "c3", "failed", error="too large")
        j.mark(3, "c3", "published", topic="t", partition=1, offset=1)  # after a final mark: changes nothing
        j.mark(2, "c2", "published", topic="t", partition=3, offset=99)  # a repeat: changes nothing
        j.mark(4, "c4", "published", topic="other-topic", partition=2, offset=5)
        assert j.flush()
        assert not j.marks_pending()  # every mark queued has been through a commit
        rows = {n: get(j, f"c{n}") for n in range(1, 6)}
        got = {n: (r.status, r.topic, r.partition, r.offset, r.error) for n, r in rows.items()}
        assert got == {
            1: ("published", "t", 0, 7, None),
            2: ("published", "t", 3, 12, None),
            3: ("failed", None, None, None, "too large"),
            4: ("published", "other-topic", 2, 5, None),
            5: ("accepted", None, None, None, None),
        }
        steps = {n: [(step[0], step[2]) for step in r.history] for n, r in rows.items()}
        assert steps[1] == [("accepted", None), ("published", "t/0@7")]
        assert steps[2] == [("accepted", None), ("published", "t/3@12")]
        assert steps[3] == [("accepted", None), ("failed", "too large")]
        assert steps[4] == [("accepted", None), ("published", "other-topic/2@5")]
        assert all(before - 0.001 <= rows[n].history[-1][1] <= time.time() for n in range(1, 5))  # JSON keeps 15 digits
        assert (j.pending_count, j.pending_bytes) == (1, each)
    finally:
        j.close()
    with sqlite3.connect(tmp_path / "j.db") as conn:
        kept = conn.execute("SELECT request_id FROM commands WHERE record_value IS NOT NULL").fetchall()
    assert kept == [("c5",)]


def test_concurrent_accepts_share_transactions(journal):
    """200 concurrent single inserts are committed in far fewer transactions (group commit)."""

    async def many():
        return await asyncio.gather(*(journal.accept([new(f"r{i}")]) for i in range(200)))

    before = journal.commits
    results = asyncio.run(many())
    assert all(r[0].outcome == "inserted" for r in results)
    assert journal.commits - before < 50
    assert journal.pending_count == 200


def test_replay_and_conflict_by_idempotency_key(journal):
    """The same key and body is a replay of the first row; the same key with another body is a conflict."""
    [first] = accept(journal, new("r1", idem_key="k1", body=b"A"))
    [again] = accept(journal, new("r2", idem_key="k1", body=b"A"))
    [other] = accept(journal, new("r3", idem_key="k1", body=b"B"))
    assert first.outcome == "inserted"
    assert again.outcome == "replayed" and again.row.request_id == "r1"
    assert other.outcome == "conflict" and other.row.request_id == "r1"
    assert journal.pending_count == 1


def test_client_request_id_is_an_idempotency_key(journal):
    """A repeated client request_id replays; with another body it conflicts."""
    accept(journal, new("mine", client_request_id=True, body=b"A"))
    [again] = accept(journal, new("mine", client_request_id=True, body=b"A"))
    [other] = accept(journal, new("mine", client_request_id=True, body=b"B"))
    assert (again.outcome, other.outcome) == ("replayed", "conflict")


def test_duplicates_inside_one_transaction_resolve_to_one_row(journal):
    """Fifty identical concurrent requests give one row and forty-nine replays."""

    async def fifty():
        return await asyncio.gather(*(journal.accept([new(f"x{i}", idem_key="same")]) for i in range(50)))

    outcomes = [r[0].outcome for r in asyncio.run(fifty())]
    assert outcomes.count("inserted") == 1 and outcomes.count("replayed") == 49


def test_max_pending_refuses_then_recovers(tmp_path):
    """At JOURNAL_MAX_PENDING further commands are refused (full); a published one makes room."""
    j = Journal(tmp_path / "j.db", max_pending=2)
    j.open()
    try:
        results = accept(j, new("a"), new("b"), new("c"))
        assert [r.outcome for r in results] == ["inserted", "inserted", "full"]
        assert results[2].error.status == 503
        j.mark(results[0].row.seq, results[0].row.request_id, "published", topic="t", partition=0, offset=0)
        assert j.flush()
        assert [r.outcome for r in accept(j, new("d"))] == ["inserted"]
    finally:
        j.close()


def test_max_bytes_refuses(tmp_path):
    """Past JOURNAL_MAX_BYTES of records, further commands are refused."""
    j = Journal(tmp_path / "j.db", max_bytes=200_000)
    j.open()
    try:
        big = b"x" * 20_000
        outcomes = [accept(j, new(f"r{i}", value=big))[0].outcome for i in range(30)]
        assert "full" in outcomes and outcomes[0] == "inserted"
    finally:
        j.close()


def test_marks_are_final_and_purged_after_retention(tmp_path):
    """A finished command keeps its history; past the retention period it is purged, pending ones never."""
    j = Journal(tmp_path / "j.db", retention=0.0)
    j.open()
    try:
        done, _ = accept(j, new("done"), new("waiting"))
        j.mark(done.row.seq, done.row.request_id, "expired", error="ttl")
        # ignored: already final
        j.mark(done.row.seq, done.row.request_id, "published", topic="t", partition=0, offset=1)
        assert j.flush()
        row = get(j, "done")
        assert row.status == "expired" and row.error == "ttl"
        j._housekeeping()
        assert get(j, "done") is None and get(j, "waiting") is not None
    finally:
        j.close()


def test_recent_lists_newest_first_with_paging(journal):
    """Per-device listing is newest first and pages with `before`."""
    for i in range(5):
        accept(journal, new(f"r{i}", device="dev"))
    accept(journal, new("other", device="else"))
    page = recent(journal, "dev", None, 3)
    assert [r.request_id for r in page] == ["r4", "r3", "r2"]
    assert [r.request_id for r in recent(journal, "dev", None, 3, before=page[-1].seq)] == ["r1", "r0"]
    assert recent(journal, None, "accepted", 10)[0].request_id == "other"


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs mount for disk-full and read-only tests (needs root, as CI runs)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    assert result.returncode == 0, f"mounting a tmpfs needs root: {result.stderr.decode()}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_recovers(small_disk):
    """On a full disk inserts fail with a clear reason (nothing stored); freeing space lets them succeed again.
    The log says so once when writes start failing and once when they work again, not once per refused command."""
    j = Journal(small_disk / "j.db", sync="full")
    j.open()
    try:
        filler = small_disk / "filler"
        # Unbuffered: no bytes are left to flush at close, where a full disk would raise again.
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        with capture_logs() as logs:
            results = [accept(j, new(f"r{i}", value=b"y" * 8192))[0] for i in range(50)]
            failed = [r for r in results if r.outcome == "unavailable"]
            assert len(failed) > 1, "the disk never filled"
            assert failed[0].error.detail == "The journal's disk is full; nothing was stored"
            assert not j.writable
            filler.unlink()
            deadline = time.monotonic() + 5
            while not j.writable and time.monotonic() < deadline:  # it notices by itself, no command needed
                time.sleep(0.1)
            assert j.writable
            [ok] = accept(j, new("after"))
            assert ok.outcome == "inserted" and j.writable
        [error] = [line for line in logs if line["log_level"] == "error"]
        assert error["event"] == "journal write failed" and "disk is full" in error["error"]
        assert "exc_info" not in error
        [again] = [line for line in logs if line["event"] == "journal writable again"]
        assert again["refused"] == len(failed)
    finally:
        j.close()


def test_read_only_journal_stops_the_start_with_a_clear_line(small_disk, tmp_path):
    """A journal on a read-only file system cannot be opened: the service exits naming the file, serving nothing."""
    j = Journal(small_disk / "j.db")
    j.open()
    accept(j, new("r"))
    j.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises((JournalError, sqlite3.Error)):
        Journal(small_disk / "j.db").open()
    result = subprocess.run(
        [sys.executable, "-m", "pusher"],
        cwd=ROOT,
        env={
            **os.environ,
            "JOURNAL_PATH": str(small_disk / "j.db"),
            "API_PORT": str(free_port()),
            "LOG_FORMAT": "json",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    [line] = [json.loads(x) for x in result.stdout.splitlines() if '"journal cannot be opened"' in x]
    assert line["path"] == str(small_disk / "j.db") and "is not writable" in line["error"]


def test_unopenable_journal_path_raises(tmp_path):
    """A path that cannot hold a database fails at open, not at the first command."""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises((JournalError, sqlite3.Error, OSError)):
        Journal(Path(tmp_path / "file" / "j.db")).open()
    assert os.path.exists(tmp_path / "file")


def test_file_stays_bounded_under_steady_load(tmp_path):
    """Accepting and finishing commands round after round, with purging and checkpoints, keeps the files bounded."""
    j = Journal(tmp_path / "j.db", retention=0.0)
    j.open()

    def size() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("j.db*"))

    try:
        sizes = []
        for round_ in range(12):
            accepted = accept(j, *(new(f"r{round_}-{i}", value=b"v" * 500) for i in range(500)))
            for a in accepted:
                j.mark(a.row.seq, a.row.request_id, "published", topic="t", partition=0, offset=a.row.seq)
            assert j.flush()
            j._housekeeping()
            sizes.append(size())
        assert max(sizes[4:]) <= sizes[3] * 1.2, sizes
    finally:
        j.close()


CEILING = 2 * 1024 * 1024


def files_on_disk(journal: Journal) -> int:
    """The journal's database file and its WAL, as the disk has them."""
    return sum(
        os.stat(f"{journal.path}{suffix}").st_size
        for suffix in ("", "-wal")
        if Path(f"{journal.path}{suffix}").exists()
    )


def publish(journal: Journal, accepted) -> None:
    for a in accepted:
        journal.mark(a.row.seq, a.row.request_id, "published", topic="t", partition=0, offset=a.row.seq)
    assert journal.flush()


def test_finished_commands_are_pruned_oldest_first_to_stay_under_the_ceiling(tmp_path):
    """Far more finished commands than JOURNAL_MAX_DISK holds: after every commit the database and its WAL are
    under the ceiling; the oldest finished commands are gone (a fan-out with its last one) and the newest kept;
    every waiting one is still there, also after a reopen."""
    j = Journal(tmp_path / "j.db", max_disk=CEILING)
    j.open()
    waiting, waiting_seqs, sizes = [], set(), []
    try:
        fanout = NewFanout(
            fanout_id="early", idem_key=None, client_fanout_id=True, body_hash=b"f", key_id=None,
            command_type="reboot", created_at=time.time(),
        )  # fmt: skip
        early = asyncio.run(
            _fanout(j, fanout, [new(f"early-{k}", device=f"e{k}", fanout_id="early") for k in range(5)])
        )
        publish(j, [Accepted("inserted", row) for row in early.rows])
        for round_ in range(40):
            accepted = accept(j, *(new(f"r{round_}-{i}", device=f"d{i % 7}", value=b"v" * 300) for i in range(200)))
            assert {a.outcome for a in accepted} == {"inserted"}
            sizes.append(files_on_disk(j))
            waiting += [a.row.request_id for a in accepted[:3]]  # never published
            waiting_seqs.update(a.row.seq for a in accepted[:3])
            publish(j, accepted[3:])
            sizes.append(files_on_disk(j))
            assert j.disk_bytes == sizes[-1]
        assert max(sizes) <= CEILING and j.pruned > 0, (max(sizes), j.pruned)
        assert sum(a > 1_000_000 for a in sizes) > 40  # it did fill up: the ceiling held it, not a lack of data
        rows = dict(j._writer.execute("SELECT request_id, status FROM commands"))
        finished = [seq for (seq,) in j._writer.execute("SELECT seq FROM commands WHERE status = 'published'")]
        assert 0 < len(finished) < 40 * 197 // 2
        assert get(j, "r0-3") is None and get(j, "r39-199").status == "published"
        assert asyncio.run(j.fanout("early")) is None  # its commands pruned, it went with them
        # What is left of the finished ones is the newest of them: the oldest went first.
        ever_finished = [seq for seq in range(1, 5 + 40 * 200 + 1) if seq not in waiting_seqs]
        assert sorted(finished) == ever_finished[-len(finished) :]
        assert all(rows[rid] == "accepted" for rid in waiting) and j.pending_count == len(waiting)
    finally:
        j.close()
    j = Journal(tmp_path / "j.db", max_disk=CEILING)
    try:
        assert sorted(p.request_id for p in j.open().pending) == sorted(waiting)
    finally:
        j.close()


def test_a_backlog_published_all_at_once_leaves_room_for_new_commands_under_a_small_ceiling(tmp_path):
    """A drain: a backlog filling most of JOURNAL_MAX_DISK is published in one burst of marks. Its commits stay
    small enough that the WAL they leave does not shrink the database's share below what it holds: a new command
    is taken at once, and the files stay under the ceiling."""
    j = Journal(tmp_path / "j.db", max_disk=CEILING)
    j.open()
    try:
        backlog = []
        while len(backlog) < 1400:
            backlog += accept(
                j, *(new(f"b{len(backlog) + k}", device=f"d{k % 5}", value=b"b" * 600) for k in range(100))
            )
        assert {a.outcome for a in backlog} == {"inserted"} and j.pending_count == 1400
        for a in backlog:  # queued faster than the writer commits them, as acknowledgements arrive in a drain
            j.mark(a.row.seq, a.row.request_id, "published", topic="t", partition=0, offset=a.row.seq)
        assert j.flush() and j.pending_count == 0
        assert [a.outcome for a in accept(j, new("after-the-drain", value=b"a" * 600))] == ["inserted"]
        assert files_on_disk(j) <= CEILING
    finally:
        j.close()


def test_at_the_ceiling_with_only_waiting_commands_new_ones_are_refused_until_some_are_published(tmp_path):
    """Waiting commands alone fill JOURNAL_MAX_DISK: a new command, or a fan-out, is refused as full (503, a
    reason naming the ceiling), nothing stored; a repeat is still a replay, and status marks still commit. Once
    part of the backlog is published, new commands are taken again; the files never pass the ceiling."""
    j = Journal(tmp_path / "j.db", max_disk=CEILING)
    j.open()
    try:
        accepted, refused, i = [], [], 0
        for size in (20, 1):  # batches until one is refused, then single commands until one is
            refused = []
            while not refused:
                batch = accept(j, *(new(f"w{i + k}", idem_key=f"k{i + k}", value=b"w" * 300) for k in range(size)))
                accepted += [a for a in batch if a.outcome == "inserted"]
                refused = [a for a in batch if a.outcome != "inserted"]
                i += size
                assert i < 10_000, "the ceiling was never reached"
            assert {a.outcome for a in refused} == {"full"}
        error = refused[0].error
        assert error.status == 503 and error.retry_after and "JOURNAL_MAX_DISK" in error.detail
        assert f"{len(accepted)} commands wait for Kafka" in error.detail
        assert j.pending_count == len(accepted) and files_on_disk(j) <= CEILING
        [again] = accept(j, new("w-again", idem_key="k0", value=b"w" * 300))
        assert again.outcome == "replayed" and again.row.request_id == "w0"
        fanout = NewFanout(
            fanout_id="f1", idem_key=None, client_fanout_id=True, body_hash=b"f", key_id=None,
            command_type="reboot", created_at=time.time(),
        )  # fmt: skip
        children = [new(f"f1-{k}", device=f"fd{k}", fanout_id="f1", value=b"f" * 300) for k in range(20)]
        whole = asyncio.run(_fanout(j, fanout, children))
        assert whole.outcome == "full" and "a fan-out is journaled whole" in whole.error.detail
        assert get(j, "f1-0") is None and asyncio.run(j.fanout("f1")) is None
        for start in range(0, len(accepted) // 2, 100):  # acknowledged a hundred at a time, as Kafka drains
            publish(j, accepted[start : min(start + 100, len(accepted) // 2)])
        assert j.pending_count == len(accepted) - len(accepted) // 2
        assert [a.outcome for a in accept(j, *(new(f"after{k}", value=b"a" * 300) for k in range(20)))] == [
            "inserted"
        ] * 20
        assert all(get(j, a.row.request_id).status == "accepted" for a in accepted[len(accepted) // 2 :])
        assert files_on_disk(j) <= CEILING
    finally:
        j.close()


async def _fanout(journal: Journal, fanout: NewFanout, items: list[NewCommand]):
    return await journal.accept_fanout(fanout, items)


def test_a_file_left_larger_than_a_lowered_ceiling_does_not_grow_and_keeps_taking_commands(tmp_path):
    """A journal written without a ceiling, reopened with a lower one: its finished commands are pruned at open,
    a warning says the file shrinks only with VACUUM, and it goes on taking commands without growing."""
    j = Journal(tmp_path / "j.db", max_disk=0)
    j.open()
    try:
        for round_ in range(30):
            publish(j, accept(j, *(new(f"old{round_}-{i}", value=b"o" * 300) for i in range(250))))
        accept(j, new("waiting"))
    finally:
        j.close()
    before = os.stat(tmp_path / "j.db").st_size
    assert before > 1.5 * CEILING
    j = Journal(tmp_path / "j.db", max_disk=CEILING)
    with capture_logs() as logs:
        pending = j.open().pending
    try:
        assert [p.request_id for p in pending] == ["waiting"] and j.pruned > 0
        [warning] = [line for line in logs if line["log_level"] == "warning"]
        assert "VACUUM" in warning["event"] and warning["max_disk"] == CEILING
        for round_ in range(20):
            accepted = accept(j, *(new(f"new{round_}-{i}", value=b"n" * 300) for i in range(250)))
            assert {a.outcome for a in accepted} == {"inserted"}
            publish(j, accepted)
        assert os.stat(tmp_path / "j.db").st_size <= before
        assert get(j, "waiting").status == "accepted" and get(j, "old0-0") is None
    finally:
        j.close()


def test_backoff_is_capped_and_jittered():
    """The forwarder's backoff grows exponentially, never past its cap, with full jitter; success resets it."""
    backoff = Backoff(base=0.1, cap=2.0)
    delays = [backoff.next() for _ in range(40)]
    assert all(0 <= d <= 2.0 for d in delays) and len(set(delays)) > 30
    assert max(delays[:3]) <= 0.4
    backoff.reset()
    assert backoff.next() <= 0.1


def test_pending_bytes_follow_what_waits_for_kafka(tmp_path):
    """JOURNAL_MAX_BYTES counts only records still waiting: finished history does not fill it."""
    j = Journal(tmp_path / "j.db", max_bytes=100_000)
    j.open()
    try:
        a, _ = accept(j, new("a", value=b"x" * 60_000), new("b", value=b"y" * 30_000))
        assert j.pending_bytes == 90_000
        assert accept(j, new("c", value=b"z" * 20_000))[0].outcome == "full"
        j.mark(a.row.seq, a.row.request_id, "published", topic="t", partition=0, offset=0)
        assert j.flush()
        assert j.pending_bytes == 30_000
        assert accept(j, new("c", value=b"z" * 20_000))[0].outcome == "inserted"
    finally:
        j.close()
    j = Journal(tmp_path / "j.db")
    j.open()
    try:
        assert j.pending_bytes == 50_000 and j.pending_count == 2
    finally:
        j.close()


def _event(request_id: str, status: str, at: float, **extra) -> StatusEvent:
    return StatusEvent(
        request_id=request_id,
        status=status,
        at=datetime.fromtimestamp(at, UTC),
        source=extra.pop("source", "connector"),
        device_id=extra.pop("device_id", "d1"),
        **extra,
    )


def instance(request_id: str, status: str, at: float, **extra) -> Received:
    """An event of another instance, its signature verified by the status feed."""
    return _event(request_id, status, at, source="pusher@other", **extra), True


def connector(request_id: str, status: str, at: float, **extra) -> Received:
    """A connector's event: unsigned, whatever `source` it names."""
    return _event(request_id, status, at, **extra), False


def test_status_events_never_move_a_command_back_and_repeats_change_nothing(tmp_path):
    """Events for a command accepted elsewhere make a row of its own; a lower stage arriving late joins the
    history without moving the status; a repeat is dropped; the read position is stored with them."""
    j = Journal(tmp_path / "j.db")
    j.open()
    try:
        now = time.time()
        created = datetime.fromtimestamp(now, UTC)
        assert (
            j.apply_events([instance("r1", "published", now + 1, command_type="reboot", created_at=created)], {0: 5})
            == 0
        )
        assert j.apply_events([connector("r1", "delivered", now + 2)], {0: 6}) == 0
        assert j.apply_events([instance("r1", "accepted", now, created_at=created)], {0: 7}) == 0
        assert (
            j.apply_events([connector("r1", "delivered", now + 3), instance("r1", "published", now + 1)], {0: 8}) == 0
        )
        row = get(j, "r1")
        assert row.status == row.stage == "delivered" and row.origin == "pusher@other"
        assert [step[0] for step in row.history] == ["accepted", "published", "delivered"]
        assert row.created_at == pytest.approx(now, abs=1e-3) and row.command_type == "reboot"
        assert j.apply_events([connector("r1", "succeeded", now + 4, result={"ok": 1})], {1: 2}) == 0
        assert j.apply_events([connector("r1", "failed", now + 5, error="late")], {1: 3}) == 0  # a second end: late
        row = get(j, "r1")
        assert row.stage == "succeeded" and row.result == {"ok": 1} and row.error is None
        assert j.status_positions() == {0: 8, 1: 3}
        assert j.pending_count == 0  # a command accepted elsewhere is never ours to send
    finally:
        j.close()
    reopened = Journal(tmp_path / "j.db")
    assert len(reopened.open()) == 0
    reopened.close()


def test_an_own_command_stays_pending_until_the_forwarder_marks_it(tmp_path):
    """A connector's event that overtakes our own acknowledgement shows in the API status, but the row stays
    'accepted' for the forwarder (and the backlog count) until its own mark; then the outbox holds our events."""
    j = Journal(tmp_path / "j.db", status_source="pusher@test")
    j.open()
    try:
        [accepted] = accept(j, new("own-1"))
        seq = accepted.row.seq
        assert j.apply_events([connector("own-1", "delivered", time.time())], {0: 1}) == 0
        row = get(j, "own-1")
        assert row.status == "accepted" and row.stage == "delivered" and j.pending_count == 1
        j.mark(seq, "own-1", "published", topic="t", partition=0, offset=7)
        assert j.flush()
        row = get(j, "own-1")
        assert row.status == "published" and row.stage == "delivered" and j.pending_count == 0
        events = [msgspec.json.decode(e, type=StatusEvent) for _, _, e in j.outbox_batch(0)]
        assert [(e.status, e.source, e.offset) for e in events] == [
            ("accepted", "pusher@test", None),
            ("published", "pusher@test", 7),
        ]
        assert events[0].body_hash == b"h".hex()
        j.outbox_sent(j.outbox_batch(0)[0][0])
        assert j.flush()
        assert [e[1] for e in j.outbox_batch(0)] == ["own-1"]
    finally:
        j.close()


def test_a_retry_at_another_instance_finds_the_command_by_its_idempotency_key(journal):
    """The accepted event carries the (key-scoped) Idempotency-Key and body hash: the same request at this
    instance is a replay of the other's command, a different body a conflict."""
    event = instance("elsewhere-1", "accepted", time.time(), idempotency_key="k1\x1fabc", body_hash=b"h".hex())
    assert journal.apply_events([event], {0: 1}) == 0
    [replayed] = accept(journal, new("fresh-id", idem_key="k1\x1fabc"))
    [conflict] = accept(journal, new("fresh-id-2", idem_key="k1\x1fabc", body=b"other"))
    assert replayed.outcome == "replayed" and replayed.row.request_id == "elsewhere-1"
    assert conflict.outcome == "conflict"
    assert journal.pending_count == 0


def test_an_event_that_cannot_be_stored_is_skipped_and_the_writer_lives_on(journal):
    """Absurd values (an offset past SQLite's integers, a result nested too deep to serialise) skip that event
    only; the others in the batch are applied, positions stored, and the writer keeps working."""
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}
    now = time.time()
    batch = [
        instance("bad-1", "published", now, offset=2**63, partition=0, topic="t"),
        instance("bad-2", "failed", now, result=deep),
        instance("good-1", "published", now),
    ]
    assert journal.apply_events(batch, {0: 3}) == 2
    assert (
        get(journal, "bad-1") is None and get(journal, "bad-2") is None and get(journal, "good-1").stage == "published"
    )
    assert journal.status_positions() == {0: 3}
    [accepted] = accept(journal, new("after-1"))
    assert accepted.outcome == "inserted"


def test_an_unsigned_event_can_neither_make_a_row_nor_plant_an_idempotency_key(journal):
    """Whoever can write the topic, naming itself `pusher@…` or not, cannot plant a row (nor a key id, an
    Idempotency-Key or a body hash) without the signature: a later POST with that key is a new command, not a
    replay of one that will never be sent. Each such event is counted as not applied."""
    now = time.time()
    forged = dict(owner="k1", idempotency_key="k1\x1fabc", body_hash=b"h".hex(), source="pusher@other")
    batch = [
        connector("forged-1", "accepted", now, **forged),
        connector("forged-2", "published", now, partition=0, offset=1, topic="t", **forged),
        connector("forged-3", "delivered", now, **forged),
    ]
    assert journal.apply_events(batch, {0: 3}) == 3
    assert [get(journal, f"forged-{i}") for i in (1, 2, 3)] == [None, None, None]
    [fresh] = accept(journal, new("real-1", idem_key="k1\x1fabc"))
    assert fresh.outcome == "inserted" and fresh.row.request_id == "real-1"


def test_a_connector_event_only_moves_a_known_command_of_its_own_device_forward(journal):
    """An unsigned event naming another device changes nothing (a device cannot settle another's command); one
    for the right device takes it to a connector's stage, with its error and result, but never sets where it is
    in Kafka, its owner, or the stages only the service reports."""
    [accepted] = accept(journal, new("c1", device="device-a", key_id="k1"))
    journal.mark(accepted.row.seq, accepted.row.request_id, "published", topic="t", partition=0, offset=7)
    assert journal.flush()
    now = time.time()
    assert journal.apply_events([instance("r2", "accepted", now, device_id="device-b")], {0: 1}) == 0
    refused = [
        connector("c1", "succeeded", now, device_id="device-zzz", result={"ok": True}),
        connector("r2", "failed", now, device_id="device-a", error="not yours"),
        connector("c1", "accepted", now, device_id="device-a"),
        connector("r2", "published", now, device_id="device-b", partition=1, offset=9, topic="t"),
        connector("c1", "cancelled", now, device_id="device-a"),  # "never sent": only the service may say so
        connector("c1", "superseded", now, device_id="device-a", superseded_by="r2"),
    ]
    assert journal.apply_events(refused, {0: 5}) == len(refused)
    c1, r2 = get(journal, "c1"), get(journal, "r2")
    assert (c1.stage, c1.result, len(c1.history)) == ("published", None, 2)
    assert (r2.stage, r2.error, r2.partition, len(r2.history)) == ("accepted", None, None, 1)
    moved = connector("c1", "succeeded", now, device_id="device-a", result={"ok": True}, offset=99, owner="k2")
    assert journal.apply_events([moved], {0: 6}) == 0
    c1 = get(journal, "c1")
    assert (c1.stage, c1.result, c1.offset, c1.key_id) == ("succeeded", {"ok": True}, 7, "k1")


def test_each_journal_has_an_id_of_its_own_kept_across_restarts(tmp_path):
    """The id that tells this journal's Kafka records apart is made once, with the file, and read back after."""
    ids = []
    for path in ("a.db", "b.db", "a.db"):
        j = Journal(tmp_path / path)
        j.open()
        ids.append(j.journal_id)
        j.close()
    assert ids[0] == ids[2] != ids[1] and len(ids[0]) == 16
