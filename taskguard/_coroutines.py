"""What ``spawn`` accepts: building (or taking over) the coroutine a task runs.

A refused spawn never leaves a coroutine behind that Python would warn about
("coroutine ... was never awaited"): what spawn took over and refuses, it
closes. A coroutine object that already ran (awaited, or spawned before) is
refused: it would fail in the background, far from the mistake.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Coroutine
from types import CoroutineType
from typing import Any

__all__ = ["close_refused", "coroutine_of", "release", "take"]

#: coroutine objects handed to spawn() whose task has not ended (the handle holds
#: them until then anyway): the same object spawned twice before its first run
#: would otherwise run in two tasks
_TAKEN: set[Any] = set()


if sys.version_info >= (3, 11):

    def _ran(coro: Any) -> bool:
        """Whether the coroutine ran already (it is suspended, running or closed)."""
        return bool(coro.cr_suspended or coro.cr_running or coro.cr_frame is None)

    def take(coro: Any) -> Coroutine[Any, Any, Any]:
        """Take over a coroutine object given to ``spawn`` (released when its task ends)."""
        # (the checks inline: this is on the path of every spawn(coro))
        if coro in _TAKEN or coro.cr_suspended or coro.cr_running or coro.cr_frame is None:
            _refuse_reused(coro)
        _TAKEN.add(coro)
        return coro  # type: ignore[no-any-return]

else:  # pragma: no cover - no cr_suspended before 3.11

    def _ran(coro: Any) -> bool:
        return inspect.getcoroutinestate(coro) != inspect.CORO_CREATED

    def take(coro: Any) -> Coroutine[Any, Any, Any]:
        if coro in _TAKEN or _ran(coro):
            _refuse_reused(coro)
        _TAKEN.add(coro)
        return coro  # type: ignore[no-any-return]


def _refuse_reused(coro: Any) -> None:
    # not closed here: it is someone else's (a task runs it, or it is done)
    raise TypeError(
        f"spawn() got a coroutine object that was already awaited or spawned "
        f"({getattr(coro, '__qualname__', coro)!r}); a coroutine runs once: pass the "
        "async function and its arguments, spawn(fn, *args), to start it again"
    )


def release(coro: object) -> None:
    """The task of a taken-over coroutine ended (or never started)."""
    if _TAKEN:
        _TAKEN.discard(coro)


def coroutine_of(fn: Any, args: tuple[Any, ...]) -> Coroutine[Any, Any, Any]:
    """The coroutine for ``spawn(fn, *args)`` beyond the common forms spawn inlines."""
    # A coroutine object is not callable: test callable() first, so the common
    # spawn(async_fn, ...) skips asyncio.iscoroutine's ABC isinstance check on fn.
    from ._handle import TaskHandle

    if isinstance(fn, TaskHandle):
        raise TypeError(
            "spawn() got a TaskHandle (a task already spawned); to wait for it, "
            "spawn an async function that awaits handle.wait()"
        )
    if not callable(fn):
        if asyncio.iscoroutine(fn):
            if args:
                close_refused(fn)
                raise TypeError(
                    "spawn() got a coroutine object and arguments; pass one or the other"
                )
            return take(fn)
        raise TypeError(f"spawn() takes an async function or a coroutine object, not {fn!r}")
    if isinstance(fn, type):
        # Calling a class runs its constructor in the caller, whose own error
        # (int(inf): OverflowError) would hide the mistake: no class makes coroutines.
        raise TypeError(
            f"spawn() takes an async function or a coroutine object, not the class "
            f"{fn.__qualname__!r}"
        )
    return checked(fn, fn(*args))


def checked(fn: Any, coro: Any) -> Coroutine[Any, Any, Any]:
    """``coro`` (what ``fn(*args)`` returned) if it is a coroutine, else a TypeError."""
    if type(coro) is CoroutineType or asyncio.iscoroutine(coro):
        return coro
    raise TypeError(
        f"spawn() takes an async function, but {getattr(fn, '__qualname__', fn)!r} returned "
        f"{type(coro).__name__} (it ran synchronously in the caller). For blocking work, "
        "spawn an async function that calls anyio.to_thread.run_sync()"
    )


def close_refused(fn: object) -> None:
    """Close a fresh coroutine object that spawn refuses (no "never awaited" warning)."""
    if type(fn) is CoroutineType and fn not in _TAKEN and not _ran(fn):
        fn.close()
