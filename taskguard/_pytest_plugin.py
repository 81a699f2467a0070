"""The pytest plugin of taskguard (entry point ``pytest11``, loaded by pytest itself).

Fixtures:

* ``taskguard_guard`` — a running :class:`~taskguard.TaskGuard`, shut down at
  teardown; the test fails when the shutdown report is not clean (opt out with
  ``@pytest.mark.taskguard_unclean_ok``, which this plugin registers, so
  ``--strict-markers`` knows it). Works in async tests run by pytest-asyncio
  (``@pytest.mark.asyncio``) and by anyio's plugin (``@pytest.mark.anyio``,
  asyncio and trio). Override the ``taskguard_config`` fixture to configure it.

The helpers usable without pytest are in :mod:`taskguard.testing`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Mapping
from typing import Any

import pytest

from ._config import GuardConfig
from ._guard import TaskGuard

__all__ = ["DEFAULT_CONFIG", "taskguard_config", "taskguard_guard"]

#: what ``taskguard_guard`` uses unless ``taskguard_config`` is overridden
DEFAULT_CONFIG: dict[str, Any] = {"exit_wait_timeout": 5.0, "cancel_grace": 1.0}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "taskguard_unclean_ok: the taskguard_guard fixture does not fail the test when "
        "its shutdown report is not clean",
    )


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
