"""Groups: cancel vs drain policies, limits, per-group timeouts, failures."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest

from taskguard import GroupConfig, GroupFullError, TaskGuard, TaskHandle

pytestmark = pytest.mark.anyio


async def test_cancel_groups_are_cancelled_at_once_and_drain_groups_awaited() -> None:
    events: list[str] = []

    async def metric() -> None:
        try:
            await anyio.sleep(60)
        finally:
            events.append("metric cancelled")

    async def mail() -> None:
        await anyio.sleep(0.4)
        events.append("mail sent")

    config = {
        "exit_wait_timeout": 10,
        "groups": {"metrics": GroupConfig(on_shutdown="cancel"), "mail": GroupConfig()},
    }
    started = time.monotonic()
    async with TaskGuard(config) as guard:
        m = guard.spawn(metric, group="metrics")
        guard.spawn(mail, group="mail")
        await anyio.sleep(0.05)
    assert events == ["metric cancelled", "mail sent"]
    assert m.state == "cancelled"
    report = guard.report
    assert report.groups["metrics"].cancelled == 1
    assert report.groups["metrics"].cut == 0  # cancelling a cancel group is the plan
    assert report.groups["mail"].completed == 1
    assert report.clean
    assert time.monotonic() - started < 3


async def test_a_failing_task_leaves_siblings_running(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, str]] = []

    def on_error(exc: BaseException, handle: Any) -> None:
        seen.append((type(exc).__name__, handle.name))

    async def boom() -> None:
        await anyio.sleep(0.05)
        raise ValueError("bad row")

    async def sibling() -> str:
        await anyio.sleep(0.3)
        return "still fine"

    async with TaskGuard(error_handler=on_error) as guard:
        sib = guard.spawn(sibling, group="audit")
        bad = guard.spawn(boom, group="audit", name="audit-row")
        with pytest.raises(ValueError, match="bad row"):
            await bad.wait()
        assert guard.state.value == "running"
        assert await sib.wait() == "still fine"
    assert seen == [("ValueError", "audit-row")]
    report = guard.report
    assert report.groups["audit"].failed == 1
    assert report.groups["audit"].completed == 1
    assert report.failures == 1
    assert report.clean  # background failures are counted beside clean
    logged = [r for r in caplog.records if r.name == "taskguard" and r.levelno == logging.ERROR]
    assert any("audit-row" in r.getMessage() and "'audit'" in r.getMessage() for r in logged)
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in logged)


async def test_the_error_handler_sees_the_failed_tasks_context_variables() -> None:
    # It runs inside the task as it ends (on both backends), so what the task
    # set, e.g. a request id for the log, is there.
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen: list[str] = []

    def on_error(exc: BaseException, handle: Any) -> None:
        seen.append(request_id.get())

    async def fails() -> None:
        request_id.set("req-42")
        await anyio.sleep(0)
        raise ValueError("bad")

    async with TaskGuard(error_handler=on_error) as guard:
        with pytest.raises(ValueError, match="bad"):
            await guard.spawn(fails).wait()
    assert seen == ["req-42"]
    assert request_id.get() == "-"  # the spawner's context is untouched


async def test_an_error_handler_that_raises_is_survived(caplog: pytest.LogCaptureFixture) -> None:
    def broken_handler(exc: BaseException, handle: Any) -> None:
        raise RuntimeError("handler bug")

    async def boom() -> None:
        raise KeyError("x")

    async def after() -> str:
        await anyio.sleep(0.1)
        return "ok"

    async with TaskGuard(error_handler=broken_handler) as guard:
        guard.spawn(boom)
        await anyio.sleep(0.05)
        assert await guard.spawn(after).wait() == "ok"
    assert guard.report.groups["default"].failed == 1
    assert guard.report.groups["default"].completed == 1
    assert "taskguard: the error_handler, handling task 'boom' failed" in caplog.text
    assert guard.report.errors == [
        "the error_handler, handling task 'boom': RuntimeError: handler bug"
    ]


async def test_on_error_shutdown_requests_shutdown() -> None:
    async def boom() -> None:
        raise OSError("disk gone")

    config = {"groups": {"critical": GroupConfig(on_error="shutdown")}}
    async with TaskGuard(config) as guard:
        guard.spawn(boom, group="critical", name="writer")
        with anyio.fail_after(5):
            await guard.wait_for_shutdown()
    assert "writer" in guard.report.trigger
    assert "critical" in guard.report.trigger


async def test_limit_queues_pending_work_in_order() -> None:
    order: list[int] = []
    running = 0
    peak = 0

    async def job(i: int) -> None:
        nonlocal running, peak
        order.append(i)  # start order
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1

    config = {"groups": {"mail": GroupConfig(limit=2)}}
    async with TaskGuard(config) as guard:
        handles = [guard.spawn(job, i, group="mail") for i in range(6)]
        assert [h.state for h in handles[:3]] == ["running", "running", "pending"]
        assert guard.stats().groups["mail"].pending == 4
    assert peak == 2
    assert sorted(order) == list(range(6))
    assert guard.report.groups["mail"].completed == 6
    # with one slot, pending work starts strictly in spawn order
    order.clear()
    config = {"groups": {"mail": GroupConfig(limit=1)}}
    async with TaskGuard(config) as guard:
        for i in range(5):
            guard.spawn(job, i, group="mail")
    assert order == list(range(5))


async def test_pending_limit_raises_group_full_and_counts() -> None:
    gate = anyio.Event()

    async def job() -> None:
        await gate.wait()

    config = {"groups": {"mail": GroupConfig(limit=1, pending_limit=1)}}
    async with TaskGuard(config) as guard:
        guard.spawn(job, group="mail")
        guard.spawn(job, group="mail")
        with pytest.raises(GroupFullError, match="mail"):
            guard.spawn(job, group="mail")
        with pytest.raises(GroupFullError):
            guard.spawn(job(), group="mail")  # the coroutine is closed: no warning
        gate.set()
    assert guard.report.groups["mail"].refused == 2
    assert guard.report.groups["mail"].completed == 2


async def test_pending_work_is_cancelled_when_cut_and_never_starts() -> None:
    started: list[int] = []

    async def job(i: int) -> None:
        started.append(i)
        await anyio.sleep(60)

    config = {"exit_wait_timeout": 0.3, "groups": {"mail": GroupConfig(limit=1)}}
    async with TaskGuard(config) as guard:
        first = guard.spawn(job, 1, group="mail")
        second = guard.spawn(job, 2, group="mail")
        await anyio.sleep(0.05)
        assert second.cancel()  # a pending task: dropped, never started
        third = guard.spawn(job, 3, group="mail")
    assert started == [1]
    assert first.state == second.state == third.state == "cancelled"
    report = guard.report
    assert report.groups["mail"].cancelled == 3
    assert report.groups["mail"].cut == 2  # the running one and the pending one
    assert not report.clean


async def test_per_group_timeout_cuts_only_that_group() -> None:
    async def slow() -> None:
        await anyio.sleep(60)

    async def fine() -> None:
        await anyio.sleep(0.6)

    config = {
        "exit_wait_timeout": 10,
        "groups": {"quick": GroupConfig(timeout=0.2), "patient": GroupConfig()},
    }
    started = time.monotonic()
    async with TaskGuard(config) as guard:
        q = guard.spawn(slow, group="quick")
        p = guard.spawn(fine, group="patient")
        guard.shutdown()
        await anyio.sleep(0.4)
        assert q.state == "cancelled"
        assert p.state == "running"
        with pytest.raises(Exception, match="drain timeout"):
            guard.spawn(slow, group="quick")  # its deadline passed: it takes no new work
        late = guard.spawn(fine, group="patient")
    assert time.monotonic() - started < 3
    assert p.state == late.state == "completed"
    report = guard.report
    assert report.groups["quick"].cut == 1
    assert report.groups["patient"].completed == 2
    assert not report.clean


@pytest.mark.parametrize("how", ["cancel group", "drain group timeout"])
async def test_a_cancelled_task_ignoring_it_is_abandoned_after_the_grace_not_the_exit_wait(
    how: str,
) -> None:
    # Cancelled during the drain (a cancel group at its start, a drain group at
    # its timeout), it gets cancel_grace to unwind; then it is reported stuck
    # and the shutdown goes on instead of waiting out the 30 s exit wait.
    from helpers_reliability import Release

    from taskguard import TaskCancelledError

    release = Release()

    async def stubborn() -> str:
        return await release.swallow_cancellation()

    async def mail() -> str:
        await anyio.sleep(0.05)
        return "sent"

    group = GroupConfig(on_shutdown="cancel") if how == "cancel group" else GroupConfig(timeout=0.1)
    guard = TaskGuard(exit_wait_timeout=30, cancel_grace=0.2, groups={"side": group})
    start = time.monotonic()
    try:
        with anyio.fail_after(10):
            async with guard:
                handle = guard.spawn(stubborn, group="side")
                sent = guard.spawn(mail)
                await anyio.sleep(0.02)
        took = time.monotonic() - start
        assert took < 0.1 + 0.2 + 2.0, took  # not the 30 s exit wait
        report = guard.report
        assert release.swallowed >= 1
        assert [(s.name, s.group) for s in report.stuck] == [("stubborn", "side")]
        assert report.groups["side"].stuck == 1
        assert report.phases.get("stopping", 0.0) < 0.1  # the drain ended: nothing left to cut
        assert await sent.wait() == "sent"
        assert not report.clean
        with pytest.raises(TaskCancelledError, match="abandoned"):
            await handle.wait()
    finally:
        release.set()
    with anyio.fail_after(2):
        while not handle.done():
            await anyio.sleep(0.01)
    assert await handle.wait() == "released"  # its real end, once it came
    assert guard.stats().groups["side"].running == 0
    assert guard.report.groups["side"].completed == 0  # not counted twice


@pytest.mark.parametrize("how", ["cancel group", "drain group timeout", "exit wait"])
async def test_with_no_cancel_grace_a_task_that_unwinds_at_once_is_not_called_stuck(
    how: str,
) -> None:
    # cancel_grace=0 still lets a cancellation land before anything is judged stuck.
    ended: list[str] = []

    async def polite() -> None:
        try:
            await anyio.sleep(3600)
        finally:
            ended.append("unwound")

    group = {
        "cancel group": GroupConfig(on_shutdown="cancel"),
        "drain group timeout": GroupConfig(timeout=0.05),
        "exit wait": GroupConfig(),
    }[how]
    exit_wait = 0.1 if how == "exit wait" else 30
    guard = TaskGuard(exit_wait_timeout=exit_wait, cancel_grace=0, groups={"side": group})
    with anyio.fail_after(10):
        async with guard:
            handle = guard.spawn(polite, group="side")
            await anyio.sleep(0.02)
    assert ended == ["unwound"]
    assert handle.state == "cancelled"
    assert guard.report.stuck == []
    assert guard.report.groups["side"].cancelled == 1
    assert guard.report.clean is (how == "cancel group")  # a drain task cut is not clean


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again_not_abandoned() -> None:
    # asyncio delivers a cancellation once: swallowed, the next await would run
    # on; the guard cancels once more before it judges a task stuck.
    order: list[str] = []

    async def swallows_once() -> None:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            order.append("swallowed")
        try:
            await anyio.sleep(3600)
        finally:
            order.append("ended")

    side = GroupConfig(on_shutdown="cancel")
    guard = TaskGuard(exit_wait_timeout=30, cancel_grace=0.1, groups={"side": side})
    with anyio.fail_after(10):
        async with guard:
            guard.spawn(swallows_once, group="side")
            await anyio.sleep(0.02)
    assert order == ["swallowed", "ended"]
    assert guard.report.stuck == []
    assert guard.report.groups["side"].cancelled == 1


async def test_an_abandoned_task_that_fails_later_is_still_logged_and_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from helpers_reliability import Release

    release = Release()
    handled: list[str] = []

    async def stubborn_then_fails() -> None:
        await release.swallow_cancellation()
        raise LookupError("late failure")

    guard = TaskGuard(
        exit_wait_timeout=30,
        cancel_grace=0.1,
        groups={"side": {"on_shutdown": "cancel"}},
        error_handler=lambda exc, handle: handled.append(repr(exc)),
    )
    try:
        with anyio.fail_after(10):
            async with guard:
                handle = guard.spawn(stubborn_then_fails, group="side")
                await anyio.sleep(0.02)
        assert guard.report.groups["side"].stuck == 1
    finally:
        release.set()
    with anyio.fail_after(2):
        while not handle.done():
            await anyio.sleep(0.01)
    assert handle.state == "failed"
    assert handled == ["LookupError('late failure')"]
    assert "'stubborn_then_fails' (group 'side') failed" in caplog.text


async def test_unknown_group_is_created_with_defaults() -> None:
    async def job() -> int:
        return 1

    async with TaskGuard() as guard:
        handle: TaskHandle[int] = guard.spawn(job, group="brand-new")
        assert handle.group == "brand-new"
        with pytest.raises(TypeError):
            guard.spawn(job, group="")
    assert guard.report.groups["brand-new"].policy == "drain"
    assert guard.report.groups["brand-new"].completed == 1


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
async def test_a_task_raising_a_base_exception_is_a_failure_not_a_crash(
    exc_type: type[BaseException],
) -> None:
    async def exits() -> None:
        await anyio.sleep(0)
        raise exc_type(3)

    async def sibling() -> str:
        await anyio.sleep(0.1)
        return "alive"

    async with TaskGuard() as guard:
        bad = guard.spawn(exits)
        good = guard.spawn(sibling)
        with pytest.raises(exc_type):
            await bad.wait()
        assert await good.wait() == "alive"
    assert bad.state == "failed"
    assert guard.report.groups["default"].failed == 1


async def test_a_group_timeout_runs_from_the_trigger_even_during_before_drain_hooks() -> None:
    # Finding 3: group timeout 0.3 s, a 1 s before_drain hook: the 0.8 s job is
    # cut at 0.3 s, and a spawn into the group at 0.6 s is refused.
    guard = TaskGuard(exit_wait_timeout=5, groups={"g": GroupConfig(timeout=0.3)})
    refused: list[BaseException] = []

    async def job() -> None:
        await anyio.sleep(0.8)

    async def slow_hook() -> None:
        await anyio.sleep(0.6)
        try:
            guard.spawn(job, group="g")
        except Exception as exc:
            refused.append(exc)
        await anyio.sleep(0.4)

    async with guard:
        guard.on_shutdown(slow_hook, stage="before_drain")
        handle = guard.spawn(job, group="g")
    report = guard.report
    assert handle.state == "cancelled"
    assert report.groups["g"].cut == 1
    assert report.groups["g"].completed == 0
    assert len(refused) == 1
    assert "timeout" in str(refused[0])


async def test_a_cut_drain_task_whose_finally_raises_counts_as_cut() -> None:
    # Finding 10: it was counted "failed" and the report said clean.
    async def work_with_rollback() -> None:
        try:
            await anyio.sleep(30)
        finally:
            raise RuntimeError("rollback failed")

    guard = TaskGuard(exit_wait_timeout=0.3, cancel_grace=1)
    async with guard:
        handle = guard.spawn(work_with_rollback)
    report = guard.report
    assert report.groups["default"].cut == 1
    assert report.groups["default"].failed == 0
    assert not report.clean
    assert handle.state == "cancelled"


async def test_an_abandoned_task_that_ends_later_leaves_nothing_alive() -> None:
    # Finding 2: the guard (and all it holds) stayed alive for good.
    import gc
    import weakref

    from helpers_reliability import Release

    release = Release()

    async def run_guard() -> weakref.ref[TaskGuard]:
        guard = TaskGuard(exit_wait_timeout=0.2, cancel_grace=0.1)
        big = bytearray(10_000_000)
        async with guard:
            guard.spawn(release.swallow_cancellation, name="stubborn")
            guard.on_shutdown(lambda: len(big))
        assert [s.name for s in guard.report.stuck] == ["stubborn"]
        return weakref.ref(guard)

    ref = await run_guard()
    release.set()
    await anyio.sleep(0.2)  # the abandoned task ends now
    gc.collect()
    assert ref() is None
