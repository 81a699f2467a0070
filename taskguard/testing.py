"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses taskguard.

Fixtures:

* ``taskguard_guard`` — a running :class:`TaskGuard`, shut down at teardown;
  the test fails when the shutdown report is not clean (opt out with
  ``@pytest.mark.taskguard_unclean_ok``). Works in async tests run by
  pytest-asyncio (``@pytest.mark.asyncio``) and by anyio's plugin
  (``@pytest.mark.anyio``, asyncio and trio). Override the
  ``taskguard_config`` fixture to configure it.

Helpers (plain functions, usable anywhere):

* :func:`shutdown_and_wait` — request shutdown, wait, return the report;
* :func:`simulate_signal` — deliver an exit signal to a guard as its signal
  handler would (the first starts shutdown, the second forces it), without
  sending a real signal to the test process;
* :func:`asgi_lifespan` — run an ASGI app's lifespan around a block (for
  ``httpx.ASGITransport``, which does not), e.g. an app wrapped in
  ``TaskGuardMiddleware``.
"""

from __future__ import annotations

import signal
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Mapping,
    MutableMapping,
)
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from ._config import GuardConfig
from ._guard import TaskGuard
from ._report import ShutdownReport, State

__all__ = ["asgi_lifespan", "shutdown_and_wait", "simulate_signal"]

#: what ``taskguard_guard`` uses unless ``taskguard_config`` is overridden
DEFAULT_CONFIG: dict[str, Any] = {"exit_wait_timeout": 5.0, "cancel_grace": 1.0}


async def shutdown_and_wait(
    guard: TaskGuard, reason: str = "test", *, force: bool = False
) -> ShutdownReport:
    """Request shutdown of ``guard`` and return its report once it is closed."""
    guard.shutdown(reason, force=force)
    return await guard.wait_closed()


async def simulate_signal(guard: TaskGuard, signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to ``guard`` as an exit-signal handler would, and wait
    until the guard has reacted (the first signal starts the drain, the second
    forces it). Never call it a third time: a third exit signal ends the process."""
    seen = guard.signals_seen
    if seen >= 2:
        raise RuntimeError(
            "a third exit signal would end the test process (os._exit); not simulated"
        )
    guard.handle_signal(signum)  # schedules the reaction onto the loop
    with anyio.fail_after(5):
        if seen == 0:
            await guard.wait_for_shutdown()
            return
        # The forced drain is a flag, not an event: give the loop a few turns.
        while not guard.forced and guard.state is not State.CLOSED:  # noqa: ASYNC110
            await anyio.sleep(0.001)


@asynccontextmanager
async def asgi_lifespan(app: Callable[..., Awaitable[None]]) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan: startup on entry, shutdown on exit.

    Raises ``RuntimeError`` with the app's message on ``lifespan.*.failed``.
    """
    to_app, app_in = anyio.create_memory_object_stream[MutableMapping[str, Any]](2)
    app_out, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](2)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    said_failed = False

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal said_failed
        said_failed = said_failed or message["type"].endswith(".failed")
        await app_out.send(message)

    async def run() -> None:
        async with app_out:
            try:
                await app(scope, app_in.receive, send)
            except Exception:
                # As servers do: after lifespan.*.failed the app's exception (Starlette
                # raises right after saying so) adds nothing to the failure reported.
                if not said_failed:
                    raise

    async def call(kind: str) -> None:
        await to_app.send({"type": f"lifespan.{kind}"})
        with anyio.fail_after(60):
            reply = await from_app.receive()
        if reply["type"] != f"lifespan.{kind}.complete":
            raise RuntimeError(f"lifespan {kind} failed: {reply.get('message', '')}")

    failure: list[BaseException] = []
    with to_app, app_in, from_app:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                await call("startup")
            except RuntimeError as exc:
                failure.append(exc)
                tg.cancel_scope.cancel()
            if not failure:
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        try:
                            await call("shutdown")
                        except RuntimeError as exc:
                            failure.append(exc)
    if failure:  # raised here, not wrapped in the task group's ExceptionGroup
        raise failure[0]


@pytest.fixture
def taskguard_config() -> GuardConfig | Mapping[str, Any]:
    """The configuration of ``taskguard_guard``; override it in a conftest or module."""
    return DEFAULT_CONFIG


async def _running_guard(
    request: pytest.FixtureRequest, taskguard_config: GuardConfig | Mapping[str, Any]
) -> AsyncIterator[TaskGuard]:
    guard = TaskGuard(taskguard_config)
    async with guard:
        yield guard
    if not guard.report.clean and request.node.get_closest_marker("taskguard_unclean_ok") is None:
        # Failed by the teardown hook below, not here: pytest-asyncio skips
        # restoring the context variables an async fixture set when its
        # teardown raises, and the closed guard would stay "current" for the
        # tests that follow.
        request.node.stash[_UNCLEAN] = guard.report.summary()


_UNCLEAN = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Fail the test whose ``taskguard_guard`` closed with an unclean report."""
    yield
    summary = item.stash.get(_UNCLEAN, None)
    if summary is not None:
        del item.stash[_UNCLEAN]
        pytest.fail(
            "taskguard: the shutdown report is not clean (mark the test "
            "@pytest.mark.taskguard_unclean_ok if that is expected):\n" + summary
        )


# The same async fixture, once for anyio's plugin (it runs async fixtures of
# tests that use `anyio_backend`) and once for pytest-asyncio (strict mode runs
# only fixtures declared with its decorator); `taskguard_guard` picks one.
_guard_anyio = pytest.fixture(name="_taskguard_guard_anyio")(_running_guard)

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is optional
    _guard_asyncio = None
else:

    @pytest_asyncio.fixture(name="_taskguard_guard_asyncio")
    async def _guard_asyncio(
        request: pytest.FixtureRequest, taskguard_config: GuardConfig | Mapping[str, Any]
    ) -> AsyncIterator[TaskGuard]:
        async for guard in _running_guard(request, taskguard_config):
            yield guard


@pytest.fixture
def taskguard_guard(request: pytest.FixtureRequest) -> TaskGuard:
    """A running guard (``taskguard_config``: exit wait 5 s), shut down at teardown.

    The test fails when the shutdown report is not clean, unless it is marked
    ``@pytest.mark.taskguard_unclean_ok``. Use it from async tests
    (pytest-asyncio or anyio); the guard runs on the test's event loop.
    """
    if "anyio_backend" in request.fixturenames:
        name = "_taskguard_guard_anyio"
    elif _guard_asyncio is not None:
        name = "_taskguard_guard_asyncio"
    else:  # pragma: no cover
        raise pytest.UsageError(
            "taskguard_guard needs an async test run by anyio's plugin or pytest-asyncio"
        )
    guard: TaskGuard = request.getfixturevalue(name)
    return guard
