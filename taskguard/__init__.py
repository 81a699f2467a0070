"""taskguard: background work in async servers that survives graceful shutdown.

Work that must finish is awaited, work that may die is cancelled, streams end
promptly, shutdown steps run in order, all bounded by an exit wait and reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import GroupConfig, GuardConfig
from ._current import current, guarded, on_shutdown, spawn
from ._exceptions import (
    ConsumerDisconnected,
    ConsumerStalled,
    GroupFullError,
    NoGuardError,
    NotStartedError,
    ShuttingDownError,
    StreamError,
    StreamInterrupted,
    TaskCancelledError,
    TaskGuardError,
)
from ._guard import TaskGuard
from ._guarded import Guarded
from ._handle import TaskHandle
from ._report import (
    GroupReport,
    GuardStats,
    HookReport,
    SectionReport,
    ShutdownReport,
    State,
    StuckTask,
)
from ._runner import run

if TYPE_CHECKING:
    from ._streams import GuardedStream, StreamOutcome, StreamResult

__version__ = "0.1.0"

__all__ = [
    "ConsumerDisconnected",
    "ConsumerStalled",
    "GroupConfig",
    "GroupFullError",
    "GroupReport",
    "GuardConfig",
    "GuardStats",
    "Guarded",
    "GuardedStream",
    "HookReport",
    "NoGuardError",
    "NotStartedError",
    "SectionReport",
    "ShutdownReport",
    "ShuttingDownError",
    "State",
    "StreamError",
    "StreamInterrupted",
    "StreamOutcome",
    "StreamResult",
    "StuckTask",
    "TaskCancelledError",
    "TaskGuard",
    "TaskGuardError",
    "TaskHandle",
    "__version__",
    "current",
    "guarded",
    "on_shutdown",
    "run",
    "spawn",
]


def __getattr__(name: str) -> Any:
    # The streams module is imported on first use: `import taskguard` stays lighter
    # for code that has no streams (taskguard.asgi and taskguard.grpc import it).
    if name in ("GuardedStream", "StreamOutcome", "StreamResult"):
        from . import _streams

        value = globals()[name] = getattr(_streams, name)
        return value
    raise AttributeError(f"module 'taskguard' has no attribute {name!r}")
