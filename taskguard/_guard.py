"""TaskGuard: the registry of background work, and its shutdown sequence."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterable, Callable, Coroutine, Mapping
from types import CoroutineType, FunctionType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio

from . import _current
from ._backend import Backend, current_backend
from ._config import GuardConfig
from ._exceptions import GroupFullError, NotStartedError, ShuttingDownError
from ._groups import Group
from ._guarded import Guarded, SectionRegistry
from ._handle import TaskHandle, start_asyncio, start_trio
from ._hooks import Hook, ResourceKeeper
from ._registry import HookRegistry
from ._report import GuardStats, ShutdownReport, State
from ._shutdown import Shutdown
from ._signals import SignalReceiver, on_signal

if TYPE_CHECKING:
    from ._durable import DurableFunction, JournalOn
    from ._journal._manager import DurableManager
    from ._streams import GuardedStream

__all__ = ["TaskGuard"]

logger = logging.getLogger("taskguard")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_RUNNING = State.RUNNING
_DRAINING = State.DRAINING


class TaskGuard(HookRegistry, SectionRegistry):
    """The registry of an application's background work.

    Open it with ``async with guard:`` (or let ``taskguard.run`` or the ASGI
    middleware do it). While it runs, ``spawn`` tracks tasks in named groups,
    ``guarded()`` marks sections that shutdown waits for, ``on_shutdown``
    registers ordered hooks. Shutdown (an exit signal, ``shutdown()``, or the
    end of the ``async with`` body) drains or cancels the work within
    ``exit_wait_timeout`` and leaves a :class:`ShutdownReport` in ``report``.
    """

    def __init__(self, config: GuardConfig | Mapping[str, Any] | None = None, /, **overrides: Any):
        if config is None:
            self.config = GuardConfig(**overrides)
        elif isinstance(config, GuardConfig):
            self.config = (
                GuardConfig.model_validate({**dict(config), **overrides}) if overrides else config
            )
        elif isinstance(config, Mapping):
            self.config = GuardConfig.model_validate({**config, **overrides})
        else:
            raise TypeError(f"TaskGuard() takes a GuardConfig, a dict or None, not {config!r}")
        self._state = State.IDLE
        self._hooks: list[Hook] = []
        self._warnings: list[str] = []
        self._trigger_callbacks: list[Callable[[TaskGuard], object]] = []
        self._report: ShutdownReport | None = None
        self._durable: DurableManager | None = None  # durable: declarations and journal
        self._new_run()

    def _new_run(self) -> None:
        """Fresh per-run state: a guard runs again after it closed (a second ASGI
        lifespan, a test client used twice). Hooks registered before the first
        start stay; those registered while it ran belonged to that run."""
        self._groups: dict[str, Group] = {}
        self._live = 0  # running + pending tasks + open async sections
        self._sections: dict[Guarded, None] = {}
        self._thread_sections: dict[Guarded, None] = {}
        self._thread_lock = threading.Lock()
        self._section_counts = Counter[str]()
        self._wake: anyio.Event | None = None  # set when _live drops to 0 during shutdown
        self._hooks = [hook for hook in self._hooks if hook.before_start]
        if self._hooks:
            self._check_grace_period()
        self._keeper: ResourceKeeper | None = None
        # open streams, held weakly (_streams._Tracked); the supervisor calls _interrupt()
        self._streams: dict[Any, None] = {}
        self._stream_outcomes = Counter[str]()
        self._warnings = []
        self._signals_seen = 0
        self._backend: Backend | None = None
        self._thread_id = 0
        self._shutdown: Shutdown | None = None
        self._system_tasks: list[object] = []
        self._signals: SignalReceiver | None = None
        self._context_token: Any = None
        self._start: Callable[[TaskHandle[Any]], None] = _not_started
        self._scope_class: Callable[..., anyio.CancelScope] = anyio.CancelScope
        self._current_task: Callable[[], object] = _no_task

    def __repr__(self) -> str:
        return f"<TaskGuard state={self._state.value} live={self._live}>"

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def ready(self) -> bool:
        """True while running; False from the drain on (back a readiness probe with it)."""
        return self._state is _RUNNING

    @property
    def report(self) -> ShutdownReport:
        """The report of the shutdown; available once the guard is closed."""
        if self._report is None:
            raise RuntimeError(
                f"the guard is {self._state.value}: its report is built when it closes"
            )
        return self._report

    def remaining(self) -> float:
        """Seconds left of the exit wait (the whole exit wait before shutdown starts)."""
        if self._shutdown is None or self._backend is None:
            return self.config.exit_wait_timeout
        return max(0.0, self._shutdown.deadline - self._backend.time())

    # -- for integrations ------------------------------------------------------------
    # The ASGI middleware, the gRPC interceptor and the pytest helpers use these,
    # never the guard's private fields.

    @property
    def backend(self) -> Backend:
        """The event-loop backend the guard runs on (for integrations)."""
        backend = self._backend
        if backend is None:
            raise NotStartedError("the guard has not started: enter it with `async with guard:`")
        return backend

    def open_section(self, name: str, scope: anyio.CancelScope) -> Guarded:
        """Open a guarded section whose cancel scope the caller enters and exits
        itself; close it with ``section.close(cancelled)`` after the scope exited.

        For integrations that run a request in one scope of their own (the ASGI
        middleware): that scope doubles as the section's, the one the guard
        cancels at the deadline. Raises like ``guarded()`` when the guard
        refuses new sections.
        """
        section = Guarded(self, name, False)
        section._attach(self, scope)
        return section

    def in_section(self) -> bool:
        """Whether the calling task holds an open guarded section of this guard."""
        task = self._backend_current_task()
        return any(section._task is task for section in self._sections)

    @property
    def signals_seen(self) -> int:
        """How many exit signals the guard has been given so far."""
        return self._signals_seen

    @property
    def forced(self) -> bool:
        """Whether the shutdown was forced (a second exit signal, ``shutdown(force=True)``)."""
        return self._shutdown is not None and self._shutdown.forced

    def stats(self) -> GuardStats:
        """A snapshot for metrics endpoints: running and pending per group, open sections."""
        return GuardStats(
            state=self._state,
            ready=self.ready,
            groups={name: g.stats() for name, g in self._groups.items()},
            guarded=len(self._sections) + len(self._thread_sections),
            streams=len(self._streams),
        )

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> TaskGuard:
        if self._state is State.CLOSED:
            self._new_run()
            self._report = None
            self._state = State.IDLE
        elif self._state is not State.IDLE:
            raise RuntimeError(
                f"this TaskGuard is already {self._state.value}: enter it once at a time "
                "(it can run again once it is closed)"
            )
        backend = self._backend = current_backend()
        self._thread_id = threading.get_ident()
        # Resolved once, not per guarded section: anyio.CancelScope() looks the
        # backend up on every call (sniffio + a factory), about 40% of a bare
        # scope's cost on asyncio; the backend's own class builds the same object.
        self._scope_class = backend.cancel_scope
        self._current_task = backend.current_task_function()
        if backend.name == "asyncio":
            loop = asyncio.get_running_loop()
            # a C partial, not a lambda: one Python frame less per spawn
            self._start = functools.partial(start_asyncio, loop)
        else:
            self._start = start_trio
        for name in self.config.groups:
            self._group(name)
        self._group("default")
        self._shutdown = Shutdown(self)
        self._state = State.RUNNING
        self._context_token = _current.enter(self)
        self._system_tasks.append(
            backend.start_system_task(self._shutdown.run, name="taskguard-supervisor")
        )
        if self.config.handle_signals:
            receiver = self._signals = SignalReceiver(self)
            self._system_tasks.append(
                backend.start_system_task(receiver.run, name="taskguard-signals")
            )
            # The handlers are in place before the body (or run()'s main) starts.
            with anyio.CancelScope(shield=True):
                await receiver.ready.wait()
            if receiver.error is not None:
                self.shutdown(reason="signal handlers could not be installed")
                await self.wait_closed()
                _current.leave(self, self._context_token)
                raise RuntimeError(
                    f"taskguard could not install its exit-signal handlers: {receiver.error} "
                    "(signals can only be handled in the main thread; set handle_signals=False)"
                ) from receiver.error
        if self.config.journal is not None:  # durable: resume before the app takes work
            try:
                await self._durable_manager().start(self.config.journal)
            except BaseException as exc:
                self.shutdown(reason=f"the journal could not be opened: {exc}")
                await self.wait_closed()
                _current.leave(self, self._context_token)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.shutdown(reason="exit")
        elif isinstance(exc, anyio.get_cancelled_exc_class()):
            self.shutdown(reason="cancelled")
        else:
            self.shutdown(reason=f"exception: {type(exc).__name__}: {exc}")
        await self.wait_closed()
        _current.leave(self, self._context_token)

    async def wait_for_shutdown(self) -> None:
        """Return once shutdown is requested (an exit signal or ``shutdown()``)."""
        if self._shutdown is None:
            raise NotStartedError("the guard has not started: enter it with `async with guard:`")
        await self._shutdown.triggered.wait()

    async def wait_for_intake_stop(self) -> None:
        """Return once the server should stop accepting work: ``drain_delay`` after
        the shutdown trigger (at once without a delay, or when the shutdown is
        forced), just before the ``before_drain`` hooks run.

        Until then the app keeps serving (readiness already says 503), so a load
        balancer can stop routing here first. Use it where a server takes an
        awaitable shutdown trigger, e.g.
        ``hypercorn.asyncio.serve(app, config, shutdown_trigger=guard.wait_for_intake_stop)``.
        """
        if self._shutdown is None:
            raise NotStartedError("the guard has not started: enter it with `async with guard:`")
        await self._shutdown.intake_stop.wait()

    async def wait_closed(self) -> ShutdownReport:
        """Wait until the guard is closed (a bounded wait) and return the report.

        Shielded: a caller that is cancelled meanwhile still waits for the
        bounded shutdown, so nothing outlives it unreported.
        """
        if self._shutdown is None:
            raise NotStartedError("the guard has not started: enter it with `async with guard:`")
        with anyio.CancelScope(shield=True):
            await self._shutdown.closed.wait()
        return self.report

    def shutdown(self, reason: str | None = None, *, force: bool = False) -> None:
        """Request shutdown; idempotent, from any task or thread.

        ``force=True`` ends the drain at once: what is left is cancelled.
        """
        shutdown = self._shutdown
        if shutdown is None:
            raise NotStartedError(
                "shutdown() on a guard that has not started: enter it with `async with guard:`"
            )
        if threading.get_ident() != self._thread_id:
            assert self._backend is not None
            self._backend.call_soon_threadsafe(lambda: self.shutdown(reason, force=force))
            return
        shutdown.request(reason or "shutdown()", force)

    def handle_signal(self, signum: int) -> None:
        """Deliver an exit signal: the first starts shutdown, the second forces it,
        the third ends the process at once (after logging what is stuck).

        Safe to call from a ``signal.signal`` handler and from other threads.
        """
        self._signals_seen += 1
        if self._signals_seen >= 3:
            from ._runner import hard_exit
            from ._signals import signame

            hard_exit(self, f"third exit signal ({signame(signum)})", 128 + int(signum))
        backend = self._backend
        if backend is None or self._state is State.CLOSED:
            return
        count = self._signals_seen
        backend.call_soon_threadsafe(lambda: on_signal(self, signum, count))

    # -- spawning ------------------------------------------------------------------

    @overload
    def spawn(
        self,
        fn: Coroutine[Any, Any, T],
        /,
        *,
        group: str = ...,
        name: str | None = ...,
    ) -> TaskHandle[T]: ...

    @overload
    def spawn(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        /,
        *args: Any,
        group: str = ...,
        name: str | None = ...,
    ) -> TaskHandle[T]: ...

    def spawn(
        self, fn: Any, /, *args: Any, group: str = "default", name: str | None = None
    ) -> TaskHandle[Any]:
        """Start ``fn(*args)`` (or a coroutine object) as background work in ``group``.

        A sync call, from any task on the guard's event loop. Raises
        :class:`ShuttingDownError` once the guard refuses work (a ``cancel``
        group from the drain on, every group from stopping on),
        :class:`NotStartedError` before the guard started and
        :class:`GroupFullError` when the group's ``pending_limit`` is reached.
        """
        grp = self._groups.get(group)
        if grp is None:
            grp = self._new_group(group)
        if self._state is not _RUNNING:
            self._check_intake(grp, fn)
        if threading.get_ident() != self._thread_id:
            _close_refused(fn)
            raise RuntimeError(
                "spawn() was called from a worker thread; call it on the event loop, e.g. "
                "anyio.from_thread.run_sync(guard.spawn, fn)"
            )
        kind = type(fn)
        if kind is FunctionType:  # spawn(async_fn, *args), the common form: no extra frame
            coro = fn(*args)
            if type(coro) is not CoroutineType:
                coro = _check_coroutine(fn, coro)
        elif kind is CoroutineType and not args:
            coro = fn
        else:
            coro = _make_coroutine(fn, args)
        if (
            grp.pending_limit is not None
            and grp.limit is not None
            and len(grp.running) >= grp.limit
            and len(grp.pending) >= grp.pending_limit
        ):
            coro.close()  # spawn took it over: no "never awaited" warning
            grp.refused += 1
            raise GroupFullError(
                f"group {group!r} is full: {grp.limit} running and {grp.pending_limit} pending "
                "(its limit and pending_limit)"
            )
        handle: TaskHandle[Any] = TaskHandle(grp, coro, name)
        if grp.limit is None:  # Group.submit's common case, inlined: spawn is on every request
            grp.running[handle] = None
            self._live += 1  # before the start: an eager task may end inside it
            try:
                self._start(handle)
            except BaseException:
                grp.start_failed(handle)
                raise
        else:
            grp.submit(handle)
        return handle

    def _new_group(self, name: str) -> Group:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a group name is a non-empty str, not {name!r}")
        return self._group(name)

    def _group(self, name: str) -> Group:
        grp = self._groups.get(name)
        if grp is None:
            grp = self._groups[name] = Group(self, name, self.config.group(name))
        return grp

    def _check_intake(self, grp: Group, fn: object) -> None:
        state = self._state
        if state is _DRAINING and grp.drains and not grp.closed:
            return
        grp.refused += 1
        _close_refused(fn)
        if state is State.IDLE:
            raise NotStartedError(
                "spawn() before the guard started: enter it with `async with guard:` "
                "(or use taskguard.run / the ASGI middleware)"
            )
        if state is not _DRAINING:
            why = "every group"
        elif grp.drains:
            why = "its drain timeout was reached"
        else:
            why = "a cancel group"
        raise ShuttingDownError(
            f"spawn() refused: the guard is {state.value} and group {grp.name!r} takes no new "
            f"work ({why})"
        )

    def _task_failed(self, handle: TaskHandle[Any]) -> None:
        """Log a background failure, hand it to the error_handler; never raises."""
        exc = handle._exc
        try:
            logger.error(
                "background task %r (group %r) failed", handle.name, handle.group, exc_info=exc
            )
            handler = self.config.error_handler
            if handler is not None and exc is not None:
                try:
                    result = handler(exc, handle)
                    if asyncio.iscoroutine(result):
                        result.close()
                        raise TypeError("error_handler must be a plain function, not async")
                except BaseException:  # the handler's bug must not break the bookkeeping
                    logger.exception("the error_handler raised while handling %r", handle.name)
            if handle._group.config.on_error == "shutdown" and self._state is _RUNNING:
                self.shutdown(f"task {handle.name!r} (group {handle.group!r}) failed")
        except BaseException:
            logger.exception("taskguard: handling the failure of %r failed", handle.name)

    # -- durable tasks (durable:) -------------------------------------------------------

    def _durable_manager(self) -> DurableManager:
        if self._durable is None:
            from ._journal._manager import DurableManager

            self._durable = DurableManager(self)
        return self._durable

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
        from ._streams import GuardedStream

        return GuardedStream(
            self,
            source,
            name=name,
            send_timeout=send_timeout,
            max_duration=max_duration,
            raise_on_end=raise_on_end,
        )


def _make_coroutine(fn: Any, args: tuple[Any, ...]) -> Coroutine[Any, Any, Any]:
    # A coroutine object is not callable: test callable() first, so the common
    # spawn(async_fn, ...) skips asyncio.iscoroutine's ABC isinstance check on fn.
    if isinstance(fn, TaskHandle):
        raise TypeError(
            "spawn() got a TaskHandle (a task already spawned); to wait for it, "
            "spawn an async function that awaits handle.wait()"
        )
    if not callable(fn):
        if asyncio.iscoroutine(fn):
            if args:
                raise TypeError(
                    "spawn() got a coroutine object and arguments; pass one or the other"
                )
            return fn
        raise TypeError(f"spawn() takes an async function or a coroutine object, not {fn!r}")
    return _check_coroutine(fn, fn(*args))


def _check_coroutine(fn: Any, coro: Any) -> Coroutine[Any, Any, Any]:
    if type(coro) is CoroutineType or asyncio.iscoroutine(coro):
        return coro
    raise TypeError(
        f"spawn() takes an async function, but {getattr(fn, '__qualname__', fn)!r} returned "
        f"{type(coro).__name__} (it ran synchronously in the caller). For blocking work, "
        "spawn an async function that calls anyio.to_thread.run_sync()"
    )


def _close_refused(fn: object) -> None:
    # spawn() takes over a coroutine object: a refused one is closed, so Python
    # does not warn that it was never awaited.
    if type(fn) is CoroutineType:
        fn.close()


def _no_task() -> object:
    return None


def _not_started(handle: TaskHandle[Any]) -> None:
    raise NotStartedError("the guard has not started")
