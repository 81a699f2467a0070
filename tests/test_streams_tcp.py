"""GuardedStream over real TCP connections on 127.0.0.1, on asyncio and trio.

Shutdown mid-stream, a client that disconnects, a client that stops reading,
and a client that resumes from the server's resume point on reconnect.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from test_streams import PROMPT, Source, guard

from taskguard import StreamResult, TaskGuard

pytestmark = pytest.mark.anyio

Handler = Callable[[SocketStream], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    """A TCP server on a free port of 127.0.0.1 running ``handler`` per connection."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def read_lines(reader: BufferedByteReceiveStream, limit: float = math.inf) -> list[bytes]:
    """Read lines until EOF (or a reset), at most ``limit`` of them."""
    lines: list[bytes] = []
    try:
        while len(lines) < limit:
            lines.append(await reader.receive_until(b"\n", 1 << 20))
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
        pass
    return lines


async def test_tcp_shutdown_mid_stream() -> None:
    """A 100-item stream (50 ms apart) over TCP ends at once on shutdown."""
    src = Source(100, gap=0.05)
    results: list[StreamResult] = []
    ended_at: list[float] = []
    with anyio.fail_after(10):
        async with guard() as g:

            async def handler(conn: SocketStream) -> None:
                async with conn:
                    result = await g.stream(src.gen()).pump(lambda i: conn.send(b"%d\n" % i))
                    results.append(result)
                    ended_at.append(anyio.current_time())

            async with serve(handler) as port, await anyio.connect_tcp("127.0.0.1", port) as c:
                reader = BufferedByteReceiveStream(c)
                first = await read_lines(reader, 5)
                trigger = anyio.current_time()
                g.shutdown()
                rest = await read_lines(reader)
                eof_at = anyio.current_time()
    latency = ended_at[0] - trigger
    print(
        f"\n[streams/tcp] shutdown → stream ended {latency * 1000:.1f} ms, "
        f"client saw EOF {(eof_at - trigger) * 1000:.1f} ms after the trigger"
    )
    assert latency < PROMPT
    assert eof_at - trigger < PROMPT
    (result,) = results
    assert result.outcome == "interrupted"
    assert len(first) + len(rest) == result.sent < 100  # the resume point is exact
    assert src.produced == result.sent
    assert src.finally_runs == 1
    assert g.report.streams == {"interrupted": 1}


async def disconnect_round() -> int:
    """One client reads 3 items and closes; return the writes that succeeded after."""
    src = Source(1000, gap=0.02)
    results: list[StreamResult] = []
    client_closed = anyio.Event()
    done = anyio.Event()
    writes_after_close = 0
    with anyio.fail_after(10):
        async with guard() as g:

            async def handler(conn: SocketStream) -> None:
                async def send(item: int) -> None:
                    nonlocal writes_after_close
                    closed = client_closed.is_set()
                    await conn.send(b"%d\n" % item)
                    writes_after_close += closed

                async with conn:
                    results.append(await g.stream(src.gen()).pump(send))
                done.set()

            async with serve(handler) as port:
                client = await anyio.connect_tcp("127.0.0.1", port)
                got = await read_lines(BufferedByteReceiveStream(client), 3)
                await client.aclose()
                client_closed.set()
                await done.wait()
    assert got == [b"0", b"1", b"2"]
    (result,) = results
    assert result.outcome == "disconnected"
    assert src.produced == result.sent + 1  # nothing generated after the failed send
    assert src.finally_runs == 1
    assert writes_after_close <= 5  # "within a few items"
    assert g.report.streams == {"disconnected": 1}
    return writes_after_close


async def test_tcp_consumer_disconnect_stops_the_producer() -> None:
    """The client closes after 3 items: the producer stops within a few items."""
    # a few rounds, to measure how many writes still succeed after the close
    after_close = [await disconnect_round() for _ in range(5)]
    print(f"\n[streams/tcp] writes that succeeded after the peer closed: {after_close}")


async def test_tcp_stalled_consumer_is_cut_after_send_timeout() -> None:
    """The client stops reading: sends block once the buffers fill; cut at send_timeout."""
    send_timeout = 0.3
    chunk = b"x" * 65535 + b"\n"
    src = Source(100_000)
    results: list[StreamResult] = []
    send_started: list[float] = []
    ended_at: list[float] = []
    done = anyio.Event()
    with anyio.fail_after(20):
        async with guard() as g:

            async def handler(conn: SocketStream) -> None:
                async def send(item: int) -> None:
                    send_started.append(anyio.current_time())
                    await conn.send(chunk)

                async with conn:
                    stream = g.stream(src.gen(), send_timeout=send_timeout)
                    results.append(await stream.pump(send))
                    ended_at.append(anyio.current_time())
                done.set()  # the connection is closed

            async with serve(handler) as port, await anyio.connect_tcp("127.0.0.1", port) as c:
                await done.wait()
                # the server closed the connection: the client reads what was
                # buffered, then sees the end (or a reset)
                received = 0
                try:
                    while True:
                        received += len(await c.receive(1 << 20))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
    (result,) = results
    cut_after = ended_at[0] - send_started[-1]
    print(
        f"\n[streams/tcp] stalled: {result.sent} x 64 KiB sent before the buffers filled, "
        f"cut {cut_after * 1000:.0f} ms into the blocked send; client then read "
        f"{received / 1e6:.1f} MB and EOF"
    )
    assert result.outcome == "stalled"
    assert result.sent > 0
    assert len(send_started) == result.sent + 1
    assert send_timeout <= cut_after < send_timeout + PROMPT
    assert src.produced == result.sent + 1
    assert src.finally_runs == 1
    assert received <= len(chunk) * (result.sent + 1)
    assert g.report.streams == {"stalled": 1}


async def test_tcp_resume_after_shutdown() -> None:
    """A client reads N items, the server shuts down, a new server resumes from N."""

    async def run_server(g: TaskGuard, results: list[StreamResult]) -> Handler:
        async def handler(conn: SocketStream) -> None:
            async with conn, g.guarded("request"):
                reader = BufferedByteReceiveStream(conn)
                start = int((await reader.receive_until(b"\n", 64)).split()[1])
                src = Source(100, gap=0.02, start=start)
                result = await g.stream(src.gen()).pump(lambda i: conn.send(b"%d\n" % i))
                results.append(result)
                if result.outcome == "interrupted":
                    # a final message with the resume point, like an SSE event
                    await conn.send(b"resume %d\n" % (start + result.sent))

        return handler

    received: list[int] = []
    resume_at = -1
    first: list[StreamResult] = []
    with anyio.fail_after(10):
        async with (
            guard() as g,
            serve(await run_server(g, first)) as port,
            await anyio.connect_tcp("127.0.0.1", port) as client,
        ):
            await client.send(b"from 0\n")
            reader = BufferedByteReceiveStream(client)
            received += [int(x) for x in await read_lines(reader, 7)]
            g.shutdown()
            for line in await read_lines(reader):
                if line.startswith(b"resume "):
                    resume_at = int(line.split()[1])
                else:
                    received.append(int(line))
        assert first[0].outcome == "interrupted"
        assert resume_at == len(received) == first[0].sent

        second: list[StreamResult] = []
        async with (
            guard() as g2,
            serve(await run_server(g2, second)) as port,
            await anyio.connect_tcp("127.0.0.1", port) as client,
        ):
            await client.send(b"from %d\n" % resume_at)
            lines = await read_lines(BufferedByteReceiveStream(client))
            received += [int(x) for x in lines]
    assert received == list(range(100))
    assert second[0].outcome == "completed"
    assert second[0].sent == 100 - resume_at


def test_example_stream_resume_runs() -> None:
    """examples/stream_resume.py finishes by itself and shows an exact resume."""
    example = Path(__file__).parent.parent / "examples" / "stream_resume.py"
    # subprocess.run kills the child if the timeout expires
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "server says resume from 30" in done.stdout
    assert "received all 100 items exactly once" in done.stdout
