"""TaskGuard: the registry of background work; the parts of a run, wired together."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from types import CoroutineType, FunctionType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import anyio

from . import _coroutines, _current
from ._backends import Backend, current_backend
from ._config import (
    GuardConfig,
    GuardOptions,
    check_flag,
    check_name,
    check_seconds,
    describe,
)
from ._exceptions import GroupFullError, NotStartedError, ShuttingDownError
from ._groups import Groups
from ._guarded import Guarded
from ._handle import TaskHandle
from ._hooks import STAGES, Hook, Hooks, Stage, hook_name
from ._inflight import InFlight
from ._report import GuardStats, ShutdownReport, State
from ._sections import Sections
from ._shutdown import Run, Shutdown, record_fault
from ._signals import ExitSignals, signame
from ._streams import GuardedStream, Streams

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    from ._durable import DurableFunction, JournalOn
    from ._journal._manager import DurableManager
    from ._resources import ResourceKeeper
    from ._watchdog import Watchdog

    PosArgs = TypeVarTuple("PosArgs")

__all__ = ["TaskGuard"]

logger = logging.getLogger("taskguard")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_RUNNING = State.RUNNING
_DRAINING = State.DRAINING


class TaskGuard:
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

    def __init__(
        self,
        config: GuardConfig | Mapping[str, Any] | None = None,
        /,
        **overrides: Unpack[GuardOptions],
    ) -> None:
        if config is None:
            self.config = GuardConfig.model_validate(overrides)
        elif isinstance(config, GuardConfig):
            self.config = (
                GuardConfig.model_validate({**dict(config), **overrides}) if overrides else config
            )
        elif isinstance(config, Mapping):
            self.config = GuardConfig.model_validate({**config, **overrides})
        else:
            raise TypeError(f"TaskGuard() takes a GuardConfig, a dict or None, not {config!r}")
        self._state = State.IDLE
        self._hooks = Hooks(self.config)
        #: the hard deadline of taskguard.run (set by it), armed at the trigger
        self._watchdog: Watchdog | None = None
        #: durable tasks: the declarations and the journal (made on first use)
        self._durable: DurableManager | None = None
        self._new_run()

    def _new_run(self) -> None:
        """The parts of one run, fresh (the first, or again after the guard closed)."""
        self._groups = Groups(self.config, self._shutdown_on_failure, self._fault)
        self._inflight = InFlight()
        self._sections: Sections | None = None  # made at start: they need the backend
        self._streams: Streams | None = None
        self._keeper: ResourceKeeper | None = None
        self._backend: Backend | None = None
        self._thread_id = 0
        self._shutdown: Shutdown | None = None
        self._system_tasks: list[object] = []
        self._context_token: Any = None
        #: faults of this run's own bookkeeping, for report.errors (record_fault)
        self._errors: list[str] = []
        self._signals = ExitSignals(self._on_signal, self._arm_hard_deadline, self._left)

    def __repr__(self) -> str:
        return f"<TaskGuard state={self._state.value} idle={self._inflight.idle()}>"

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
        """The report of the last shutdown; available once the guard is closed."""
        report = None if self._shutdown is None else self._shutdown.report
        if report is None:
            raise RuntimeError(
                f"the guard is {self._state.value}: its report is built when it closes"
            )
        return report

    def remaining(self) -> float:
        """Seconds left of the exit wait (the whole exit wait before shutdown starts)."""
        if self._shutdown is None or self._backend is None:
            return self.config.exit_wait_timeout
        return max(0.0, self._shutdown.deadline - self._backend.time())

    def stats(self) -> GuardStats:
        """A snapshot for metrics endpoints: running and pending per group, open sections."""
        sections, streams = self._sections, self._streams
        return GuardStats(
            state=self._state,
            ready=self.ready,
            groups={name: g.stats() for name, g in self._groups.items()},
            guarded=0 if sections is None else len(sections.open) + len(sections.threads),
            streams=0 if streams is None else len(streams.open),
        )

    def _set_state(self, state: State) -> None:
        """The one place the state changes; the parts that refuse work follow it."""
        self._state = state
        if self._sections is not None:
            self._sections.accepting = state is _RUNNING or state is _DRAINING
        if state is State.STOPPING:
            self._hooks.close(
                "the guard is stopping: the shutdown's budget is fixed (a hook that "
                "registers hooks would otherwise never let it end)"
            )
        elif state is State.CLOSED:
            self._hooks.close("the guard is closed: its hooks already ran")

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
        if self._sections is None:
            self._refuse_section(name)
        assert self._sections is not None
        section._attach(self._sections, scope)
        return section

    def open_task_section(self, name: str) -> Guarded:
        """Open a guarded section for the calling task, without a cancel scope:
        cutting it at the deadline cancels the task itself. Close it with
        ``section.close(cancelled)``; ``section.cut`` says whether the guard cut
        it (the task then got a cancellation that is the guard's, not a caller's).

        For integrations that run every request in a task of its own (grpc.aio):
        an anyio cancel scope costs about 7 µs in a fresh task (its per-task
        bookkeeping), more than the rest of the section. asyncio only (a trio
        task cannot be cancelled without a scope): RuntimeError elsewhere.
        Raises like ``guarded()`` when the guard refuses new sections.
        """
        scope = self.backend.task_canceller()
        sections = self._sections
        assert sections is not None
        section = Guarded(self, name, False)
        # The guard only ever calls cancel() on a section's scope.
        section._attach(sections, cast(anyio.CancelScope, scope))
        return section

    def in_section(self) -> bool:
        """Whether the calling task holds an open guarded section of this guard."""
        sections = self._sections
        return sections is not None and sections.holds(sections.current_task())

    @property
    def signals_seen(self) -> int:
        """How many exit signals the guard has been given so far (this run)."""
        return self._signals.count

    @property
    def forced(self) -> bool:
        """Whether the shutdown was forced (a second exit signal, ``shutdown(force=True)``)."""
        return self._shutdown is not None and self._shutdown.forced

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> TaskGuard:
        if self._state is State.CLOSED:
            self._new_run()
            self._hooks.new_run()
            self._state = State.IDLE
        elif self._state is not State.IDLE:
            raise RuntimeError(
                f"this TaskGuard is already {self._state.value}: enter it once at a time "
                "(it can run again once it is closed)"
            )
        backend = self._backend = current_backend()
        self._thread_id = threading.get_ident()
        inflight = self._inflight
        self._sections = Sections(inflight, backend, self._refuse_section)
        self._streams = Streams(inflight, self._fault)
        for name in self.config.groups:
            self._groups.make(name)
        self._groups.make("default")
        self._groups.bind(backend, inflight)
        shutdown = self._shutdown = Shutdown(
            Run(
                self.config,
                backend,
                self._groups,
                inflight,
                self._sections,
                self._streams,
                self._hooks,
                self._set_state,
                on_trigger=self._arm_hard_deadline,
                on_close=self._closing,
                durable=lambda: self._durable,
                errors=self._errors,
            )
        )
        self._signals.bind(backend.call_soon_threadsafe)
        self._set_state(State.RUNNING)
        self._context_token = _current.enter(self)
        self._system_tasks.append(
            backend.start_system_task(shutdown.run, name="taskguard-supervisor")
        )
        if self.config.handle_signals:
            # The handlers are in place before the body (or run()'s main) starts.
            try:
                self._signals.install(self.config.exit_signals)
            except (RuntimeError, ValueError, OSError) as exc:
                self.shutdown(reason="signal handlers could not be installed")
                await self.wait_closed()
                _current.leave(self, self._context_token)
                raise RuntimeError(
                    f"taskguard could not install its exit-signal handlers: {exc}"
                ) from exc
        if self.config.journal is not None:  # resume durable tasks before the app takes work
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
        try:
            if exc is None:
                self.shutdown(reason="exit")
            elif isinstance(exc, anyio.get_cancelled_exc_class()):
                self.shutdown(reason="cancelled")
            else:
                self.shutdown(reason=f"exception: {type(exc).__name__}: {exc}")
            await self.wait_closed()
        finally:  # even if the shutdown failed: a closed guard is not current any more
            _current.leave(self, self._context_token)

    def _closing(self) -> None:
        """The sequence is done: let go of what this run held (resources, signals)."""
        if self._keeper is not None:
            self._keeper.close()
        self._signals.restore()
        self._signals.detach()
        self._system_tasks.clear()

    async def wait_for_shutdown(self) -> None:
        """Return once shutdown is requested (an exit signal or ``shutdown()``)."""
        await self._started().triggered.wait()

    async def wait_for_intake_stop(self) -> None:
        """Return once the server should stop accepting work: ``drain_delay`` after
        the shutdown trigger (at once without a delay, or when the shutdown is
        forced), just before the ``before_drain`` hooks run.

        Until then the app keeps serving (readiness already says 503), so a load
        balancer can stop routing here first. Use it where a server takes an
        awaitable shutdown trigger, e.g.
        ``hypercorn.asyncio.serve(app, config, shutdown_trigger=guard.wait_for_intake_stop)``.
        """
        await self._started().intake_stop.wait()

    async def wait_closed(self) -> ShutdownReport:
        """Wait until the guard is closed (a bounded wait) and return the report.

        Shielded: a caller that is cancelled meanwhile still waits for the
        bounded shutdown, so nothing outlives it unreported.
        """
        shutdown = self._started()
        with anyio.CancelScope(shield=True):
            await shutdown.closed.wait()
        return self.report

    def _started(self) -> Shutdown:
        if self._shutdown is None:
            raise NotStartedError("the guard has not started: enter it with `async with guard:`")
        return self._shutdown

    def shutdown(self, reason: str | None = None, *, force: bool = False) -> None:
        """Request shutdown; idempotent, from any task or thread.

        ``force=True`` ends the drain at once: what is left is cancelled.
        """
        shutdown = self._shutdown
        if shutdown is None:
            raise NotStartedError(
                "shutdown() on a guard that has not started: enter it with `async with guard:`"
            )
        reason = check_name(reason, "shutdown(reason=...)")
        check_flag(force, "shutdown(force=...)")
        if threading.get_ident() != self._thread_id:
            assert self._backend is not None
            self._backend.call_soon_threadsafe(lambda: self.shutdown(reason, force=force))
            return
        shutdown.request(reason or "shutdown()", force)

    # -- exit signals and the hard deadline -----------------------------------------

    def handle_signal(self, signum: int) -> None:
        """Deliver an exit signal: the first starts shutdown, the second forces it,
        the third ends the process at once (after logging what is stuck).

        Safe to call from a ``signal.signal`` handler and from other threads.
        """
        self._signals.receive(signum)

    def _on_signal(self, signum: int, count: int) -> None:
        """Exit signal number ``count``, on the loop thread: shut down, then force."""
        if self._state is State.CLOSED or self._shutdown is None:
            return
        name = signame(signum)
        if count == 1:
            logger.info("exit signal %s: shutting down", name)
            self._shutdown.request(f"signal {name}", False)
        else:
            logger.warning("second exit signal %s: forcing shutdown", name)
            self._shutdown.request(f"signal {name}", True)

    def _arm_hard_deadline(self) -> None:
        if self._watchdog is not None:
            self._watchdog.arm()

    def _left(self) -> list[str]:
        """What still runs, and what was given up on (for a hard exit's log)."""
        return [] if self._shutdown is None else self._shutdown.describe_left()

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

    def _fault(self, what: str, exc: BaseException) -> None:
        record_fault(self._errors, what, exc)

    def _shutdown_on_failure(self, reason: str) -> None:
        """A task of an ``on_error="shutdown"`` group failed."""
        if self._state is _RUNNING:
            self.shutdown(reason)

    # -- durable tasks ------------------------------------------------------------------

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

    def _refuse_section(self, name: str) -> None:
        """Raise why a new section (or stream, or resource) is refused now."""
        if self._state is State.IDLE:
            raise NotStartedError(
                f"guarded({name!r}) before the guard started: enter it with `async with guard:`"
            )
        raise ShuttingDownError(f"guarded({name!r}) refused: the guard is {self._state.value}")

    def _wrong_thread(self, name: str) -> None:
        raise RuntimeError(
            f"guarded({name!r}) was entered in another thread than the guard's event loop; "
            "in a worker thread use the sync form `with guard.guarded():`"
        )

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
