"""taskguard for ``grpc.aio`` servers: a server interceptor and ``serve()``.

``GuardInterceptor(guard)`` makes every RPC in-flight work that shutdown waits
for, and turns server-streaming and bidi RPCs into guarded streams: at shutdown
they end at once with status ``UNAVAILABLE`` (so clients retry elsewhere) and
the number of messages sent in the trailing metadata key ``taskguard-sent``
(a resume point); they stop producing when the client cancels or its deadline
passes, and (with ``send_timeout``) when the client stops reading.

``await serve(server, guard)`` registers the standard health service
(``grpc.health.v1``: ``NOT_SERVING`` from the shutdown trigger on), starts the
server, keeps serving through ``drain_delay``, then stops intake (a
``before_drain`` hook that *starts* ``server.stop(grace)``), lets the drain end
the streams and await the in-flight RPCs and their background work, and
returns once the guard is closed.

grpc.aio runs on asyncio only: use the asyncio backend (the default of
``taskguard.run``). Install with ``pip install 'anyio-taskguard[grpc]'``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import grpc
import grpc.aio

from ._config import check_seconds
from ._exceptions import NotStartedError, ShuttingDownError
from ._grpc_health import HEALTH_SERVICE, GuardHealthServicer
from ._grpc_stream import StreamCall
from ._guard import TaskGuard
from ._report import State
from ._stream_registry import StreamOutcome

__all__ = ["OUTCOME_KEY", "RESUME_KEY", "GuardHealthServicer", "GuardInterceptor", "serve"]

logger = logging.getLogger("taskguard")

#: trailing-metadata key: how many messages the server sent (resume from there)
RESUME_KEY = "taskguard-sent"
#: trailing-metadata key: how the stream ended (interrupted, stalled, expired)
OUTCOME_KEY = "taskguard-outcome"

_HEALTH_PREFIX = f"/{HEALTH_SERVICE}/"
_UNARY_KINDS = ("unary_unary", "stream_unary")
_STREAM_KINDS = ("unary_stream", "stream_stream")


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A ``grpc.aio`` server interceptor that puts every RPC under ``guard``.

    - Each RPC runs as a guarded section named after its method: shutdown waits
      for it (within the exit wait). An RPC arriving once the guard refuses
      work is answered ``UNAVAILABLE``; so is one cut at the shutdown deadline.
    - A server-streaming or bidi handler written as an async generator becomes
      a :class:`~taskguard.GuardedStream`. On shutdown it ends with
      ``UNAVAILABLE``, a details string saying so, and trailing metadata
      ``taskguard-sent`` (messages sent: the resume point) and
      ``taskguard-outcome``. A client cancel or deadline stops the generator
      at once (its ``finally`` runs); ``send_timeout`` cuts a client that stops
      reading; ``max_duration`` bounds every stream (ended ``UNAVAILABLE`` so
      the client reconnects and resumes).
    - Streaming handlers that send with ``await context.write()`` instead of
      yielding cannot be ended from outside: they are guarded sections only,
      awaited by the drain and cut at the deadline. Prefer ``yield``.
    - Sync handlers (grpc.aio's ``migration_thread_pool``) are passed through;
      sync unary ones run as guarded sections.
    """

    def __init__(
        self,
        guard: TaskGuard,
        *,
        send_timeout: float | None = None,
        max_duration: float | None = None,
    ) -> None:
        if not isinstance(guard, TaskGuard):
            raise TypeError(f"GuardInterceptor() takes a TaskGuard, not {guard!r}")
        for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            if value is not None:
                check_seconds(value, label)
        self.guard = guard
        self.send_timeout = send_timeout
        self.max_duration = max_duration
        # method -> (grpc's handler, ours): grpc asks the interceptor on every RPC,
        # and building the wrappers each time was a tenth of a unary RPC's cost.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap_handler(self, handler: Any, method: str) -> Any:
        """Return ``handler`` (an ``RpcMethodHandler``) with its behaviour guarded.

        The health service (``grpc.health.v1.Health``) is passed through: its
        RPCs are not work that shutdown waits for, and a health watch must not
        hold the drain.
        """
        if method.startswith(_HEALTH_PREFIX):
            return handler
        for kind in _UNARY_KINDS + _STREAM_KINDS:
            behavior = getattr(handler, kind, None)
            if behavior is None:
                continue
            if kind in _UNARY_KINDS:
                wrapped = self._wrap_unary(behavior, method)
            else:
                wrapped = self._wrap_stream(behavior, method)
            return _replace(handler, kind, wrapped)
        return handler

    # -- unary responses -------------------------------------------------------

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        guard = self.guard
        if not inspect.iscoroutinefunction(behavior):

            def sync_unary(request: Any, context: Any) -> Any:
                with guard.guarded(method):
                    return behavior(request, context)

            return sync_unary

        async def unary(request: Any, context: Any) -> Any:
            return await _in_section(guard, method, context, behavior(request, context))

        return unary

    # -- streaming responses ---------------------------------------------------

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        guard = self.guard
        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Any) -> None:
                pump = self._pump(behavior(request, context), context, method)
                await _in_section(guard, method, context, pump)

            return streaming
        if inspect.iscoroutinefunction(behavior):

            async def writing(request: Any, context: Any) -> None:
                # It sends with context.write(): we cannot end it, only await it.
                await _in_section(guard, method, context, behavior(request, context))

            return writing
        return behavior  # a sync generator, iterated by grpc in its thread pool

    async def _pump(self, source: Any, context: Any, method: str) -> None:
        guard = self.guard
        max_duration, deadline_bound = self.max_duration, False
        remaining = context.time_remaining()
        if remaining is not None and (max_duration is None or remaining < max_duration):
            max_duration, deadline_bound = max(remaining, 1e-3), True
        stream = guard.stream(source, name=method, max_duration=max_duration)
        call = StreamCall(guard, stream, source, context, self.send_timeout, max_duration)
        try:
            await call.run()
        except Exception:
            logger.error("stream %r failed after %d messages", method, call.sent, exc_info=True)
            raise  # grpc answers it (UNKNOWN, or the code the handler set)
        if call.aborted is not None:
            raise call.aborted
        outcome = stream.outcome
        if outcome in (StreamOutcome.COMPLETED, StreamOutcome.STOPPED, StreamOutcome.DISCONNECTED):
            return
        sent = call.sent
        assert outcome is not None
        code, details = self._describe(method, outcome, sent, deadline_bound, max_duration)
        metadata = _merge_trailing(context, ((RESUME_KEY, str(sent)), (OUTCOME_KEY, outcome)))
        await context.abort(code, details, trailing_metadata=metadata)

    def _describe(
        self,
        method: str,
        outcome: str,
        sent: int,
        deadline_bound: bool,
        max_duration: float | None,
    ) -> tuple[grpc.StatusCode, str]:
        resume = f"resume from message {sent} (trailing metadata {RESUME_KEY}={sent})"
        if outcome == "interrupted":
            return grpc.StatusCode.UNAVAILABLE, (
                f"server shutting down: {method} stream ended after {sent} messages; {resume}"
            )
        if outcome == "stalled":
            return grpc.StatusCode.UNAVAILABLE, (
                f"{method} stream cut: the client accepted no message for {self.send_timeout:g}s "
                f"(after {sent} messages); {resume}"
            )
        if deadline_bound:
            return grpc.StatusCode.DEADLINE_EXCEEDED, (
                f"deadline reached: {method} stream ended after {sent} messages; {resume}"
            )
        return grpc.StatusCode.UNAVAILABLE, (
            f"{method} stream reached its maximum duration of {max_duration:g}s after {sent} "
            f"messages; reconnect and {resume}"
        )


async def _in_section(guard: TaskGuard, method: str, context: Any, handling: Any) -> Any:
    """Await ``handling`` (the handler's coroutine) as a guarded section named ``method``.

    A task section, not ``guard.guarded()``: grpc runs every RPC in a fresh task,
    where an anyio cancel scope would cost more than the rest of the section.
    Refused (the guard takes no more work) or cut at the deadline, the RPC is
    answered ``UNAVAILABLE``.
    """
    try:
        section = guard.open_task_section(method)
    except (ShuttingDownError, NotStartedError) as exc:
        handling.close()
        await _abort_unavailable(context, method, str(exc))
        raise
    try:
        result = await handling
    except asyncio.CancelledError:
        section.close(True)
        if not section.cut:
            raise  # grpc's: the client cancelled or its deadline passed
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
            task.uncancel()  # the cut was ours to take
        await _abort_unavailable(context, method, "cut at the shutdown deadline")
        raise
    except BaseException:
        section.close(False)
        raise
    section.close(False)
    return result


async def _abort_unavailable(context: Any, method: str, why: str) -> None:
    await context.abort(
        grpc.StatusCode.UNAVAILABLE, f"server shutting down: {method} not completed ({why})"
    )


def _merge_trailing(context: Any, ours: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    try:
        existing = tuple(context.trailing_metadata() or ())
    except (NotImplementedError, AttributeError):
        existing = ()
    keys = {key for key, _ in ours}
    return tuple(item for item in existing if item[0] not in keys) + ours


def _replace(handler: Any, kind: str, behavior: Callable[..., Any]) -> Any:
    if hasattr(handler, "_replace"):  # the namedtuple grpc's *_rpc_method_handler() build
        return handler._replace(**{kind: behavior})
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def serve(
    server: grpc.aio.Server,
    guard: TaskGuard,
    grace: float | None = None,
    *,
    health: bool = True,
    services: Iterable[str] = (),
) -> None:
    """Start ``server`` and run it until ``guard`` shuts down; return once the guard is closed.

    With ``health=True`` (the default) it first registers the standard
    ``grpc.health.v1.Health`` service (:class:`GuardHealthServicer`) for the
    overall server ``""`` and the app's ``services`` (full names such as
    ``"pkg.Jobs"``): ``SERVING`` while the guard runs, ``NOT_SERVING`` from
    the shutdown trigger on. Pass ``health=False`` when the app registers a
    health service of its own. grpc takes handlers only before
    ``server.start()``: let ``serve()`` start the server.

    From the trigger until ``drain_delay`` has passed the server keeps
    accepting and serving RPCs (health already says ``NOT_SERVING``, so load
    balancers and clients move away). Then a ``before_drain`` hook *starts*
    ``server.stop(grace)`` (no new RPCs are accepted) without waiting on
    in-flight RPCs: waiting is the drain's job, and waiting in the hook would
    hold the streams open. The drain then ends the streams
    (``GuardInterceptor``) and awaits the in-flight RPCs and the background
    work they spawned. ``grace=None`` means the guard's remaining exit wait
    when intake stops; a grace longer than the guard's ``exit_wait_timeout``
    is an error (RPCs would outlive the guard's promise).

    Inside ``taskguard.run``'s ``main`` (itself a guarded section that the
    drain waits for) it returns once the server has stopped, and ``run``
    closes the guard right after.
    """
    exit_wait = guard.config.exit_wait_timeout
    if grace is not None:
        grace = check_seconds(grace, "grace", positive=False)
        if grace > exit_wait:
            raise ValueError(
                f"grace {grace:g}s is longer than the guard's exit_wait_timeout {exit_wait:g}s: "
                "RPCs would outlive the shutdown; lower grace or raise exit_wait_timeout"
            )
    if guard.state is not State.RUNNING:
        if guard.state is State.IDLE:
            raise NotStartedError(
                "serve() needs a running guard: enter it with `async with guard:`"
            )
        raise ShuttingDownError(f"serve() refused: the guard is {guard.state.value}")
    if health:
        GuardHealthServicer(guard, services).add_to_server(server)
    elif services:
        raise ValueError("services name entries of the health service: they need health=True")
    stopping: list[asyncio.Future[None]] = []
    intake_stopped = asyncio.Event()

    def stop_intake() -> None:
        remaining = guard.remaining()
        stop_grace = remaining if grace is None else min(grace, remaining)
        logger.info("grpc: stopping intake (server.stop with grace %.3gs)", stop_grace)
        stopping.append(asyncio.ensure_future(server.stop(stop_grace)))
        intake_stopped.set()

    guard.on_shutdown(stop_intake, stage="before_drain", name="grpc: stop intake")
    await server.start()
    try:
        await intake_stopped.wait()
        # server.stop() returns once every RPC has ended (the drain ends the
        # streams) and their final statuses are sent, or at its grace.
        await stopping[0]
    except BaseException:
        if not stopping:  # cancelled before shutdown: serve owns the server, stop it
            with anyio.CancelScope(shield=True):
                await server.stop(0)
        raise
    if not guard.in_section():
        await guard.wait_closed()
