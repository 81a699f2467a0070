"""GuardedStream as integrations and generators use it: send(), disconnected(),
aclosing() inside an async generator, stats, and argument checks.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from test_streams import Source, _noop, guard

from taskguard import ConsumerStalled, GuardedStream, NotStartedError, TaskGuard

pytestmark = pytest.mark.anyio


async def test_inside_an_async_generator_with_aclosing() -> None:
    """A response body generator (e.g. StreamingResponse) wrapping a guarded stream."""
    src = Source(100, gap=0.01)
    streams: list[GuardedStream[int]] = []

    async def body(g: TaskGuard) -> AsyncGenerator[bytes, None]:
        async with aclosing(g.stream(src.gen())) as stream:
            streams.append(stream)
            async for item in stream:
                yield b"%d" % item

    async with guard() as g:
        chunks = body(g)
        got = [await chunks.__anext__() for _ in range(3)]
        await chunks.aclose()  # the server closes the body when the client is gone
        assert got == [b"0", b"1", b"2"]
        assert streams[0].outcome == "stopped"
        assert src.finally_runs == 1
        assert src.finally_task == anyio.get_current_task().id

        src2 = Source(100, gap=0.01)
        src = src2
        chunks = body(g)
        async with aclosing(chunks):
            got = [await chunks.__anext__()]
            g.shutdown()
            got += [chunk async for chunk in chunks]  # ends quietly at shutdown
        assert streams[1].outcome == "interrupted"
        assert len(got) == src2.produced
        assert src2.finally_runs == 1
    assert g.report.streams == {"stopped": 1, "interrupted": 1}


async def test_send_api_for_integrations() -> None:
    """Integrations without a source: send() per message inside `async with stream`."""
    async with guard() as g:
        out: list[str] = []

        async def raw_send(msg: str) -> None:
            out.append(msg)

        stream: GuardedStream[str]

        async with GuardedStream(g, None, name="asgi", send_timeout=0.2) as stream:
            for i in range(3):
                await stream.send(raw_send, f"m{i}")
        assert stream.outcome == "stopped"
        assert stream.result.sent == 3
        with pytest.raises(TypeError, match="no source"):
            await GuardedStream(g, None).__anext__()

        # a disconnect reported by another task cancels the whole block
        after = False
        async with GuardedStream(g, None) as stream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _later(0.05, stream.disconnected))
                await stream.send(raw_send, "x")
                await anyio.sleep(5)  # the app waiting for its next event
            after = True
        assert not after
        assert stream.outcome == "disconnected"
        assert stream.result.sent == 1

        # a stalled send raises ConsumerStalled, swallowed by the block
        never = anyio.Event()

        async def stuck(msg: str) -> None:
            await never.wait()

        async with GuardedStream(g, None, send_timeout=0.1) as stream:
            await stream.send(stuck, "x")
        assert stream.outcome == "stalled"
        with pytest.raises(ConsumerStalled):
            await stream.send(raw_send, "y")  # ended: no further send
        assert out == ["m0", "m1", "m2", "x"]

        # outside a block, send() raises for the caller to stop
        bare: GuardedStream[str] = GuardedStream(g, None, send_timeout=0.1)
        with pytest.raises(ConsumerStalled):
            await bare.send(stuck, "z")
        assert bare.outcome == "stalled"
        assert g.stats().streams == 0
    assert g.report.streams == {"stopped": 1, "disconnected": 1, "stalled": 2}


async def _later(delay: float, fn: Any) -> None:
    await anyio.sleep(delay)
    fn()


async def test_stats_count_open_streams() -> None:
    async with guard() as g:
        streams = [g.stream(Source(10).gen()) for _ in range(3)]
        assert g.stats().streams == 0  # tracked once used
        for s in streams:
            await s.__aenter__()
        assert g.stats().streams == 3
        await streams[2].__aexit__(None, None, None)
        assert g.stats().streams == 2
        for s in reversed(streams[:2]):
            await s.__aexit__(None, None, None)
        assert g.stats().streams == 0


async def test_validation() -> None:
    idle = TaskGuard()
    with pytest.raises(NotStartedError):
        idle.stream(Source().gen())
    async with guard() as g:
        not_async: Any = [1, 2, 3]
        with pytest.raises(TypeError, match="async iterable"):
            g.stream(not_async)
        bad_values: list[Any] = [0, -1, math.inf, math.nan, 1e13]
        for bad in bad_values:
            with pytest.raises(ValueError, match="send_timeout"):
                g.stream(Source().gen(), send_timeout=bad)
        wrong_types: list[Any] = [True, "1", None.__class__]
        for bad in wrong_types:
            with pytest.raises(TypeError, match="send_timeout"):
                g.stream(Source().gen(), send_timeout=bad)
        with pytest.raises(ValueError, match="max_duration"):
            g.stream(Source().gen(), max_duration=0)
        stream = g.stream(Source(3).gen())
        with pytest.raises(RuntimeError, match="not ended"):
            stream.result  # noqa: B018
        async with stream:
            with pytest.raises(RuntimeError, match="outside"):
                await stream.pump(_noop)
        assert "sent=0" in repr(stream)


async def test_an_integration_can_say_the_consumer_stalled() -> None:
    # For integrations that watch for a stalled consumer themselves (gRPC).
    async with TaskGuard() as g:
        stream = g.stream(None, name="s")
        async with stream:
            stream.stalled()
            await anyio.sleep(1)  # cancelled: the block exits quietly
            raise AssertionError("not reached")
    assert stream.outcome == "stalled"
    assert g.report.streams == {"stalled": 1}
