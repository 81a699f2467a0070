"""The asyncio backend: guard tasks are loop tasks running a private step object."""

from __future__ import annotations

import asyncio
import collections.abc
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .._handle import CANCELLED, COMPLETED, FAILED, RUNNING
from . import Backend, coroutine_stack
from ._wakeup import WakeupRelay

if TYPE_CHECKING:
    from .._handle import TaskHandle

__all__ = ["AsyncioBackend", "run"]

logger = logging.getLogger("taskguard")

#: set on a handle cancelled during its own eager first step (no task object yet)
CANCEL_ON_START = object()


class AsyncioBackend(Backend):
    name = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()

    def start_task(self, handle: TaskHandle[Any]) -> None:
        # A loop task running the coroutine through _Steps, which also does the
        # bookkeeping at its end (no done callback); no per-task cancel scope:
        # task.cancel() is the scope on asyncio.
        handle._state = RUNNING  # first: an eager task may end inside create_task
        handle._started = time.monotonic()
        steps: Any = _Steps(handle)  # a Coroutine by registration, not by type
        task = self.loop.create_task(steps, name=handle._name)
        if handle._state is RUNNING:
            handle._task = task
            if handle._scope is CANCEL_ON_START:  # cancel() ran during an eager first step
                handle._scope = None
                task.cancel()

    def cancel_task(self, handle: TaskHandle[Any]) -> None:
        task = handle._task
        if task is not None:
            task.cancel()
        else:  # inside its eager first step: create_task has not returned yet
            handle._scope = CANCEL_ON_START

    def start_system_task(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> object:
        return self.loop.create_task(fn(), name=name)

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed
            pass

    def current_task_function(self) -> Callable[[], object]:
        return asyncio.current_task

    def task_canceller(self) -> Any:
        return _CancelTask(asyncio.current_task())

    def time(self) -> float:
        return self.loop.time()

    def hold_exit_wakeups(self, signals: frozenset[int]) -> WakeupRelay | None:
        return WakeupRelay.install(signals)

    def wake_on_signals(self) -> WakeupRelay | None:
        return WakeupRelay.install(frozenset(), always=True)

    def task_stack(self, task: object) -> str:
        if isinstance(task, asyncio.Task):
            return coroutine_stack(task.get_coro())
        return ""


class _CancelTask:
    """A section's stand-in cancel scope: cancels its task (``task_canceller``)."""

    __slots__ = ("task",)
    #: it catches nothing: the task's cancellation leaves the section, and its
    #: closer is told so (``section.close(cancelled=True)``)
    cancelled_caught = False

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class _Steps:
    """What an asyncio task of the guard runs: its coroutine, step by step.

    It does two jobs that would otherwise take a wrapper coroutine and a done
    callback per task (measured: ~200 bytes more per pending task, and the
    callback alone is one more event-loop turn per task at its end):

    - the bookkeeping: when the coroutine returns or raises, ``send``/``throw``
      report the outcome to the handle at once, inside the task's last step;
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
            self._handle._ended(COMPLETED, stop.value, None)
            raise StopIteration from None  # the result stays on the handle, not the task
        except BaseException as exc:
            return self._raised(exc)

    def throw(self, exc: Any, value: Any = None, tb: Any = None) -> Any:
        try:
            if value is None and tb is None:
                return self._coro.throw(exc)
            return self._coro.throw(exc, value, tb)  # pragma: no cover - old signature
        except StopIteration as stop:  # it caught the exception and returned
            self._handle._ended(COMPLETED, stop.value, None)
            raise StopIteration from None
        except BaseException as error:
            return self._raised(error)

    def _raised(self, exc: BaseException) -> Any:
        if isinstance(exc, asyncio.CancelledError):
            self._handle._ended(CANCELLED, None, None)
            raise exc
        self._handle._ended(FAILED, None, exc)
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


def run(entry: Callable[[], Awaitable[None]], grace: float) -> None:
    """Run ``entry()`` on a new event loop, with a bounded end.

    Not ``asyncio.run()``: at its end it cancels the leftover tasks and waits
    for them without a bound, so one task that swallows cancellation would
    hang the process after the guard already gave up on it.
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(entry())
    finally:
        try:
            _finish_loop(loop, grace)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _finish_loop(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.wait(leftovers, timeout=max(grace, 0.1)))
        still = [t for t in leftovers if not t.done()]
        if still:
            logger.error("%d task(s) ignored cancellation at exit; leaving them", len(still))
            _LEFT_BEHIND.extend(still)
    for task in leftovers:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("task %r failed at exit", task.get_name(), exc_info=task.exception())
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 1.0))
    except (asyncio.TimeoutError, RuntimeError):
        logger.error("async generators did not close within 1s at exit")
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), max(grace, 0.1)))
    except (asyncio.TimeoutError, RuntimeError):
        logger.error("worker threads still running at exit; the hard deadline bounds them")


# Strong references to tasks left running on a closed loop: never collected
# mid-flight (their finally blocks would run at a random time).
_LEFT_BEHIND: list[asyncio.Task[Any]] = []
