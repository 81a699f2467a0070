"""The shutdown sequence, run by the guard's own supervisor task.

draining (ready=False, drain_delay) → before_drain hooks → streams end →
cancel groups cancelled, drain groups / pending work / guarded sections awaited
(each group within its timeout, all within the exit wait; see ``_deadlines``)
→ stopping (cancel what is left, wait cancel_grace, abandon and report what
still runs) → after_drain hooks and resources, last first → closed (report
built and logged).

The supervisor survives its own bookkeeping errors: every step runs on its
own; a fault is logged, recorded in ``report.errors`` (so the report is not
clean), and the sequence carries on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio

from ._config import HOOK_ABANDON_GRACE, GuardConfig
from ._deadlines import Deadlines, let_cancellations_land
from ._hooks import Stage, run_hook
from ._report import HookReport, ShutdownReport, State, StuckTask

if TYPE_CHECKING:
    from ._backends import Backend
    from ._groups import Group, Groups
    from ._hooks import Hook, Hooks
    from ._inflight import InFlight
    from ._journal._manager import DurableManager
    from ._sections import Sections
    from ._stream_registry import Streams

__all__ = ["Run", "Shutdown", "record_fault", "safe_log"]

logger = logging.getLogger("taskguard")

#: how often the drain logs what it is still waiting for
PROGRESS_INTERVAL = 1.0


def record_fault(errors: list[str], what: str, exc: BaseException) -> None:
    """A fault of the run's own bookkeeping (not of a task or hook): logged if
    logging works, recorded for ``report.errors`` (the report is then not clean),
    and survived: whoever calls this carries on."""
    errors.append(f"{what}: {type(exc).__name__}: {exc}")
    safe_log(errors, logging.ERROR, "taskguard: %s failed; carrying on", what, exc_info=exc)


def safe_log(
    errors: list[str], level: int, msg: str, *args: Any, exc_info: BaseException | None = None
) -> None:
    """Log on the ``taskguard`` logger; a user's handler that raises is recorded, once."""
    try:
        logger.log(level, msg, *args, exc_info=exc_info)
    except Exception as exc:
        if not any(e.startswith("logging:") for e in errors):
            errors.append(f"logging: {type(exc).__name__}: {exc}")


@dataclass(eq=False)
class Run:
    """The parts of one guard run that the sequence works on."""

    config: GuardConfig
    backend: Backend
    groups: Groups
    inflight: InFlight
    sections: Sections
    streams: Streams
    hooks: Hooks
    set_state: Callable[[State], None]
    #: at the trigger (on the loop): arm the hard deadline, the trigger callbacks
    on_trigger: Callable[[], None]
    #: as the guard closes: close the resources, give the signals back
    on_close: Callable[[], None]
    #: the durable tasks' manager, if the guard has one (it is made on first use)
    durable: Callable[[], DurableManager | None] = lambda: None
    #: faults of the run's own bookkeeping (see record_fault): the report's errors
    errors: list[str] = field(default_factory=list)


class Shutdown:
    """State of one guard run's shutdown: the trigger, the deadlines, the phases."""

    def __init__(self, run: Run) -> None:
        self.run_parts = run
        self.triggered = anyio.Event()
        self.closed = anyio.Event()
        #: set when intake should stop: drain_delay after the trigger (or at close)
        self.intake_stop = anyio.Event()
        self.reason = ""
        self.forced = False
        self.deadline = math.inf  # loop time of the exit wait's end
        self.budget_end = math.inf  # loop time by which the whole sequence must end
        self.started = 0.0
        self.started_at = datetime.now(timezone.utc)
        self.phases: dict[str, float] = {}
        self.hook_reports: list[HookReport] = []
        self.stuck: list[StuckTask] = []
        self.errors = run.errors
        self.report: ShutdownReport | None = None
        self._phase_start = 0.0

    # -- triggers ----------------------------------------------------------------

    def request(self, reason: str, force: bool) -> None:
        """Start shutdown (first call wins the reason); ``force`` ends the drain now.
        On the loop thread."""
        run = self.run_parts
        if not self.triggered.is_set():
            self.reason = reason
            # not anyio.current_time(): this may run in a loop callback (a signal,
            # a thread, a task's end), where anyio finds no event loop
            self.started = run.backend.time()
            self.started_at = datetime.now(timezone.utc)
            cfg = run.config
            self.deadline = self.started + cfg.exit_wait_timeout
            self.budget_end = self.started + run.hooks.budget()
            run.groups.triggered(self.set_group_deadline)
            run.set_state(State.DRAINING)
            self.triggered.set()
            try:
                run.on_trigger()
            except Exception as exc:
                self._fault("a shutdown trigger callback", exc)
        if force and not self.forced and not self.closed.is_set():
            self.forced = True
            run.inflight.poke()

    def set_group_deadline(self, grp: Group) -> None:
        """A drain group's timeout counts from the trigger (also for one made later)."""
        timeout = grp.config.timeout
        if grp.drains and timeout is not None:
            grp.deadline = self.started + timeout

    # -- the sequence ------------------------------------------------------------

    async def run(self) -> None:
        run = self.run_parts
        try:
            await self.triggered.wait()
            self._log(logging.INFO, "shutdown started: %s", self.reason)
            self._phase_start = self.started
            await self._step("the drain", self._drain_phase)
            await self._step("the stopping phase", self._stopping_phase)
            durable = run.durable()
            if durable is not None:  # write what is pending, give back the leases
                await self._step("closing the journal", durable.close)
            await self._step("the after_drain hooks", self._after_drain_phase)
        finally:
            if not self.triggered.is_set():  # the event loop is ending under the guard
                self.request("the event loop ended", force=True)
            try:
                self._close()
            finally:
                run.set_state(State.CLOSED)
                self.intake_stop.set()
                self.closed.set()

    async def _step(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as exc:
            self._fault(what, exc)

    def _fault(self, what: str, exc: BaseException) -> None:
        record_fault(self.errors, what, exc)

    def _log(self, level: int, msg: str, *args: Any, exc_info: BaseException | None = None) -> None:
        safe_log(self.errors, level, msg, *args, exc_info=exc_info)

    def _end_phase(self, name: str) -> None:
        now = anyio.current_time()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._phase_start)
        self._phase_start = now

    def _idle(self) -> bool:
        return self.run_parts.inflight.idle()

    async def _sleep_until(self, when: float) -> None:
        """Sleep until ``when`` (loop time, at most the exit wait), cut short by force."""
        while not self.forced:
            delay = min(when, self.deadline) - anyio.current_time()
            if delay <= 0:
                return
            wake = self.run_parts.inflight.arm()
            with anyio.move_on_after(delay):
                await wake.wait()

    # -- draining ----------------------------------------------------------------

    async def _drain_phase(self) -> None:
        run = self.run_parts
        cfg = run.config
        deadlines = Deadlines(
            run.groups,
            cfg.cancel_grace,
            self._abandon_tasks,
            self._log_cut,
            self._fault,
            self._save_cut,
        )
        async with anyio.create_task_group() as keeper:
            # The deadlines are kept beside the sequence from the trigger on, so a
            # group's timeout holds during drain_delay and the before_drain hooks.
            keeper.start_soon(deadlines.keep)
            try:
                if cfg.drain_delay:
                    await self._sleep_until(self.started + cfg.drain_delay)
                    self._end_phase("drain_delay")
                self.intake_stop.set()
                await self._step("the before_drain hooks", self._before_drain)
                self._end_phase("before_drain")
                await self._step("ending the streams", self._end_streams)
                await self._save_cut({g.name for g in run.groups.values() if not g.drains})
                for grp in list(run.groups.values()):
                    if not grp.drains:
                        grp.cancel_all(cut=False)
                        deadlines.unwind(grp)
                await let_cancellations_land()
                await self._step("waiting for the drain", self._wait_drained)
            finally:
                keeper.cancel_scope.cancel()
        self._end_phase("drain")

    async def _before_drain(self) -> None:
        await self._run_hooks("before_drain", lambda: self.deadline)

    async def _end_streams(self) -> None:
        streams = self.run_parts.streams
        if streams.open and self.run_parts.config.stream_grace:
            await self._sleep_until(anyio.current_time() + self.run_parts.config.stream_grace)
        # Streams end before the drain waits on anything: an open stream would
        # otherwise hold its request (and so the drain) until it ends.
        streams.interrupt_all()

    async def _wait_drained(self) -> None:
        next_log = anyio.current_time() + PROGRESS_INTERVAL
        while not self._idle() and not self.forced:
            now = anyio.current_time()
            if now >= self.deadline:
                return
            if now >= next_log:
                self._log_progress(now)
                next_log = now + PROGRESS_INTERVAL
            wake = self.run_parts.inflight.arm()
            if self._idle():
                return
            with anyio.move_on_after(min(self.deadline, next_log) - now):
                await wake.wait()

    def _log_progress(self, now: float) -> None:
        items = self.outstanding()
        desc = ", ".join(f"{name} ({where}) {age:.1f}s" for name, where, age in items[:5])
        left = len(items) + sum(len(grp.pending) for grp in self.run_parts.groups.values())
        self._log(
            logging.INFO,
            "draining: %d left, oldest: %s; %.1fs to the deadline",
            left,
            desc or "-",
            self.deadline - now,
        )

    def describe_left(self) -> list[str]:
        """What still runs, and what was given up on, with stacks (a hard exit's log)."""
        lines = [
            f"  still running: {name} ({where}) for {age:.1f}s"
            for name, where, age in self.outstanding()
        ]
        for item in self.stuck:
            lines.append(f"  stuck: {item.name} ({item.group}) for {item.age:.1f}s")
            lines.extend("    " + ln for ln in item.stack.rstrip().splitlines())
        return lines

    def outstanding(self) -> list[tuple[str, str, float]]:
        """What still runs as (name, where, age), the oldest first."""
        run = self.run_parts
        now = time.monotonic()
        items = [
            (h.name, f"group {grp.name}", now - h._started)
            for grp in list(run.groups.values())
            for h in list(grp.running)
        ]
        items += run.sections.outstanding()
        items.sort(key=lambda item: -item[2])
        return items

    async def _save_cut(self, groups: set[str] | None) -> None:
        """Journal the ``journal_on="cut"`` durable tasks of ``groups`` (all: None)
        before they are cancelled, so the next start resumes them."""
        durable = self.run_parts.durable()
        if durable is not None:
            try:
                await durable.save_cut(groups)
            except Exception as exc:  # the cut goes on: an unsaved task is reported
                self._fault("saving the cut durable tasks", exc)

    def _log_cut(self, grp: Group) -> None:
        self._log(
            logging.WARNING,
            "group %r: timeout %.3gs reached, cancelling %d task(s)",
            grp.name,
            grp.config.timeout,
            len(grp),
        )

    # -- stopping ----------------------------------------------------------------

    async def _stopping_phase(self) -> None:
        run = self.run_parts
        run.set_state(State.STOPPING)
        if self._idle():
            self._end_phase("stopping")
            return
        if self.forced:
            self._log(logging.WARNING, "shutdown forced: cancelling what is left")
        else:
            self._log(
                logging.WARNING,
                "exit wait of %gs reached: cancelling what is left",
                run.config.exit_wait_timeout,
            )
        await self._save_cut(None)
        for grp in list(run.groups.values()):
            grp.cancel_all(cut=True)
        run.sections.cut_all()
        run.streams.interrupt_all()
        await let_cancellations_land()
        grace_end = anyio.current_time() + run.config.cancel_grace
        while True:
            wake = run.inflight.arm()  # before the check: a thread's exit now wakes it
            delay = grace_end - anyio.current_time()
            if self._idle() or delay <= 0:
                break
            with anyio.move_on_after(delay):
                await wake.wait()
        for grp in list(run.groups.values()):
            self._abandon_tasks(grp)
        stuck = run.sections.abandon_all()
        self.stuck.extend(stuck)
        for item in stuck:
            self._log_stuck(item)
        self._end_phase("stopping")

    def _abandon_tasks(self, grp: Group) -> None:
        """Give up on the group's running tasks (cancelled, past the cancel grace)."""
        now = time.monotonic()
        for handle in list(grp.running):
            stack = self.run_parts.backend.task_stack(handle._task)
            item = StuckTask(
                name=handle.name, group=grp.name, age=now - handle._started, stack=stack
            )
            self.stuck.append(item)
            grp.abandon(handle)
            self._log_stuck(item)

    def _log_stuck(self, item: StuckTask) -> None:
        self._log(
            logging.ERROR,
            "abandoned %s (%s) after %.1fs; it ignored cancellation. Stack:\n%s",
            item.name,
            item.group,
            item.age,
            item.stack,
        )

    # -- hooks -------------------------------------------------------------------

    async def _after_drain_phase(self) -> None:
        # Bounded by the budget fixed at the trigger (the hard deadline's, minus
        # its slack): hooks registered during the drain run in what is left.
        await self._run_hooks("after_drain", lambda: self.budget_end)
        self._end_phase("after_drain")

    async def _run_hooks(self, stage: Stage, until: Callable[[], float]) -> None:
        run = self.run_parts
        done: set[Hook] = set()
        while (hook := run.hooks.next(stage, done)) is not None:
            done.add(hook)
            left = until() - anyio.current_time()
            if stage == "after_drain":  # keep back what the step may take past its timeout
                left -= hook.backstop + HOOK_ABANDON_GRACE
            if left <= 0:
                self.hook_reports.append(
                    HookReport(
                        name=hook.name,
                        stage=stage,
                        outcome="timeout",
                        duration=0.0,
                        error="not run: no time was left of the shutdown's budget",
                    )
                )
                continue
            limit = min(hook.timeout, left)
            self.hook_reports.append(await run_hook(hook, limit + hook.backstop, run.backend))
        run.hooks.stage_done(stage)

    # -- closed ------------------------------------------------------------------

    def _close(self) -> None:
        run = self.run_parts
        try:
            run.on_close()
        except Exception as exc:
            self._fault("closing the resources and signal handlers", exc)
        report = self._report()
        try:
            text = report.summary()
            level = logging.INFO if report.clean else logging.WARNING
        except Exception as exc:
            self._fault("formatting the report's summary", exc)
            report = report.model_copy(update={"errors": list(self.errors)})
            text, level = f"taskguard shutdown: {report!r}", logging.WARNING
        self._log(level, "%s", text)
        if len(self.errors) != len(report.errors):  # logging failed just now
            report = report.model_copy(update={"errors": list(self.errors)})
        self.report = report

    def _report(self) -> ShutdownReport:
        """The report, from whatever parts can still describe themselves.

        Each part is asked on its own, so one broken part costs its own field,
        not the report; the build is tried once more (a model error may be
        passing), then falls back to the bare facts.
        """
        run = self.run_parts
        fields: dict[str, Any] = {
            "trigger": self.reason,
            "started_at": self.started_at,
            "duration": max(0.0, run.backend.time() - self.started),
            "phases": self.phases,
            "forced": self.forced,
            "hooks": self.hook_reports,
            "stuck": self.stuck,
        }
        parts: dict[str, Callable[[], Any]] = {
            "groups": lambda: {name: grp.report() for name, grp in run.groups.items()},
            "guarded": run.sections.report,
            "streams": run.streams.report,
            "warnings": lambda: list(run.hooks.warnings),
            "durable": lambda: None if (d := run.durable()) is None else d.report(),
        }
        for key, part in parts.items():
            try:
                fields[key] = part()
            except Exception as exc:
                self._fault(f"reporting {key}", exc)
        for _ in range(2):
            try:
                return ShutdownReport(**fields, errors=list(self.errors))
            except Exception as exc:
                self._fault("building the report", exc)
        return ShutdownReport(
            trigger=str(self.reason),
            started_at=self.started_at,
            duration=fields["duration"],
            errors=list(self.errors),
        )
