"""What differs between asyncio and trio, in one place.

The guard keeps its tasks *outside* any task group (an anyio task group cannot
exit while a child swallows cancellation, and the guard must be able to give up
on such a child). So it needs a few raw operations per backend: start an
unstructured task with a strong reference, cancel it, read its stack, and call
back into the loop from another thread or a signal handler.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

import anyio

__all__ = ["Backend", "coroutine_stack", "current_backend", "thread_stack"]


class Backend:
    """The raw operations the guard needs from the event loop it runs on."""

    name: str = ""
    #: whether an ASGI send should run in a task of its own so that a stalled
    #: one can be abandoned (hypercorn's trio worker shields its sends)
    send_in_task: bool = False
    #: the backend's own cancel-scope class (``anyio.CancelScope()`` looks the
    #: backend up on every call; the class builds the same object directly)
    cancel_scope: Callable[..., Any] = anyio.CancelScope

    def start_system_task(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> object:
        """Start ``fn()`` as an unstructured task the guard owns (supervisor, keeper, ...)."""
        raise NotImplementedError

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop thread soon; safe from threads and signal handlers.

        Wake-ups after the loop ended are ignored: nobody is left to wake.
        """
        raise NotImplementedError

    def current_task(self) -> object:
        raise NotImplementedError

    def current_task_function(self) -> Callable[[], object]:
        """The backend's own current-task function (guarded() calls it, no wrapper frames)."""
        raise NotImplementedError

    def time(self) -> float:
        """The loop's clock (``anyio.current_time()``), also usable in loop callbacks,
        where anyio cannot tell which event loop runs (there is no current task)."""
        raise NotImplementedError

    def task_stack(self, task: object) -> str:
        raise NotImplementedError


class AsyncioBackend(Backend):
    name = "asyncio"

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.cancel_scope = type(anyio.CancelScope())

    def start_system_task(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> object:
        return self.loop.create_task(fn(), name=name)

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed
            pass

    def current_task(self) -> object:
        return asyncio.current_task()

    def current_task_function(self) -> Callable[[], object]:
        return asyncio.current_task

    def time(self) -> float:
        return self.loop.time()

    def task_stack(self, task: object) -> str:
        if isinstance(task, asyncio.Task):
            return coroutine_stack(task.get_coro())
        return ""


class TrioBackend(Backend):
    name = "trio"
    send_in_task = True

    def __init__(self) -> None:
        import trio

        self._trio = trio
        self.token = trio.lowlevel.current_trio_token()
        self.cancel_scope = type(anyio.CancelScope())

    def start_system_task(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> object:
        return self._trio.lowlevel.spawn_system_task(
            fn, name=name, context=contextvars.copy_context()
        )

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        try:
            self.token.run_sync_soon(fn)
        except self._trio.RunFinishedError:
            pass

    def current_task(self) -> object:
        return self._trio.lowlevel.current_task()

    def current_task_function(self) -> Callable[[], object]:
        return self._trio.lowlevel.current_task

    def time(self) -> float:
        return float(self._trio.current_time())

    def task_stack(self, task: object) -> str:
        return coroutine_stack(getattr(task, "coro", None))


def current_backend() -> Backend:
    """The backend of the running event loop (asyncio or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return AsyncioBackend()
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        return TrioBackend()
    raise RuntimeError(
        "taskguard needs a running event loop (asyncio or trio); "
        "start the guard from async code, e.g. `async with TaskGuard() as guard:`"
    )


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
    return _format_frames(frames)


def thread_stack(thread_id: int) -> str:
    """Format the current stack of another thread (for stuck worker-thread sections)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame))


def _format_frames(frames: list[FrameType]) -> str:
    summaries = [
        traceback.FrameSummary(f.f_code.co_filename, f.f_lineno or 0, f.f_code.co_name)
        for f in frames
    ]
    return "".join(traceback.format_list(summaries))


def main_thread_id() -> int:
    return threading.main_thread().ident or 0
