"""One helper for the tests' real child processes: start, read output lines, signal, end.

Every test that runs a script, an example or a command (``taskguard.run``
scripts, the README's commands, the example RPC server) reads its output
through :class:`Child`: lines are collected on a thread as they come (a
child that fills its pipe would otherwise block), ``wait_line``/``wait_for``
wait for one with a deadline and fail with everything the child said, and
the child is killed (its whole process group when it has its own session)
when the ``with`` block ends, whatever happened. Servers that log to a file and
are probed over HTTP are ``tests/servers.py``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from signal import SIGINT, SIGKILL, SIGTERM
from typing import IO, Any, Literal

__all__ = ["Child"]


class Child:
    """A real child process whose output lines are collected as they come.

    ``stderr``: ``"lines"`` (read like stdout, into :attr:`err_lines`),
    ``"merge"`` (into stdout's lines) or a path (the child writes it; the
    file is read on demand).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path | str | None = None,
        env: dict[str, str] | None = None,
        stderr: Literal["lines", "merge"] | Path = "lines",
        new_session: bool = False,
    ) -> None:
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.stderr_path = stderr if isinstance(stderr, Path) else None
        self._cond = threading.Condition()
        err_file: IO[str] | None = None
        if self.stderr_path is not None:
            err_file = self.stderr_path.open("w")
        err: Any = {"lines": subprocess.PIPE, "merge": subprocess.STDOUT}.get(str(stderr), err_file)
        try:
            self.popen = subprocess.Popen(
                list(args),
                cwd=cwd,
                env={"PYTHONUNBUFFERED": "1", **(os.environ if env is None else env)},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                errors="replace",
                start_new_session=new_session,
            )
        finally:
            if err_file is not None:
                err_file.close()  # the child has its own descriptor
        self.new_session = new_session
        self.started = time.monotonic()
        self._readers = [self._reader(self.popen.stdout, self.lines)]
        if self.popen.stderr is not None:
            self._readers.append(self._reader(self.popen.stderr, self.err_lines))

    def _reader(self, stream: IO[str] | None, into: list[str]) -> threading.Thread:
        def read() -> None:
            assert stream is not None
            for line in stream:
                with self._cond:
                    into.append(line.rstrip("\n"))
                    self._cond.notify_all()
            with self._cond:
                self._cond.notify_all()

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    # -- waiting for output ---------------------------------------------------------

    def wait_line(self, prefix: str, timeout: float = 15.0, *, stderr: bool = False) -> str:
        """The first line that starts with ``prefix`` (waiting for it up to ``timeout``)."""
        return self._wait(lambda line: line.startswith(prefix), f"a line {prefix!r}...", timeout,
                          stderr)  # fmt: skip

    def wait_for(self, text: str, timeout: float = 20.0, *, stderr: bool = False) -> str:
        """The first line that contains ``text`` (waiting for it up to ``timeout``)."""
        return self._wait(lambda line: text in line, f"{text!r}", timeout, stderr)

    def _wait(self, match: Callable[[str], bool], what: str, timeout: float, err: bool) -> str:
        lines = self.err_lines if err else self.lines
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                ended = self.popen.poll() is not None and not any(
                    t.is_alive() for t in self._readers
                )
                if left <= 0 or ended:
                    raise AssertionError(
                        f"no {what} within {timeout}s (exit status {self.popen.poll()})\n"
                        + self.describe()
                    )
                self._cond.wait(min(left, 0.1))

    def output(self) -> str:
        """Stdout so far (with stderr when merged)."""
        with self._cond:
            return "\n".join(self.lines)

    def stderr(self) -> str:
        """Stderr so far (empty when merged into stdout)."""
        if self.stderr_path is not None:
            try:
                return self.stderr_path.read_text(errors="replace")
            except OSError:
                return ""
        with self._cond:
            return "\n".join(self.err_lines)

    def describe(self) -> str:
        """Everything the child said, for a failure message."""
        return f"stdout:\n{self.output()}\nstderr:\n{self.stderr()}"

    def report(self, marker: str = "REPORT ", *, stderr: bool = False) -> dict[str, Any]:
        """The JSON object the child printed on a line after ``marker``."""
        line = self.wait_line(marker, timeout=1, stderr=stderr)
        return dict(json.loads(line[len(marker) :]))

    # -- signals and the end --------------------------------------------------------

    def signal(self, sig: int = SIGTERM) -> float:
        """Send ``sig`` to the child; when (taken just before sending)."""
        sent = time.monotonic()
        self.popen.send_signal(sig)
        return sent

    def signal_group(self, sig: int = SIGINT) -> None:
        """What a terminal does on Ctrl-C: ``sig`` to the child's whole process group."""
        os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit status, once every line is read; fails if still running after ``timeout``."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s\n{self.describe()}") from None
        for thread in self._readers:  # they end at EOF: every line is in
            thread.join(5)
        return status

    def sigterm_when_ready(self, timeout: float, ready: str = "READY") -> tuple[int, str]:
        """Wait for a line containing ``ready``, send SIGTERM, wait for the exit:
        (status, output)."""
        self.wait_for(ready)
        self.signal(SIGTERM)
        status = self.wait(timeout=timeout)
        return status, self.output()

    def stop(self) -> None:
        """Kill the child (its process group, with a session of its own) and reap it."""
        if self.popen.poll() is None:
            try:
                if self.new_session:
                    os.killpg(self.popen.pid, SIGKILL)
                else:
                    self.popen.kill()
            except ProcessLookupError:
                pass
        self.popen.wait(10)
        for thread in self._readers:
            thread.join(5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
