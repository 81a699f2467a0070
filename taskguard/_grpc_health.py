"""The standard ``grpc.health.v1.Health`` service, answered from a guard's state.

``serve()`` registers it by default; :class:`GuardHealthServicer` is importable
from ``taskguard.grpc`` to register by hand: ``servicer.add_to_server(server)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import grpc

try:
    from grpc_health.v1 import health_pb2
except ImportError as exc:  # pragma: no cover - the grpc extra installs it
    raise ImportError(
        "taskguard.grpc needs grpcio-health-checking: pip install 'taskguard[grpc]'"
    ) from exc

from ._report import State

if TYPE_CHECKING:
    from ._guard import TaskGuard

__all__ = ["HEALTH_SERVICE", "GuardHealthServicer"]

#: the health service's full name; its methods are ``/grpc.health.v1.Health/...``
HEALTH_SERVICE = "grpc.health.v1.Health"

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_CODEC = (
    health_pb2.HealthCheckRequest.FromString,
    health_pb2.HealthCheckResponse.SerializeToString,
)


class GuardHealthServicer:
    """``grpc.health.v1.Health`` backed by ``guard``: ``SERVING`` while it runs,
    ``NOT_SERVING`` from the shutdown trigger on (through ``drain_delay``).

    It answers for the overall server ``""`` and for each name in ``services``
    (e.g. ``"pkg.Jobs"``); any other name gets ``NOT_FOUND`` from ``Check`` and
    ``SERVICE_UNKNOWN`` from ``Watch``, as the health protocol says. A
    ``Watch`` sends the status, then ``NOT_SERVING`` at the trigger, and ends
    with ``UNAVAILABLE`` once the server stops taking RPCs (``drain_delay``
    after the trigger), so it never holds ``server.stop()``.
    """

    def __init__(self, guard: TaskGuard, services: Iterable[str] = ()) -> None:
        from ._guard import TaskGuard

        if not isinstance(guard, TaskGuard):
            raise TypeError(f"GuardHealthServicer() takes a TaskGuard, not {guard!r}")
        if isinstance(services, str):
            raise TypeError(
                f"services is an iterable of service names, not the str {services!r}: "
                f"write [{services!r}]"
            )
        names = [""]
        for name in services:
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(
                    f"a service name is a full name such as 'pkg.Service' (no '/'), not {name!r}"
                )
            names.append(name)
        self.guard = guard
        #: the names this servicer answers for, the overall server "" first
        self.services: tuple[str, ...] = tuple(dict.fromkeys(names))

    def add_to_server(self, server: Any) -> None:
        """Register the service on ``server`` (a ``grpc.aio.Server``).

        As a generic handler, not as grpc's "registered methods"
        (``add_HealthServicer_to_server`` does both): grpc.aio's accept loop
        waits on one pending request per registered method (``asyncio.wait``
        over all of them for every RPC it takes: about 3 µs more per RPC for
        the health service's three). A generic handler can also be added after
        ``server.start()``, which registered methods cannot.
        """
        methods = {
            "Check": grpc.unary_unary_rpc_method_handler(self.Check, *_CODEC),
            "Watch": grpc.unary_stream_rpc_method_handler(self.Watch, *_CODEC),
        }
        if hasattr(health_pb2, "HealthListRequest"):  # grpcio-health-checking 1.7x+
            methods["List"] = grpc.unary_unary_rpc_method_handler(
                self.List,
                health_pb2.HealthListRequest.FromString,
                health_pb2.HealthListResponse.SerializeToString,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_SERVICE, methods),)
        )

    def status(self, service: str) -> int | None:
        """The status of ``service`` now, or None for a name it does not answer for."""
        if service not in self.services:
            return None
        return SERVING if self.guard.ready else NOT_SERVING

    async def Check(self, request: Any, context: Any) -> Any:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: Any, context: Any) -> Any:
        serving = SERVING if self.guard.ready else NOT_SERVING
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=serving) for name in self.services
            }
        )

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        guard = self.guard
        if guard.state is State.IDLE:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server's guard has not started")
        status = self.status(request.service)
        yield health_pb2.HealthCheckResponse(status=SERVICE_UNKNOWN if status is None else status)
        if status == SERVING:
            await guard.wait_for_shutdown()
            yield health_pb2.HealthCheckResponse(status=NOT_SERVING)
        await guard.wait_for_intake_stop()
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "server shutting down: it takes no new RPCs"
        )
