"""How one durable task runs: attempts, retries with backoff, the dead letter, and
what it leaves in the journal when shutdown or its caller stops it.

:class:`TaskRunner` is the per-task half of the durability manager
(:class:`~taskguard._journal._manager.DurableManager` inherits it and owns the
state it uses: the open batch, the counts, the keys held here).
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel

from .._durable import _CONTEXT, DurableFunction
from .._exceptions import ShuttingDownError
from .._report import State
from . import Batch, Entry, Journal, JournalError

if TYPE_CHECKING:
    from .._guard import TaskGuard
    from .._handle import TaskHandle

__all__ = ["MAX_RECOVERIES", "TaskRunner", "backoff_delay", "new_id", "redact"]

logger = logging.getLogger("taskguard")

MAX_BACKOFF = 60.0
#: an entry taken over from a dead process this many times is dead-lettered (a task
#: that kills its process, e.g. by running out of memory, would crash-loop the fleet)
MAX_RECOVERIES = 100


def new_id() -> str:
    """A journal entry id: time-ordered (µs) hex plus 32 random bits."""
    return f"{time.time_ns() // 1000:013x}{random.getrandbits(32):08x}"


def backoff_delay(base: float, retry: int) -> float:
    """Seconds before the ``retry``-th retry: doubling from ``base``, capped, 10% jitter."""
    delay = min(MAX_BACKOFF, base * 2.0 ** (retry - 1))
    return delay * (1 + random.random() / 10)


def redact(url: str) -> str:
    """The URL without its password (for logs and the report)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class _Task:
    """One durable task of this process: its entry, arguments, handle."""

    __slots__ = ("context", "entry", "error", "fn", "handle", "in_journal", "values")

    def __init__(
        self,
        fn: DurableFunction[Any],
        entry: Entry,
        values: dict[str, Any] | None,
        in_journal: bool,
        context: contextvars.Context | None,
    ) -> None:
        self.fn = fn
        self.entry = entry
        self.values = values  # validated arguments of a fresh spawn; None: decode the payload
        self.in_journal = in_journal
        self.context = context
        self.handle: TaskHandle[Any] | None = None
        self.error: BaseException | None = None


class TaskRunner:
    """Runs durable tasks; the manager that inherits it owns these fields."""

    guard: TaskGuard
    journal: Journal | None
    batch: Batch
    work: anyio.Event
    counts: Counter[str]
    keys: dict[str, _Task]
    cut_live: dict[_Task, None]
    poll: float

    def _kick(self) -> None:
        """Wake the flusher: the open batch has something to write."""
        if not self.work.is_set():
            self.work.set()

    async def _execute(self, task: _Task) -> Any:
        fn, entry = task.fn, task.entry
        _CONTEXT.set(task)  # this task's own context: durable_context() reads it
        try:
            values = task.values
            task.values = None
            if values is None:
                try:
                    values = fn.decode(entry.payload)
                except ValueError as exc:
                    self._dead(task, f"its journaled arguments no longer fit: {exc}")
                    raise
            if entry.recoveries > MAX_RECOVERIES:
                error = (
                    f"the process running it died {entry.recoveries} times (a task that "
                    "crashes its process?)"
                )
                self._dead(task, error)
                raise JournalError(f"durable task {fn.name} ({entry.id}): {error}")
            while True:
                if entry.not_before > time.time() and not await self._sleep_until(entry.not_before):
                    await self._leave_for_next_start(task)
                try:
                    result = await fn.call(values)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    if entry.attempt >= fn.max_attempts:
                        self._dead(task, error)
                        raise
                    self._retry(task, error)
                    continue
                except BaseException:
                    if self.guard.state is State.RUNNING and task.in_journal:
                        # cancelled by its caller, not by shutdown: it is not to run again
                        self.batch.deletes.append(entry.id)
                        self._kick()
                    raise
                self.counts["completed"] += 1
                if task.in_journal:
                    self.batch.deletes.append(entry.id)
                    self._kick()
                return result
        finally:
            self._forget(task)

    def _retry(self, task: _Task, error: str) -> None:
        entry = task.entry
        entry.attempt += 1
        delay = backoff_delay(task.fn.backoff, entry.attempt - 1)
        entry.not_before, entry.last_error = time.time() + delay, error
        self.counts["retried"] += 1
        logger.warning(
            "durable task %s (%s) failed, attempt %d of %d; retrying in %.2fs: %s",
            task.fn.name,
            entry.id,
            entry.attempt - 1,
            task.fn.max_attempts,
            delay,
            error,
        )
        if task.in_journal:
            self.batch.retries.append((entry.id, entry.attempt, entry.not_before, error))
            self._kick()

    def _dead(self, task: _Task, error: str) -> None:
        self.counts["dead_lettered"] += 1
        logger.error(
            "durable task %s (%s) moved to the dead-letter table after %d attempt(s): %s",
            task.fn.name,
            task.entry.id,
            task.entry.attempt,
            error,
        )
        self.batch.dead.append((task.entry, error))
        self._kick()

    async def _sleep_until(self, when: float) -> bool:
        """Sleep until ``when`` (unix time); False if shutdown started first."""
        with anyio.move_on_after(max(0.0, when - time.time())):
            await self.guard.wait_for_shutdown()
            return False
        return True

    async def _leave_for_next_start(self, task: _Task) -> None:
        """Shutdown came while the task waited for its retry: leave it in the
        journal for the next start (or another process), and end cancelled."""
        if task.in_journal:
            self.batch.releases.append(task.entry.id)
        else:
            task.entry.owner = None
            self.batch.inserts.append(task.entry)
            task.in_journal = True
            self.counts["saved_at_cut"] += 1
        self._kick()
        await _cancel_self(task.handle)

    def _forget(self, task: _Task) -> None:
        key = task.entry.key
        if key is not None and self.keys.get(key) is task:
            del self.keys[key]
        self.cut_live.pop(task, None)

    def _watch(self, task: _Task, holder: Entry) -> TaskHandle[Any]:
        """A handle for a key that another entry holds: it ends when that entry leaves
        the journal (completed elsewhere, or dead), with None; cancelled at shutdown."""

        async def watch() -> None:
            assert self.journal is not None
            try:
                while True:
                    with anyio.move_on_after(self.poll):
                        await self.guard.wait_for_shutdown()
                        await _cancel_self(task.handle)
                    if not await self.journal.exists(holder.id):
                        return
            finally:
                self._forget(task)

        return self.guard.spawn(watch(), group=task.fn.group, name=f"{task.fn.name} (key held)")


async def _cancel_self(handle: TaskHandle[Any] | None) -> None:
    """End the calling guard task as cancelled (its handle says so)."""
    if handle is None:
        raise ShuttingDownError("the guard is shutting down")
    handle.cancel()
    while True:  # the cancellation lands at the next checkpoint
        await anyio.lowlevel.checkpoint()
