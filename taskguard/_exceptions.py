"""The errors taskguard raises.

Every error derives from :class:`TaskGuardError` and also from the builtin that
fits it, so code that already catches ``RuntimeError`` or ``TimeoutError`` keeps
working.
"""

from __future__ import annotations

__all__ = [
    "ConsumerDisconnected",
    "ConsumerStalled",
    "GroupFullError",
    "NoGuardError",
    "NotStartedError",
    "ShuttingDownError",
    "StreamError",
    "StreamInterrupted",
    "TaskCancelledError",
    "TaskGuardError",
]


class TaskGuardError(Exception):
    """Base class of every error raised by taskguard."""


class ShuttingDownError(TaskGuardError, RuntimeError):
    """The guard is shutting down and refuses new work.

    Raised by ``spawn`` into a ``cancel`` group once draining has begun, by every
    ``spawn`` and new ``guarded()`` section from the stopping phase on, and when a
    guarded section is cut at the shutdown deadline (so the code after the block
    never proceeds as if the block had completed).
    """


class NotStartedError(TaskGuardError, RuntimeError):
    """The guard has not been started yet (enter it with ``async with guard:``)."""


class NoGuardError(TaskGuardError, LookupError):
    """``taskguard.current()`` found no running guard."""


class GroupFullError(TaskGuardError, RuntimeError):
    """A group's ``pending_limit`` is reached; the spawn was refused."""


class TaskCancelledError(TaskGuardError, RuntimeError):
    """The task behind a :class:`TaskHandle` was cancelled.

    ``await handle.wait()`` raises this instead of a bare cancellation exception,
    which the waiter would mistake for its own cancellation.
    """


class StreamError(TaskGuardError):
    """Base class of the errors that end a guarded stream (``raise_on_end=True``)."""

    #: how many items were sent before the stream ended (a resume point)
    sent: int = 0


class StreamInterrupted(StreamError, ShuttingDownError):
    """The stream was ended because the guard is shutting down."""


class ConsumerDisconnected(StreamError, ConnectionError):
    """The consumer went away (the connection was closed or reset)."""


class ConsumerStalled(StreamError, TimeoutError):
    """The consumer stopped reading: a send took longer than ``send_timeout``."""
