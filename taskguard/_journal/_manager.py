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

import anyio
import anyio.lowlevel

from .._durable import DurableFunction, register, registered
from .._exceptions import NotStartedError, ShuttingDownError
from .._report import DurableReport, State
from . import Batch, Entry, Journal, JournalError, open_journal
from ._runner import TaskRunner, _Task, new_id, redact

if TYPE_CHECKING:
    from .._guard import TaskGuard
    from .._handle import TaskHandle

__all__ = ["DurableManager"]

logger = logging.getLogger("taskguard")

#: entries claimed per journal round trip at start (the first ones run while
#: the next are claimed)
CLAIM_CHUNK = 1000
#: the first round trip is smaller, so the first resumed task starts sooner
FIRST_CLAIM = 100
COUNTS = ("journaled", "resumed", "completed", "retried", "saved_at_cut", "dead_lettered")


class DurableManager(TaskRunner):
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
        limit = FIRST_CLAIM
        while True:
            claimed = await journal.claim(registered(self.declared), limit)
            self._resume(claimed)
            if len(claimed) < limit:
                break
            await anyio.lowlevel.checkpoint()  # the first resumed tasks start meanwhile
            limit = CLAIM_CHUNK
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
