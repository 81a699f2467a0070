"""Shared pieces of the reliability tests: releasable misbehaving tasks, real subprocesses.

Why "releasable": the guard abandons a task that swallows cancellation (it is
reported stuck and never waited on), but the event loop underneath is less
patient. ``asyncio.run``/``anyio.run`` cancel and wait for leftover tasks when
they close the loop, and ``trio.run`` waits for system tasks. An in-process
test that left such a task spinning forever would hang at loop close. So
in-process tests use tasks that swallow cancellation until a
``threading.Event`` is set, and set it after their assertions; tests of the
truly-forever case run ``taskguard.run`` in a subprocess, whose hard deadline
is part of what they check.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
from children import Child

REPO = Path(__file__).resolve().parent.parent


class LeakError(AssertionError):
    """A taskguard object outlived the test that made it (tests/conftest.py's leak check).

    A test whose leak is the core's fault is marked
    ``@pytest.mark.xfail(strict=True, raises=LeakError, reason="leak: ...")``.
    """


class Release:
    """A flag that lets a misbehaving task (or thread) end after the test's assertions."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.swallowed = 0

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    async def swallow_cancellation(self, tick: float = 0.02) -> str:
        """Ignore every cancellation until released (like a buggy `except BaseException`).

        After swallowing, it sleeps shielded: on trio a cancelled scope makes every
        later checkpoint raise at once, and an unshielded loop would spin the CPU.
        A native asyncio ``task.cancel()`` goes through that shield (the guard
        cancels asyncio tasks that way, and cancels again before it abandons one):
        that one is swallowed too, so the task stays stubborn on both backends.
        """
        while not self.event.is_set():
            try:
                with anyio.CancelScope(shield=self.swallowed > 0):
                    await anyio.sleep(tick)
            except anyio.get_cancelled_exc_class():
                self.swallowed += 1
        return "released"


@contextmanager
def sigint_inherited_as_default() -> Iterator[None]:
    """Children started meanwhile get SIGINT's default action (Ctrl-C works in them).

    A CI runner started in the background passes SIGINT ignored, and an ignored
    signal survives exec while a handler does not: so give this process a handler
    for the time being. (``preexec_fn`` could reset it in each child, but it runs
    Python between fork and exec, which is unsafe once grpc's threads exist: a
    child aborted there with an epoll error.)
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def run_script(tmp_path: Path, source: str, *args: str) -> Iterator[Child]:
    """Start ``source`` (dedented) as a Python script; it is killed in any case at the end."""
    script = tmp_path / f"script_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("TASKGUARD_")}
    with Child([sys.executable, str(script), *args], cwd=tmp_path, env=env,
               stderr=script.with_suffix(".stderr")) as proc:  # fmt: skip
        yield proc


# The prelude of every subprocess script: prints the report as one JSON line and
# exits 0 when it is clean, 1 otherwise.
SCRIPT_PRELUDE = """
import logging, os, signal, sys, time
import anyio
import taskguard

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
BACKEND = sys.argv[1]


def say(*parts):
    print(*parts, flush=True)


def finish(report):
    say("REPORT", report.model_dump_json())
    sys.exit(0 if report.clean else 1)
"""


class Hygiene:
    """Collects what a run leaves behind instead of raising it somewhere else later:
    warnings (e.g. "coroutine ... was never awaited", after a ``gc.collect(1)``),
    unraisable exceptions, exceptions in threads, and asyncio's "exception was
    never retrieved" / "Task was destroyed" log records. ``check()`` fails with
    all of them.

    Used per hypothesis example, so a finding is shrunk to the call that caused
    it rather than reported by pytest's own hooks at the end of the test.
    """

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._warnings = warnings.catch_warnings(record=True)
        self._records: list[warnings.WarningMessage] = []
        self._asyncio = _ListHandler(logging.ERROR)

    def __enter__(self) -> Hygiene:
        self._records = self._warnings.__enter__()
        warnings.simplefilter("always")
        self._old_unraisable = sys.unraisablehook
        self._old_excepthook = threading.excepthook
        sys.unraisablehook = self._unraisable
        threading.excepthook = self._thread_exception
        logging.getLogger("asyncio").addHandler(self._asyncio)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            # A refused coroutine that nobody closed warns when it is collected: a
            # young cycle (held by a traceback) goes with the young generations;
            # an older one is caught by pytest's own hooks at the end of the test.
            gc.collect(1)
        finally:
            logging.getLogger("asyncio").removeHandler(self._asyncio)
            sys.unraisablehook = self._old_unraisable
            threading.excepthook = self._old_excepthook
            self._warnings.__exit__(None, None, None)
        self.problems += [f"warning: {w.category.__name__}: {w.message}" for w in self._records]
        self.problems += [f"asyncio logged: {msg}" for msg in self._asyncio.messages]

    def _unraisable(self, unraisable: Any) -> None:
        self.problems.append(
            f"unraisable: {safe_repr(unraisable.exc_value)} ({unraisable.err_msg} "
            f"{safe_repr(unraisable.object)})"
        )

    def _thread_exception(self, args: Any) -> None:
        name = args.thread.name if args.thread is not None else "?"
        self.problems.append(f"exception in thread {name}: {safe_repr(args.exc_value)}")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


class _ListHandler(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception as exc:  # a user object's repr raised: still a problem to report
            self.messages.append(f"<unformattable record {record.msg!r}: {exc!r}>")


def safe_repr(obj: object) -> str:
    """repr() that survives objects whose __repr__ raises (the fuzz tests make such)."""
    try:
        return repr(obj)
    except Exception as exc:
        return f"<{type(obj).__name__} whose repr raised {type(exc).__name__}>"


def forget_dead_guard(guard: object) -> bool:
    """Unregister a guard whose ``async with`` raised before it left the registry of
    running guards; True if it had to.

    A test-isolation tool, not a fix: when a guard's supervisor dies (issue 11,
    finding 1 and the fault tests), ``TaskGuard.__aexit__`` raises before it
    calls ``_current.leave``, so ``taskguard.current()`` would return that dead
    guard for the rest of the test process (see
    test_faults.py::test_a_guard_whose_shutdown_failed_is_not_current_any_more).
    """
    from taskguard import _current

    running = _current._RUNNING
    if guard in running:
        running.remove(guard)
        return True
    return False
