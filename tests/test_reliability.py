"""In-process fault cases: whatever a task, a hook or a thread does, nothing is lost
and nothing hangs.

Each fault is its own test, on asyncio and trio (anyio's pytest plugin); a task
or hook that swallows cancellation here is releasable (see
tests/helpers_reliability.py for why). The cases that need a real process
(forever-swallowing tasks, signals, the hard deadline) are in
tests/test_reliability_process.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from helpers_reliability import Release

from taskguard import ShuttingDownError, TaskCancelledError, TaskGuard

# Generous slack on top of every promised bound: 2 cores shared with other jobs.
SLACK = 2.0
BACKENDS = ["asyncio", "trio"]


# -- tasks -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_task_swallowing_cancellation_in_a_loop_is_abandoned_and_reported() -> None:
    release = Release()
    guard = TaskGuard(exit_wait_timeout=0.3, cancel_grace=0.3, hook_timeout=0.5)
    after_ran = anyio.Event()

    async def after() -> None:
        after_ran.set()

    async def stubborn_worker() -> str:
        return await release.swallow_cancellation()

    start = time.monotonic()
    async with guard:
        handle = guard.spawn(stubborn_worker, name="stubborn", group="work")
        guard.on_shutdown(after)
        await anyio.sleep(0.05)
    took = time.monotonic() - start
    try:
        report = guard.report
        assert took < 0.3 + 0.3 + SLACK, took
        assert release.swallowed >= 1  # it really was cancelled, and ignored it
        assert [s.name for s in report.stuck] == ["stubborn"]
        assert "stubborn_worker" in report.stuck[0].stack  # the stack names where it hangs
        assert report.groups["work"].stuck == 1
        assert report.groups["work"].completed == 0
        assert handle.state == "running"  # never reported as something it did not do
        assert after_ran.is_set()  # the after_drain hooks still ran
        assert not report.clean
        with pytest.raises(TaskCancelledError, match="abandoned"):
            await handle.wait()  # the guard gave up on it: a waiter is told, not held
    finally:
        release.set()
    # Once released it ends; it is not counted twice in the report already built,
    # and from then on wait() gives its real result.
    with anyio.fail_after(2):
        while not handle.done():
            await anyio.sleep(0.01)
    assert await handle.wait() == "released"
    assert guard.report.groups["work"].stuck == 1


@pytest.mark.anyio
async def test_task_blocking_the_event_loop_delays_shutdown_but_is_still_cut() -> None:
    # A blocking call cannot be interrupted: the whole loop, the guard's
    # supervisor included, stands still for 2 s. Once the loop runs again the
    # deadline has passed, so the task is cancelled at its next await and
    # reported as cut; nothing is lost and shutdown resumes at once.
    guard = TaskGuard(exit_wait_timeout=0.5, cancel_grace=0.5)
    progress: list[str] = []

    async def blocker() -> None:
        progress.append("blocking")
        time.sleep(2.0)  # sync code on the loop thread: the fault under test
        progress.append("unblocked")
        await anyio.sleep(10)
        progress.append("finished")  # must never happen

    start = time.monotonic()
    async with guard:
        guard.spawn(blocker, group="work")
        guard.shutdown("test")
    took = time.monotonic() - start
    report = guard.report
    assert progress == ["blocking", "unblocked"]
    assert report.groups["work"].cancelled == 1
    assert report.groups["work"].cut == 1
    assert report.stuck == []
    assert 2.0 <= took < 2.0 + 0.5 + 0.5 + SLACK, took


@pytest.mark.anyio
async def test_blocking_sync_hook_overrun_is_reported_and_the_rest_still_run() -> None:
    guard = TaskGuard(exit_wait_timeout=1, cancel_grace=0.1)
    ran: list[str] = []

    def slow_sync_hook() -> None:
        time.sleep(0.6)
        ran.append("slow")

    def later_hook() -> None:
        ran.append("later")

    async with guard:
        guard.on_shutdown(later_hook)  # registered first: runs last
        guard.on_shutdown(slow_sync_hook, timeout=0.2)
    outcomes = {h.name: h.outcome for h in guard.report.hooks}
    assert ran == ["slow", "later"]
    assert outcomes == {"slow_sync_hook": "timeout", "later_hook": "ok"}


# -- hooks -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_hanging_hooks_are_cut_at_their_timeout_and_the_others_run() -> None:
    guard = TaskGuard(exit_wait_timeout=2, cancel_grace=0.2, hook_timeout=5)
    release = Release()
    ran: list[str] = []

    async def hangs_before() -> None:
        await anyio.sleep_forever()

    async def hangs_after() -> None:
        await anyio.sleep_forever()

    async def ignores_its_cancellation() -> None:
        await release.swallow_cancellation()

    async def ok_before() -> None:
        ran.append("ok_before")

    async def ok_after() -> None:
        ran.append("ok_after")

    start = time.monotonic()
    async with guard:
        guard.on_shutdown(ok_before, stage="before_drain")
        guard.on_shutdown(hangs_before, stage="before_drain", timeout=0.3)
        guard.on_shutdown(ok_after)
        guard.on_shutdown(ignores_its_cancellation, timeout=0.3)
        guard.on_shutdown(hangs_after, timeout=0.3)
    took = time.monotonic() - start
    try:
        outcomes = {h.name: h.outcome for h in guard.report.hooks}
        assert outcomes == {
            "hangs_before": "timeout",
            "ok_before": "ok",
            "hangs_after": "timeout",
            "ignores_its_cancellation": "timeout",
            "ok_after": "ok",
        }
        assert [h.name for h in guard.report.hooks] == [
            "hangs_before",
            "ok_before",
            "hangs_after",
            "ignores_its_cancellation",
            "ok_after",
        ]
        assert ran == ["ok_before", "ok_after"]
        assert release.swallowed >= 1
        # Bound: the three hook timeouts, plus a little grace for the abandoned one.
        assert took < 0.3 * 3 + SLACK, took
        assert not guard.report.clean
    finally:
        release.set()


@pytest.mark.parametrize(
    "exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit, type("Custom", (BaseException,), {})]
)
@pytest.mark.anyio
async def test_hook_raising_base_exception_is_recorded_and_the_rest_run(
    exc_type: type[BaseException],
) -> None:
    guard = TaskGuard(exit_wait_timeout=1, cancel_grace=0.1)
    ran: list[str] = []

    def sync_raises() -> None:
        raise exc_type("from a sync hook")

    async def async_raises() -> None:
        await anyio.sleep(0)
        raise exc_type("from an async hook")

    def ok() -> None:
        ran.append("ok")

    guard_exited_normally = False
    async with guard:
        for stage in ("before_drain", "after_drain"):
            guard.on_shutdown(ok, stage=stage, name=f"ok-{stage}")
            guard.on_shutdown(sync_raises, stage=stage, name=f"sync-{stage}")
            guard.on_shutdown(async_raises, stage=stage, name=f"async-{stage}")
    guard_exited_normally = True  # the BaseException did not escape the guard
    assert guard_exited_normally
    hooks = {h.name: h for h in guard.report.hooks}
    assert len(hooks) == 6
    for stage in ("before_drain", "after_drain"):
        assert hooks[f"ok-{stage}"].outcome == "ok"
        for kind in ("sync", "async"):
            report = hooks[f"{kind}-{stage}"]
            assert report.outcome == "error"
            assert report.error is not None
            assert exc_type.__name__ in report.error
    assert ran == ["ok", "ok"]
    assert not guard.report.clean


# -- the error handler -------------------------------------------------------------


@pytest.mark.anyio
async def test_error_handler_that_raises_does_not_break_accounting_or_siblings() -> None:
    handled: list[str] = []

    def handler(exc: BaseException, handle: Any) -> None:
        handled.append(handle.name)
        raise RuntimeError("the error handler itself is broken")

    guard = TaskGuard(exit_wait_timeout=2, cancel_grace=0.2, error_handler=handler)

    async def fails(n: int) -> None:
        await anyio.sleep(0.01 * n)
        raise ValueError(f"job {n} failed")

    async def sibling() -> str:
        await anyio.sleep(0.2)
        return "done"

    async with guard:
        sib = guard.spawn(sibling, name="sibling")
        failing = [guard.spawn(fails, n, name=f"fails-{n}") for n in range(3)]
        # Spawning still works after the handler raised.
        await anyio.sleep(0.1)
        late = guard.spawn(sibling, name="late")
    assert sorted(handled) == ["fails-0", "fails-1", "fails-2"]
    assert sib.state == "completed"
    assert late.state == "completed"
    for handle in failing:
        assert handle.state == "failed"
        with pytest.raises(ValueError, match="failed"):
            await handle.wait()
    counts = guard.report.groups["default"]
    assert (counts.completed, counts.failed, counts.cancelled) == (2, 3, 0)
    # background failures are counted beside clean; a broken error_handler is a
    # fault of the app's bookkeeping: named in the report's errors, not clean
    # (in the order they failed: 10 ms apart, which a loaded machine may not keep)
    assert sorted(e.split(":")[0] for e in guard.report.errors) == [
        f"the error_handler, handling task 'fails-{n}'" for n in range(3)
    ]
    assert not guard.report.clean


@pytest.mark.anyio
async def test_spawn_from_a_worker_thread_via_from_thread() -> None:
    guard = TaskGuard(exit_wait_timeout=2, cancel_grace=0.2)
    results: list[int] = []

    async def job(n: int) -> int:
        await anyio.sleep(0.01)
        results.append(n)
        return n

    def spawn_job(n: int) -> None:
        guard.spawn(job, n, group="threads")

    def worker(first: int) -> list[str]:
        errors = []
        # A direct call from a thread is refused loudly, never lost.
        try:
            guard.spawn(job, -1)
        except RuntimeError as exc:
            errors.append(str(exc))
        for n in range(first, first + 10):
            anyio.from_thread.run_sync(spawn_job, n)
        with guard.guarded("thread-section"):
            time.sleep(0.05)
        return errors

    async with guard:
        async with anyio.create_task_group() as tg:
            for first in (0, 10, 20):
                tg.start_soon(anyio.to_thread.run_sync, worker, first)
        # and once more while draining (the open section keeps the drain going):
        # the drain group still accepts the work
        async with guard.guarded("body"):
            guard.shutdown("test")
            errors = await anyio.to_thread.run_sync(worker, 30)
    assert "from_thread" in errors[0]
    assert sorted(results) == list(range(40))
    assert guard.report.groups["threads"].completed == 40
    assert guard.report.groups["default"].completed == 0  # the refused direct calls
    assert guard.report.guarded.completed == 5


@pytest.mark.anyio
async def test_spawn_from_a_worker_thread_after_stopping_raises() -> None:
    guard = TaskGuard(exit_wait_timeout=0.2, cancel_grace=0.1)
    outcome: list[str] = []
    release = threading.Event()

    def late_worker() -> None:
        release.wait(5)
        try:
            anyio.from_thread.run_sync(lambda: guard.spawn(anyio.sleep, 0))
        except ShuttingDownError:
            outcome.append("refused")
        else:
            outcome.append("accepted")

    async with guard:
        guard.on_shutdown(release.set, stage="after_drain")
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, late_worker)
            guard.shutdown("test")  # the thread tries again from the after_drain hook on
    assert outcome == ["refused"]


@pytest.mark.anyio
async def test_worker_thread_section_cannot_be_cancelled_and_is_reported_stuck() -> None:
    # A thread cannot be cancelled: the guard waits for it until the deadline
    # and the cancel grace, then gives up on it, naming it with its stack.
    guard = TaskGuard(exit_wait_timeout=0.3, cancel_grace=0.2)
    release = threading.Event()

    def held_in_thread() -> None:
        with guard.guarded("held"):
            release.wait(10)

    start = time.monotonic()
    async with guard:
        thread = threading.Thread(target=held_in_thread)
        thread.start()
        await anyio.sleep(0.05)
    took = time.monotonic() - start
    try:
        report = guard.report
        assert [(s.name, s.group) for s in report.stuck] == [("held", "(guarded, thread)")]
        assert "held_in_thread" in report.stuck[0].stack
        assert report.guarded.stuck == 1
        assert took < 0.3 + 0.2 + SLACK
    finally:
        release.set()
        thread.join(5)
    assert guard.report.guarded.completed == 0  # leaving late does not rewrite the report


@pytest.mark.anyio
async def test_shutdown_requested_from_a_worker_thread() -> None:
    guard = TaskGuard(exit_wait_timeout=2, cancel_grace=0.2)
    done: list[str] = []

    async def job() -> None:
        await anyio.sleep(0.1)
        done.append("job")

    async with guard:
        guard.spawn(job)
        await anyio.to_thread.run_sync(guard.shutdown, "from a thread")
        with anyio.fail_after(0.5 + SLACK):
            await guard.wait_for_shutdown()
    assert guard.report.trigger == "from a thread"
    assert done == ["job"]  # drained, not cut
    assert guard.report.clean


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancel_goes_through_a_shielded_section() -> None:
    # A documented limit, not a promise: shield=True is an anyio cancel scope.
    # It holds against anyio/trio-style cancellation (a cancelled enclosing
    # scope: a client disconnect in Starlette, a server timeout through anyio),
    # but a native asyncio task.cancel() is delivered through it.
    import asyncio

    guard = TaskGuard(exit_wait_timeout=2, cancel_grace=0.2)
    log: list[str] = []

    async def handler() -> None:
        async with guard.guarded("audit", shield=True):
            await anyio.sleep(0.2)
            log.append("native: finished")

    async with guard:
        with anyio.CancelScope() as outer:
            async with guard.guarded("audit", shield=True):
                outer.cancel()
                await anyio.sleep(0.1)
                log.append("scope: finished")
        task = asyncio.ensure_future(handler())
        await anyio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert log == ["scope: finished"]
    assert guard.report.guarded.completed == 1


@pytest.mark.anyio
async def test_refused_coroutine_objects_are_closed_not_leaked() -> None:
    # A refused spawn of a coroutine object must close it: otherwise Python
    # warns "coroutine ... was never awaited" at some random later moment.
    import gc
    import warnings

    from taskguard import GroupConfig, GroupFullError

    guard = TaskGuard(
        exit_wait_timeout=1,
        cancel_grace=0.1,
        groups={
            "tiny": GroupConfig(limit=1, pending_limit=0),
            "c": GroupConfig(on_shutdown="cancel"),
        },
    )

    async def job() -> None:
        await anyio.sleep(0.05)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with guard:
            guard.spawn(job(), group="tiny")
            with pytest.raises(GroupFullError):
                guard.spawn(job(), group="tiny")
            async with guard.guarded("hold"):
                guard.shutdown("test")
                with pytest.raises(ShuttingDownError):
                    guard.spawn(job(), group="c")  # cancel group while draining
        with pytest.raises(ShuttingDownError):
            guard.spawn(job(), group="tiny")  # closed
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert guard.report.groups["tiny"].refused == 1  # the one after close is not in the report
    assert guard.report.groups["c"].refused == 1
