"""The journal's room on disk: JOURNAL_MAX_DISK, what counts against it, and how finished commands make room.

What counts is the database file and its WAL, as they are on disk. SQLite never shrinks a file when rows are
deleted: their pages go to the file's freelist, and later writes take them before they grow the file. So the
ceiling is kept as a number of pages. The database gets the ceiling less the WAL's share and a reserve; a
transaction that adds commands may use free pages and grow the file up to that share, no further. Before it
would need more, the oldest finished commands are deleted (pruned) to free pages; when none is left, its new
commands are refused (journal full). A command waiting for Kafka is never pruned.

Status marks and status-topic events are never refused: they change rows in place and finish commands, so
what they take beyond the database's share (at most what one transaction of them adds: the reserve) is given
back by the pruning that follows. SQLite checkpoints the WAL every `wal_pages` and truncates it to `wal_limit`
when it starts over; but a transaction writes all its pages there before any checkpoint, so the database's
share leaves room for the largest WAL recent commits left (Ceiling.saw_wal), and a commit that took the files
past the ceiling anyway is checkpointed at once (Journal._measure).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# What a new command may take beyond its record bytes, and what a status change may add to a row and its indexes:
# estimates on the generous side (about 0.6-0.9 KiB per command was measured), used only to prune ahead of need.
PER_COMMAND = 1024
PER_CHANGE = 256
OPS_PER_COMMIT = 2000  # queued operations one commit takes at most, without a ceiling
PRUNE_CHUNK = 500  # commands deleted per statement at most, so that each stays short
FREED_PER_COMMAND = 512  # bytes a pruned command frees at least (about 730 was measured): how many to prune

_PAGES = "SELECT page_count, freelist_count FROM pragma_page_count(), pragma_freelist_count()"
# Oldest finished first, read from the commands_finished index (updated_at WHERE status != 'accepted').
_PRUNE = (
    "DELETE FROM commands WHERE seq IN (SELECT seq FROM commands WHERE status != 'accepted' "
    "ORDER BY updated_at LIMIT ?) RETURNING fanout_id"
)
_ORPHAN_FANOUT = "DELETE FROM fanouts WHERE fanout_id = ? AND NOT EXISTS (SELECT 1 FROM commands WHERE fanout_id = ?)"

KiB, MiB = 1024, 1024 * 1024


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


class Ceiling:
    """JOURNAL_MAX_DISK split into the database's share, the WAL's and a reserve, in the file's pages."""

    __slots__ = (
        "_first_wal_room",
        "_wal_recent",
        "_wal_room",
        "budget",
        "changes_per_commit",
        "headroom",
        "limit",
        "page_size",
        "reserve",
        "wal_limit",
        "wal_pages",
    )

    def __init__(self, limit: int, page_size: int) -> None:
        self.limit = limit  # bytes: the database file and its WAL together
        self.page_size = page_size
        # Bytes the WAL is truncated to when it starts over (SQLite's journal_size_limit), and the pages in it
        # after which SQLite checkpoints it (wal_autocheckpoint, 1000 by default).
        self.wal_limit = _clamp(limit // 16, 128 * KiB, 64 * MiB)
        self.wal_pages = _clamp(self.wal_limit // page_size // 2, 8, 1000)
        # Queued changes (status marks) one commit takes at most: about 1 KiB of WAL each (its row's share of a page,
        # and its indexes'), so that a drain's commits stay within the WAL's share. Larger ones would leave a WAL that
        # shrinks the database's share (saw_wal) until it no longer holds even an empty journal's pages.
        self.changes_per_commit = _clamp(self.wal_limit // KiB, 64, OPS_PER_COMMIT)
        # Bytes held back for what status marks and events add without ever being refused.
        self.reserve = _clamp(limit // 32, 256 * KiB, 32 * MiB)
        # Pages the database may use for commands: the ceiling less the room of the WAL and the reserve. The WAL's
        # room is its share, or more when transactions leave it larger (each writes all its pages to the WAL before
        # a checkpoint can empty it): half as much again as the largest WAL a commit left, in this housekeeping
        # interval or the last, so that a somewhat larger transaction fits too. Before any is seen, a small ceiling
        # gives it a quarter: a group commit of a hundred commands leaves a WAL of some hundreds of KiB.
        self._wal_room = self._first_wal_room = max(self.wal_limit, min(limit // 4, 4 * MiB))
        self._wal_recent = 0
        self.budget = self._budget()
        # Free pages pruning makes beyond what is needed, so that it runs now and then, not at every commit.
        self.headroom = _clamp(self.budget // 64, 16, 64)

    def _budget(self) -> int:
        return max(0, self.limit - self._wal_room - self.reserve) // self.page_size

    def saw_wal(self, size: int) -> bool:
        """A commit left the WAL at `size` bytes; whether the database's share had to shrink to leave it room."""
        self._wal_recent = max(self._wal_recent, size)
        if size * 3 // 2 <= self._wal_room:
            return False
        self._wal_room = size * 3 // 2
        self.budget = self._budget()
        return True

    def next_interval(self) -> None:
        """Housekeeping: the WAL's room is what the last interval's commits needed, at least what it was at first."""
        self._wal_room, self._wal_recent = max(self._first_wal_room, self._wal_recent * 3 // 2), 0
        self.budget = self._budget()

    def pages(self, size: int) -> int:
        """Pages that `size` bytes take, rounded up."""
        return -(-size // self.page_size)

    def configure(self, conn: sqlite3.Connection) -> None:
        """Set the writing connection's WAL limits to the WAL's share."""
        conn.execute(f"PRAGMA journal_size_limit={self.wal_limit}")
        conn.execute(f"PRAGMA wal_autocheckpoint={self.wal_pages}")


def page_counts(conn: sqlite3.Connection) -> tuple[int, int]:
    """The database's pages and, of those, the free ones, as the transaction under way sees them."""
    return conn.execute(_PAGES).fetchone()


def prune(conn: sqlite3.Connection, limit: int = PRUNE_CHUNK) -> int:
    """Delete up to `limit` finished commands, oldest finished first, and the fan-outs left without any; returns
    how many commands went. Commands waiting for Kafka (status 'accepted') are never touched."""
    gone = conn.execute(_PRUNE, (limit,)).fetchall()
    fanouts = {fanout_id for (fanout_id,) in gone if fanout_id is not None}
    if fanouts:
        conn.executemany(_ORPHAN_FANOUT, [(f, f) for f in fanouts])
    return len(gone)


def files_size(path: Path) -> tuple[int, int]:
    """The bytes of the database file and of its WAL, as they are on disk now."""
    sizes = []
    for name in (str(path), f"{path}-wal"):
        try:
            sizes.append(os.stat(name).st_size)
        except OSError:  # no WAL yet, or it was removed at a close
            sizes.append(0)
    return sizes[0], sizes[1]
