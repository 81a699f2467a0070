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

from ._config import check_name
from ._exceptions import ShuttingDownError

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from ._sections import Sections

__all__ = ["Guarded", "is_cancellation"]

F = TypeVar("F", bound=Callable[..., Any])

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
        "_scope",
        "_sections",
        "_shared",
        "_shield",
        "_started",
        "_task",
        "_thread",
    )

    def __init__(self, guard: TaskGuard | None, name: str | None, shield: bool) -> None:
        if name is not None and type(name) is not str:  # the common case costs one check
            name = check_name(name, "guarded()'s section name")
        if shield is not True and shield is not False:
            raise TypeError(f"guarded(shield=...) must be True or False, not {shield!r}")
        self._guard = guard
        self._sections: Sections | None = None  # the sections it was entered in
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
        sections = guard._sections
        if sections is None:
            guard._refuse_section(self.name)  # not started
        assert sections is not None
        if threading.get_ident() != sections.thread_id:
            guard._wrong_thread(self.name)  # e.g. another thread's event loop
        # The scope first: an entry that raises must leave nothing counted behind.
        scope = sections.new_scope(shield=self._shield)
        scope.__enter__()
        try:
            self._attach(sections, scope)
        except BaseException:
            scope.__exit__(None, None, None)
            raise
        return self

    def _attach(self, sections: Sections, scope: anyio.CancelScope) -> None:
        """Open this section with ``scope`` as its cancel scope; the caller enters
        and exits the scope and closes the section with :meth:`close`.

        ``__aenter__`` uses it with a scope of its own. The ASGI middleware passes
        the scope it runs the app in (``guard.open_section``), so that one scope
        per request serves both (a cancel scope is the largest cost of a
        request's bookkeeping).
        """
        sections.enter(self)
        self._sections = sections
        self._open = True
        self._cut = False
        self._started = time.monotonic()
        self._task = sections.current_task()
        self._scope = scope

    @property
    def cut(self) -> bool:
        """Whether the open (or last) section was cut by a deadline or a forced shutdown."""
        return self._cut

    def close(self, cancelled: bool) -> None:
        """Close a section opened with ``guard.open_section()`` (after its scope exited);
        ``cancelled``: a cancellation left the scope (a caller's, or the guard's cut
        of a task section). A cut the scope itself caught counts as well."""
        scope, self._scope = self._scope, None
        self._open = False
        assert self._sections is not None
        reached = cancelled or (scope is not None and scope.cancelled_caught)
        self._sections.exit(self, cancelled, self._cut and reached)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        sections = self._sections
        assert sections is not None, "guarded section exited, never entered"
        if self._shared:
            child = self._pop(sections.current_task())
            if child is not None:
                return await child.__aexit__(exc_type, exc, tb)
        scope = self._scope
        assert scope is not None, "guarded section exited, never entered"
        self._scope = None
        self._open = False
        cancelled = exc is not None and is_cancellation(exc)
        swallowed = False
        try:
            swallowed = scope.__exit__(exc_type, exc, tb)
        finally:
            # Cut only if the cut reached the block: one that completed in the
            # same loop step as the deadline did complete (and raises nothing).
            sections.exit(self, cancelled, self._cut and (bool(swallowed) or cancelled))
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
            guard = self._guard or self._resolve()
            sections = guard._sections
            if sections is None:
                guard._refuse_section(self.name)
            assert sections is not None
            self._thread = threading.get_ident()
            self._started = time.monotonic()
            sections.enter_thread(self)
            self._sections = sections
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
        sections = self._sections
        assert sections is not None, "guarded section exited, never entered"
        if self._shared:
            with _THREAD_LOCK:
                child = self._pop(threading.get_ident())
            if child is not None:
                child.__exit__(exc_type, exc, tb)
                return
        sections.exit_thread(self)
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


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the running backend's cancellation exception."""
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # no event loop (a sync section): nothing to compare with
        return False
