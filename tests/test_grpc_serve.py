"""taskguard.grpc: serve(), its health service and intake through drain_delay.

Real grpc.aio servers and clients on 127.0.0.1: in-process (one event loop for
the module, as in tests/test_grpc.py), and a real server process that gets a
real SIGTERM while a client keeps starting RPCs.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("grpc_health")
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers_reliability import run_script
from rpc_server import decode, encode  # examples/ (on pytest's pythonpath)
from test_grpc import (  # noqa: F401 - the module's fixtures are used by name
    SERVICE,
    Producer,
    _one_event_loop,
    anyio_backend,
    read_all,
    read_some,
    stream_method,
    unary_method,
)

import taskguard
from taskguard.grpc import GuardHealthServicer, GuardInterceptor, serve

pytestmark = pytest.mark.anyio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def new_server(guard: taskguard.TaskGuard, handlers: dict[str, Any]) -> tuple[Any, int]:
    server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    return server, server.add_insecure_port("127.0.0.1:0")


async def hello(request: Any, context: Any) -> Any:
    return {"hello": request}


HELLO = {"Hello": grpc.unary_unary_rpc_method_handler(hello, decode, encode)}


async def check(channel: grpc.aio.Channel, service: str = "") -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


# -- serve() ---------------------------------------------------------------------------


async def test_serve_stops_intake_drains_and_returns_when_closed() -> None:
    producer = Producer()
    jobs_done: list[int] = []

    async def job(n: int) -> None:
        await asyncio.sleep(0.5)
        jobs_done.append(n)

    async def spawn_job(request: Any, context: Any) -> Any:
        taskguard.spawn(job, request)
        return {"spawned": request}

    guard = taskguard.TaskGuard(exit_wait_timeout=5)
    async with guard:
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
        handlers = {
            "Count": producer.handler(),
            "Spawn": grpc.unary_unary_rpc_method_handler(spawn_job, decode, encode),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        serving = asyncio.ensure_future(serve(server, guard))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            assert await unary_method(channel, "Spawn")(7, wait_for_ready=True) == {"spawned": 7}
            call = stream_method(channel)({"count": 100})
            await read_some(call, 2)
            triggered = time.monotonic()
            guard.shutdown()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(call)
            # intake stopped without holding the stream: the drain ended it at once
            assert time.monotonic() - triggered < 1.0
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in info.value.details()
            await asyncio.wait_for(serving, 5)
            assert guard.state is taskguard.State.CLOSED  # serve returned once closed
            assert jobs_done == [7]
            # intake stopped: a new RPC is refused by the server itself
            with pytest.raises(grpc.aio.AioRpcError):
                await unary_method(channel, "Spawn")(8, timeout=1)
        finally:
            await channel.close()
            serving.cancel()
    hooks = [(h.stage, h.name, h.outcome) for h in guard.report.hooks]
    assert hooks == [("before_drain", "grpc: stop intake", "ok")]


async def test_serve_rejects_a_grace_longer_than_the_exit_wait() -> None:
    async with taskguard.TaskGuard(exit_wait_timeout=3) as guard:
        server = grpc.aio.server()
        with pytest.raises(ValueError, match=r"grace 10s .* exit_wait_timeout 3s"):
            await serve(server, guard, grace=10)
        with pytest.raises(ValueError, match="grace"):
            await serve(server, guard, grace=-1)


async def test_serve_needs_a_running_guard() -> None:
    with pytest.raises(taskguard.NotStartedError):
        await serve(grpc.aio.server(), taskguard.TaskGuard())


async def test_cancelling_serve_stops_the_server() -> None:
    async def hello(request: Any, context: Any) -> Any:
        return {"hello": request}

    async with taskguard.TaskGuard() as guard:
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
        handler = grpc.unary_unary_rpc_method_handler(hello, decode, encode)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Hello": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        serving = asyncio.ensure_future(serve(server, guard))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await unary_method(channel, "Hello")(1, wait_for_ready=True)
            assert reply == {"hello": 1}
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary_method(channel, "Hello")(2, timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_serve_inside_taskguard_run_returns() -> None:
    """Inside run()'s main (a guarded section) serve() must not wait for closed."""
    result: dict[str, Any] = {}

    async def hello(request: Any, context: Any) -> Any:
        return {"hello": request}

    async def main(guard: taskguard.TaskGuard) -> None:
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
        handler = grpc.unary_unary_rpc_method_handler(hello, decode, encode)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Hello": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")

        async def client() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                result["reply"] = await unary_method(channel, "Hello")("x", wait_for_ready=True)
            guard.shutdown()

        task = asyncio.ensure_future(client())
        await serve(server, guard, services=["test.Hello"])
        await task

    # a thread of its own: run() makes its own event loop, and this module's runs here
    report = await anyio.to_thread.run_sync(
        functools.partial(taskguard.run, main, handle_signals=False, exit_wait_timeout=5)
    )
    assert result["reply"] == {"hello": "x"}
    assert report.clean
    assert [h.name for h in report.hooks] == ["grpc: stop intake"]


# -- the health service ----------------------------------------------------------------


async def test_health_is_serving_then_not_serving_from_the_trigger_through_drain_delay() -> None:
    # grpc's grace (the exit wait left at intake stop, ~29 s) would let an open
    # watch hold server.stop() far longer than the 10 s serve() is given below
    guard = taskguard.TaskGuard(exit_wait_timeout=30, drain_delay=1.0)
    async with guard:
        server, port = new_server(guard, HELLO)
        serving = asyncio.ensure_future(serve(server, guard, services=[SERVICE]))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            await channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(channel)
            assert await check(channel) == SERVING
            assert await check(channel, SERVICE) == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await check(channel, "no.Such")
            listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
            assert {k: v.status for k, v in listed.statuses.items()} == {
                "": SERVING,
                SERVICE: SERVING,
            }
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            watch_unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.Such"))
            assert (await watch.read()).status == SERVING
            assert (await watch_unknown.read()).status == SERVICE_UNKNOWN
            assert await unary_method(channel, "Hello")(1) == {"hello": 1}

            guard.shutdown()
            assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
            assert await check(channel) == NOT_SERVING
            assert await check(channel, SERVICE) == NOT_SERVING
            # still serving RPCs during drain_delay
            assert await unary_method(channel, "Hello")(2) == {"hello": 2}
            assert guard.state is taskguard.State.DRAINING
            # once intake stops the watches end, so they never hold server.stop()
            for call in (watch, watch_unknown):
                assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.UNAVAILABLE
            await asyncio.wait_for(serving, 10)
        finally:
            await channel.close()
            serving.cancel()
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    report = guard.report
    assert report.clean
    assert report.guarded.completed == 2  # the two Hello RPCs; health RPCs are not work
    assert report.streams == {}


async def test_serve_with_health_off_registers_none() -> None:
    async with taskguard.TaskGuard() as guard:
        server, port = new_server(guard, HELLO)
        with pytest.raises(ValueError, match="health=True"):
            await serve(server, guard, health=False, services=[SERVICE])
        serving = asyncio.ensure_future(serve(server, guard, health=False))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await channel.channel_ready()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await check(channel)
        finally:
            guard.shutdown()
            await asyncio.wait_for(serving, 5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_servicer_validates_its_arguments() -> None:
    guard = taskguard.TaskGuard()
    with pytest.raises(TypeError, match="TaskGuard"):
        GuardHealthServicer(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"write \['pkg.Jobs'\]"):
        GuardHealthServicer(guard, "pkg.Jobs")
    with pytest.raises(ValueError, match="full name"):
        GuardHealthServicer(guard, ["/pkg.Jobs/Submit"])
    assert GuardHealthServicer(guard, ["pkg.A", "pkg.A"]).services == ("", "pkg.A")


# -- intake through drain_delay, in a real process ------------------------------------

SERVER_SCRIPT = """
import sys
import grpc, grpc.aio
import taskguard
from taskguard.grpc import GuardInterceptor, serve


async def hello(request, context):
    return request


async def main(guard):
    server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
    handler = grpc.unary_unary_rpc_method_handler(hello)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Hello", {"Hello": handler})]
    )
    print("PORT", server.add_insecure_port("127.0.0.1:0"), flush=True)
    await serve(server, guard, services=["test.Hello"])


report = taskguard.run(main, drain_delay=float(sys.argv[1]), exit_wait_timeout=10)
print("REPORT", report.model_dump_json(), flush=True)
sys.exit(0 if report.clean else 1)
"""


async def test_rpcs_are_served_through_drain_delay_then_refused(tmp_path: Path) -> None:
    """SIGTERM to a real server: new RPCs every 100 ms succeed for the whole drain_delay
    (health says NOT_SERVING meanwhile); after it, new RPCs are refused."""
    delay, margin = 2.5, 0.5  # the margin absorbs scheduling on a busy machine
    with run_script(tmp_path, SERVER_SCRIPT, str(delay)) as proc:
        port = int(proc.wait_line("PORT ").split()[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            hello = channel.unary_unary("/test.Hello/Hello")
            assert await hello(b"x", wait_for_ready=True, timeout=10) == b"x"
            assert await check(channel, "test.Hello") == SERVING
            signalled = time.monotonic()
            proc.signal(signal.SIGTERM)
            calls: list[tuple[float, str]] = []  # (started, after the signal; outcome)
            checks: list[tuple[float, int]] = []
            while time.monotonic() - signalled < delay + 5:
                started = time.monotonic() - signalled
                try:
                    await hello(b"x", timeout=2)
                    calls.append((started, "OK"))
                except grpc.aio.AioRpcError as exc:
                    calls.append((started, exc.code().name))
                    if sum(outcome != "OK" for _, outcome in calls) >= 3:
                        break
                try:
                    checks.append((started, await check(channel, "test.Hello")))
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        assert proc.wait(15) == 0, proc.stderr()
        report = proc.report()
    within = [outcome for started, outcome in calls if started < delay - margin]
    assert within == ["OK"] * len(within), calls
    assert len(within) >= 5, calls  # about 20 at 100 ms; a busy machine makes fewer
    during = [status for started, status in checks if margin <= started < delay - margin]
    assert during, checks
    assert set(during) == {NOT_SERVING}, checks
    first_failure = next(i for i, (_, outcome) in enumerate(calls) if outcome != "OK")
    assert calls[first_failure][1] == "UNAVAILABLE", calls
    assert all(outcome != "OK" for _, outcome in calls[first_failure:]), calls
    assert report["clean"]
    assert "drain_delay" in report["phases"]
    assert [h["name"] for h in report["hooks"]] == ["grpc: stop intake"]
