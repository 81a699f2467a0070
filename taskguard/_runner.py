"""``taskguard.run``: an async main with exit signals, graceful shutdown and a hard deadline."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._backends import BackendName, describe_thread
from ._backends import run as run_on
from ._config import GuardConfig, GuardOptions
from ._exceptions import ShuttingDownError
from ._report import ShutdownReport, State
from ._shutdown import record_fault
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["run"]

logger = logging.getLogger("taskguard")


def run(
    main: Callable[..., Awaitable[object]],
    *args: Any,
    config: GuardConfig | Mapping[str, Any] | None = None,
    backend: BackendName = "asyncio",
    **overrides: Unpack[GuardOptions],
) -> ShutdownReport:
    """Run ``await main(guard, *args)`` inside a guard and shut down gracefully.

    Exit signals (SIGINT, SIGTERM by default) are handled from before ``main``
    is called: the first starts the shutdown, the second forces it, the third
    ends the process at once (even while the event loop is blocked). ``main``
    is awaited as a guarded section named ``"main"``, so it should return when
    ``await guard.wait_for_shutdown()`` returns (or when a ``before_drain``
    hook closed its server). Returns the report (also logged); an exception
    from ``main`` is re-raised after the shutdown.

    A hard deadline, armed at the trigger and never moved, ends the process
    with status 3 if the shutdown overruns its budget: exit wait + cancel
    grace + the worst case of every hook + 2 s (e.g. a task that ignores
    cancellation on trio, a sync hook that never returns). It stays armed after
    ``run`` returns only while something the guard gave up on could keep the
    process alive: a worker thread stuck in a guarded section, or a worker
    thread started during the run (``anyio.to_thread``) still running cut work.
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
    threads_before = set(threading.enumerate())

    def left() -> list[str]:
        lines = guard._left()
        for thread in _new_threads(threads_before):
            lines.append("  worker thread still running: " + describe_thread(thread))
        return lines

    try:
        watchdog: Watchdog | None = Watchdog(guard._hooks.budget, left)
    except Exception as exc:  # e.g. "can't start new thread": run on, and say it
        watchdog = None
        record_fault(guard._errors, "starting the hard deadline (none holds this run)", exc)
    guard._watchdog = watchdog

    async def entry() -> None:
        async with guard:
            try:
                async with guard.guarded("main"):
                    await main(guard, *args)
            except ShuttingDownError:
                if guard.state not in (State.STOPPING, State.CLOSED):
                    raise
                # main was cut at the deadline: the report says so

    try:
        run_on(backend, entry, guard.config.cancel_grace)
    finally:
        guard._watchdog = None
        if watchdog is not None:
            _settle(watchdog, guard, _new_threads(threads_before))
    return guard.report


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Non-daemon threads started during the run and still alive: the interpreter
    waits for them at exit."""
    return [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]


def _settle(watchdog: Watchdog, guard: Any, threads: list[threading.Thread]) -> None:
    """Disarm the hard deadline, unless what the guard gave up on may keep the
    process alive past its budget: then it stays armed, and the log says why."""
    shutdown = guard._shutdown
    report = None if shutdown is None else shutdown.report
    stuck_threads = report is not None and any(s.group == "(guarded, thread)" for s in report.stuck)
    cut_work_in_threads = report is not None and not report.clean and threads
    if watchdog.armed and (stuck_threads or cut_work_in_threads):
        names = ", ".join(t.name for t in threads) or "a guarded section's thread"
        logger.error(
            "worker thread(s) still running after the shutdown (%s): the process ends at "
            "the hard deadline (%gs after the trigger) if they do not end before",
            names,
            watchdog.budget,
        )
        return
    watchdog.stop()
