"""Argument fuzzing of spawn, on_shutdown, guarded and shutdown (see tests/fuzz_support.py)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from fuzz_support import (
    BACKENDS,
    FUZZ,
    HOOK_TIMEOUT,
    Evil,
    Exercise,
    UserError,
    as_reported,
    attempt,
    flags,
    groups,
    is_seconds,
    names,
    names_ok,
    plain_str,
    run_example,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

import taskguard
from taskguard import (
    TaskGuardError,
)

# -- spawn -------------------------------------------------------------------------------

#: the kinds spawn accepts and runs
RUNS = [
    "async_fn",
    "async_fn_raises",
    "lambda_coroutine",
    "partial",
    "bound_method",
    "async_callable",
    "coroutine",
]
FN_KINDS = [
    *RUNS,
    "awaited_coroutine",
    "spawned_twice",
    "sync_fn",
    "sync_fn_raising",
    "lambda_value",
    "async_gen_fn",
    "async_gen",
    "class",
    "handle",
    "evil",
    "none",
]


class _Job:
    async def method(self, *args: object) -> str:
        await anyio.sleep(0)
        return "method"

    async def __call__(self, *args: object) -> str:
        await anyio.sleep(0)
        return "called"


def make_fn(kind: str) -> Any:
    """A spawn target of the given kind (coroutine objects are made per example)."""

    async def ok(*args: object) -> str:
        await anyio.sleep(0.001)
        return "ok"

    async def fails(*args: object) -> None:
        await anyio.sleep(0)
        raise UserError("background failure")

    def sync_fn(*args: object) -> int:
        return 1

    def sync_fn_raising(*args: object) -> int:
        raise UserError("ran synchronously in the caller")

    async def agen(*args: object) -> AsyncIterator[int]:
        yield 1

    makers: dict[str, Callable[[], Any]] = {
        "async_fn": lambda: ok,
        "async_fn_raises": lambda: fails,
        "lambda_coroutine": lambda: lambda *a: ok(*a),
        "partial": lambda: functools.partial(ok, "bound"),
        "bound_method": lambda: _Job().method,
        "async_callable": _Job,
        "coroutine": lambda: ok(),
        "sync_fn": lambda: sync_fn,
        "sync_fn_raising": lambda: sync_fn_raising,
        "lambda_value": lambda: lambda *a: 42,
        "async_gen_fn": lambda: agen,
        "async_gen": lambda: agen(),
        "class": lambda: int,
        "evil": Evil,
        "none": lambda: None,
    }
    return makers[kind]()


async def _spawn_case(ex: Exercise, spawn: Callable[..., Any], data: st.DataObject) -> None:
    guard = ex.guard
    kind = data.draw(st.sampled_from(FN_KINDS), label="fn kind")
    args = data.draw(st.one_of(st.just([]), st.lists(values, min_size=1, max_size=2)), label="args")
    group = data.draw(groups, label="group")
    name = data.draw(names_ok, label="name")
    if kind == "awaited_coroutine":
        fn = make_fn("coroutine")
        await fn
    elif kind == "spawned_twice":
        fn = make_fn("coroutine")
        first = guard.spawn(fn)
        ex.handles.append(first)
    elif kind == "handle":
        fn = ex.witness
    else:
        fn = make_fn(kind)
    accepted, handle = attempt(spawn, fn, *args, group=group, name=name)
    if accepted:
        ex.handles.append(handle)
        assert kind in RUNS, f"spawn accepted a {kind}"
        assert plain_str(group), f"spawn accepted the group {group!r}"
        assert group, "spawn accepted an empty group name"
        if kind == "coroutine":
            assert not args
    if data.draw(st.booleans(), label="cancel it") and accepted:
        assert handle.cancel() in (True, False)
    if data.draw(st.booleans(), label="wait for it") and accepted:
        with anyio.move_on_after(0.5):
            try:
                await handle.wait()
            except (UserError, TaskGuardError):
                pass


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_spawn_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        await _spawn_case(ex, ex.guard.spawn, data)

    run_example(backend, body)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_module_level_spawn_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        assert taskguard.current() is ex.guard
        await _spawn_case(ex, taskguard.spawn, data)

    run_example(backend, body)


# -- on_shutdown -------------------------------------------------------------------------

HOOK_KINDS = ["sync", "async", "lambda", "raises", "coroutine", "not_callable", "evil"]
stages = st.one_of(st.sampled_from(["before_drain", "after_drain"]), values)
timeouts = st.one_of(st.sampled_from([None, 0.2, 1]), values)


async def _hook_case(ex: Exercise, register: Callable[..., Any], data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(HOOK_KINDS), label="hook kind")
    stage = data.draw(stages, label="stage")
    timeout = data.draw(
        timeouts,
        label="timeout",
    )
    name = data.draw(names_ok, label="name")
    as_decorator = data.draw(st.booleans(), label="as decorator")
    # an empty or missing name stands for the function's name
    # (a str subclass is reported as a plain copy, see check_name)
    hook_name = str.__str__(name) if isinstance(name, str) and name else f"h{len(ex.hooks)}"
    if kind == "coroutine":
        fn: Any = anyio.sleep(0)
    elif kind == "not_callable":
        fn = 42
    elif kind == "evil":
        fn = Evil()
    else:
        fn = ex.hook_fn(hook_name, kind)
    if callable(fn) and not isinstance(fn, Evil):
        fn.__qualname__ = hook_name
    if as_decorator:
        accepted, decorator = attempt(register, stage=stage, timeout=timeout, name=name)
        if accepted:
            accepted, result = attempt(decorator, fn)
            if accepted:
                assert result is fn  # a decorator gives the function back
    else:
        accepted, _ = attempt(register, fn, stage=stage, timeout=timeout, name=name)
    if accepted:
        assert kind in ("sync", "async", "lambda", "raises"), f"on_shutdown accepted {kind}"
        assert stage in ("before_drain", "after_drain"), f"on_shutdown accepted stage {stage!r}"
        assert timeout is None or is_seconds(timeout), f"on_shutdown accepted {timeout!r}"
        if stage == "after_drain":
            ex.after_hooks += 1
            ex.extra_budget += (timeout or HOOK_TIMEOUT) - HOOK_TIMEOUT
    else:
        ex.hooks.pop(hook_name, None)
        if kind == "coroutine":  # refused before on_shutdown saw it (as a decorator): ours
            fn.close()


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_on_shutdown_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        register = ex.guard.on_shutdown
        if data.draw(st.booleans(), label="module-level"):
            register = taskguard.on_shutdown
        for _ in range(data.draw(st.integers(1, 3), label="hooks")):
            await _hook_case(ex, register, data)

    run_example(backend, body)


# -- guarded -----------------------------------------------------------------------------

FORMS = ["async_with", "async_decorator", "sync_decorator_thread", "with_thread"]


async def _guarded_case(ex: Exercise, data: st.DataObject) -> None:
    guard = ex.guard
    form = data.draw(st.sampled_from(FORMS), label="form")
    name = data.draw(names, label="name")
    shield = data.draw(flags, label="shield")
    module_level = data.draw(st.booleans(), label="module-level")
    make = taskguard.guarded if module_level else guard.guarded
    ran: list[str] = []
    accepted, section = attempt(make, name, shield=shield)
    if not accepted:
        good_name = name is None or isinstance(name, str)
        assert not (good_name and isinstance(shield, bool)), "guarded() refused good arguments"
        return
    if form == "async_with":
        async with section:
            ran.append("body")
            await anyio.sleep(0)
    elif form == "async_decorator":

        async def work() -> None:
            ran.append("body")
            await anyio.sleep(0)

        ok, wrapped = attempt(section, work)
        assert ok
        await wrapped()
    else:

        def work_sync() -> None:
            ran.append("body")

        if form == "sync_decorator_thread":
            ok, wrapped_sync = attempt(section, work_sync)
            assert ok
            await anyio.to_thread.run_sync(wrapped_sync)
        else:

            def in_thread() -> None:
                with section:
                    work_sync()

            await anyio.to_thread.run_sync(in_thread)
    assert ran == ["body"]


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_guarded_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        await _guarded_case(ex, data)

    report = run_example(backend, body)
    assert report.guarded.cut == report.guarded.stuck == 0


def test_guarded_shield_refuses_a_string() -> None:
    with pytest.raises(TypeError):
        taskguard.guarded("x", shield="false")  # type: ignore[arg-type]


def test_a_guarded_entry_that_raises_leaves_no_section() -> None:
    async def body(ex: Exercise) -> None:
        with pytest.raises(UserError):
            async with ex.guard.guarded("phantom", shield=Evil()):  # type: ignore[arg-type]
                pass

    report = run_example("trio", body)
    assert report.guarded.stuck == 0


# -- shutdown() --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(reason=st.one_of(st.sampled_from([None, "deploy"]), values), force=st.booleans())
def test_shutdown_fuzz(backend: str, reason: Any, force: Any) -> None:

    async def body(ex: Exercise) -> None:
        accepted, _ = attempt(ex.guard.shutdown, reason, force=force)
        ex.forced = accepted and force is True
        if accepted:
            assert reason is None or isinstance(reason, str), f"shutdown({reason!r}) accepted"
            # idempotent: a second request changes nothing but may force
            ex.guard.shutdown("again")
            await ex.guard.wait_closed()

    report = run_example(backend, body)
    if isinstance(reason, str) and reason:
        # a str subclass is kept as a plain copy; a lone surrogate is escaped
        assert report.trigger == as_reported(str.__str__(reason))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_reason_that_is_not_a_str(backend: str) -> None:
    async def body(ex: Exercise) -> None:
        accepted, _ = attempt(ex.guard.shutdown, 123)
        assert not accepted, "shutdown(123) was accepted"

    run_example(backend, body)


def test_shutdown_force_refuses_a_string() -> None:
    async def body(ex: Exercise) -> None:
        with pytest.raises(TypeError):
            ex.guard.shutdown("deploy", force="no")  # type: ignore[arg-type]

    run_example("asyncio", body)
