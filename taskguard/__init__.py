"""taskguard: background work in async servers that survives graceful shutdown.

Work that must finish is awaited, work that may die is cancelled, streams end
promptly, shutdown steps run in order, all bounded by an exit wait and reported.
"""

from __future__ import annotations

import typing as _typing

from ._config import GroupConfig, GuardConfig, GuardOptions
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
    DurableReport,
    GroupReport,
    GroupStats,
    GuardStats,
    HookReport,
    SectionReport,
    ShutdownReport,
    State,
    StuckTask,
)
from ._runner import run
from ._stream_registry import StreamOutcome, StreamResult
from ._streams import GuardedStream

if _typing.TYPE_CHECKING:  # durable: imported on first use (import taskguard stays as fast)
    from ._durable import DurableContext, DurableFunction, durable, durable_context
    from ._journal import Journal, JournalError

__version__ = "0.1.0"

# durable: the durable-task names, resolved on first access (PEP 562): their
# modules build pydantic adapters and dataclasses, which an app without
# durable tasks should not pay for at import.
_LAZY = {
    "DurableContext": "._durable",
    "DurableFunction": "._durable",
    "durable": "._durable",
    "durable_context": "._durable",
    "Journal": "._journal",
    "JournalError": "._journal",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskguard' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ConsumerDisconnected",
    "ConsumerStalled",
    "DurableContext",
    "DurableFunction",
    "DurableReport",
    "GroupConfig",
    "GroupFullError",
    "GroupReport",
    "GroupStats",
    "GuardConfig",
    "GuardOptions",
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
