"""The trio backend: guard tasks are system tasks, each in a cancel scope of its own."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import trio

from .._handle import CANCELLED, COMPLETED, FAILED, RUNNING
from . import Backend, coroutine_stack

if TYPE_CHECKING:
    from .._handle import TaskHandle

__all__ = ["TrioBackend", "run"]

#: set on a handle cancelled before its runner started (its scope does not exist yet)
CANCEL_ON_START = object()


class TrioBackend(Backend):
    name = "trio"
    send_in_task = True

    def __init__(self) -> None:
        super().__init__()
        self.token = trio.lowlevel.current_trio_token()

    def start_task(self, handle: TaskHandle[Any]) -> None:
        handle._state = RUNNING
        handle._started = time.monotonic()
        # A system task, not a nursery child: the guard must be able to abandon a
        # task that ignores cancellation. Like asyncio's create_task, it runs in a
        # copy of the spawner's context.
        handle._task = trio.lowlevel.spawn_system_task(
            _runner, handle, name=handle.name, context=contextvars.copy_context()
        )

    def cancel_task(self, handle: TaskHandle[Any]) -> None:
        scope = handle._scope
        if scope is None:  # spawned, not yet run: its runner cancels at once
            handle._scope = CANCEL_ON_START
        elif scope is not CANCEL_ON_START:
            scope.cancel()

    def start_system_task(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> object:
        return trio.lowlevel.spawn_system_task(fn, name=name, context=contextvars.copy_context())

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        # TrioToken.run_sync_soon is also safe from a signal handler (its queue
        # takes a re-entrant lock for exactly that case).
        try:
            self.token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    def current_task_function(self) -> Callable[[], object]:
        return trio.lowlevel.current_task

    def time(self) -> float:
        return float(trio.current_time())

    def task_stack(self, task: object) -> str:
        return coroutine_stack(getattr(task, "coro", None))


async def _runner(handle: TaskHandle[Any]) -> None:
    result: Any = None
    finished = False
    try:
        with trio.CancelScope() as scope:
            if handle._scope is CANCEL_ON_START:
                scope.cancel()
            handle._scope = scope
            result = await handle._coro
            finished = True
    except trio.Cancelled:
        # Cancelled from outside its own scope: trio.run is ending.
        handle._ended(CANCELLED, None, None)
        raise
    except BaseException as exc:  # a system task must never raise: record it instead
        handle._ended(FAILED, None, exc)
        return
    handle._ended(COMPLETED if finished else CANCELLED, result, None)


def run(entry: Callable[[], Awaitable[None]]) -> None:
    trio.run(entry)
