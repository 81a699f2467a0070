"""taskguard.grpc: GuardInterceptor's streams, on real grpc.aio servers and clients.

These run a grpc.aio server and a real channel on 127.0.0.1 in-process (grpc.aio
is asyncio-only). Unary RPCs: tests/test_grpc_unary.py; serve(), the health
service and a real server process under SIGTERM: tests/test_grpc_serve.py; the
example server with real signals: tests/test_demo.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("grpc")
import grpc
import grpc.aio
from rpc_server import decode, encode  # examples/ (on pytest's pythonpath)

import taskguard
from taskguard.grpc import OUTCOME_KEY, RESUME_KEY, GuardInterceptor

pytestmark = pytest.mark.anyio
SERVICE = "test.Stream"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # grpc.aio runs on asyncio only


@pytest.fixture(scope="module", autouse=True)
async def _one_event_loop() -> AsyncIterator[None]:
    # An async fixture of module scope keeps anyio's test runner, and so one
    # event loop, for every test here. grpc.aio binds its completion queue to
    # each loop that uses it; a late event of a call made on an earlier test's
    # loop, already closed, reached a later test's loop and failed it with
    # "Event loop is closed" (seen once in CI). One loop per process is how
    # grpc.aio is meant to be used.
    yield  # noqa: PT022 - the open generator is what holds the runner


# -- in-process helpers ------------------------------------------------------------


@asynccontextmanager
async def grpc_server(
    guard: taskguard.TaskGuard, handlers: dict[str, Any], **options: Any
) -> AsyncIterator[tuple[grpc.aio.Server, grpc.aio.Channel]]:
    server = grpc.aio.server(interceptors=[GuardInterceptor(guard, **options)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(0)


def stream_method(channel: grpc.aio.Channel, name: str = "Count") -> Any:
    return channel.unary_stream(
        f"/{SERVICE}/{name}", request_serializer=encode, response_deserializer=decode
    )


def unary_method(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}", request_serializer=encode, response_deserializer=decode
    )


class Producer:
    """An async-generator handler that records how far it got and whether it was closed."""

    def __init__(self, interval: float = 0.05, size: int = 0) -> None:
        self.interval = interval
        self.size = size
        self.produced = 0
        self.closed = asyncio.Event()
        self.finally_runs = 0

    async def produce(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            for i in range(int(request["count"])):
                await asyncio.sleep(self.interval)
                self.produced += 1
                yield {"seq": i, "pad": "x" * self.size}
        finally:
            self.finally_runs += 1
            self.closed.set()

    def handler(self) -> Any:
        return grpc.unary_stream_rpc_method_handler(self.produce, decode, encode)


async def read_some(call: Any, n: int) -> list[int]:
    seqs = []
    async for message in call:
        seqs.append(message["seq"])
        if len(seqs) == n:
            break
    return seqs


async def read_all(call: Any, into: list[int] | None = None) -> list[int]:
    seqs = [] if into is None else into
    async for message in call:
        seqs.append(message["seq"])
    return seqs


# -- streams -------------------------------------------------------------------------


async def test_shutdown_ends_stream_with_unavailable_and_resume_point() -> None:
    producer = Producer()
    guard = taskguard.TaskGuard(exit_wait_timeout=5)
    async with guard, grpc_server(guard, {"Count": producer.handler()}) as (_server, channel):
        call = stream_method(channel)({"count": 100})
        seqs = await read_some(call, 5)
        triggered = time.monotonic()
        guard.shutdown()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all(call, seqs)
        ended = time.monotonic() - triggered
        await guard.wait_closed()
    err = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.details()
    trailing = dict(err.trailing_metadata())
    assert int(trailing[RESUME_KEY]) == len(seqs)
    assert seqs == list(range(len(seqs)))
    assert trailing[OUTCOME_KEY] == "interrupted"
    assert ended < 1.0
    assert producer.finally_runs == 1
    assert guard.report.streams == {"interrupted": 1}
    assert guard.report.clean


async def test_bidi_stream_is_interrupted_too() -> None:
    async def echo(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield {"seq": request["seq"]}

    handler = grpc.stream_stream_rpc_method_handler(echo, decode, encode)
    guard = taskguard.TaskGuard(exit_wait_timeout=5)
    async with guard, grpc_server(guard, {"Echo": handler}) as (_server, channel):
        method = channel.stream_stream(
            f"/{SERVICE}/Echo", request_serializer=encode, response_deserializer=decode
        )
        call = method()
        for i in range(3):
            await call.write({"seq": i})
            assert (await call.read())["seq"] == i
        guard.shutdown()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 2)
        await guard.wait_closed()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(info.value.trailing_metadata())[RESUME_KEY] == "3"


@pytest.mark.parametrize("options", [{}, {"max_duration": 30, "send_timeout": 30}])
async def test_client_cancel_stops_the_producer(options: dict[str, float]) -> None:
    producer = Producer(interval=0.02)
    guard = taskguard.TaskGuard()
    async with (
        guard,
        grpc_server(guard, {"Count": producer.handler()}, **options) as (_server, channel),
    ):
        call = stream_method(channel)({"count": 1000})
        await read_some(call, 3)
        call.cancel()
        await asyncio.wait_for(producer.closed.wait(), 2)
        produced = producer.produced
        await asyncio.sleep(0.3)
        assert producer.produced == produced  # nothing produced after it was closed
        assert produced < 20
    assert producer.finally_runs == 1
    assert guard.report.streams == {"disconnected": 1}


async def test_client_deadline_stops_the_producer() -> None:
    producer = Producer(interval=0.05)
    guard = taskguard.TaskGuard()
    async with guard, grpc_server(guard, {"Count": producer.handler()}) as (_server, channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all(stream_method(channel)({"count": 1000}, timeout=0.4))
        await asyncio.wait_for(producer.closed.wait(), 2)
        assert producer.produced < 15
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert producer.finally_runs == 1


async def test_stalled_client_is_cut_after_send_timeout() -> None:
    producer = Producer(interval=0, size=1 << 20)  # 1 MiB messages fill the windows fast
    guard = taskguard.TaskGuard()
    async with (
        guard,
        grpc_server(guard, {"Count": producer.handler()}, send_timeout=0.5) as (_server, channel),
    ):
        method = channel.unary_stream(
            f"/{SERVICE}/Count", request_serializer=encode, response_deserializer=decode
        )
        call = method({"count": 10_000})
        await read_some(call, 1)  # then stop reading
        await asyncio.wait_for(producer.closed.wait(), 10)
        assert producer.produced < 1000
        call.cancel()
    assert guard.report.streams == {"stalled": 1}


async def test_slow_producer_is_not_a_stalled_client() -> None:
    """send_timeout times the writes only: a source slower than it is not a stall."""
    producer = Producer(interval=0.3)
    guard = taskguard.TaskGuard()
    async with (
        guard,
        grpc_server(guard, {"Count": producer.handler()}, send_timeout=0.1) as (_server, channel),
    ):
        call = stream_method(channel)({"count": 4})
        assert await read_all(call) == [0, 1, 2, 3]
        assert await call.code() == grpc.StatusCode.OK
    assert guard.report.streams == {"completed": 1}


async def test_max_duration_ends_the_stream_with_a_resume_point() -> None:
    producer = Producer(interval=0.02)
    guard = taskguard.TaskGuard()
    async with (
        guard,
        grpc_server(guard, {"Count": producer.handler()}, max_duration=0.3) as (_, channel),
    ):
        seqs: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all(stream_method(channel)({"count": 10_000}), seqs)
        await asyncio.wait_for(producer.closed.wait(), 2)
    err = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "maximum duration of 0.3s" in err.details()
    trailing = dict(err.trailing_metadata())
    assert trailing[OUTCOME_KEY] == "expired"
    assert int(trailing[RESUME_KEY]) == len(seqs) > 0
    assert seqs == list(range(len(seqs)))
    assert producer.finally_runs == 1
    assert guard.report.streams == {"expired": 1}


async def test_a_handler_built_per_call_is_used_per_call() -> None:
    """The interceptor keeps its wrapper per method only while grpc hands it the same handler."""

    class PerCall(grpc.GenericRpcHandler):  # type: ignore[misc]
        calls = 0

        def service(self, details: Any) -> Any:
            PerCall.calls += 1
            n = PerCall.calls

            async def answer(request: Any, context: Any) -> Any:
                return {"call": n}

            return grpc.unary_unary_rpc_method_handler(answer, decode, encode)

    guard = taskguard.TaskGuard()
    async with guard:
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
        server.add_generic_rpc_handlers([PerCall()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                replies = [await unary_method(channel, "Any")(None) for _ in range(3)]
        finally:
            await server.stop(0)
    assert replies == [{"call": 1}, {"call": 2}, {"call": 3}]
    assert guard.report.guarded.completed == 3


async def test_abort_and_errors_inside_a_stream_pass_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def not_found(request: Any, context: Any) -> AsyncIterator[Any]:
        yield {"seq": 0}
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    async def broken(request: Any, context: Any) -> AsyncIterator[Any]:
        yield {"seq": 0}
        raise ValueError("boom")

    handlers = {
        "NotFound": grpc.unary_stream_rpc_method_handler(not_found, decode, encode),
        "Broken": grpc.unary_stream_rpc_method_handler(broken, decode, encode),
    }
    guard = taskguard.TaskGuard()
    async with guard, grpc_server(guard, handlers) as (_server, channel):
        with caplog.at_level(logging.ERROR, logger="taskguard"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(stream_method(channel, "NotFound")({}))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.value.details() == "no such thing"
            assert not [r for r in caplog.records if "NotFound" in r.getMessage()]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(stream_method(channel, "Broken")({}))
            assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert guard.report.streams == {"completed": 1, "failed": 1}


async def test_write_based_stream_is_awaited_not_ended() -> None:
    """A handler that sends with context.write() cannot be ended: the drain awaits it."""

    async def writer(request: Any, context: Any) -> None:
        for i in range(5):
            await asyncio.sleep(0.1)
            await context.write({"seq": i})

    handler = grpc.unary_stream_rpc_method_handler(writer, decode, encode)
    guard = taskguard.TaskGuard(exit_wait_timeout=5)
    async with guard, grpc_server(guard, {"Write": handler}) as (_server, channel):
        call = stream_method(channel, "Write")({})
        seqs = await read_some(call, 1)
        guard.shutdown()
        await read_all(call, seqs)
        assert await call.code() == grpc.StatusCode.OK
        report = await guard.wait_closed()
    assert seqs == [0, 1, 2, 3, 4]
    assert report.guarded.completed == 1
    assert report.streams == {}


# -- arguments --------------------------------------------------------------------------


async def test_interceptor_validates_its_arguments() -> None:
    with pytest.raises(TypeError):
        GuardInterceptor(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="send_timeout"):
        GuardInterceptor(taskguard.TaskGuard(), send_timeout=0)
