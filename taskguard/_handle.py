"""TaskHandle: one spawned background task, and the record of how it ended."""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._coroutines import _TAKEN
from ._exceptions import TaskCancelledError

if TYPE_CHECKING:
    from ._groups import Group

__all__ = ["CANCELLED", "COMPLETED", "FAILED", "PENDING", "RUNNING", "TaskHandle"]

logger = logging.getLogger("taskguard")

T = TypeVar("T")

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"


class TaskHandle(Generic[T]):
    """A background task spawned with ``guard.spawn()``.

    ``state`` is one of ``"pending"`` (waiting for a slot in its group),
    ``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``.
    """

    # __slots__ and no per-handle Event until someone waits: spawn is on every
    # request's path and a pending task should cost little more than a raw one.
    __slots__ = (
        "__weakref__",
        "_coro",
        "_cut",
        "_event",
        "_exc",
        "_group",
        "_name",
        "_result",
        "_scope",
        "_started",
        "_state",
        "_task",
    )

    def __init__(self, group: Group, coro: Coroutine[Any, Any, T], name: str | None) -> None:
        self._group = group
        self._coro = coro
        self._name = name
        self._state = PENDING
        self._task: Any = None  # the backend's task while it runs
        self._scope: Any = None  # the backend's per-task cancel state (trio: its scope)
        self._result: Any = None
        self._exc: BaseException | None = None
        self._event: anyio.Event | None = None
        self._started = 0.0
        self._cut = False  # cancelled by a deadline or a forced shutdown

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name!r} group={self.group!r} state={self._state}>"

    @property
    def name(self) -> str:
        """The name given to ``spawn``, else the function's qualified name (sans ``<locals>``)."""
        if self._name is None:
            qualname = getattr(self._coro, "__qualname__", None) or repr(self._coro)
            self._name = qualname.rsplit("<locals>.", 1)[-1]
        return self._name

    @property
    def group(self) -> str:
        return self._group.name

    @property
    def state(self) -> str:
        return self._state

    def done(self) -> bool:
        """True once the task completed, failed or was cancelled."""
        return self._state in (COMPLETED, FAILED, CANCELLED)

    @property
    def age(self) -> float:
        """Seconds since the task started running (0 while pending)."""
        return time.monotonic() - self._started if self._started else 0.0

    def cancel(self) -> bool:
        """Cancel the task (a pending one never starts). False if it had already ended."""
        state = self._state
        if state == PENDING:
            self._group.drop_pending(self)
            return True
        if state != RUNNING:
            return False
        backend = self._group.backend
        assert backend is not None, "a running task belongs to a started guard"
        backend.cancel_task(self)
        return True

    async def wait(self) -> T:
        """Wait for the task to end: its result, its exception, or TaskCancelledError.

        TaskCancelledError also when shutdown abandoned the task (it ignored its
        cancellation past the cancel grace). Being cancelled while waiting does
        not cancel the task.
        """
        if not self.done() and self._exc is None:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        if self._state == COMPLETED:
            return self._result  # type: ignore[no-any-return]
        if self._exc is not None:  # failed, or abandoned by shutdown (still running)
            raise self._exc
        unwind = self._result if isinstance(self._result, BaseException) else None
        raise TaskCancelledError(
            f"task {self.name!r} (group {self.group!r}) was cancelled"
        ) from unwind

    # -- called by the backend's task and by shutdown ----------------------------

    def _ended(self, state: str, result: object, exc: BaseException | None) -> None:
        """The task ended (called inside its last step, on the loop)."""
        if exc is not None and self._cut:
            # Cut work counts as cut even when its cleanup raised (a failing
            # rollback in a finally): the deadline ended it, not its own error.
            logger.warning(
                "task %r (group %r) was cut and raised while unwinding",
                self.name,
                self.group,
                exc_info=exc,
            )
            state, result, exc = CANCELLED, exc, None
        self._state = state
        self._result = result
        self._exc = exc
        self._task = None  # drop the task: its frame may hold large locals
        self._scope = None
        if _TAKEN:  # a coroutine object handed to spawn(): it may be spawned again now
            _TAKEN.discard(self._coro)
        self._group.task_done(self)
        if self._event is not None:
            self._event.set()

    def _abandoned(self) -> None:
        """Shutdown gave up on the task (it ignored its cancellation past the
        cancel grace): waiters get TaskCancelledError now instead of waiting
        for a task nobody will end."""
        self._exc = TaskCancelledError(
            f"task {self.name!r} (group {self.group!r}) ignored its cancellation and was "
            "abandoned at shutdown (see the report's stuck tasks)"
        )
        if self._event is not None:
            self._event.set()
