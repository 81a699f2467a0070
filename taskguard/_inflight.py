"""What the drain waits for, and its wake-up.

Each part of a run keeps its own record of the work in flight — a group its
running and pending tasks, the sections their open sections, the streams the
ones the drain holds — and no one keeps a count beside them (a count written
from five modules once drifted from the truth). :class:`InFlight` asks the
parts whether anything is left, and wakes the waiting supervisor when a part
that just emptied was the last one busy.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["InFlight"]


class InFlight:
    """The drain's view of one guard run: idle when no part has work in flight.

    Parts register a ``busy()`` question with :meth:`watch` and call
    :meth:`emptied` when their own record of work in flight becomes empty (a
    cheap call: it does nothing unless the supervisor waits). The supervisor
    arms a fresh event with :meth:`arm` before each wait; :meth:`poke` wakes it
    for any other reason to look again (a forced shutdown, a thread section
    closing on another thread, a deadline).
    """

    __slots__ = ("_parts", "_wake")

    def __init__(self) -> None:
        self._parts: list[Callable[[], bool]] = []
        self._wake: anyio.Event | None = None  # None until the shutdown starts waiting

    def watch(self, busy: Callable[[], bool]) -> None:
        """Count ``busy()`` (true while the part has work in flight) in :meth:`idle`."""
        self._parts.append(busy)

    @property
    def waiting(self) -> bool:
        """Whether the supervisor has started waiting (readable from any thread: a
        part on another thread needs to wake the loop only from then on)."""
        return self._wake is not None

    def idle(self) -> bool:
        return not any(busy() for busy in self._parts)

    def emptied(self) -> None:
        """A part's work in flight just became empty: wake the supervisor if it
        waits and nothing else is left (on the loop thread)."""
        if self._wake is not None and self.idle():
            self._wake.set()

    def arm(self) -> anyio.Event:
        """A fresh wake-up event for the next wait of the supervisor (on the loop)."""
        wake = self._wake = anyio.Event()
        return wake

    def poke(self) -> None:
        """Wake the waiting supervisor (on the loop thread)."""
        if self._wake is not None:
            self._wake.set()
