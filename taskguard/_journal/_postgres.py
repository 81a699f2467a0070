"""The PostgreSQL journal: many processes on many machines (``postgresql://...``).

Driver: psycopg 3 (the ``postgres`` extra, or ``pip install 'psycopg[binary]'``), its
synchronous API in worker threads, like the SQLite journal. Why not asyncpg or
psycopg's async API: both need asyncio, and the guard also runs on trio; a
worker thread per call costs tens of microseconds, once per group commit.

- Claims: ``SELECT ... FOR UPDATE SKIP LOCKED``, so processes claiming at once
  never take the same entry nor wait on each other.
- Liveness: each owner holds a session-level advisory lock on its own id for as
  long as its connection lives; the server drops it when the process dies (its
  connection closes), so others take its entries at once. A partitioned
  machine keeps its connection until TCP notices; there the lease (on the
  server's clock, so machines' clocks need not agree) is the fallback.
- Rescue is by polling (a cheap indexed probe each second, see docs/durable.md
  for the measurement), not LISTEN/NOTIFY: a rescue is rare and the poll also
  finds expired leases, which no one would notify.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import anyio.to_thread

from . import Batch, DeadEntry, Entry, JournalError

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise JournalError(
        "a postgresql:// journal needs psycopg 3: install taskguard's `postgres` extra "
        "(or: pip install 'psycopg[binary]>=3.1')"
    ) from exc

__all__ = ["PostgresJournal"]

T = TypeVar("T")

_COLUMNS = (
    "id, name, grp, payload, key, attempt, created, owner, lease_until, not_before, last_error, "
    "recoveries"
)
_DEAD_COLUMNS = "id, name, grp, payload, key, attempts, created, died, error"
_NOW = "extract(epoch FROM clock_timestamp())::float8"
_SCHEMA = """
SELECT pg_advisory_xact_lock(7316920815461251357);
CREATE TABLE IF NOT EXISTS taskguard_entries (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, payload TEXT NOT NULL,
    key TEXT UNIQUE, attempt INTEGER NOT NULL, created FLOAT8 NOT NULL, owner TEXT,
    lease_until FLOAT8 NOT NULL DEFAULT 0, not_before FLOAT8 NOT NULL DEFAULT 0, last_error TEXT,
    recoveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS taskguard_entries_owner ON taskguard_entries (owner);
CREATE TABLE IF NOT EXISTS taskguard_dead (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, payload TEXT NOT NULL,
    key TEXT, attempts INTEGER NOT NULL, created FLOAT8 NOT NULL, died FLOAT8 NOT NULL,
    error TEXT NOT NULL
);
"""
# One statement for the whole batch's inserts; a key already journaled is skipped.
_INSERT = f"""
INSERT INTO taskguard_entries ({_COLUMNS})
SELECT i, n, g, p, k, a, c, o,
       CASE WHEN o IS NULL THEN 0 ELSE {_NOW} + %(lease)s END, nb, e, r
FROM unnest(%(id)s::text[], %(name)s::text[], %(grp)s::text[], %(payload)s::text[],
            %(key)s::text[], %(attempt)s::int[], %(created)s::float8[], %(owner)s::text[],
            %(not_before)s::float8[], %(error)s::text[], %(recoveries)s::int[])
     AS t(i, n, g, p, k, a, c, o, nb, e, r)
ON CONFLICT (key) DO NOTHING
RETURNING key
"""
_LIVE_OWNERS = """
SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 1 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _lock_key(owner: str) -> int:
    """The advisory-lock key of an owner id (63 random bits, as hex)."""
    return int(owner, 16)


class PostgresJournal:
    """A :class:`~taskguard._journal.Journal` in a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._lock = threading.Lock()
        self._owner: str | None = None
        self._lease = 30.0

    def __repr__(self) -> str:
        return "<PostgresJournal>"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise JournalError("the journal is closed")
            try:
                return fn(conn, *args)
            except psycopg.Error as exc:
                raise JournalError(f"PostgreSQL journal: {exc}") from exc

    async def open(self, owner: str | None, lease_timeout: float) -> None:
        await anyio.to_thread.run_sync(self._open, owner, lease_timeout)

    def _open(self, owner: str | None, lease_timeout: float) -> None:
        try:
            conn = psycopg.connect(self.url, autocommit=True)
        except psycopg.Error as exc:
            raise JournalError(f"cannot connect to the PostgreSQL journal: {exc}") from exc
        try:
            with conn.transaction():
                conn.execute(_SCHEMA)
            if owner is not None:
                # held by this connection's session until it closes or the process dies
                conn.execute("SELECT pg_advisory_lock(%s)", (_lock_key(owner),))
        except psycopg.Error as exc:
            conn.close()
            raise JournalError(f"cannot set up the PostgreSQL journal: {exc}") from exc
        self._conn, self._owner, self._lease = conn, owner, lease_timeout

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                if self._owner is not None:
                    conn.execute(
                        "UPDATE taskguard_entries SET owner = NULL, lease_until = 0 "
                        "WHERE owner = %s",
                        (self._owner,),
                    )
            finally:
                conn.close()  # ends the session: its advisory lock goes with it

    async def apply(self, batch: Batch) -> dict[str, Entry]:
        return await self._call(self._apply, batch)

    def _apply(self, conn: psycopg.Connection[Any], batch: Batch) -> dict[str, Entry]:
        conflicts: dict[str, Entry] = {}
        with conn.transaction(), conn.cursor() as cur:
            # ends first: a key freed by a completion in this batch can be taken again
            gone = batch.deletes + [e.id for e, _ in batch.dead]
            if batch.dead:
                cur.executemany(
                    f"INSERT INTO taskguard_dead ({_DEAD_COLUMNS}) "
                    f"VALUES (%s, %s, %s, %s, %s, %s, %s, {_NOW}, %s) "
                    "ON CONFLICT (id) DO UPDATE SET error = excluded.error, died = excluded.died",
                    [
                        (e.id, e.name, e.group, e.payload, e.key, e.attempt, e.created, err)
                        for e, err in batch.dead
                    ],
                )
            if gone:
                cur.execute("DELETE FROM taskguard_entries WHERE id = ANY(%s)", (gone,))
            if batch.retries:
                cur.executemany(
                    "UPDATE taskguard_entries SET attempt = %s, not_before = %s, last_error = %s "
                    "WHERE id = %s",
                    [(a, nb, err, i) for i, a, nb, err in batch.retries],
                )
            if batch.releases:
                cur.execute(
                    "UPDATE taskguard_entries SET owner = NULL, lease_until = 0 "
                    "WHERE id = ANY(%s) AND owner = %s",
                    (batch.releases, self._owner),
                )
            if batch.inserts:
                ins = batch.inserts
                cur.execute(
                    _INSERT,
                    {
                        "lease": self._lease,
                        "id": [e.id for e in ins],
                        "name": [e.name for e in ins],
                        "grp": [e.group for e in ins],
                        "payload": [e.payload for e in ins],
                        "key": [e.key for e in ins],
                        "attempt": [e.attempt for e in ins],
                        "created": [e.created for e in ins],
                        "owner": [e.owner for e in ins],
                        "not_before": [e.not_before for e in ins],
                        "error": [e.last_error for e in ins],
                        "recoveries": [e.recoveries for e in ins],
                    },
                )
                taken = {key for (key,) in cur.fetchall()}
                lost = [e.key for e in ins if e.key is not None and e.key not in taken]
                if lost:
                    cur.execute(
                        f"SELECT {_COLUMNS} FROM taskguard_entries WHERE key = ANY(%s)", (lost,)
                    )
                    conflicts = {row[4]: Entry(*row) for row in cur.fetchall()}
        return conflicts

    async def claim(self, names: Collection[str], limit: int) -> list[Entry]:
        if not names or self._owner is None:
            return []
        return await self._call(self._claim, list(names), limit)

    def _claim(self, conn: psycopg.Connection[Any], names: list[str], limit: int) -> list[Entry]:
        owners = conn.execute(
            f"SELECT DISTINCT owner FROM taskguard_entries WHERE owner IS NOT NULL "
            f"AND owner <> %s AND lease_until >= {_NOW}",
            (self._owner,),
        ).fetchall()
        dead: list[str] = []
        if owners:
            live = {key for (key,) in conn.execute(_LIVE_OWNERS).fetchall()}
            dead = [o for (o,) in owners if _lock_key(o) not in live]
        with conn.transaction():
            rows = conn.execute(
                f"""
                WITH picked AS (
                    SELECT id FROM taskguard_entries
                    WHERE name = ANY(%(names)s) AND (owner IS NULL OR (owner <> %(me)s
                        AND (lease_until < {_NOW} OR owner = ANY(%(dead)s))))
                    ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
                UPDATE taskguard_entries AS e
                SET owner = %(me)s, lease_until = {_NOW} + %(lease)s,
                    recoveries = e.recoveries + CASE WHEN e.owner IS NULL THEN 0 ELSE 1 END
                FROM picked WHERE e.id = picked.id
                RETURNING {", ".join("e." + c.strip() for c in _COLUMNS.split(","))}
                """,
                {"names": names, "me": self._owner, "dead": dead, "limit": limit,
                 "lease": self._lease},
            ).fetchall()  # fmt: skip
        entries = [Entry(*row) for row in rows]
        entries.sort(key=lambda e: e.id)
        return entries

    async def renew(self) -> None:
        if self._owner is not None:
            await self._call(self._renew)

    def _renew(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            f"UPDATE taskguard_entries SET lease_until = {_NOW} + %s WHERE owner = %s",
            (self._lease, self._owner),
        )

    async def exists(self, entry_id: str) -> bool:
        return await self._call(self._exists, entry_id)

    def _exists(self, conn: psycopg.Connection[Any], entry_id: str) -> bool:
        row = conn.execute("SELECT 1 FROM taskguard_entries WHERE id = %s", (entry_id,))
        return row.fetchone() is not None

    # -- administration ------------------------------------------------------

    async def entries(self, limit: int) -> list[Entry]:
        return await self._call(self._entries, limit)

    def _entries(self, conn: psycopg.Connection[Any], limit: int) -> list[Entry]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM taskguard_entries ORDER BY id LIMIT %s", (limit,)
        ).fetchall()
        return [Entry(*r) for r in rows]

    async def dead_letters(self, limit: int) -> list[DeadEntry]:
        return await self._call(self._dead_letters, limit)

    def _dead_letters(self, conn: psycopg.Connection[Any], limit: int) -> list[DeadEntry]:
        rows = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM taskguard_dead ORDER BY died LIMIT %s", (limit,)
        ).fetchall()
        return [DeadEntry(*r) for r in rows]

    async def get(self, entry_id: str) -> Entry | DeadEntry | None:
        return await self._call(self._get, entry_id)

    def _get(self, conn: psycopg.Connection[Any], entry_id: str) -> Entry | DeadEntry | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM taskguard_entries WHERE id = %s", (entry_id,)
        ).fetchone()
        if row is not None:
            return Entry(*row)
        row = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM taskguard_dead WHERE id = %s", (entry_id,)
        ).fetchone()
        return DeadEntry(*row) if row is not None else None

    async def retry(self, entry_id: str) -> bool:
        return await self._call(self._retry, entry_id)

    def _retry(self, conn: psycopg.Connection[Any], entry_id: str) -> bool:
        try:
            with conn.transaction():
                row = conn.execute(
                    f"DELETE FROM taskguard_dead WHERE id = %s RETURNING {_DEAD_COLUMNS}",
                    (entry_id,),
                ).fetchone()
                if row is None:
                    return False
                d = DeadEntry(*row)
                conn.execute(
                    f"INSERT INTO taskguard_entries ({_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, 1, %s, NULL, 0, 0, %s, 0)",
                    (d.id, d.name, d.group, d.payload, d.key, d.created, d.error),
                )
        except psycopg.errors.UniqueViolation:
            raise JournalError(f"entry {entry_id}: its key is journaled again meanwhile") from None
        return True

    async def drop(self, entry_id: str) -> bool:
        return await self._call(self._drop, entry_id)

    def _drop(self, conn: psycopg.Connection[Any], entry_id: str) -> bool:
        with conn.transaction():
            n = conn.execute("DELETE FROM taskguard_entries WHERE id = %s", (entry_id,)).rowcount
            n += conn.execute("DELETE FROM taskguard_dead WHERE id = %s", (entry_id,)).rowcount
        return n > 0
