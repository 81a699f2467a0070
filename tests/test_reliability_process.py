"""Fault cases in a real process: ``taskguard.run`` in a subprocess, real signals
sent with ``os.kill``, and the hard deadline that ends a process whose task or
hook never returns. The in-process fault cases are in tests/test_reliability.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from helpers_reliability import SCRIPT_PRELUDE, run_script

# Generous slack on top of every promised bound: 2 cores shared with other jobs.
SLACK = 2.0
BACKENDS = ["asyncio", "trio"]


# -- tasks -------------------------------------------------------------------------


def stubborn_script(exit_wait: float, cancel_grace: float) -> str:
    """A taskguard.run script whose one task swallows cancellation forever."""
    timeouts = f"exit_wait_timeout={exit_wait!r}, cancel_grace={cancel_grace!r}"
    run = f"taskguard.run(main, backend=BACKEND, {timeouts})"
    return SCRIPT_PRELUDE + STUBBORN_MAIN + f"\nfinish({run})\n"


STUBBORN_MAIN = """
async def stubborn_forever():
    while True:
        try:
            await anyio.sleep(0.02)
        except anyio.get_cancelled_exc_class():
            pass

async def main(guard):
    guard.spawn(stubborn_forever, name="stubborn")
    say("READY")
    await guard.wait_for_shutdown()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_swallowing_cancellation_forever_still_ends_the_process(
    tmp_path: Path, backend: str
) -> None:
    # No release here: the process itself must end. On asyncio taskguard.run
    # manages the loop's end and returns the report; on trio the abandoned
    # system task keeps trio.run from returning, so the hard deadline
    # (exit wait + cancel grace + hook timeouts + 2 s) ends the process.
    source = stubborn_script(exit_wait=0.5, cancel_grace=0.5)
    with run_script(tmp_path, source, backend) as proc:
        proc.wait_line("READY")
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        rc = proc.wait(0.5 + 0.5 + 2.0 + SLACK + 3)
        took = time.monotonic() - start
        err = proc.stderr()
        assert "stubborn_forever" in err, err  # the stuck task's stack was logged
        if backend == "asyncio":
            assert rc == 1, err  # the report came out, and it is not clean
            report = proc.report()
            assert [s["name"] for s in report["stuck"]] == ["stubborn"]
            assert took < 0.5 + 0.5 + SLACK + 1
        else:
            assert rc == 3, err  # EXIT_HARD: the hard deadline ended it
            assert "hard deadline" in err
            assert took < 0.5 + 0.5 + 2.0 + SLACK + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_handler_raising_keyboard_interrupt_does_not_hang(
    tmp_path: Path, backend: str
) -> None:
    # In a subprocess: the failure mode is a hang, and a hang must not take
    # the test run with it.
    source = (
        SCRIPT_PRELUDE
        + """
from taskguard import TaskGuard

def handler(exc, handle):
    raise KeyboardInterrupt("from the error handler")

async def fails():
    raise ValueError("boom")

async def sibling():
    await anyio.sleep(0.3)

async def main():
    guard = TaskGuard(exit_wait_timeout=1, cancel_grace=0.3, error_handler=handler)
    try:
        async with guard:
            guard.spawn(fails, name="fails")
            guard.spawn(sibling, name="sibling")
            await anyio.sleep(0.05)
    except BaseException as exc:
        say("ESCAPED", type(exc).__name__)
        raise
    finally:
        say("STATE", guard.state.value)
    say("REPORT", guard.report.model_dump_json())

try:
    anyio.run(main, backend=BACKEND)
except KeyboardInterrupt:
    say("END KeyboardInterrupt")
else:
    say("END normally")
"""
    )
    with run_script(tmp_path, source, backend) as proc:
        proc.wait(1 + 0.3 + SLACK + 5)
        # The handler's KeyboardInterrupt is logged, not raised into the event loop
        # (where it would skip the bookkeeping and leave the drain waiting).
        assert proc.wait_line("END") == "END normally", proc.stderr()
        assert proc.wait_line("STATE") == "STATE closed", proc.stderr()
        groups = proc.report()["groups"]["default"]
        assert (groups["completed"], groups["failed"]) == (1, 1)
        assert "the error_handler, handling task 'fails' failed" in proc.stderr()


# -- signals (real subprocess, real os.kill) -----------------------------------------

_HOOK_SCRIPT = (
    SCRIPT_PRELUDE
    + """
STAGE = sys.argv[2]

async def long_job():
    await anyio.sleep(30)

async def slow_hook():
    say("IN_HOOK")
    await anyio.sleep(1.5)
    say("HOOK_DONE")

async def main(guard):
    guard.spawn(long_job, name="long", group="work")
    guard.on_shutdown(slow_hook, stage=STAGE, timeout=5)
    say("READY")
    await guard.wait_for_shutdown()

finish(taskguard.run(main, backend=BACKEND, exit_wait_timeout=20, cancel_grace=1, hook_timeout=5))
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_signal_during_before_drain_hook_forces_the_drain(
    tmp_path: Path, backend: str
) -> None:
    with run_script(tmp_path, _HOOK_SCRIPT, backend, "before_drain") as proc:
        proc.wait_line("READY")
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.wait_line("IN_HOOK")
        proc.signal(signal.SIGTERM)  # second: force
        rc = proc.wait(1.5 + 1 + SLACK + 3)
        took = time.monotonic() - start
        report = proc.report()
        assert rc == 1, proc.stderr()  # drain work was cut: not clean
        assert report["forced"] is True
        assert report["groups"]["work"]["cut"] == 1
        assert report["stuck"] == []
        # the hook itself is not cut by the force: it ran to its end, once
        assert [(h["name"], h["outcome"]) for h in report["hooks"]] == [("slow_hook", "ok")]
        assert proc.lines.count("HOOK_DONE") == 1
        # far below the 20 s exit wait: the second signal ended the drain
        assert took < 1.5 + 1 + SLACK + 1, took


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_signal_during_after_drain_hook_does_not_cut_it(
    tmp_path: Path, backend: str
) -> None:
    source = _HOOK_SCRIPT.replace("await anyio.sleep(30)", "await anyio.sleep(0.2)")
    with run_script(tmp_path, source, backend, "after_drain") as proc:
        proc.wait_line("READY")
        proc.signal(signal.SIGTERM)
        proc.wait_line("IN_HOOK")
        proc.signal(signal.SIGTERM)  # second: the drain is over, nothing is left to force
        rc = proc.wait(1.5 + SLACK + 3)
        report = proc.report()
        assert rc == 0, proc.stderr()
        assert report["groups"]["work"]["completed"] == 1
        assert [(h["name"], h["outcome"]) for h in report["hooks"]] == [("slow_hook", "ok")]
        assert "HOOK_DONE" in proc.lines
        assert report["clean"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_signals_in_quick_succession_end_the_process(tmp_path: Path, backend: str) -> None:
    source = stubborn_script(exit_wait=30, cancel_grace=30)
    with run_script(tmp_path, source, backend) as proc:
        proc.wait_line("READY")
        start = time.monotonic()
        for _ in range(3):
            proc.signal(signal.SIGTERM)
            time.sleep(0.02)
        rc = proc.wait(SLACK + 5)
        took = time.monotonic() - start
        err = proc.stderr()
        assert rc == 128 + signal.SIGTERM, err
        assert "third exit signal" in err
        assert "stubborn" in err  # what was still running is named in the log
        assert took < SLACK + 2, took  # nowhere near exit wait + cancel grace (60 s)


# -- threads -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_hook_hanging_forever_is_ended_by_the_hard_deadline(
    tmp_path: Path, backend: str
) -> None:
    # A sync hook runs inline on the loop thread and cannot be interrupted;
    # only taskguard.run's hard deadline (exit wait + cancel grace + after-drain
    # hook timeouts + 2 s) bounds it. The process must still end, with status 3.
    source = (
        SCRIPT_PRELUDE
        + """
def hangs_forever():
    say("IN_HOOK")
    time.sleep(600)

async def main(guard):
    guard.on_shutdown(hangs_forever, timeout=0.5)
    say("READY")
    await guard.wait_for_shutdown()

finish(taskguard.run(main, backend=BACKEND, exit_wait_timeout=0.5, cancel_grace=0.5))
"""
    )
    with run_script(tmp_path, source, backend) as proc:
        proc.wait_line("READY")
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.wait_line("IN_HOOK")
        rc = proc.wait(0.5 + 0.5 + 0.5 + 2 + SLACK + 3)
        took = time.monotonic() - start
        err = proc.stderr()
        assert rc == 3, err
        assert "hard deadline" in err
        assert took < 0.5 + 0.5 + 0.5 + 2 + SLACK, took


@pytest.mark.parametrize("backend", BACKENDS)
def test_bare_run_waits_for_an_abandoned_task_at_loop_close(tmp_path: Path, backend: str) -> None:
    # The documented limit behind taskguard.run's own loop management: under a
    # bare asyncio.run / trio.run the guard returns its report on time, but the
    # loop's end then waits for the task it abandoned. (Killed by the test.)
    source = (
        SCRIPT_PRELUDE
        + """
import asyncio
from taskguard import TaskGuard

async def stubborn_forever():
    while True:
        try:
            await anyio.sleep(0.02)
        except anyio.get_cancelled_exc_class():
            pass

async def main():
    async with TaskGuard(exit_wait_timeout=0.2, cancel_grace=0.2) as guard:
        guard.spawn(stubborn_forever, name="stubborn")
    say("REPORT", guard.report.model_dump_json())

if BACKEND == "asyncio":
    asyncio.run(main())
else:
    import trio
    trio.run(main)
say("LOOP CLOSED")
"""
    )
    with run_script(tmp_path, source, backend) as proc:
        report = json.loads(proc.wait_line("REPORT ", timeout=15)[len("REPORT ") :])
        assert [s["name"] for s in report["stuck"]] == ["stubborn"]
        time.sleep(2.0)
        assert proc.popen.poll() is None  # still waiting at loop close
        assert "LOOP CLOSED" not in proc.lines


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exc_name", ["SystemExit", "KeyboardInterrupt"])
def test_background_task_raising_system_exit_is_its_failure_not_the_apps(
    tmp_path: Path, backend: str, exc_name: str
) -> None:
    # "Background failures never cancel siblings and never crash the app",
    # whatever they raise. In a subprocess: the failure mode ends the process.
    source = (
        SCRIPT_PRELUDE
        + f"""
from taskguard import TaskGuard

async def bad():
    await anyio.sleep(0.01)
    raise {exc_name}("from a background task")

async def sibling():
    await anyio.sleep(0.3)

async def main():
    guard = TaskGuard(exit_wait_timeout=2, cancel_grace=0.3)
    async with guard:
        bad_handle = guard.spawn(bad, name="bad")
        guard.spawn(sibling, name="sibling")
        await anyio.sleep(0.5)
        say("BODY", bad_handle.state)
    say("REPORT", guard.report.model_dump_json())

anyio.run(main, backend=BACKEND)
say("END")
"""
    )
    with run_script(tmp_path, source, backend) as proc:
        rc = proc.wait(10)
        assert rc == 0, proc.stderr()
        assert proc.wait_line("BODY", timeout=1) == "BODY failed"
        counts = proc.report()["groups"]["default"]
        assert (counts["completed"], counts["failed"]) == (1, 1)
        assert "END" in proc.lines
