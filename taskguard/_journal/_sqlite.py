"""The embedded journal: one SQLite file (stdlib ``sqlite3``), shared by a machine's processes.

WAL mode with ``synchronous=NORMAL``: a commit survives the process being
killed (SIGKILL, OOM) but not a power loss or a kernel crash; add
``?synchronous=FULL`` to the URL for that (an fsync per group commit).

Liveness: each owner holds an exclusive ``flock`` on its own file in
``<path>.owners/``; the kernel drops the lock when the process dies, however it
dies, so another process sees at once that the owner is gone (``flock``, not
``fcntl.lockf``: a POSIX record lock belongs to the whole process, so two guards
in one process could not tell each other apart). Without ``fcntl`` (Windows)
only the lease tells.

All SQLite calls run in worker threads, one at a time per journal (a lock), so
the event loop never waits on the disk or on another process's write lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import anyio.to_thread

from . import Batch, DeadEntry, Entry, JournalError

try:
    import fcntl

    HAVE_FLOCK = True
except ImportError:  # pragma: no cover - Windows: leases only
    HAVE_FLOCK = False

__all__ = ["SqliteJournal", "sqlite_path"]

T = TypeVar("T")

_COLUMNS = (
    "id, name, grp, payload, key, attempt, created, owner, lease_until, not_before, last_error, "
    "recoveries"
)
_DEAD_COLUMNS = "id, name, grp, payload, key, attempts, created, died, error"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS taskguard_entries (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, payload TEXT NOT NULL,
    key TEXT UNIQUE, attempt INTEGER NOT NULL, created REAL NOT NULL, owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, last_error TEXT,
    recoveries INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS taskguard_dead (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, payload TEXT NOT NULL,
    key TEXT, attempts INTEGER NOT NULL, created REAL NOT NULL, died REAL NOT NULL,
    error TEXT NOT NULL
) WITHOUT ROWID;
"""
_INSERT = f"INSERT INTO taskguard_entries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
_SYNC = {"OFF", "NORMAL", "FULL", "EXTRA"}


def sqlite_path(url: str) -> tuple[str, str]:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (as SQLAlchemy spells
    them), optionally ``?synchronous=FULL``: the file path and the sync level."""
    rest = url.partition("://")[2]
    if not rest.startswith("/"):
        raise ValueError(
            f"journal {url!r}: a SQLite journal URL is 'sqlite:///relative/path.db' or "
            "'sqlite:////absolute/path.db'"
        )
    path, _, query = rest[1:].partition("?")
    if not path or path == ":memory:":
        raise ValueError(f"journal {url!r}: give a file (an in-memory journal survives nothing)")
    sync = "NORMAL"
    for name, values in parse_qs(query, strict_parsing=bool(query)).items():
        if name != "synchronous" or values[-1].upper() not in _SYNC:
            raise ValueError(
                f"journal {url!r}: the only option is synchronous=NORMAL|FULL|EXTRA, not {name!r}"
            )
        sync = values[-1].upper()
    return path, sync


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(*row)


class SqliteJournal:
    """A :class:`~taskguard._journal.Journal` in one SQLite file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, self._sync = sqlite_path(url)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._owner: str | None = None
        self._lease = 30.0
        self._owners_dir = Path(self.path + ".owners")
        self._owner_fd: int | None = None

    def __repr__(self) -> str:
        return f"<SqliteJournal {self.path}>"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._conn is None:
                raise JournalError(f"the journal {self.url} is closed")
            try:
                return fn(self._conn, *args)
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.url}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------

    async def open(self, owner: str | None, lease_timeout: float) -> None:
        await anyio.to_thread.run_sync(self._open, owner, lease_timeout)

    def _open(self, owner: str | None, lease_timeout: float) -> None:
        try:
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._sync}")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {self.url}: {exc}") from exc
        self._conn = conn
        self._lease = lease_timeout
        if owner is not None:
            self._owner = owner
            if HAVE_FLOCK:
                self._owners_dir.mkdir(exist_ok=True)
                fd = os.open(self._owners_dir / f"{owner}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._owner_fd = fd

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            try:
                if conn is not None and self._owner is not None:
                    conn.execute(
                        "UPDATE taskguard_entries SET owner = NULL, lease_until = 0 "
                        "WHERE owner = ?",
                        (self._owner,),
                    )
            finally:
                if conn is not None:
                    conn.close()
                if self._owner_fd is not None:
                    # unlinked while still locked: nobody sees a live owner's file unlocked
                    (self._owners_dir / f"{self._owner}.lock").unlink(missing_ok=True)
                    os.close(self._owner_fd)
                    self._owner_fd = None

    # -- the manager's operations -----------------------------------------------

    async def apply(self, batch: Batch) -> dict[str, Entry]:
        return await self._call(self._apply, batch)

    def _apply(self, conn: sqlite3.Connection, batch: Batch) -> dict[str, Entry]:
        # Rows go in a few multi-row statements, not executemany: sqlite3 releases
        # the GIL around each statement step, and under a busy event loop every
        # re-acquisition can wait a switch interval (5 ms), once per row.
        conn.execute("BEGIN IMMEDIATE")
        try:
            # ends first: a key freed by a completion in this batch can be taken again
            gone = batch.deletes + [e.id for e, _ in batch.dead]
            if batch.dead:
                now = time.time()
                _insert(conn, "INSERT OR REPLACE INTO taskguard_dead", _DEAD_COLUMNS, [
                    (e.id, e.name, e.group, e.payload, e.key, e.attempt, e.created, now, err)
                    for e, err in batch.dead
                ])  # fmt: skip
            for chunk in _chunks(gone, _MAX_VARS):
                conn.execute(
                    f"DELETE FROM taskguard_entries WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
            if batch.retries:
                conn.executemany(
                    "UPDATE taskguard_entries SET attempt = ?, not_before = ?, last_error = ? "
                    "WHERE id = ?",
                    [(a, nb, err, i) for i, a, nb, err in batch.retries],
                )
            for chunk in _chunks(batch.releases, _MAX_VARS - 1):
                conn.execute(
                    "UPDATE taskguard_entries SET owner = NULL, lease_until = 0 "
                    f"WHERE owner = ? AND id IN ({','.join('?' * len(chunk))})",
                    [self._owner, *chunk],
                )
            conflicts: dict[str, Entry] = {}
            if batch.inserts:
                rows = [_row(e) for e in batch.inserts]
                _insert(conn, "INSERT INTO taskguard_entries", _COLUMNS, rows,
                        " ON CONFLICT(key) DO NOTHING")  # fmt: skip
                keyed = {e.key: e.id for e in batch.inserts if e.key is not None}
                for chunk in _chunks(list(keyed), _MAX_VARS):
                    held = conn.execute(
                        f"SELECT {_COLUMNS} FROM taskguard_entries "
                        f"WHERE key IN ({','.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                    for row in held:  # the key is held by another entry: this one was skipped
                        if keyed[row[4]] != row[0]:
                            conflicts[row[4]] = Entry(*row)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conflicts

    async def claim(self, names: Collection[str], limit: int) -> list[Entry]:
        if not names or self._owner is None:
            return []
        return await self._call(self._claim, list(names), limit)

    def _claim(self, conn: sqlite3.Connection, names: list[str], limit: int) -> list[Entry]:
        now = time.time()
        dead = self._dead_owners(conn, now)
        marks = ",".join("?" * len(names))
        dead_marks = ",".join("?" * len(dead))
        where = (
            f"name IN ({marks}) AND (owner IS NULL OR (owner != ? AND (lease_until < ?"
            + (f" OR owner IN ({dead_marks})" if dead else "")
            + ")))"
        )
        params = [*names, self._owner, now, *dead]
        probe = conn.execute(f"SELECT 1 FROM taskguard_entries WHERE {where} LIMIT 1", params)
        if probe.fetchone() is None:  # the common poll: no write lock taken
            return []
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM taskguard_entries WHERE {where} ORDER BY id LIMIT ?",
                [*params, limit],
            ).fetchall()
            entries = [_entry(r) for r in rows]
            lease_until = time.time() + self._lease
            for e in entries:
                if e.owner is not None:  # its owner died (or went silent) while holding it
                    e.recoveries += 1
                e.owner, e.lease_until = self._owner, lease_until
            conn.executemany(
                "UPDATE taskguard_entries SET owner = ?, lease_until = ?, recoveries = ? "
                "WHERE id = ?",
                [(e.owner, lease_until, e.recoveries, e.id) for e in entries],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return entries

    def _dead_owners(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Owners holding live leases whose process is gone (their lock file is free)."""
        if not HAVE_FLOCK:
            return []
        owners = conn.execute(
            "SELECT DISTINCT owner FROM taskguard_entries "
            "WHERE owner IS NOT NULL AND owner != ? AND lease_until >= ?",
            (self._owner, now),
        ).fetchall()
        return [owner for (owner,) in owners if not self._alive(owner)]

    def _alive(self, owner: str) -> bool:
        path = self._owners_dir / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return True
        try:
            path.unlink(missing_ok=True)  # its owner died: tidy up
        finally:
            os.close(fd)
        return False

    async def renew(self) -> None:
        if self._owner is not None:
            await self._call(self._renew)

    def _renew(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE taskguard_entries SET lease_until = ? WHERE owner = ?",
            (time.time() + self._lease, self._owner),
        )

    async def exists(self, entry_id: str) -> bool:
        return await self._call(self._exists, entry_id)

    def _exists(self, conn: sqlite3.Connection, entry_id: str) -> bool:
        row = conn.execute("SELECT 1 FROM taskguard_entries WHERE id = ?", (entry_id,))
        return row.fetchone() is not None

    # -- administration ------------------------------------------------------

    async def entries(self, limit: int) -> list[Entry]:
        return await self._call(self._entries, limit)

    def _entries(self, conn: sqlite3.Connection, limit: int) -> list[Entry]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM taskguard_entries ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [Entry(*r) for r in rows]

    async def dead_letters(self, limit: int) -> list[DeadEntry]:
        return await self._call(self._dead_letters, limit)

    def _dead_letters(self, conn: sqlite3.Connection, limit: int) -> list[DeadEntry]:
        rows = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM taskguard_dead ORDER BY died LIMIT ?", (limit,)
        ).fetchall()
        return [DeadEntry(*r) for r in rows]

    async def get(self, entry_id: str) -> Entry | DeadEntry | None:
        return await self._call(self._get, entry_id)

    def _get(self, conn: sqlite3.Connection, entry_id: str) -> Entry | DeadEntry | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM taskguard_entries WHERE id = ?", (entry_id,)
        ).fetchone()
        if row is not None:
            return _entry(row)
        row = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM taskguard_dead WHERE id = ?", (entry_id,)
        ).fetchone()
        return DeadEntry(*row) if row is not None else None

    async def retry(self, entry_id: str) -> bool:
        return await self._call(self._retry, entry_id)

    def _retry(self, conn: sqlite3.Connection, entry_id: str) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                f"SELECT {_DEAD_COLUMNS} FROM taskguard_dead WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return False
            d = DeadEntry(*row)
            entry = Entry(d.id, d.name, d.group, d.payload, d.key, 1, d.created, last_error=d.error)
            conn.execute(_INSERT, _row(entry))
            conn.execute("DELETE FROM taskguard_dead WHERE id = ?", (entry_id,))
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            raise JournalError(
                f"entry {entry_id}: its key {d.key!r} is journaled again meanwhile"
            ) from None
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return True

    async def drop(self, entry_id: str) -> bool:
        return await self._call(self._drop, entry_id)

    def _drop(self, conn: sqlite3.Connection, entry_id: str) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        n = conn.execute("DELETE FROM taskguard_entries WHERE id = ?", (entry_id,)).rowcount
        n += conn.execute("DELETE FROM taskguard_dead WHERE id = ?", (entry_id,)).rowcount
        conn.execute("COMMIT")
        return n > 0


# Bound parameters per statement (SQLite before 3.32 allows 999, later 32,766).
_MAX_VARS = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
_ROWS_PER_INSERT = 500


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _insert(
    conn: sqlite3.Connection, head: str, columns: str, rows: list[tuple[Any, ...]], tail: str = ""
) -> None:
    """``head (columns) VALUES (...), (...), ...tail``: one statement per chunk of rows."""
    if not rows:
        return
    marks = "(" + ",".join("?" * len(rows[0])) + ")"
    per = min(_ROWS_PER_INSERT, _MAX_VARS // len(rows[0]))
    for chunk in _chunks(rows, per):
        conn.execute(
            f"{head} ({columns}) VALUES {','.join([marks] * len(chunk))}{tail}",
            [value for row in chunk for value in row],
        )


def _row(e: Entry) -> tuple[Any, ...]:
    return (
        e.id,
        e.name,
        e.group,
        e.payload,
        e.key,
        e.attempt,
        e.created,
        e.owner,
        e.lease_until,
        e.not_before,
        e.last_error,
        e.recoveries,
    )
