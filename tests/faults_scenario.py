"""The application the fault-injection tests (tests/test_faults.py) shut down.

One application with a bit of everything: a drain task, a failing task (for
the error_handler), a before_drain and an after_drain hook, a resource, and a
stream consumed by a background task. :class:`Faults` says which step fails
(raises or hangs) once; :func:`run_scenario` runs it and returns what
happened; :func:`check_survived` checks that the rest of the sequence ran.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from helpers_reliability import Release, forget_dead_guard

from taskguard import GroupConfig, ShutdownReport, TaskGuard

BACKENDS = ["asyncio", "trio"]
EXIT_WAIT = 1.0
CANCEL_GRACE = 0.3
HOOK_TIMEOUT = 0.5
SLACK = 3.0
#: the worst case of the scenario: exit wait + grace + two after_drain steps (+ grace)
BUDGET = EXIT_WAIT + CANCEL_GRACE + 2 * (HOOK_TIMEOUT + 0.5)

ERRORS_FIELD = (
    "finding 1 / design: the report has no `errors` field yet (bookkeeping errors of the "
    "sequence, `clean` False when not empty)"
)

T = TypeVar("T")


class Injected(Exception):
    """The fault a test injects."""


# -- the scenario ----------------------------------------------------------------------------


@dataclass
class Seen:
    """What the scenario's parts did, for the checks."""

    steps: list[str] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)


@dataclass
class Faults:
    """Which step fails, and how (each at most once)."""

    before_drain: str | None = None  # "raise" / "hang"
    after_drain: str | None = None
    resource_exit: str | None = None
    error_handler: str | None = None  # "raise" / "block"
    source_aclose: str | None = None  # "raise" / "hang"
    release: Release = field(default_factory=Release)


class _Source:
    """An async iterator over three items whose ``aclose`` may raise or hang once."""

    def __init__(self, seen: Seen, faults: Faults) -> None:
        self.seen = seen
        self.faults = faults
        self.n = 0

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> int:
        if self.n >= 3:
            raise StopAsyncIteration
        self.n += 1
        await anyio.sleep(0.01)
        return self.n

    async def aclose(self) -> None:
        self.seen.steps.append("source closed")
        if self.faults.source_aclose == "raise":
            raise Injected("aclose failed")
        if self.faults.source_aclose == "hang":
            await self.faults.release.swallow_cancellation()


def make_guard(seen: Seen, faults: Faults, **config: Any) -> TaskGuard:
    def error_handler(exc: BaseException, handle: Any) -> None:
        seen.handled.append(handle.name)
        if faults.error_handler == "raise":
            raise Injected("the error handler failed")
        if faults.error_handler == "block":
            time.sleep(1.0)  # blocks the event loop, the supervisor's included

    return TaskGuard(
        exit_wait_timeout=EXIT_WAIT,
        cancel_grace=CANCEL_GRACE,
        hook_timeout=HOOK_TIMEOUT,
        error_handler=error_handler,
        groups={"streams": GroupConfig(on_shutdown="drain")},
        **config,
    )


async def scenario(guard: TaskGuard, seen: Seen, faults: Faults) -> None:
    """Register and start everything; the caller's ``async with guard`` ends it."""

    async def drain_work() -> None:
        await anyio.sleep(0.2)
        seen.steps.append("drained")

    async def fails() -> None:
        raise ValueError("a background failure")

    async def before() -> None:
        seen.steps.append("before_drain")
        if faults.before_drain == "raise":
            raise Injected("before_drain failed")
        if faults.before_drain == "hang":
            await anyio.sleep_forever()

    async def after() -> None:
        seen.steps.append("after_drain")
        if faults.after_drain == "raise":
            raise Injected("after_drain failed")
        if faults.after_drain == "hang":
            await anyio.sleep_forever()

    @asynccontextmanager
    async def resource() -> AsyncIterator[None]:
        seen.steps.append("resource entered")
        try:
            yield
        finally:
            seen.steps.append("resource exited")
            if faults.resource_exit == "raise":
                raise Injected("__aexit__ failed")
            if faults.resource_exit == "hang":
                await anyio.sleep_forever()

    async def consume() -> None:
        async for _ in guard.stream(_Source(seen, faults), name="feed"):
            pass
        seen.steps.append("stream consumed")

    await guard.enter_async_context(resource())
    guard.on_shutdown(before, stage="before_drain")
    guard.on_shutdown(after)
    guard.spawn(drain_work, name="drain_work")
    guard.spawn(fails, name="fails")
    guard.spawn(consume, name="consumer", group="streams")
    await anyio.sleep(0.1)  # the failure is handled, the stream is consumed


EXPECTED_STEPS = {
    "drained",
    "before_drain",
    "after_drain",
    "resource entered",
    "resource exited",
    "source closed",
    "stream consumed",
}


def run_scenario(
    backend: str, faults: Faults, **config: Any
) -> tuple[Seen, ShutdownReport | None, float, BaseException | None]:
    """Run the scenario; (what happened, the report, seconds to close, what escaped)."""
    seen = Seen()
    guard = make_guard(seen, faults, **config)
    took: list[float] = []
    escaped: list[BaseException] = []

    async def main() -> None:
        try:
            async with guard:
                await scenario(guard, seen, faults)
                took.append(time.monotonic())
        except Exception as exc:  # the promise: nothing escapes `async with guard`
            escaped.append(exc)
        took[0] = time.monotonic() - took[0]
        # what hangs on purpose may end now (trio.run waits for abandoned tasks)
        faults.release.set()

    try:
        anyio.run(main, backend=backend)
    except BaseException as exc:  # e.g. TrioInternalError: a dead supervisor
        # kept as text: some such tracebacks make pytest's reporting itself crash
        escaped.append(AssertionError(f"anyio.run raised {type(exc).__name__}: {exc}"))
        took.append(math.inf)
    finally:
        faults.release.set()
        forget_dead_guard(guard)  # a dead supervisor must not poison later tests
        # Finalize what a broken run left behind here, not during pytest's failure
        # report: a finalizer that runs inside its source parsing made CPython 3.11
        # raise "AST constructor recursion depth mismatch" (an INTERNALERROR).
        gc.collect()
    report = guard.report if guard.state.value == "closed" and has_report(guard) else None
    return seen, report, took[0], escaped[0] if escaped else None


def has_report(guard: TaskGuard) -> bool:
    try:
        guard.report  # noqa: B018
    except RuntimeError:
        return False
    return True


def check_survived(
    seen: Seen,
    report: ShutdownReport | None,
    took: float,
    escaped: BaseException | None,
    *,
    expect_steps: set[str] = EXPECTED_STEPS,
    extra: float = 0.0,
) -> ShutdownReport:
    """The rest of the sequence ran, the guard closed in time, the report exists."""
    assert escaped is None, f"escaped `async with guard`: {escaped!r}"
    assert took < BUDGET + extra + SLACK, took
    assert expect_steps <= set(seen.steps), sorted(expect_steps - set(seen.steps))
    assert seen.handled == ["fails"]
    assert report is not None, "the guard closed without a report"
    assert report.groups["default"].completed == 1  # drain_work
    assert report.groups["default"].failed == 1  # fails
    return report


def fail_once(real: Callable[..., T], message: str) -> Callable[..., T]:
    """``real``, except that its first call raises Injected(message)."""
    calls = 0

    def once_failing(*args: Any, **kwargs: Any) -> T:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Injected(message)
        return real(*args, **kwargs)

    return once_failing


def errors_of(report: ShutdownReport) -> list[str]:
    errors = getattr(report, "errors", None)
    assert errors is not None, ERRORS_FIELD
    return list(errors)
