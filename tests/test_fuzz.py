"""Argument fuzzing of the public surface: whatever a caller passes, the call raises a
clear error at once or works, and a shutdown afterwards keeps every promise.

Each test draws arguments for one public callable from the same pool of odd
values (wrong types, NaN, ±inf, 1e300, 1e13, -0.0, bools, huge ints, empty,
odd and unicode strings, objects whose dunders raise, already-awaited or
twice-spawned coroutines, sync functions, lambdas returning non-coroutines)
and checks, per hypothesis example:

- the call raises TypeError / ValueError (pydantic's ValidationError is one) /
  a TaskGuardError, or the user's own object's exception (``UserError``), or it
  works; never anything else, and never a warning: each example runs under
  :class:`helpers_reliability.Hygiene`, which ends with ``gc.collect()`` so a
  refused coroutine that was not closed ("never awaited") is caught there;
- a shutdown afterwards completes within exit_wait + cancel_grace + the hooks'
  timeouts (+ slack), drains the accepted work (a witness task completes), and
  the report tells the truth: its per-group counts equal the handles' states,
  every accepted hook ran and is reported once, the report survives a JSON
  round trip, and it lists no bookkeeping errors.

Known breaks (issue 11's findings) are kept out of the general tests by
:func:`known_break`, each with its finding number; a dedicated ``xfail(strict)``
test shows each new one. When a finding is fixed, drop its line from
``known_break`` so the general test covers those inputs again.

``FUZZ_EXAMPLES`` (environment) scales the number of examples per test.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from helpers_reliability import Hygiene
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import taskguard
from taskguard import (
    GroupConfig,
    GuardConfig,
    ShutdownReport,
    TaskGuard,
    TaskGuardError,
    TaskHandle,
)

BACKENDS = ["asyncio", "trio"]
EXIT_WAIT = 1.0
CANCEL_GRACE = 0.3
HOOK_TIMEOUT = 0.5
#: what an async hook that ignores its cancellation may add (taskguard._hooks)
HOOK_GRACE = 0.5
SLACK = 3.0

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the pool of odd values ------------------------------------------------------------


class UserError(Exception):
    """Raised by the fuzz tests' own hostile objects: it may surface at the call site."""


def _raise(*_: object) -> Any:
    raise UserError("a hostile dunder")


class Evil:
    """An object whose every dunder raises (``__str__``, ``__repr__``, ``__eq__``, ...)."""

    __str__ = __repr__ = __format__ = _raise
    __eq__ = __ne__ = __lt__ = __gt__ = __le__ = __ge__ = _raise
    __hash__ = __bool__ = __len__ = __iter__ = __float__ = __int__ = __index__ = _raise
    __fspath__ = __await__ = __aiter__ = _raise

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints it thus
        p.text("Evil()")


class EvilStr(str):
    """A str (``isinstance(x, str)`` holds) whose repr, str, hash and eq raise."""

    __str__ = __repr__ = __format__ = __hash__ = __eq__ = __ne__ = _raise

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("EvilStr()")


ODD = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**63,
    -(2**64),
    10**100,
    0.0,
    -0.0,
    0.5,
    1e-300,
    1e13,
    1e300,
    math.nan,
    math.inf,
    -math.inf,
    "",
    " ",
    "x",
    "0.5",
    "default",
    "drain",
    "cancel",
    "SIGTERM",
    "\x00",
    "\ud800",
    "ñ🙂",
    "a" * 3000,
    b"bytes",
    (),
    object,
]
values = st.one_of(
    st.sampled_from(ODD),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.builds(list),
    st.builds(dict),
    st.builds(object),
    st.builds(Evil),
    st.builds(EvilStr, st.just("evil")),
)

#: what a call may raise at its call site
ALLOWED = (TypeError, ValueError, TaskGuardError, UserError)


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call it; (True, result) or (False, the allowed exception). Anything else propagates."""
    try:
        return True, fn(*args, **kwargs)
    except ALLOWED as exc:
        _note(f"refused: {type(exc).__name__}: {_text(exc)}")
        return False, exc


def _note(text: str) -> None:
    try:
        note(text)
    except InvalidArgument:  # not in the test's thread (a portal's): nowhere to note it
        pass


async def attempt_async(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    try:
        return True, await fn(*args, **kwargs)
    except ALLOWED as exc:
        _note(f"refused: {type(exc).__name__}: {_text(exc)}")
        return False, exc


def _text(exc: BaseException) -> str:
    try:
        return str(exc)[:200]
    except Exception:
        return "<unprintable>"


def is_seconds(value: object, *, zero: bool = False) -> bool:
    """A valid number of seconds: a real number (not a bool), finite, > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and (number >= 0 if zero else number > 0)


def plain_str(value: object) -> bool:
    return type(value) is str


def known_break(**facts: Any) -> str | None:
    """The issue-11 finding an input runs into, if any (kept out of the general tests)."""
    name = facts.get("name")
    if name is not None and not plain_str(name):
        return "finding 1: a non-str name is accepted and breaks the shutdown"
    if facts.get("bool_timeout"):
        return "finding 13: a boolean timeout is taken as 1 s"
    if facts.get("reused_kind") in ("awaited_coroutine", "spawned_twice"):
        return "finding 14: an awaited or twice-spawned coroutine is accepted"
    if facts.get("coroutine_reused"):
        return "finding 14: an awaited or twice-spawned coroutine is accepted"
    if facts.get("refused_coroutine"):
        return "finding 14: a refused coroutine is not closed (never awaited)"
    if "reason" in facts and not plain_str(facts["reason"]) and facts["reason"] is not None:
        return "new (test_shutdown_reason_that_is_not_a_str): it kills the supervisor"
    if facts.get("huge_budget"):
        return "finding 13: a timeout beyond what a timer can wait is accepted"
    if facts.get("garbage_env"):
        return "finding 12: TASKGUARD_<FIELD>__<X> variables are ignored"
    if facts.get("asgi_unchecked"):
        return "new (test_asgi_middleware_refuses_a_bad_send_timeout_...): not checked"
    if isinstance(facts.get("odd_str"), str) and _unencodable(facts["odd_str"]):
        return "new (test_a_name_with_a_lone_surrogate_keeps_...): the report is not JSON-ready"
    if facts.get("odd_name"):
        return "new (test_a_name_with_a_lone_surrogate_keeps_...): the report is not JSON-ready"
    for flag in ("shield", "raise_on_end", "force"):
        if flag in facts and not isinstance(facts[flag], bool):
            return f"new (test_guarded_shield_refuses_a_string): {flag} takes any object"
    return None


def unless_known(strategy: st.SearchStrategy[Any], fact: str) -> st.SearchStrategy[Any]:
    """``strategy`` without the values a known finding breaks on: filtered when drawn,
    which is cheaper than rejecting a whole example once its guard runs."""
    return strategy.filter(lambda value: known_break(**{fact: value}) is None)


def skip_known(**facts: Any) -> None:
    why = known_break(**facts)
    if why is not None:
        note(f"known: {why}")
        assume(False)


# -- one example: a guard, a witness task, the fuzzed calls, a shutdown --------------------


@dataclass
class Exercise:
    """What the fuzzed calls were accepted to do, for the checks after the shutdown."""

    guard: TaskGuard
    #: a forced shutdown may cut the witness (and any drain work)
    forced: bool = False
    handles: list[TaskHandle[Any]] = field(default_factory=list)
    #: hook name -> how many times it ran
    hooks: dict[str, list[int]] = field(default_factory=dict)
    after_hooks: int = 0
    #: async context managers entered: [entered, exited]
    resources: list[list[int]] = field(default_factory=list)
    #: outcomes of the streams that ended
    streams: Counter[str] = field(default_factory=Counter)
    #: extra seconds the calls allow the shutdown (hook timeouts)
    extra_budget: float = 0.0
    witness: TaskHandle[Any] | None = None

    def hook_fn(self, name: str, kind: str) -> Callable[[], Any]:
        runs = self.hooks.setdefault(name, [0])

        def sync_hook() -> None:
            runs[0] += 1

        async def async_hook() -> None:
            runs[0] += 1
            await anyio.sleep(0)

        def returns_coroutine() -> Awaitable[None]:
            runs[0] += 1
            return anyio.sleep(0)

        async def async_raises() -> None:
            runs[0] += 1
            raise UserError("hook failed")

        return {
            "sync": sync_hook,
            "async": async_hook,
            "lambda": returns_coroutine,
            "raises": async_raises,
        }[kind]


async def _witness() -> str:
    await anyio.sleep(0.02)
    return "witness"


def run_example(
    backend: str,
    body: Callable[[Exercise], Awaitable[None]],
    **config: Any,
) -> ShutdownReport:
    """Run ``body`` against a fresh running guard, shut it down, check the promises."""
    cfg = {
        "exit_wait_timeout": EXIT_WAIT,
        "cancel_grace": CANCEL_GRACE,
        "hook_timeout": HOOK_TIMEOUT,
        "groups": {"c": GroupConfig(on_shutdown="cancel"), "lim": GroupConfig(limit=1)},
        **config,
    }
    guard = TaskGuard(**cfg)
    ex = Exercise(guard)
    took: list[float] = []

    async def main() -> None:
        async with guard:
            ex.witness = guard.spawn(_witness, name="witness", group="witness")
            await body(ex)
            took.append(time.monotonic())
        took[0] = time.monotonic() - took[0]

    with Hygiene() as hygiene:
        anyio.run(main, backend=backend)
    hygiene.check()
    check_report(ex, took[0])
    return guard.report


def check_report(ex: Exercise, took: float) -> None:
    guard, report = ex.guard, ex.guard.report
    cfg = guard.config
    budget = cfg.exit_wait_timeout + cfg.cancel_grace + ex.extra_budget
    budget += ex.after_hooks * (HOOK_TIMEOUT + HOOK_GRACE)
    assert took < budget + SLACK, (took, budget)
    assert ex.witness is not None
    assert ex.witness.state == ("cancelled" if ex.forced else "completed"), ex.witness
    assert getattr(report, "errors", []) == [], report.errors  # type: ignore[attr-defined]
    assert report.stuck == []
    # the report's counts are the handles' states
    states: dict[str, Counter[str]] = {}
    for handle in [ex.witness, *ex.handles]:
        assert handle.done(), handle
        states.setdefault(handle.group, Counter())[handle.state] += 1
    for group, seen in states.items():
        counts = report.groups[group]
        got = {
            "completed": counts.completed,
            "failed": counts.failed,
            "cancelled": counts.cancelled,
        }
        assert got == {k: seen[k] for k in got}, (group, got, seen)
    # every accepted hook ran once and is reported once
    for name, runs in ex.hooks.items():
        assert runs == [1], (name, runs)
    reported = Counter(h.name for h in report.hooks)
    for name in ex.hooks:
        assert reported[name] == 1, (name, reported)
    for entered, exited in ex.resources:
        assert (entered, exited) == (1, 1), ex.resources
    opened = Counter({k: v for k, v in report.streams.items() if k != "open"})
    assert opened == ex.streams, (report.streams, ex.streams)
    # the report is JSON-ready: it round-trips
    assert ShutdownReport.model_validate_json(report.model_dump_json()) == report


# -- spawn -------------------------------------------------------------------------------

FN_KINDS = [
    "async_fn",
    "async_fn_raises",
    "lambda_coroutine",
    "partial",
    "bound_method",
    "async_callable",
    "coroutine",
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
RUNS = {
    "async_fn",
    "async_fn_raises",
    "lambda_coroutine",
    "partial",
    "bound_method",
    "async_callable",
    "coroutine",
}
groups = st.one_of(st.sampled_from(["default", "c", "lim", "new"]), values)
#: a flag: mostly booleans, sometimes anything
flags = st.one_of(st.booleans(), st.booleans(), values)
names = st.one_of(st.sampled_from([None, "n"]), values)


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

    return {
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
    }[kind]()


#: names the known findings do not break on (the report holds them)
names_ok = unless_known(unless_known(names, "name"), "odd_str")


async def _spawn_case(ex: Exercise, spawn: Callable[..., Any], data: st.DataObject) -> None:
    guard = ex.guard
    kind = data.draw(unless_known(st.sampled_from(FN_KINDS), "reused_kind"), label="fn kind")
    args = data.draw(st.lists(values, max_size=2), label="args")
    group = data.draw(unless_known(groups, "odd_str"), label="group")
    name = data.draw(names_ok, label="name")
    bad_group = not plain_str(group) or not group
    skip_known(
        name=name,
        coroutine_reused=kind in ("awaited_coroutine", "spawned_twice"),
        refused_coroutine=kind == "coroutine" and (bool(args) or bad_group),
    )
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
        timeouts.filter(lambda t: known_break(bool_timeout=isinstance(t, bool)) is None),
        label="timeout",
    )
    name = data.draw(names_ok, label="name")
    as_decorator = data.draw(st.booleans(), label="as decorator")
    skip_known(
        name=name,
        bool_timeout=isinstance(timeout, bool),
        refused_coroutine=kind == "coroutine",
    )
    # an empty or missing name stands for the function's name
    hook_name = name or f"h{len(ex.hooks)}"
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
    shield = data.draw(unless_known(flags, "shield"), label="shield")
    module_level = data.draw(st.booleans(), label="module-level")
    make = taskguard.guarded if module_level else guard.guarded
    skip_known(shield=shield)
    ran: list[str] = []
    accepted, section = attempt(make, name, shield=shield)
    if not accepted:
        assert name is not None, "guarded(None) refused"
        assert not isinstance(name, str), f"guarded({name!r}) refused"
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


@pytest.mark.xfail(
    strict=True, reason="new: guarded(shield=...) takes any object; shield='false' shields"
)
def test_guarded_shield_refuses_a_string() -> None:
    with pytest.raises(TypeError):
        taskguard.guarded("x", shield="false")  # type: ignore[arg-type]


@pytest.mark.xfail(
    strict=True,
    reason="finding 9 (new trigger): an entry that raises after counting leaves a phantom "
    "section (trio: shield whose bool() raises)",
)
def test_a_guarded_entry_that_raises_leaves_no_section() -> None:
    async def body(ex: Exercise) -> None:
        with pytest.raises(UserError):
            async with ex.guard.guarded("phantom", shield=Evil()):  # type: ignore[arg-type]
                pass

    report = run_example("trio", body)
    assert report.guarded.stuck == 0


# -- streams -----------------------------------------------------------------------------

SOURCE_KINDS = ["agen", "agen_slow", "agen_raises", "aclose_raises", "none", "list", "evil"]
CONSUMERS = ["pump", "async_for", "async_for_break", "async_with_send", "aclose", "stop"]
seconds_or_odd = st.one_of(st.sampled_from([None, 0.02, 0.5, 5]), values)


class _CloseRaises:
    """An async iterator whose aclose() raises (a buggy source)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.n = 0

    def __aiter__(self) -> _CloseRaises:
        return self

    async def __anext__(self) -> int:
        self.n += 1
        if self.n > 3:
            raise StopAsyncIteration
        return self.n

    async def aclose(self) -> None:
        self.log.append("closed")
        raise UserError("aclose failed")


def make_source(kind: str, log: list[str]) -> Any:
    async def agen(delay: float = 0.0, fail: bool = False) -> AsyncIterator[int]:
        log.append("started")
        try:
            for i in range(3):
                await anyio.sleep(delay)
                yield i
            if fail:
                raise UserError("source failed")
        finally:
            log.append("closed")

    return {
        "agen": lambda: agen(),
        "agen_slow": lambda: agen(0.05),
        "agen_raises": lambda: agen(fail=True),
        "aclose_raises": lambda: _CloseRaises(log),
        "none": lambda: None,
        "list": lambda: [1, 2, 3],
        "evil": Evil,
    }[kind]()


async def _stream_case(ex: Exercise, data: st.DataObject) -> None:
    guard = ex.guard
    kind = data.draw(st.sampled_from(SOURCE_KINDS), label="source")
    name = data.draw(unless_known(names, "name"), label="name")
    send_timeout = data.draw(seconds_or_odd, label="send_timeout")
    max_duration = data.draw(seconds_or_odd, label="max_duration")
    raise_on_end = data.draw(unless_known(flags, "raise_on_end"), label="raise_on_end")
    consumer = data.draw(st.sampled_from(CONSUMERS), label="consumer")
    sender = data.draw(st.sampled_from(["ok", "broken", "slow", "not_callable"]), label="send")
    skip_known(name=name, raise_on_end=raise_on_end)
    log: list[str] = []
    source = make_source(kind, log)
    accepted, stream = attempt(
        guard.stream,
        source,
        name=name,
        send_timeout=send_timeout,
        max_duration=max_duration,
        raise_on_end=raise_on_end,
    )
    if not accepted:
        if kind in ("agen", "agen_slow", "agen_raises"):
            await source.aclose()
        return
    assert kind != "list", "stream() accepted a list"  # Evil has an __aiter__: it may pass
    for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
        assert value is None or is_seconds(value), f"stream() accepted {label}={value!r}"

    async def send(item: object) -> None:
        if sender == "broken":
            raise BrokenPipeError("the client went away")
        if sender == "slow":
            await anyio.sleep(0.1)

    send_fn: Any = 42 if sender == "not_callable" else send
    with anyio.fail_after(EXIT_WAIT + 3):
        if consumer == "pump" and source is not None:
            await attempt_async(_swallow_stream_errors, stream.pump, send_fn)
        elif consumer in ("async_for", "async_for_break") and source is not None:

            async def iterate() -> None:
                async for _ in stream:
                    if consumer == "async_for_break":
                        break
                await stream.aclose()

            await attempt_async(_swallow_stream_errors, iterate)
        elif consumer == "async_with_send":

            async def with_send() -> None:
                async with stream:
                    for i in range(2):
                        await stream.send(send_fn, i)

            await attempt_async(_swallow_stream_errors, with_send)
        elif consumer == "stop":
            stream.stop()
            await stream.aclose()
        else:
            await stream.aclose()
    if stream.outcome is not None:
        ex.streams[stream.outcome.value] += 1
    if "started" in log:
        assert log.count("closed") == 1, log  # its finally ran, exactly once


async def _swallow_stream_errors(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    try:
        await fn(*args)
    except (taskguard.StreamError, UserError, BrokenPipeError):
        pass


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_stream_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        await _stream_case(ex, data)

    run_example(backend, body)


# -- resources -----------------------------------------------------------------------------

CM_KINDS = ["class", "generator", "enter_raises", "exit_raises", "exit_hangs", "sync_cm", "evil"]


class _Resource:
    def __init__(self, rec: list[int], kind: str) -> None:
        self.rec = rec
        self.kind = kind

    async def __aenter__(self) -> _Resource:
        if self.kind == "enter_raises":
            raise UserError("cannot enter")
        self.rec[0] += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.rec[1] += 1
        if self.kind == "exit_raises":
            raise UserError("cannot exit")
        if self.kind == "exit_hangs":
            await anyio.sleep_forever()


async def _resource_case(ex: Exercise, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(CM_KINDS), label="resource")
    rec = [0, 0]

    @asynccontextmanager
    async def generator() -> AsyncIterator[str]:
        rec[0] += 1
        try:
            yield "value"
        finally:
            rec[1] += 1

    if kind == "generator":
        cm: Any = generator()
    elif kind == "sync_cm":
        cm = open(os.devnull)  # noqa: SIM115 - a sync context manager on purpose
    elif kind == "evil":
        cm = Evil()
    else:
        cm = _Resource(rec, kind)
    try:
        accepted, _ = await attempt_async(ex.guard.enter_async_context, cm)
    finally:
        if kind == "sync_cm":
            cm.close()
    if accepted:
        assert kind in ("class", "generator", "exit_raises", "exit_hangs"), kind
        ex.resources.append(rec)
        ex.after_hooks += 1
    else:
        assert rec == [0, 0], (kind, rec)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_enter_async_context_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="resources")):
            await _resource_case(ex, data)

    run_example(backend, body)


# -- shutdown() --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(reason=st.one_of(st.sampled_from([None, "deploy"]), values), force=st.booleans())
def test_shutdown_fuzz(backend: str, reason: Any, force: Any) -> None:
    skip_known(
        reason=reason, force=force, odd_name=isinstance(reason, str) and _unencodable(reason)
    )

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
        assert report.trigger == reason


@pytest.mark.xfail(
    strict=True, reason="new: shutdown(reason=123) is accepted and the report cannot be built"
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_reason_that_is_not_a_str(backend: str) -> None:
    async def body(ex: Exercise) -> None:
        accepted, _ = attempt(ex.guard.shutdown, 123)
        assert not accepted, "shutdown(123) was accepted"

    run_example(backend, body)


@pytest.mark.xfail(strict=True, reason="new: shutdown(force='no') forces the shutdown")
def test_shutdown_force_refuses_a_string() -> None:
    async def body(ex: Exercise) -> None:
        with pytest.raises(TypeError):
            ex.guard.shutdown("deploy", force="no")  # type: ignore[arg-type]

    run_example("asyncio", body)


# -- configuration: keywords, dicts, TaskGuard(...), the environment ------------------------

FIELDS = [
    "exit_wait_timeout",
    "cancel_grace",
    "hook_timeout",
    "drain_delay",
    "stream_grace",
    "handle_signals",
    "exit_signals",
    "groups",
    "error_handler",
    "grace_period",
    "exit_wait_tmeout",  # a typo
]
GROUP_FIELDS = ["on_shutdown", "timeout", "limit", "pending_limit", "on_error", "limt"]
SECONDS_FIELDS = ("exit_wait_timeout", "cancel_grace", "hook_timeout", "drain_delay")
field_values = st.one_of(
    values,
    st.sampled_from([0.2, 1, 30, "TERM", ["TERM"], [15], "cancel", "drain", "shutdown", print]),
)


#: group names as dict keys (hashable ones: an unhashable key cannot even be written)
group_keys = st.one_of(
    st.sampled_from(["g", "mail", "", " ", "\ud800", "default", None, True, 0, 1.5, b"g"]),
    st.text(max_size=6),
    st.integers(),
)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """A config dict with one to three fuzzed fields, sometimes a fuzzed group."""
    cfg: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        cfg[name] = draw(field_values, label=name)
    if draw(st.booleans(), label="fuzz a group"):
        group_name = draw(group_keys, label="group")
        group_field = draw(st.sampled_from(GROUP_FIELDS), label="group field")
        cfg["groups"] = {group_name: {group_field: draw(field_values, label=group_field)}}
    return cfg


def check_accepted_config(cfg: GuardConfig) -> None:
    """What an accepted config promises, whatever it was built from."""
    for name in (*SECONDS_FIELDS, "stream_grace"):
        value = getattr(cfg, name)
        assert is_seconds(value, zero=True), (name, value)
    if cfg.grace_period is not None:
        assert is_seconds(cfg.grace_period), cfg.grace_period
    assert isinstance(cfg.handle_signals, bool)
    for name, group in cfg.groups.items():
        assert plain_str(name), name
        assert name, "an empty group name"
        assert group.timeout is None or is_seconds(group.timeout), group
        assert group.limit is None or (type(group.limit) is int and group.limit > 0), group


def huge(cfg: GuardConfig) -> bool:
    """A budget no timer can wait for (threading.TIMEOUT_MAX)."""
    import threading

    return cfg.worst_case([cfg.hook_timeout]) + 10 >= threading.TIMEOUT_MAX


def odd_names(cfg: GuardConfig) -> bool:
    return any(_unencodable(name) for name in cfg.groups)


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


@pytest.mark.parametrize("via", ["keywords", "dict", "TaskGuard", "TaskGuard+overrides"])
@FUZZ
@given(cfg=configs())
def test_config_fuzz(via: str, cfg: dict[str, Any]) -> None:
    with Hygiene() as hygiene:
        if via == "keywords":
            accepted, result = attempt(GuardConfig, **cfg)
        elif via == "dict":
            accepted, result = attempt(GuardConfig.model_validate, cfg)
        elif via == "TaskGuard":
            accepted, result = attempt(TaskGuard, cfg)
        else:
            accepted, result = attempt(TaskGuard, GuardConfig(), **cfg)
    hygiene.check()
    if not accepted:
        return
    config = result if isinstance(result, GuardConfig) else result.config
    check_accepted_config(config)
    skip_known(huge_budget=huge(config), odd_name=odd_names(config))
    if config.handle_signals or config.worst_case([config.hook_timeout]) > 5:
        return  # signals in the test process, or a long wait: test_run_fuzz covers them

    async def body(ex: Exercise) -> None:
        pass

    run_example("asyncio", body, **{k: getattr(config, k) for k in config.model_fields_set})


@pytest.mark.xfail(
    strict=True,
    reason="new: a name that is not UTF-8 encodable (a lone surrogate, as os.fsdecode "
    "makes) is accepted and the report then cannot be dumped to JSON",
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_name_with_a_lone_surrogate_keeps_the_report_json_ready(backend: str) -> None:
    async def body(ex: Exercise) -> None:
        accepted, handle = attempt(ex.guard.spawn, _witness, group="caf\udce9")
        if accepted:
            ex.handles.append(handle)

    run_example(backend, body)


ENV_NAMES = [
    "EXIT_WAIT_TIMEOUT",
    "CANCEL_GRACE",
    "HOOK_TIMEOUT",
    "DRAIN_DELAY",
    "STREAM_GRACE",
    "HANDLE_SIGNALS",
    "EXIT_SIGNALS",
    "GROUPS",
    "GROUPS__MAIL__LIMIT",
    "GROUPS__MAIL__TIMEOUT",
    "GROUPS__MAIL__ON_SHUTDOWN",
    "GRACE_PERIOD",
    "ERROR_HANDLER",
    "EXIT_WAIT_TMEOUT",
    "exit_wait_timeout",
    "GROUPS__",
]
env_values = st.one_of(
    st.sampled_from(
        ["1", "0.5", "-1", "0", "nan", "inf", "1e13", "1e300", "true", "yes", "", " ", "TERM"]
    ),
    st.sampled_from(['["TERM"]', "[15]", '{"mail": {"limit": 2}}', "{", "[", "null", "{}"]),
    st.text(max_size=8).filter(lambda t: "\x00" not in t),
)


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    env=st.dictionaries(st.sampled_from(ENV_NAMES), env_values, min_size=1, max_size=3),
    suffix=st.sampled_from(["", "", "__X", "__"]),
)
def test_from_env_fuzz(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], suffix: str) -> None:
    names = {
        f"TASKGUARD_{name}{suffix if i == 0 else ''}": v for i, (name, v) in enumerate(env.items())
    }
    skip_known(garbage_env=bool(suffix) and not next(iter(env)).startswith("GROUPS"))
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.upper().startswith("TASKGUARD_")]:
            patch.delenv(key)
        for key, value in names.items():
            patch.setenv(key, value)
        with Hygiene() as hygiene:
            accepted, cfg = attempt(GuardConfig.from_env)
    hygiene.check()
    if accepted:
        check_accepted_config(cfg)
        for key in names:
            field_name = key[len("TASKGUARD_") :].split("__", 1)[0].lower()
            assert field_name in GuardConfig.model_fields, f"{key} was accepted"
            assert field_name != "error_handler", f"{key} was accepted"


@FUZZ
@given(config=values, overrides=st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=2))
def test_taskguard_constructor_fuzz(config: Any, overrides: dict[str, Any]) -> None:
    with Hygiene() as hygiene:
        accepted, guard = attempt(TaskGuard, config, **overrides)
    hygiene.check()
    if accepted:
        assert config is None or isinstance(config, (dict, GuardConfig)), config
        check_accepted_config(guard.config)


# -- taskguard.run -------------------------------------------------------------------------

MAIN_KINDS = ["async", "async_raises", "async_no_params", "sync", "lambda_coro", "lambda_value"]
MAIN_KINDS += ["not_callable", "evil"]


def make_main(kind: str) -> Any:
    async def main(guard: TaskGuard) -> str:
        guard.spawn(_witness, name="witness")
        await anyio.sleep(0)
        return "main"

    async def raises(guard: TaskGuard) -> None:
        raise UserError("main failed")

    async def no_params() -> None:
        pass

    def sync(guard: TaskGuard) -> int:
        return 1

    return {
        "async": lambda: main,
        "async_raises": lambda: raises,
        "async_no_params": lambda: no_params,
        "sync": lambda: sync,
        "lambda_coro": lambda: lambda guard: main(guard),
        "lambda_value": lambda: lambda guard: 42,
        "not_callable": lambda: 42,
        "evil": Evil,
    }[kind]()


@FUZZ
@given(
    # weighted towards a run that works, so that its promises get checked too
    kind=st.one_of(st.just("async"), st.just("lambda_coro"), st.sampled_from(MAIN_KINDS)),
    backend=st.one_of(*[st.sampled_from(BACKENDS)] * 3, values),
    config=st.one_of(st.none(), st.just({"hook_timeout": 1}), st.none(), configs()),
    overrides=st.one_of(
        st.just({}),
        st.just({}),
        st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=2),
    ),
)
def test_run_fuzz(kind: str, backend: Any, config: Any, overrides: dict[str, Any]) -> None:
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    short = {"exit_wait_timeout": EXIT_WAIT, "cancel_grace": CANCEL_GRACE, "hook_timeout": 1}
    overrides = {**short, **overrides}
    try:
        built = GuardConfig.model_validate({**(config or {}), **overrides})
    except (ValueError, TypeError, UserError):
        built = None
    if built is not None:
        skip_known(huge_budget=huge(built), odd_name=odd_names(built))
        assume(built.worst_case([built.hook_timeout]) < 10)
    started = time.monotonic()
    with Hygiene() as hygiene:
        try:
            accepted, report = attempt(
                taskguard.run, make_main(kind), config=config, backend=backend, **overrides
            )
        finally:
            after = {sig: signal.getsignal(sig) for sig in before}
    took = time.monotonic() - started
    hygiene.check()
    assert after == before, "run() left other exit-signal handlers than it found"
    event(
        "run() returned"
        if accepted
        else f"run() refused: {type(report).__name__} {_text(report)[:50]}"
    )
    if accepted:
        assert kind in ("async", "lambda_coro"), f"run() returned for a {kind} main"
        assert backend in BACKENDS, backend
        assert isinstance(report, ShutdownReport)
        assert report.groups["default"].completed == 1, report  # the witness drained
        assert getattr(report, "errors", []) == []
        assert ShutdownReport.model_validate_json(report.model_dump_json()) == report
        assert built is not None
        assert took < built.worst_case([built.hook_timeout]) + SLACK, took


# -- integrations: the ASGI middleware, the gRPC interceptor, serve() ------------------------


async def _streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for chunk in (b"a", b"b"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _one_request(app: Any) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [],
    }
    requested = [False]

    async def receive() -> dict[str, Any]:
        if not requested[0]:
            requested[0] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(
    send_timeout=st.one_of(st.sampled_from([None, 30.0]), values),
    max_duration=st.one_of(st.sampled_from([None, 30.0]), values),
    readiness_path=st.one_of(st.sampled_from([None, "/ready"]), values),
    signals=st.one_of(st.sampled_from(["off", "off", "auto"]), values),
    pass_guard=st.booleans(),
)
def test_asgi_middleware_constructor_fuzz(
    backend: str,
    send_timeout: Any,
    max_duration: Any,
    readiness_path: Any,
    signals: Any,
    pass_guard: bool,
) -> None:
    from taskguard.asgi import TaskGuardMiddleware
    from taskguard.testing import asgi_lifespan

    skip_known(bool_timeout=isinstance(send_timeout, bool) or isinstance(max_duration, bool))
    skip_known(
        asgi_unchecked=not all(v is None or is_seconds(v) for v in (send_timeout, max_duration))
        or not (readiness_path is None or plain_str(readiness_path))
    )
    guard = TaskGuard(exit_wait_timeout=EXIT_WAIT, cancel_grace=CANCEL_GRACE)
    result: list[tuple[int, bytes]] = []

    async def main() -> None:
        accepted, app = attempt(
            TaskGuardMiddleware,
            _streaming_app,
            guard if pass_guard else None,
            send_timeout=send_timeout,
            max_duration=max_duration,
            readiness_path=readiness_path,
            signals=signals,
        )
        if not accepted:
            return
        # what the constructor accepted, it must be able to use
        for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            assert value is None or is_seconds(value), f"accepted {label}={value!r}"
        assert readiness_path is None or isinstance(readiness_path, str), readiness_path
        with anyio.fail_after(EXIT_WAIT + CANCEL_GRACE + SLACK):
            async with asgi_lifespan(app):
                result.append(await _one_request(app))

    with Hygiene() as hygiene:
        anyio.run(main, backend=backend)
    hygiene.check()
    if result:
        [(status, body)] = result
        assert status == 200
        # a tiny max_duration may cut the stream (that is its job), nothing else may
        assert (
            body == b"ab" if max_duration is None or max_duration >= 1 else b"ab".startswith(body)
        )


@pytest.mark.xfail(
    strict=True,
    reason="new: TaskGuardMiddleware(send_timeout=...) is not checked; a bad one fails every "
    "streaming response instead of the constructor",
)
def test_asgi_middleware_refuses_a_bad_send_timeout_at_construction() -> None:
    from taskguard.asgi import TaskGuardMiddleware

    with pytest.raises((TypeError, ValueError)):
        TaskGuardMiddleware(_streaming_app, send_timeout="30")  # type: ignore[arg-type]


@FUZZ
@given(
    send_timeout=st.one_of(st.sampled_from([None, 5.0]), values),
    max_duration=st.one_of(st.sampled_from([None, 5.0]), values),
    guard_value=st.one_of(st.just(TaskGuard), values),
)
def test_grpc_interceptor_constructor_fuzz(
    send_timeout: Any, max_duration: Any, guard_value: Any
) -> None:
    pytest.importorskip("grpc")
    from taskguard.grpc import GuardInterceptor

    skip_known(bool_timeout=isinstance(send_timeout, bool) or isinstance(max_duration, bool))
    guard = TaskGuard() if guard_value is TaskGuard else guard_value
    with Hygiene() as hygiene:
        accepted, _ = attempt(
            GuardInterceptor, guard, send_timeout=send_timeout, max_duration=max_duration
        )
    hygiene.check()
    if accepted:
        assert isinstance(guard, TaskGuard)
        for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            assert value is None or is_seconds(value), f"accepted {label}={value!r}"


def test_grpc_serve_grace_fuzz() -> None:
    # One event loop for every example (a portal's): grpc.aio keeps per-loop state
    # and does not like a fresh loop per server (the gRPC tests share one too).
    grpc = pytest.importorskip("grpc")
    import anyio.from_thread

    from taskguard.grpc import serve

    async def one(grace: Any) -> bool | None:
        guard = TaskGuard(exit_wait_timeout=EXIT_WAIT, cancel_grace=CANCEL_GRACE)
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        outcome: list[bool] = []
        with anyio.fail_after(EXIT_WAIT + CANCEL_GRACE + SLACK):
            async with guard, anyio.create_task_group() as tg:

                async def run_serve() -> None:
                    accepted, _ = await attempt_async(serve, server, guard, grace)
                    outcome.append(accepted)

                tg.start_soon(run_serve)
                await anyio.sleep(0.05)
                guard.shutdown("fuzz")
        await server.stop(0)
        return outcome[0] if outcome else None

    with anyio.from_thread.start_blocking_portal("asyncio") as portal:

        @settings(FUZZ, max_examples=max(5, FUZZ.max_examples // 4))
        @given(grace=st.one_of(st.sampled_from([None, 0, 0.5]), values))
        def example(grace: Any) -> None:
            skip_known(bool_timeout=isinstance(grace, bool))
            with Hygiene() as hygiene:
                accepted = portal.call(one, grace)
            hygiene.check()
            if accepted:
                assert grace is None or is_seconds(grace, zero=True), f"serve(grace={grace!r})"
                assert grace is None or grace <= EXIT_WAIT

        example()
