"""Helpers for testing code that uses taskguard: plain functions, usable with any
test runner (pytest is not needed to import this module).

The pytest fixtures (``taskguard_guard``, ``taskguard_config``) and the
``taskguard_unclean_ok`` marker come from the plugin that pytest loads by
itself once taskguard is installed (``taskguard._pytest_plugin``, entry point
``pytest11``).

Helpers:

* :func:`shutdown_and_wait` — request shutdown, wait, return the report;
* :func:`simulate_signal` — deliver an exit signal to a guard as its signal
  handler would (the first starts shutdown, the second forces it), without
  sending a real signal to the test process;
* :func:`asgi_lifespan` — run an ASGI app's lifespan around a block (for
  ``httpx.ASGITransport``, which does not), e.g. an app wrapped in
  ``TaskGuardMiddleware``.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ._guard import TaskGuard
from ._report import ShutdownReport, State

__all__ = ["asgi_lifespan", "shutdown_and_wait", "simulate_signal"]


async def shutdown_and_wait(
    guard: TaskGuard, reason: str = "test", *, force: bool = False
) -> ShutdownReport:
    """Request shutdown of ``guard`` and return its report once it is closed."""
    guard.shutdown(reason, force=force)
    return await guard.wait_closed()


async def simulate_signal(guard: TaskGuard, signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to ``guard`` as an exit-signal handler would, and wait
    until the guard has reacted (the first signal starts the drain, the second
    forces it). Never call it a third time: a third exit signal ends the process."""
    seen = guard.signals_seen
    if seen >= 2:
        raise RuntimeError(
            "a third exit signal would end the test process (os._exit); not simulated"
        )
    guard.handle_signal(signum)  # schedules the reaction onto the loop
    with anyio.fail_after(5):
        if seen == 0:
            await guard.wait_for_shutdown()
            return
        # The forced drain is a flag, not an event: give the loop a few turns.
        while not guard.forced and guard.state is not State.CLOSED:  # noqa: ASYNC110
            await anyio.sleep(0.001)


@asynccontextmanager
async def asgi_lifespan(app: Callable[..., Awaitable[None]]) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan: startup on entry, shutdown on exit.

    Raises ``RuntimeError`` with the app's message on ``lifespan.*.failed``.
    """
    to_app, app_in = anyio.create_memory_object_stream[MutableMapping[str, Any]](2)
    app_out, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](2)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    said_failed = False

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal said_failed
        said_failed = said_failed or message["type"].endswith(".failed")
        await app_out.send(message)

    async def run() -> None:
        async with app_out:
            try:
                await app(scope, app_in.receive, send)
            except Exception:
                # As servers do: after lifespan.*.failed the app's exception (Starlette
                # raises right after saying so) adds nothing to the failure reported.
                if not said_failed:
                    raise

    async def call(kind: str) -> None:
        await to_app.send({"type": f"lifespan.{kind}"})
        with anyio.fail_after(60):
            reply = await from_app.receive()
        if reply["type"] != f"lifespan.{kind}.complete":
            raise RuntimeError(f"lifespan {kind} failed: {reply.get('message', '')}")

    failure: list[BaseException] = []
    with to_app, app_in, from_app:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                await call("startup")
            except RuntimeError as exc:
                failure.append(exc)
                tg.cancel_scope.cancel()
            if not failure:
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        try:
                            await call("shutdown")
                        except RuntimeError as exc:
                            failure.append(exc)
    if failure:  # raised here, not wrapped in the task group's ExceptionGroup
        raise failure[0]
