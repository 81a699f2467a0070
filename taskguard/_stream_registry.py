"""What a guard knows of its streams: how each ended (:class:`StreamOutcome`,
:class:`StreamResult`) and the registry of the open ones (:class:`Streams`), which
the shutdown interrupts and the report counts. The stream itself is
``_streams.py``'s :class:`~taskguard.GuardedStream`.
"""

from __future__ import annotations

import enum
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from ._inflight import InFlight
    from ._streams import GuardedStream

__all__ = ["StreamOutcome", "StreamResult", "Streams", "Tracked"]


class StreamOutcome(str, enum.Enum):
    """How a stream ended. Compares equal to its value: ``outcome == "stalled"``."""

    COMPLETED = "completed"  # the source was exhausted
    INTERRUPTED = "interrupted"  # the guard shut down
    DISCONNECTED = "disconnected"  # the consumer went away
    STALLED = "stalled"  # a send took longer than send_timeout
    EXPIRED = "expired"  # max_duration was reached
    FAILED = "failed"  # the source (or the block) raised
    STOPPED = "stopped"  # stop(), or the consumer stopped early (break, its own cancellation)

    def __str__(self) -> str:
        return self.value


class StreamResult(BaseModel):
    """How a stream ended and its resume point: ``sent`` items were delivered."""

    model_config = ConfigDict(frozen=True, defer_build=True)  # built on first use, not at import

    name: str
    outcome: StreamOutcome
    #: items delivered; a client resumes from item ``sent`` (0-based)
    sent: int
    duration: float
    error: str | None = None


class Tracked:
    """The registry's weak handle on an open stream.

    Weak, so a stream dropped without being closed (a bare ``async for`` left by
    ``break``) is not kept alive, nor counted as open, until shutdown.
    """

    __slots__ = ("held", "ref")

    def __init__(self, stream: GuardedStream[Any], streams: Streams) -> None:
        self.held = False  # the drain waits for it to close
        self.ref = weakref.ref(stream, lambda _: streams.release(self, StreamOutcome.STOPPED))

    def interrupt(self) -> None:
        stream = self.ref()
        if stream is not None:
            stream._interrupt()


class Streams:
    """The open streams of one guard run (held weakly), and how the others ended."""

    __slots__ = ("_inflight", "ended", "fault", "held", "open", "outcomes")

    def __init__(self, inflight: InFlight, fault: Callable[[str, BaseException], None]) -> None:
        self._inflight = inflight
        #: reports a fault of the bookkeeping (a source whose aclose() raised)
        self.fault = fault
        self.open: dict[Tracked, None] = {}
        #: streams ended from outside whose consumer still unwinds: the drain waits
        self.held = 0
        self.outcomes = Counter[str]()
        #: set once the supervisor ended the open streams: later ones start ended
        self.ended = False
        inflight.watch(lambda: self.held > 0)

    def track(self, stream: GuardedStream[Any]) -> Tracked:
        tracked = Tracked(stream, self)
        self.open[tracked] = None
        return tracked

    def hold(self, tracked: Tracked) -> None:
        """The stream was ended from outside while its consumer waits in it: the
        drain waits for it to close, so the report counts its outcome."""
        if not tracked.held and tracked in self.open:
            tracked.held = True
            self.held += 1

    def release(self, tracked: Tracked, outcome: StreamOutcome) -> None:
        if self.open.pop(tracked, 0) is not None:
            return  # already released
        self.outcomes[outcome.value] += 1
        if tracked.held:
            tracked.held = False
            self.held -= 1
            if not self.held:
                self._inflight.emptied()

    def interrupt_all(self) -> None:
        """End every open stream (the shutdown reached them)."""
        self.ended = True
        for tracked in list(self.open):
            tracked.interrupt()

    def report(self) -> dict[str, int]:
        counts = dict(self.outcomes)
        if self.open:
            # still open: a consumer that ignored the cancellation (or never came back)
            counts["open"] = len(self.open)
        return counts
