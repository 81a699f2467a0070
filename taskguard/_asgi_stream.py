"""The streaming side of TaskGuardMiddleware: a response without Content-Length,
sent chunk by chunk under a :class:`GuardedStream`, and ended on shutdown, on
client disconnect, on a stalled client and at ``max_duration``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import StreamError
from ._stream_registry import StreamOutcome

if TYPE_CHECKING:
    from ._asgi_http import Request

__all__ = ["Pipe", "close_connection"]

logger = logging.getLogger("taskguard")

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

#: how long to wait for the server to see a connection we closed (see close_connection)
_CLOSE_WAIT = 1.0
_COMPLETED = StreamOutcome.COMPLETED
_ENDS_WITH_FINAL = {StreamOutcome.INTERRUPTED, StreamOutcome.EXPIRED, StreamOutcome.STOPPED}
_BODY_MESSAGES = ("http.response.body", "http.response.zerocopysend", "http.response.pathsend")


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


class Pipe:
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
            # The stream was cut: nothing more is sent. A checkpoint all the same:
            # an app whose body never awaits (an endless generator of ready
            # chunks) would otherwise spin here, and the cut of its scope would
            # never be delivered (seen on trio: the loop hung at 100% CPU).
            await anyio.lowlevel.checkpoint()
            return
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
        # Reached when the stream was ended from outside (shutdown, stop(),
        # max_duration, a disconnect): the producer stops at once. Not after
        # the response is complete: what the app does then is its own business.
        if not self.done:
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
                        await close_connection(req.real_send, req.real_receive, abort=True)
                        return
            return
        if outcome is StreamOutcome.DISCONNECTED:
            return  # the server knows: the client left
        # Abort: the client sees an incomplete body. A stalled client is reset
        # (it reads nothing, so a graceful close would never finish).
        await close_connection(
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


async def close_connection(send: Send, receive: Receive, *, abort: bool) -> None:
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
    if not close_transport(send, abort=abort):
        return
    with anyio.move_on_after(_CLOSE_WAIT):
        while (await receive())["type"] != "http.disconnect":
            pass


def close_transport(send: Send, *, abort: bool) -> bool:
    """Close (or abort) the server's transport behind ``send``, where it has one
    (uvicorn); whether it did."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    close = getattr(transport, "abort" if abort else "close", None)
    if not callable(close):
        return False
    try:
        close()
    except Exception:  # pragma: no cover - an already closed transport
        return False
    return True
