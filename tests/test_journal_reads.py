"""The journal's read side: queries on the reader thread, indexes for every list, a schema that upgrades in
place, figures the metrics read without SQL, and an app whose event loop never runs a statement."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sqlite3
import threading
import time

import pytest
from helpers import KEYS, command, keys_file
from kafka_local import free_port
from starlette.testclient import TestClient

from journal import Journal, NewCommand
from journal_reads import fetch_recent
from pusher import create_app
from settings import load_settings


def new(request_id: str, device: str = "d1", key_id: str | None = None, created_at: float | None = None) -> NewCommand:
    return NewCommand(
        request_id=request_id,
        idem_key=None,
        client_request_id=False,
        body_hash=b"h",
        device_id=device,
        command_type="reboot",
        created_at=created_at or time.time(),
        expires_at=None,
        key=device.encode(),
        value=b'{"x": 1}',
        headers=[("request_id", request_id.encode())],
        key_id=key_id,
    )


def accept(journal: Journal, *items: NewCommand):
    async def accepted():
        return await journal.accept(list(items))

    return asyncio.run(accepted())


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.db", status_source="pusher@test")
    j.open()
    yield j
    j.close()


def test_a_read_runs_on_the_reader_thread_and_resolves_on_the_callers_loop(journal):
    """Every read runs on the journal's reader thread, never on the loop that awaits it."""

    async def read():
        loop_thread = threading.current_thread()
        ran_on = await journal.reads.submit(lambda conn: threading.current_thread())
        return loop_thread, ran_on, threading.current_thread()

    loop_thread, ran_on, resumed_on = asyncio.run(read())
    assert ran_on.name == "journal-reader" and ran_on is not loop_thread
    assert resumed_on is loop_thread


def test_a_failed_read_raises_in_the_caller_and_the_reader_goes_on(journal):
    """A query that fails gives its error to the one awaiting it; the next read is answered as usual."""
    accept(journal, new("r1"))

    async def reads():
        with pytest.raises(sqlite3.OperationalError):
            await journal.reads.submit(lambda conn: conn.execute("SELECT nope FROM commands").fetchall())
        return await journal.get("r1")

    assert asyncio.run(reads()).request_id == "r1"


def test_a_read_after_close_is_refused_not_left_waiting(tmp_path):
    """Once the journal is closed a read fails at once (503 journal-unavailable), rather than wait for ever."""
    j = Journal(tmp_path / "j.db")
    j.open()
    j.close()
    with pytest.raises(Exception, match="closed") as raised:
        asyncio.run(j.get("anything"))
    assert raised.value.status == 503


def _fill(journal: Journal) -> list:
    """Commands over three devices, two keys (and none), accepted and published, in a known order."""
    items = [
        new(f"r{i}", device=f"dev-{i % 3}", key_id=(None, "k1", "k2")[i % 4 % 3]) for i in range(40)
    ]  # fmt: skip
    accepted = accept(journal, *items)
    for a in accepted[::3]:
        journal.mark(a.row.seq, a.row.request_id, "published", topic="t", partition=0, offset=a.row.seq)
    assert journal.flush()
    return [asyncio.run(journal.get(item.request_id)) for item in items]


FILTERS = {"key_id": (None, "k1"), "device_id": (None, "dev-1"), "status": (None, "published"), "before": (None, 30)}


def _combinations():
    names = list(FILTERS)
    for values in itertools.product(*FILTERS.values()):
        yield dict(zip(names, values, strict=True))


def test_every_list_filter_returns_the_matching_rows_newest_first(journal):
    """For each combination of key, device, status and `before`, the list is exactly the matching rows, newest
    first, cut at the limit."""
    rows = _fill(journal)
    for f in _combinations():
        expected = [
            r.request_id
            for r in sorted(rows, key=lambda r: -r.seq)
            if all(f[n] is None or getattr(r, n) == f[n] for n in ("key_id", "device_id", "status"))
            and (f["before"] is None or r.seq < f["before"])
        ][:5]
        got = asyncio.run(journal.recent(f["device_id"], f["status"], 5, f["before"], f["key_id"]))
        assert [r.request_id for r in got] == expected, f
        assert got == [next(r for r in rows if r.request_id == rid) for rid in expected]


def test_every_list_query_reads_an_index_in_seq_order(journal):
    """No filter combination the list offers scans the table or sorts it: each page comes straight from an
    index ending in seq, however many finished rows the journal holds."""
    _fill(journal)
    conn = sqlite3.connect(journal.path)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        for f in _combinations():
            statements.clear()
            fetch_recent(conn, 50, f["before"], f)
            [sql] = statements
            plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            if any(f[n] is not None for n in ("key_id", "device_id", "status")):
                assert "USING INDEX" in plan and "SCAN" not in plan, (f, plan)
            if f["device_id"] is not None:  # a device's rows, not a whole key's, are read
                assert "USING INDEX commands_device" in plan, (f, plan)
            assert "TEMP B-TREE" not in plan, (f, plan)
    finally:
        conn.close()


_OLD_SCHEMA = """
CREATE TABLE commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, idem_key TEXT UNIQUE,
    body_hash BLOB NOT NULL, device_id TEXT NOT NULL, command_type TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL, record_key BLOB NOT NULL,
    record_value BLOB, record_headers BLOB, topic TEXT, partition INTEGER, "offset" INTEGER, error TEXT,
    history TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE INDEX commands_pending ON commands(seq) WHERE status = 'accepted';
CREATE INDEX commands_device ON commands(device_id, seq);
"""


def test_a_journal_of_an_early_version_opens_in_place_and_gets_the_indexes(tmp_path):
    """A file without the columns and indexes added since (nor the status outbox) is upgraded when it opens:
    its rows stay, its pending command is still pending, and the lists have their indexes."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SCHEMA)
    now = time.time()
    for seq, (rid, status) in enumerate((("old-done", "published"), ("old-pending", "accepted")), start=1):
        old.execute(
            "INSERT INTO commands (request_id, body_hash, device_id, command_type, status, created_at, "
            "updated_at, record_key, record_value, record_headers, history) "
            "VALUES (?, x'', 'dev', 'reboot', ?, ?, ?, x'', ?, ?, ?)",
            (rid, status, now + seq, now + seq, b"{}", b"\x90", json.dumps([["accepted", now + seq, None]])),
        )
    old.commit()
    old.close()

    j = Journal(path)
    pending = j.open().pending
    try:
        assert [p.request_id for p in pending] == ["old-pending"]
        assert pending[0].handed  # an earlier version never said: it may be in Kafka, so it is looked up there
        assert j.oldest_pending_created_at == pytest.approx(now + 2)
        conn = sqlite3.connect(path)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(commands)")}
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(commands)")}
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.close()
        assert {"key_id", "origin", "result", "not_before", "coalesce_key", "superseded_by", "handed"} <= columns
        assert {"status_outbox", "fanouts"} <= tables
        assert {"commands_status", "commands_device", "commands_key", "commands_fanout"} <= indexes
        assert "commands_pending" not in indexes  # commands_status serves what it served
        listed = asyncio.run(j.recent("dev", None, 10))
        assert [(r.request_id, r.key_id, r.origin) for r in listed] == [
            ("old-pending", None, None),
            ("old-done", None, None),
        ]
        [fresh] = accept(j, new("new-1", device="dev", key_id="k1"))
        assert fresh.outcome == "inserted"
        assert [r.request_id for r in asyncio.run(j.recent(None, None, 10, key_id="k1"))] == ["new-1"]
    finally:
        j.close()
    again = Journal(path)  # a second open finds nothing to do
    assert [p.request_id for p in again.open().pending] == ["old-pending", "new-1"]
    again.close()


def test_the_metrics_figures_follow_each_commit_without_sql(journal):
    """The oldest pending command and the status outbox's size move with the writer's commits and agree with
    the file; they are attributes, read without a query."""

    def outbox_in_file() -> int:
        conn = sqlite3.connect(journal.path)
        try:
            return conn.execute("SELECT count(*) FROM status_outbox").fetchone()[0]
        finally:
            conn.close()

    assert journal.oldest_pending_created_at is None and journal.outbox_size == 0
    first, second, third = accept(journal, *(new(f"p{i}", created_at=1000.0 + i) for i in range(3)))
    assert journal.oldest_pending_created_at == 1000.0
    assert journal.outbox_size == outbox_in_file() == 3
    # not the oldest: no change
    journal.mark(second.row.seq, second.row.request_id, "published", topic="t", partition=0, offset=1)
    assert journal.flush()
    assert journal.oldest_pending_created_at == 1000.0
    journal.mark(first.row.seq, first.row.request_id, "expired", error="ttl")
    assert journal.flush()
    assert journal.oldest_pending_created_at == 1002.0 and journal.pending_count == 1
    assert journal.outbox_size == outbox_in_file() == 5
    journal.outbox_sent(journal.outbox_batch(0)[1][0])
    assert journal.flush()
    assert journal.outbox_size == outbox_in_file() == 3
    journal.mark(third.row.seq, third.row.request_id, "published", topic="t", partition=0, offset=2)
    assert journal.flush()
    assert journal.oldest_pending_created_at is None and journal.pending_count == 0


def test_a_failed_read_of_the_oldest_command_keeps_the_writer_going(journal):
    """After a commit that finishes the oldest waiting command the writer reads which one is oldest now; when that
    read fails (a disk I/O error), the figure stays as it was, the writer goes on taking commands, and the next
    commit reads it again."""
    first, _ = accept(journal, new("o1", created_at=1000.0), new("o2", created_at=1001.0))
    writer = journal._writer

    class FailingOnce:  # the writer's connection, but the look-up fails once
        failures = 1

        def execute(self, sql: str, *args):
            if sql.startswith("SELECT seq, created_at FROM commands") and self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("disk I/O error")
            return writer.execute(sql, *args)

        def __getattr__(self, name: str):
            return getattr(writer, name)

    journal._writer = FailingOnce()
    try:
        journal.mark(first.row.seq, first.row.request_id, "published", topic="t", partition=0, offset=1)
        assert journal.flush()
        assert journal.oldest_pending_created_at == 1000.0 and journal.pending_count == 1  # as it was
        [third] = accept(journal, new("o3", created_at=1002.0))
        assert third.outcome == "inserted"  # the writer lives on
        assert journal.oldest_pending_created_at == 1001.0 and journal.pending_count == 2
    finally:
        journal._writer = writer


def test_the_figures_are_read_back_when_the_journal_reopens(tmp_path):
    """After a restart the oldest pending command and the outbox size come from the file."""
    j = Journal(tmp_path / "j.db", status_source="pusher@test")
    j.open()
    accept(j, new("a", created_at=500.0), new("b", created_at=501.0))
    j.close()
    j = Journal(tmp_path / "j.db", status_source="pusher@test")
    j.open()
    try:
        assert (j.oldest_pending_created_at, j.outbox_size, j.pending_count) == (500.0, 2, 2)
    finally:
        j.close()


@pytest.fixture
def traced(monkeypatch):
    """Every SQL statement of every connection the app opens, with the thread that ran it and whether that
    thread was running an event loop."""
    seen: list[tuple[str, bool, str]] = []
    connect = sqlite3.connect

    def record(sql: str) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread().name, on_loop, sql))

    def traced_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(record)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    return seen


def test_status_list_and_metrics_endpoints_never_run_sql_on_the_event_loop(traced, tmp_path):
    """Through the real app (keys on, a status topic set, Kafka away): a command, its status, a long poll, the
    lists (admin and key-scoped), /metrics (the journal's size on disk too), /api/v1/metrics and /api/v1/status
    answer as before, and not one
    statement runs on the event loop's thread; the reads ran on the journal's reader thread."""
    settings = load_settings(
        {
            "JOURNAL_PATH": str(tmp_path / "journal.db"),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "KAFKA_PRODUCER_TIMEOUT": "1",
            "PUBLISH_TIMEOUT": "0.5",
            "KAFKA_STATUS_TOPIC": "status-reads-test",
            "STATUS_TOPIC_SECRET": "s" * 40,
            "API_KEYS_FILE": keys_file(tmp_path / "keys.toml"),
        },
        env_file="/nonexistent",
    )
    writer = {"X-API-Key": KEYS["writer"][0]}
    reader = {"X-API-Key": KEYS["reader"][0]}
    admin = {"X-API-Key": KEYS["admin"][0]}
    with TestClient(create_app(settings)) as client:
        sent = client.post("/api/v1/commands", json=command("dev-7"), headers=writer)
        assert sent.status_code == 202, sent.text
        request_id = sent.json()["request_id"]
        status = client.get(f"/api/v1/commands/{request_id}/status", headers=writer)
        assert status.status_code == 200 and status.json()["status"] == "accepted"
        polled = client.get(
            f"/api/v1/commands/{request_id}/status", params={"wait_for": "published", "timeout": "0.2"}, headers=writer
        )
        assert polled.json()["status"] == "accepted"
        assert client.get(f"/api/v1/commands/{request_id}/status", headers=reader).status_code == 404
        assert client.get("/api/v1/commands/nope/status", headers=writer).status_code == 404
        mine = client.get("/api/v1/commands", params={"device_id": "dev-7"}, headers=writer).json()["items"]
        assert [c["request_id"] for c in mine] == [request_id]
        assert client.get("/api/v1/commands", headers=reader).json()["items"] == []
        assert [c["request_id"] for c in client.get("/api/v1/commands", headers=admin).json()["items"]] == [request_id]
        exposition = client.get("/metrics", headers=admin).text
        assert "pusher_journal_backlog 1.0" in exposition and "pusher_status_outbox 1.0" in exposition
        assert "pusher_journal_oldest_pending_age_seconds" in exposition
        figures = dict(line.rsplit(" ", 1) for line in exposition.splitlines() if line.startswith("pusher_journal_"))
        on_disk = sum(os.stat(f"{tmp_path / 'journal.db'}{suffix}").st_size for suffix in ("", "-wal"))
        assert 0 < float(figures["pusher_journal_disk_bytes"]) <= on_disk + 64 * 1024  # the writer's last figure
        assert float(figures["pusher_journal_disk_ceiling_bytes"]) == settings.journal_max_disk == 512 * 1024**2
        assert float(figures["pusher_journal_pruned_commands_total"]) == 0
        assert client.get("/api/v1/metrics", headers=admin).json()["backlog"] == 1
        assert client.get("/api/v1/status", headers=admin).json()["oldest_pending_age_seconds"] is not None
    on_loop = [(thread, sql) for thread, loop, sql in traced if loop]
    assert on_loop == []
    readers = {thread for thread, _, sql in traced if "FROM commands WHERE request_id" in sql}
    assert readers == {"journal-reader"}
    assert any("ORDER BY seq DESC" in sql and thread == "journal-reader" for thread, _, sql in traced)
