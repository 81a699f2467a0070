"""TaskHandle: state, cancel(), wait() results and errors."""

from __future__ import annotations

import anyio
import pytest

from taskguard import TaskCancelledError, TaskGuard

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
