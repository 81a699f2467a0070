"""TaskGuard lifecycle: the drain, the exit-wait bound, stuck tasks, triggers, intake."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import pytest

from taskguard import (
    GroupConfig,
    NotStartedError,
    ShuttingDownError,
    State,
    TaskGuard,
)

pytestmark = pytest.mark.anyio


async def test_drain_task_finishes_and_shutdown_waits() -> None:
    done: list[str] = []

    async def mail() -> str:
        await anyio.sleep(0.3)
        done.append("mail")
        return "sent"

    async with TaskGuard(exit_wait_timeout=10) as guard:
        handle = guard.spawn(mail, name="welcome-mail")
    assert done == ["mail"]
    assert handle.state == "completed"
    assert await handle.wait() == "sent"
    report = guard.report
    assert report.clean
    assert report.groups["default"].completed == 1
    assert report.trigger == "exit"
    assert guard.state is State.CLOSED


async def test_guarded_block_delays_shutdown() -> None:
    order: list[str] = []
    entered = anyio.Event()

    async def request() -> None:
        async with guard.guarded("audit"):
            entered.set()
            await anyio.sleep(0.3)
            order.append("audit written")

    async with TaskGuard(exit_wait_timeout=10) as guard, anyio.create_task_group() as tg:
        tg.start_soon(request)
        await entered.wait()
        guard.shutdown()
        await guard.wait_closed()
        order.append("closed")
    assert order == ["audit written", "closed"]
    assert guard.report.guarded.completed == 1
    assert guard.report.clean


async def test_exit_wait_cuts_a_long_task() -> None:
    started = time.monotonic()

    async def forever() -> None:
        await anyio.sleep(100)

    async with TaskGuard(exit_wait_timeout=0.5, cancel_grace=2) as guard:
        handle = guard.spawn(forever)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 2 + 1.5
    report = guard.report
    assert handle.state == "cancelled"
    assert report.groups["default"].cut == 1
    assert report.groups["default"].cancelled == 1
    assert not report.clean
    assert not report.stuck
    assert "stopping" in report.phases


async def test_swallowing_task_is_abandoned_and_reported_stuck() -> None:
    # The task swallows cancellation until `release` is set. The guard must
    # give up on it after cancel_grace and name it with its stack. After the
    # assertions the flag lets it end, so the test's own event loop can close
    # (anyio.run / asyncio.run wait for leftover tasks; taskguard.run does not:
    # see test_runner.py for the process-level bound).
    release = [False]

    async def stubborn_swallower() -> None:
        while not release[0]:
            try:
                await anyio.sleep(0.05)
            except anyio.get_cancelled_exc_class():
                pass

    started = time.monotonic()
    try:
        async with TaskGuard(exit_wait_timeout=0.3, cancel_grace=0.3) as guard:
            guard.spawn(stubborn_swallower, group="work")
        elapsed = time.monotonic() - started
        assert elapsed < 0.3 + 0.3 + 1.5
        report = guard.report
        assert not report.clean
        assert [s.name for s in report.stuck] == ["stubborn_swallower"]
        assert report.stuck[0].group == "work"
        assert "stubborn_swallower" in report.stuck[0].stack
        assert report.groups["work"].stuck == 1
        assert "STUCK stubborn_swallower" in report.summary()
    finally:
        release[0] = True
    await anyio.sleep(0.1)


async def test_completion_is_event_driven() -> None:
    # A 0.2 s task with a 30 s exit wait: the drain moves on as soon as it ends.
    async def short() -> None:
        await anyio.sleep(0.2)

    started = time.monotonic()
    async with TaskGuard(exit_wait_timeout=30) as guard:
        for _ in range(5):
            guard.spawn(short)
        async with guard.guarded():
            pass
    assert time.monotonic() - started < 2
    assert guard.report.duration < 2


async def test_progress_is_logged_every_second(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="taskguard")

    async def slow_job() -> None:
        await anyio.sleep(2.3)

    async with TaskGuard(exit_wait_timeout=10) as guard:
        guard.spawn(slow_job, name="slow-job")
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("draining:")]
    assert 1 <= len(progress) <= 3, progress
    assert "1 left" in progress[0]
    assert "slow-job" in progress[0]
    assert "to the deadline" in progress[0]
    assert guard.report.clean


async def test_wait_for_shutdown_returns_on_shutdown() -> None:
    async with TaskGuard() as guard, anyio.create_task_group() as tg:
        returned = anyio.Event()

        async def waiter() -> None:
            await guard.wait_for_shutdown()
            returned.set()

        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        assert not returned.is_set()
        assert guard.ready
        guard.shutdown(reason="deploy")
        with anyio.fail_after(2):
            await returned.wait()
        assert not guard.ready
    assert guard.report.trigger == "deploy"


async def test_shutdown_from_another_thread() -> None:
    async with TaskGuard() as guard:
        thread = threading.Thread(target=guard.shutdown, kwargs={"reason": "from a thread"})
        thread.start()
        with anyio.fail_after(5):
            await guard.wait_for_shutdown()
        thread.join()
    assert guard.report.trigger == "from a thread"


async def test_shutdown_is_idempotent_and_first_reason_wins() -> None:
    async with TaskGuard() as guard:
        guard.shutdown(reason="first")
        guard.shutdown(reason="second")
    assert guard.report.trigger == "first"
    guard.shutdown(reason="after close")  # a no-op, not an error


async def test_force_cancels_what_is_left_at_once() -> None:
    async def long_drain() -> None:
        await anyio.sleep(60)

    started = time.monotonic()
    async with TaskGuard(exit_wait_timeout=30) as guard:
        handle = guard.spawn(long_drain)
        guard.shutdown()
        await anyio.sleep(0.2)
        assert guard.state is State.DRAINING
        guard.shutdown(force=True)
    assert time.monotonic() - started < 3
    assert handle.state == "cancelled"
    assert guard.report.forced
    assert guard.report.groups["default"].cut == 1
    assert not guard.report.clean


async def test_drain_delay_keeps_intake_while_not_ready() -> None:
    seen: list[tuple[bool, str]] = []

    async def late() -> None:
        await anyio.sleep(0.05)

    started = time.monotonic()
    async with TaskGuard(exit_wait_timeout=10, drain_delay=0.4) as guard:
        guard.shutdown()
        await anyio.sleep(0.1)
        seen.append((guard.ready, guard.state.value))
        assert 9 < guard.remaining() < 10  # the exit wait counts from the trigger
        handle = guard.spawn(late)  # intake continues during the drain delay
    assert seen == [(False, "draining")]
    assert handle.state == "completed"
    assert time.monotonic() - started >= 0.35
    assert guard.report.phases["drain_delay"] >= 0.35


async def test_body_exception_is_reraised_after_shutdown() -> None:
    done: list[str] = []

    async def work() -> None:
        await anyio.sleep(0.1)
        done.append("work")

    guard = TaskGuard()

    async def body() -> None:
        async with guard:
            guard.spawn(work)
            raise ZeroDivisionError("in the body")

    with pytest.raises(ZeroDivisionError):
        await body()
    assert done == ["work"]
    assert guard.report.trigger.startswith("exception: ZeroDivisionError")


async def test_refused_spawns_raise_and_are_counted() -> None:
    async def job() -> None:
        await anyio.sleep(0.3)

    guard = TaskGuard(groups={"metrics": GroupConfig(on_shutdown="cancel")})
    with pytest.raises(NotStartedError, match="async with guard"):
        guard.spawn(job)
    coro = job()
    with pytest.raises(NotStartedError):
        guard.spawn(coro)  # closed by spawn: no "never awaited" warning
    with pytest.raises(NotStartedError):
        async with guard.guarded():
            pass
    async with guard:
        guard.spawn(job)
        guard.shutdown()
        assert guard.state is State.DRAINING
        accepted = guard.spawn(job)  # a drain group still takes follow-up work
        with pytest.raises(ShuttingDownError, match="cancel group"):
            guard.spawn(job, group="metrics")
        with pytest.raises(ShuttingDownError):
            guard.spawn(job(), group="metrics")
        async with guard.guarded("late section"):  # allowed while draining
            pass
        while guard.state.value == "draining":  # .value: mypy narrowed .state at the assert
            await anyio.sleep(0.01)
        with pytest.raises(ShuttingDownError):
            guard.spawn(job)
    with pytest.raises(ShuttingDownError):
        guard.spawn(job)
    with pytest.raises(ShuttingDownError):
        async with guard.guarded():
            pass
    report = guard.report
    assert accepted.state == "completed"
    assert report.groups["metrics"].refused == 2
    assert report.groups["default"].refused == 2  # before start
    assert report.groups["default"].completed == 2


async def test_a_guard_runs_again_after_it_closed() -> None:
    """A second ASGI lifespan (a test client used twice) runs the same guard again:
    per-run state is fresh, hooks registered before the first start stay."""
    guard = TaskGuard()
    ran: list[str] = []
    guard.on_shutdown(lambda: ran.append("static"), name="static")

    async def job() -> str:
        return "done"

    async with guard:
        guard.spawn(job)
        guard.on_shutdown(lambda: ran.append("run 1 only"), name="per-run")
        with pytest.raises(RuntimeError, match="already running"):
            async with guard:
                pass
    first = guard.report
    assert first.groups["default"].completed == 1
    async with guard:
        assert guard.state is State.RUNNING
        with pytest.raises(RuntimeError, match="closes"):
            _ = guard.report
    second = guard.report
    assert second is not first
    assert second.groups["default"].completed == 0
    assert ran == ["run 1 only", "static", "static"]
    assert [h.name for h in second.hooks] == ["static"]


async def test_spawn_from_a_worker_thread() -> None:
    results: list[Any] = []

    async def job() -> str:
        return "ran"

    def in_thread() -> None:
        try:
            guard.spawn(job)
        except RuntimeError as exc:
            results.append(str(exc))
        handle = anyio.from_thread.run_sync(guard.spawn, job)
        results.append(handle)

    async with TaskGuard() as guard:
        await anyio.to_thread.run_sync(in_thread)
        handle = results[1]
        assert await handle.wait() == "ran"
    assert "worker thread" in results[0]
    assert "anyio.from_thread.run_sync" in results[0]
    assert guard.report.groups["default"].completed == 1


async def test_spawn_takes_a_coroutine_and_rejects_sync_functions() -> None:
    async def job(x: int) -> int:
        return x * 2

    def not_async() -> int:
        return 1

    async with TaskGuard() as guard:
        assert await guard.spawn(job(4)).wait() == 8
        assert await guard.spawn(job, 5).wait() == 10
        with pytest.raises(TypeError, match="async function"):
            guard.spawn(not_async)  # type: ignore[call-arg, arg-type]
        coro = job(1)
        with pytest.raises(TypeError, match="one or the other"):
            guard.spawn(coro, 1)  # type: ignore[call-overload]
        coro.close()


async def test_stats_snapshot() -> None:
    gate = anyio.Event()

    async def job() -> None:
        await gate.wait()

    config = {"groups": {"mail": GroupConfig(limit=1)}}
    async with TaskGuard(config) as guard:
        guard.spawn(job, group="mail")
        guard.spawn(job, group="mail")
        guard.spawn(job)
        async with guard.guarded():
            stats = guard.stats()
        gate.set()
    assert stats.state is State.RUNNING
    assert stats.ready
    assert stats.groups["mail"].running == 1
    assert stats.groups["mail"].pending == 1
    assert stats.groups["mail"].limit == 1
    assert stats.running == 2
    assert stats.pending == 1
    assert stats.guarded == 1
    assert stats.model_dump()["running"] == 2


async def test_bounded_even_with_a_hanging_hook_and_stuck_work() -> None:
    release = [False]

    async def swallower() -> None:
        while not release[0]:
            try:
                await anyio.sleep(0.05)
            except anyio.get_cancelled_exc_class():
                pass

    async def hanging_hook() -> None:
        await anyio.sleep(100)

    started = time.monotonic()
    try:
        async with TaskGuard(exit_wait_timeout=0.3, cancel_grace=0.2, hook_timeout=0.3) as guard:
            guard.spawn(swallower)
            guard.on_shutdown(hanging_hook)
        assert time.monotonic() - started < 0.3 + 0.2 + 0.3 + 2
        assert [h.outcome for h in guard.report.hooks] == ["timeout"]
    finally:
        release[0] = True
    await anyio.sleep(0.1)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_signal_handling_outside_the_main_thread_is_a_clear_error(backend: str) -> None:
    errors: list[BaseException] = []

    async def body() -> None:
        async with TaskGuard(handle_signals=True):
            pass

    def in_thread() -> None:
        try:
            anyio.run(body, backend=backend)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "handle_signals=False" in str(errors[0])


async def test_exit_signals_in_process_first_drains_second_forces() -> None:
    import os
    import signal

    async def long_job() -> None:
        await anyio.sleep(60)

    async with TaskGuard(handle_signals=True, exit_signals=["USR1"], exit_wait_timeout=30) as guard:
        handle = guard.spawn(long_job)
        os.kill(os.getpid(), signal.SIGUSR1)
        with anyio.fail_after(5):
            await guard.wait_for_shutdown()
        assert guard.state is State.DRAINING
        await anyio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGUSR1)
        with anyio.fail_after(5):
            await guard.wait_closed()
    assert guard.report.trigger == "signal SIGUSR1"
    assert guard.report.forced
    assert handle.state == "cancelled"
    # the handlers are gone once the guard closed
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)


async def test_wait_for_intake_stop_returns_after_the_drain_delay() -> None:
    guard = TaskGuard(drain_delay=0.3, exit_wait_timeout=5)
    order: list[str] = []
    guard.on_shutdown(lambda: order.append("before_drain hook"), stage="before_drain")
    with pytest.raises(NotStartedError):
        await guard.wait_for_intake_stop()
    async with guard:

        async def server() -> None:
            await guard.wait_for_intake_stop()
            order.append(f"intake stops, ready={guard.ready}")

        guard.spawn(server)
        start = anyio.current_time()
        guard.shutdown()
        await guard.wait_for_shutdown()
        order.append("triggered")
        await guard.wait_for_intake_stop()
        waited = anyio.current_time() - start
    assert waited >= 0.3
    assert order[0] == "triggered"
    assert sorted(order[1:]) == ["before_drain hook", "intake stops, ready=False"]


async def test_handling_signals_wakes_the_loop_through_a_wakeup_fd_given_back_at_close(
    anyio_backend_name: str,
) -> None:
    """With ``handle_signals=True`` on asyncio the guard sets a wake-up fd (a signal
    the kernel hands to another thread must still wake the idle loop: see
    tests/test_signals_process.py); the one that was there is back after close."""
    import signal

    def current() -> int:
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd)
        return fd

    before = current()
    async with TaskGuard(handle_signals=True):
        during = current()
    assert current() == before
    if anyio_backend_name == "asyncio":
        assert during not in (-1, before)
    else:  # trio's own is there already
        assert during == before
