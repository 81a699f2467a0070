"""WebSocket connections through TaskGuardMiddleware: in-flight work, closed at shutdown.

A connection is a guarded section (the drain waits for it) and, once accepted,
a :class:`GuardedStream` whose items are the messages the app sends: it is
counted in ``report.streams`` by outcome (``completed`` when the app ends it,
``disconnected`` when the client leaves, ``interrupted`` at shutdown,
``stalled`` when a send takes longer than ``send_timeout``, ``stopped`` by
``StreamControl.stop()``). At shutdown (after ``stream_grace``) the app is
cancelled, then the connection gets the app's final message, if it set one on
its :class:`StreamControl`, and a close frame with the middleware's
``websocket_close_code`` (1012 service restart, or 1001 going away).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._asgi_stream import close_transport
from ._guarded import is_cancellation
from ._report import State
from ._stream_registry import StreamOutcome
from ._streams import GuardedStream

if TYPE_CHECKING:
    from .asgi import Message, Receive, Scope, Send, StreamControl, TaskGuardMiddleware

__all__ = ["CLOSE_CODES", "WebSocketSession"]

logger = logging.getLogger("taskguard")

#: the close codes a server may send at shutdown: service restart, going away
CLOSE_CODES = (1012, 1001)
_CLOSED_BY_US = {StreamOutcome.INTERRUPTED, StreamOutcome.STOPPED, StreamOutcome.EXPIRED}
_CUT_AT_ONCE = {*_CLOSED_BY_US, StreamOutcome.STALLED, StreamOutcome.FAILED}


class _Out:
    """A message of the app on its way to the server; ``done`` once the server took it."""

    __slots__ = ("done", "error", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.done = anyio.Event()
        self.error: Exception | None = None


class WebSocketSession:
    """One websocket connection: the app in its own cancel scope; once accepted,
    a pump that sends the app's messages through a GuardedStream, and a watcher
    that reads the server's receive while the app does not, to see the client
    leave."""

    def __init__(self, mw: TaskGuardMiddleware, scope: Scope, receive: Receive, send: Send):
        self.mw, self.scope = mw, scope
        self.real_receive, self.real_send = receive, send
        self.guard = mw.guard
        self.control: StreamControl | None = None
        self.app_scope = anyio.CancelScope()
        self.channel: MemoryObjectSendStream[_Out] | None = None
        self.channel_out: MemoryObjectReceiveStream[_Out] | None = None
        self.pump_done = anyio.Event()
        self.lock: anyio.Lock | None = None  # from the accept on: one reader at a time
        self.pending: list[Message] = []  # read by the watcher, not yet by the app
        self.taken = anyio.Event()  # the app took what the watcher read
        self.app_reading = 0
        self.gone: Message | None = None  # the client's websocket.disconnect
        self.app_informed = False  # the app learnt the client left (it handles that itself)
        self.closed = False  # the app sent websocket.close
        self.tg: TaskGroup  # around the app, the pump and the watcher
        self.stream: GuardedStream[_Out] | None = None  # from the accept on

    async def run(self) -> None:
        from .asgi import StreamControl

        mw, guard = self.mw, self.guard
        state = guard.state
        if state is State.IDLE or (state is State.CLOSED and not mw._lifespans):
            await mw.app(self.scope, self.real_receive, self.real_send)  # no lifespan: unguarded
            return
        if state is not State.RUNNING and state is not State.DRAINING:
            await self._refuse()
            return
        control = self.control = StreamControl(guard, mw.send_timeout)
        extensions = {**(self.scope.get("extensions") or {}), "taskguard": control}
        scope = {**self.scope, "extensions": extensions}
        outer = guard.backend.cancel_scope()  # cancelled by the guard at the deadline
        section = guard.open_section(f"websocket {self.scope.get('path', '')}", outer)
        cancelled = False
        try:
            with outer:
                await self._run(scope, outer)
        except BaseException as exc:
            cancelled = is_cancellation(exc)
            raise
        finally:
            section.close(cancelled)
        if outer.cancelled_caught and self.channel is not None and not self.closed:
            await self._close(self.mw.websocket_close_code)  # cut at the deadline

    async def _run(self, scope: Scope, outer: anyio.CancelScope) -> None:
        app_error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                try:
                    with self.app_scope:
                        try:
                            await self.mw.app(scope, self.receive, self.send)
                        except Exception as exc:
                            app_error = exc
                finally:  # cancelled from outside too (a server or test client ending it)
                    if self.channel is not None:
                        self.channel.close()  # the stream ends after the app's last message
                if self.channel is not None:
                    await self.pump_done.wait()
                tg.cancel_scope.cancel()  # the watcher
        except BaseException as exc:
            # The server cancelled us after the app raised (Starlette's TestClient
            # does right after the client's close): without us it had the app's
            # error, not the cancellation. Not so for our own cut.
            cut = outer.cancel_called or self.app_scope.cancel_called
            if app_error is None or cut or not is_cancellation(exc):
                raise
            raise app_error from None
        stream = self.stream
        if stream is not None and stream.outcome in _CLOSED_BY_US and not self.closed:
            code = self.mw.websocket_close_code
            if stream.outcome is not StreamOutcome.INTERRUPTED:
                code = 1000  # stop(): a normal closure
            await self._close(code, final=True)
        elif stream is not None and stream.outcome is StreamOutcome.STALLED:
            close_transport(self.real_send, abort=True)  # a client that stopped reading
        if app_error is not None and not self.app_scope.cancel_called:
            raise app_error  # not a consequence of our cut: the server reports it

    # -- what the app sees ---------------------------------------------------------

    async def receive(self) -> Message:
        if self.pending:
            return self._take()
        lock = self.lock
        if lock is None:  # not accepted yet: the app is the only reader
            message = await self.real_receive()
            self._saw(message, by_app=True)
            return message
        self.app_reading += 1
        try:
            async with lock:
                if self.pending:
                    return self._take()
                if self.gone is not None:
                    return dict(self.gone)
                message = await self.real_receive()
        finally:
            self.app_reading -= 1
        self._saw(message, by_app=True)
        return message

    def _take(self) -> Message:
        message = self.pending.pop(0)
        self.taken.set()
        if message["type"] == "websocket.disconnect":
            self.app_informed = True
        return message

    def _saw(self, message: Message, by_app: bool) -> None:
        if message["type"] != "websocket.disconnect" or self.gone is not None:
            return
        self.gone = message
        self.app_informed = self.app_informed or by_app
        if self.stream is not None and not self.closed:
            self.stream.disconnected()  # the pump ends; the app is cancelled unless it knows

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept" and self.channel is None:
            await self.real_send(message)
            self._start()
            return
        if kind == "websocket.send" and self.channel is not None:
            assert self.stream is not None
            if self.stream.outcome is None:
                out = _Out(message)
                try:
                    await self.channel.send(out)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the stream ended meanwhile
                else:
                    await out.done.wait()  # returns once the server has taken it
                    if out.error is not None:
                        raise out.error  # the server's own error, as without us
                    return
            if self.stream.outcome is StreamOutcome.DISCONNECTED and not self.app_informed:
                self.app_scope.cancel()  # the client left: the producer stops at this send
            if self.app_scope.cancel_called:
                await anyio.lowlevel.checkpoint()  # ends here: the app is being cancelled
            # The app goes on after it learnt the client left: the server answers as it would.
        elif kind == "websocket.close" and not self.closed:
            self.closed = True
            if self.channel is not None:
                # The app ended the stream: the disconnect that answers its close
                # is not a client leaving, and must not cut the app.
                self.channel.close()
        await self.real_send(message)

    # -- the stream ----------------------------------------------------------------

    def _start(self) -> None:
        assert self.control is not None
        send_ch, recv_ch = anyio.create_memory_object_stream[_Out](0)
        self.channel, self.channel_out = send_ch, recv_ch
        self.lock = anyio.Lock()
        stream = self.stream = self.guard.stream(
            _outgoing(recv_ch),
            name=f"websocket {self.scope.get('path', '')}",
            send_timeout=self.control.send_timeout,
        )
        # StreamControl reads its outcome and resume point, and stop()s it
        self.control.stream = cast(Any, stream)
        self.tg.start_soon(self._pump, stream)
        self.tg.start_soon(self._watch)

    async def _pump(self, stream: GuardedStream[_Out]) -> None:
        try:
            await stream.pump(self._deliver)
        except Exception:
            logger.exception("websocket %r failed", stream.name)
        finally:
            self.pump_done.set()
            if self.channel_out is not None:
                self.channel_out.close()
            # Our cut (shutdown, stall, stop()) stops the producer at once. A client
            # that left does not: a server does not cancel the app then, and the app
            # may be handling a frame (what it raises must reach the server); it
            # gets the disconnect from receive, or is cut at its next send.
            if stream.outcome in _CUT_AT_ONCE and not (self.app_informed or self.closed):
                self.app_scope.cancel()

    async def _deliver(self, out: _Out) -> None:
        try:
            if self.guard.backend.send_in_task:
                await self._send_in_task(out.message)
            else:
                await self.real_send(out.message)
        except Exception as exc:
            # The app gets the server's error from its send; the stream ends.
            out.error, self.app_informed = exc, True
            raise anyio.BrokenResourceError(f"the websocket is gone: {exc!r}") from exc
        finally:
            out.done.set()

    async def _send_in_task(self, message: Message) -> None:
        """Send from a task of its own, so that a send the server shields from
        cancellation (hypercorn's trio worker does) cannot hold the pump: on a
        stall or at shutdown the pump and the app stop; the send ends with the
        connection."""
        done = anyio.Event()
        failure: list[Exception] = []

        async def run() -> None:
            try:
                await self.real_send(message)
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()
                _SENDING.discard(task)

        task = self.guard.backend.start_system_task(run, name="taskguard-websocket-send")
        _SENDING.add(task)
        await done.wait()
        if failure:
            raise failure[0]

    async def _watch(self) -> None:
        """Read the server's receive while the app does not, to see the client leave
        (at most one message ahead of the app: what the client sends waits for it)."""
        lock = self.lock
        assert lock is not None
        while self.gone is None:
            if self.pending:
                self.taken = anyio.Event()
                await self.taken.wait()
                continue
            async with lock:
                if self.pending or self.gone is not None:
                    continue
                try:
                    message = await self.real_receive()
                except Exception:  # the app's own read will meet the same error
                    logger.debug("websocket receive failed in the watcher", exc_info=True)
                    return
            self.pending.append(message)
            self._saw(message, by_app=self.app_reading > 0)

    # -- the end -------------------------------------------------------------------

    async def _close(self, code: int, final: bool = False) -> None:
        """Send the final message (if any) and a close frame, each within a bound."""
        message = self.control.final_message if final and self.control is not None else None
        sent = self.stream.sent if self.stream is not None else 0
        with anyio.CancelScope(shield=True):
            if message is not None and self.gone is None:
                data = message(sent) if callable(message) else message
                key = "text" if isinstance(data, str) else "bytes"
                if not await self._send_bounded({"type": "websocket.send", key: data}):
                    return
            if self.gone is None:
                reason = "server shutting down" if code != 1000 else ""
                await self._send_bounded(
                    {"type": "websocket.close", "code": code, "reason": reason}
                )
                self.closed = True

    async def _send_bounded(self, message: Message) -> bool:
        timeout = self.control.send_timeout if self.control is not None else None
        limit = min(timeout if timeout is not None else math.inf, max(self.guard.remaining(), 1.0))
        try:
            with anyio.move_on_after(limit) as scope:
                await self.real_send(message)
        except Exception:  # the connection is gone: nothing more to say
            return False
        return not scope.cancelled_caught

    async def _refuse(self) -> None:
        """After the drain: no new connection (503 where the server can say so)."""
        message = await self.real_receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in (self.scope.get("extensions") or {}):
            body = b"shutting down"
            headers = [(b"content-type", b"text/plain"), (b"content-length", b"13")]
            await self.real_send(
                {"type": "websocket.http.response.start", "status": 503, "headers": headers}
            )
            await self.real_send({"type": "websocket.http.response.body", "body": body})
        else:
            await self.real_send({"type": "websocket.close", "code": 1013})


#: sends running in tasks of their own (strong references until they end)
_SENDING: set[object] = set()


async def _outgoing(channel: MemoryObjectReceiveStream[_Out]) -> AsyncIterator[_Out]:
    async with channel:
        async for out in channel:
            yield out


def check_close_code(code: Any) -> int:
    """The middleware's ``websocket_close_code``, checked."""
    if isinstance(code, bool) or code not in CLOSE_CODES:
        raise ValueError(
            f"websocket_close_code must be 1012 (service restart) or 1001 (going away), "
            f"not {code!r}"
        )
    return int(code)
