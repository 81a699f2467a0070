"""The Starlette app of the ASGI cases, as uvicorn factories (``--factory``).

``make_plain``: the app alone; ``make_noop``: the app behind a pure-ASGI
middleware that does nothing (the floor any middleware costs: one more call
per request); ``make_scoped``: the no-op middleware plus one anyio cancel
scope per request (the floor of a middleware that can cut requests);
``make_guarded``: the same app wrapped in
``TaskGuardMiddleware`` (imported only there, so the plain app runs even when
``taskguard.asgi`` is missing).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

#: seconds between two items of /server-stream/{n}
INTERVAL = float(os.environ.get("BENCH_STREAM_INTERVAL", "0.1"))


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello, world")


async def server_stream(request: Request) -> StreamingResponse:
    n = int(request.path_params["n"])
    try:
        from taskguard.asgi import stream_control

        # A stream cut by shutdown ends cleanly with a resume point.
        stream_control(request).final_message = lambda sent: f"resume-at {sent}\n"
    except (ImportError, LookupError):
        pass

    async def items() -> AsyncIterator[str]:
        for i in range(n):
            yield f"item {i}\n"
            await anyio.sleep(INTERVAL)

    return StreamingResponse(items(), media_type="text/plain")


def _app() -> Starlette:
    return Starlette(routes=[Route("/", hello), Route("/server-stream/{n:int}", server_stream)])


def make_plain() -> Starlette:
    return _app()


class _Noop:
    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def make_noop() -> object:
    return _Noop(_app())


class _Scoped(_Noop):
    """The no-op middleware with one anyio cancel scope around each request: the
    least a middleware pays to be able to cut a request without piercing the
    app's own shielded scopes (what TaskGuardMiddleware does, minus its
    bookkeeping)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope():
            await self.app(scope, receive, send)


def make_scoped() -> object:
    return _Scoped(_app())


def make_guarded() -> object:
    from taskguard import TaskGuard
    from taskguard.asgi import TaskGuardMiddleware

    return TaskGuardMiddleware(_app(), TaskGuard(exit_wait_timeout=10.0, cancel_grace=1.0))
