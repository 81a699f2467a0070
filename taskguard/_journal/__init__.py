"""The journal of durable tasks: the protocol a backend implements, and ``open_journal(url)``.

A journal keeps the entries of durable tasks that were acknowledged and have not
ended yet, leased to the process that runs them, and a dead-letter table of
those that failed ``max_attempts`` times. The guard's durability manager
(:mod:`taskguard._journal._manager`) does the group commit, retries and leases on
top of any :class:`Journal`; a backend only stores and claims.

Backends are chosen by URL scheme: ``sqlite:///path.db`` (:mod:`._sqlite`) and
``postgresql://...`` (:mod:`._postgres`, imported only when such a URL is used).
:func:`register_backend` adds another one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .._exceptions import TaskGuardError

__all__ = [
    "Batch",
    "DeadEntry",
    "Entry",
    "Journal",
    "JournalError",
    "check_url",
    "open_journal",
    "register_backend",
]


class JournalError(TaskGuardError, RuntimeError):
    """The journal of durable tasks could not be opened, read or written."""


@dataclass(slots=True)
class Entry:
    """One acknowledged durable task that has not ended yet."""

    id: str
    #: the durable function's registered name (``module:qualname`` by default)
    name: str
    group: str
    #: the arguments as JSON (the function's pydantic adapter made it)
    payload: str
    key: str | None
    #: the attempt this entry runs (or ran last) as: 1 + the failures (exceptions) so far
    attempt: int
    created: float
    #: the process (owner id) that holds it; None when nobody does
    owner: str | None = None
    #: until when (unix time) the owner's lease holds without a heartbeat
    lease_until: float = 0.0
    #: not to run before (unix time): the backoff of a retry
    not_before: float = 0.0
    last_error: str | None = None
    #: how many times it was taken over from an owner that died (or went silent)
    recoveries: int = 0


@dataclass(slots=True)
class DeadEntry:
    """A durable task that failed ``max_attempts`` times (the dead-letter table)."""

    id: str
    name: str
    group: str
    payload: str
    key: str | None
    attempts: int
    created: float
    died: float
    error: str


@dataclass(slots=True)
class Batch:
    """The writes of one group commit, applied by :meth:`Journal.apply` in one transaction."""

    #: new entries, write-ahead (owned by this process) or saved at a cut (owner None)
    inserts: list[Entry] = field(default_factory=list)
    #: ids of entries whose task completed
    deletes: list[str] = field(default_factory=list)
    #: (id, next attempt, not_before, error) of failed attempts that will be retried
    retries: list[tuple[str, int, float, str]] = field(default_factory=list)
    #: entries moved to the dead-letter table, with their last error
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    #: ids of entries given back (owner cleared): a graceful stop cut their attempt
    releases: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.deletes or self.retries or self.dead or self.releases)


@runtime_checkable
class Journal(Protocol):
    """What a journal backend implements. Every method may be called from the
    event loop (asyncio or trio, whichever the guard runs on) and must not block
    it: run blocking I/O in a worker thread (``anyio.to_thread.run_sync``).

    Times are unix seconds. ``owner`` is the id of this process's manager,
    given to :meth:`open`; a backend that can tell whether another owner's
    process is alive (a lock the OS or the database drops when its holder dies)
    lets :meth:`claim` take that owner's entries at once, else only when their
    lease expired.
    """

    url: str

    async def open(self, owner: str | None, lease_timeout: float) -> None:
        """Create the tables if needed; with an ``owner``, announce it as alive."""

    async def apply(self, batch: Batch) -> dict[str, Entry]:
        """Apply ``batch`` in one transaction; durable once this returns.

        An insert whose ``key`` is already journaled is skipped; the result maps
        each such key to the entry that holds it.
        """

    async def claim(self, names: Collection[str], limit: int) -> list[Entry]:
        """Take up to ``limit`` entries of the given names that no live process
        holds (no owner, an owner that died, or an expired lease), oldest first:
        they become this owner's, with a fresh lease. An entry taken from an owner
        that died (rather than one given back) counts one more recovery."""

    async def renew(self) -> None:
        """Extend the lease of every entry this owner holds (the heartbeat)."""

    async def exists(self, entry_id: str) -> bool:
        """Whether the entry is still journaled (not completed, not dead)."""

    async def close(self) -> None:
        """Give back what this owner still holds, stop announcing it, close."""

    # -- administration (the ``taskguard journal`` command) ---------------------

    async def entries(self, limit: int) -> list[Entry]:
        """Journaled entries, oldest first."""

    async def dead_letters(self, limit: int) -> list[DeadEntry]:
        """Dead letters, oldest first."""

    async def get(self, entry_id: str) -> Entry | DeadEntry | None:
        """One entry or dead letter by id."""

    async def retry(self, entry_id: str) -> bool:
        """Move a dead letter back into the journal (attempt 1, no owner)."""

    async def drop(self, entry_id: str) -> bool:
        """Delete an entry or a dead letter for good."""


Factory = Callable[[str], Journal]


def _sqlite(url: str) -> Journal:
    from ._sqlite import SqliteJournal

    return SqliteJournal(url)


def _postgres(url: str) -> Journal:
    from ._postgres import PostgresJournal

    return PostgresJournal(url)


_BACKENDS: dict[str, Factory] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def register_backend(scheme: str, factory: Factory) -> None:
    """Make ``scheme://...`` journal URLs open with ``factory(url)`` (a :class:`Journal`)."""
    if not scheme or not scheme.isidentifier():
        raise ValueError(f"a journal URL scheme is a word such as 'redis', not {scheme!r}")
    _BACKENDS[scheme.lower()] = factory


def check_url(url: object) -> str:
    """Validate a journal URL's form and scheme (no I/O); return it."""
    if not isinstance(url, str):
        raise ValueError(f"a journal is a URL string such as 'sqlite:///journal.db', not {url!r}")
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ValueError(
            f"journal {url!r} is not a URL; expected e.g. 'sqlite:///journal.db' or "
            "'postgresql://user@host/db'"
        )
    if scheme.lower() not in _BACKENDS:
        raise ValueError(
            f"unknown journal URL scheme {scheme!r} in {url!r}; known: "
            + ", ".join(sorted(_BACKENDS))
        )
    if scheme.lower() == "sqlite":
        from ._sqlite import sqlite_path

        sqlite_path(url)  # raises on a URL without a usable path
    return url


def open_journal(url: str) -> Journal:
    """The journal backend for ``url`` (not opened yet: ``await journal.open(...)``)."""
    check_url(url)
    return _BACKENDS[url.partition("://")[0].lower()](url)


def describe(obj: Any) -> dict[str, Any]:
    """An entry or dead letter as a plain dict (for the CLI's ``--json``)."""
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
