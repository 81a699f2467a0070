"""Group: a named set of background tasks with a shutdown policy and a limit."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._config import GroupConfig, GuardConfig
from ._coroutines import release
from ._exceptions import NotStartedError, ShuttingDownError
from ._handle import CANCELLED, COMPLETED, FAILED, TaskHandle
from ._report import GroupReport, GroupStats, State

if TYPE_CHECKING:
    from ._backends import Backend
    from ._inflight import InFlight

__all__ = ["Group", "Groups"]

logger = logging.getLogger("taskguard")

#: Tasks that shutdown gave up on and that still run (they ignored their
#: cancellation). Strong references, so they are never garbage collected
#: mid-flight (their finally blocks would run at a random time); each is
#: removed when it ends, so nothing is kept once it did.
_ABANDONED: set[TaskHandle[Any]] = set()


class Group:
    """Bookkeeping of one group: running and pending tasks, and lifetime counts.

    It talks to the parts of its guard's run it needs — the backend (to start
    and cancel tasks), the in-flight count and the failure handler — bound by
    :meth:`bind` when the guard starts, not to the whole guard.
    """

    __slots__ = (
        "_on_failure",
        "_pumping",
        "abandoned",
        "backend",
        "cancelled",
        "closed",
        "completed",
        "config",
        "cut",
        "deadline",
        "drains",
        "failed",
        "inflight",
        "limit",
        "name",
        "pending",
        "pending_limit",
        "refused",
        "running",
        "start",
        "stuck",
    )

    def __init__(self, name: str, config: GroupConfig) -> None:
        self.name = name
        self.config = config
        self.drains = config.on_shutdown == "drain"
        self.limit = config.limit
        self.pending_limit = config.pending_limit
        # A dict keeps start order (the oldest first, for progress logs) and
        # removes in O(1).
        self.running: dict[TaskHandle[Any], None] = {}
        self.pending: deque[TaskHandle[Any]] = deque()
        #: tasks shutdown gave up on (they ignored their cancellation): no longer
        #: counted as running; their late end changes no count
        self.abandoned: set[TaskHandle[Any]] = set()
        self.completed = self.failed = self.cancelled = self.cut = 0
        self.refused = self.stuck = 0
        #: set when the group's drain timeout passed: it refuses new work
        self.closed = False
        #: loop time of the group's drain timeout, once shutdown started
        self.deadline = float("inf")
        self._pumping = False
        self.backend: Backend | None = None
        self.inflight: InFlight | None = None
        self.start: Callable[[TaskHandle[Any]], None] = _not_started
        self._on_failure: Callable[[TaskHandle[Any]], None] = _ignore

    def bind(
        self, backend: Backend, inflight: InFlight, on_failure: Callable[[TaskHandle[Any]], None]
    ) -> None:
        """Attach the group to its guard's run (at start, or when made while running)."""
        self.backend = backend
        self.inflight = inflight
        self.start = backend.start_task  # bound once: spawn stays one call
        self._on_failure = on_failure

    def __len__(self) -> int:
        return len(self.running) + len(self.pending)

    def _emptied(self) -> None:
        if not self.running and not self.pending and self.inflight is not None:
            self.inflight.emptied()

    def submit(self, handle: TaskHandle[Any]) -> None:
        """Start ``handle`` now, or queue it when the group is at its limit."""
        if self.limit is not None and len(self.running) >= self.limit:
            self.pending.append(handle)
            return
        self.running[handle] = None
        try:
            self.start(handle)
        except BaseException:
            self.start_failed(handle)
            raise

    def start_failed(self, handle: TaskHandle[Any]) -> None:
        """Undo the accounting of a task whose start raised (e.g. a task factory
        that failed, a loop that is closing): it never ran, spawn() raises."""
        self.running.pop(handle, None)
        self._emptied()
        release(handle._coro)
        handle._coro.close()  # no "coroutine was never awaited" warning

    def task_done(self, handle: TaskHandle[Any]) -> None:
        """Account for a finished task; start the next pending one. Runs on the loop."""
        if handle in self.abandoned:  # already accounted as stuck
            self.abandoned.discard(handle)
            _ABANDONED.discard(handle)
            if handle._state is FAILED:  # still logged and handed to the error_handler
                self._on_failure(handle)
            return
        self.running.pop(handle, None)
        state = handle._state
        if state is COMPLETED:
            self.completed += 1
        elif state is CANCELLED:
            self.cancelled += 1
            if handle._cut:
                self.cut += 1
        else:
            self.failed += 1
        if self.pending:
            self._start_pending()
        elif not self.running:
            self._emptied()
        if state is FAILED:  # last: the bookkeeping above is done whatever the handler does
            self._on_failure(handle)

    def _start_pending(self) -> None:
        """Start pending tasks while the limit allows, in order.

        A loop guarded by a flag, not a call per ended task: under an eager
        task factory a started task may end inside ``start``, and its end
        would start the next one from within, one level deeper per task.
        """
        if self._pumping:
            return  # an outer call's loop picks up the freed slot
        self._pumping = True
        try:
            while self.pending and (self.limit is None or len(self.running) < self.limit):
                nxt = self.pending.popleft()
                self.running[nxt] = None
                try:
                    self.start(nxt)
                except Exception as exc:  # e.g. the loop is closing: nobody to raise to
                    nxt._coro.close()
                    nxt._ended(FAILED, None, exc)
        finally:
            self._pumping = False

    def drop_pending(self, handle: TaskHandle[Any], cut: bool = False) -> None:
        """Cancel a task that never started: it is closed, not run."""
        try:
            self.pending.remove(handle)
        except ValueError:
            return
        handle._cut = cut
        handle._coro.close()  # no "coroutine was never awaited" warning
        handle._ended(CANCELLED, None, None)

    def abandon(self, handle: TaskHandle[Any]) -> None:
        """Stop waiting for a task of ``running`` that ignored its cancellation: it
        counts as stuck, and its waiters get TaskCancelledError."""
        del self.running[handle]
        self.abandoned.add(handle)
        _ABANDONED.add(handle)
        self.stuck += 1
        self._emptied()
        handle._abandoned()

    def cancel_all(self, cut: bool) -> None:
        """Cancel every running and pending task (``cut``: they were cut by a deadline)."""
        while self.pending:
            self.drop_pending(self.pending[-1], cut=cut)
        for handle in list(self.running):
            handle._cut = cut and self.drains
            handle.cancel()
        # Abandoned ones too: on asyncio a task that swallowed one cancellation
        # is not cancelled again unless asked again.
        for handle in list(self.abandoned):
            handle.cancel()

    def report(self) -> GroupReport:
        return GroupReport(
            policy=self.config.on_shutdown,
            completed=self.completed,
            failed=self.failed,
            cancelled=self.cancelled,
            cut=self.cut,
            refused=self.refused,
            stuck=self.stuck,
        )

    def stats(self) -> GroupStats:
        return GroupStats(
            policy=self.config.on_shutdown,
            running=len(self.running),
            pending=len(self.pending),
            limit=self.limit,
        )


class Groups(dict[str, Group]):
    """The groups of one guard run, by name (a dict: spawn looks a group up on every
    call), made on first use and bound to the run; what a spawn into one is told
    once the guard no longer takes all work; what a failure of one's task does."""

    def __init__(
        self,
        config: GuardConfig,
        request_shutdown: Callable[[str], None],
        fault: Callable[[str, BaseException], None],
    ) -> None:
        super().__init__()
        self._config = config
        self._request_shutdown = request_shutdown
        self._fault = fault
        self._backend: Backend | None = None
        self._inflight: InFlight | None = None
        #: sets a new group's drain deadline once the shutdown has started
        self._deadline_of: Callable[[Group], None] | None = None

    def bind(self, backend: Backend, inflight: InFlight) -> None:
        """The run started: every group made so far (refused spawns) and from now on
        starts its tasks on ``backend``; the drain asks them what is in flight."""
        self._backend, self._inflight = backend, inflight
        inflight.watch(self.busy)
        for grp in self.values():
            grp.bind(backend, inflight, self.failed)

    def busy(self) -> bool:
        """Whether a group has a running or pending task (abandoned ones are not)."""
        return any(grp.running or grp.pending for grp in self.values())

    def triggered(self, deadline_of: Callable[[Group], None]) -> None:
        """The shutdown started: drain deadlines count from now, for later groups too."""
        self._deadline_of = deadline_of
        for grp in self.values():
            deadline_of(grp)

    def make(self, name: str) -> Group:
        """The group called ``name``, made (with its configuration) if it is new."""
        grp = self.get(name)
        if grp is not None:
            return grp
        if not isinstance(name, str) or not name:
            raise TypeError(f"a group name is a non-empty str, not {name!r}")
        grp = self[name] = Group(name, self._config.group(name))
        if self._backend is not None and self._inflight is not None:
            grp.bind(self._backend, self._inflight, self.failed)
        if self._deadline_of is not None:
            self._deadline_of(grp)
        return grp

    def refuse(self, grp: Group, state: State) -> None:
        """A spawn into ``grp`` while the guard is not running: return if the group
        still takes it (a drain group during the drain, before its timeout), else
        count the refusal and raise why."""
        if state is State.DRAINING and grp.drains and not grp.closed:
            assert self._backend is not None
            if self._backend.time() < grp.deadline:
                return
            grp.closed = True  # its timeout passed (checked here too: the loop may be busy)
        grp.refused += 1
        if state is State.IDLE:
            raise NotStartedError(
                "spawn() before the guard started: enter it with `async with guard:` "
                "(or use taskguard.run / the ASGI middleware)"
            )
        if state is not State.DRAINING:
            why = "every group"
        elif grp.drains:
            why = "its drain timeout was reached"
        else:
            why = "a cancel group"
        raise ShuttingDownError(
            f"spawn() refused: the guard is {state.value} and group {grp.name!r} takes no new "
            f"work ({why})"
        )

    def failed(self, handle: TaskHandle[Any]) -> None:
        """A background task failed: log it, hand it to the error_handler, and shut
        down if its group says so. Never raises (it runs inside the failed task);
        each step goes on if the one before raised."""
        exc = handle._exc
        try:
            logger.error(
                "background task %r (group %r) failed", handle.name, handle.group, exc_info=exc
            )
        except Exception as error:  # a user's logging handler
            self._fault(f"logging the failure of task {handle.name!r}", error)
        handler = self._config.error_handler
        if handler is not None and exc is not None:
            try:
                result = handler(exc, handle)
                if asyncio.iscoroutine(result):
                    result.close()
                    raise TypeError("error_handler must be a plain function, not async")
            except BaseException as error:  # the handler's bug must not break the bookkeeping
                self._fault(f"the error_handler, handling task {handle.name!r}", error)
        if handle._group.config.on_error == "shutdown":
            try:
                self._request_shutdown(f"task {handle.name!r} (group {handle.group!r}) failed")
            except Exception as error:
                self._fault("the shutdown requested by a failed task", error)


def _not_started(handle: TaskHandle[Any]) -> None:
    raise NotStartedError("the guard has not started")


def _ignore(handle: TaskHandle[Any]) -> None:
    pass
