"""Exit signals under a blocked event loop, in real processes.

``taskguard.run`` runs in a subprocess (asyncio and trio); at one phase of its
life (running, drain_delay, before_drain, drain, stopping, after_drain) sync
code blocks the event loop: a task in ``time.sleep``, a blocking sync
before_drain / after_drain hook, a blocking sync guarded section, a task that
blocks while it unwinds its cancellation. The test sends real SIGTERM / SIGINT
with ``os.kill`` while the loop is blocked, and checks the promises of
docs/guarantees.md (5, "Signals do what they say, at any moment", and 3,
"Shutdown ends within its budget"), which design.md makes explicit: "Exit
signals are counted where they arrive (the signal handler), not by a task of
the event loop, so the second and third signal work even while the loop is
blocked by sync code":

- the third exit signal ends the process at once, status 128 + N, even while
  the loop is blocked (it never runs again);
- the second forces the shutdown: once the loop runs again the drain ends at
  once, it does not wait for the exit wait;
- the hard deadline (status 3) holds from the first signal on, even if the
  loop never runs again.

Times are asserted with generous bounds only. Each process is killed at the end
in any case (``run_script``).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from children import Child
from helpers_reliability import SCRIPT_PRELUDE, run_script

pytestmark = pytest.mark.slow

BACKENDS = ["asyncio", "trio"]
PHASES = ["running", "drain_delay", "before_drain", "drain", "stopping", "after_drain"]
SLACK = 3.0
FOREVER = 600.0
FINDING_6 = (
    "finding 6: exit signals are counted by a task of the event loop, so they are not seen "
    "while sync code blocks it"
)

# The script: argv = BACKEND PHASE BLOCK_SECONDS EXIT_WAIT. It prints READY once the
# signal handlers are in place, BLOCKED just before the loop is blocked at PHASE.
BLOCKED_SCRIPT = (
    SCRIPT_PRELUDE
    + """
PHASE = sys.argv[2]
BLOCK = float(sys.argv[3])
EXIT_WAIT = float(sys.argv[4])
HOOK_TIMEOUT = float(sys.argv[5])


def block(where):
    say("BLOCKED", where)
    time.sleep(BLOCK)  # sync code on the loop thread: the whole loop stands still
    say("UNBLOCKED", where)


async def long_work():
    await anyio.sleep(30)
    say("LONG WORK DONE")


async def blocks_when_running():
    await anyio.sleep(0.3)
    block("running")


async def blocks_when_cancelled():
    try:
        await anyio.sleep(600)
    except anyio.get_cancelled_exc_class():
        block("stopping")
        raise


async def main(guard):
    guard.spawn(long_work, name="long_work", group="work")

    @guard.guarded("blocking section")
    def blocking_section():
        block("drain")

    if PHASE == "running":
        guard.spawn(blocks_when_running, name="blocker")
    elif PHASE == "before_drain":
        guard.on_shutdown(lambda: block("before_drain"), stage="before_drain", name="blocker")
    elif PHASE == "after_drain":
        guard.on_shutdown(lambda: block("after_drain"), name="blocker")
    elif PHASE == "stopping":
        guard.spawn(blocks_when_cancelled, name="blocker")  # cut at the exit wait
    say("READY")
    await guard.wait_for_shutdown()
    if PHASE == "drain_delay":
        block("drain_delay")
    elif PHASE == "drain":
        await guard.wait_for_intake_stop()
        await anyio.sleep(0.2)  # past the before_drain hooks: the drain runs
        blocking_section()


config = dict(
    exit_wait_timeout=EXIT_WAIT,
    cancel_grace=0.5,
    hook_timeout=HOOK_TIMEOUT,
    drain_delay=EXIT_WAIT / 2 if PHASE == "drain_delay" else 0,
)
finish(taskguard.run(main, backend=BACKEND, **config))
"""
)


def start_blocked(proc: Child, phase: str, sig: int) -> float:
    """Bring the process to ``phase`` with its loop blocked; return when the first
    exit signal was sent (for "running" the loop is blocked before it)."""
    proc.wait_line("READY")
    if phase == "running":
        proc.wait_line("BLOCKED")
        first = time.monotonic()
        proc.signal(sig)
        return first
    first = time.monotonic()
    proc.signal(sig)
    proc.wait_line("BLOCKED", timeout=15)
    return first


# -- the third signal ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "sig"),
    [(phase, signal.SIGTERM) for phase in PHASES]
    + [("running", signal.SIGINT), ("before_drain", signal.SIGINT)],
    ids=[*PHASES, "running-INT", "before_drain-INT"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_third_signal_ends_the_process_at_once_while_the_loop_is_blocked(
    tmp_path: Path, backend: str, phase: str, sig: int
) -> None:
    # the long work holds the drain: a short exit wait lets the sequence reach the
    # phases that come after it
    exit_wait = 1.0 if phase in ("stopping", "after_drain") else 30.0
    args = (backend, phase, str(FOREVER), str(exit_wait), "30")
    with run_script(tmp_path, BLOCKED_SCRIPT, *args) as proc:
        start_blocked(proc, phase, sig)
        for _ in range(2):  # the second and the third
            time.sleep(0.05)
            proc.signal(sig)
        third = time.monotonic()
        rc = proc.wait(SLACK + 2)
        took = time.monotonic() - third
        err = proc.stderr()
        assert rc == 128 + sig, err
        assert "third exit signal" in err
        assert "UNBLOCKED" not in proc.lines  # it did not wait for the loop
        assert took < SLACK + 2, took


# -- the second signal -----------------------------------------------------------------------

BLOCK = 3.0  # a block that ends: what the second signal did shows once the loop runs


@pytest.mark.parametrize(
    ("backend", "phase"),
    [
        pytest.param(backend, phase)
        for backend in BACKENDS
        for phase in ("running", "drain_delay", "before_drain", "drain")
    ],
)
def test_second_signal_while_the_loop_is_blocked_forces_the_drain(
    tmp_path: Path, backend: str, phase: str
) -> None:
    # 30 s of long work and a 20 s exit wait: only the force ends the drain early.
    args = (backend, phase, str(BLOCK), "20", "5")
    with run_script(tmp_path, BLOCKED_SCRIPT, *args) as proc:
        start_blocked(proc, phase, signal.SIGTERM)
        time.sleep(0.05)
        proc.signal(signal.SIGTERM)
        second = time.monotonic()
        rc = proc.wait(BLOCK + SLACK + 5)
        took = time.monotonic() - second
        report = proc.report()
        assert rc == 1, proc.stderr()  # the long work was cut: not clean
        assert report["forced"] is True
        assert report["groups"]["work"]["cut"] == 1
        assert "LONG WORK DONE" not in proc.lines
        assert took < BLOCK + SLACK + 2, took  # far below the 20 s exit wait


@pytest.mark.parametrize(
    "backend",
    [
        "asyncio",
        "trio",
    ],
)
def test_second_signal_while_an_after_drain_hook_blocks_changes_nothing(
    tmp_path: Path, backend: str
) -> None:
    # After the drain there is nothing left to force: the hook ends, the
    # process exits with the report.
    args = (backend, "after_drain", str(BLOCK), "1", "5")
    with run_script(tmp_path, BLOCKED_SCRIPT, *args) as proc:
        start_blocked(proc, "after_drain", signal.SIGTERM)
        time.sleep(0.05)
        proc.signal(signal.SIGTERM)
        rc = proc.wait(BLOCK + 1 + SLACK + 5)
        report = proc.report()
        assert rc == 1, proc.stderr()  # the long work was cut at the 1 s exit wait
        assert "UNBLOCKED after_drain" in proc.lines
        assert [h["name"] for h in report["hooks"]] == ["blocker"]


# -- the hard deadline -------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_deadline_holds_from_the_first_signal_even_if_the_loop_never_runs_again(
    tmp_path: Path, backend: str, phase: str
) -> None:
    exit_wait, cancel_grace, hook_timeout = 1.0, 0.5, 0.5
    # taskguard.run: exit wait + cancel grace + after_drain hook timeouts + 2 s
    hooks = hook_timeout if phase == "after_drain" else 0.0
    budget = exit_wait + cancel_grace + hooks + 2.0
    args = (backend, phase, str(FOREVER), str(exit_wait), str(hook_timeout))
    with run_script(tmp_path, BLOCKED_SCRIPT, *args) as proc:
        first = start_blocked(proc, phase, signal.SIGTERM)
        rc = proc.wait(budget + SLACK + 2)
        took = time.monotonic() - first
        err = proc.stderr()
        assert rc == 3, err
        assert "hard deadline" in err
        assert "UNBLOCKED" not in proc.lines
        assert took < budget + SLACK, took


# -- a signal the kernel hands to another thread -----------------------------------------------

OTHER_THREAD_SCRIPT = (
    SCRIPT_PRELUDE
    + """
import threading


async def idle():
    await anyio.sleep(60)  # the loop's only timer: it would wake for nothing else


async def main(guard):
    guard.spawn(idle, group="idle")
    say("READY")

    def raise_later():
        # raise_signal() in a worker thread, while the loop idles: the C-level
        # handler runs in this thread; Python runs the guard's handler only once
        # the main thread executes bytecode again
        time.sleep(0.5)
        say("SENT", time.monotonic())
        signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=raise_later, daemon=True).start()
    await guard.wait_for_shutdown()
    say("SHUTDOWN", time.monotonic())


finish(taskguard.run(main, backend=BACKEND, exit_wait_timeout=1, cancel_grace=0.5,
                     groups={"idle": {"on_shutdown": "cancel"}}))
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_delivered_to_another_thread_wakes_the_idle_loop(
    tmp_path: Path, backend: str
) -> None:
    """A process-directed signal may be delivered to any thread that does not
    block it (the watchdog's, a worker's); there the C-level handler only sets a
    flag. An idle event loop must still wake at once to run the guard's handler
    (trio does it with its wake-up fd; on asyncio the guard sets one)."""
    with run_script(tmp_path, OTHER_THREAD_SCRIPT, backend) as proc:
        sent = float(proc.wait_line("SENT", timeout=15).split()[1])
        seen = float(proc.wait_line("SHUTDOWN", timeout=30).split()[1])
        assert proc.wait(15) == 0, proc.stderr()
    assert seen - sent < 2.0, (seen - sent, proc.stderr())
