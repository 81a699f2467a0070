"""The ASGI lifespan of TaskGuardMiddleware, and exit signals chained in front of the server's."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import MutableMapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio

from ._report import State

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from .asgi import Receive, Scope, Send, TaskGuardMiddleware

__all__ = ["Lifespan", "SignalChain"]

logger = logging.getLogger("taskguard")

Message = MutableMapping[str, Any]


class Lifespan:
    """Mediates the lifespan protocol between the server, the guard and the app."""

    def __init__(self, mw: TaskGuardMiddleware, scope: Scope, receive: Receive, send: Send):
        self.mw, self.scope, self.receive, self.send = mw, scope, receive, send
        self.to_app, self.app_in = anyio.create_memory_object_stream[Message](1)
        self.app_out, self.from_app = anyio.create_memory_object_stream[Message](1)
        self.app_error: BaseException | None = None
        self.app_spoke = False

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for stream in (self.to_app, self.app_in, self.app_out, self.from_app):
                stream.close()

    async def _run(self) -> None:
        guard = self.mw.guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_app)
            await self.receive()  # lifespan.startup
            try:
                await guard.__aenter__()
            except Exception:
                await self._failed("startup", traceback.format_exc())
                tg.cancel_scope.cancel()
                return
            if self.mw.signals == "auto" and not guard.config.handle_signals:
                self.mw._chain = SignalChain(guard)
                self.mw._chain.install()
            reply = await self._call({"type": "lifespan.startup"})
            if reply is not None and reply["type"] == "lifespan.startup.failed":
                await self._close_guard()
                await self.send(reply)
                tg.cancel_scope.cancel()
                return
            await self.send({"type": "lifespan.startup.complete"})
            takeover = await self._wait_for_shutdown()
            await self._close_guard()  # background work drains before the app shuts down
            reply = await self._call({"type": "lifespan.shutdown"})
            if reply is None and self.app_error is not None and self.app_spoke:
                text = "".join(traceback.format_exception(self.app_error))
                reply = {"type": "lifespan.shutdown.failed", "message": text}
            if takeover is not None:
                _die(takeover)
            await self.send(reply or {"type": "lifespan.shutdown.complete"})

    async def _run_app(self) -> None:
        async def send(message: Message) -> None:
            self.app_spoke = True
            await self.app_out.send(message)

        try:
            await self.mw.app(self.scope, self.app_in.receive, send)
        except Exception as exc:
            self.app_error = exc
            if not self.app_spoke:  # like uvicorn's lifespan "auto": not supported
                logger.info("the app does not support the ASGI lifespan (%r): ignored", exc)
            else:
                logger.error("the app's lifespan failed", exc_info=exc)
        finally:
            self.app_out.close()

    async def _call(self, message: Message) -> Message | None:
        """Send ``message`` to the app's lifespan; its reply, or None if it has none."""
        try:
            await self.to_app.send(message)
            return await self.from_app.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            if message["type"] == "lifespan.startup" and self.app_error and self.app_spoke:
                text = "".join(traceback.format_exception(self.app_error))
                return {"type": "lifespan.startup.failed", "message": text}
            return None

    async def _wait_for_shutdown(self) -> int | None:
        """Wait for the server's lifespan.shutdown, or for a takeover (see SignalChain)."""
        chain, guard = self.mw._chain, self.mw.guard
        took_over: list[int] = []
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
                took_over.append(chain.takeover)
                race.cancel_scope.cancel()

            race.start_soon(from_server)
            race.start_soon(takeover)
        return took_over[0] if took_over else None

    async def _close_guard(self) -> None:
        guard = self.mw.guard
        try:
            if guard.state is not State.CLOSED:
                guard.shutdown("lifespan shutdown")
            await guard.__aexit__(None, None, None)
        finally:
            if self.mw._chain is not None:
                self.mw._chain.restore()

    async def _failed(self, phase: str, text: str) -> None:
        await self.send({"type": f"lifespan.{phase}.failed", "message": text})


class SignalChain:
    """Exit-signal handlers installed at lifespan startup, in front of the server's.

    Our handler tells the guard first, then calls the server's handler (uvicorn's
    ``handle_exit``, asyncio's wake-up for hypercorn). A signal the server
    leaves at its default action (SIGTERM under ``hypercorn -k trio``), or to
    trio's KeyboardInterrupt handler (SIGINT there), is taken over: once the
    guard is closed, the app's lifespan shutdown runs and the signal is
    re-raised with its default action, so the process exits with the
    conventional status (-15 / 143 for SIGTERM, -2 / 130 for SIGINT).
    """

    def __init__(self, guard: TaskGuard) -> None:
        self.guard = guard
        self.previous: dict[int, Any] = {}
        self.takeover: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "TaskGuardMiddleware: lifespan startup is not on the main thread, so exit "
                "signals cannot be chained; call guard.handle_signal() or shutdown() yourself"
            )
            return
        for sig in self.guard.config.exit_signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # ignored on purpose (e.g. hypercorn's workers ignore SIGINT)
            self.previous[sig] = previous
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous.get(signum)
        default = previous in (signal.SIG_DFL, None, signal.default_int_handler) or (
            # trio's Ctrl-C handler raises KeyboardInterrupt wherever the main
            # thread happens to be, e.g. inside a connection handler, which can
            # crash the server before its lifespan shutdown: take it over instead.
            getattr(previous, "__module__", "").startswith("trio.")
        )
        if default and self.takeover is None:
            self.takeover = signum
        self.guard.handle_signal(signum)
        if not default and callable(previous):
            previous(signum, frame)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self.previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self.previous.clear()


def _die(signum: int) -> None:
    """End the process by ``signum`` with its default action (after the takeover)."""
    logger.info("exit signal %s: shutdown done, exiting", signal.Signals(signum).name)
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # pragma: no cover - only if the signal is blocked
