"""Argument fuzzing of the integrations' constructors: the ASGI middleware, the gRPC
interceptor, serve(grace=) (see tests/fuzz_support.py)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from fuzz_support import (
    BACKENDS,
    CANCEL_GRACE,
    EXIT_WAIT,
    FUZZ,
    SLACK,
    attempt,
    attempt_async,
    is_seconds,
    values,
)
from helpers_reliability import Hygiene
from hypothesis import given, settings
from hypothesis import strategies as st

from taskguard import (
    TaskGuard,
)

# -- integrations: the ASGI middleware, the gRPC interceptor, serve() ------------------------


async def _streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for chunk in (b"a", b"b"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _one_request(app: Any) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [],
    }
    requested = [False]

    async def receive() -> dict[str, Any]:
        if not requested[0]:
            requested[0] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(
    send_timeout=st.one_of(st.sampled_from([None, 30.0]), values),
    max_duration=st.one_of(st.sampled_from([None, 30.0]), values),
    readiness_path=st.one_of(st.sampled_from([None, "/ready"]), values),
    signals=st.one_of(st.sampled_from(["off", "off", "auto"]), values),
    pass_guard=st.booleans(),
)
def test_asgi_middleware_constructor_fuzz(
    backend: str,
    send_timeout: Any,
    max_duration: Any,
    readiness_path: Any,
    signals: Any,
    pass_guard: bool,
) -> None:
    from taskguard.asgi import TaskGuardMiddleware
    from taskguard.testing import asgi_lifespan

    guard = TaskGuard(exit_wait_timeout=EXIT_WAIT, cancel_grace=CANCEL_GRACE)
    result: list[tuple[int, bytes]] = []

    async def main() -> None:
        accepted, app = attempt(
            TaskGuardMiddleware,
            _streaming_app,
            guard if pass_guard else None,
            send_timeout=send_timeout,
            max_duration=max_duration,
            readiness_path=readiness_path,
            signals=signals,
        )
        if not accepted:
            return
        # what the constructor accepted, it must be able to use
        for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            assert value is None or is_seconds(value), f"accepted {label}={value!r}"
        assert readiness_path is None or isinstance(readiness_path, str), readiness_path
        with anyio.fail_after(EXIT_WAIT + CANCEL_GRACE + SLACK):
            async with asgi_lifespan(app):
                result.append(await _one_request(app))

    with Hygiene() as hygiene:
        anyio.run(main, backend=backend)
    hygiene.check()
    if result:
        [(status, body)] = result
        assert status == 200
        # a tiny max_duration may cut the stream (that is its job), nothing else may
        assert (
            body == b"ab" if max_duration is None or max_duration >= 1 else b"ab".startswith(body)
        )


def test_asgi_middleware_refuses_a_bad_send_timeout_at_construction() -> None:
    from taskguard.asgi import TaskGuardMiddleware

    with pytest.raises((TypeError, ValueError)):
        TaskGuardMiddleware(_streaming_app, send_timeout="30")  # type: ignore[arg-type]


@FUZZ
@given(
    send_timeout=st.one_of(st.sampled_from([None, 5.0]), values),
    max_duration=st.one_of(st.sampled_from([None, 5.0]), values),
    guard_value=st.one_of(st.just(TaskGuard), values),
)
def test_grpc_interceptor_constructor_fuzz(
    send_timeout: Any, max_duration: Any, guard_value: Any
) -> None:
    pytest.importorskip("grpc")
    from taskguard.grpc import GuardInterceptor

    guard = TaskGuard() if guard_value is TaskGuard else guard_value
    with Hygiene() as hygiene:
        accepted, _ = attempt(
            GuardInterceptor, guard, send_timeout=send_timeout, max_duration=max_duration
        )
    hygiene.check()
    if accepted:
        assert isinstance(guard, TaskGuard)
        for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            assert value is None or is_seconds(value), f"accepted {label}={value!r}"


def test_grpc_serve_grace_fuzz() -> None:
    # One event loop for every example (a portal's): grpc.aio keeps per-loop state
    # and does not like a fresh loop per server (the gRPC tests share one too).
    grpc = pytest.importorskip("grpc")
    import anyio.from_thread

    from taskguard.grpc import serve

    async def one(grace: Any) -> bool | None:
        guard = TaskGuard(exit_wait_timeout=EXIT_WAIT, cancel_grace=CANCEL_GRACE)
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        outcome: list[bool] = []
        with anyio.fail_after(EXIT_WAIT + CANCEL_GRACE + SLACK):
            async with guard, anyio.create_task_group() as tg:

                async def run_serve() -> None:
                    accepted, _ = await attempt_async(serve, server, guard, grace)
                    outcome.append(accepted)

                tg.start_soon(run_serve)
                await anyio.sleep(0.05)
                guard.shutdown("fuzz")
        await server.stop(0)
        return outcome[0] if outcome else None

    with anyio.from_thread.start_blocking_portal("asyncio") as portal:

        @settings(FUZZ, max_examples=max(5, FUZZ.max_examples // 4))
        @given(grace=st.one_of(st.sampled_from([None, 0, 0.5]), values))
        def example(grace: Any) -> None:
            with Hygiene() as hygiene:
                accepted = portal.call(one, grace)
            hygiene.check()
            if accepted:
                assert grace is None or is_seconds(grace, zero=True), f"serve(grace={grace!r})"
                assert grace is None or grace <= EXIT_WAIT

        example()
