"""GuardedStream: a stream that ends promptly on shutdown, disconnect, stall or expiry.

However it ends, its source is closed (``aclose()``) so the source's
``finally`` blocks run, exactly once, in the consumer's task.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict

from ._exceptions import (
    ConsumerDisconnected,
    ConsumerStalled,
    ShuttingDownError,
    StreamError,
    StreamInterrupted,
)
from ._report import State

if TYPE_CHECKING:
    from ._guard import TaskGuard

__all__ = ["DISCONNECT_ERRORS", "GuardedStream", "StreamOutcome", "StreamResult"]

logger = logging.getLogger("taskguard")

T = TypeVar("T")

#: errors of a send that mean the consumer is gone
DISCONNECT_ERRORS: tuple[type[BaseException], ...] = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


class StreamOutcome(str, enum.Enum):
    """How a stream ended. Compares equal to its value: ``outcome == "stalled"``."""

    COMPLETED = "completed"  # the source was exhausted
    INTERRUPTED = "interrupted"  # the guard shut down
    DISCONNECTED = "disconnected"  # the consumer went away
    STALLED = "stalled"  # a send took longer than send_timeout
    EXPIRED = "expired"  # max_duration was reached
    FAILED = "failed"  # the source raised
    STOPPED = "stopped"  # stop() was called, or the consumer stopped iterating

    def __str__(self) -> str:
        return self.value


class StreamResult(BaseModel):
    """What ``pump()`` returns: the outcome and the resume point (``sent``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    outcome: StreamOutcome
    #: items sent (pump) or handed to the consumer (iteration): resume from item ``sent``
    sent: int
    duration: float
    error: str | None = None


_ERRORS: dict[StreamOutcome, type[StreamError]] = {
    StreamOutcome.INTERRUPTED: StreamInterrupted,
    StreamOutcome.DISCONNECTED: ConsumerDisconnected,
    StreamOutcome.STALLED: ConsumerStalled,
    StreamOutcome.EXPIRED: StreamError,
}


class GuardedStream(Generic[T]):
    """An async iterator (and async context manager) over ``source``, tracked by a guard.

    It ends on shutdown (after ``stream_grace``), on ``max_duration``, on
    ``stop()`` and, with :meth:`pump`, when the consumer disconnects or stalls
    for ``send_timeout``. Iteration ends quietly on completed, interrupted,
    expired and stopped (``raise_on_end=True`` raises a :class:`StreamError`
    subclass instead, except on completed); a source that raises re-raises.
    """

    def __init__(
        self,
        guard: TaskGuard,
        source: AsyncIterable[T],
        *,
        name: str | None = None,
        send_timeout: float | None = None,
        max_duration: float | None = None,
        raise_on_end: bool = False,
    ) -> None:
        if not hasattr(source, "__aiter__"):
            raise TypeError(f"stream() takes an async iterable, not {type(source).__name__}")
        for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(
                    f"{label} must be a positive finite number of seconds, not {value!r}"
                )
        if guard.state is State.IDLE:
            guard._refuse_section("stream")
        self.guard = guard
        self.name = name or getattr(source, "__qualname__", None) or type(source).__name__
        self.send_timeout = send_timeout
        self.max_duration = max_duration
        self.raise_on_end = raise_on_end
        self.sent = 0
        self.outcome: StreamOutcome | None = None
        self.error: BaseException | None = None
        self._source = source
        self._iterator: AsyncIterator[T] | None = None
        self._scope: anyio.CancelScope | None = None  # around the current await
        self._reason: StreamOutcome | None = None  # why we cancelled _scope
        self._started = 0.0
        self._expires = math.inf
        self._closed = False
        self._result: StreamResult | None = None

    def __repr__(self) -> str:
        return f"<GuardedStream {self.name!r} sent={self.sent} outcome={self.outcome}>"

    # -- ending it from outside ------------------------------------------------------

    def stop(self) -> None:
        """End the stream (outcome ``stopped``); the current item's await is cancelled."""
        self._end_from_outside(StreamOutcome.STOPPED)

    def disconnected(self) -> None:
        """Tell the stream its consumer went away (for integrations): ends as ``disconnected``."""
        self._end_from_outside(StreamOutcome.DISCONNECTED)

    def _interrupt(self) -> None:
        self._end_from_outside(StreamOutcome.INTERRUPTED)

    def _end_from_outside(self, reason: StreamOutcome) -> None:
        if self.outcome is not None or self._reason is not None:
            return
        self._reason = reason
        if self._scope is not None:
            self._scope.cancel()

    # -- iteration -------------------------------------------------------------------

    def __aiter__(self) -> GuardedStream[T]:
        return self

    def _begin(self) -> AsyncIterator[T]:
        guard = self.guard
        if guard.state not in (State.RUNNING, State.DRAINING):
            raise ShuttingDownError(
                f"stream {self.name!r} refused: the guard is {guard.state.value}"
            )
        self._iterator = self._source.__aiter__()
        self._started = anyio.current_time()
        if self.max_duration is not None:
            self._expires = self._started + self.max_duration
        guard._streams[self] = None
        shutdown = guard._shutdown
        if shutdown is not None and shutdown.stage_done("before_drain"):
            self._reason = StreamOutcome.INTERRUPTED  # streams were already ended
        return self._iterator

    async def __anext__(self) -> T:
        iterator = self._iterator
        if iterator is None:
            if self.outcome is not None:
                raise StopAsyncIteration
            iterator = self._begin()
        if self._reason is not None or self.outcome is not None:
            await self._finish(self._reason or self.outcome)
        try:
            with self._open_scope(None) as scope:
                item = await iterator.__anext__()
                self.sent += 1
                return item
            # only reached when the scope swallowed its own cancellation
            await self._finish(self._why(scope))
        except StopAsyncIteration:
            await self._finish(StreamOutcome.COMPLETED)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            self.error = exc
            await self._finish(StreamOutcome.FAILED, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_scope(self, timeout: float | None) -> anyio.CancelScope:
        deadline = self._expires
        if timeout is not None:
            deadline = min(deadline, anyio.current_time() + timeout)
        scope = self._scope = anyio.CancelScope(deadline=deadline)
        if self._reason is not None:
            scope.cancel()
        return scope

    def _why(self, scope: anyio.CancelScope) -> StreamOutcome:
        if self._reason is not None:
            return self._reason
        if anyio.current_time() >= self._expires:
            return StreamOutcome.EXPIRED
        return StreamOutcome.STALLED

    async def _finish(self, outcome: StreamOutcome | None, exc: BaseException | None = None) -> Any:
        """End the stream with ``outcome``, close the source, then stop or raise."""
        assert outcome is not None
        await self._close(outcome, exc)
        if exc is not None:
            raise exc
        if self.raise_on_end and outcome in _ERRORS:
            err = _ERRORS[outcome](
                f"stream {self.name!r} ended: {outcome.value} after {self.sent} items"
            )
            err.sent = self.sent
            raise err
        raise StopAsyncIteration

    async def _close(self, outcome: StreamOutcome, exc: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self.outcome = outcome
        self._scope = None
        guard = self.guard
        guard._streams.pop(self, None)
        guard._stream_outcomes[outcome.value] += 1
        duration = anyio.current_time() - self._started if self._started else 0.0
        self._result = StreamResult(
            name=self.name,
            outcome=outcome,
            sent=self.sent,
            duration=duration,
            error=None if exc is None else f"{type(exc).__name__}: {exc}",
        )
        if exc is not None:
            logger.error("stream %r failed after %d items", self.name, self.sent, exc_info=exc)
        iterator = self._iterator
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            # Shielded: the source's finally must run even when we got here
            # because our own task is being cancelled.
            with anyio.CancelScope(shield=True):
                try:
                    await aclose()
                except Exception:
                    logger.exception("closing the source of stream %r failed", self.name)

    # -- context manager ---------------------------------------------------------

    async def __aenter__(self) -> GuardedStream[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        if exc is None:
            outcome = self._reason or StreamOutcome.STOPPED
        elif isinstance(exc, DISCONNECT_ERRORS):
            outcome = StreamOutcome.DISCONNECTED
        elif isinstance(exc, anyio.get_cancelled_exc_class()):
            outcome = self._reason or StreamOutcome.STOPPED
        else:
            outcome = StreamOutcome.FAILED
        await self._close(outcome, exc if outcome is StreamOutcome.FAILED else None)

    # -- driving the sends -------------------------------------------------------

    @property
    def result(self) -> StreamResult:
        """The result, once the stream has ended."""
        if self._result is None:
            raise RuntimeError(f"stream {self.name!r} has not ended yet")
        return self._result

    async def pump(self, send: Callable[[T], Awaitable[object]]) -> StreamResult:
        """Send every item with ``await send(item)`` until the stream ends; return the result.

        A send slower than ``send_timeout`` ends the stream as ``stalled``; a
        send that fails with a broken connection ends it as ``disconnected``.
        Either way the source is closed at once: no further item is produced.
        """
        try:
            async with self:
                async for item in self:
                    try:
                        with self._open_scope(self.send_timeout) as scope:
                            await send(item)
                    except DISCONNECT_ERRORS:
                        self.sent -= 1
                        await self._close(StreamOutcome.DISCONNECTED)
                        break
                    if scope.cancelled_caught:
                        self.sent -= 1  # that item was not (fully) sent
                        await self._close(self._why(scope))
                        break
        except Exception:
            # The source raised: logged and in the result; raise_on_end re-raises it.
            if self.outcome is not StreamOutcome.FAILED or self.raise_on_end:
                raise
        result = self.result
        if self.raise_on_end and result.outcome in _ERRORS:
            err = _ERRORS[result.outcome](
                f"stream {self.name!r} ended: {result.outcome.value} after {result.sent} items"
            )
            err.sent = result.sent
            raise err
        return result
