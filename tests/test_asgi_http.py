"""TaskGuardMiddleware's HTTP path in-process: what the server receives and what the
app sees are what they would be without the middleware (asyncio and trio).

The real-server versions of these checks are in tests/test_asgi_transparency.py.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Scope

import taskguard
from taskguard.asgi import TaskGuardMiddleware
from taskguard.testing import asgi_lifespan

pytestmark = pytest.mark.anyio

SCOPE: Scope = {
    "type": "http",
    "http_version": "1.1",
    "method": "GET",
    "path": "/",
    "query_string": b"",
    "headers": [],
}


class Server:
    """The server's side of one request: records what it is sent, in order."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.complete = anyio.Event()
        self.trailers = False
        self.request_read = False

    async def receive(self) -> Message:
        if not self.request_read:
            self.request_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # Like uvicorn and httpx.ASGITransport: http.disconnect once the response is complete.
        await self.complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        kind = message["type"]
        if kind == "http.response.start":
            self.trailers = message.get("trailers", False)
        elif kind == "http.response.trailers":
            if not message.get("more_trailers", False):
                self.complete.set()
        elif not message.get("more_body", False) and not self.trailers:
            self.complete.set()


def with_lifespan(http: Any) -> Any:
    """A raw ASGI app: ``http`` for requests, a plain lifespan (apps without one
    are the lifespan tests' business)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await http(scope, receive, send)

    return app


async def run(mw: TaskGuardMiddleware, server: Server, **scope: Any) -> None:
    await mw({**SCOPE, **scope}, server.receive, server.send)


async def test_background_tasks_run_after_a_streamed_or_204_response() -> None:
    done: list[str] = []

    async def mark(name: str) -> None:
        await anyio.sleep(0.05)  # time enough for a wrongly taken disconnect to cancel it
        done.append(name)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), background=BackgroundTask(mark, "stream"))

    async def no_content(request: Request) -> Response:
        return Response(status_code=204, background=BackgroundTask(mark, "204"))

    app = Starlette(routes=[Route("/stream", stream), Route("/204", no_content)])
    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    async with asgi_lifespan(mw):
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/stream")).content == b"ab"
            assert (await client.get("/204")).status_code == 204
    assert sorted(done) == ["204", "stream"]
    assert mw.guard.report.streams == {"completed": 1}


@pytest.mark.parametrize("when", ["after the body", "mid-stream"])
async def test_the_apps_exception_reaches_the_server(when: str) -> None:
    error = RuntimeError(f"boom {when}")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        if when == "after the body":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        raise error

    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    server = Server()
    async with asgi_lifespan(mw):
        with pytest.raises(RuntimeError) as info:
            await run(mw, server)
    assert info.value is error
    assert mw.guard.report.streams == {"completed" if when == "after the body" else "failed": 1}


async def test_trailers_pass_through_in_order() -> None:
    messages: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": [], "trailers": True},
        {"type": "http.response.body", "body": b"x" * 100, "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
        {"type": "http.response.trailers", "headers": [(b"x-one", b"1")], "more_trailers": True},
        {"type": "http.response.trailers", "headers": [(b"x-two", b"2")]},
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)

    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    server = Server()
    async with asgi_lifespan(mw):
        await run(mw, server)
    assert server.sent == messages
    assert mw.guard.report.streams == {"completed": 1}


async def test_trailers_through_gzip_middleware() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"x" * 4000})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})

    mw = TaskGuardMiddleware(with_lifespan(GZipMiddleware(app)), signals="off")
    server = Server()
    headers = [(b"accept-encoding", b"gzip")]
    async with asgi_lifespan(mw):
        await run(mw, server, headers=headers)
    assert [m["type"] for m in server.sent][-1] == "http.response.trailers"
    assert server.sent[-1]["headers"] == [(b"grpc-status", b"0")]


async def test_send_returns_only_once_the_servers_send_has_returned() -> None:
    # Backpressure and buffer reuse: the app may refill its buffer only once the
    # server is done with the previous chunk.
    log: list[str] = []
    release = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        buffer = bytearray(b"one")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": memoryview(buffer), "more_body": True})
        log.append("app: send returned")
        buffer[:] = b"two"
        await send({"type": "http.response.body", "body": memoryview(buffer), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    received: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            if not received:
                log.append("server: got the first chunk")
                await release.wait()  # a slow client
            await anyio.sleep(0)  # e.g. hypercorn: a checkpoint, then bytes(body)
            received.append(bytes(message["body"]))
            log.append("server: send returns")

    server = Server()
    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    async with asgi_lifespan(mw), anyio.create_task_group() as tg:
        tg.start_soon(mw, dict(SCOPE), server.receive, send)
        with anyio.fail_after(5):
            while not log:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert log == ["server: got the first chunk"]  # the app is still in send()
        release.set()
    assert received == [b"one", b"two", b""]
    assert log[:3] == ["server: got the first chunk", "server: send returns", "app: send returned"]


async def test_an_error_of_the_servers_send_reaches_the_app() -> None:
    seen: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await send({"type": "http.response.trailers", "headers": []})
        except AssertionError as exc:
            seen.append(exc)
            raise

    async def send(message: Message) -> None:
        if message["type"] == "http.response.trailers":  # as Starlette's TestClient does
            raise AssertionError("trailers without declaring trailers")

    server = Server()
    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    async with asgi_lifespan(mw):
        with pytest.raises(AssertionError, match="without declaring") as info:
            await mw(dict(SCOPE), server.receive, send)
    assert seen == [info.value]


@pytest.mark.parametrize("response", ["plain", "stream"])
async def test_responses_sent_while_draining_carry_connection_close(response: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"ok"

    async def endpoint(request: Request) -> Response:
        if request.query_params.get("own") == "1":
            return PlainTextResponse("ok", headers={"connection": "keep-alive"})
        if response == "plain":
            return PlainTextResponse("ok")
        return StreamingResponse(chunks())

    mw = TaskGuardMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        taskguard.TaskGuard(drain_delay=30, exit_wait_timeout=60),
        signals="off",
    )

    async def connection_header(**scope: Any) -> list[bytes]:
        server = Server()
        await run(mw, server, **scope)
        return [v for k, v in server.sent[0]["headers"] if k == b"connection"]

    async with asgi_lifespan(mw):
        assert await connection_header() == []
        mw.guard.shutdown("test")
        assert mw.guard.state is taskguard.State.DRAINING
        assert await connection_header() == [b"close"]
        assert await connection_header(http_version="1.0") == [b"close"]
        assert await connection_header(http_version="2") == []  # HTTP/2 forbids the header
        assert await connection_header(query_string=b"own=1") == [b"keep-alive"]
        mw.guard.shutdown("test", force=True)


# Starlette leaves its generator unclosed when its task group is cancelled at the
# generator's yield; trio warns when it is finalized (the app's, not ours)
@pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
async def test_a_disconnect_read_by_the_app_mid_stream_stops_the_stream() -> None:
    # Starlette's StreamingResponse reads receive() itself (ASGI < 2.4): a
    # disconnect it sees while the response is open is the client leaving.
    produced: list[int] = []

    async def numbers() -> AsyncIterator[bytes]:
        for i in range(1000):
            produced.append(i)
            yield b"%d\n" % i
            await anyio.sleep(0.01)

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(numbers())

    left = anyio.Event()

    async def receive() -> Message:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if len(produced) >= 5:
            left.set()

    mw = TaskGuardMiddleware(Starlette(routes=[Route("/", endpoint)]), signals="off")
    async with asgi_lifespan(mw):
        with anyio.fail_after(5):
            await mw({**SCOPE, "asgi": {"version": "3.0", "spec_version": "2.3"}}, receive, send)
    assert len(produced) < 50
    assert mw.guard.report.streams == {"disconnected": 1}


async def test_work_after_a_stream_that_ended_at_once_is_not_cancelled() -> None:
    # The whole stream is sent before its helper task first runs (the server's
    # send does not suspend): the helper must not take that for a cut.
    done: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"all", "more_body": False})
        await anyio.sleep(0.05)  # e.g. a background task
        done.append("after the response")

    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    server = Server()
    async with asgi_lifespan(mw):
        await run(mw, server)
    assert done == ["after the response"]
    assert mw.guard.report.streams == {"completed": 1}


async def test_a_request_body_read_after_the_response_started_arrives_whole() -> None:
    # The disconnect watcher reads the server's receive while the app does not;
    # what it reads is kept for the app, in order, and it does not buffer ahead.
    chunks = [b"one", b"two", b"three"]
    read: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"reading", "more_body": True})
        await anyio.sleep(0.05)  # the watcher reads meanwhile
        while True:
            message = await receive()
            read.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    incoming = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    served: list[int] = []

    async def receive() -> Message:
        if incoming:
            served.append(len(incoming))
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        pass

    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    async with asgi_lifespan(mw):
        with anyio.fail_after(5):
            await mw(dict(SCOPE), receive, send)
    assert read == chunks
    assert mw.guard.report.streams == {"completed": 1}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # as under uvicorn
async def test_requests_leave_no_more_garbage_cycles_than_without_the_middleware() -> None:
    # The scope holds the request's state, which holds the server's send, which
    # holds the scope. Left in place, that cycle makes every request's objects
    # garbage for the collector, whose passes then cost more than the rest of
    # the middleware (measured under uvicorn: 550 collections per 20,000
    # requests, against 1 without the middleware).
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class Cycle(Server):  # like a server's per-request object, holding the scope
        def __init__(self, method: str) -> None:
            super().__init__()
            self.scope = {**SCOPE, "method": method}

    async def garbage(asgi: Any) -> int:
        loop = asyncio.get_running_loop()
        gc.collect()
        gc.disable()
        try:
            for method in ["HEAD"] * 50 + ["GET"] * 50:  # plain responses, then streams
                server = Cycle(method)
                await loop.create_task(asgi(server.scope, server.receive, server.send))
            del server
            return gc.collect()
        finally:
            gc.enable()

    mw = TaskGuardMiddleware(with_lifespan(app), signals="off")
    async with asgi_lifespan(mw):
        assert await garbage(mw) <= await garbage(with_lifespan(app))


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
@pytest.mark.parametrize("cut", ["stalled", "disconnected", "interrupted", "expired"])
async def test_a_cut_leaves_the_apps_generator_to_be_finalized_as_the_request_ends(
    cut: str, spec: str
) -> None:
    # Cut while it waits at its yield (the app is in send), the generator is not
    # aclose()d by Starlette: it goes with its last reference. The middleware holds
    # none and makes no cycle (the collector is off here). Under ASGI < 2.4 (uvicorn
    # says 2.3) Starlette streams from a child task, and a cut raises through its
    # task group: on asyncio anyio's task_done keeps its CancelledError in a local
    # of the frame that the exception's traceback holds, and on Python 3.12
    # contextlib's __aexit__ frame and Starlette's create_collapsing_task_group
    # frame hold each other: a cycle through the child's frames to the generator,
    # left to the collector, exactly as without the middleware when the server's
    # send raises (a broken connection).
    finals: list[int] = []

    async def numbers() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
        finally:
            finals.append(1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await StreamingResponse(numbers())(scope, receive, send)

    async def finalized(asgi: Any) -> tuple[bool, bool]:
        """Whether the generator was finalized as the request ended; after a collection."""
        sent, left = 0, anyio.Event()

        async def receive() -> Message:
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal sent
            sent += 1
            if sent == 5 and cut == "stalled":
                await anyio.sleep_forever()  # the client stopped reading
            elif sent == 5 and cut == "disconnected":
                left.set()
            elif sent == 5 and cut == "interrupted":
                mw.guard.shutdown("test")
            await anyio.sleep(0.01)  # a slow client: the app waits in send

        finals.clear()
        gc.collect()
        gc.disable()
        try:
            with warnings.catch_warnings():  # trio's, on an unexhausted generator
                warnings.simplefilter("ignore", ResourceWarning)
                with anyio.fail_after(5):
                    await asgi({**SCOPE, "asgi": {"spec_version": spec}}, receive, send)
                await anyio.sleep(0.05)  # its aclose() (the loop's finalizer hook) runs
                at_once = bool(finals)
                gc.collect()
                await anyio.sleep(0.05)
        finally:
            gc.enable()
        return at_once, bool(finals)

    expires = 0.1 if cut == "expired" else None
    mw = TaskGuardMiddleware(
        with_lifespan(app), send_timeout=0.2, max_duration=expires, signals="off"
    )
    async with asgi_lifespan(mw):
        at_once, collected = await finalized(mw)
    assert mw.guard.report.streams == {cut: 1}
    assert collected  # nothing live holds it
    if spec == "2.4":  # streamed from the app's own task
        assert at_once
    # Under 2.3 only "collected" is promised: the cycle above is Starlette's and
    # contextlib's (the same without the middleware when the server's send raises).
