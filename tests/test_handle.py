"""TaskHandle: state, cancel(), wait() results and errors."""

from __future__ import annotations

import sys
import time

import anyio
import pytest
from helpers_reliability import Release

from taskguard import TaskCancelledError, TaskGuard, TaskHandle

pytestmark = pytest.mark.anyio


async def test_wait_returns_result_and_reraises_exception() -> None:
    async def ok() -> int:
        await anyio.sleep(0.01)
        return 42

    async def bad() -> None:
        await anyio.sleep(0.01)
        raise LookupError("nope")

    async with TaskGuard() as guard:
        h = guard.spawn(ok, name="answer")
        assert h.name == "answer"
        assert h.group == "default"
        assert h.state == "running"
        assert not h.done()
        assert await h.wait() == 42
        assert h.state == "completed"
        assert h.done()
        assert not h.cancel()  # already ended
        b = guard.spawn(bad)
        assert b.name == "bad"
        with pytest.raises(LookupError, match="nope"):
            await b.wait()
        assert b.state == "failed"
        with pytest.raises(LookupError):  # again: same outcome
            await b.wait()


async def test_wait_on_a_cancelled_task_raises_task_cancelled_error() -> None:
    async def forever() -> None:
        await anyio.sleep(60)

    async with TaskGuard() as guard:
        h = guard.spawn(forever)
        await anyio.sleep(0.01)
        assert h.cancel()
        with pytest.raises(TaskCancelledError, match="forever"):
            await h.wait()
        assert h.state == "cancelled"
        # and it is not the waiter's own cancellation: the waiter goes on
        await anyio.sleep(0)
    assert guard.report.groups["default"].cancelled == 1
    assert guard.report.groups["default"].cut == 0  # cancelled by us, not a deadline
    assert guard.report.clean


async def test_cancelling_the_waiter_does_not_cancel_the_task() -> None:
    async def job() -> str:
        await anyio.sleep(0.3)
        return "done"

    async with TaskGuard() as guard:
        h = guard.spawn(job)
        with anyio.move_on_after(0.05) as scope:
            await h.wait()
        assert scope.cancelled_caught
        assert h.state == "running"
        assert await h.wait() == "done"


async def test_cancel_right_after_spawn() -> None:
    ran: list[str] = []

    async def job() -> None:
        ran.append("started")
        await anyio.sleep(60)

    async with TaskGuard() as guard:
        h = guard.spawn(job)
        h.cancel()
        with pytest.raises(TaskCancelledError):
            await h.wait()
    assert guard.report.groups["default"].cancelled == 1


async def test_task_runs_in_a_copy_of_the_spawners_context() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def read() -> str:
        return var.get()

    async with TaskGuard() as guard:
        var.set("request-7")
        assert await guard.spawn(read).wait() == "request-7"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_a_base_exception_raised_while_being_cancelled_stays_in_the_task(
    exc_type: type[BaseException],
) -> None:
    # The cancellation reaches the task through the handle's throw() on
    # asyncio (send() carries the normal steps): both keep the exit in the task.
    started = anyio.Event()

    async def exits_when_cancelled() -> None:
        try:
            started.set()
            await anyio.sleep(60)
        finally:
            raise exc_type("from a finally block")

    async with TaskGuard() as guard:
        handle = guard.spawn(exits_when_cancelled)
        await started.wait()
        assert handle.cancel()
        with pytest.raises(exc_type):
            await handle.wait()
    assert handle.state == "failed"
    assert guard.report.groups["default"].failed == 1


async def test_a_running_task_shows_the_coroutine_it_runs(anyio_backend_name: str) -> None:
    import asyncio
    import inspect

    started = anyio.Event()

    async def sleeper_for_the_stack() -> None:
        started.set()
        await anyio.sleep(60)

    async with TaskGuard() as guard:
        handle = guard.spawn(sleeper_for_the_stack)
        await started.wait()
        if anyio_backend_name == "asyncio":
            task = handle._task
            assert isinstance(task, asyncio.Task)
            # debuggers, asyncio and anyio see through the handle to the coroutine
            assert inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_SUSPENDED  # type: ignore[arg-type]
            assert task.get_stack()[0].f_code.co_name == "sleeper_for_the_stack"
        assert "sleeper_for_the_stack" in guard._backend.task_stack(handle._task)  # type: ignore[union-attr]
        handle.cancel()


async def test_waiting_on_a_task_that_shutdown_abandons_does_not_hang() -> None:
    release = Release()

    async def swallows_cancellation() -> None:
        await release.swallow_cancellation()

    outcome: list[BaseException] = []

    async def waiter(handle: TaskHandle[None]) -> None:
        try:
            await handle.wait()
        except TaskCancelledError as exc:
            outcome.append(exc)

    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                async with TaskGuard(exit_wait_timeout=0.2, cancel_grace=0.2) as guard:
                    handle = guard.spawn(swallows_cancellation)
                    tg.start_soon(waiter, handle)
                    await anyio.sleep(0.05)
                # the guard closed: the waiter was told at the abandonment
                await anyio.sleep(0.05)
                assert len(outcome) == 1
        assert "abandoned at shutdown" in str(outcome[0])
        assert handle.state == "running"  # it does still run: nobody could end it
        assert guard.report.groups["default"].stuck == 1
        with pytest.raises(TaskCancelledError, match="abandoned"):
            await handle.wait()  # and a late waiter is told at once
    finally:
        release.set()
        await anyio.sleep(0.05)


def test_tasks_complete_under_asyncio_debug_mode() -> None:
    # Debug mode checks coroutines and callbacks more strictly (an earlier
    # version, with the handle as the done callback, never accounted a task).
    import asyncio

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def main() -> tuple[int, TaskHandle[int], TaskGuard]:
        async with TaskGuard(exit_wait_timeout=5) as guard:
            handle = guard.spawn(answer)
            with anyio.fail_after(2):
                result = await handle.wait()
        return result, handle, guard

    result, handle, guard = asyncio.run(main(), debug=True)
    assert result == 42
    assert handle.state == "completed"
    assert guard.report.clean
    assert guard.report.groups["default"].completed == 1


async def test_a_handle_is_not_a_coroutine_and_spawn_refuses_it() -> None:
    import asyncio
    import inspect

    async def job() -> None:
        await anyio.sleep(0)

    async with TaskGuard() as guard:
        handle = guard.spawn(job)
        assert not asyncio.iscoroutine(handle)
        assert not inspect.isawaitable(handle)
        with pytest.raises(TypeError, match="got a TaskHandle"):
            guard.spawn(handle)  # type: ignore[call-overload]
        await handle.wait()


def test_a_failed_task_is_accounted_and_asyncio_logs_nothing_about_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The failure is the handle's (reported, re-raised by wait()); the loop
    # task itself ends normally, so asyncio has no "exception was never
    # retrieved" to log when it is collected.
    import asyncio
    import gc

    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("boom")

    async def main() -> TaskHandle[None]:
        async with TaskGuard() as guard:
            handle = guard.spawn(fails)
            with pytest.raises(LookupError):
                await handle.wait()
            assert handle.state == "failed"
            assert guard.stats().groups["default"].running == 0  # accounted at its end
        return handle

    with caplog.at_level("ERROR"):
        asyncio.run(main())
        gc.collect()
    asyncio_records = [r for r in caplog.records if r.name == "asyncio"]
    assert asyncio_records == []
    assert any("failed" in r.getMessage() for r in caplog.records if r.name == "taskguard")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_tasks_are_accounted_under_an_eager_task_factory() -> None:
    # An eager task runs its first step inside create_task, so a task with no
    # await ends before spawn() returns: the accounting must already hold it.
    import asyncio

    async def at_once() -> int:
        return 1

    async def later() -> int:
        await asyncio.sleep(0)
        return 2

    async def fails_at_once() -> None:
        raise LookupError("eager")

    async def main() -> TaskGuard:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        async with TaskGuard(exit_wait_timeout=5, groups={"one": {"limit": 1}}) as guard:
            first = guard.spawn(at_once)
            assert first.state == "completed"  # it ran inside spawn()
            assert await first.wait() == 1
            assert await guard.spawn(later).wait() == 2
            failed = guard.spawn(fails_at_once)
            assert failed.state == "failed"
            assert guard.stats().groups["default"].running == 0
            # a limit of one: the pending ones start (and end) inside the first one's end
            limited = [guard.spawn(later, group="one")]
            limited += [guard.spawn(at_once, group="one") for _ in range(2)]
            assert [h.state for h in limited] == ["running", "pending", "pending"]
            assert [await h.wait() for h in limited] == [2, 1, 1]
        return guard

    guard = asyncio.run(main())
    assert guard.report.groups["default"].completed == 2
    assert guard.report.groups["default"].failed == 1
    assert guard.report.groups["one"].completed == 3
    assert guard.report.clean


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_an_eager_limited_group_starts_thousands_of_pending_tasks_without_recursion() -> None:
    # Each pending task ends in its first step, inside the start of the one
    # before: started one level deeper each, 2,000 of them hit the recursion
    # limit and the accounting was lost (found in review).
    import asyncio

    async def at_once() -> int:
        return 1

    async def main() -> TaskGuard:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        release = asyncio.Event()
        async with TaskGuard(exit_wait_timeout=5, groups={"one": {"limit": 1}}) as guard:
            guard.spawn(release.wait, group="one")
            handles = [guard.spawn(at_once, group="one") for _ in range(2_000)]
            release.set()
            await asyncio.sleep(0)
            assert all(h.state == "completed" for h in handles)
            assert guard.stats().groups["one"].pending == 0
        return guard

    report = asyncio.run(main()).report
    assert report.groups["one"].completed == 2_001
    assert report.clean


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_a_handle_cancelled_during_its_eager_first_step_is_cancelled() -> None:
    import asyncio

    handles: dict[str, TaskHandle[None]] = {}
    ended: list[str] = []

    async def supersedes_itself() -> None:
        handles["job"].cancel()  # e.g. a "newer job supersedes me" check in its first step
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append("cancelled")

    async def main() -> TaskGuard:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        release = asyncio.Event()
        async with TaskGuard(exit_wait_timeout=5, groups={"one": {"limit": 1}}) as guard:
            guard.spawn(release.wait, group="one")
            handles["job"] = guard.spawn(supersedes_itself, group="one")  # pending
            release.set()  # the job starts, eagerly, inside the first one's end
            with anyio.fail_after(2):
                with pytest.raises(TaskCancelledError):
                    await handles["job"].wait()
        return guard

    report = asyncio.run(main()).report
    assert ended == ["cancelled"]
    assert report.groups["one"].cancelled == 1
    assert report.clean


def test_a_start_that_raises_is_the_callers_error_and_leaves_no_trace() -> None:
    # E.g. a task factory that fails: spawn() raises, and the guard does not
    # wait (until the exit wait) for a task that never existed.
    import asyncio

    def failing_factory(loop: object, coro: object, **kwargs: object) -> object:
        raise RuntimeError("no more tasks")

    async def job() -> None:
        await asyncio.sleep(0)

    async def main() -> TaskGuard:
        guard = TaskGuard(exit_wait_timeout=5, groups={"one": {"limit": 1}})
        async with guard:
            loop = asyncio.get_running_loop()
            loop.set_task_factory(failing_factory)  # type: ignore[arg-type]
            try:
                for group in ("default", "one"):
                    with pytest.raises(RuntimeError, match="no more tasks"):
                        guard.spawn(job, group=group)
            finally:
                loop.set_task_factory(None)
            assert guard.stats().groups["default"].running == 0
            assert guard.stats().groups["one"].running == 0
        return guard

    start = time.monotonic()
    report = asyncio.run(main()).report
    assert time.monotonic() - start < 2  # not the 5 s exit wait
    assert report.clean
    assert report.stuck == []


async def test_bad_coroutines_are_refused_at_the_call() -> None:
    # Finding 14: an awaited or twice-spawned coroutine was accepted and
    # failed in the background; refused ones are closed (no "never awaited").
    import gc

    async def job() -> int:
        return 1

    async with TaskGuard() as guard:
        done = job()
        assert await done == 1
        with pytest.raises(TypeError, match="already"):
            guard.spawn(done)
        twice = job()
        guard.spawn(twice)
        with pytest.raises(TypeError, match="already"):
            guard.spawn(twice)
        with_args = job()
        with pytest.raises(TypeError):
            guard.spawn(with_args, 1)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="name"):
            guard.spawn(job, name=123)  # type: ignore[call-arg, call-overload]
        with pytest.raises(TypeError, match="name"):
            guard.spawn(job(), name=b"x")  # type: ignore[call-overload]
        del with_args
        gc.collect()  # filterwarnings=error: a "never awaited" warning fails the test


async def test_a_class_is_refused_before_it_is_called() -> None:
    # Found by the fuzz suite: spawn(int, inf) ran int(inf) in the caller and
    # raised its OverflowError, which says nothing about the mistake.
    async with TaskGuard() as guard:
        with pytest.raises(TypeError, match="not the class 'int'"):
            guard.spawn(int, float("inf"))  # type: ignore[arg-type]
