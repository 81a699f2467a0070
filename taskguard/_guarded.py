"""guarded(): critical sections that shutdown waits for (the "goroutine lock")."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

from ._exceptions import ShuttingDownError

if TYPE_CHECKING:
    from ._guard import TaskGuard

__all__ = ["Guarded"]

F = TypeVar("F", bound=Callable[..., Any])


class Guarded:
    """What ``guard.guarded()`` returns: an async context manager, a sync one for
    worker threads, and a decorator for sync and async functions.

    Each ``async with`` / ``with`` opens one section; shutdown waits for every
    open section (within the exit wait). A section cut at the deadline raises
    :class:`ShuttingDownError` as it exits.
    """

    # A class-based context manager with slots: guarded() is on every request's
    # path, and @asynccontextmanager would add a generator and its frame per use.
    __slots__ = ("_cut", "_guard", "_name", "_scope", "_shield", "_started", "_task", "_thread")

    def __init__(self, guard: TaskGuard | None, name: str | None, shield: bool) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"guarded() takes a section name (str) or None, not {name!r}")
        self._guard = guard
        self._name = name
        self._shield = shield
        self._scope: anyio.CancelScope | None = None
        self._cut = False
        self._task: object = None
        self._thread = 0
        self._started = 0.0

    @property
    def name(self) -> str:
        return self._name or "guarded"

    def _resolve(self) -> TaskGuard:
        if self._guard is not None:
            return self._guard
        from ._current import current

        return current()

    # -- async form --------------------------------------------------------------

    async def __aenter__(self) -> Guarded:
        guard = self._resolve()
        guard._open_section(self)
        self._cut = False
        self._started = time.monotonic()
        self._task = guard._backend_current_task()
        scope = self._scope = anyio.CancelScope(shield=self._shield)
        scope.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        assert scope is not None, "guarded section exited without being entered"
        guard = self._guard or self._resolve()
        try:
            swallowed = scope.__exit__(exc_type, exc, tb)
        finally:
            guard._close_section(self)
        if self._cut and (swallowed or (exc is not None and _is_cancellation(exc))):
            raise ShuttingDownError(
                f"guarded section {self.name!r} was cut at the shutdown deadline"
            ) from (None if swallowed else exc)
        return bool(swallowed)

    # -- sync form (worker threads) ----------------------------------------------

    def __enter__(self) -> Guarded:
        guard = self._resolve()
        self._thread = threading.get_ident()
        self._started = time.monotonic()
        guard._open_thread_section(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        (self._guard or self._resolve())._close_thread_section(self)

    # -- decorator ---------------------------------------------------------------

    def __call__(self, fn: F) -> F:
        """Use as ``@guard.guarded()``: each call of ``fn`` is one guarded section."""
        if not callable(fn):
            raise TypeError(f"@guarded() decorates a function, not {fn!r}")
        guard, shield = self._guard, self._shield
        name = self._name or getattr(fn, "__qualname__", None) or repr(fn)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with Guarded(guard, name, shield):
                    return await fn(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            with Guarded(guard, name, shield):
                return fn(*args, **kwargs)

        return cast(F, sync_wrapper)


def _is_cancellation(exc: BaseException) -> bool:
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # no event loop (a sync section): nothing to compare with
        return False
