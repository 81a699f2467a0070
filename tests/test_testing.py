"""The pytest plugin (taskguard.testing) under pytest-asyncio and anyio's plugin."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

# No markers here: the plugin registers taskguard_unclean_ok itself, so a user's
# --strict-markers run knows it.
INI = """
[pytest]
addopts = --strict-markers
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

TESTS = """
import anyio, pytest, taskguard
from taskguard.testing import shutdown_and_wait, simulate_signal

async def _work(guard, seconds):
    async def job():
        await anyio.sleep(seconds)
    guard.spawn(job)

@pytest.mark.{marker}
async def test_clean(taskguard_guard):
    assert taskguard_guard.state is taskguard.State.RUNNING
    await _work(taskguard_guard, 0.05)

@pytest.mark.{marker}
async def test_unclean_fails(taskguard_guard):
    async def stubborn():
        await anyio.sleep(60)
    taskguard_guard.spawn(stubborn)

@pytest.mark.{marker}
@pytest.mark.taskguard_unclean_ok
async def test_unclean_ok(taskguard_guard):
    async def stubborn():
        await anyio.sleep(60)
    taskguard_guard.spawn(stubborn)

@pytest.mark.{marker}
@pytest.mark.taskguard_unclean_ok  # the forced shutdown cuts the job
async def test_signal_helpers(taskguard_guard):
    await _work(taskguard_guard, 1.0)
    await simulate_signal(taskguard_guard)
    assert taskguard_guard.ready is False
    await simulate_signal(taskguard_guard)  # the second forces it
    report = await shutdown_and_wait(taskguard_guard)
    assert report.trigger == "signal SIGTERM"
    assert report.forced
"""

CONFTEST = """
import pytest

@pytest.fixture
def taskguard_config():
    return {"exit_wait_timeout": 0.2, "cancel_grace": 0.1}
"""


@pytest.mark.parametrize(
    ("marker", "extra"),
    [
        ("asyncio", ""),
        ("anyio", "@pytest.fixture(params=['asyncio', 'trio'])\n"
                  "def anyio_backend(request):\n    return request.param\n"),
    ],
)  # fmt: skip
def test_fixture_and_helpers(pytester: pytest.Pytester, marker: str, extra: str) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST + extra)
    pytester.makepyfile(test_user=TESTS.replace("{marker}", marker))
    result = pytester.runpytest("-q")  # the plugin comes from its pytest11 entry point
    runs = 1 if marker == "asyncio" else 2  # anyio: asyncio and trio
    # test_unclean_fails passes, then errors at teardown: the report was not clean
    result.assert_outcomes(passed=4 * runs, errors=1 * runs)
    result.stdout.fnmatch_lines(["*the shutdown report is not clean*"])


def test_the_helpers_import_without_pytest() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pytest'] = None\n"  # importing pytest now fails
        "import taskguard.testing as t\n"
        "print(sorted(t.__all__))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "shutdown_and_wait" in out
