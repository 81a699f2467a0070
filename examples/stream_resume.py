"""A stream that survives a server restart: the client resumes where it stopped.

A line-based TCP server on 127.0.0.1 streams items 0..99, 20 ms apart, with
``guard.stream(...).pump(send)``. Midway the server shuts down (as on SIGTERM):
the stream ends at once, the server sends a final ``resume N`` line (the
resume point: ``result.sent``) and closes. The client reconnects to a new
server with ``from N`` and receives the rest: every item exactly once.

Run it (after the README's set-up; it finishes in about 3 s):

    .venv/bin/python examples/stream_resume.py
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

import taskguard

TOTAL = 100


async def items(start: int) -> AsyncIterator[int]:
    """The source: an async generator whose finally shows it was closed."""
    try:
        for i in range(start, TOTAL):
            await anyio.sleep(0.02)
            yield i
    finally:
        print(f"  [server] source closed (started at {start})")


async def run_server(
    guard: taskguard.TaskGuard, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve until the guard shuts down; report the port through task_status."""

    async def handle(conn: SocketStream) -> None:
        async with conn, guard.guarded("request"):  # shutdown waits for the request
            request = await BufferedByteReceiveStream(conn).receive_until(b"\n", 64)
            start = int(request.split()[1])

            async def send(item: int) -> None:
                await conn.send(b"%d\n" % item)

            result = await guard.stream(items(start), name="items", send_timeout=5).pump(send)
            print(f"  [server] stream ended: {result.outcome}, {result.sent} items sent")
            if result.outcome == "interrupted":
                # the final message carries the resume point (like an SSE event)
                await conn.send(b"resume %d\n" % (start + result.sent))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        task_status.started(listener.extra(SocketAttribute.local_port))
        await guard.wait_closed()
        tg.cancel_scope.cancel()


async def watch(port: int, start: int, midway: anyio.Event | None = None) -> tuple[list[int], int]:
    """Client: read items from ``start``; return them and the server's resume point.

    Sets ``midway`` after 30 items (the test harness then stops the server).
    """
    got: list[int] = []
    resume = -1
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(b"from %d\n" % start)
        reader = BufferedByteReceiveStream(conn)
        try:
            while True:
                line = await reader.receive_until(b"\n", 64)
                if line.startswith(b"resume "):
                    resume = int(line.split()[1])
                else:
                    got.append(int(line))
                    if midway is not None and len(got) == 30:
                        midway.set()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass
    return got, resume


async def main() -> None:
    received: list[int] = []
    midway = anyio.Event()

    print("server 1 starts; the client watches from 0")
    async with taskguard.TaskGuard(exit_wait_timeout=5) as guard, anyio.create_task_group() as tg:
        port = await tg.start(run_server, guard)
        result: list[tuple[list[int], int]] = []

        async def client() -> None:
            result.append(await watch(port, 0, midway))

        tg.start_soon(client)
        await midway.wait()
        started = anyio.current_time()
        guard.shutdown("SIGTERM (simulated)")
        await guard.wait_closed()
        print(f"server 1 closed {(anyio.current_time() - started) * 1000:.0f} ms after the trigger")
    got, resume = result[0]
    received += got
    print(f"client: got items {got[0]}..{got[-1]}, server says resume from {resume}")
    print(guard.report.summary())

    print(f"\nserver 2 starts; the client resumes from {resume}")
    async with taskguard.TaskGuard(exit_wait_timeout=5) as guard2, anyio.create_task_group() as tg:
        port = await tg.start(run_server, guard2)
        got, _ = await watch(port, resume)
        guard2.shutdown("done")
    received += got
    print(f"client: got items {got[0]}..{got[-1]}")

    assert received == list(range(TOTAL)), "every item exactly once"
    print(f"\nOK: the client received all {TOTAL} items exactly once across the restart")


if __name__ == "__main__":
    anyio.run(main)
