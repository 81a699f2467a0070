"""The ASGI lifespan of TaskGuardMiddleware, and exit signals chained in front of the server's."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, MutableMapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._report import State

if TYPE_CHECKING:
    from ._backends import WakeupHold
    from ._guard import TaskGuard
    from .asgi import Receive, Scope, Send, TaskGuardMiddleware

__all__ = ["Lifespan", "SignalChain"]

logger = logging.getLogger("taskguard")

Message = MutableMapping[str, Any]


class Lifespan:
    """Mediates the lifespan protocol between the server, the guard and the app.

    The guard starts before the app's startup and is closed before the app's
    shutdown. Whatever the app's lifespan call raises reaches the server as it
    would without the middleware: after a ``lifespan.*.failed`` it forwarded,
    or, for an app without lifespan support (it raises before it says
    anything), at once, so the server goes on without a lifespan. An exception
    raised later (a lifespan that crashes while the app runs) is raised once
    the guard is closed.
    """

    def __init__(self, mw: TaskGuardMiddleware, scope: Scope, receive: Receive, send: Send):
        self.mw, self.scope, self.receive, self.send = mw, scope, receive, send
        self.to_app, self.app_in = anyio.create_memory_object_stream[Message](1)
        self.app_out, self.from_app = anyio.create_memory_object_stream[Message](1)
        self.app_error: Exception | None = None
        self.app_spoke = False
        self.app_done = anyio.Event()
        self.chain: SignalChain | None = None  # this lifespan's, if signals are chained
        self.app_cancel = anyio.CancelScope()  # the app's lifespan call runs in it
        #: the app's shutdown reply, sent to the server once everything else is done
        self.last_word: Message | None = None

    async def run(self) -> None:
        self.mw._lifespans += 1
        try:
            error = await self._run()
        finally:
            self.mw._lifespans -= 1
            for stream in (self.to_app, self.app_in, self.app_out, self.from_app):
                stream.close()
        if self.last_word is not None:
            # Nothing may be awaited after this send: hypercorn's asyncio worker
            # cancels the lifespan task as soon as it has the shutdown reply and
            # re-raises that CancelledError (a plain app has returned by then).
            await self.send(self.last_word)
        if error is not None:  # raised here, not wrapped in the task group's ExceptionGroup
            raise error

    def _unsupported(self) -> bool:
        """The app ended with an exception before saying anything (no lifespan support)."""
        return self.app_done.is_set() and self.app_error is not None and not self.app_spoke

    async def _run(self) -> Exception | None:
        """Run the lifespan; return the exception the server is to get, if any."""
        guard = self.mw.guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_app)
            await self.receive()  # lifespan.startup
            await anyio.lowlevel.checkpoint()  # an app that raises at once has done so now
            if self._unsupported():  # e.g. Django's ASGIHandler: no guard, no lifespan
                return self.app_error
            try:
                await guard.__aenter__()
            except Exception as exc:
                await self._failed("startup", traceback.format_exc())
                tg.cancel_scope.cancel()
                return exc
            if self.mw.signals == "auto" and not guard.config.handle_signals:
                chain = self.chain = self.mw._chain = SignalChain(guard)
                chain.install()
                tg.start_soon(self._stop_intake, chain)
            reply = await self._call({"type": "lifespan.startup"})
            if reply is None and self._unsupported():
                await self._close_guard()
                return self.app_error
            if reply is not None and reply["type"] == "lifespan.startup.failed":
                await self._close_guard()
                await self.send(reply)
                await self.app_done.wait()  # Starlette raises right after saying so
                return self.app_error
            await self.send(reply or {"type": "lifespan.startup.complete"})
            await self._wait_for_shutdown()
            await self._close_guard()  # background work drains before the app shuts down
            reply = await self._call({"type": "lifespan.shutdown"})
            takeover = self.chain.takeover if self.chain is not None else None
            if takeover is not None:
                _die(takeover)
            if reply is None and self.app_error is not None:
                return self.app_error  # it crashed while the app ran: the server gets it now
            # The reply is the app's last word: it returns, then the server hears it.
            await self._let_app_return()
            self.last_word = reply or {"type": "lifespan.shutdown.complete"}
        return self.app_error

    async def _let_app_return(self) -> None:
        """Wait for the app's lifespan call to return after its shutdown reply; one
        that goes on past ``cancel_grace`` is cancelled (the server is waiting)."""
        grace = self.mw.guard.config.cancel_grace
        with anyio.move_on_after(grace):
            await self.app_done.wait()
            return
        logger.warning(
            "the app's lifespan did not return within cancel_grace (%gs) after its "
            "shutdown reply; cancelling it",
            grace,
        )
        self.app_cancel.cancel()
        await self.app_done.wait()

    async def _run_app(self) -> None:
        async def send(message: Message) -> None:
            self.app_spoke = True
            await self.app_out.send(message)

        try:
            with self.app_cancel:
                await self.mw.app(self.scope, self.app_in.receive, send)
        except Exception as exc:
            self.app_error = exc
            if self.app_spoke and self.mw.guard.state is State.RUNNING:
                logger.warning(
                    "the app's lifespan raised %r while the app runs; the server gets it "
                    "once the guard is closed",
                    exc,
                )
        finally:
            # Our next message to the app fails at once instead of waiting for a
            # reader that is gone (it used to hang the server's shutdown).
            self.app_out.close()
            self.app_in.close()
            self.app_done.set()

    async def _call(self, message: Message) -> Message | None:
        """Send ``message`` to the app's lifespan; its reply, or None if it has none."""
        try:
            await self.to_app.send(message)
            return await self.from_app.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self.app_done.wait()  # its exception, if any, is recorded
            return None

    async def _stop_intake(self, chain: SignalChain) -> None:
        """Run the server's own exit handlers once intake is to stop."""
        await self.mw.guard.wait_for_intake_stop()
        chain.release()

    async def _wait_for_shutdown(self) -> None:
        """Wait for the server's lifespan.shutdown, or for a takeover (see SignalChain)."""
        chain, guard = self.chain, self.mw.guard
        async with anyio.create_task_group() as race:

            async def from_server() -> None:
                await self.receive()
                race.cancel_scope.cancel()

            async def takeover() -> None:
                await guard.wait_for_shutdown()
                if chain is None or chain.takeover is None:
                    await anyio.sleep_forever()
                    return
                await guard.wait_closed()
                if chain.stop_trio is not None:
                    # The server was told to stop: let it finish the connections it
                    # accepted (a request not in the app yet), within cancel_grace.
                    await anyio.sleep(guard.config.cancel_grace)
                race.cancel_scope.cancel()

            race.start_soon(from_server)
            race.start_soon(takeover)

    async def _close_guard(self) -> None:
        guard = self.mw.guard
        try:
            if guard.state is not State.CLOSED:
                guard.shutdown("lifespan shutdown")
            await guard.__aexit__(None, None, None)
        finally:
            if self.chain is not None:
                self.chain.restore()

    async def _failed(self, phase: str, text: str) -> None:
        await self.send({"type": f"lifespan.{phase}.failed", "message": text})


class SignalChain:
    """Exit-signal handlers installed at lifespan startup, in front of the server's.

    Our handler tells the guard first. The server's own handler (uvicorn's
    ``handle_exit``, asyncio's wake-up for hypercorn) runs once intake is to
    stop (``guard.wait_for_intake_stop()``: ``drain_delay`` after the trigger,
    at once without a delay or on a second signal), so the server keeps
    accepting and serving through the delay while readiness says 503.

    A signal the server leaves at its default action (SIGTERM under
    ``hypercorn -k trio``), or to trio's KeyboardInterrupt handler (SIGINT
    there), is taken over: when intake is to stop, the server is told through
    trio's own Ctrl-C path (a KeyboardInterrupt delivered to the main task,
    never raised in whatever code runs at the signal); once the guard is closed,
    the app's lifespan shutdown runs and the signal is re-raised with its
    default action, so the process exits with the conventional status
    (-15 / 143 for SIGTERM, -2 / 130 for SIGINT).
    """

    def __init__(self, guard: TaskGuard) -> None:
        self.guard = guard
        self.previous: dict[int, Any] = {}
        self.takeover: int | None = None
        #: the server's handlers not run yet: (handler, signal, frame)
        self.held: list[tuple[Callable[[int, FrameType | None], object], int, Any]] = []
        self.released = False
        self.relay: WakeupHold | None = None
        self.stop_trio: Callable[[int, FrameType | None], object] | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "TaskGuardMiddleware: lifespan startup is not on the main thread, so exit "
                "signals cannot be chained; call guard.handle_signal() or shutdown() yourself"
            )
            return
        ctrl_c = signal.getsignal(signal.SIGINT)
        if _is_trio(ctrl_c) and callable(ctrl_c):
            self.stop_trio = ctrl_c
        for sig in self.guard.config.exit_signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # ignored on purpose (e.g. hypercorn's workers ignore SIGINT)
            self.previous[sig] = previous
            signal.signal(sig, self._handle)
        if self.previous and self.guard.config.drain_delay:
            self.relay = self.guard.backend.hold_exit_wakeups(frozenset(self.previous))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous.get(signum)
        default = previous in (signal.SIG_DFL, None, signal.default_int_handler) or (
            # trio's Ctrl-C handler raises KeyboardInterrupt wherever the main
            # thread happens to be, e.g. inside a connection handler, which can
            # crash the server before its lifespan shutdown: take it over instead.
            _is_trio(previous)
        )
        if default and self.takeover is None:
            self.takeover = signum
        self.guard.handle_signal(signum)
        if not default and callable(previous):
            self.held.append((previous, signum, frame))
        if self.released or not self.guard.config.drain_delay or self.guard.signals_seen >= 2:
            self.release()

    def release(self) -> None:
        """Intake stops: the server's own handlers run now, and from now on at once.

        Idempotent; called on the event-loop thread (at intake stop) or from our
        signal handler (without a drain delay, or on a second signal).
        """
        first = not self.released
        self.released = True
        while self.held:
            handler, signum, frame = self.held.pop(0)
            handler(signum, frame)
        if not first:
            return
        if self.relay is not None:
            self.relay.release()
        if self.takeover is not None and self.stop_trio is not None:
            # trio's own Ctrl-C path, from a frame it counts as protected (None):
            # a KeyboardInterrupt for the main task (hypercorn's serve loop), which
            # closes the listeners and goes on to the lifespan shutdown.
            self.stop_trio(signal.SIGINT, None)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.release()
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        for sig, previous in self.previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self.previous.clear()


def _is_trio(handler: object) -> bool:
    return getattr(handler, "__module__", "").startswith("trio.")


def _die(signum: int) -> None:
    """End the process by ``signum`` with its default action (after the takeover)."""
    logger.info("exit signal %s: shutdown done, exiting", signal.Signals(signum).name)
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # pragma: no cover - only if the signal is blocked
