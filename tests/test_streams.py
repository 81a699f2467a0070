"""GuardedStream: every ending, on asyncio and trio, with the source's finally run once.

The TCP tests (disconnect, stalled consumer, resume) are in test_streams_tcp.py.
"""

from __future__ import annotations

import gc
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from taskguard import (
    ConsumerDisconnected,
    ConsumerStalled,
    GuardedStream,
    ShuttingDownError,
    StreamError,
    StreamInterrupted,
    StreamOutcome,
    TaskGuard,
)

pytestmark = pytest.mark.anyio

#: generous bound for "ends promptly" on a loaded 2-core machine
PROMPT = 0.5


class Source:
    """An async generator source that records what it produced and its finally."""

    def __init__(
        self, n: int = 100, gap: float = 0.0, fail_at: int | None = None, start: int = 0
    ) -> None:
        self.n, self.gap, self.fail_at, self.start = n, gap, fail_at, start
        self.produced = 0
        self.finally_runs = 0
        self.finally_task: int | None = None
        self.finally_awaited = False

    async def gen(self) -> AsyncIterator[int]:
        try:
            for i in range(self.start, self.n):
                if self.gap:
                    await anyio.sleep(self.gap)
                if i == self.fail_at:
                    raise ValueError(f"source failed at {i}")
                self.produced += 1
                yield i
        finally:
            self.finally_runs += 1
            self.finally_task = anyio.get_current_task().id
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0)  # a finally may await (e.g. release a connection)
            self.finally_awaited = True


async def consume_in_block(stream: GuardedStream[Any], delay: float = 0.0) -> None:
    """Iterate inside ``async with stream``, taking ``delay`` per item (a slow send)."""
    async with stream:
        async for _ in stream:
            await anyio.sleep(delay)


async def _noop(item: object) -> None:
    pass


def guard(**kw: Any) -> TaskGuard:
    kw.setdefault("exit_wait_timeout", 5.0)
    kw.setdefault("cancel_grace", 1.0)
    return TaskGuard(**kw)


async def test_completed_by_iteration_and_by_pump() -> None:
    async with guard() as g:
        src = Source(5)
        got = [item async for item in g.stream(src.gen(), name="it")]
        assert got == [0, 1, 2, 3, 4]
        assert src.finally_runs == 1
        src2 = Source(5)
        sent: list[int] = []

        async def send(item: int) -> None:
            sent.append(item)

        result = await g.stream(src2.gen(), name="pump").pump(send)
        assert result.outcome == "completed"
        assert result.outcome is StreamOutcome.COMPLETED
        assert (result.sent, sent, src2.finally_runs) == (5, [0, 1, 2, 3, 4], 1)
        assert g.stats().streams == 0
    assert g.report.streams == {"completed": 2}


async def test_shutdown_ends_100_item_stream_promptly() -> None:
    """The RPC server-stream incident: Ctrl-C must not wait for the stream to finish."""
    src = Source(100, gap=0.05)
    sent: list[int] = []
    ended_at = math.inf
    result = None

    async def send(item: int) -> None:
        sent.append(item)

    async def consume(g: TaskGuard) -> None:
        nonlocal ended_at, result
        result = await g.stream(src.gen(), name="rpc").pump(send)
        ended_at = anyio.current_time()

    async with anyio.create_task_group() as tg, guard() as g:
        tg.start_soon(consume, g)
        await anyio.sleep(0.3)
        assert g.stats().streams == 1
        trigger = anyio.current_time()
        g.shutdown()
    latency = ended_at - trigger
    print(f"\n[streams] shutdown → 100-item stream ended: {latency * 1000:.1f} ms")
    assert latency < PROMPT
    assert result is not None
    assert result.outcome == "interrupted"
    assert 0 < result.sent == len(sent) < 100
    assert src.produced == result.sent  # interrupted while waiting for the next item
    assert (src.finally_runs, src.finally_awaited) == (1, True)
    assert g.report.streams == {"interrupted": 1}


async def test_async_with_block_is_cancelled_on_shutdown_and_exits_quietly() -> None:
    src = Source(100)
    after_block = False
    my_task = 0

    async def consume(g: TaskGuard) -> None:
        nonlocal after_block, my_task
        my_task = anyio.get_current_task().id
        async with g.stream(src.gen()) as stream:
            async for _ in stream:
                await anyio.sleep(10)  # the consumer's own slow send
        after_block = True

    async with anyio.create_task_group() as tg, guard() as g:
        tg.start_soon(consume, g)
        await anyio.sleep(0.1)
        g.shutdown()
    assert after_block
    assert src.finally_runs == 1
    assert src.finally_task == my_task
    assert g.report.streams == {"interrupted": 1}


async def test_break_inside_async_with_closes_source_in_consumer_task() -> None:
    async with guard() as g:
        src = Source(100)
        async with g.stream(src.gen()) as stream:
            async for item in stream:
                if item == 2:
                    break
        assert src.finally_runs == 1
        assert src.finally_task == anyio.get_current_task().id
        assert src.produced == 3
        assert stream.outcome == "stopped"
        assert stream.result.sent == 3
        assert g.stats().streams == 0
    assert g.report.streams == {"stopped": 1}


# trio warns (ResourceWarning) about an async generator collected unexhausted
# and then closes it itself: the warning is the point, use `async with stream`.
@pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
async def test_bare_async_for_left_by_break_is_not_leaked() -> None:
    async with guard() as g:
        src = Source(100)
        async for item in g.stream(src.gen()):
            if item == 1:
                break
        gc.collect()
        # the asyncgen finalizer hook of the event loop closes the source soon
        with anyio.fail_after(2):
            while src.finally_runs == 0:
                await anyio.sleep(0.01)
        assert g.stats().streams == 0
    assert src.finally_runs == 1
    assert g.report.streams == {"stopped": 1}


async def test_max_duration_expires_pump_and_iteration() -> None:
    async with guard() as g:
        src = Source(100, gap=0.05)

        async def send(item: int) -> None:
            pass

        start = anyio.current_time()
        result = await g.stream(src.gen(), max_duration=0.3).pump(send)
        took = anyio.current_time() - start
        assert result.outcome == "expired"
        assert 0.3 <= took < 0.3 + PROMPT
        assert src.finally_runs == 1
        assert src.produced == result.sent

        src2 = Source(100, gap=0.05)
        got = [i async for i in g.stream(src2.gen(), max_duration=0.2)]
        assert 0 < len(got) < 100
        assert src2.finally_runs == 1

        src3 = Source(100)
        stream = g.stream(src3.gen(), max_duration=0.2, raise_on_end=True)
        with pytest.raises(StreamError) as info:
            await consume_in_block(stream, delay=10)
        assert stream.outcome == "expired"
        assert info.value.sent == 0
        assert src3.finally_runs == 1
    assert g.report.streams == {"expired": 3}


async def test_source_raising() -> None:
    async with guard() as g:
        src = Source(10, fail_at=3)

        async def send(item: int) -> None:
            pass

        result = await g.stream(src.gen(), name="bad").pump(send)
        assert result.outcome == "failed"
        assert result.sent == 3
        assert result.error == "ValueError: source failed at 3"
        assert src.finally_runs == 1

        src2 = Source(10, fail_at=3)
        stream = g.stream(src2.gen())
        with pytest.raises(ValueError, match="failed at 3"):
            await consume_in_block(stream)
        assert stream.outcome == "failed"
        assert src2.finally_runs == 1

        src3 = Source(10, fail_at=1)
        with pytest.raises(ValueError, match="failed at 1"):
            await g.stream(src3.gen(), raise_on_end=True).pump(send)
        assert src3.finally_runs == 1
    assert g.report.streams == {"failed": 3}


async def test_disconnected_from_another_task_stops_the_producer_at_once() -> None:
    async with guard() as g:
        src = Source(1000, gap=0.01)
        stream = g.stream(src.gen())
        sent: list[int] = []
        sending_4 = anyio.Event()

        async def send(item: int) -> None:
            sent.append(item)
            if item == 4:
                sending_4.set()
                await anyio.sleep(5)  # cancelled at once by disconnected()

        async def watcher() -> None:  # e.g. the task that sees http.disconnect
            await sending_4.wait()
            stream.disconnected()

        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watcher)
                result = await stream.pump(send)
        assert result.outcome == "disconnected"
        assert result.sent == 4  # item 4 was cut mid-send
        assert src.produced == 5
        assert src.finally_runs == 1


async def test_broken_pipe_from_send_ends_as_disconnected() -> None:
    """The LitServe incident: the send error must stop the producer, not be swallowed."""
    async with guard() as g:
        src = Source(1000)

        async def send(item: int) -> None:
            if item == 3:
                raise BrokenPipeError(32, "Broken pipe")

        result = await g.stream(src.gen()).pump(send)
        assert (result.outcome, result.sent, src.produced, src.finally_runs) == (
            "disconnected",
            3,
            4,
            1,
        )

        src2 = Source(1000)
        with pytest.raises(ConsumerDisconnected) as info:
            await g.stream(src2.gen(), raise_on_end=True).pump(send)
        assert isinstance(info.value.__cause__, BrokenPipeError)
        assert info.value.sent == 3
        assert src2.finally_runs == 1

        src3 = Source(1000)  # the consumer sends itself: the block swallows it
        async with g.stream(src3.gen()) as stream:
            async for item in stream:
                await send(item)
        assert stream.outcome == "disconnected"
        assert stream.result.sent == 3
        assert src3.produced == 4
        assert src3.finally_runs == 1


async def test_stalled_send_times_out() -> None:
    async with guard() as g:
        src = Source(100)
        never = anyio.Event()

        async def send(item: int) -> None:
            if item == 2:
                await never.wait()

        start = anyio.current_time()
        result = await g.stream(src.gen(), send_timeout=0.2).pump(send)
        took = anyio.current_time() - start
        assert result.outcome == "stalled"
        assert result.sent == 2
        assert 0.2 <= took < 0.2 + PROMPT
        assert src.produced == 3
        assert src.finally_runs == 1
        with pytest.raises(ConsumerStalled) as info:
            await g.stream(Source(100).gen(), send_timeout=0.1, raise_on_end=True).pump(send)
        assert isinstance(info.value, TimeoutError)
        assert info.value.sent == 2


async def test_stop_and_raise_on_end_interrupted() -> None:
    src = Source(100, gap=0.02)
    caught: list[StreamInterrupted] = []

    async def consume(g: TaskGuard) -> None:
        try:
            async for _ in g.stream(src.gen(), raise_on_end=True):
                pass
        except StreamInterrupted as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg, guard() as g:
        tg.start_soon(consume, g)
        await anyio.sleep(0.15)
        stopped = g.stream(Source(5).gen())
        stopped.stop()
        assert [i async for i in stopped] == []
        assert stopped.outcome == "stopped"
        g.shutdown()
    assert len(caught) == 1
    assert isinstance(caught[0], ShuttingDownError)
    assert caught[0].sent == src.produced  # interrupted waiting for the next item
    assert src.finally_runs == 1
    assert g.report.streams == {"interrupted": 1, "stopped": 1}


async def test_stream_created_after_the_drain_ends_at_once() -> None:
    late: list[GuardedStream[int]] = []
    sources: list[Source] = []

    async with guard(drain_delay=0.2) as g:

        @g.on_shutdown(stage="after_drain")
        async def open_late() -> None:
            src = Source(10)
            sources.append(src)
            stream = g.stream(src.gen())
            late.append(stream)
            assert [i async for i in stream] == []

        g.shutdown()
        # during drain_delay intake goes on: a stream still works
        src = Source(3)
        assert [i async for i in g.stream(src.gen())] == [0, 1, 2]
    assert late[0].outcome == "interrupted"
    assert sources[0].produced == 0
    # never started, so closing it runs nothing (its body, try/finally included, never began)
    assert sources[0].finally_runs == 0
    assert g.report.streams == {"completed": 1, "interrupted": 1}


async def test_stream_grace_lets_streams_go_on_first() -> None:
    src = Source(100, gap=0.02)
    result = None

    async def consume(g: TaskGuard) -> None:
        nonlocal result

        async def send(item: int) -> None:
            pass

        result = await g.stream(src.gen()).pump(send)

    async with anyio.create_task_group() as tg, guard(stream_grace=0.3) as g:
        tg.start_soon(consume, g)
        await anyio.sleep(0.1)
        before = src.produced
        trigger = anyio.current_time()
        g.shutdown()
    took = g.report.duration
    assert result is not None
    assert result.outcome == "interrupted"
    assert src.produced - before >= 5  # it went on during the grace
    assert 0.3 <= took < 0.3 + PROMPT, trigger


async def test_thousand_streams_end_promptly_on_shutdown() -> None:
    n = 1000
    sources = [Source(10_000, gap=0.05) for _ in range(n)]
    outcomes: list[str] = []
    ended_at = 0.0

    async def consume(g: TaskGuard, src: Source) -> None:
        nonlocal ended_at
        result = await g.stream(src.gen()).pump(_noop)
        outcomes.append(result.outcome.value)
        ended_at = max(ended_at, anyio.current_time())

    async with anyio.create_task_group() as tg, guard() as g:
        for src in sources:
            tg.start_soon(consume, g, src)
        while g.stats().streams < n:
            await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        trigger = anyio.current_time()
        g.shutdown()
    took = ended_at - trigger
    print(f"\n[streams] 1,000 streams ended {took * 1000:.1f} ms after the trigger")
    assert took < 2.0
    assert outcomes == ["interrupted"] * n
    assert all(s.finally_runs == 1 for s in sources)
    assert g.report.streams == {"interrupted": n}


async def test_stream_arguments_are_checked_at_the_call() -> None:
    # Findings 1 and 13.
    async def source() -> AsyncIterator[int]:
        yield 1

    async with TaskGuard() as guard:
        with pytest.raises(TypeError, match="name"):
            guard.stream(source(), name=123)  # type: ignore[call-overload]
        for bad in (True, 1e13):
            with pytest.raises((TypeError, ValueError), match="send_timeout"):
                guard.stream(source(), send_timeout=bad)
