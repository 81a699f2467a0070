"""Shared fixtures, and the leak check every in-process taskguard test gets.

The leak check (promise 1: "nothing is kept after the guard closed"): every
``TaskGuard`` and ``TaskHandle`` created during a test must be collectable once
the test is over. Only objects created during the test are tracked (their
``__init__`` is wrapped for the test's duration and records a weakref), so a
test that never builds a guard in-process (the subprocess and server tests)
pays nothing. It checks:

- at the end of the test call, when the test used no fixture that may hold a
  guard (then an ``xfail(raises=LeakError)`` marker applies to the leak);
- otherwise after every fixture is torn down (a teardown error).

A failed test is not checked. Opt out with
``@pytest.mark.no_leak_check(reason="...")`` (a reason is required). A leak
is reported with a few levels of what holds each object (``LEAK_DEPTH=6`` in
the environment shows more).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import sys
import time
import types
import weakref
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

# plain asserts in the shared test helpers explain themselves too
pytest.register_assert_rewrite(
    "fuzz_support", "faults_scenario", "helpers_reliability", "stateful_checks"
)

from helpers_reliability import LeakError  # noqa: E402

from taskguard import TaskGuard, TaskHandle  # noqa: E402

#: failure reports stay sendable between xdist processes (tests/report_text.py)
pytest_plugins = ["report_text"]


def _eager_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose tasks run their first step inside ``create_task``
    (Python 3.12+): a task may end inside ``spawn()``."""
    loop = asyncio.new_event_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    return loop


@pytest.fixture(
    params=[
        "asyncio",
        "trio",
        pytest.param(
            ("asyncio", {"loop_factory": _eager_loop}),
            id="asyncio-eager",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+"
            ),
        ),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Core tests run on both backends (anyio's pytest plugin), and on asyncio
    with an eager task factory where Python has one (3.12+). Tests that need
    the backend's name take ``anyio_backend_name``."""
    return request.param


# -- the leak check --------------------------------------------------------------------

#: fixtures whose values cannot hold a guard: with only these (and parametrize
#: arguments) the check runs at the end of the call, where xfail applies
SAFE_FIXTURES = frozenset(
    {
        "anyio_backend",
        "anyio_backend_name",
        "anyio_backend_options",
        "caplog",
        "capsys",
        "capfd",
        "monkeypatch",
        "recwarn",
        "request",
        "tmp_path",
        "tmp_path_factory",
        "_leak_check",
        "event_loop_policy",
    }
)

#: how long a finishing thread (a timer) may hold a guard after the test
LEAK_GRACE = 0.5

#: Tests of other files the leak check does not apply to, and why.
_GRPC_CONTEXTS = (
    "grpc.aio keeps the contexts of its own callbacks and calls (created while the guard "
    "was current: they hold it) in its process-wide poller until it is shut down"
)
NOT_CHECKED: dict[str, str] = {
    "tests/test_grpc.py::": _GRPC_CONTEXTS,
    "tests/test_grpc_serve.py::": _GRPC_CONTEXTS,
}


class _Tracker:
    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.refs: list[weakref.ref[Any]] = []
        self.checked = False
        self.call_passed = False
        self._undo: list[Callable[[], None]] = []

    def wrap(self, cls: type[Any]) -> None:
        own = "__init__" in cls.__dict__  # TaskGuard inherits its __init__ (Lifecycle's)
        original = cls.__init__
        refs = self.refs

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            refs.append(weakref.ref(self))

        cls.__init__ = __init__
        if own:
            self._undo.append(lambda: setattr(cls, "__init__", original))
        else:
            self._undo.append(lambda: delattr(cls, "__init__"))

    def unwrap(self) -> None:
        while self._undo:
            self._undo.pop()()

    def deferred(self) -> bool:
        params = set(getattr(getattr(self.item, "callspec", None), "params", {}))
        return bool(set(self.item.fixturenames) - SAFE_FIXTURES - params)  # type: ignore[attr-defined]

    def check(self, caplog: pytest.LogCaptureFixture) -> None:
        self.checked = True
        if not self.refs:
            return
        # pytest keeps the test's log records; a record's exc_info holds a
        # traceback whose frames hold the failed task's handle. In production a
        # record is formatted and dropped: drop the traceback here too.
        for when in ("setup", "call"):
            for record in caplog.get_records(when):
                record.exc_info = None
        # taskguard.run's watchdog timer thread, just cancelled, holds the guard
        # until its thread is gone (a moment after run() returned): a short grace.
        deadline = time.monotonic() + LEAK_GRACE
        while any(ref() is not None for ref in self.refs):  # no strong reference here
            gc.collect()
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        alive = _alive(self.refs)
        if alive:
            raise LeakError(
                f"{len(alive)} taskguard object(s) created by this test are still alive "
                "after it (promise 1: nothing is kept after the guard closed):\n" + _describe(alive)
            )


def _alive(refs: list[weakref.ref[Any]]) -> list[Any]:
    return [obj for ref in refs if (obj := ref()) is not None]


def _describe(alive: list[Any], depth: int = int(os.environ.get("LEAK_DEPTH", "3"))) -> str:
    """The objects and a few levels of what holds them (to tell an artefact from a leak)."""
    lines: list[str] = []
    mine: set[int] = {id(alive), id(lines)}  # our own lists are not holders
    for obj in alive[:4]:
        lines.append(f"  {obj!r}")
        _holders(obj, depth, "    ", mine, lines)
    return "\n".join(lines[:60])


def _holders(obj: Any, depth: int, indent: str, mine: set[int], lines: list[str]) -> None:
    refs = gc.get_referrers(obj)
    mine.add(id(refs))
    for ref in refs:
        if id(ref) in mine or isinstance(ref, (types.GeneratorType, type(iter([])))):
            continue
        if isinstance(ref, types.FrameType) and ref.f_code.co_filename == __file__:
            continue
        lines.append(indent + _label(ref))
        if depth > 1 and not _is_globals(ref):
            _holders(ref, depth - 1, indent + "  ", mine, lines)


def _is_globals(ref: object) -> bool:
    return isinstance(ref, dict) and "__name__" in ref and "__loader__" in ref


def _label(ref: object) -> str:
    if isinstance(ref, types.FrameType):
        code = ref.f_code
        return f"frame {code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{ref.f_lineno})"
    if _is_globals(ref):
        return f"the globals of module {ref['__name__']}"  # type: ignore[index]
    if isinstance(ref, dict):
        keys = ", ".join(map(str, list(ref)[:5]))
        return f"dict {{{keys}}}"
    if isinstance(ref, types.FunctionType):
        return f"function {ref.__qualname__}"
    if isinstance(ref, (list, tuple, set)):
        return f"{type(ref).__name__} of {len(ref)}"
    return type(ref).__name__


_TRACKER = pytest.StashKey[_Tracker]()


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    marker = request.node.get_closest_marker("no_leak_check")
    if marker is not None:
        if not marker.kwargs.get("reason"):
            raise pytest.UsageError("@pytest.mark.no_leak_check needs reason='why'")
        yield
        return
    tracker = _Tracker(request.node)
    tracker.wrap(TaskGuard)
    tracker.wrap(TaskHandle)
    request.node.stash[_TRACKER] = tracker
    try:
        yield
    finally:
        tracker.unwrap()
    if tracker.call_passed and not tracker.checked:
        tracker.check(caplog)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    tracker = item.stash.get(_TRACKER, None)
    if tracker is not None:
        tracker.call_passed = True
        if not tracker.deferred():
            tracker.check(item.funcargs["caplog"])  # type: ignore[attr-defined]
    return result


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for prefix, reason in NOT_CHECKED.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.no_leak_check(reason=reason))
