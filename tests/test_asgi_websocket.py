"""WebSockets through TaskGuardMiddleware: under real servers with a real client,
and in-process through Starlette's TestClient.

A FastAPI websocket producer sends a numbered message every 50 ms. At SIGTERM
the connection gets the app's final message (the resume point) and then the
close code 1012 (or 1001, a middleware option); a client that goes away stops
the producer (its ``finally`` runs); the report counts each connection in
``streams`` by outcome. The app writes the report to a file from its own
lifespan shutdown, which runs after the guard closed.
"""

from __future__ import annotations

import gc
import json
import signal
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from servers import ServerProcess
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import taskguard
from taskguard._backends import BackendName
from taskguard.asgi import TaskGuardMiddleware, stream_control

with warnings.catch_warnings():
    # Starlette 1.10 asks for httpx2 and warns when its TestClient runs on httpx.
    warnings.simplefilter("ignore", UserWarning)
    from starlette.testclient import TestClient, WebSocketDenialResponse

KINDS = ["uvicorn", "hypercorn", "hypercorn-trio"]

WS_APP = """
import json, os
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, WebSocket

import taskguard
from taskguard.asgi import StreamControl, TaskGuardMiddleware, stream_control

progress = {}


@asynccontextmanager
async def lifespan(api):
    yield
    with open(os.environ["APP_REPORT"], "w") as out:  # after the guard closed
        out.write(guard.report.model_dump_json())


api = FastAPI(lifespan=lifespan)


@api.websocket("/ticks")
async def ticks(websocket: WebSocket, ctl: Annotated[StreamControl, Depends(stream_control)]):
    key = websocket.query_params.get("key", "k")
    pad = "x" * int(websocket.query_params.get("pad", "0"))
    state = progress[key] = {"produced": 0, "finally": False}
    ctl.final_message = lambda sent: json.dumps({"resume_after": sent - 1})
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(json.dumps({"i": state["produced"], "pad": pad}))
            state["produced"] += 1
            await anyio.sleep(0.05)
    finally:
        state["finally"] = True


@api.websocket("/echo")
async def echo(websocket: WebSocket):
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close()
            return
        await websocket.send_text(text.upper())


@api.get("/progress")
async def get_progress():
    return progress


guard = taskguard.TaskGuard(exit_wait_timeout=5)
app = TaskGuardMiddleware(
    api,
    guard,
    readiness_path="/healthz/ready",
    websocket_close_code=int(os.environ.get("APP_CLOSE_CODE", "1012")),
    send_timeout=float(os.environ.get("APP_SEND_TIMEOUT", "30")),
)
"""


def _start(kind: str, tmp_path: Path, **env: str) -> tuple[ServerProcess, Path]:
    (tmp_path / "ws_app.py").write_text(WS_APP)
    report = tmp_path / f"report-{kind}.json"
    server = ServerProcess(kind, "ws_app:app", tmp_path, env={"APP_REPORT": str(report), **env})
    return server, report


def _ws(server: ServerProcess, path: str) -> Any:
    return connect(server.url.replace("http://", "ws://") + path, open_timeout=5)


def _wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _receive_until_closed(ws: Any, into: list[dict[str, int]]) -> ConnectionClosed:
    while True:
        try:
            into.append(json.loads(ws.recv(timeout=5)))
        except ConnectionClosed as closed:
            return closed


def _shut_down(server: ServerProcess, report: Path) -> dict[str, Any]:
    server.send_signal(signal.SIGTERM)
    server.wait_exit(timeout=10)
    _wait_for(report.exists, 5)
    return dict(json.loads(report.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "code"), [*((kind, 1012) for kind in KINDS), ("uvicorn", 1001)])
def test_sigterm_closes_the_websocket_after_the_final_message(
    kind: str, code: int, tmp_path: Path
) -> None:
    server, report_file = _start(kind, tmp_path, APP_CLOSE_CODE=str(code))
    received: list[dict[str, int]] = []
    try:
        with _ws(server, "/ticks?key=a") as ws:
            while len(received) < 5:
                received.append(json.loads(ws.recv(timeout=5)))
            signalled = server.send_signal(signal.SIGTERM)
            closed = _receive_until_closed(ws, received)
            ended = time.monotonic() - signalled
        status = server.wait_exit(timeout=10)
        _wait_for(report_file.exists, 5)
        report = json.loads(report_file.read_text())
        output = server.output()
    finally:
        server.stop()
    print(f"{kind}: closed {closed.rcvd} {ended:.3f}s after SIGTERM; status {status}")
    assert closed.rcvd is not None, output
    assert closed.rcvd.code == code, output
    final = received[-1]
    ticks: list[int] = [item["i"] for item in received[:-1]]
    assert ticks == list(range(len(ticks)))
    assert "resume_after" in final, received
    assert final["resume_after"] in (ticks[-1], ticks[-1] - 1)  # at least once: one in flight
    assert ended < 1.0, output
    assert report["streams"] == {"interrupted": 1}, report
    assert report["clean"] is True, report


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_leaves_stops_the_producer(kind: str, tmp_path: Path) -> None:
    server, report_file = _start(kind, tmp_path)
    try:
        with _ws(server, "/ticks?key=gone") as ws:
            for _ in range(3):
                ws.recv(timeout=5)
        left = time.monotonic()  # the client closed the connection (close frame)

        def progress() -> dict[str, Any]:
            return dict(httpx.get(server.url + "/progress", timeout=5).json()["gone"])

        _wait_for(lambda: progress()["finally"] is True, 3)
        took = time.monotonic() - left
        produced = progress()["produced"]
        time.sleep(0.3)
        assert progress()["produced"] == produced
        report = _shut_down(server, report_file)
    finally:
        server.stop()
    print(f"{kind}: producer stopped {took:.3f}s after the client left, {produced} produced")
    assert produced < 3 + 5  # within a few items
    assert report["streams"] == {"disconnected": 1}, report


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_stops_reading_is_cut_after_send_timeout(kind: str, tmp_path: Path) -> None:
    """The client stops reading (no compression, 200 KB messages, a 4 KiB receive
    buffer): once the buffers are full a send blocks; after send_timeout (1 s)
    the producer is stopped and the connection counts as stalled."""
    server, report_file = _start(kind, tmp_path, APP_SEND_TIMEOUT="1")
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    url = server.url.replace("http://", "ws://") + "/ticks?key=stall&pad=200000"
    ws = connect(url, sock=sock, compression=None, max_queue=1, max_size=None)
    try:

        def state() -> dict[str, Any]:
            return dict(httpx.get(server.url + "/progress", timeout=5).json()["stall"])

        def stuck() -> bool:
            before = state()["produced"]
            time.sleep(0.3)
            return bool(state()["produced"] == before)

        _wait_for(stuck, 20)
        blocked = time.monotonic()
        _wait_for(lambda: state()["finally"] is True, 1 + 4)
        took = time.monotonic() - blocked
        produced = state()["produced"]
        ws.close_socket()
        report = _shut_down(server, report_file)
    finally:
        ws.close_socket()
        server.stop()
    print(f"{kind}: sends blocked after {produced} messages; producer stopped {took:.2f}s later")
    assert report["streams"] == {"stalled": 1}, report


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_messages_both_ways_and_a_close_by_the_app(kind: str, tmp_path: Path) -> None:
    """What the app sends and receives passes unchanged; the app's own close is
    the client's close code; the connection counts as completed."""
    server, report_file = _start(kind, tmp_path)
    try:
        with _ws(server, "/echo") as ws:
            for word in ("a", "bc", "déf"):
                ws.send(word)
                assert ws.recv(timeout=5) == word.upper()
            ws.send("bye")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
        report = _shut_down(server, report_file)
    finally:
        server.stop()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1000
    assert report["streams"] == {"completed": 1}, report


# -- in-process (Starlette's TestClient) ---------------------------------------------


def _stoppable_app(events: list[str]) -> Starlette:
    async def stoppable(websocket: WebSocket) -> None:
        ctl = stream_control(websocket)
        ctl.final_message = b"bye"
        await websocket.accept()
        try:
            await websocket.send_text("hello")
            assert await websocket.receive_text() == "stop"
            ctl.stop()
            await anyio.sleep_forever()
        finally:
            events.append("finally")

    return Starlette(routes=[WebSocketRoute("/ws", stoppable)])


def test_stop_ends_the_websocket_with_the_final_message_and_a_normal_close() -> None:
    events: list[str] = []
    mw = TaskGuardMiddleware(_stoppable_app(events), signals="off")
    with TestClient(mw) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "hello"
        ws.send_text("stop")
        assert ws.receive_bytes() == b"bye"
        assert ws.receive() == {"type": "websocket.close", "code": 1000, "reason": ""}
    assert events == ["finally"]
    assert mw.guard.report.streams == {"stopped": 1}


def test_after_the_drain_a_new_websocket_is_refused_with_503() -> None:
    mw = TaskGuardMiddleware(_stoppable_app([]), signals="off")
    with TestClient(mw) as client:
        mw.guard.shutdown("test")
        _wait_for(lambda: mw.guard.state is taskguard.State.CLOSED, 5)
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/ws"):
            pass
    assert denied.value.status_code == 503


def test_the_close_code_is_checked() -> None:
    with pytest.raises(ValueError, match="websocket_close_code must be 1012"):
        TaskGuardMiddleware(_stoppable_app([]), websocket_close_code=1000)  # type: ignore[arg-type]


# -- invisible: the app's errors, the client's close, no leftovers -----------------


class _Server:
    """The server side of one websocket, raw ASGI: the client sends one text
    frame; the server answers the app's close with websocket.disconnect (or,
    ``leaves=True``, the client leaves right after its frame)."""

    def __init__(self, leaves: bool = False) -> None:
        self.incoming: list[Message] = [
            {"type": "websocket.connect"},
            {"type": "websocket.receive", "text": "not bytes"},
        ]
        self.sent: list[Message] = []
        self.closed = anyio.Event()
        self.disconnected = anyio.Event()
        self.on_close: Callable[[], object] = lambda: None
        if leaves:
            self.closed.set()

    async def receive(self) -> Message:
        if self.incoming:
            return self.incoming.pop(0)
        await self.closed.wait()
        self.disconnected.set()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(self, message: Message) -> None:
        self.sent.append(dict(message))
        if message["type"] == "websocket.close":
            self.closed.set()
            self.on_close()


async def _error_reaches_the_server(app: Any, server: _Server) -> taskguard.ShutdownReport:
    """Serve one websocket of ``app`` through the middleware: the RuntimeError the
    app raises reaches the server, after the app's accept and close went out."""
    async with taskguard.TaskGuard() as guard:
        mw = TaskGuardMiddleware(app, guard, signals="off")
        with pytest.raises(RuntimeError, match="expected bytes"):
            await mw({"type": "websocket", "path": "/ws"}, server.receive, server.send)
    assert [m["type"] for m in server.sent] == ["websocket.accept", "websocket.close"]
    return guard.report


async def test_an_error_the_app_raises_after_its_own_close_reaches_the_server(
    anyio_backend: str,
) -> None:
    """As Starlette's WebSocketEndpoint does on a frame of the wrong kind: close
    (1003), then raise. The disconnect that answers the app's close is not a
    client leaving: the app is not cut, and its error reaches the server."""
    server = _Server()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1003})
        await server.disconnected.wait()
        await anyio.sleep(0.1)  # the middleware has seen the disconnect by now
        raise RuntimeError("expected bytes")

    report = await _error_reaches_the_server(app, server)
    assert report.streams == {"completed": 1}


async def test_a_client_that_leaves_while_the_app_handles_its_frame_does_not_cut_it(
    anyio_backend: str,
) -> None:
    """The client sends a frame and leaves at once; the app, still handling the
    frame, closes (1003) and raises: without the middleware the server gets that
    error (a server does not cancel the app on a disconnect), so with it too."""
    server = _Server(leaves=True)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()
        await server.disconnected.wait()
        await anyio.sleep(0.1)  # the middleware has seen the disconnect by now
        await send({"type": "websocket.close", "code": 1003})
        raise RuntimeError("expected bytes")

    report = await _error_reaches_the_server(app, server)
    assert report.streams == {"disconnected": 1}


async def test_an_error_the_app_raises_reaches_a_server_that_cancels_it_meanwhile(
    anyio_backend: str,
) -> None:
    """Starlette's TestClient cancels the app right after the client's close: an
    error the app raised before that cancellation reaches the server, as
    without the middleware, though the middleware was still ending the stream."""
    server = _Server()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1003})
        raise RuntimeError("expected bytes")

    async def serve(mw: TaskGuardMiddleware) -> None:
        with anyio.CancelScope() as cut:
            server.on_close = cut.cancel
            await mw({"type": "websocket", "path": "/ws"}, server.receive, server.send)

    async with taskguard.TaskGuard() as guard:
        with pytest.raises(RuntimeError, match="expected bytes"):
            await serve(TaskGuardMiddleware(app, guard, signals="off"))


def test_a_client_that_closes_cancels_the_app_as_the_test_client_does(
    anyio_backend_name: BackendName, anyio_backend_options: dict[str, Any]
) -> None:
    """Starlette's TestClient cancels the app when the client's ``with`` ends:
    the app sees that cancellation, and the session leaves nothing unclosed."""
    events: list[str] = []

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            events.append("cancelled")
            raise

    mw = TaskGuardMiddleware(Starlette(routes=[WebSocketRoute("/", endpoint)]), signals="off")
    with (
        TestClient(mw, backend=anyio_backend_name, backend_options=anyio_backend_options) as client,
        client.websocket_connect("/"),
    ):
        pass
    gc.collect()  # what the session left unclosed warns now, in this test
    assert events == ["cancelled"]


def test_a_reader_task_and_a_writer_share_the_websocket(
    anyio_backend_name: BackendName, anyio_backend_options: dict[str, Any]
) -> None:
    """Starlette's concurrency pattern: a reader task feeds a memory stream, the
    app writes what it gets; the client's close (the test client then cancels
    the app) ends it, and the session leaves nothing unclosed."""

    async def endpoint(websocket: WebSocket) -> None:
        to_writer, from_reader = anyio.create_memory_object_stream[Any]()

        async def reader() -> None:
            async with to_writer:
                async for data in websocket.iter_json():
                    await to_writer.send(data)

        await websocket.accept()
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            async with from_reader:
                async for message in from_reader:
                    await websocket.send_json(message)
        await websocket.close()

    mw = TaskGuardMiddleware(Starlette(routes=[WebSocketRoute("/", endpoint)]), signals="off")
    with TestClient(
        mw, backend=anyio_backend_name, backend_options=anyio_backend_options
    ) as client:
        with client.websocket_connect("/") as ws:
            ws.send_json({"hello": "world"})
            assert ws.receive_json() == {"hello": "world"}
        gc.collect()  # what the session left unclosed warns now, in this test
