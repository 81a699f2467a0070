"""TaskGuard: the registry of background work, and its shutdown sequence."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from types import CoroutineType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio

from . import _current
from ._backend import Backend, current_backend, thread_stack
from ._config import GuardConfig
from ._exceptions import GroupFullError, NotStartedError, ShuttingDownError
from ._groups import Group
from ._guarded import Guarded
from ._handle import TaskHandle, start_asyncio, start_trio
from ._hooks import STAGES, Hook, ResourceKeeper, Stage
from ._report import GuardStats, ShutdownReport, State
from ._shutdown import Shutdown

if TYPE_CHECKING:
    from ._streams import GuardedStream

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
        self._groups: dict[str, Group] = {}
        self._live = 0  # running + pending tasks + open async sections
        self._sections: dict[Guarded, None] = {}
        self._thread_sections: dict[Guarded, None] = {}
        self._thread_lock = threading.Lock()
        self._section_counts = Counter[str]()
        self._wake: anyio.Event | None = None  # set when _live drops to 0 during shutdown
        self._hooks: list[Hook] = []
        self._keeper: ResourceKeeper | None = None
        self._streams: dict[GuardedStream[Any], None] = {}
        self._stream_outcomes = Counter[str]()
        self._warnings: list[str] = []
        self._signals_seen = 0
        self._trigger_callbacks: list[Callable[[TaskGuard], object]] = []
        self._backend: Backend | None = None
        self._thread_id = 0
        self._shutdown: Shutdown | None = None
        self._report: ShutdownReport | None = None
        self._system_tasks: list[object] = []
        self._signal_scope: anyio.CancelScope | None = None
        self._context_token: Any = None
        self._start: Callable[[TaskHandle[Any]], None] = _not_started

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
        if self._shutdown is None:
            return self.config.exit_wait_timeout
        return max(0.0, self._shutdown.deadline - anyio.current_time())

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
        if self._state is not State.IDLE:
            raise RuntimeError(
                f"this TaskGuard is {self._state.value}: a guard runs once; create a new one"
            )
        backend = self._backend = current_backend()
        self._thread_id = threading.get_ident()
        if backend.name == "asyncio":
            loop = asyncio.get_running_loop()
            self._start = lambda h: start_asyncio(loop, h)
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
            self._signal_scope = anyio.CancelScope()
            self._system_tasks.append(
                backend.start_system_task(self._receive_signals, name="taskguard-signals")
            )
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

            hard_exit(self, f"third exit signal ({_signame(signum)})", 128 + int(signum))
        backend = self._backend
        if backend is None or self._state is State.CLOSED:
            return
        count = self._signals_seen
        backend.call_soon_threadsafe(lambda: self._on_signal(signum, count))

    def _on_signal(self, signum: int, count: int) -> None:
        if count == 1:
            logger.info("exit signal %s: shutting down", _signame(signum))
            self.shutdown(f"signal {_signame(signum)}")
        else:
            logger.warning("second exit signal %s: forcing shutdown", _signame(signum))
            self.shutdown(f"signal {_signame(signum)}", force=True)

    async def _receive_signals(self) -> None:
        assert self._signal_scope is not None
        with self._signal_scope, anyio.open_signal_receiver(*self.config.exit_signals) as signals:
            async for signum in signals:
                self.handle_signal(signum)

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
            self._check_intake(grp)
        if threading.get_ident() != self._thread_id:
            raise RuntimeError(
                "spawn() was called from a worker thread; call it on the event loop, e.g. "
                "anyio.from_thread.run_sync(guard.spawn, fn)"
            )
        coro = fn if type(fn) is CoroutineType else _make_coroutine(fn, args)
        if (
            grp.pending_limit is not None
            and grp.limit is not None
            and len(grp.running) >= grp.limit
            and len(grp.pending) >= grp.pending_limit
        ):
            if coro is not fn:
                coro.close()
            grp.refused += 1
            raise GroupFullError(
                f"group {group!r} is full: {grp.limit} running and {grp.pending_limit} pending "
                "(its limit and pending_limit)"
            )
        handle: TaskHandle[Any] = TaskHandle(grp, coro, name)
        grp.submit(handle)
        return handle

    def _new_group(self, name: str) -> Group:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a group name is a non-empty str, not {name!r}")
        return self._group(name)

    def _group(self, name: str) -> Group:
        grp = self._groups.get(name)
        if grp is None:
            grp = self._groups[name] = Group(
                self, name, self.config.group(name), lambda h: self._start(h)
            )
        return grp

    def _check_intake(self, grp: Group) -> None:
        state = self._state
        if state is State.IDLE:
            raise NotStartedError(
                "spawn() before the guard started: enter it with `async with guard:` "
                "(or use taskguard.run / the ASGI middleware)"
            )
        if state is _DRAINING and grp.drains:
            return
        grp.refused += 1
        why = "cancel group" if state is _DRAINING else "guard"
        raise ShuttingDownError(
            f"spawn() refused: the guard is {state.value} and group {grp.name!r} takes no new "
            f"work ({why})"
        )

    def _task_failed(self, handle: TaskHandle[Any]) -> None:
        exc = handle._exc
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
            except Exception:
                logger.exception("the error_handler raised while handling %r", handle.name)
        if handle._group.config.on_error == "shutdown" and self._state is _RUNNING:
            self.shutdown(f"task {handle.name!r} (group {handle.group!r}) failed")

    # -- guarded sections ------------------------------------------------------------

    def guarded(self, name: str | None = None, *, shield: bool = False) -> Guarded:
        """A section that shutdown waits for: ``async with``, ``with`` (threads), or a decorator.

        ``shield=True`` protects the block from outside cancellation (anyio and
        trio cancel scopes, e.g. a client disconnect) until the guard's deadline.
        """
        return Guarded(self, name, shield)

    def _refuse_section(self, name: str) -> None:
        if self._state is State.IDLE:
            raise NotStartedError(
                f"guarded({name!r}) before the guard started: enter it with `async with guard:`"
            )
        raise ShuttingDownError(f"guarded({name!r}) refused: the guard is {self._state.value}")

    def _open_section(self, section: Guarded) -> None:
        state = self._state
        if state is not _RUNNING and state is not _DRAINING:
            self._refuse_section(section.name)
        self._sections[section] = None
        self._live += 1

    def _close_section(self, section: Guarded) -> None:
        if self._sections.pop(section, 0) is not None:
            return  # already accounted (abandoned as stuck)
        self._section_counts["cut" if section._cut else "completed"] += 1
        self._live -= 1
        if not self._live and self._wake is not None:
            self._wake.set()

    def _backend_current_task(self) -> object:
        backend = self._backend
        return backend.current_task() if backend is not None else None

    def _open_thread_section(self, section: Guarded) -> None:
        state = self._state
        if state is not _RUNNING and state is not _DRAINING:
            self._refuse_section(section.name)
        with self._thread_lock:
            self._thread_sections[section] = None

    def _close_thread_section(self, section: Guarded) -> None:
        with self._thread_lock:
            known = self._thread_sections.pop(section, 0) is None
            empty = not self._thread_sections
        if not known:
            return
        self._section_counts["completed"] += 1
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

    # -- hooks and resources -----------------------------------------------------

    @overload
    def on_shutdown(
        self,
        fn: F,
        /,
        *,
        stage: Stage = ...,
        timeout: float | None = ...,
        name: str | None = ...,
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
        (default ``hook_timeout``).
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and 0 < timeout < math.inf
        ):
            raise ValueError(
                f"timeout must be a positive finite number of seconds, not {timeout!r}"
            )

        def register(func: F) -> F:
            if not callable(func):
                raise TypeError(f"on_shutdown() takes a function, not {func!r}")
            hook_name = name or getattr(func, "__qualname__", None) or repr(func)
            self._add_hook(Hook(func, stage, timeout or self.config.hook_timeout, hook_name))
            return func

        return register if fn is None else register(fn)

    def _add_hook(self, hook: Hook) -> None:
        if self._shutdown is not None and self._shutdown.stage_done(hook.stage):
            raise ShuttingDownError(
                f"the {hook.stage} hooks already ran; {hook.name!r} would never run"
            )
        self._hooks.append(hook)
        if hook.stage == "after_drain":
            self._check_grace_period()

    def _check_grace_period(self) -> None:
        cfg = self.config
        if cfg.grace_period is None:
            return
        worst = cfg.worst_case([h.timeout for h in self._hooks if h.stage == "after_drain"])
        if worst > cfg.grace_period:
            msg = (
                f"grace_period {cfg.grace_period:g}s is shorter than the worst-case shutdown "
                f"{worst:g}s (exit_wait_timeout + cancel_grace + after_drain hook timeouts)"
            )
            if msg not in self._warnings:
                self._warnings.append(msg)
                logger.warning(msg)

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now and exit it after the drain (last entered first).

        One dedicated task of the guard enters and exits every such context, so
        anyio task groups and cancel scopes work as resources.
        """
        if not hasattr(cm, "__aenter__") or not hasattr(cm, "__aexit__"):
            raise TypeError(f"enter_async_context() takes an async context manager, not {cm!r}")
        if self._state is not _RUNNING and self._state is not _DRAINING:
            self._refuse_section("enter_async_context")
        if self._keeper is None:
            keeper = self._keeper = ResourceKeeper()
            assert self._backend is not None
            self._system_tasks.append(
                self._backend.start_system_task(keeper.run, name="taskguard-resources")
            )
        value = await self._keeper.enter(cm)
        name = f"exit {type(cm).__qualname__}"
        self._add_hook(self._keeper.exit_hook(name, self.config.hook_timeout))
        return value  # type: ignore[no-any-return]

    # -- streams ---------------------------------------------------------------------

    def stream(self, source: Any, **options: Any) -> GuardedStream[Any]:
        """Wrap an async iterable that feeds a streaming response (see GuardedStream)."""
        from ._streams import GuardedStream

        return GuardedStream(self, source, **options)


def _make_coroutine(fn: Any, args: tuple[Any, ...]) -> Coroutine[Any, Any, Any]:
    if asyncio.iscoroutine(fn):
        if args:
            raise TypeError("spawn() got a coroutine object and arguments; pass one or the other")
        return fn
    if not callable(fn):
        raise TypeError(f"spawn() takes an async function or a coroutine object, not {fn!r}")
    coro = fn(*args)
    if not asyncio.iscoroutine(coro):
        raise TypeError(
            f"spawn() takes an async function, but {getattr(fn, '__qualname__', fn)!r} returned "
            f"{type(coro).__name__} (it ran synchronously in the caller). For blocking work, "
            "spawn an async function that calls anyio.to_thread.run_sync()"
        )
    return coro


def _not_started(handle: TaskHandle[Any]) -> None:
    raise NotStartedError("the guard has not started")


def _signame(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
