"""taskguard.grpc: unary RPCs under GuardInterceptor, and the guard's integration
methods the interceptor uses (open_task_section).

Real grpc.aio servers and clients on 127.0.0.1, in-process, one event loop for
the module (see tests/test_grpc.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import anyio
import pytest

pytest.importorskip("grpc")
import grpc
import grpc.aio
from rpc_server import decode, encode  # examples/ (on pytest's pythonpath)
from test_grpc import (  # noqa: F401 - the module's fixtures are used by name
    SERVICE,
    _one_event_loop,
    anyio_backend,
    grpc_server,
    unary_method,
)

import taskguard
from taskguard.grpc import GuardInterceptor

pytestmark = pytest.mark.anyio


# -- unary RPCs ---------------------------------------------------------------------


async def test_in_flight_unary_rpc_is_awaited_and_late_ones_refused() -> None:
    done = []

    async def slow(request: Any, context: Any) -> Any:
        await asyncio.sleep(0.5)
        done.append(request)
        return {"ok": request}

    handler = grpc.unary_unary_rpc_method_handler(slow, decode, encode)
    guard = taskguard.TaskGuard(exit_wait_timeout=5)
    async with guard, grpc_server(guard, {"Slow": handler}) as (_server, channel):
        call = asyncio.ensure_future(unary_method(channel, "Slow")(1))
        await asyncio.sleep(0.2)
        guard.shutdown()
        closed = await guard.wait_closed()
        assert done == [1]  # the guard closed only after the RPC's handler returned
        assert await call == {"ok": 1}
        # the guard is closed: the interceptor refuses new RPCs
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary_method(channel, "Slow")(2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert done == [1]
    assert closed.guarded.completed == 1
    assert closed.clean


async def test_unary_rpc_cut_at_the_exit_deadline_gets_unavailable() -> None:
    finally_ran = asyncio.Event()

    async def stuck(request: Any, context: Any) -> Any:
        try:
            await asyncio.sleep(60)
        finally:
            finally_ran.set()

    async def cancel_me(request: Any, context: Any) -> Any:
        await asyncio.sleep(60)

    handlers = {
        "Stuck": grpc.unary_unary_rpc_method_handler(stuck, decode, encode),
        "CancelMe": grpc.unary_unary_rpc_method_handler(cancel_me, decode, encode),
    }
    guard = taskguard.TaskGuard(exit_wait_timeout=0.5, cancel_grace=2)
    async with guard, grpc_server(guard, handlers) as (_server, channel):
        # a client that gives up is a cancellation from outside, not a cut
        with pytest.raises(grpc.aio.AioRpcError) as gave_up:
            await unary_method(channel, "CancelMe")(1, timeout=0.3)
        call = asyncio.ensure_future(unary_method(channel, "Stuck")(1))
        await asyncio.sleep(0.2)
        guard.shutdown()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call, 5)
        await guard.wait_closed()
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server shutting down: /test.Stream/Stuck not completed" in info.value.details()
    assert finally_ran.is_set()
    sections = guard.report.guarded
    assert (sections.cut, sections.cancelled) == (1, 1)
    assert not guard.report.clean


async def test_sync_unary_handler_in_the_thread_pool_is_awaited() -> None:
    from concurrent.futures import ThreadPoolExecutor

    done = []

    def slow(request: Any, context: Any) -> Any:
        time.sleep(0.5)  # a blocking handler, in grpc's migration thread pool
        done.append(request)
        return {"ok": request}

    handler = grpc.unary_unary_rpc_method_handler(slow, decode, encode)
    guard = taskguard.TaskGuard(exit_wait_timeout=5)
    with ThreadPoolExecutor(2) as pool:
        async with guard:
            server = grpc.aio.server(pool, interceptors=[GuardInterceptor(guard)])
            server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(SERVICE, {"Slow": handler})]
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    call = asyncio.ensure_future(unary_method(channel, "Slow")(1))
                    await asyncio.sleep(0.2)
                    guard.shutdown()
                    report = await guard.wait_closed()
                    assert done == [1]  # closed only once the handler had returned
                    assert await call == {"ok": 1}
            finally:
                await server.stop(0)
    assert report.guarded.completed == 1
    assert report.clean


async def test_open_task_section_is_for_asyncio() -> None:
    pytest.importorskip("trio")

    async def main() -> None:
        async with taskguard.TaskGuard() as guard:
            with pytest.raises(RuntimeError, match="cancel scope"):
                guard.open_task_section("x")

    # a thread of its own: this module's event loop runs in this one
    await anyio.to_thread.run_sync(functools.partial(anyio.run, main, backend="trio"))
