"""The per-message path of a guarded gRPC stream (see ``taskguard.grpc``)."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

import anyio
import grpc
import grpc.aio

from ._report import State

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from ._streams import GuardedStream

__all__ = ["StreamCall"]

# Errors of context.write() that mean the RPC is over on the client's side.
_WRITE_GONE: tuple[type[BaseException], ...] = (grpc.aio.UsageError,)
try:  # internal to grpc; raised when a send batch fails on a dead call
    from grpc._cython.cygrpc import ExecuteBatchError

    _WRITE_GONE += (ExecuteBatchError,)
except ImportError:  # pragma: no cover
    pass


class StreamCall:
    """One streaming RPC's pump: the handler's messages written with ``context.write()``.

    The per-message path is a plain loop: one cancel scope for the whole stream
    (``async with stream``), which shutdown, ``max_duration`` and a stall end,
    instead of a scope per message (which cost grpc.aio over a third of its
    throughput: see docs/grpc.md). A stalled client is caught by a watchdog that
    looks once per ``send_timeout`` at the write in progress, not by a timer
    per message. It runs in grpc's handler task: no task of its own per RPC.
    """

    __slots__ = (
        "aborted", "armed_for", "context", "expires", "guard", "loop", "send_timeout", "sent",
        "since", "source", "stream", "watchdog",
    )  # fmt: skip

    def __init__(
        self,
        guard: TaskGuard,
        stream: GuardedStream[Any],
        source: Any,
        context: Any,
        send_timeout: float | None,
        max_duration: float | None,
    ) -> None:
        self.guard = guard
        self.stream = stream
        self.source = source
        self.context = context
        self.send_timeout = send_timeout
        #: messages handed to grpc: the resume point
        self.sent = 0
        #: the handler's own context.abort(), re-raised after the stream is closed
        self.aborted: BaseException | None = None
        self.loop = asyncio.get_running_loop()
        self.since: float | None = None  # when the write in progress began
        self.armed_for: float | None = None  # the write the watchdog is timing
        self.watchdog: asyncio.TimerHandle | None = None
        # when max_duration ends the stream (at or before the stream's own deadline)
        self.expires = math.inf if max_duration is None else self.loop.time() + max_duration

    async def run(self) -> None:
        stream, write = self.stream, self.context.write
        timed = self.send_timeout is not None
        if timed:
            self._check_stall()
        try:
            async with stream:  # ends quietly when the stream is ended from outside
                try:
                    async for message in self.source:
                        if timed:
                            self.since = self.loop.time()
                        try:
                            await write(message)
                        except asyncio.CancelledError:
                            # Cut mid-write (shutdown, stall, client gone). The write can
                            # only be cancelled at a suspension, after it handed its batch
                            # to grpc core: the message is queued ahead of any status we
                            # send next, and HTTP/2 delivers it before the trailers. So it
                            # counts.
                            self.sent += 1
                            raise
                        except _WRITE_GONE as exc:
                            raise anyio.BrokenResourceError(f"the RPC is over: {exc}") from exc
                        self.sent += 1
                        self.since = None
                except grpc.aio.AbortError as exc:
                    # context.abort() in the handler is ordinary gRPC control flow,
                    # not a failure of the stream: carry it past the stream.
                    self.aborted = exc
                except asyncio.CancelledError:
                    # The stream's own ending (shutdown, stall: it has a reason, and
                    # this is a no-op; max_duration: its deadline) or grpc's: the
                    # client cancelled or went away. Say so before the stream records
                    # how it ended; grpc's cancellation goes on up.
                    if self.loop.time() < self.expires:
                        if self.guard.state in (State.RUNNING, State.DRAINING):
                            stream.disconnected()
                        else:  # the guard cut the RPC at its deadline
                            stream.stop()
                    raise
                # The source is exhausted (or aborted): asking the stream for the next
                # message records it as completed and closes the source.
                await anext(stream, None)
        finally:
            if self.watchdog is not None:
                self.watchdog.cancel()

    def _check_stall(self) -> None:
        """Timer callback: end the stream if one write has lasted ``send_timeout``."""
        since = self.since
        timeout = self.send_timeout
        assert timeout is not None
        if since is not None and since == self.armed_for:
            # armed for since + send_timeout, and the same write is still going
            self.watchdog = None
            self.stream.stalled()
            return
        self.armed_for = since
        when = (self.loop.time() if since is None else since) + timeout
        self.watchdog = self.loop.call_at(when, self._check_stall)
