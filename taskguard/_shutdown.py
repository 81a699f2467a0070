"""The shutdown sequence, run by the guard's own supervisor task.

draining (ready=False, drain_delay) → before_drain hooks → streams end →
cancel groups cancelled, drain groups / pending work / guarded sections awaited
(each group within its timeout, all within the exit wait; a task cancelled here
is abandoned if it has not ended within cancel_grace) → stopping (cancel
what is left, wait cancel_grace, abandon and report what still runs) →
after_drain hooks and resources, last first → closed (report built and logged).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._hooks import Hook, run_hook
from ._report import HookReport, SectionReport, ShutdownReport, State, StuckTask

if TYPE_CHECKING:
    from ._groups import Group
    from ._guard import TaskGuard

__all__ = ["Shutdown"]

logger = logging.getLogger("taskguard")

#: how often the drain logs what it is still waiting for
PROGRESS_INTERVAL = 1.0


class Shutdown:
    """State of one guard's shutdown: the trigger, the deadline, the phases."""

    def __init__(self, guard: TaskGuard) -> None:
        self.guard = guard
        self.triggered = anyio.Event()
        self.closed = anyio.Event()
        #: set when intake should stop: drain_delay after the trigger (or forced)
        self.intake_stop = anyio.Event()
        self.reason = ""
        self.forced = False
        self.deadline = math.inf
        self.started = 0.0
        self.started_at = datetime.now(timezone.utc)
        self.phases: dict[str, float] = {}
        self.hook_reports: list[HookReport] = []
        self.stuck: list[StuckTask] = []
        self._stages_done: set[str] = set()
        self._phase_start = 0.0

    # -- triggers ----------------------------------------------------------------

    def request(self, reason: str, force: bool) -> None:
        """Start shutdown (first call wins the reason); ``force`` ends the drain now."""
        guard = self.guard
        if not self.triggered.is_set():
            assert guard._backend is not None
            self.reason = reason
            # not anyio.current_time(): this may run in a loop callback (a signal,
            # a thread, a task's done callback), where anyio finds no event loop
            self.started = guard._backend.time()
            self.started_at = datetime.now(timezone.utc)
            self.deadline = self.started + guard.config.exit_wait_timeout
            guard._state = State.DRAINING
            self.triggered.set()
            for callback in guard._trigger_callbacks:
                try:
                    callback(guard)
                except Exception:
                    logger.exception("a shutdown trigger callback failed")
        if force and not self.forced and guard._state is not State.CLOSED:
            self.forced = True
            guard._poke()

    def stage_done(self, stage: str) -> bool:
        return stage in self._stages_done

    # -- the sequence ------------------------------------------------------------

    async def run(self) -> None:
        guard = self.guard
        try:
            await self.triggered.wait()
            logger.info("shutdown started: %s", self.reason)
            guard._wake = anyio.Event()
            self._phase_start = self.started
            await self._drain_phase()
            await self._stopping_phase()
            if guard._durable is not None:  # durable: write pending, give back leases
                await guard._durable.close()
            await self._after_drain_phase()
        finally:
            if not self.triggered.is_set():  # the event loop is ending under the guard
                self.request("the event loop ended", force=True)
            try:
                self._close()
            finally:
                guard._state = State.CLOSED
                self.intake_stop.set()
                self.closed.set()

    def _end_phase(self, name: str) -> None:
        now = anyio.current_time()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._phase_start)
        self._phase_start = now

    async def _sleep_until(self, when: float) -> None:
        """Sleep until ``when`` (loop time), cut short by a forced shutdown."""
        while not self.forced:
            delay = min(when, self.deadline) - anyio.current_time()
            if delay <= 0:
                return
            self._rearm()
            with anyio.move_on_after(delay):
                await self._wait_wake()

    def _rearm(self) -> None:
        self.guard._wake = anyio.Event()

    async def _wait_wake(self) -> None:
        wake = self.guard._wake
        assert wake is not None
        await wake.wait()

    async def _drain_phase(self) -> None:
        guard, cfg = self.guard, self.guard.config
        if cfg.drain_delay:
            await self._sleep_until(self.started + cfg.drain_delay)
            self._end_phase("drain_delay")
        self.intake_stop.set()
        await _let_cancellations_land()  # the servers waiting on it stop intake first
        await self._run_hooks("before_drain", bounded=True)
        self._end_phase("before_drain")
        # Streams end first, before the drain waits on anything: an open stream
        # would otherwise hold its request (and so the drain) until it ends.
        if guard._streams:
            if cfg.stream_grace:
                await self._sleep_until(anyio.current_time() + cfg.stream_grace)
            for stream in list(guard._streams):
                stream._interrupt()
        # Cancelled tasks get cancel_grace to unwind; one that ignores its
        # cancellation is abandoned then, rather than holding the drain (and so
        # the whole shutdown) until the exit wait.
        unwind_by: dict[Group, float] = {}
        if guard._durable is not None:  # durable: save "cut" tasks before they are cancelled
            await guard._durable.save_cut({g.name for g in guard._groups.values() if not g.drains})
        for grp in guard._groups.values():
            if not grp.drains:
                grp.cancel_all(cut=False)
                if grp.running:
                    unwind_by[grp] = anyio.current_time() + cfg.cancel_grace
        if unwind_by:
            await _let_cancellations_land()
        await self._wait_drained(unwind_by)
        self._end_phase("drain")

    async def _wait_drained(self, unwind_by: dict[Group, float]) -> None:
        guard, cancel_grace = self.guard, self.guard.config.cancel_grace
        group_deadlines = {
            grp: self.started + grp.config.timeout
            for grp in guard._groups.values()
            if grp.drains and grp.config.timeout is not None
        }
        next_log = anyio.current_time() + PROGRESS_INTERVAL
        while not guard._idle() and not self.forced:
            now = anyio.current_time()
            if now >= self.deadline:
                break
            cut_any = False
            for grp, when in list(group_deadlines.items()):
                if now >= when:
                    del group_deadlines[grp]
                    if len(grp) and guard._durable is not None:  # durable: save, then cut
                        await guard._durable.save_cut({grp.name})
                    if len(grp):
                        logger.warning(
                            "group %r: timeout %.3gs reached, cancelling %d task(s)",
                            grp.name,
                            grp.config.timeout,
                            len(grp),
                        )
                        grp.cancel_all(cut=True)
                        if grp.running:
                            unwind_by[grp] = now + cancel_grace
                            cut_any = True
                    grp.closed = True  # its deadline passed: it takes no new work
            if cut_any:
                await _let_cancellations_land()
                continue  # look again: what unwound is accounted
            expired = [grp for grp, when in unwind_by.items() if now >= when]
            if expired:
                # Cancel once more first: asyncio delivers a cancellation once, so
                # a task that swallowed it and awaits again would never see another
                # (on trio a cancelled scope keeps raising at every checkpoint).
                for grp in expired:
                    del unwind_by[grp]
                    for handle in list(grp.running):
                        handle.cancel()
                await _let_cancellations_land()
                for grp in expired:
                    self._abandon_tasks(grp)
                continue
            if now >= next_log:
                self._log_progress(now)
                next_log = now + PROGRESS_INTERVAL
            wake_at = min([self.deadline, next_log, *group_deadlines.values(), *unwind_by.values()])
            self._rearm()
            if guard._idle():
                break
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._wait_wake()

    def _log_progress(self, now: float) -> None:
        guard = self.guard
        oldest = self._outstanding()[:5]
        desc = ", ".join(f"{name} ({where}) {age:.1f}s" for name, where, age in oldest)
        logger.info(
            "draining: %d left, oldest: %s; %.1fs to the deadline",
            guard._live + len(guard._thread_sections),
            desc or "-",
            self.deadline - now,
        )

    def _outstanding(self) -> list[tuple[str, str, float]]:
        guard = self.guard
        now = time.monotonic()
        items = [
            (h.name, f"group {grp.name}", now - h._started)
            for grp in guard._groups.values()
            for h in grp.running
        ]
        items += [(s.name, "guarded", now - s._started) for s in guard._sections]
        with guard._thread_lock:
            threads = list(guard._thread_sections)
        items += [(s.name, "guarded, thread", now - s._started) for s in threads]
        items.sort(key=lambda item: -item[2])
        return items

    async def _stopping_phase(self) -> None:
        guard, cfg = self.guard, self.guard.config
        guard._state = State.STOPPING
        if guard._idle():
            self._end_phase("stopping")
            return
        if self.forced:
            logger.warning("shutdown forced: cancelling what is left")
        else:
            logger.warning(
                "exit wait of %gs reached: cancelling what is left", cfg.exit_wait_timeout
            )
        if guard._durable is not None:  # durable: save "cut" tasks, then cancel
            await guard._durable.save_cut(None)
        for grp in guard._groups.values():
            grp.cancel_all(cut=True)
        for section in list(guard._sections):
            section._cut = True
            if section._scope is not None:
                section._scope.cancel()
        await _let_cancellations_land()
        grace_end = anyio.current_time() + cfg.cancel_grace
        while not guard._idle():
            delay = grace_end - anyio.current_time()
            if delay <= 0:
                break
            self._rearm()
            with anyio.move_on_after(delay):
                await self._wait_wake()
        self._abandon()
        self._end_phase("stopping")

    def _abandon(self) -> None:
        """Give up on what still runs after the cancel grace: report it, with its stack."""
        guard = self.guard
        assert guard._backend is not None
        now = time.monotonic()
        for grp in guard._groups.values():
            self._abandon_tasks(grp)
        first_section = len(self.stuck)
        for section in list(guard._sections):
            guard._sections.pop(section)
            guard._section_counts["stuck"] += 1
            stack = guard._backend.task_stack(section._task)
            self.stuck.append(
                StuckTask(
                    name=section.name, group="(guarded)", age=now - section._started, stack=stack
                )
            )
        with guard._thread_lock:
            threads = list(guard._thread_sections)
            guard._thread_sections.clear()
        for section in threads:
            guard._section_counts["stuck"] += 1
            self.stuck.append(
                StuckTask(
                    name=section.name,
                    group="(guarded, thread)",
                    age=now - section._started,
                    stack=guard.thread_stack(section),
                )
            )
        for item in self.stuck[first_section:]:
            self._log_stuck(item)

    def _abandon_tasks(self, grp: Group) -> None:
        """Give up on the group's running tasks (cancelled, past the cancel grace)."""
        guard = self.guard
        assert guard._backend is not None
        now = time.monotonic()
        for handle in list(grp.running):
            stack = guard._backend.task_stack(handle._task)
            age = now - handle._started
            item = StuckTask(name=handle.name, group=grp.name, age=age, stack=stack)
            self.stuck.append(item)
            _ABANDONED.append(handle)
            grp.abandon(handle)
            self._log_stuck(item)

    def _log_stuck(self, item: StuckTask) -> None:
        logger.error(
            "abandoned %s (%s) after %.1fs; it ignored cancellation. Stack:\n%s",
            item.name,
            item.group,
            item.age,
            item.stack,
        )

    async def _after_drain_phase(self) -> None:
        await self._run_hooks("after_drain", bounded=False)
        self._end_phase("after_drain")

    async def _run_hooks(self, stage: str, bounded: bool) -> None:
        guard = self.guard
        done: set[int] = set()
        # Hooks may be registered while earlier ones run: take the newest not yet run.
        while True:
            todo = [h for h in guard._hooks if h.stage == stage and id(h) not in done]
            if not todo:
                break
            hook: Hook = todo[-1]
            done.add(id(hook))
            limit = hook.timeout
            if bounded:  # before_drain hooks count against the exit wait
                limit = min(limit, self.deadline - anyio.current_time())
            assert guard._backend is not None
            report = await run_hook(hook, limit + hook.backstop, guard._backend)
            self.hook_reports.append(report)
        self._stages_done.add(stage)

    def _close(self) -> None:
        guard = self.guard
        guard._state = State.CLOSED
        if guard._keeper is not None:
            guard._keeper.close()
        if guard._signals is not None:
            guard._signals.scope.cancel()
        counts = guard._section_counts
        streams = dict(guard._stream_outcomes)
        if guard._streams:
            # still open: a consumer that ignored the cancellation (or never came back)
            streams["open"] = len(guard._streams)
        report = ShutdownReport(
            trigger=self.reason,
            started_at=self.started_at,
            duration=anyio.current_time() - self.started,
            phases=self.phases,
            forced=self.forced,
            groups={name: grp.report() for name, grp in guard._groups.items()},
            guarded=SectionReport(
                completed=counts["completed"],
                cancelled=counts["cancelled"],
                cut=counts["cut"],
                stuck=counts["stuck"],
            ),
            hooks=self.hook_reports,
            streams=streams,
            stuck=self.stuck,
            warnings=list(guard._warnings),
            durable=guard._durable.report() if guard._durable is not None else None,  # durable:
        )
        guard._report = report
        (logger.info if report.clean else logger.warning)("%s", report.summary())


async def _let_cancellations_land() -> None:
    """Give just-cancelled (or just-woken) work a chance to unwind before anything is judged stuck,
    even with ``cancel_grace=0``: two passes of the event loop. One is not always
    enough on trio, which may run a batch of ready tasks in reverse order, so the
    supervisor could run before the task its cancellation woke."""
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()


#: Tasks the guard gave up on. Strong references, so they are never garbage
#: collected mid-flight (which would run their finally blocks at a random time).
_ABANDONED: list[Any] = []
