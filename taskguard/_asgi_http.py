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
from typing import TYPE_CHECKING, Any

import anyio

from ._asgi_stream import Pipe, close_connection
from ._guarded import is_cancellation
from ._report import State
from ._stream_registry import StreamOutcome
from ._streams import GuardedStream

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from .asgi import TaskGuardMiddleware

__all__ = ["StreamControl", "respond", "serve"]

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

_RUNNING = State.RUNNING
_DRAINING = State.DRAINING
_NO_BODY_STATUS = (204, 304)
_KEY = "taskguard"  # the request's key in scope["extensions"]
_HTTP1 = ("1.1", "1.0")  # HTTP/2 and 3 forbid the Connection header


class StreamControl:
    """Per-request settings and state of a streaming response, found in the scope.

    Get it with :func:`taskguard.asgi.stream_control` (``Depends(stream_control)``
    in FastAPI). Set ``final_message`` (bytes, or a function of the number of
    chunks sent) to end a stream cut by shutdown, ``max_duration`` or
    :meth:`stop` cleanly with that last chunk (e.g. an SSE event carrying the
    resume point) instead of aborting it. ``streaming`` overrides the detection
    (a response without a Content-Length header is a stream, unless it is a
    204, a 304 or the answer to a HEAD request).
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


async def serve(mw: TaskGuardMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    """One HTTP request through the middleware: readiness, refused after the drain,
    or the app in a guarded section (one coroutine frame for all of it: this is
    the path every request takes)."""
    guard = mw.guard
    if mw.readiness_path is not None and scope["path"] == mw.readiness_path:
        ready = guard.ready
        body = b'{"ready":%s,"state":"%s"}' % (
            b"true" if ready else b"false",
            guard.state.value.encode(),
        )
        await respond(send, 200 if ready else 503, body, b"application/json")
        return
    state = guard.state
    if state is not _RUNNING and state is not _DRAINING:
        if state is State.IDLE or (state is State.CLOSED and not mw._lifespans):
            # outside any lifespan (before the first, between two, after the last)
            mw.warn_unguarded()
            await mw.app(scope, receive, send)
        else:  # the drain is over: come back elsewhere
            await respond(send, 503, b"shutting down", b"text/plain", refused=scope)
        return
    request = Request(mw, guard, scope, receive, send)
    extensions = scope.get("extensions")
    ours = scope["extensions"] = {**extensions, _KEY: request} if extensions else {_KEY: request}
    # The request is a guarded section whose cancel scope is the app's own:
    # the guard cuts it at the deadline, the stream's keeper when a stream ends early.
    section = guard.open_section(request.name, request.app_scope)
    app_error: Exception | None = None
    cancelled = False
    try:
        with request.app_scope:
            try:
                await mw.app(scope, request.receive, request.send)
            except Exception as exc:
                app_error = exc
        if request.pipe is not None:
            app_error = await request.pipe.finish(app_error)
    except BaseException as exc:  # the server cancelled the request
        cancelled = is_cancellation(exc)
        raise
    finally:
        # The scope holds the request, which holds the server's send, which holds
        # the scope: drop the first link, so that refcounting frees the request's
        # objects at once (a cycle would leave them to the garbage collector:
        # measured, its passes cost more than the rest of the middleware).
        del ours[_KEY]
        pipe, request.pipe = request.pipe, None  # the pipe holds the request too
        if pipe is not None:
            await pipe.close()
        section.close(cancelled)
    if section.cut:  # at the deadline: whatever the app raised, the cut caused it
        await request.after_cut(streamed=pipe is not None)
    elif app_error is not None:
        raise app_error  # the server reports it, as without the middleware


class Request(StreamControl):
    """One HTTP request's state (see :func:`serve`): the app's cancel scope, which
    is also the request's guarded section, and, if the response turns out to be
    a stream, a :class:`Pipe`.

    A plain response costs this object, one cancel scope and the section; each
    ``receive`` and ``send`` of the app one method call.
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
        self.pipe: Pipe | None = None
        self.start: Message | None = None  # http.response.start, once handed to the server
        self.last: Message | None = None  # the last message of a plain response
        self.name = f"{scope.get('method', '')} {scope.get('path', '')}"

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
        if self.pipe is not None:
            await self.pipe.send(message)
        elif self.start is not None:  # the body of a plain response
            self.last = message
            await self.real_send(message)
        elif message["type"] == "http.response.start":
            if self.guard.state is not _RUNNING:
                message = _with_connection_close(message, self.scope)
            self.start = message
            await self.real_send(message)
            streaming = self.streaming
            if streaming is None:  # a response without Content-Length is a stream
                streaming = message["status"] not in _NO_BODY_STATUS  # unless it has no body
                for key, _ in message.get("headers") or ():
                    if key == b"content-length" or key.lower() == b"content-length":
                        streaming = False
                        break
            if streaming and self.scope.get("method") != "HEAD":
                self.pipe = Pipe(self, message)
        else:  # before the response (e.g. an early hint): the server decides
            await self.real_send(message)

    # -- cut at the deadline ---------------------------------------------------------

    async def after_cut(self, streamed: bool) -> None:
        if self.start is None:
            logger.warning(
                "request %s cut at the shutdown deadline before its response started: answered 503",
                self.name,
            )
            with anyio.move_on_after(self.send_timeout or math.inf):
                try:
                    await respond(
                        self.real_send, 503, b"shutting down", b"text/plain", refused=self.scope
                    )
                except Exception as exc:  # the client is gone: nobody to answer
                    logger.debug("503 for %s not sent: %r", self.name, exc)
        elif not streamed and not _completes(self.start, self.last):
            logger.warning(
                "request %s cut at the shutdown deadline mid-response: connection closed",
                self.name,
            )
            await close_connection(self.real_send, self.real_receive, abort=False)
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
    if scope.get("http_version") not in _HTTP1:
        return start  # HTTP/2 and 3 forbid the header; the server's GOAWAY does this job
    headers = list(start.get("headers") or ())
    if any(key.lower() == b"connection" for key, _ in headers):
        return start
    headers.append((b"connection", b"close"))
    return {**start, "headers": headers}


async def respond(
    send: Send, status: int, body: bytes, content_type: bytes, refused: Scope | None = None
) -> None:
    """A complete response. ``refused`` (the request's scope): a 503 the client
    should retry elsewhere, with ``Retry-After`` and (HTTP/1.x) ``Connection: close``."""
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if refused is not None:
        headers.append((b"retry-after", RETRY_AFTER))
        if refused.get("http_version") in _HTTP1:
            headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
