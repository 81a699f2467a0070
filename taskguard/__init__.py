"""taskguard: background work in async servers that survives graceful shutdown.

Work that must finish is awaited, work that may die is cancelled, streams end
promptly, shutdown steps run in order, all bounded by an exit wait and reported.
"""

from __future__ import annotations

from ._config import GroupConfig, GuardConfig
from ._current import current, durable, durable_context, guarded, on_shutdown, spawn
from ._durable import DurableContext, DurableFunction  # durable:
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
from ._journal import Journal, JournalError  # durable:
from ._report import (
    DurableReport,
    GroupReport,
    GuardStats,
    HookReport,
    SectionReport,
    ShutdownReport,
    State,
    StuckTask,
)
from ._runner import run
from ._streams import GuardedStream, StreamOutcome, StreamResult

__version__ = "0.1.0"

__all__ = [
    "ConsumerDisconnected",
    "ConsumerStalled",
    "DurableContext",
    "DurableFunction",
    "DurableReport",
    "GroupConfig",
    "GroupFullError",
    "GroupReport",
    "GuardConfig",
    "GuardStats",
    "Guarded",
    "GuardedStream",
    "HookReport",
    "Journal",
    "JournalError",
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
    "durable",
    "durable_context",
    "guarded",
    "on_shutdown",
    "run",
    "spawn",
]
