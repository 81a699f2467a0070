"""taskguard.current() and the module-level spawn / guarded / on_shutdown."""

from __future__ import annotations

import anyio
import pytest

import taskguard
from taskguard import NoGuardError, ShuttingDownError, TaskGuard

pytestmark = pytest.mark.anyio


async def test_no_guard_error_says_how_to_start_one() -> None:
    with pytest.raises(NoGuardError) as info:
        taskguard.current()
    message = str(info.value)
    assert "async with TaskGuard()" in message
    assert "taskguard.run" in message
    assert isinstance(info.value, LookupError)


async def test_current_is_the_guard_of_the_context() -> None:
    async with TaskGuard() as guard:
        assert taskguard.current() is guard

        async def job() -> TaskGuard:
            return taskguard.current()

        assert await taskguard.spawn(job).wait() is guard

        calls: list[str] = []
        taskguard.on_shutdown(lambda: calls.append("hook"))
        async with taskguard.guarded("section"):
            assert guard.stats().guarded == 1
    assert calls == ["hook"]
    with pytest.raises(NoGuardError):
        taskguard.current()


async def test_nested_guards_inner_wins_then_outer_again() -> None:
    async with TaskGuard() as outer:
        async with TaskGuard() as inner:
            assert taskguard.current() is inner
        assert taskguard.current() is outer


async def test_falls_back_to_the_most_recent_running_guard() -> None:
    # A server's connection tasks often do not descend from the task that
    # entered the guard: they still find it.
    import contextvars

    async with TaskGuard() as guard:
        empty = contextvars.Context()
        found = empty.run(taskguard.current)
        assert found is guard


async def test_module_spawn_after_close() -> None:
    import contextvars

    async def job() -> None:
        pass

    async with TaskGuard() as guard:
        ctx = contextvars.copy_context()  # e.g. a task that outlives the guard
    with pytest.raises(NoGuardError):
        taskguard.spawn(job)
    # a context that still points at the closed guard gets the more telling error
    assert ctx.run(taskguard.current) is guard
    with pytest.raises(ShuttingDownError):
        ctx.run(taskguard.spawn, job)
    await anyio.sleep(0)
