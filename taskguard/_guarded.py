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

from ._backend import Backend, thread_stack
from ._exceptions import NotStartedError, ShuttingDownError
from ._report import State

if TYPE_CHECKING:
    from collections import Counter

    from ._guard import TaskGuard

__all__ = ["Guarded", "SectionRegistry"]

F = TypeVar("F", bound=Callable[..., Any])

_RUNNING = State.RUNNING
_DRAINING = State.DRAINING

_THREAD_LOCK = threading.Lock()


class Guarded:
    """What ``guard.guarded()`` returns: an async context manager, a sync one for
    worker threads, and a decorator for sync and async functions.

    Each ``async with`` / ``with`` opens one section; shutdown waits for every
    open section (within the exit wait). A section cut at the deadline raises
    :class:`ShuttingDownError` as it exits.
    """

    # A class-based context manager with slots: guarded() is on every request's
    # path, and @asynccontextmanager would add a generator and its frame per use.
    __slots__ = (
        "_cut",
        "_guard",
        "_name",
        "_open",
        "_owner",
        "_scope",
        "_shared",
        "_shield",
        "_started",
        "_task",
        "_thread",
    )

    def __init__(self, guard: TaskGuard | None, name: str | None, shield: bool) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"guarded() takes a section name (str) or None, not {name!r}")
        self._guard = guard
        self._owner = guard  # the guard the open section belongs to (found at entry)
        self._name = name
        self._shield = shield
        self._scope: anyio.CancelScope | None = None
        self._cut = False
        self._task: object = None
        self._thread = 0
        self._started = 0.0
        self._open = False
        # One object may be entered again while open: by another task or thread
        # (a module-level `section = guard.guarded("db")`), or nested. Each such
        # entry is a section of its own, kept here by task or thread.
        self._shared: dict[object, list[Guarded]] | None = None

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
        if self._open:
            child = Guarded(self._guard, self._name, self._shield)
            await child.__aenter__()
            self._push(child._task, child)
            return self
        guard = self._guard or self._resolve()
        scope = guard._scope_class(shield=self._shield)
        self._attach(guard, scope)
        scope.__enter__()
        return self

    def _attach(self, guard: TaskGuard, scope: anyio.CancelScope) -> None:
        """Open this section with ``scope`` as its cancel scope; the caller enters
        and exits the scope and closes the section with :meth:`_detach`.

        ``__aenter__`` uses it with a scope of its own. The ASGI middleware passes
        the scope it runs the app in, so that one scope per request serves both
        (a cancel scope is the largest cost of a request's bookkeeping).
        """
        # The registry's side of opening a section, here (not a registry method):
        # one call less on every request's path
        state = guard._state
        if state is not _RUNNING and state is not _DRAINING:
            guard._refuse_section(self.name)
        guard._sections[self] = None
        guard._live += 1
        self._owner = guard
        self._open = True
        self._cut = False
        self._started = time.monotonic()
        self._task = guard._current_task()
        self._scope = scope

    @property
    def cut(self) -> bool:
        """Whether the open (or last) section was cut by a deadline or a forced shutdown."""
        return self._cut

    def close(self, cancelled: bool) -> None:
        """Close a section opened with ``guard.open_section()`` (after its scope exited)."""
        self._detach(cancelled)

    def _detach(self, cancelled: bool) -> None:
        """Close a section opened with :meth:`_attach` (after its scope exited)."""
        self._scope = None
        self._open = False
        assert self._owner is not None
        self._owner._close_section(self, cancelled)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        guard = self._owner
        assert guard is not None, "guarded section exited, never entered"
        if self._shared:
            child = self._pop(guard._backend_current_task())
            if child is not None:
                return await child.__aexit__(exc_type, exc, tb)
        scope = self._scope
        assert scope is not None, "guarded section exited, never entered"
        self._scope = None
        self._open = False
        cancelled = exc is not None and _is_cancellation(exc)
        try:
            swallowed = scope.__exit__(exc_type, exc, tb)
        finally:
            guard._close_section(self, cancelled)
        if self._cut and (swallowed or cancelled):
            raise ShuttingDownError(
                f"guarded section {self.name!r} was cut at the shutdown deadline"
            ) from (None if swallowed else exc)
        return bool(swallowed)

    def _push(self, key: object, child: Guarded) -> None:
        if self._shared is None:
            self._shared = {}
        self._shared.setdefault(key, []).append(child)

    def _pop(self, key: object) -> Guarded | None:
        assert self._shared is not None
        stack = self._shared.get(key)
        if not stack:
            return None
        child = stack.pop()
        if not stack:
            del self._shared[key]
        return child

    # -- sync form (worker threads) ----------------------------------------------

    def __enter__(self) -> Guarded:
        with _THREAD_LOCK:  # threads may share one object: claim the fast path atomically
            reuse, self._open = self._open, True
        if reuse:
            child = Guarded(self._guard, self._name, self._shield)
            child.__enter__()
            with _THREAD_LOCK:
                self._push(child._thread, child)
            return self
        try:
            guard = self._owner = self._guard or self._resolve()
            self._thread = threading.get_ident()
            self._started = time.monotonic()
            guard._open_thread_section(self)
        except BaseException:
            self._open = False
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._owner
        assert guard is not None, "guarded section exited, never entered"
        if self._shared:
            with _THREAD_LOCK:
                child = self._pop(threading.get_ident())
            if child is not None:
                child.__exit__(exc_type, exc, tb)
                return
        guard._close_thread_section(self)
        self._open = False

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


class SectionRegistry:
    """Mixin of :class:`TaskGuard`: the bookkeeping of open guarded sections.

    Async sections count in ``_live`` like tasks (the drain waits for both);
    worker-thread sections are kept under a lock and wake the loop through the
    backend when the last one closes.
    """

    if TYPE_CHECKING:
        _state: State
        _live: int
        _sections: dict[Guarded, None]
        _thread_sections: dict[Guarded, None]
        _thread_lock: threading.Lock
        _section_counts: Counter[str]
        _wake: anyio.Event | None
        _backend: Backend | None
        _thread_id: int

    def _refuse_section(self, name: str) -> None:
        if self._state is State.IDLE:
            raise NotStartedError(
                f"guarded({name!r}) before the guard started: enter it with `async with guard:`"
            )
        raise ShuttingDownError(f"guarded({name!r}) refused: the guard is {self._state.value}")

    def _close_section(self, section: Guarded, cancelled: bool = False) -> None:
        if self._sections.pop(section, 0) is not None:
            return  # already accounted (abandoned as stuck)
        if section._cut:
            self._section_counts["cut"] += 1
        else:
            self._section_counts["cancelled" if cancelled else "completed"] += 1
        self._live -= 1
        if not self._live and self._wake is not None:
            self._wake.set()

    def _backend_current_task(self) -> object:
        backend = self._backend
        return backend.current_task() if backend is not None else None

    def _open_thread_section(self, section: Guarded) -> None:
        with self._thread_lock:
            state = self._state
            if state is State.RUNNING or state is State.DRAINING:
                self._thread_sections[section] = None
                return
        self._refuse_section(section.name)

    def _close_thread_section(self, section: Guarded) -> None:
        with self._thread_lock:
            if self._thread_sections.pop(section, 0) is not None:
                return  # abandoned as stuck: already accounted
            self._section_counts["completed"] += 1
            empty = not self._thread_sections
        if empty and self._backend is not None and self._wake is not None:
            if threading.get_ident() == self._thread_id:
                self._poke()
            else:
                self._backend.call_soon_threadsafe(self._poke)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _idle(self) -> bool:
        return not self._live and not self._thread_sections

    def thread_stack(self, section: Guarded) -> str:
        return thread_stack(section._thread)
