"""The shutdown report and the stats snapshot: pydantic models, JSON-ready."""

from __future__ import annotations

import enum
import logging
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

__all__ = [
    "DurableReport",
    "GroupReport",
    "GroupStats",
    "GuardStats",
    "HookReport",
    "SectionReport",
    "ShutdownReport",
    "State",
    "StuckTask",
]


class State(str, enum.Enum):
    """Lifecycle of a guard: ``idle → running → draining → stopping → closed``."""

    IDLE = "idle"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


class _Model(BaseModel):
    # defer_build: the validators are built on first use, not by `import taskguard`
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: Any) -> Any:
        # The JSON of a report carries its computed fields (clean, failures, ...);
        # reading it back recomputes them (extra="forbid" would refuse them).
        computed = cls.model_computed_fields
        if computed and isinstance(data, dict) and any(k in data for k in computed):
            data = {k: v for k, v in data.items() if k not in computed}
        return _json_safe(data)


def _json_safe(value: Any) -> Any:
    """``value`` with every string made encodable as UTF-8: a lone surrogate (a name
    from ``os.fsdecode``, an exception's text) is escaped (``\\udcff``), so the
    report stays JSON-ready whatever names the app used."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class _EncodableLines(logging.Filter):
    """Log lines of the ``taskguard`` logger made UTF-8 encodable: a name with a lone
    surrogate would make a UTF-8 handler fail with "--- Logging error ---" and
    lose the line (and break tools that ship log records, as pytest-xdist does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True  # a bad format: logging reports it as it always does
        if not text.isascii():
            safe = _json_safe(text)
            if safe is not text:
                record.msg, record.args = safe, ()
        return True


logging.getLogger("taskguard").addFilter(_EncodableLines())


class GroupReport(_Model):
    """What happened to one group's tasks over the guard's life."""

    policy: str
    completed: int = 0
    failed: int = 0
    #: cancelled for any reason (a cancel group at shutdown, ``handle.cancel()``, a deadline)
    cancelled: int = 0
    #: of the cancelled: drain-group tasks cut by a deadline or a forced shutdown
    cut: int = 0
    #: spawns that raised at their call site (shutting down, group full)
    refused: int = 0
    #: still running when the guard gave up on them
    stuck: int = 0


class SectionReport(_Model):
    """``guarded()`` sections over the guard's life."""

    #: ended (normally, or by an exception of its own)
    completed: int = 0
    #: ended by a cancellation from outside the section (not the guard's deadline)
    cancelled: int = 0
    #: cut by a deadline or a forced shutdown (they raised ShuttingDownError)
    cut: int = 0
    #: still open when the guard closed (a worker thread cannot be cancelled)
    stuck: int = 0


class HookReport(_Model):
    """One shutdown hook or resource exit."""

    name: str
    stage: str
    #: "ok", "error" or "timeout"
    outcome: str
    duration: float
    error: str | None = None


class StuckTask(_Model):
    """Work still running when the guard gave up on it."""

    name: str
    group: str
    #: seconds since it started
    age: float
    stack: str


# durable: the counts of durable tasks (taskguard/_journal/_manager.py builds it)
class DurableReport(_Model):
    """Durable tasks over the guard's run (present when a journal is configured)."""

    #: the journal URL, without its password
    journal: str
    #: entries written ahead at spawn (acknowledged)
    journaled: int = 0
    #: entries of an earlier run or a dead process, claimed and run here
    resumed: int = 0
    completed: int = 0
    #: failed attempts that were retried
    retried: int = 0
    #: ``journal_on="cut"`` tasks written as the deadline cut them
    saved_at_cut: int = 0
    #: moved to the dead-letter table after their last attempt failed
    dead_lettered: int = 0


class ShutdownReport(_Model):
    """What happened during shutdown. ``clean`` is about the shutdown itself."""

    trigger: str
    started_at: datetime
    #: seconds from the trigger to closed
    duration: float
    #: seconds spent in each phase, in order
    phases: dict[str, float] = Field(default_factory=dict)
    forced: bool = False
    groups: dict[str, GroupReport] = Field(default_factory=dict)
    guarded: SectionReport = SectionReport.model_construct()  # no model build at import
    hooks: list[HookReport] = Field(default_factory=list)
    #: streams by outcome ("completed", "interrupted", "disconnected", ...)
    streams: dict[str, int] = Field(default_factory=dict)
    stuck: list[StuckTask] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    #: faults in the shutdown sequence's own bookkeeping (a logging handler or a
    #: trigger callback that raised, ...): the sequence carried on past them
    errors: list[str] = Field(default_factory=list)
    #: durable tasks, when a journal is configured  # durable:
    durable: DurableReport | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failures(self) -> int:
        """Background tasks that raised (counted beside ``clean``, not in it)."""
        return sum(g.failed for g in self.groups.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def clean(self) -> bool:
        """Nothing stuck, no hook failed or timed out, no drain work or guarded section
        cut, and the sequence itself ran without a fault."""
        return (
            not self.errors
            and not self.stuck
            and all(h.outcome == "ok" for h in self.hooks)
            and not any(g.cut for g in self.groups.values())
            and not self.guarded.cut
            and not self.guarded.stuck
        )

    def summary(self) -> str:
        """A few lines for a human (this is what the guard logs when it closes)."""
        head = "clean" if self.clean else "NOT CLEAN"
        lines = [
            f"taskguard shutdown {head}: trigger={self.trigger}, took {self.duration:.3f}s"
            + (" (forced)" if self.forced else "")
        ]
        if self.phases:
            lines.append(
                "  phases: " + ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in self.phases.items())
            )
        for name, g in self.groups.items():
            parts = [f"{k}={v}" for k, v in g.model_dump().items() if k != "policy" and v]
            lines.append(f"  group {name} ({g.policy}): " + (", ".join(parts) or "no tasks"))
        s = self.guarded
        if s.completed or s.cancelled or s.cut or s.stuck:
            parts = [f"{k}={v}" for k, v in s.model_dump().items() if v]
            lines.append("  guarded: " + ", ".join(parts))
        if self.streams:
            lines.append(
                "  streams: " + ", ".join(f"{k}={v}" for k, v in sorted(self.streams.items()))
            )
        for h in self.hooks:
            err = f" ({h.error})" if h.error else ""
            lines.append(f"  hook {h.stage}:{h.name} {h.outcome} in {h.duration * 1000:.0f}ms{err}")
        for t in self.stuck:
            lines.append(f"  STUCK {t.name} (group {t.group}, running {t.age:.1f}s)")
            lines.extend("    " + ln for ln in t.stack.rstrip().splitlines())
        if self.durable is not None:  # durable:
            d = self.durable
            counts = ", ".join(f"{k}={v}" for k, v in d.model_dump().items() if k != "journal")
            lines.append(f"  durable ({d.journal}): {counts}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        lines.extend(f"  ERROR in the shutdown sequence: {e}" for e in self.errors)
        if self.failures:
            lines.append(f"  background failures: {self.failures}")
        return "\n".join(lines)


class GroupStats(_Model):
    """A live snapshot of one group."""

    policy: str
    running: int
    pending: int
    limit: int | None


class GuardStats(_Model):
    """A live snapshot of a guard, for metrics endpoints (``guard.stats()``)."""

    state: State
    ready: bool
    groups: dict[str, GroupStats]
    guarded: int
    streams: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def running(self) -> int:
        return sum(g.running for g in self.groups.values())

    @computed_field  # type: ignore[prop-decorator]
    @property
    def pending(self) -> int:
        return sum(g.pending for g in self.groups.values())
