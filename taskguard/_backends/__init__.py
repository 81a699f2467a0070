"""The one place where asyncio and trio differ.

The guard keeps its tasks *outside* any task group (an anyio task group cannot
exit while a child swallows cancellation, and the guard must be able to give up
on such a child). So it needs a few raw operations from the event loop: start
and cancel one of its tasks (with the bookkeeping at the task's end), start a
system task, call back into the loop from another thread or a signal handler,
read a task's stack, run a whole program with a bounded end. :class:`Backend`
names them; ``_asyncio.py`` and ``_trio.py`` implement them (anyio's
``AsyncBackend`` is the model). Nothing outside this package branches on the
backend: the guard binds what it needs when it starts.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio

if TYPE_CHECKING:
    from .._handle import TaskHandle

__all__ = [
    "Backend",
    "BackendName",
    "WakeupHold",
    "coroutine_stack",
    "current_backend",
    "run",
    "thread_stack",
]

BackendName = Literal["asyncio", "trio"]


class Backend(ABC):
    """The raw operations the guard needs from the event loop it runs on."""

    name: str = ""
    #: whether an ASGI send should run in a task of its own so that a stalled
    #: one can be abandoned (hypercorn's trio worker shields its sends)
    send_in_task: bool = False

    def __init__(self) -> None:
        #: the backend's own cancel-scope class: ``anyio.CancelScope()`` looks the
        #: backend up on every call (sniffio + a factory), about 40% of a bare
        #: scope's cost on asyncio; the class builds the same object directly
        self.cancel_scope: Callable[..., anyio.CancelScope] = type(anyio.CancelScope())

    @abstractmethod
    def start_task(self, handle: TaskHandle[Any]) -> None:
        """Start running ``handle``'s coroutine as an unstructured task with a strong
        reference; when it ends, the task itself reports to ``handle._ended``.

        The handle counts as running before the task exists: under asyncio's eager
        task factory (3.12+) the whole task may run inside this call."""

    @abstractmethod
    def cancel_task(self, handle: TaskHandle[Any]) -> None:
        """Cancel the running task of ``handle`` (also one not yet scheduled)."""

    @abstractmethod
    def start_system_task(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> object:
        """Start ``fn()`` as an unstructured task the guard owns (supervisor, keeper, ...)."""

    @abstractmethod
    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop thread soon; safe from threads and signal handlers.

        Wake-ups after the loop ended are ignored: nobody is left to wake.
        """

    @abstractmethod
    def current_task_function(self) -> Callable[[], object]:
        """The backend's own current-task function (guarded() calls it, no wrapper frames)."""

    def current_task(self) -> object:
        return self.current_task_function()()

    def task_canceller(self) -> Any:
        """An object whose ``cancel()`` cancels the calling task (a section's stand-in
        for a cancel scope: see ``TaskGuard.open_task_section``)."""
        raise RuntimeError(
            f"a {self.name} task cannot be cancelled without a cancel scope; use "
            "guard.open_section(name, scope) with a scope of your own"
        )

    @abstractmethod
    def time(self) -> float:
        """The loop's clock (``anyio.current_time()``), also usable in loop callbacks,
        where anyio cannot tell which event loop runs (there is no current task)."""

    @abstractmethod
    def task_stack(self, task: object) -> str:
        """The await chain of a (suspended) task, outermost call first."""

    def hold_exit_wakeups(self, signals: frozenset[int]) -> WakeupHold | None:
        """Hold back the loop's own wake-up for ``signals`` until ``release()``, if the
        loop learns of signals other than through Python-level handlers (asyncio's
        ``add_signal_handler`` reads the wake-up fd); None when there is nothing to hold."""
        return None

    def wake_on_signals(self) -> WakeupHold | None:
        """Make every signal wake the loop, if the loop does not already see them (the
        guard's handlers are plain ``signal.signal`` ones); ``close()`` undoes it."""
        return None


class WakeupHold(Protocol):
    """What :meth:`Backend.hold_exit_wakeups` and :meth:`Backend.wake_on_signals` return."""

    def release(self) -> None:
        """Pass on what was held, and from now on at once."""

    def close(self) -> None:
        """Release, and give the wake-up fd back."""


def current_backend() -> Backend:
    """The backend of the running event loop (asyncio or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        from ._asyncio import AsyncioBackend

        return AsyncioBackend()
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        from ._trio import TrioBackend

        return TrioBackend()
    raise RuntimeError(
        "taskguard needs a running event loop (asyncio or trio); "
        "start the guard from async code, e.g. `async with TaskGuard() as guard:`"
    )


def run(backend: BackendName, entry: Callable[[], Awaitable[None]], grace: float) -> None:
    """Run ``entry()`` to completion on a new event loop of ``backend``.

    Unlike ``asyncio.run``, the loop's own end is bounded: tasks left over after
    ``entry`` returned get ``grace`` to unwind and are then left behind (see
    ``_asyncio.run``). On trio a system task that ignores cancellation keeps
    ``trio.run`` from returning; only ``taskguard.run``'s hard deadline bounds that.
    """
    if backend == "trio":
        from ._trio import run as run_trio

        run_trio(entry)
    else:
        from ._asyncio import run as run_asyncio

        run_asyncio(entry, grace)


def coroutine_stack(coro: object, limit: int = 64) -> str:
    """Format the await chain of a suspended coroutine, outermost call first.

    A suspended task has no thread stack to read; its state lives in the chain
    of ``cr_await`` links from its coroutine down to what it is waiting on.
    """
    frames: list[FrameType] = []
    while coro is not None and len(frames) < limit:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is not None:
            frames.append(frame)
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    summaries = [
        traceback.FrameSummary(f.f_code.co_filename, f.f_lineno or 0, f.f_code.co_name)
        for f in frames
    ]
    return "".join(traceback.format_list(summaries))


def thread_stack(thread_id: int) -> str:
    """Format the current stack of another thread (a stuck worker-thread section)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame))


def describe_thread(thread: threading.Thread) -> str:
    """A thread's name and what it is doing, for the hard deadline's log."""
    stack = thread_stack(thread.ident or 0).rstrip()
    return f"{thread.name}:\n{stack}" if stack else thread.name
