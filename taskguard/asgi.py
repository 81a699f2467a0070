"""ASGI middleware: graceful shutdown for Starlette, FastAPI or any ASGI app.

``TaskGuardMiddleware(app, guard)`` makes the ASGI lifespan drive the guard,
tracks every HTTP request as a guarded section, ends streaming responses at
the exit signal, on client disconnect and on a stalled client, and (under
uvicorn and ``hypercorn --workers 0``) learns of SIGTERM/SIGINT the moment it
arrives. See docs/asgi.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from ._asgi_http import StreamControl, serve
from ._asgi_lifespan import Lifespan, SignalChain
from ._asgi_websocket import WebSocketSession, check_close_code
from ._config import GuardConfig, check_seconds
from ._guard import TaskGuard

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

if TYPE_CHECKING:
    _RequestOrScope = HTTPConnection | Scope
else:  # FastAPI reads this annotation to inject the request: a union would be a query field
    _RequestOrScope = HTTPConnection


def stream_control(request: _RequestOrScope) -> StreamControl:
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


def get_guard(request: _RequestOrScope) -> TaskGuard:
    """The guard of the middleware (from a request or an ASGI scope); a FastAPI dependency:
    ``Depends(get_guard)``."""
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
        for what, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            if value is not None:
                check_seconds(value, what)
        if readiness_path is not None and (
            not isinstance(readiness_path, str) or not readiness_path.startswith("/")
        ):
            raise ValueError(
                f"readiness_path must be a path such as '/healthz/ready', not {readiness_path!r}"
            )
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
            await serve(self, scope, receive, send)
        elif kind == "lifespan":
            await Lifespan(self, scope, receive, send).run()
        elif kind == "websocket":
            await WebSocketSession(self, scope, receive, send).run()
        else:  # other scope types pass through untouched
            await self.app(scope, receive, send)

    def warn_unguarded(self) -> None:
        """Warn (once) that requests pass through unguarded: the guard is not running."""
        if not self._warned_idle:
            self._warned_idle = True
            logger.warning(
                "TaskGuardMiddleware: the guard is not running (the server did not run the "
                "ASGI lifespan?): requests are not guarded"
            )
