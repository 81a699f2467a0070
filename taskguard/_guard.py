"""TaskGuard: the registry of background work; its work API (the run itself: ``_lifecycle.py``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import CoroutineType, FunctionType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _coroutines
from ._config import check_name, check_seconds, describe
from ._exceptions import GroupFullError
from ._guarded import Guarded
from ._handle import TaskHandle
from ._hooks import STAGES, Hook, Stage, hook_name
from ._lifecycle import Lifecycle
from ._report import State
from ._streams import GuardedStream

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    from ._durable import DurableFunction, JournalOn

    PosArgs = TypeVarTuple("PosArgs")

__all__ = ["TaskGuard"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_RUNNING = State.RUNNING
_DRAINING = State.DRAINING


class TaskGuard(Lifecycle):
    """The registry of an application's background work.

    Open it with ``async with guard:`` (or let ``taskguard.run`` or the ASGI
    middleware do it). While it runs, ``spawn`` tracks tasks in named groups,
    ``guarded()`` marks sections that shutdown waits for, ``on_shutdown``
    registers ordered hooks. Shutdown (an exit signal, ``shutdown()``, or the
    end of the ``async with`` body) drains or cancels the work within
    ``exit_wait_timeout`` and leaves a :class:`ShutdownReport` in ``report``.
    A closed guard can run again (``async with guard:`` once more): each run
    starts with fresh groups and counts; hooks registered before the first
    start stay.
    """

    # -- spawning ------------------------------------------------------------------

    @overload
    def spawn(
        self, fn: Coroutine[Any, Any, T], /, *, group: str = ..., name: str | None = ...
    ) -> TaskHandle[T]: ...

    @overload
    def spawn(
        self,
        fn: Callable[[Unpack[PosArgs]], Coroutine[Any, Any, T]],
        /,
        *args: Unpack[PosArgs],
        group: str = ...,
        name: str | None = ...,
    ) -> TaskHandle[T]: ...

    # (mypy cannot match an implementation's *args against a TypeVarTuple overload)
    def spawn(  # type: ignore[misc]
        self, fn: Any, /, *args: Any, group: str = "default", name: str | None = None
    ) -> TaskHandle[Any]:
        """Start ``fn(*args)`` (or a coroutine object) as background work in ``group``.

        A sync call, from any task on the guard's event loop. Raises
        :class:`ShuttingDownError` once the guard refuses work (a ``cancel``
        group from the drain on, every group from stopping on),
        :class:`NotStartedError` before the guard started and
        :class:`GroupFullError` when the group's ``pending_limit`` is reached;
        TypeError for what is not an async function (or a fresh coroutine).
        """
        try:
            if name is not None and type(name) is not str:
                name = check_name(name)
            grp = self._groups.get(group)
            if grp is None:
                grp = self._groups.make(group)
            if threading.get_ident() != self._thread_id and self._state is not State.IDLE:
                raise RuntimeError(
                    "spawn() was called from a worker thread; call it on the event loop, e.g. "
                    "anyio.from_thread.run_sync(guard.spawn, fn)"
                )
            if self._state is not _RUNNING:
                self._groups.refuse(grp, self._state)
        except BaseException:
            _coroutines.close_refused(fn)
            raise
        kind = type(fn)
        if kind is FunctionType:  # spawn(async_fn, *args), the common form: no extra frame
            coro = fn(*args)
            if type(coro) is not CoroutineType:
                coro = _coroutines.checked(fn, coro)
        elif kind is CoroutineType and not args:
            coro = _coroutines.take(fn)
        else:
            coro = _coroutines.coroutine_of(fn, args)
        if (
            grp.pending_limit is not None
            and grp.limit is not None
            and len(grp.running) >= grp.limit
            and len(grp.pending) >= grp.pending_limit
        ):
            _coroutines.release(coro)
            coro.close()  # spawn took it over: no "never awaited" warning
            grp.refused += 1
            raise GroupFullError(
                f"group {group!r} is full: {grp.limit} running and {grp.pending_limit} pending "
                "(its limit and pending_limit)"
            )
        handle: TaskHandle[Any] = TaskHandle(grp, coro, name)
        if grp.limit is None:  # Group.submit's common case, inlined: spawn is on every request
            grp.running[handle] = None  # before the start: an eager task may end inside it
            try:
                grp.start(handle)
            except BaseException:
                grp.start_failed(handle)
                raise
        else:
            grp.submit(handle)
        return handle

    # -- durable tasks ------------------------------------------------------------------

    def durable(
        self,
        name: str | None = None,
        *,
        group: str = "default",
        max_attempts: int = 5,
        journal_on: JournalOn = "spawn",
        backoff: float = 0.5,
    ) -> Callable[[Callable[..., Coroutine[Any, Any, T]]], DurableFunction[T]]:
        """Declare an async function a durable task of this guard (see docs/durable.md).

        ``await fn.spawn(*args, key=None, **kwargs)`` journals the call and runs
        it; entries left by an earlier run are resumed when the guard starts.
        Needs ``GuardConfig.journal``.
        """
        from ._durable import durable

        return durable(
            name,
            group=group,
            max_attempts=max_attempts,
            journal_on=journal_on,
            backoff=backoff,
            guard=self,
        )

    async def spawn_durable(
        self, fn: DurableFunction[T], /, *args: Any, key: str | None = None, **kwargs: Any
    ) -> TaskHandle[T]:
        """Journal ``fn(*args, **kwargs)`` and run it in its group: the handle comes back
        once the entry is committed (``journal_on="spawn"``). A ``key`` already
        journaled gives the handle of the task holding it, not a second task."""
        from ._durable import DurableFunction

        if not isinstance(fn, DurableFunction):
            raise TypeError(f"spawn_durable() takes a function declared with @durable, not {fn!r}")
        return await self._durable_manager().spawn(fn, args, kwargs, key)

    # -- guarded sections ------------------------------------------------------------

    def guarded(self, name: str | None = None, *, shield: bool = False) -> Guarded:
        """A section that shutdown waits for: ``async with``, ``with`` (threads), or a decorator.

        ``shield=True`` protects the block from outside cancellation (anyio and
        trio cancel scopes, e.g. a client disconnect) until the guard's deadline.
        """
        return Guarded(self, name, shield)

    # -- hooks and resources -----------------------------------------------------------

    @overload
    def on_shutdown(
        self, fn: F, /, *, stage: Stage = ..., timeout: float | None = ..., name: str | None = ...
    ) -> F: ...

    @overload
    def on_shutdown(
        self,
        fn: None = ...,
        /,
        *,
        stage: Stage = ...,
        timeout: float | None = ...,
        name: str | None = ...,
    ) -> Callable[[F], F]: ...

    def on_shutdown(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        stage: Stage = "after_drain",
        timeout: float | None = None,
        name: str | None = None,
    ) -> Any:
        """Register a shutdown hook (sync or async, no arguments); also a decorator.

        ``stage="before_drain"`` hooks stop intake (close listeners, deregister)
        and must not wait for in-flight work; ``"after_drain"`` hooks (the
        default) close what the background work used. Within a stage, the last
        registered runs first. Async hooks are cancelled at ``timeout``
        (default ``hook_timeout``). Refused (ShuttingDownError) from the
        stopping phase on.
        """
        try:
            if stage not in STAGES:
                raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
            hook_timeout = self.config.hook_timeout
            if timeout is not None:
                hook_timeout = check_seconds(timeout, "timeout")
            name = check_name(name)
        except Exception:
            _coroutines.close_refused(fn)  # a refused coroutine must not warn "never awaited"
            raise

        def register(func: F) -> F:
            given: object = func  # typed a function; anything may come at run time
            if not callable(given):
                _coroutines.close_refused(given)
                hint = " (pass the function, not its call: on_shutdown(fn))"
                raise TypeError(
                    f"on_shutdown() takes a function, not {describe(given)}"
                    + (hint if type(given) is CoroutineType else "")
                )
            hook = Hook(func, stage, hook_timeout, name or hook_name(func))
            self._hooks.add(hook, before_start=self._shutdown is None)
            return func

        return register if fn is None else register(fn)

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now and exit it after the drain (last entered first).

        One dedicated task of the guard enters and exits every such context, so
        anyio task groups and cancel scopes work as resources. Its exit is an
        ``after_drain`` step bounded by ``hook_timeout``.
        """
        if not hasattr(cm, "__aenter__") or not hasattr(cm, "__aexit__"):
            raise TypeError(f"enter_async_context() takes an async context manager, not {cm!r}")
        if self._state is not _RUNNING and self._state is not _DRAINING:
            self._refuse_section("enter_async_context")
        if self._keeper is None:
            from ._resources import ResourceKeeper

            keeper = self._keeper = ResourceKeeper(self._resource_entered)
            self._system_tasks.append(
                self.backend.start_system_task(keeper.run, name="taskguard-resources")
            )
        return await self._keeper.enter(cm)  # type: ignore[no-any-return]

    def _resource_entered(self, cm: AbstractAsyncContextManager[Any]) -> None:
        assert self._keeper is not None
        # an @asynccontextmanager is better known by its function's name
        gen = getattr(cm, "gen", None)
        name = f"exit {hook_name(gen) if gen is not None else type(cm).__qualname__}"
        self._hooks.add(self._keeper.exit_hook(cm, name, self.config.hook_timeout))

    # -- streams ---------------------------------------------------------------------

    @overload
    def stream(
        self,
        source: AsyncIterable[T],
        /,
        *,
        name: str | None = ...,
        send_timeout: float | None = ...,
        max_duration: float | None = ...,
        raise_on_end: bool = ...,
    ) -> GuardedStream[T]: ...

    @overload
    def stream(
        self,
        source: None = ...,
        /,
        *,
        name: str | None = ...,
        send_timeout: float | None = ...,
        max_duration: float | None = ...,
        raise_on_end: bool = ...,
    ) -> GuardedStream[Any]: ...

    def stream(
        self,
        source: AsyncIterable[Any] | None = None,
        /,
        *,
        name: str | None = None,
        send_timeout: float | None = None,
        max_duration: float | None = None,
        raise_on_end: bool = False,
    ) -> GuardedStream[Any]:
        """Wrap an async iterable that feeds a streaming response (see docs/streams.md).

        It ends on shutdown (after ``stream_grace``), on ``max_duration``, when a
        send takes longer than ``send_timeout`` (stalled) or fails with a broken
        connection (disconnected); the source is closed however it ends.
        ``source=None`` gives a stream for integrations that send themselves
        (``await stream.send(send_fn, message)``).
        """
        return GuardedStream(
            self,
            source,
            name=name,
            send_timeout=send_timeout,
            max_duration=max_duration,
            raise_on_end=raise_on_end,
        )
