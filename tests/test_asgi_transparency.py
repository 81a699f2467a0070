"""TaskGuardMiddleware is invisible on the HTTP path: real servers, real clients.

Each test writes a small Starlette app into ``tmp_path``, starts it with the
server's own command line (``tests/servers.py``) and talks to it over TCP. What
is checked is what the app and the client see with the middleware, against
what the server does without it: background tasks after a streamed response
run, exceptions after the body reach the server, trailers pass through, the
app's ``send()`` returns only once the server has the message, responses sent
while draining carry ``Connection: close``, requests cut at the exit wait get a
503 and one log line, and a cut stream leaves no ERROR in uvicorn's log.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from servers import running_server

pytestmark = pytest.mark.slow  # real server processes

SERVERS = ["uvicorn", "hypercorn", "hypercorn-trio"]

APP = """
import os
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import taskguard
from taskguard.asgi import TaskGuardMiddleware

MARKS = Path(os.environ["MARKS"])


async def mark(name: str) -> None:
    await anyio.sleep(0.2)  # long enough for a wrongly taken disconnect to cancel it
    (MARKS / name).write_text("done")


async def two_chunks():
    yield b"a"
    yield b"b"


async def stream_then_background(request: Request) -> Response:
    task = BackgroundTask(mark, request.query_params["key"])
    return StreamingResponse(two_chunks(), background=task)


async def no_content_then_background(request: Request) -> Response:
    return Response(status_code=204, background=BackgroundTask(mark, request.query_params["key"]))


async def fail_after_body(request: Request) -> Response:
    async def boom() -> None:
        raise RuntimeError("boom after the body " + request.query_params["key"])

    return StreamingResponse(two_chunks(), background=BackgroundTask(boom))


async def reused_buffer(request: Request) -> Response:
    async def chunks():
        buffer = bytearray(1000)
        for i in range(50):
            buffer[:] = bytes([65 + i % 26]) * 1000
            yield memoryview(buffer)

    return StreamingResponse(chunks())


class Trailers:  # a raw ASGI endpoint (Starlette calls a plain function with a Request)
    async def __call__(self, scope, receive, send) -> None:
        await trailers(scope, receive, send)


async def trailers(scope, receive, send) -> None:
    assert "http.response.trailers" in scope["extensions"]
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
    await send({"type": "http.response.body", "body": b"hello ", "more_body": True})
    await send({"type": "http.response.body", "body": b"world"})
    # one trailers message: hypercorn ends the HTTP/2 stream with the first
    await send({"type": "http.response.trailers", "headers": [(b"x-one", b"1"), (b"x-two", b"2")]})


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def start_draining(request: Request) -> Response:
    guard.shutdown("test: start draining")  # not a signal: the server keeps serving
    return PlainTextResponse("draining")


async def hang(request: Request) -> Response:
    await anyio.sleep(3600)
    return PlainTextResponse("never")


async def stats(request: Request) -> Response:
    return PlainTextResponse(str(guard.stats().guarded))


async def endless(request: Request) -> Response:
    async def items():
        i = 0
        while True:
            yield b"item %d\\n" % i
            i += 1
            await anyio.sleep(0.02)

    return StreamingResponse(items())


guard = taskguard.TaskGuard(
    exit_wait_timeout=float(os.environ.get("EXIT_WAIT", "10")),
    drain_delay=float(os.environ.get("DRAIN_DELAY", "0")),
)
api = Starlette(
    routes=[
        Route("/stream-bg", stream_then_background),
        Route("/204-bg", no_content_then_background),
        Route("/fail-after-body", fail_after_body),
        Route("/reused-buffer", reused_buffer),
        Route("/trailers", Trailers()),
        Route("/hello", hello),
        Route("/start-draining", start_draining),
        Route("/hang", hang),
        Route("/endless", endless),
        Route("/stats", stats),
    ]
)
app = TaskGuardMiddleware(api, guard, readiness_path="/healthz/ready")
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "tg_app.py").write_text(APP)
    (tmp_path / "marks").mkdir()
    return tmp_path


def env(app_dir: Path, **extra: str) -> dict[str, str]:
    return {"MARKS": str(app_dir / "marks"), **extra}


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``condition()`` became true within ``timeout`` (a generous bound)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("kind", SERVERS)
def test_background_tasks_run_after_a_streamed_or_204_response(kind: str, app_dir: Path) -> None:
    # Once the response is complete the server answers receive() with
    # http.disconnect: that is the end of the response, not the client leaving.
    with running_server(kind, "tg_app:app", app_dir, env=env(app_dir)) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i in range(5):
                assert client.get(f"/stream-bg?key=s{i}").content == b"ab"
                assert client.get(f"/204-bg?key=n{i}").status_code == 204
        marks = app_dir / "marks"
        for i in range(5):
            assert wait_until((marks / f"s{i}").exists), f"background task after stream {i} lost"
            assert wait_until((marks / f"n{i}").exists), f"background task after 204 {i} lost"
        assert "Traceback" not in server.output()


@pytest.mark.parametrize("kind", SERVERS)
def test_an_exception_after_the_body_reaches_the_server(kind: str, app_dir: Path) -> None:
    with running_server(kind, "tg_app:app", app_dir, env=env(app_dir)) as server:
        response = httpx.get(server.url + "/fail-after-body?key=k1", timeout=10)
        assert response.content == b"ab"
        logged = wait_until(lambda: "boom after the body k1" in server.output())
        assert logged, f"the exception did not reach the server:\n{server.output()}"
        # the server's own report of an app exception, as without the middleware
        word = "Exception in ASGI application" if kind == "uvicorn" else "Error in ASGI Framework"
        assert word in server.output()


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn", "hypercorn-trio"])
def test_send_returns_only_once_the_server_has_the_message(kind: str, app_dir: Path) -> None:
    # The app reuses one buffer for every chunk: it may only do so once the
    # server has taken the previous one (uvicorn copies it when send() runs).
    expected = b"".join(bytes([65 + i % 26]) * 1000 for i in range(50))
    with (
        running_server(kind, "tg_app:app", app_dir, env=env(app_dir)) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        for _ in range(5):
            assert client.get("/reused-buffer").content == expected


def h2_get(port: int, path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
    """GET over cleartext HTTP/2 (prior knowledge): status, body, trailers, stream ended."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [
        (":method", "GET"),
        (":path", path),
        (":scheme", "http"),
        (":authority", f"127.0.0.1:{port}"),
        ("te", "trailers"),
    ]
    conn.send_headers(1, headers, end_stream=True)
    status, body, trailers, ended = 0, b"", [], False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while not ended:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers.extend(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
    return status, body, trailers, ended


@pytest.mark.parametrize("kind", ["hypercorn", "hypercorn-trio"])
def test_trailers_pass_through_in_order_over_http2(kind: str, app_dir: Path) -> None:
    # uvicorn does not offer the trailers extension; hypercorn does over HTTP/2.
    with running_server(kind, "tg_app:app", app_dir, env=env(app_dir)) as server:
        status, body, trailers, ended = h2_get(server.port, "/trailers")
    assert (status, body) == (200, b"hello world")
    assert trailers == [(b"x-one", b"1"), (b"x-two", b"2")]
    assert ended  # the HTTP/2 stream ends (END_STREAM with the trailers)


@pytest.mark.parametrize("kind", SERVERS)
def test_responses_sent_while_draining_carry_connection_close(kind: str, app_dir: Path) -> None:
    draining = env(app_dir, DRAIN_DELAY="30", EXIT_WAIT="60")
    with running_server(kind, "tg_app:app", app_dir, env=draining) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            running = client.get("/hello")
            assert "connection" not in running.headers
            draining = client.get("/start-draining")
            assert draining.headers["connection"] == "close"
        with httpx.Client(base_url=server.url, timeout=10) as client:
            # a new connection during the drain: served, and told to go elsewhere next time
            assert client.get("/healthz/ready").status_code == 503
            during = client.get("/hello")
            assert during.text == "hello"
            assert during.headers["connection"] == "close"
            streamed = client.get("/stream-bg?key=d")
            assert streamed.headers["connection"] == "close"


@pytest.mark.parametrize("kind", SERVERS)
def test_requests_cut_at_the_exit_wait_get_503_and_one_log_line(kind: str, app_dir: Path) -> None:
    n = 20
    with running_server(kind, "tg_app:app", app_dir, env=env(app_dir, EXIT_WAIT="1")) as server:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(httpx.get, server.url + "/hang", timeout=15) for _ in range(n)]
            started = wait_until(lambda: httpx.get(server.url + "/stats").text == str(n + 1))
            assert started, "the requests did not start"  # n + the /stats request itself
            server.send_signal(signal.SIGTERM)
            responses = [f.result(timeout=15) for f in futures]
        server.wait_exit(timeout=10)
        output = server.output()
    for response in responses:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["connection"] == "close"
    lines = [line for line in output.splitlines() if "GET /hang" in line and "503" in line]
    assert len([line for line in lines if "cut at the shutdown deadline" in line]) == n, output
    assert "Traceback" not in output, output
    assert "Exception in ASGI application" not in output, output


@pytest.mark.parametrize("kind", SERVERS)
def test_a_stream_cut_at_shutdown_is_incomplete_and_logs_no_error(kind: str, app_dir: Path) -> None:
    with running_server(kind, "tg_app:app", app_dir, env=env(app_dir)) as server:
        lines: list[str] = []
        ending = "complete"
        try:
            with httpx.stream("GET", server.url + "/endless", timeout=10) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 5:
                        server.send_signal(signal.SIGTERM)
        except httpx.RemoteProtocolError:
            ending = "incomplete"  # aborted: no terminating chunk
        server.wait_exit(timeout=10)
        output = server.output()
    assert ending == "incomplete"
    assert 5 <= len(lines) < 500
    assert "returned without completing response" not in output, output
    assert "Traceback" not in output, output
