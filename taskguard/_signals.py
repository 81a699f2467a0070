"""Exit signals: the first starts shutdown, the second forces it, the third ends the process.

Signals are counted where they arrive — in the signal handler — not by a task
of the event loop: a loop blocked by sync code (a task in ``time.sleep``, a
blocking sync hook) would otherwise see the second and third signal only when
it unblocks (or, on trio, coalesce three signals into one). Only what needs the
loop (starting or forcing the shutdown) is handed to it; ending the process at
the third signal and arming the hard deadline at the first happen right here.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["ExitSignals", "signame"]

logger = logging.getLogger("taskguard")

Handler = Callable[[int, FrameType | None], Any] | int | None


def signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class ExitSignals:
    """The exit signals of one guard: the one owner of their count.

    ``receive(signum)`` is what every source of an exit signal calls — the
    handlers :meth:`install` puts in place (``handle_signals=True``), the ASGI
    middleware's handlers chained in front of a server's, a test's
    ``simulate_signal``. It is safe in a signal handler and from any thread.
    The guard passes what to do: ``act(signum, count)`` runs on the loop (shut
    down, then force), ``arm()`` arms the hard deadline, and ``describe()`` lists
    what still runs for the log of the third signal, which ends the process.
    """

    def __init__(
        self,
        act: Callable[[int, int], None],
        arm: Callable[[], None],
        describe: Callable[[], list[str]],
    ) -> None:
        self.count = 0  # don't modify directly: receive() is the one writer
        self._act = act
        self._call_soon: Callable[[Callable[[], object]], None] | None = None
        self._arm = arm
        self._describe = describe
        self._previous: dict[int, Handler] = {}
        self._installed = False
        self._forward_only = False

    def bind(self, call_soon: Callable[[Callable[[], object]], None]) -> None:
        """Where to hand the loop's part of a signal (set when the guard starts)."""
        self._call_soon = call_soon

    def receive(self, signum: int) -> None:
        if self._forward_only:  # the guard closed (or was never started): not its signal
            return
        self.count += 1
        count = self.count
        if count >= 3:
            from ._watchdog import hard_exit

            hard_exit(f"third exit signal ({signame(signum)})", 128 + signum, self._describe)
        if count == 1:
            self._arm()
        call_soon = self._call_soon
        if call_soon is not None:
            call_soon(lambda: self._act(signum, count))

    # -- the guard's own handlers (handle_signals=True) ---------------------------

    def install(self, signals: tuple[signal.Signals, ...]) -> None:
        """Install handlers for ``signals`` (main thread only), remembering what was there."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "taskguard can only install exit-signal handlers in the main thread "
                "(Python's rule for signal handlers); set handle_signals=False and call "
                "guard.handle_signal() or guard.shutdown() yourself"
            )
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        self._installed = True

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`.

        If another handler was installed on top of ours meanwhile (it will call
        ours as its previous one), ours stays in its chain, only forwarding.
        """
        if not self._installed:
            return
        self._installed = False
        self._forward_only = True
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handler:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def detach(self) -> None:
        """The guard closed: later signals reach it no more, and nothing here keeps
        it alive (a handler left in another's chain holds this object)."""
        self._act = _ignore_act
        self._call_soon = None
        self._arm = _nothing
        self._describe = _no_lines
        self._forward_only = True

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.receive(signum)
        previous = self._previous.get(signum)
        # Another guard's handler below ours (a guard inside a guard): the signal
        # is for the whole process, so it gets it too. Other handlers (the
        # default action, a server's) are not called: this guard owns the signal.
        if self._forward_only or isinstance(getattr(previous, "__self__", None), ExitSignals):
            if callable(previous):
                previous(signum, frame)
            elif self._forward_only and previous in (signal.SIG_DFL, None):
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)


def _ignore_act(signum: int, count: int) -> None:
    pass


def _nothing() -> None:
    pass


def _no_lines() -> list[str]:
    return []
