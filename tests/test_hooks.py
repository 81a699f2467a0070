"""Shutdown hooks (stages, LIFO, failures, timeouts) and resources (enter_async_context)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from taskguard import ShuttingDownError, TaskGuard

pytestmark = pytest.mark.anyio


async def test_hooks_run_in_stage_order_and_lifo_within_a_stage() -> None:
    calls: list[str] = []

    async def work() -> None:
        await anyio.sleep(0.1)
        calls.append("drained")

    async with TaskGuard() as guard:
        guard.spawn(work)
        guard.on_shutdown(lambda: calls.append("after-1"))
        guard.on_shutdown(lambda: calls.append("before-1"), stage="before_drain")

        @guard.on_shutdown(stage="after_drain")
        async def after_2() -> None:
            calls.append("after-2")

        @guard.on_shutdown(stage="before_drain", name="stop-intake")
        def before_2() -> None:
            calls.append("before-2")

    assert calls == ["before-2", "before-1", "drained", "after-2", "after-1"]
    hooks = guard.report.hooks
    assert [h.stage for h in hooks] == ["before_drain"] * 2 + ["after_drain"] * 2
    assert hooks[0].name == "stop-intake"
    assert hooks[2].name == "after_2"  # the function's name unless given
    assert all(h.outcome == "ok" for h in hooks)
    assert guard.report.clean


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_raising_hook_does_not_stop_the_others(
    exc_type: type[BaseException], kind: str
) -> None:
    calls: list[str] = []

    def sync_bad() -> None:
        raise exc_type("hook broke")

    async def async_bad() -> None:
        await anyio.sleep(0)
        raise exc_type("hook broke")

    async with TaskGuard() as guard:
        guard.on_shutdown(lambda: calls.append("first registered"))
        guard.on_shutdown(sync_bad if kind == "sync" else async_bad, name="bad")
        guard.on_shutdown(lambda: calls.append("last registered"))
    assert calls == ["last registered", "first registered"]
    bad = guard.report.hooks[1]
    assert bad.name == "bad"
    assert bad.outcome == "error"
    assert bad.error is not None
    assert exc_type.__name__ in bad.error
    assert not guard.report.clean


async def test_a_hanging_async_hook_times_out_and_the_others_run() -> None:
    calls: list[str] = []

    async def hangs() -> None:
        await anyio.sleep(100)

    started = time.monotonic()
    async with TaskGuard(hook_timeout=5) as guard:
        guard.on_shutdown(lambda: calls.append("other"))
        guard.on_shutdown(hangs, timeout=0.2)
    assert time.monotonic() - started < 2
    assert calls == ["other"]
    hang = guard.report.hooks[0]
    assert hang.outcome == "timeout"
    assert 0.15 < hang.duration < 1.5
    assert not guard.report.clean


async def test_a_hook_that_ignores_its_cancellation_is_abandoned() -> None:
    release = [False]

    async def deaf_hook() -> None:
        while not release[0]:
            try:
                await anyio.sleep(0.02)
            except anyio.get_cancelled_exc_class():
                pass

    started = time.monotonic()
    try:
        async with TaskGuard() as guard:
            guard.on_shutdown(deaf_hook, timeout=0.2)
        assert time.monotonic() - started < 2
        report = guard.report.hooks[0]
        assert report.outcome == "timeout"
        assert report.error is not None
        assert "abandoned" in report.error
    finally:
        release[0] = True
    await anyio.sleep(0.05)


async def test_sync_hook_overrun_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    def slow_sync() -> None:
        time.sleep(0.3)  # sync hooks run inline and cannot be interrupted

    async with TaskGuard() as guard:
        guard.on_shutdown(slow_sync, timeout=0.1)
    hook = guard.report.hooks[0]
    assert hook.outcome == "timeout"
    assert hook.error is not None
    assert "over its 0.1s" in hook.error
    assert "slow_sync" in caplog.text


async def test_before_drain_hooks_count_against_the_exit_wait() -> None:
    async def slow_before() -> None:
        await anyio.sleep(10)

    started = time.monotonic()
    async with TaskGuard(exit_wait_timeout=0.3, hook_timeout=10) as guard:
        guard.on_shutdown(slow_before, stage="before_drain")
    assert time.monotonic() - started < 2
    assert guard.report.hooks[0].outcome == "timeout"


async def test_hook_registration_errors() -> None:
    async with TaskGuard() as guard:
        with pytest.raises(ValueError, match="stage"):
            guard.on_shutdown(lambda: None, stage="later")  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="timeout"):
            guard.on_shutdown(lambda: None, timeout=-1)
        with pytest.raises(TypeError):
            guard.on_shutdown(42)  # type: ignore[call-overload]
    with pytest.raises(ShuttingDownError, match="already ran"):
        guard.on_shutdown(lambda: None)


async def test_grace_period_warning_at_hook_registration(caplog: pytest.LogCaptureFixture) -> None:
    # config time: 10 + 5 + one 10 s hook (+ 0.5 s abandon grace) = 25.5 <= 30;
    # a second hook makes it 36
    async with TaskGuard(exit_wait_timeout=10, grace_period=30) as guard:
        guard.on_shutdown(lambda: None)
        assert not [r for r in caplog.records if "grace_period" in r.getMessage()]
        guard.on_shutdown(lambda: None)
        assert any("grace_period" in r.getMessage() for r in caplog.records)
    warnings = guard.report.warnings
    assert len(warnings) == 1
    assert "grace_period 30s" in warnings[0]
    assert "36s" in warnings[0]
    assert "grace_period" in guard.report.summary()


class Pool:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.open = False

    async def __aenter__(self) -> Pool:
        self.open = True
        self.log.append("pool opened")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.sleep(0)
        self.open = False
        self.log.append("pool closed")


async def test_resource_closed_only_after_the_last_drain_task_used_it() -> None:
    log: list[str] = []

    async def uses_pool(pool: Pool) -> None:
        await anyio.sleep(0.3)
        assert pool.open
        log.append("last use")

    @asynccontextmanager
    async def client() -> AsyncIterator[str]:
        log.append("client opened")
        try:
            yield "client"
        finally:
            log.append("client closed")

    async with TaskGuard() as guard:
        pool = await guard.enter_async_context(Pool(log))
        assert await guard.enter_async_context(client()) == "client"
        guard.spawn(uses_pool, pool)
        guard.on_shutdown(lambda: log.append("after hook"))
    assert log == [
        "pool opened",
        "client opened",
        "last use",
        "after hook",
        "client closed",
        "pool closed",
    ]
    assert [h.name for h in guard.report.hooks] == [
        "<lambda>",
        "exit client",
        "exit Pool",
    ]
    assert guard.report.clean


async def test_anyio_task_group_as_a_resource() -> None:
    ticks: list[int] = []

    async def ticker() -> None:
        i = 0
        while True:
            ticks.append(i)
            i += 1
            await anyio.sleep(0.02)

    async with TaskGuard() as guard:
        tg = await guard.enter_async_context(anyio.create_task_group())
        tg.start_soon(ticker)  # lives until the guard exits the task group
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert ticks
    assert guard.report.hooks[0].outcome == "ok"
    assert guard.report.clean


async def test_resource_exit_is_bounded_by_hook_timeout() -> None:
    async def forever() -> None:
        await anyio.sleep(100)

    started = time.monotonic()
    async with TaskGuard(hook_timeout=0.3) as guard:
        tg = await guard.enter_async_context(anyio.create_task_group())
        tg.start_soon(forever)  # the task group's exit would wait for it forever
    assert time.monotonic() - started < 2
    hook = guard.report.hooks[0]
    assert hook.outcome == "error"
    assert hook.error is not None
    assert "timeout" in hook.error
    assert not guard.report.clean


async def test_a_failing_enter_registers_no_exit() -> None:
    class Broken:
        async def __aenter__(self) -> None:
            raise ConnectionError("db down")

        async def __aexit__(self, *exc: object) -> None:
            raise AssertionError("never entered, never exited")

    async with TaskGuard() as guard:
        with pytest.raises(ConnectionError):
            await guard.enter_async_context(Broken())
        with pytest.raises(TypeError):
            await guard.enter_async_context(object())  # type: ignore[arg-type]
    assert guard.report.hooks == []


async def test_hook_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="taskguard")

    def bad() -> None:
        raise OSError("flush failed")

    async with TaskGuard() as guard:
        guard.on_shutdown(bad)
    assert "shutdown hook bad (after_drain) failed" in caplog.text
    assert "NOT CLEAN" in caplog.text


async def test_a_non_str_hook_name_is_refused_at_the_call() -> None:
    # Finding 1: a name the report cannot hold killed the supervisor later.
    guard = TaskGuard()
    for bad in (123, b"bytes", ["x"]):
        with pytest.raises(TypeError, match="name"):
            guard.on_shutdown(lambda: None, name=bad)  # type: ignore[call-overload]


async def test_boolean_and_huge_hook_timeouts_are_refused() -> None:
    # Finding 13: on_shutdown(timeout=True) was taken as 1 s.
    guard = TaskGuard()
    # 10**5000: an int too long for str() (Python's digit limit) still gets our message
    for bad in (True, False, 1e13, float("nan"), -1, 0, "5", 10**400, 10**5000):
        with pytest.raises((TypeError, ValueError), match="timeout"):
            guard.on_shutdown(lambda: None, timeout=bad)  # type: ignore[arg-type]


async def test_the_supervisor_survives_its_own_bookkeeping_errors(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Finding 1, second half: a fault in the sequence's own bookkeeping (here:
    # formatting the summary) is logged, marks the report not clean, and the
    # rest of the sequence still runs.
    from taskguard import ShutdownReport

    def broken_summary(self: ShutdownReport) -> str:
        raise RuntimeError("summary broke")

    monkeypatch.setattr(ShutdownReport, "summary", broken_summary)
    guard = TaskGuard(exit_wait_timeout=5)
    ran: list[str] = []

    async def work() -> None:
        await anyio.sleep(0.2)
        ran.append("work")

    async with guard:
        guard.spawn(work)
        guard.on_shutdown(lambda: ran.append("after_drain"))
    report = guard.report
    assert ran == ["work", "after_drain"]
    assert not report.clean
    assert any("summary broke" in error for error in report.errors)
    assert "summary broke" in caplog.text
