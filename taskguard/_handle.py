"""TaskHandle: one spawned background task, and how it is started on each backend."""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._exceptions import TaskCancelledError

if TYPE_CHECKING:
    from ._groups import Group

__all__ = ["TaskHandle", "start_asyncio", "start_trio"]

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
        self._task: Any = None
        self._scope: Any = None  # trio only: the task's own cancel scope
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
        scope = self._scope
        if scope is _CANCEL_ON_START:
            return True
        if scope is not None:
            scope.cancel()
        elif isinstance(self._task, asyncio.Task):
            self._task.cancel()
        else:
            # trio, spawned but not yet run: its runner cancels at once when it starts
            self._scope = _CANCEL_ON_START
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
        raise TaskCancelledError(f"task {self.name!r} (group {self.group!r}) was cancelled")

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

    # -- called by the runners -------------------------------------------------

    def _finish(self, state: str, result: object, exc: BaseException | None) -> None:
        self._state = state
        self._result = result
        self._exc = exc
        self._task = None  # drop the task: its frame may hold large locals
        self._scope = None
        self._group.task_done(self)
        if self._event is not None:
            self._event.set()

    def _asyncio_ended(self, exc: BaseException) -> None:
        """An asyncio task of the guard ended by an exception (see ``_Steps``)."""
        if isinstance(exc, asyncio.CancelledError):
            self._finish(CANCELLED, None, None)
        else:
            self._finish(FAILED, None, exc)


_CANCEL_ON_START = object()


class _Steps:
    """What an asyncio task of the guard runs: its coroutine, step by step.

    It does two jobs that would otherwise take a wrapper coroutine and a done
    callback per task (measured: ~200 bytes more per pending task, and the
    callback alone is one more event-loop turn per task at its end):

    - the bookkeeping: when the coroutine returns or raises, ``send``/``throw``
      record the outcome on the handle and account for it in its group, at
      once, inside the task's last step;
    - containment: asyncio re-raises KeyboardInterrupt and SystemExit out of
      the event loop when a task raises them, so one background task would end
      the app and lose the other tasks' accounting. Here a failure (any
      exception but a cancellation) is recorded on the handle, which is where
      it is reported and re-raised by ``wait()``, and the loop task itself
      ends normally (as on trio, where such an error is that task's failure;
      it also means asyncio never logs "exception was never retrieved").
      A cancellation is re-raised, so the loop task ends cancelled.

    Registered as a ``collections.abc.Coroutine`` (``asyncio.Task`` drives any
    such object through ``send``/``throw``). It is private on purpose: the
    handle must not look like a coroutine (``asyncio.gather(handle)`` would run
    the coroutine twice). ``cr_*`` and ``__name__`` are the coroutine's, so
    stacks, task reprs and ``inspect.getcoroutinestate`` see through it.
    """

    __slots__ = ("_coro", "_handle")

    def __init__(self, handle: TaskHandle[Any]) -> None:
        self._handle = handle
        self._coro = handle._coro

    def send(self, value: object) -> Any:
        try:
            return self._coro.send(value)
        except StopIteration as stop:
            # The common end, _finish and Group.task_done inlined (once per task).
            handle = self._handle
            handle._state = COMPLETED
            handle._result = stop.value
            handle._task = None  # drop the task: its frame may hold large locals
            grp = handle._group
            if grp.pending or grp.abandoned:
                grp.task_done(handle)
            else:
                grp.running.pop(handle, None)
                grp.completed += 1
                guard = grp._guard
                guard._live -= 1
                if not guard._live and guard._wake is not None:
                    guard._wake.set()
            if handle._event is not None:
                handle._event.set()
            raise StopIteration from None  # the result stays on the handle, not the task
        except BaseException as exc:
            self._handle._asyncio_ended(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise StopIteration from None

    def throw(self, exc: Any, value: Any = None, tb: Any = None) -> Any:
        try:
            if value is None and tb is None:
                return self._coro.throw(exc)
            return self._coro.throw(exc, value, tb)  # pragma: no cover - old signature
        except StopIteration as stop:  # it caught the exception and returned
            self._handle._finish(COMPLETED, stop.value, None)
            raise StopIteration from None
        except BaseException as error:
            self._handle._asyncio_ended(error)
            if isinstance(error, asyncio.CancelledError):
                raise
            raise StopIteration from None

    def close(self) -> None:
        self._coro.close()

    @property
    def __name__(self) -> str:
        return str(getattr(self._coro, "__qualname__", None) or type(self._coro).__name__)

    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_suspended(self) -> bool:
        return bool(getattr(self._coro, "cr_suspended", False))

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)


collections.abc.Coroutine.register(_Steps)


def start_asyncio(loop: asyncio.AbstractEventLoop, handle: TaskHandle[Any]) -> None:
    # A loop task running the coroutine through _Steps, which also does the
    # bookkeeping at its end (no done callback); no per-task cancel scope:
    # task.cancel() is the scope on asyncio.
    # The handle counts as running first: under an eager task factory
    # (Python 3.12+) create_task runs the first step, maybe the whole task,
    # before it returns.
    handle._state = RUNNING
    handle._started = time.monotonic()
    task: asyncio.Task[Any] = loop.create_task(_Steps(handle), name=handle._name)  # type: ignore[arg-type]
    if handle._state is RUNNING:
        handle._task = task
        if handle._scope is _CANCEL_ON_START:  # cancel() ran during an eager first step
            handle._scope = None
            task.cancel()


def start_trio(handle: TaskHandle[Any]) -> None:
    trio = sys.modules["trio"]  # we run under trio: a dict lookup, not an import per spawn
    handle._state = RUNNING
    handle._started = time.monotonic()
    # A system task, not a nursery child: the guard must be able to abandon a
    # task that ignores cancellation. Like asyncio's create_task, it runs in a
    # copy of the spawner's context.
    handle._task = trio.lowlevel.spawn_system_task(
        _trio_runner, handle, name=handle.name, context=contextvars.copy_context()
    )


async def _trio_runner(handle: TaskHandle[Any]) -> None:
    trio = sys.modules["trio"]
    result: Any = None
    finished = False
    try:
        with trio.CancelScope() as scope:
            if handle._scope is _CANCEL_ON_START:
                scope.cancel()
            handle._scope = scope
            result = await handle._coro
            finished = True
    except trio.Cancelled:
        # Cancelled from outside its own scope: trio.run is ending.
        handle._finish(CANCELLED, None, None)
        raise
    except BaseException as exc:  # a system task must never raise: record it instead
        handle._finish(FAILED, None, exc)
        return
    handle._finish(COMPLETED if finished else CANCELLED, result, None)
