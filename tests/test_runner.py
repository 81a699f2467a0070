"""taskguard.run and the ``taskguard run`` command: real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from children import Child

import taskguard
from taskguard import TaskGuard
from taskguard._backends import BackendName

BACKENDS = ["asyncio", "trio"]

SCRIPT_PRELUDE = """
import logging, sys, anyio, taskguard
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")
"""


def _child(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Child:
    """A script or command of these tests, stderr merged into its output lines."""
    return Child(args, cwd=cwd, env={**os.environ, **(env or {})}, stderr="merge")


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(SCRIPT_PRELUDE + textwrap.dedent(body))
    return path


RUN_SCRIPT = """
async def main(guard):
    async def work():
        async with guard.guarded("work"):
            print("WORKING", flush=True)
            await anyio.sleep(float(sys.argv[2]))
            print("WORK DONE", flush=True)

    guard.spawn(work)
    await guard.wait_for_shutdown()
    print("MAIN RETURNS", flush=True)

report = taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=30, cancel_grace=1)
print("REPORT CLEAN", report.clean, flush=True)
sys.exit(0 if report.clean else 1)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_mid_work_finishes_guarded_work_and_exits_0(tmp_path: Path, backend: str) -> None:
    script = write(tmp_path, "app.py", RUN_SCRIPT)
    with _child([sys.executable, str(script), backend, "1.0"], tmp_path) as proc:
        proc.wait_for("WORKING")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        elapsed = time.monotonic() - sent
        out = proc.output()
        assert status == 0, out
        assert "WORK DONE" in out
        assert out.index("MAIN RETURNS") < out.index("WORK DONE")  # main returns first
        assert "REPORT CLEAN True" in out
        assert "exit signal SIGTERM: shutting down" in out
        assert "taskguard shutdown clean: trigger=signal SIGTERM" in out
        assert 0.5 < elapsed < 1.0 + 5  # waited for the work, then no longer


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_sigterm_forces_a_quick_exit(tmp_path: Path, backend: str) -> None:
    script = write(tmp_path, "app.py", RUN_SCRIPT)
    with _child([sys.executable, str(script), backend, "60"], tmp_path) as proc:
        proc.wait_for("WORKING")
        proc.signal(signal.SIGTERM)
        proc.wait_for("shutdown started")
        time.sleep(0.2)
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        out = proc.output()
        assert time.monotonic() - sent < 5, out
        assert status == 1, out  # the cut work makes the report not clean
        assert "second exit signal SIGTERM: forcing shutdown" in out
        assert "WORK DONE" not in out
        assert "(forced)" in out


STUCK_SCRIPT = """
async def main(guard):
    async def swallower():
        print("WORKING", flush=True)
        while True:
            try:
                await anyio.sleep(0.05)
            except anyio.get_cancelled_exc_class():
                pass

    guard.spawn(swallower)
    await guard.wait_for_shutdown()

report = taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=float(sys.argv[2]),
                       cancel_grace=float(sys.argv[3]))
print("REPORT CLEAN", report.clean, "STUCK", [s.name for s in report.stuck], flush=True)
sys.exit(0 if report.clean else 1)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_signal_ends_the_process_at_once(tmp_path: Path, backend: str) -> None:
    script = write(tmp_path, "stuck.py", STUCK_SCRIPT)
    with _child([sys.executable, str(script), backend, "30", "30"], tmp_path) as proc:
        proc.wait_for("WORKING")
        proc.signal(signal.SIGTERM)
        proc.wait_for("shutdown started")
        proc.signal(signal.SIGTERM)
        proc.wait_for("shutdown forced")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=10)
        out = proc.output()
        assert time.monotonic() - sent < 3, out
        assert status == 128 + signal.SIGTERM, out
        assert "third exit signal (SIGTERM)" in out
        assert "still running: swallower" in out


def test_hard_deadline_ends_a_trio_process_with_a_stuck_task(tmp_path: Path) -> None:
    # On trio an abandoned task keeps trio.run from returning: only the hard
    # deadline (exit wait + cancel grace + hooks + 2 s slack) ends the process.
    script = write(tmp_path, "stuck.py", STUCK_SCRIPT)
    with _child([sys.executable, str(script), "trio", "0.5", "0.5"], tmp_path) as proc:
        proc.wait_for("WORKING")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        out = proc.output()
        assert status == 3, out
        assert time.monotonic() - sent < 0.5 + 0.5 + 2 + 3, out
        assert "hard deadline" in out
        assert "abandoned swallower" in out
        assert "REPORT CLEAN" not in out


def test_asyncio_run_is_bounded_with_a_stuck_task(tmp_path: Path) -> None:
    # On asyncio taskguard.run manages the loop's end itself: the stuck task is
    # left behind and run() returns its report.
    script = write(tmp_path, "stuck.py", STUCK_SCRIPT)
    with _child([sys.executable, str(script), "asyncio", "0.5", "0.5"], tmp_path) as proc:
        proc.wait_for("WORKING")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        out = proc.output()
        assert status == 1, out
        assert time.monotonic() - sent < 0.5 + 0.5 + 2 + 3, out
        assert "REPORT CLEAN False STUCK ['swallower']" in out


CLI_MODULE = """
async def serve(guard):
    async def work():
        print("WORKING", flush=True)
        await anyio.sleep(0.5)
        print("WORK DONE", flush=True)

    guard.spawn(work, group="jobs")
    await guard.wait_for_shutdown()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_run_module_function(tmp_path: Path, backend: str) -> None:
    write(tmp_path, "myservice.py", CLI_MODULE)
    args = [sys.executable, "-m", "taskguard", "run", "myservice:serve", "--backend", backend]
    with _child([*args, "--json"], tmp_path, env={"TASKGUARD_EXIT_WAIT_TIMEOUT": "20"}) as proc:
        proc.wait_for("WORKING")
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        out = proc.output()
        assert status == 0, out
        assert "WORK DONE" in out
        assert '"clean": true' in out
        assert '"trigger": "signal SIGTERM"' in out


def test_cli_errors(tmp_path: Path) -> None:
    write(tmp_path, "myservice.py", CLI_MODULE)
    base = [sys.executable, "-m", "taskguard", "run"]
    bad_target = subprocess.run(
        [*base, "nocolon"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert bad_target.returncode != 0
    assert "package.module:function" in bad_target.stderr
    missing = subprocess.run(
        [*base, "myservice:nope"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert missing.returncode != 0
    assert "nope" in missing.stderr
    env = {**os.environ, "TASKGUARD_EXIT_WAIT_TIMEOUT": "soon"}
    bad_env = subprocess.run(
        [*base, "myservice:serve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert bad_env.returncode == 2
    assert "exit_wait_timeout" in bad_env.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_in_process_returns_the_report(backend: BackendName) -> None:
    seen: list[str] = []

    async def main(guard: TaskGuard, word: str) -> None:
        async def job() -> None:
            seen.append(word)

        guard.spawn(job)
        guard.shutdown(reason="done")
        await guard.wait_for_shutdown()

    report = taskguard.run(main, "hello", backend=backend, handle_signals=False)
    assert seen == ["hello"]
    assert report.clean
    assert report.trigger == "done"
    assert report.guarded.completed == 1  # main itself


def test_run_reraises_mains_exception_after_shutdown() -> None:
    done: list[str] = []

    async def main(guard: TaskGuard) -> None:
        async def job() -> None:
            import anyio

            await anyio.sleep(0.1)
            done.append("job")

        guard.spawn(job)
        raise RuntimeError("main failed")

    with pytest.raises(RuntimeError, match="main failed"):
        taskguard.run(main, handle_signals=False)
    assert done == ["job"]


def test_run_argument_errors() -> None:
    async def idle(guard: TaskGuard) -> None:
        pass

    with pytest.raises(TypeError):
        taskguard.run(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        taskguard.run(idle, backend="curio")  # type: ignore[arg-type]


EARLY_SIGNAL_SCRIPT = """
import os, signal

async def main(guard):
    # no await before the signal: the handlers must already be in place
    os.kill(os.getpid(), signal.SIGTERM)
    print("STILL ALIVE", flush=True)
    await guard.wait_for_shutdown()

report = taskguard.run(main, backend=sys.argv[1])
print("REPORT", report.trigger, report.clean, flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_signal_handlers_are_installed_before_main_runs(tmp_path: Path, backend: str) -> None:
    script = write(tmp_path, "early.py", EARLY_SIGNAL_SCRIPT)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        status = proc.wait(timeout=30)
        out = proc.output()
        assert status == 0, out
        assert "STILL ALIVE" in out
        assert "REPORT signal SIGTERM True" in out


def test_run_respects_handle_signals_from_the_config() -> None:
    seen: list[bool] = []

    async def main(guard: TaskGuard) -> None:
        seen.append(guard.config.handle_signals)

    taskguard.run(main, config={"handle_signals": False})
    taskguard.run(main, config=taskguard.GuardConfig(handle_signals=False))
    assert seen == [False, False]


# -- promises under attack (issue 11): the budget, the watchdog, signals ------------

STUBBORN_HOOKS_SCRIPT = """
async def main(guard):
    for i in range(10):
        async def stubborn(i=i):
            try:
                await anyio.sleep(30)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.3)  # ignores its cancellation for a while
            print("UNREACHABLE", flush=True)

        guard.on_shutdown(stubborn, timeout=0.1, name=f"hook{i}")
    print("READY", flush=True)
    await guard.wait_for_shutdown()

report = taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=1, cancel_grace=0)
print("HOOKS", len(report.hooks), flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_deadline_counts_the_grace_each_stubborn_hook_gets(
    tmp_path: Path, backend: str
) -> None:
    # Finding 4: ten async after_drain hooks of 0.1 s that each unwind for 0.3 s
    # after their cancellation. The sequence allows each one its timeout and
    # then a grace before it is abandoned; the hard deadline must count that
    # too, or it ends the process before the last hooks ran.
    script = write(tmp_path, "hooks.py", STUBBORN_HOOKS_SCRIPT)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        status, out = proc.sigterm_when_ready(timeout=30)
        assert status == 0, out
        assert "HOOKS 10" in out
        assert "hard deadline" not in out


STUCK_SECTION_AFTER_RUN = """
import time

async def main(guard):
    async def stuck():
        async with guard.guarded("stuck section"):
            while True:
                try:
                    await anyio.sleep(0.05)
                except anyio.get_cancelled_exc_class():
                    pass

    guard.spawn(stuck)
    print("READY", flush=True)
    await guard.wait_for_shutdown()

report = taskguard.run(main, exit_wait_timeout=0.3, cancel_grace=0.2)
print("RUN RETURNED", report.clean, flush=True)
time.sleep(4)  # past the hard deadline (0.3 + 0.2 + 2 s): the program goes on
print("STILL ALIVE", flush=True)
"""


def test_a_stuck_async_section_does_not_keep_the_watchdog_armed_after_run(
    tmp_path: Path,
) -> None:
    # Finding 5 (asyncio: on trio an abandoned task keeps trio.run from returning).
    script = write(tmp_path, "after_run.py", STUCK_SECTION_AFTER_RUN)
    with _child([sys.executable, str(script)], tmp_path) as proc:
        status, out = proc.sigterm_when_ready(timeout=20)
        assert "RUN RETURNED False" in out
        assert "STILL ALIVE" in out, out
        assert status == 0, out
        assert "worker thread" not in out


BLOCKED_HOOK_SCRIPT = """
import time

async def main(guard):
    def blocking_hook():
        print("HOOK BLOCKS", flush=True)
        time.sleep(20)

    guard.on_shutdown(blocking_hook, stage="before_drain")
    print("READY", flush=True)
    await guard.wait_for_shutdown()

taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=30)
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_third_signal_ends_the_process_while_the_loop_is_blocked(
    tmp_path: Path, backend: str, sig: signal.Signals
) -> None:
    # Finding 6: signals are counted in the signal handler, not by a task of
    # the (blocked) event loop.
    script = write(tmp_path, "blocked.py", BLOCKED_HOOK_SCRIPT)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        proc.wait_for("READY")
        proc.signal(sig)
        proc.wait_for("HOOK BLOCKS")
        time.sleep(0.2)
        sent = time.monotonic()
        proc.signal(sig)
        time.sleep(0.2)
        proc.signal(sig)
        status = proc.wait(timeout=15)
        out = proc.output()
        assert status == 128 + sig, out
        assert time.monotonic() - sent < 5, out
        assert f"third exit signal ({sig.name})" in out


BLOCKED_FROM_THE_START = """
import time

async def main(guard):
    print("READY", flush=True)
    time.sleep(60)  # never gives the loop back

taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=0.5, cancel_grace=0.5)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_deadline_is_armed_by_the_first_signal_even_if_the_loop_never_runs(
    tmp_path: Path, backend: str
) -> None:
    script = write(tmp_path, "blocked.py", BLOCKED_FROM_THE_START)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        proc.wait_for("READY")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
        out = proc.output()
        assert status == 3, out
        assert time.monotonic() - sent < 0.5 + 0.5 + 2 + 3, out
        assert "hard deadline" in out


NESTED_GUARD_SCRIPT = """
from taskguard import TaskGuard

async def main(guard):
    async with TaskGuard(handle_signals=True):
        pass  # an inner component's own guard, closed again

    async def drain_work():
        await anyio.sleep(0.5)
        print("DRAIN WORK DONE", flush=True)

    guard.spawn(drain_work)
    print("READY", flush=True)
    await guard.wait_for_shutdown()

report = taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=10)
print("CLEAN", report.clean, flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inner_signal_handling_guard_gives_the_signals_back(
    tmp_path: Path, backend: str
) -> None:
    # Finding 7: when the inner guard closes, SIGTERM must reach the outer one
    # again (not the default action, which would kill the process mid-drain).
    script = write(tmp_path, "nested.py", NESTED_GUARD_SCRIPT)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        status, out = proc.sigterm_when_ready(timeout=15)
        assert status == 0, out
        assert "DRAIN WORK DONE" in out
        assert "CLEAN True" in out


REREGISTERING_HOOK_SCRIPT = """
async def main(guard):
    async def again():
        await anyio.sleep(0.01)
        guard.on_shutdown(again)  # a retry loop in a hook

    guard.on_shutdown(again)
    print("READY", flush=True)
    await guard.wait_for_shutdown()

report = taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=1, hook_timeout=1)
print("HOOKS", [h.outcome for h in report.hooks], flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hook_registering_itself_again_does_not_extend_the_shutdown(
    tmp_path: Path, backend: str
) -> None:
    # Finding 8: registration is refused from the stopping phase on, and the
    # hard deadline never moves.
    script = write(tmp_path, "again.py", REREGISTERING_HOOK_SCRIPT)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        proc.wait_for("READY")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=15)
        out = proc.output()
        assert time.monotonic() - sent < 1 + 5 + 2 + 3, out
        assert status == 0, out
        assert "HOOKS ['error']" in out, out
        assert "ShuttingDownError" in out


TO_THREAD_SCRIPT = """
import time

async def main(guard):
    async def blocking_work():
        await anyio.to_thread.run_sync(time.sleep, 30)

    guard.spawn(blocking_work)
    print("READY", flush=True)
    await guard.wait_for_shutdown()

report = taskguard.run(main, backend=sys.argv[1], exit_wait_timeout=0.5, cancel_grace=0.5)
print("RUN RETURNED", report.clean, flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_thread_work_does_not_outlive_the_budget(tmp_path: Path, backend: str) -> None:
    # Finding 11: the worker thread of a cut to_thread call is not waited for
    # beyond the budget (exit wait + cancel grace + 2 s slack): the interpreter
    # would wait 30 s for it at exit, so the hard deadline stays armed and ends
    # the process, naming the thread. On asyncio run() returns its report first;
    # on trio the task waiting for its thread cannot be cancelled, so it is
    # abandoned and (as any abandoned task on trio) keeps trio.run from returning.
    script = write(tmp_path, "thread.py", TO_THREAD_SCRIPT)
    with _child([sys.executable, str(script), backend], tmp_path) as proc:
        proc.wait_for("READY")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
        out = proc.output()
        assert time.monotonic() - sent < 0.5 + 0.5 + 2 + 3, out
        assert status == 3, out
        assert "hard deadline" in out
        if backend == "asyncio":
            assert "RUN RETURNED False" in out
            assert "worker thread still running: AnyIO worker thread" in out
