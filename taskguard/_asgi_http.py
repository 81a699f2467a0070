"""The HTTP side of TaskGuardMiddleware: one request, and its streaming response.

Transparency rules (docs/asgi.md): every message the app sends reaches the
server in order, and the app's ``send()`` returns only once the server's has;
the end of a response is not a client disconnect; what the server says (an
error from its ``send``, ``http.disconnect`` after the response) reaches the
app, and what the app raises reaches the server, unless it is the consequence
of a cut made by the middleware.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import StreamError
from ._guarded import _is_cancellation
from ._report import State
from ._streams import GuardedStream, StreamOutcome

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from .asgi import TaskGuardMiddleware

__all__ = ["Request", "StreamControl", "respond"]

logger = logging.getLogger("taskguard")

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: bytes, or a function of the number of body chunks fully sent (the resume point)
FinalMessage = bytes | str | Callable[[int], bytes | str]

#: seconds a client should wait before retrying a request refused or cut at
#: shutdown: by then the load balancer has seen the readiness probe fail, so
#: the retry (on a new connection: the response says ``Connection: close``)
#: goes to another instance
RETRY_AFTER = b"1"
#: how long to wait for the server to see a connection we closed (see _close_connection)
_CLOSE_WAIT = 1.0

_RUNNING = State.RUNNING
_COMPLETED = StreamOutcome.COMPLETED
_ENDS_WITH_FINAL = {StreamOutcome.INTERRUPTED, StreamOutcome.EXPIRED, StreamOutcome.STOPPED}
_NO_BODY_STATUS = (204, 304)
_BODY_MESSAGES = ("http.response.body", "http.response.zerocopysend", "http.response.pathsend")
_KEY = "taskguard"  # the request's key in scope["extensions"]


class StreamControl:
    """Per-request settings and state of a streaming response, found in the scope.

    Get it with :func:`taskguard.asgi.stream_control` (``Depends(stream_control)``
    in FastAPI). Set ``final_message`` (bytes, or a function of the number of
    chunks sent) to end a stream cut by shutdown, ``max_duration`` or
    :meth:`stop` cleanly with that last chunk (e.g. an SSE event carrying the
    resume point) instead of aborting it. ``streaming`` overrides the detection
    (a response without a Content-Length header is a stream).
    """

    __slots__ = ("final_message", "guard", "send_timeout", "stream", "streaming")

    def __init__(self, guard: TaskGuard, send_timeout: float | None) -> None:
        self.guard = guard
        self.final_message: FinalMessage | None = None
        self.streaming: bool | None = None
        self.send_timeout = send_timeout
        self.stream: GuardedStream[Any] | None = None

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


class Request(StreamControl):
    """One HTTP request: the app in a cancel scope that is also the request's
    guarded section; if the response turns out to be a stream, a :class:`_Pipe`.

    A plain response costs this object, one cancel scope and the section: the
    app's ``receive`` is the server's, and each ``send`` one method call.
    """

    __slots__ = (
        "app_scope",
        "last",
        "mw",
        "name",
        "pipe",
        "real_receive",
        "real_send",
        "scope",
        "start",
    )

    def __init__(
        self, mw: TaskGuardMiddleware, guard: TaskGuard, scope: Scope, receive: Receive, send: Send
    ) -> None:
        # StreamControl's fields, set here: one __init__ call less per request
        self.guard = guard
        self.final_message = None
        self.streaming = None
        self.send_timeout = mw.send_timeout
        self.stream = None
        self.mw, self.scope = mw, scope
        self.real_receive, self.real_send = receive, send
        self.app_scope = guard.backend.cancel_scope()
        self.pipe: _Pipe | None = None
        self.start: Message | None = None  # http.response.start, once handed to the server
        self.last: Message | None = None  # the last message of a plain response
        self.name = f"{scope.get('method', '')} {scope.get('path', '')}"

    async def run(self) -> None:
        scope = self.scope
        extensions = scope.get("extensions")
        scope["extensions"] = {**extensions, _KEY: self} if extensions else {_KEY: self}
        # The request is a guarded section whose cancel scope is the app's own:
        # the guard cuts it at the deadline, the pump when a stream ends early.
        section = self.guard.open_section(self.name, self.app_scope)
        app_error: Exception | None = None
        cancelled = False
        try:
            with self.app_scope:
                try:
                    await self.mw.app(scope, self.receive, self.send)
                except Exception as exc:
                    app_error = exc
            if self.pipe is not None:
                app_error = await self.pipe.finish(app_error)
        except BaseException as exc:  # the server cancelled the request
            cancelled = _is_cancellation(exc)
            raise
        finally:
            if self.pipe is not None:
                await self.pipe.close()
            section.close(cancelled)
        if section.cut:  # at the deadline: whatever the app raised, the cut caused it
            await self._after_cut()
        elif app_error is not None:
            raise app_error  # the server reports it, as without the middleware

    # -- what the app calls ----------------------------------------------------------

    async def receive(self) -> Message:
        pipe = self.pipe
        if pipe is not None:
            return await pipe.receive()
        message = await self.real_receive()
        if self.pipe is not None and message["type"] == "http.disconnect":
            # a read the app began before its response turned into a stream
            self.pipe.saw_disconnect()
        return message

    async def send(self, message: Message) -> None:
        pipe = self.pipe
        if pipe is not None:
            await pipe.send(message)
        elif self.start is not None:  # the body of a plain response
            self.last = message
            await self.real_send(message)
        elif message["type"] == "http.response.start":
            if self.guard.state is not _RUNNING:
                message = _with_connection_close(message, self.scope)
            self.start = message
            await self.real_send(message)
            if self._is_stream(message):
                self.pipe = _Pipe(self, message)
        else:  # before the response (e.g. an early hint): the server decides
            await self.real_send(message)

    def _is_stream(self, start: Message) -> bool:
        if self.streaming is not None:
            return self.streaming
        for key, _ in start.get("headers") or ():
            if key == b"content-length" or key.lower() == b"content-length":
                return False
        # without a body there is nothing to stream
        return start["status"] not in _NO_BODY_STATUS and self.scope.get("method") != "HEAD"

    # -- cut at the deadline ---------------------------------------------------------

    async def _after_cut(self) -> None:
        if self.start is None:
            logger.warning(
                "request %s cut at the shutdown deadline before its response started: answered 503",
                self.name,
            )
            with anyio.move_on_after(self.send_timeout or math.inf):
                try:
                    await respond(self.real_send, 503, b"shutting down", b"text/plain", close=True)
                except Exception as exc:  # the client is gone: nobody to answer
                    logger.debug("503 for %s not sent: %r", self.name, exc)
        elif self.pipe is None and not _completes(self.start, self.last):
            logger.warning(
                "request %s cut at the shutdown deadline mid-response: connection closed",
                self.name,
            )
            await _close_connection(self.real_send, self.real_receive, abort=False)
        else:  # a stream (ended by the pipe), or work after a complete response
            logger.warning("request %s cut at the shutdown deadline", self.name)


def _completes(start: Message, last: Message | None) -> bool:
    """Whether ``last`` completed a plain response that began with ``start``."""
    if last is None:
        return False
    kind = last["type"]
    if kind == "http.response.trailers":
        return not last.get("more_trailers", False)
    return not start.get("trailers", False) and not last.get("more_body", False)


def _with_connection_close(start: Message, scope: Scope) -> Message:
    """``start`` with ``Connection: close`` (HTTP/1.x, unless the app set a connection
    header): while draining, keep-alive clients should move to another instance."""
    if scope.get("http_version") not in ("1.1", "1.0"):
        return start  # HTTP/2 and 3 forbid the header; the server's GOAWAY does this job
    headers = list(start.get("headers") or ())
    if any(key.lower() == b"connection" for key, _ in headers):
        return start
    headers.append((b"connection", b"close"))
    return {**start, "headers": headers}


class _Slot:
    """The source of a stream's :class:`GuardedStream`: the body chunk the app is
    sending now. The app's own task takes it from the stream and sends it, so
    the stream counts it, times it and cuts it, with no task in between."""

    __slots__ = ("error", "message")

    def __init__(self) -> None:
        self.message: Message | None = None
        self.error: BaseException | None = None

    def __aiter__(self) -> _Slot:
        return self

    async def __anext__(self) -> Message:
        if self.error is not None:
            raise _AppFailed(f"the app raised {self.error!r}")
        if self.message is None:
            raise StopAsyncIteration
        return self.message


class _AppFailed(Exception):
    """The app raised while its response was still streaming (the stream's outcome: failed)."""


class _Pipe:
    """A streaming response. Each body chunk is sent from the app's task under a
    :class:`GuardedStream` (send timeout, shutdown, disconnect, ``max_duration``),
    so the app's ``send()`` returns when the server's has; other messages
    (trailers, ...) go straight to the server, in order. A keeper task holds the
    stream open (``async with``): when the stream is ended from outside, it
    cancels the app. Meanwhile it reads the server's ``receive`` while the app
    does not, to see the client leave, until the response is complete. It is a
    task of the guard's backend, not a child of a per-request task group, which
    would cost a trip through the event loop on every request.
    """

    __slots__ = (
        "body_done",
        "closing",
        "deliver",
        "disconnected",
        "done",
        "drained",
        "helpers",
        "lock",
        "pending",
        "req",
        "slot",
        "stream",
        "trailers",
        "watching",
    )

    def __init__(self, req: Request, start: Message) -> None:
        self.req = req
        self.trailers = bool(start.get("trailers", False))
        self.body_done = False  # the last body chunk went out; trailers are to follow
        self.closing = False  # the message completing the response is being sent
        self.done = False  # ... and the server took it
        self.disconnected = False
        self.lock = anyio.Lock()  # one reader of the server's receive at a time
        self.pending: list[Message] = []  # read by the watcher, not yet by the app
        self.drained: anyio.Event | None = None
        self.slot = _Slot()
        guard = req.guard
        self.stream = req.stream = guard.stream(
            self.slot,
            name=req.name,
            send_timeout=req.send_timeout,
            max_duration=req.mw.max_duration,
        )
        backend = guard.backend
        self.deliver = self._deliver_in_task if backend.send_in_task else req.real_send
        # running helper tasks by their cancel scope; each removes itself when it ends
        self.helpers: dict[anyio.CancelScope, object] = {}
        self.watching = anyio.CancelScope()
        self._helper(self._keep, "taskguard-asgi-stream")

    # -- the app's side --------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.done:  # after the response: the server decides (it refuses, as it would)
            await self.req.real_send(message)
            return
        stream = self.stream
        if stream.outcome is not None or self.closing:
            return  # the stream was cut: nothing more is sent
        kind = message["type"]
        if kind in _BODY_MESSAGES:
            final = kind == "http.response.pathsend" or not message.get("more_body", False)
            if final and self.trailers:
                self.body_done, final = True, False
        else:  # no body: nothing to time or count (e.g. trailers, debug info)
            final = kind == "http.response.trailers" and not message.get("more_trailers", False)
        if final:
            self.closing = True
            self.watching.cancel()  # what the server says from now on is the app's to read
        if kind in _BODY_MESSAGES:
            self.slot.message = message
            try:
                await stream.__anext__()  # the chunk, as the stream's next item
                await stream.send(self.deliver, message)
            except (StopAsyncIteration, StreamError):  # the stream ended: stop the app
                self.req.app_scope.cancel()
                await anyio.lowlevel.checkpoint()
                return
            finally:
                self.slot.message = None
        else:
            await self.req.real_send(message)
        if final:
            self.done = True
            with suppress(StopAsyncIteration):
                await stream.__anext__()  # no more: the stream completes
            self.stop()

    async def receive(self) -> Message:
        if not self._news():
            async with self.lock:
                if not self._news():  # the watcher may have read meanwhile
                    message = await self.req.real_receive()
                    if message["type"] == "http.disconnect":
                        self.saw_disconnect()
                    return message
        if not self.pending:
            return {"type": "http.disconnect"}
        message = self.pending.pop(0)
        if not self.pending and self.drained is not None:
            self.drained.set()
        return message

    def _news(self) -> bool:
        """Whether the watcher has read something for the app (a message, or the disconnect)."""
        return bool(self.pending) or self.disconnected

    def saw_disconnect(self) -> None:
        self.disconnected = True
        # Only a disconnect while the response is open is the client leaving;
        # after it, the server says http.disconnect because the response ended.
        if not self.closing:
            self.stream.disconnected()

    # -- helper tasks ----------------------------------------------------------------

    def _helper(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` in a task of its own that the request cancels as it ends."""
        scope = anyio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    try:
                        await fn()
                    except Exception:  # a helper's failure must not end the loop (trio)
                        logger.exception("%s of %r failed", name, self.stream)
            finally:
                self.helpers.pop(scope, None)

        # A strong reference while it runs.
        self.helpers[scope] = self.req.guard.backend.start_system_task(run, name=name)

    async def _keep(self) -> None:
        async with self.stream:
            with self.watching:
                await self._watch()
            await anyio.sleep_forever()
        # Only reached when the stream was ended from outside (shutdown, stop(),
        # max_duration, a disconnect): the producer stops at once.
        self.req.app_scope.cancel()

    async def _watch(self) -> None:
        """Read the server's receive while the app does not, to see a disconnect."""
        while True:
            if self.pending and self.pending[-1].get("more_body"):
                # The app has not read the request body yet: do not buffer it all.
                drained = self.drained = anyio.Event()
                await drained.wait()
                continue
            async with self.lock:
                message = await self.req.real_receive()
            if message["type"] == "http.disconnect":
                self.saw_disconnect()
                return
            self.pending.append(message)

    async def _deliver_in_task(self, message: Message) -> None:
        """Send from a task of its own, so that a send the server shields from
        cancellation (hypercorn's trio worker does) cannot hold the producer: on a
        stall the producer stops; the send ends with the connection."""
        sent = anyio.Event()
        failure: list[BaseException] = []

        async def run() -> None:
            try:
                await self.req.real_send(message)
            except Exception as exc:
                failure.append(exc)
            finally:
                sent.set()

        self._helper(run, "taskguard-asgi-send")
        try:
            await sent.wait()
        except anyio.get_cancelled_exc_class():
            if sent.is_set() and not failure:
                # Delivered before the cut reached this wait: it counts in the
                # resume point (trio raises the cut again at the next checkpoint).
                return
            raise
        if failure:
            raise failure[0]

    # -- the end -----------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel the helper tasks (the keeper, a send the server shields)."""
        for scope in list(self.helpers):
            scope.cancel()

    async def close(self) -> None:
        """However the request ended (the server may have cancelled it): the stream is
        closed, and counted, and the helpers stop."""
        if self.stream.outcome is None:
            await self.stream.aclose()  # no checkpoint in it: fine while being cancelled
        self.stop()

    async def finish(self, app_error: Exception | None) -> Exception | None:
        """After the app returned (or raised ``app_error``): end the stream, and a
        cut one on the wire; the app's error if it is the server's to report."""
        stream = self.stream
        if stream.outcome is None:  # the app ended before its response did
            self.slot.error = app_error
            with suppress(StopAsyncIteration, _AppFailed):
                await stream.__anext__()  # completed, failed, or how it was cut meanwhile
        self.stop()
        outcome = stream.outcome
        if outcome is _COMPLETED or outcome is StreamOutcome.FAILED:
            return app_error  # not a consequence of a cut of ours
        await self._end(outcome)
        return None

    async def _end(self, outcome: StreamOutcome | None) -> None:
        """The stream was cut: end the body with the final message, or abort it."""
        req = self.req
        final = req.final_message
        if final is not None and outcome in _ENDS_WITH_FINAL and not self.disconnected:
            messages: list[Message] = []
            if not self.body_done:
                data = final(self.stream.sent) if callable(final) else final
                body = data.encode() if isinstance(data, str) else data
                messages += [
                    {"type": "http.response.body", "body": body, "more_body": True},
                    {"type": "http.response.body", "body": b"", "more_body": False},
                ]
            if self.trailers:
                messages.append({"type": "http.response.trailers", "headers": []})
            with anyio.CancelScope(shield=True):
                for message in messages:
                    if not await self._send_timed(message):
                        await _close_connection(req.real_send, req.real_receive, abort=True)
                        return
            return
        if outcome is StreamOutcome.DISCONNECTED:
            return  # the server knows: the client left
        # Abort: the client sees an incomplete body. A stalled client is reset
        # (it reads nothing, so a graceful close would never finish).
        await _close_connection(
            req.real_send, req.real_receive, abort=outcome is StreamOutcome.STALLED
        )

    async def _send_timed(self, message: Message) -> bool:
        req = self.req
        timeout = req.send_timeout
        # Never beyond the exit wait: the final message is sent shielded.
        limit = min(timeout if timeout is not None else math.inf, req.guard.remaining())
        try:
            with anyio.move_on_after(limit) as scope:
                await req.real_send(message)
        except OSError:
            return False
        return not scope.cancelled_caught


async def _close_connection(send: Send, receive: Receive, *, abort: bool) -> None:
    """Close the connection of a response we leave incomplete, and let the server see it.

    ASGI has no message for it. Where the server's ``send`` is a method of an
    object holding its asyncio transport (uvicorn), close that transport, as
    the server would after an incomplete response, gracefully (pending data is
    flushed first) or, for a client that stopped reading, at once (``abort``:
    a graceful close would wait for it forever, and so would uvicorn's
    shutdown). Then wait (briefly) until the server's ``receive`` reports the
    disconnect: the server then knows the connection is gone, which is true,
    and does not log the response as an application error. Other servers
    (hypercorn) close the connection themselves without complaint.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    close = getattr(transport, "abort" if abort else "close", None)
    if not callable(close):
        return
    try:
        close()
    except Exception:  # pragma: no cover - an already closed transport
        return
    with anyio.move_on_after(_CLOSE_WAIT):
        while (await receive())["type"] != "http.disconnect":
            pass


async def respond(
    send: Send, status: int, body: bytes, content_type: bytes, close: bool = False
) -> None:
    """A complete response; ``close``: with ``Connection: close`` and ``Retry-After``."""
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if close:
        headers += [(b"connection", b"close"), (b"retry-after", RETRY_AFTER)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
