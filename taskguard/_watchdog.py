"""The hard deadline of ``taskguard.run``: a thread that ends the process when the
shutdown overruns, and the one way taskguard ends a process (``hard_exit``).

Armed at the shutdown trigger — from the signal handler itself when an exit
signal is the trigger, so it holds even when the event loop never runs again —
with a budget fixed then, which never moves: the exit wait, the cancel grace,
and the worst case of every hook registered by then, plus slack. Arming only
writes a float and a byte to a pipe (no lock: a signal handler may interrupt
the main thread anywhere, even inside this module).
"""

from __future__ import annotations

import logging
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["EXIT_HARD", "HARD_DEADLINE_SLACK", "Watchdog", "hard_exit"]

logger = logging.getLogger("taskguard")

#: exit status when the hard deadline ends the process
EXIT_HARD = 3
#: slack on top of the worst case before the hard deadline fires
HARD_DEADLINE_SLACK = 2.0


class Watchdog:
    """A daemon thread waiting for the hard deadline; :meth:`arm` starts the count."""

    def __init__(self, budget: Callable[[], float], describe: Callable[[], list[str]]) -> None:
        self._budget = budget
        self._describe = describe
        self.deadline = math.inf  # monotonic time; set once by arm()
        self.budget = 0.0
        self._stopped = False
        self._read, self._write = os.pipe()
        self._thread = threading.Thread(target=self._wait, name="taskguard-watchdog", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        """Start the count (the first call wins; safe in a signal handler)."""
        if self.deadline != math.inf or self._stopped:
            return
        try:
            budget = self._budget() + HARD_DEADLINE_SLACK
        except Exception:  # never fail in a signal handler: a generous fallback
            budget = 60.0
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self._wake()

    def stop(self) -> None:
        """Disarm for good (the process may end by itself now)."""
        if self._stopped:
            return
        self._stopped = True
        self._wake()
        os.close(self._write)  # the thread closes its end as it leaves

    @property
    def armed(self) -> bool:
        return self.deadline != math.inf and not self._stopped

    def _wake(self) -> None:
        try:
            os.write(self._write, b"!")
        except OSError:  # pragma: no cover - the pipe is full: the thread is awake anyway
            pass

    def _wait(self) -> None:
        try:
            while not self._stopped:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    hard_exit(f"hard deadline of {self.budget:g}s", EXIT_HARD, self._describe)
                    return
                readable, _, _ = select.select([self._read], [], [], min(left, 3600.0))
                if readable:
                    os.read(self._read, 1024)
        finally:
            os.close(self._read)


def hard_exit(why: str, status: int, describe: Callable[[], list[str]]) -> None:
    """End the process now, after logging what is still running, with its stacks."""
    try:
        lines = [f"taskguard: {why}: exiting now with status {status}"]
        try:
            lines.extend(describe())
        except Exception as exc:  # the state may be mid-change (a signal handler)
            lines.append(f"  (could not list what still runs: {exc!r})")
        logger.critical("\n".join(lines))
        for handler in logging.getLogger().handlers + logger.handlers:
            try:
                handler.flush()
            except Exception:
                pass
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(status)
