"""The in-flight count: what the drain waits for, and its wake-up.

Running and pending tasks, open async ``guarded()`` sections and streams the
drain holds each count one. Worker-thread sections are counted apart (by the
sections, under a lock) and wake the drain through :meth:`InFlight.poke`.
"""

from __future__ import annotations

import anyio

__all__ = ["InFlight"]


class InFlight:
    """The live count of one guard run, and the event that wakes the drain.

    This is the only writer of ``count`` (don't modify it directly): groups,
    sections and streams call :meth:`add` and :meth:`done`. The supervisor arms
    a fresh event with :meth:`arm` before each wait; ``done`` sets it when the
    count drops to zero, :meth:`poke` sets it for any other reason to look again
    (a forced shutdown, the last thread section closing, a deadline passing).
    """

    __slots__ = ("_wake", "count")

    def __init__(self) -> None:
        self.count = 0
        self._wake: anyio.Event | None = None  # None until the shutdown starts waiting

    def __repr__(self) -> str:
        return f"<InFlight count={self.count}>"

    def add(self) -> None:
        self.count += 1

    def done(self) -> None:
        self.count -= 1
        if not self.count and self._wake is not None:
            self._wake.set()

    def arm(self) -> anyio.Event:
        """A fresh wake-up event for the next wait of the supervisor (on the loop)."""
        wake = self._wake = anyio.Event()
        return wake

    def poke(self) -> None:
        """Wake the waiting supervisor (on the loop thread)."""
        if self._wake is not None:
            self._wake.set()
