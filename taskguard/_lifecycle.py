"""A guard's life: its parts wired together, the start, the shutdown trigger, exit
signals, and what integrations may read. One run at a time; a closed guard can
run again with fresh parts.

:class:`Lifecycle` is the base of :class:`~taskguard.TaskGuard` (``_guard.py``),
which adds the work API on top: ``spawn``, ``guarded()``, hooks and resources,
streams, durable tasks. The shutdown sequence itself is ``_shutdown.py``'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import anyio

from . import _current
from ._backends import Backend, WakeupHold, current_backend
from ._config import GuardConfig, GuardOptions, check_flag, check_name
from ._exceptions import NotStartedError, ShuttingDownError
from ._groups import Groups
from ._guarded import Guarded
from ._hooks import Hooks
from ._inflight import InFlight
from ._report import GuardStats, ShutdownReport, State
from ._sections import Sections
from ._shutdown import Run, Shutdown, record_fault
from ._signals import ExitSignals, signame
from ._stream_registry import Streams

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

    from ._guard import TaskGuard
    from ._journal._manager import DurableManager
    from ._resources import ResourceKeeper
    from ._watchdog import Watchdog

__all__ = ["Lifecycle"]

logger = logging.getLogger("taskguard")

_RUNNING = State.RUNNING
_DRAINING = State.DRAINING


class Lifecycle:
    """The run of a guard (see the module docstring); used as TaskGuard's base only."""

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
        self._signal_wakeup: WakeupHold | None = None

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
        section = Guarded(cast("TaskGuard", self), name, False)
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
        section = Guarded(cast("TaskGuard", self), name, False)
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

    async def __aenter__(self) -> Self:
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
        self._context_token = _current.enter(cast("TaskGuard", self))
        self._system_tasks.append(
            backend.start_system_task(shutdown.run, name="taskguard-supervisor")
        )
        if self.config.handle_signals:
            # The handlers are in place before the body (or run()'s main) starts.
            try:
                self._signals.install(self.config.exit_signals)
                # a signal the kernel hands to another thread must still wake the loop
                self._signal_wakeup = backend.wake_on_signals()
            except (RuntimeError, ValueError, OSError) as exc:
                self.shutdown(reason="signal handlers could not be installed")
                await self.wait_closed()
                _current.leave(cast("TaskGuard", self), self._context_token)
                raise RuntimeError(
                    f"taskguard could not install its exit-signal handlers: {exc}"
                ) from exc
        if self.config.journal is not None:  # resume durable tasks before the app takes work
            try:
                await self._durable_manager().start(self.config.journal)
            except BaseException as exc:
                self.shutdown(reason=f"the journal could not be opened: {exc}")
                await self.wait_closed()
                _current.leave(cast("TaskGuard", self), self._context_token)
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
            _current.leave(cast("TaskGuard", self), self._context_token)

    def _closing(self) -> None:
        """The sequence is done: let go of what this run held (resources, signals)."""
        if self._keeper is not None:
            self._keeper.close()
        self._signals.restore()
        wakeup, self._signal_wakeup = self._signal_wakeup, None
        if wakeup is not None:
            wakeup.close()
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

    def _fault(self, what: str, exc: BaseException) -> None:
        record_fault(self._errors, what, exc)

    def _shutdown_on_failure(self, reason: str) -> None:
        """A task of an ``on_error="shutdown"`` group failed."""
        if self._state is _RUNNING:
            self.shutdown(reason)

    # -- refusals and durable tasks (used by the work API) ---------------------------

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

    def _durable_manager(self) -> DurableManager:
        if self._durable is None:
            from ._journal._manager import DurableManager

            self._durable = DurableManager(cast("TaskGuard", self))
        return self._durable
