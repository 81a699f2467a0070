"""GuardedStream: a stream that ends promptly on shutdown, disconnect, stall or expiry.

However it ends, its source is closed (``aclose()``) so the source's
``finally`` blocks run exactly once, in the consumer's task (see
docs/streams.md for the one exception: a bare ``async for`` left by ``break``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._config import check_flag, check_name, check_seconds
from ._exceptions import ConsumerDisconnected, ConsumerStalled, StreamError, StreamInterrupted
from ._stream_registry import StreamOutcome, StreamResult

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from ._stream_registry import Tracked

__all__ = ["DISCONNECT_ERRORS", "GuardedStream"]

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


_ERRORS: dict[StreamOutcome, type[StreamError]] = {
    StreamOutcome.INTERRUPTED: StreamInterrupted,
    StreamOutcome.DISCONNECTED: ConsumerDisconnected,
    StreamOutcome.STALLED: ConsumerStalled,
    StreamOutcome.EXPIRED: StreamError,
}


class GuardedStream(Generic[T]):
    """A stream tracked by a guard: an async iterator over ``source`` and an async
    context manager. Create it with ``guard.stream(source, ...)``.

    It ends on shutdown (after ``stream_grace``), on ``max_duration``, on
    :meth:`stop`, on :meth:`disconnected`, and when a :meth:`send` fails
    (``disconnected``) or takes longer than ``send_timeout`` (``stalled``).
    Inside ``async with stream:`` such an ending cancels the whole block, which
    then exits quietly; a bare ``async for`` ends quietly at its next item.
    With ``raise_on_end=True`` the endings other than completed and stopped
    raise a :class:`StreamError` subclass instead.

    Integrations that send themselves use ``source=None`` and, per message,
    ``await stream.send(send_fn, message)`` inside ``async with stream:``; they
    may call :meth:`disconnected` from another task of the same event loop.
    """

    def __init__(
        self,
        guard: TaskGuard,
        source: AsyncIterable[T] | None,
        *,
        name: str | None = None,
        send_timeout: float | None = None,
        max_duration: float | None = None,
        raise_on_end: bool = False,
    ) -> None:
        if source is not None and not hasattr(source, "__aiter__"):
            raise TypeError(f"stream() takes an async iterable, not {type(source).__name__}")
        name = check_name(name)
        check_flag(raise_on_end, "raise_on_end")
        if send_timeout is not None:
            check_seconds(send_timeout, "send_timeout")
        if max_duration is not None:
            check_seconds(max_duration, "max_duration")
        registry = guard._streams
        if registry is None:
            guard._refuse_section("stream")
        assert registry is not None
        self.guard = guard
        self._registry = registry
        default = getattr(source, "__qualname__", None) or type(source).__name__
        self.name = name or (default if source is not None else "stream")
        self.send_timeout = send_timeout
        self.max_duration = max_duration
        self.raise_on_end = raise_on_end
        #: items delivered so far: confirmed by a successful send(), by asking for
        #: the next item, or by leaving ``async with`` without an error
        self.sent = 0
        #: set once the stream has ended
        self.outcome: StreamOutcome | None = None
        self._source = source
        self._iterator: AsyncIterator[T] | None = None
        self._tracked: Tracked | None = None
        self._unconfirmed = False  # an item was handed out and not yet confirmed
        self._body: anyio.CancelScope | None = None  # around the async-with block
        self._scope: anyio.CancelScope | None = None  # around our current await
        self._reason: StreamOutcome | None = None  # why it was ended from outside
        self._started = 0.0
        self._expires = math.inf
        self._result: StreamResult | None = None

    def __repr__(self) -> str:
        return f"<GuardedStream {self.name!r} sent={self.sent} outcome={self.outcome}>"

    @property
    def result(self) -> StreamResult:
        """The outcome and resume point, once the stream has ended."""
        if self._result is None:
            raise RuntimeError(f"stream {self.name!r} has not ended yet")
        return self._result

    # -- ending it from outside (sync: any task of the guard's event loop) ---------

    def stop(self) -> None:
        """End the stream (outcome ``stopped``)."""
        self._end_from_outside(StreamOutcome.STOPPED)

    def disconnected(self) -> None:
        """Tell the stream its consumer went away: it ends as ``disconnected``."""
        self._end_from_outside(StreamOutcome.DISCONNECTED)

    def stalled(self) -> None:
        """Tell the stream its consumer stopped reading: it ends as ``stalled``.

        For integrations that send outside :meth:`send` and watch for a stalled
        consumer themselves (the gRPC interceptor checks once per
        ``send_timeout``, not with a timer per message)."""
        self._end_from_outside(StreamOutcome.STALLED)

    def _interrupt(self) -> None:
        self._end_from_outside(StreamOutcome.INTERRUPTED)

    def _end_from_outside(self, reason: StreamOutcome) -> None:
        if self.outcome is not None or self._reason is not None:
            return
        self._reason = reason
        active = False
        for scope in (self._body, self._scope):
            if scope is not None:
                scope.cancel()
                active = True
        if active and self._tracked is not None:
            # Its consumer is waiting in a scope we just cancelled, so it ends
            # now: let the drain wait for that, so the report counts it.
            self._registry.hold(self._tracked)

    # -- lifecycle ---------------------------------------------------------------

    def _begin(self) -> None:
        self._started = anyio.current_time()
        if self.max_duration is not None:
            self._expires = self._started + self.max_duration
        if self._source is not None:
            self._iterator = self._source.__aiter__()
        self._tracked = self._registry.track(self)
        if self._reason is None and self._registry.ended:
            self._reason = StreamOutcome.INTERRUPTED  # the open streams were already ended

    def _confirm(self) -> None:
        if self._unconfirmed:
            self._unconfirmed = False
            self.sent += 1

    def _why(self, default: StreamOutcome) -> StreamOutcome:
        if self._reason is not None:
            return self._reason
        if anyio.current_time() >= self._expires:
            return StreamOutcome.EXPIRED
        return default

    def _error(self, outcome: StreamOutcome) -> StreamError:
        err = _ERRORS.get(outcome, StreamError)(
            f"stream {self.name!r} ended: {outcome.value} after {self.sent} items"
        )
        err.sent = self.sent
        setattr(err, "_stream", self)  # noqa: B010 - marks it as ours for __aexit__
        return err

    async def _close(self, outcome: StreamOutcome, exc: BaseException | None = None) -> None:
        """Record the outcome, stop tracking, and close the source (once)."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self._scope = None
        assert self._tracked is not None, "a stream is tracked before it can end"
        self._registry.release(self._tracked, outcome)
        duration = anyio.current_time() - self._started
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        self._result = StreamResult(
            name=self.name, outcome=outcome, sent=self.sent, duration=duration, error=error
        )
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            # Shielded: the source's finally must run (and may await) even when
            # we got here because this task is being cancelled.
            with anyio.CancelScope(shield=True):
                try:
                    await aclose()
                except Exception as exc:  # the stream has ended all the same
                    self._registry.fault(f"closing the source of stream {self.name!r}", exc)

    # -- iteration -----------------------------------------------------------------

    def __aiter__(self) -> GuardedStream[T]:
        return self

    async def __anext__(self) -> T:
        if self.outcome is not None:
            raise StopAsyncIteration
        if self._tracked is None:
            if self._source is None:
                raise TypeError(f"stream {self.name!r} has no source to iterate; use send()")
            self._begin()
        self._confirm()  # the consumer came back for more: the last item was delivered
        if self._reason is not None:
            await self._end(self._reason)
        iterator = self._iterator
        assert iterator is not None
        scope = self._open_scope(None)
        try:
            with scope:
                item = await iterator.__anext__()
                self._unconfirmed = True
                return item
        except StopAsyncIteration:
            await self._end(StreamOutcome.COMPLETED)
        except anyio.get_cancelled_exc_class():
            # Not ours (ours would have been caught by our scope), or the body's.
            if self._body is None:
                await self._close(self._why(StreamOutcome.STOPPED))
            raise
        except Exception as exc:
            await self._close(StreamOutcome.FAILED, exc)
            raise
        finally:
            self._scope = None
        # only reached when our scope caught its own cancellation
        await self._end(self._why(StreamOutcome.STOPPED))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _end(self, outcome: StreamOutcome) -> None:
        await self._close(outcome)
        if self.raise_on_end and outcome in _ERRORS:
            raise self._error(outcome)
        raise StopAsyncIteration

    def _open_scope(self, timeout: float | None) -> anyio.CancelScope:
        deadline = self._expires
        if timeout is not None:
            deadline = min(deadline, anyio.current_time() + timeout)
        scope = self._scope = anyio.CancelScope(deadline=deadline)
        if self._reason is not None:
            scope.cancel()
        return scope

    # -- sending -------------------------------------------------------------------

    async def send(self, send: Callable[[Any], Awaitable[object]], item: Any) -> None:
        """Deliver ``item`` with ``await send(item)``, under the stream's rules.

        The send is cut after ``send_timeout`` and when the stream is ended from
        outside. If the stream has ended, or ends now, the source is closed at
        once (no further item is produced) and this raises the matching
        :class:`StreamError` subclass: :class:`ConsumerStalled`,
        :class:`ConsumerDisconnected` (also for ``BrokenPipeError``,
        ``ConnectionResetError`` and anyio's broken/closed-resource errors),
        :class:`StreamInterrupted`. Inside ``async with stream:`` these are
        swallowed when the block exits. A send cut mid-way may have written part
        of ``item``: close the connection afterwards.
        """
        if self._tracked is None:
            self._begin()
        outcome = self.outcome or self._reason
        cause: BaseException | None = None
        if outcome is None:
            scope = self._open_scope(self.send_timeout)
            try:
                with scope:
                    await send(item)
            except DISCONNECT_ERRORS as exc:
                outcome, cause = StreamOutcome.DISCONNECTED, exc
            finally:
                self._scope = None
            if scope.cancelled_caught:
                outcome = self._why(StreamOutcome.STALLED)
            elif outcome is None:
                if self._unconfirmed:
                    self._confirm()
                elif self._source is None:
                    self.sent += 1
                return
        await self._close(outcome)
        raise self._error(outcome) from cause

    async def pump(self, send: Callable[[T], Awaitable[object]]) -> StreamResult:
        """Send every item with ``await send(item)`` until the stream ends; return the result.

        A send slower than ``send_timeout`` ends the stream as ``stalled``; a
        send that fails with a broken connection ends it as ``disconnected``.
        Either way the source is closed at once: no further item is produced.
        A source that raises ends it as ``failed``: the error is logged and in
        ``result.error`` (re-raised with ``raise_on_end=True``).
        """
        if self._body is not None:
            raise RuntimeError("pump() manages the stream itself: call it outside `async with`")
        try:
            async with self:
                async for item in self:
                    await self.send(send, item)
        except Exception as exc:
            if self.outcome is not StreamOutcome.FAILED or self.raise_on_end:
                raise
            logger.error("stream %r failed after %d items", self.name, self.sent, exc_info=exc)
        return self.result

    async def aclose(self) -> None:
        """End the stream now (outcome ``stopped`` unless it was already ending) and
        close the source. Idempotent.

        This is the form to use inside an async generator, where ``async with
        stream`` must not span a ``yield`` (it holds a cancel scope):
        ``async with contextlib.aclosing(guard.stream(source)) as stream:``.
        """
        if self.outcome is None:
            if self._tracked is None:
                self._begin()
            await self._close(self._why(StreamOutcome.STOPPED))

    # -- context manager -------------------------------------------------------------

    async def __aenter__(self) -> GuardedStream[T]:
        if self._body is not None:
            raise RuntimeError(f"stream {self.name!r} is already entered")
        if self._tracked is None:
            self._begin()
        body = self._body = anyio.CancelScope(deadline=self._expires)
        body.__enter__()
        if self._reason is not None or self.outcome is not None:
            body.cancel()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        body, self._body = self._body, None
        assert body is not None, "stream exited without being entered"
        # (anyio's trio scope returns True even when there was no exception)
        swallowed = bool(body.__exit__(exc_type, exc, tb)) and exc is not None
        ours = isinstance(exc, StreamError) and getattr(exc, "_stream", None) is self
        quiet = swallowed or ours
        if self.outcome is not None:
            outcome = self.outcome
        elif swallowed:
            outcome = self._why(StreamOutcome.STOPPED)
        elif exc is None:
            self._confirm()  # left the block normally: the last item was dealt with
            outcome, quiet = self._reason or StreamOutcome.STOPPED, True
        elif isinstance(exc, DISCONNECT_ERRORS):
            outcome, quiet = StreamOutcome.DISCONNECTED, True
        elif isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            # its own cancellation, GeneratorExit, KeyboardInterrupt: it stopped
            outcome = self._reason or StreamOutcome.STOPPED
        else:
            outcome = StreamOutcome.FAILED
        await self._close(outcome, exc if outcome is StreamOutcome.FAILED else None)
        if ours:
            return not self.raise_on_end
        if quiet and self.raise_on_end and outcome in _ERRORS:
            raise self._error(outcome) from exc
        return quiet
