"""The durability manager of one guard: group commit, retries, leases, resume and the cut.

One per guard, created when a durable task is declared on it or a journal is
configured; its per-run state is fresh at each start. It runs on the guard's
event loop (asyncio or trio) and talks to the journal only through
:class:`~taskguard._journal.Journal`, whose blocking I/O runs in worker threads.

- **Group commit.** ``spawn`` appends its entry to the open batch and waits for
  that batch's commit; one flusher task writes a batch while the next one
  fills. After the commit the flusher starts the batch's tasks (in each
  spawner's context), so a task runs even if its spawner was cancelled meanwhile.
- **Completion, retries, dead letters** are appended to the batch without
  waiting: losing them to a kill means a re-run (at-least-once), never a loss.
- **Leases.** A poll task renews this owner's leases every ``lease_timeout / 3``
  and, while the guard runs, claims entries no live process holds.
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

from .._durable import _CONTEXT, DurableFunction, register, registered
from .._exceptions import NotStartedError, ShuttingDownError
from .._report import DurableReport, State
from . import Batch, Entry, Journal, JournalError, open_journal

if TYPE_CHECKING:
    from .._guard import TaskGuard
    from .._handle import TaskHandle

__all__ = ["DurableManager"]

logger = logging.getLogger("taskguard")

#: entries claimed per journal round trip at start (the first ones run while
#: the next are claimed)
CLAIM_CHUNK = 1000
MAX_BACKOFF = 60.0
#: an entry taken over from a dead process this many times is dead-lettered (a task
#: that kills its process, e.g. by running out of memory, would crash-loop the fleet)
MAX_RECOVERIES = 100
COUNTS = ("journaled", "resumed", "completed", "retried", "saved_at_cut", "dead_lettered")


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


class DurableManager:
    """Durable tasks of one guard (see the module docstring)."""

    def __init__(self, guard: TaskGuard) -> None:
        self.guard = guard
        #: durable functions declared on this guard (``@guard.durable``)
        self.declared: dict[str, DurableFunction[Any]] = {}
        self.journal: Journal | None = None
        self.owner = ""
        self.counts: Counter[str] = Counter()
        self.closing = True

    def declare(self, fn: DurableFunction[Any]) -> None:
        register(self.declared, fn)

    # -- lifecycle -----------------------------------------------------------

    async def start(self, url: str) -> None:
        """Open the journal and resume what no live process holds, before returning."""
        cfg = self.guard.config
        self.journal = None
        self.counts = Counter()
        self.url = url
        self.lease = cfg.lease_timeout
        self.poll = min(1.0, self.lease / 4)
        self.owner = f"{random.getrandbits(63):016x}"
        self.batch = Batch()
        self.batch_tasks: list[_Task] = []
        self.batch_done = anyio.Event()
        self.work = anyio.Event()
        self.keys: dict[str, _Task] = {}
        self.cut_live: dict[_Task, None] = {}
        self.stop = anyio.Event()
        self.flusher_done = anyio.Event()
        self.poller_done = anyio.Event()
        journal = open_journal(url)
        await journal.open(self.owner, self.lease)
        self.journal = journal
        self.closing = False
        backend = self.guard.backend
        backend.start_system_task(self._flusher, name="taskguard-journal-flusher")
        while True:
            claimed = await journal.claim(registered(self.declared), CLAIM_CHUNK)
            self._resume(claimed)
            if len(claimed) < CLAIM_CHUNK:
                break
            await anyio.lowlevel.checkpoint()  # the first resumed tasks start meanwhile
        backend.start_system_task(self._poller, name="taskguard-journal-leases")

    async def close(self) -> None:
        """Write what is pending, give back what this process holds, close the journal."""
        if self.journal is None or self.closing:
            return
        self.closing = True
        self.stop.set()
        self._kick()
        with anyio.move_on_after(self.guard.config.hook_timeout) as scope:
            await self.poller_done.wait()
            await self.flusher_done.wait()
            await self.journal.close()
        if scope.cancelled_caught:
            logger.error(
                "the journal %s did not close within %gs; entries this process held "
                "are rescued when their lease expires",
                redact(self.url),
                self.guard.config.hook_timeout,
            )

    def report(self) -> DurableReport | None:
        if self.journal is None:
            return None
        return DurableReport(journal=redact(self.url), **{k: self.counts[k] for k in COUNTS})

    # -- spawning --------------------------------------------------------------

    async def spawn(
        self, fn: DurableFunction[Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: Any
    ) -> TaskHandle[Any]:
        guard = self.guard
        if fn.guard is not None and fn.guard is not guard:
            raise ValueError(f"durable task {fn.name} was declared on another guard")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"{fn.name}.spawn(key=...) must be a str or None, not {key!r}")
        self._check_intake(fn)
        payload, values = fn.encode(args, kwargs)
        if key is not None:
            held = self.keys.get(key)
            if held is not None:
                return await self._handle_of(held)
        now = time.time()
        spawn_mode = fn.journal_on == "spawn"
        entry = Entry(new_id(), fn.name, fn.group, payload, key, 1, now)
        task = _Task(fn, entry, values, spawn_mode, contextvars.copy_context())
        if key is not None:
            self.keys[key] = task
        if not spawn_mode:  # "cut": nothing written on the normal path
            task.handle = guard.spawn(self._execute(task), group=fn.group, name=fn.name)
            self.cut_live[task] = None
            return task.handle
        entry.owner, entry.lease_until = self.owner, now + self.lease
        self.batch.inserts.append(entry)
        self.batch_tasks.append(task)
        return await self._handle_of(task)

    async def _handle_of(self, task: _Task) -> TaskHandle[Any]:
        while task.handle is None and task.error is None:
            await self._commit()  # its batch, or the one in flight and then the next
        if task.error is not None:
            raise task.error
        assert task.handle is not None
        return task.handle

    def _check_intake(self, fn: DurableFunction[Any]) -> None:
        guard = self.guard
        state = guard.state
        if state is State.IDLE:
            raise NotStartedError(
                "durable spawn before the guard started: enter it with `async with guard:`"
            )
        if guard.config.journal is None:
            raise JournalError(
                f"durable task {fn.name}: the guard has no journal; configure one, e.g. "
                "GuardConfig(journal='sqlite:///journal.db')"
            )
        if self.journal is None or self.closing or state in (State.STOPPING, State.CLOSED):
            raise ShuttingDownError(f"durable spawn refused: the guard is {state.value}")

    async def _commit(self) -> None:
        """Wait until the open batch (and what it holds) is committed."""
        done = self.batch_done
        self._kick()
        await done.wait()

    def _kick(self) -> None:
        if not self.work.is_set():
            self.work.set()

    async def _flusher(self) -> None:
        assert self.journal is not None
        try:
            while True:
                if not self.batch:
                    # nothing to write: whoever waits on this batch is committed already
                    done, self.batch_done = self.batch_done, anyio.Event()
                    done.set()
                    if self.closing:
                        return
                    self.work = anyio.Event()  # no await since the check: no kick is lost
                    await self.work.wait()
                    continue
                batch, tasks, done = self.batch, self.batch_tasks, self.batch_done
                self.batch, self.batch_tasks, self.batch_done = Batch(), [], anyio.Event()
                try:
                    conflicts = await self.journal.apply(batch)
                except Exception as exc:
                    logger.error("journal %s: group commit failed", redact(self.url), exc_info=exc)
                    for task in tasks:
                        task.error = JournalError(f"the journal write failed: {exc}")
                        self._forget(task)
                else:
                    self._start_committed(tasks, conflicts)
                done.set()
        finally:
            for task in self.batch_tasks:  # nobody waits forever on a batch that will not come
                task.error = ShuttingDownError("the journal closed before this spawn was written")
            self.batch_done.set()
            self.flusher_done.set()

    def _start_committed(self, tasks: list[_Task], conflicts: dict[str, Entry]) -> None:
        guard = self.guard
        for task in tasks:
            entry = task.entry
            if entry.key is not None and entry.key in conflicts:
                task.handle = self._watch(task, conflicts[entry.key])
                continue
            self.counts["journaled"] += 1
            context = task.context or contextvars.copy_context()
            task.context = None
            try:
                task.handle = context.run(
                    guard.spawn, self._execute(task), group=task.fn.group, name=task.fn.name
                )
            except Exception as exc:  # the guard refused it meanwhile: so does spawn
                task.error = exc
                self._forget(task)
                self.batch.deletes.append(entry.id)
                self._kick()

    # -- running -----------------------------------------------------------------

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

    # -- resume, leases, the cut --------------------------------------------------

    def _resume(self, entries: list[Entry]) -> None:
        guard, declared = self.guard, registered(self.declared)
        for entry in entries:
            fn = declared.get(entry.name)
            if fn is None or guard.state is not State.RUNNING or self.closing:
                self.batch.releases.append(entry.id)
                self._kick()
                continue
            task = _Task(fn, entry, None, True, None)
            try:
                task.handle = guard.spawn(self._execute(task), group=fn.group, name=fn.name)
            except Exception as exc:
                logger.warning("durable task %s (%s) not resumed: %s", fn.name, entry.id, exc)
                self.batch.releases.append(entry.id)
                self._kick()
                continue
            self.counts["resumed"] += 1
            if entry.key is not None:
                self.keys[entry.key] = task

    async def _poller(self) -> None:
        assert self.journal is not None
        next_renew = time.monotonic() + self.lease / 3
        try:
            while not self.closing:
                with anyio.move_on_after(self.poll):
                    await self.stop.wait()
                if self.stop.is_set():
                    return
                try:
                    if time.monotonic() >= next_renew:
                        await self.journal.renew()
                        next_renew = time.monotonic() + self.lease / 3
                    if self.guard.state is State.RUNNING:
                        self._resume(await self.journal.claim(registered(self.declared), 100))
                except Exception:
                    logger.exception("journal %s: lease renewal or rescue failed", redact(self.url))
        finally:
            self.poller_done.set()

    async def save_cut(self, groups: set[str] | None) -> None:
        """Write the ``journal_on="cut"`` tasks of ``groups`` (all: None) that are
        about to be cancelled; return once they are committed (bounded)."""
        if self.journal is None or self.closing:
            return
        tasks = [
            t
            for t in self.cut_live
            if not t.in_journal
            and t.handle is not None
            and not t.handle.done()
            and (groups is None or t.handle.group in groups)
        ]
        if not tasks:
            return
        lease_until = time.time() + self.lease
        for task in tasks:
            task.entry.owner, task.entry.lease_until = self.owner, lease_until
            task.in_journal = True
            self.batch.inserts.append(task.entry)
        self.counts["saved_at_cut"] += len(tasks)
        with anyio.move_on_after(self.guard.config.hook_timeout):
            await self._commit()


async def _cancel_self(handle: TaskHandle[Any] | None) -> None:
    """End the calling guard task as cancelled (its handle says so)."""
    if handle is None:
        raise ShuttingDownError("the guard is shutting down")
    handle.cancel()
    while True:  # the cancellation lands at the next checkpoint
        await anyio.lowlevel.checkpoint()
