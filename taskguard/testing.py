"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses taskguard.

``taskguard_guard`` gives a running :class:`TaskGuard` and shuts it down at
teardown, failing the test when the shutdown report is not clean (opt out with
``@pytest.mark.taskguard_unclean_ok``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._guard import TaskGuard

__all__ = ["taskguard_guard"]


@pytest.fixture
async def taskguard_guard(request: pytest.FixtureRequest) -> AsyncIterator[TaskGuard]:
    """A running guard (exit wait 5 s), shut down at teardown; the report must be clean."""
    guard = TaskGuard(exit_wait_timeout=5.0, cancel_grace=1.0)
    async with guard:
        yield guard
    if not guard.report.clean and request.node.get_closest_marker("taskguard_unclean_ok") is None:
        pytest.fail("taskguard: the shutdown report is not clean:\n" + guard.report.summary())
