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

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parent.parent


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
        """
        while not self.event.is_set():
            try:
                await anyio.sleep(tick)
            except anyio.get_cancelled_exc_class():
                self.swallowed += 1
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(tick)
        return "released"


class Proc:
    """A real child process; stdout is read line by line on a thread."""

    def __init__(self, popen: subprocess.Popen[str], stderr_path: Path) -> None:
        self.popen = popen
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, prefix: str, timeout: float = 15.0) -> str:
        """Wait for a stdout line starting with ``prefix``; fail with the output if none."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line {prefix!r} within {timeout}s; rc={self.popen.poll()}\n"
                        f"stdout: {self.lines}\nstderr: {self.stderr()}"
                    )
                self._cond.wait(min(left, 0.1))

    def kill(self, sig: int = signal.SIGTERM) -> None:
        os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process still running after {timeout}s\nstdout: {self.lines}\n"
                f"stderr: {self.stderr()}"
            ) from None
        self._reader.join(5)
        return rc

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def report(self) -> dict[str, Any]:
        """The JSON report the script printed as ``REPORT {...}``."""
        line = self.wait_line("REPORT ", timeout=1)
        return json.loads(line[len("REPORT ") :])  # type: ignore[no-any-return]


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
def run_script(tmp_path: Path, source: str, *args: str) -> Iterator[Proc]:
    """Start ``source`` (dedented) as a Python script; it is killed in any case at the end."""
    script = tmp_path / f"script_{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(source))
    stderr_path = script.with_suffix(".stderr")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("TASKGUARD_")}
    with stderr_path.open("w") as err:
        popen = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=tmp_path,
        )
    proc = Proc(popen, stderr_path)
    try:
        yield proc
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)
        if popen.stdout is not None:
            popen.stdout.close()


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
