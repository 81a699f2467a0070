"""Exit signals: the first starts shutdown, the second forces it, the third ends the process."""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

import anyio

from ._report import State

if TYPE_CHECKING:
    from ._guard import TaskGuard

__all__ = ["SignalReceiver", "on_signal", "signame"]

logger = logging.getLogger("taskguard")


def signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class SignalReceiver:
    """The guard's signal task: installs the handlers, then counts exit signals.

    The guard waits for ``ready`` before its ``async with`` body (or
    ``taskguard.run``'s ``main``) starts, so a signal that arrives while the app
    starts up is already a graceful shutdown, never the default "die at once".
    """

    def __init__(self, guard: TaskGuard) -> None:
        self.guard = guard
        self.scope = anyio.CancelScope()
        self.ready = anyio.Event()
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            with self.scope, anyio.open_signal_receiver(*self.guard.config.exit_signals) as sigs:
                self.ready.set()
                async for signum in sigs:
                    self.guard.handle_signal(signum)
        except Exception as exc:  # e.g. not the main thread: the guard's __aenter__ raises it
            self.error = exc
        finally:
            self.ready.set()


def on_signal(guard: TaskGuard, signum: int, count: int) -> None:
    """Act on exit signal number ``count`` (on the loop thread): shut down, then force."""
    if guard.state is State.CLOSED:
        return
    name = signame(signum)
    if count == 1:
        logger.info("exit signal %s: shutting down", name)
        guard.shutdown(f"signal {name}")
    else:
        logger.warning("second exit signal %s: forcing shutdown", name)
        guard.shutdown(f"signal {name}", force=True)
