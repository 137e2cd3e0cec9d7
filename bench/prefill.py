"""Fill a journal with finished commands straight through SQLite (no HTTP), for the benchmark's read rows.

    python bench/prefill.py PATH [--count 1000000] [--devices 1000] [--key-id writer]

The file gets the service's own schema (journal_schema.migrate, indexes included) and `count` commands
published in the last hour, spread over `devices` devices (device_000 …, as bench/load.lua names them) and
owned by `key-id`, so the service's list and status reads find them. Recent, so housekeeping keeps them.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from journal_schema import migrate  # noqa: E402

_INSERT = (
    "INSERT INTO commands (request_id, body_hash, device_id, command_type, status, created_at, updated_at, "
    'record_key, record_headers, topic, partition, "offset", history, key_id) '
    "VALUES (?, ?, ?, 'config_update', 'published', ?, ?, ?, ?, 'bench', ?, ?, ?, ?)"
)


def rows(count: int, devices: int, key_id: str, start: float):
    """The commands, oldest first: accepted at `start` + i ms, published 10 ms later."""
    headers = msgspec.msgpack.encode([("request_id", b"prefill")])  # as the service stores them
    for i in range(count):
        created = start + i / 1000
        partition, offset = i % 3, i // 3
        device = f"device_{i % devices:03d}"
        history = json.dumps(
            [["accepted", created, None], ["published", created + 0.01, f"bench/{partition}@{offset}"]]
        )
        yield (f"prefill-{i:07d}", random.randbytes(32), device, created, created + 0.01, device.encode(), headers,
               partition, offset, history, key_id)  # fmt: skip


def prefill(path: Path, count: int, devices: int, key_id: str) -> None:
    """Create `path` with the journal's schema and `count` finished commands."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # a scratch file: a crash while filling only means filling again
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB
        migrate(conn)
        # Rows first, then the indexes built in one pass each (sorted), which is several times faster than
        # keeping them up to date row by row; the second migrate creates them again.
        indexes = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall()
        for (name,) in indexes:
            conn.execute(f"DROP INDEX {name}")
        conn.execute("BEGIN")
        conn.executemany(_INSERT, rows(count, devices, key_id, time.time() - 3600))
        conn.execute("COMMIT")
        migrate(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def main() -> None:
    """Fill the file named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--key-id", default="writer")
    args = parser.parse_args()
    started = time.monotonic()
    prefill(args.path, args.count, args.devices, args.key_id)
    print(f"{args.count} commands in {args.path} in {time.monotonic() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
