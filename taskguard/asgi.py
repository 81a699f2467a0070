"""ASGI middleware: graceful shutdown for Starlette, FastAPI or any ASGI app.

``TaskGuardMiddleware(app, guard)`` makes the ASGI lifespan drive the guard,
tracks every HTTP request as a guarded section, ends streaming responses at
the exit signal, on client disconnect and on a stalled client, and (under
uvicorn and ``hypercorn --workers 0``) learns of SIGTERM/SIGINT the moment it
arrives. See docs/asgi.md.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._asgi_lifespan import Lifespan, SignalChain
from ._asgi_websocket import WebSocketSession, check_close_code
from ._config import GuardConfig
from ._exceptions import ShuttingDownError
from ._guard import TaskGuard
from ._guarded import is_cancellation
from ._report import State
from ._streams import GuardedStream, StreamOutcome

try:  # only for the annotation FastAPI reads to inject the request
    from starlette.requests import HTTPConnection
except ImportError:  # pragma: no cover - plain ASGI without starlette
    HTTPConnection = Any  # type: ignore[misc,assignment]

__all__ = ["StreamControl", "TaskGuardMiddleware", "get_guard", "stream_control"]

logger = logging.getLogger("taskguard")

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: bytes, or a function of the number of body chunks fully sent (the resume point)
FinalMessage = bytes | str | Callable[[int], bytes | str]

_DISCONNECT: Message = {"type": "http.disconnect"}
_ENDS_WITH_FINAL = {StreamOutcome.INTERRUPTED, StreamOutcome.EXPIRED, StreamOutcome.STOPPED}


class StreamControl:
    """Per-request settings and state of a streaming response, found in the scope.

    Get it with :func:`stream_control` (``Depends(stream_control)`` in FastAPI).
    Set ``final_message`` (bytes, or a function of the number of chunks sent)
    to end a stream cut by shutdown, ``max_duration`` or :meth:`stop` cleanly
    with that last chunk (e.g. an SSE event carrying the resume point) instead
    of aborting it. ``streaming`` overrides the detection (a response without a
    Content-Length header is a stream).
    """

    __slots__ = ("final_message", "guard", "send_timeout", "stream", "streaming")

    def __init__(self, guard: TaskGuard, send_timeout: float | None) -> None:
        self.guard = guard
        self.final_message: FinalMessage | None = None
        self.streaming: bool | None = None
        self.send_timeout = send_timeout
        self.stream: GuardedStream[Message] | None = None

    @property
    def outcome(self) -> StreamOutcome | None:
        return None if self.stream is None else self.stream.outcome

    @property
    def sent(self) -> int:
        """Body chunks fully sent so far (the resume point)."""
        return 0 if self.stream is None else self.stream.sent

    def stop(self) -> None:
        """End the stream now (outcome ``stopped``; the final message, if any, is sent)."""
        if self.stream is not None:
            self.stream.stop()


def stream_control(request: HTTPConnection) -> StreamControl:
    """The :class:`StreamControl` of a request (a Starlette request or an ASGI scope).

    Usable as a FastAPI dependency: ``ctl: StreamControl = Depends(stream_control)``.
    """
    scope = request if isinstance(request, MutableMapping) else request.scope
    try:
        control: StreamControl = scope["extensions"]["taskguard"]
    except (KeyError, TypeError):
        raise LookupError(
            "this request did not pass through taskguard.asgi.TaskGuardMiddleware"
        ) from None
    return control


def get_guard(request: HTTPConnection) -> TaskGuard:
    """The guard of the middleware; a FastAPI dependency: ``Depends(get_guard)``."""
    return stream_control(request).guard


class TaskGuardMiddleware:
    """Wrap an ASGI app so that its lifespan drives a :class:`TaskGuard`.

    * lifespan startup enters the guard; lifespan shutdown waits until the
      guard is closed (background work drained) *before* the app's own
      lifespan shutdown runs; failures answer ``lifespan.*.failed``;
    * every HTTP request is a guarded section; after the drain, new requests
      get 503; ``readiness_path`` answers 200 while running and 503 from the
      drain on;
    * streaming responses end ``stream_grace`` after the exit signal, when the
      client disconnects, after ``max_duration`` and when one send takes
      longer than ``send_timeout``: the app is cancelled, then the response
      is aborted (incomplete body) or ends with its ``final_message``;
    * every websocket connection is a guarded section; at shutdown (after
      ``stream_grace``) the app is cancelled and the connection gets the
      app's final message, if any, and a close frame with
      ``websocket_close_code`` (1012 service restart, or 1001 going away);
    * ``signals="auto"`` (default): unless the guard handles signals itself
      (``handle_signals=True``), the exit signals are chained at lifespan
      startup in front of the server's own handlers, so shutdown starts at
      the signal, not when the server gets round to lifespan shutdown.
    """

    def __init__(
        self,
        app: ASGIApp,
        guard: TaskGuard | None = None,
        *,
        config: GuardConfig | None = None,
        send_timeout: float | None = 30.0,
        max_duration: float | None = None,
        readiness_path: str | None = None,
        signals: Literal["auto", "off"] = "auto",
        websocket_close_code: Literal[1012, 1001] = 1012,
    ) -> None:
        if guard is not None and config is not None:
            raise TypeError("pass a guard or a config, not both")
        if signals not in ("auto", "off"):
            raise ValueError(f"signals must be 'auto' or 'off', not {signals!r}")
        self.app = app
        self.guard = guard if guard is not None else TaskGuard(config)
        self.send_timeout = send_timeout
        self.max_duration = max_duration
        self.readiness_path = readiness_path
        self.signals = signals
        self.websocket_close_code = check_close_code(websocket_close_code)
        self._chain: SignalChain | None = None
        self._lifespans = 0  # lifespans in progress (counted by _asgi_lifespan.Lifespan)
        self._warned_idle = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await Lifespan(self, scope, receive, send).run()
        elif kind == "websocket":
            await WebSocketSession(self, scope, receive, send).run()
        else:  # other scope types pass through untouched
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self.guard
        if self.readiness_path is not None and scope["path"] == self.readiness_path:
            ok = guard.ready
            body = b'{"ready":%s,"state":"%s"}' % (
                b"true" if ok else b"false",
                guard.state.value.encode(),
            )
            await _respond(send, 200 if ok else 503, body, b"application/json")
            return
        state = guard.state
        if state is State.IDLE or (state is State.CLOSED and not self._lifespans):
            # outside any lifespan (before the first, between two, after the last)
            if not self._warned_idle:
                self._warned_idle = True
                logger.warning(
                    "TaskGuardMiddleware: the guard is not running (the server did not run the "
                    "ASGI lifespan?): requests are not guarded"
                )
            await self.app(scope, receive, send)
            return
        if state is not State.RUNNING and state is not State.DRAINING:
            await _respond(send, 503, b"shutting down", b"text/plain", close=True)
            return
        control = StreamControl(guard, self.send_timeout)
        scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "taskguard": control}}
        await _Request(self, control, scope, receive, send).run()


class _Request:
    """One HTTP request: the app in its own cancel scope and, once the response
    turns out to be a stream, its body pumped through a GuardedStream and a
    watcher for the client's disconnect.

    A plain response costs one cancel scope and this object: everything a
    stream needs (channel, event, lock, helper tasks) is made when the stream
    starts. The helpers are tasks of the guard's backend, not children of a
    per-request task group: a task group per request cost more than the rest
    of the middleware together (its exit is a checkpoint, i.e. one more trip
    through the event loop for every request).
    """

    __slots__ = (
        "app_scope",
        "channel",
        "channel_out",
        "control",
        "disconnected",
        "helpers",
        "mw",
        "pending",
        "pump_done",
        "real_receive",
        "real_send",
        "receive_lock",
        "scope",
    )

    def __init__(
        self,
        mw: TaskGuardMiddleware,
        control: StreamControl,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self.mw, self.control, self.scope = mw, control, scope
        self.real_receive, self.real_send = receive, send
        self.app_scope = control.guard.backend.cancel_scope()
        self.channel: MemoryObjectSendStream[Message] | None = None
        self.channel_out: MemoryObjectReceiveStream[Message] | None = None
        self.pump_done: anyio.Event | None = None
        self.receive_lock: anyio.Lock | None = None
        # running helper tasks by their cancel scope; each removes itself when it
        # ends (on trio every chunk is sent from a helper of its own)
        self.helpers: dict[anyio.CancelScope, object] = {}
        self.pending: list[Message] = []
        self.disconnected = False

    async def run(self) -> None:
        # The request is a guarded section whose cancel scope is the app's own:
        # the guard cuts it at the deadline, the pump when a stream ends early.
        guard = self.control.guard
        section = guard.open_section(
            f"{self.scope.get('method', '')} {self.scope.get('path', '')}", self.app_scope
        )
        cancelled = False
        try:
            await self._run()
        except BaseException as exc:
            cancelled = is_cancellation(exc)
            raise
        finally:
            if self.channel is not None:  # e.g. the server cancelled the request mid-stream
                self._stop_helpers()
            section.close(cancelled)
        stream = self.control.stream
        if section.cut and (
            self.app_scope.cancelled_caught
            or (stream is not None and stream.outcome is not StreamOutcome.COMPLETED)
        ):
            # As `async with guard.guarded()` does: the code after it (here the
            # server) must not take the request for complete.
            raise ShuttingDownError(f"request {section.name!r} was cut at the shutdown deadline")

    async def _run(self) -> None:
        app_error: Exception | None = None
        with self.app_scope:
            try:
                await self.mw.app(self.scope, self.receive, self.send)
            except Exception as exc:
                app_error = exc
        if self.channel is None:  # a plain response: nothing more to do
            if app_error is not None:
                raise app_error
            return
        try:
            self.channel.close()  # the app is done: the source ends after the last chunk
            assert self.pump_done is not None
            await self.pump_done.wait()
        finally:
            self._stop_helpers()
        stream = self.control.stream
        assert stream is not None
        if stream.outcome is not StreamOutcome.COMPLETED:
            await self._end(stream)
        elif app_error is not None:
            raise app_error  # not a consequence of our cut: the server reports it

    # -- what the app sees ---------------------------------------------------------

    async def receive(self) -> Message:
        if self.pending:
            return self.pending.pop(0)
        if self.disconnected:
            return dict(_DISCONNECT)
        lock = self.receive_lock
        if lock is None:  # no stream (yet): the app is the only reader
            message = await self.real_receive()
        else:
            async with lock:  # one reader of the server's receive at a time
                if self.pending:
                    return self.pending.pop(0)
                message = await self.real_receive()
        self._saw(message)
        return message

    def _saw(self, message: Message) -> None:
        if message["type"] == "http.disconnect" and not self.disconnected:
            self.disconnected = True
            if self.control.stream is not None:
                self.control.stream.disconnected()

    async def send(self, message: Message) -> None:
        channel = self.channel
        if channel is not None:
            stream = self.control.stream
            if stream is not None and stream.outcome is None:
                try:
                    await channel.send(message)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the stream ended meanwhile; the app is being cancelled
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    # Complete: what the app does next (e.g. Starlette's background
                    # tasks) is no longer part of the stream.
                    channel.close()
            return  # the stream ended: nothing more is sent
        if message["type"] == "http.response.start" and self._is_stream(message):
            await self._send_timed(message)
            self._start_stream()
            return
        await self.real_send(message)

    def _is_stream(self, start: Message) -> bool:
        if self.control.streaming is not None:
            return self.control.streaming
        return not any(k.lower() == b"content-length" for k, _ in start.get("headers") or ())

    # -- streaming -----------------------------------------------------------------

    def _start_stream(self) -> None:
        send_ch, recv_ch = anyio.create_memory_object_stream[Message](0)
        self.channel, self.channel_out = send_ch, recv_ch
        self.pump_done = anyio.Event()
        # From here on the watcher reads the server's receive too. A read the
        # app started before (Starlette's disconnect listener) is not under the
        # lock: whichever of the two gets the disconnect reports it, and the
        # other read ends when the request does.
        self.receive_lock = anyio.Lock()
        stream = self.control.guard.stream(
            _messages(recv_ch),
            name=f"{self.scope.get('method', '')} {self.scope.get('path', '')}",
            send_timeout=self.control.send_timeout,
            max_duration=self.mw.max_duration,
        )
        self.control.stream = stream
        if self.control.guard.backend.send_in_task:
            pump = functools.partial(self._pump, stream, self._send_in_task)
        else:
            pump = functools.partial(self._pump, stream, self.real_send)
        self._helper(pump, "taskguard-asgi-pump")
        self._helper(self._watch_disconnect, "taskguard-asgi-disconnect")

    def _helper(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` in a task of its own that the request cancels as it ends."""
        scope = anyio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    try:
                        await fn()
                    except Exception:  # a helper's failure must not end the loop (trio)
                        logger.exception("%s of %r failed", name, self.control.stream)
            finally:
                self.helpers.pop(scope, None)

        # A strong reference while it runs.
        self.helpers[scope] = self.control.guard.backend.start_system_task(run, name=name)

    def _stop_helpers(self) -> None:
        """End the stream if it is still open, close its channel, and cancel the
        helper tasks (the pump, the disconnect watcher, a send the server shields)."""
        stream = self.control.stream
        if stream is not None and stream.outcome is None:
            stream.stop()
        if self.channel is not None:
            self.channel.close()
        for scope in list(self.helpers):
            scope.cancel()

    async def _pump(self, stream: GuardedStream[Message], send: Send) -> None:
        try:
            await stream.pump(send)
        except Exception:
            logger.exception("streaming response %r failed", stream.name)
        finally:
            assert self.pump_done is not None
            self.pump_done.set()
            if self.channel_out is not None:
                self.channel_out.close()
            if stream.outcome is not StreamOutcome.COMPLETED:
                self.app_scope.cancel()  # stop the producer at once

    async def _send_in_task(self, message: Message) -> None:
        """Send from a task of its own, so that a send the server shields from
        cancellation (hypercorn's trio worker does) cannot hold the pump: on a
        stall the pump and the producer stop; the send ends with the connection."""
        done = anyio.Event()
        failure: list[BaseException] = []

        async def run() -> None:
            try:
                await self.real_send(message)
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        self._helper(run, "taskguard-asgi-send")
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            if done.is_set() and not failure:
                # Delivered before the cut reached this wait: it counts in the
                # resume point (trio raises the cut again at the next checkpoint).
                return
            raise
        if failure:
            raise failure[0]

    async def _watch_disconnect(self) -> None:
        """Read the server's receive while the app does not, to see a disconnect."""
        lock = self.receive_lock
        assert lock is not None
        while not self.disconnected:
            if self.pending and self.pending[-1].get("more_body"):
                # The app has not read the request body yet: do not buffer it all.
                await anyio.sleep(0.05)
                continue
            async with lock:
                message = await self.real_receive()
            if message["type"] == "http.disconnect":
                self._saw(message)
            else:
                self.pending.append(message)

    async def _send_timed(self, message: Message) -> bool:
        timeout = self.control.send_timeout
        # Never beyond the exit wait: the final message is sent shielded.
        limit = min(timeout if timeout is not None else math.inf, self.control.guard.remaining())
        try:
            with anyio.move_on_after(limit) as scope:
                await self.real_send(message)
        except OSError:
            return False
        return not scope.cancelled_caught

    async def _end(self, stream: GuardedStream[Message]) -> None:
        """The stream was cut: end the body with the final message, or abort it."""
        final = self.control.final_message
        if final is not None and stream.outcome in _ENDS_WITH_FINAL and not self.disconnected:
            data = final(stream.sent) if callable(final) else final
            body = data.encode() if isinstance(data, str) else data
            last = {"type": "http.response.body", "body": b"", "more_body": False}
            chunk = {"type": "http.response.body", "body": body, "more_body": True}
            with anyio.CancelScope(shield=True):
                if await self._send_timed(chunk) and await self._send_timed(last):
                    return
                _abort_connection(self.real_send)
                return
        # Abort: send nothing more. The server closes the connection after the
        # app returns, so the client sees an incomplete (unterminated) body.
        if stream.outcome is StreamOutcome.STALLED:
            _abort_connection(self.real_send)


def _abort_connection(send: Send) -> None:
    """Reset the connection of a client that stopped reading (best effort).

    ASGI has no message for it. After an incomplete response, uvicorn closes
    the connection gracefully, i.e. only after its write buffer is flushed:
    for a client that never reads, never, and uvicorn's shutdown waits for the
    connection forever. Its ``send`` is a method of an object holding the
    asyncio transport: abort that. Other servers are left to close it
    (hypercorn bounds it with its graceful_timeout).
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if callable(abort):
        try:
            abort()
        except Exception:  # pragma: no cover - a closed transport
            pass


async def _messages(channel: MemoryObjectReceiveStream[Message]) -> Any:
    async with channel:
        async for message in channel:
            yield message


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes, close: bool = False
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
