"""``taskguard.run``: an async main with exit signals, graceful shutdown and a hard deadline."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from ._config import GuardConfig
from ._exceptions import ShuttingDownError
from ._report import ShutdownReport

if TYPE_CHECKING:
    from ._guard import TaskGuard

__all__ = ["EXIT_HARD", "hard_exit", "run"]

logger = logging.getLogger("taskguard")

#: exit status when the hard deadline ends the process
EXIT_HARD = 3
#: slack on top of the worst case before the hard deadline fires
HARD_DEADLINE_SLACK = 2.0


def run(
    main: Callable[..., Awaitable[object]],
    *args: Any,
    config: GuardConfig | Mapping[str, Any] | None = None,
    backend: Literal["asyncio", "trio"] = "asyncio",
    **overrides: Any,
) -> ShutdownReport:
    """Run ``await main(guard, *args)`` inside a guard and shut down gracefully.

    Exit signals (SIGINT, SIGTERM by default) are handled from before ``main``
    is called: the first starts the shutdown, the second forces it, the third
    ends the process at once. ``main`` is awaited as a guarded section named
    ``"main"``, so it should return when ``await guard.wait_for_shutdown()``
    returns (or when a ``before_drain`` hook closed its server). Returns the
    report (also logged); an exception from ``main`` is re-raised after the
    shutdown. A hard deadline (exit wait + cancel grace + after-drain hook
    timeouts + 2 s) ends the process with status 3 if the shutdown overruns,
    e.g. because a task ignores cancellation on trio.
    """
    from ._guard import TaskGuard

    if not callable(main):
        raise TypeError(f"run() takes an async function main(guard), not {main!r}")
    if backend not in ("asyncio", "trio"):
        raise ValueError(f"backend must be 'asyncio' or 'trio', not {backend!r}")
    # Signals are handled unless the caller said otherwise (in config or overrides).
    if isinstance(config, GuardConfig):
        explicit = "handle_signals" in config.model_fields_set
    else:
        explicit = config is not None and "handle_signals" in config
    if not explicit:
        overrides.setdefault("handle_signals", True)
    guard = TaskGuard(config, **overrides)
    watchdog = _Watchdog()
    guard._trigger_callbacks.append(watchdog.start)

    async def entry() -> None:
        async with guard:
            try:
                async with guard.guarded("main"):
                    await main(guard, *args)
            except ShuttingDownError:
                if guard.state.value not in ("stopping", "closed"):
                    raise
                # main was cut at the deadline: the report says so

    try:
        if backend == "trio":
            import trio

            trio.run(entry)
        else:
            _run_asyncio(entry, guard)
    finally:
        report = guard._report
        if report is not None and report.guarded.stuck:
            # A worker thread is still inside a guarded section: the interpreter
            # would wait for it at exit. The hard deadline stays armed.
            logger.error("a worker thread is stuck in a guarded section; the hard deadline stays")
        else:
            watchdog.cancel()
    return guard.report


def _run_asyncio(entry: Callable[[], Awaitable[None]], guard: TaskGuard) -> None:
    # Not asyncio.run(): at its end it cancels the leftover tasks and waits for
    # them without a bound, so one task that swallows cancellation would hang
    # the process after the guard already gave up on it.
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(entry())
    finally:
        try:
            _finish_loop(loop, guard.config.cancel_grace)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _finish_loop(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.wait(leftovers, timeout=max(grace, 0.1)))
        still = [t for t in leftovers if not t.done()]
        if still:
            logger.error("%d task(s) ignored cancellation at exit; leaving them", len(still))
            _LEFT_BEHIND.extend(still)
    for task in leftovers:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("task %r failed at exit", task.get_name(), exc_info=task.exception())
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 1.0))
    except (asyncio.TimeoutError, RuntimeError):
        logger.error("async generators did not close within 1s at exit")
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), max(grace, 0.1)))
    except (asyncio.TimeoutError, RuntimeError):
        logger.error("worker threads still running at exit; the process may wait for them")


# Strong references to tasks left running at exit: never collected mid-flight.
_LEFT_BEHIND: list[asyncio.Task[Any]] = []


class _Watchdog:
    """A timer thread started at the shutdown trigger: the process's hard deadline.

    The deadline is exit wait + cancel grace + the after-drain hooks' timeouts
    + slack, counted from the trigger; hooks registered after the trigger
    extend it (it is recomputed when the timer fires).
    """

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        self._started = 0.0

    @staticmethod
    def _budget(guard: TaskGuard) -> float:
        after = [h.timeout for h in list(guard._hooks) if h.stage == "after_drain"]
        return guard.config.worst_case(after) + HARD_DEADLINE_SLACK

    def start(self, guard: TaskGuard) -> None:
        self._started = time.monotonic()
        self._arm(guard, self._budget(guard))

    def _arm(self, guard: TaskGuard, seconds: float) -> None:
        with self._lock:
            if self._cancelled:
                return
            timer = self._timer = threading.Timer(seconds, self._fire, (guard,))
            timer.daemon = True
            timer.start()

    def _fire(self, guard: TaskGuard) -> None:
        budget = self._budget(guard)
        left = self._started + budget - time.monotonic()
        if left > 0.05:  # hooks were registered after the trigger: their time is due too
            self._arm(guard, left)
            return
        hard_exit(guard, f"hard deadline of {budget:g}s", EXIT_HARD)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._timer is not None:
                self._timer.cancel()


def hard_exit(guard: TaskGuard, why: str, status: int) -> None:
    """End the process now, after logging what is still running, with its stacks."""
    try:
        lines = [f"taskguard: {why}: exiting now with status {status}"]
        shutdown = guard._shutdown
        if shutdown is not None:
            for name, where, age in shutdown._outstanding():
                lines.append(f"  still running: {name} ({where}) for {age:.1f}s")
            for item in shutdown.stuck:
                lines.append(f"  stuck: {item.name} ({item.group}) for {item.age:.1f}s")
                lines.extend("    " + ln for ln in item.stack.rstrip().splitlines())
        logger.critical("\n".join(lines))
        for handler in logging.getLogger().handlers + logger.handlers:
            try:
                handler.flush()
            except Exception:
                pass
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(status)
