"""A hypothesis state machine against a live guard: nothing lost, counts exact, bounded.

The guard runs in an anyio blocking portal (its own event loop on a thread);
hypothesis drives it from the test thread with random interleavings of:
spawns into drain, limited and cancel groups (tasks that finish, raise,
swallow cancellation once, or swallow it until released), async guarded
sections (shielded or not), worker-thread guarded sections, shutdown hooks
that succeed, raise (even KeyboardInterrupt) or hang, streams (finite, endless
or failing sources; iterated, left by ``break``, pumped into a sender that
works, breaks or stalls; some with a max_duration) that are stopped or
disconnected from outside or end with the shutdown, shutdown triggers and
forced triggers, and pauses. Every example starts with one task that swallows
cancellation until released, so every example abandons one. Everything records
its own ground truth.

At close it checks:
- every spawn raised at its call site or ended in exactly one of
  completed / failed / cancelled / stuck, and the job agrees with its handle;
- the report's per-group counts equal that ground truth (refusals: those
  made before the guard closed, as the report is built at close);
- drain work reported as cut really did not finish, and no drain work
  finished well after its deadline (its group's timeout, the exit wait, or a
  forced shutdown);
- every accepted hook ran and is reported exactly once with its outcome;
- guarded sections are reported as completed / cut / stuck as they happened;
- every stream ended exactly once, its source was closed exactly once, and the
  report's stream outcomes equal what the consumers saw;
- shutdown ended within exit_wait + cancel_grace + after-drain hook timeouts
  (+ slack).

Tasks and threads that ignore cancellation are released after the checks
(see tests/helpers_reliability.py), so the portal's loop can close. Then the
abandoned tasks end later: each handle ends (completed, with the released
task's result), the report already built does not change, and, in examples
where nothing was abandoned, the guard and every handle are collectable once
the portal is closed (with an abandoned task that is finding 2 of issue 11:
tests/conftest.py's KNOWN_LEAKS).
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.from_thread
import pytest
from helpers_reliability import Release
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from taskguard import (
    GroupConfig,
    GroupFullError,
    ShuttingDownError,
    State,
    StreamError,
    TaskGuard,
)

EXIT_WAIT = 0.6
CANCEL_GRACE = 0.3
HOOK_TIMEOUT = 0.3
HANG_TIMEOUT = 0.1
GROUP_TIMEOUT = 0.3  # group "d1"
SLACK = 2.0
#: how late a drain task may finish after its deadline before it counts as "not cut"
LATENESS = 0.3

Stage = Literal["before_drain", "after_drain"]

GROUPS = {
    "d1": GroupConfig(on_shutdown="drain", timeout=GROUP_TIMEOUT),
    "d2": GroupConfig(on_shutdown="drain", limit=2, pending_limit=3),
    "c": GroupConfig(on_shutdown="cancel"),
    "streams": GroupConfig(on_shutdown="drain"),  # the tasks that consume streams
}
DRAINS = {"d1": True, "d2": True, "c": False, "default": True, "streams": True}
#: how long a task released after the close may take to end
RELEASED_END = 5.0


@dataclass
class Job:
    group: str
    behaviour: str
    duration: float
    started: bool = False
    outcome: str | None = None  # completed / failed / cancelled, as the job saw it
    ended_at: float = 0.0  # loop time


@dataclass
class Section:
    kind: str  # "async" / "thread-short" / "thread-held"
    outcome: str | None = None  # completed / cut / refused (as the section saw it)
    entered: bool = False


@dataclass
class HookRec:
    name: str
    stage: str
    kind: str
    registered_before_trigger: bool
    runs: int = 0


@dataclass
class StreamRec:
    source: str  # "finite" / "endless" / "fails"
    mode: str  # "iterate" / "break" / "pump_ok" / "pump_broken" / "pump_stall"
    stream: Any = None
    outcome: str | None = None  # as the consumer saw it when the stream ended
    source_closed: int = 0  # how many times the source's finally ran
    source_started: bool = False


@dataclass
class Truth:
    jobs: dict[str, Job] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    refused_before_close: Counter[str] = field(default_factory=Counter)
    sections: dict[str, Section] = field(default_factory=dict)
    hooks: dict[str, HookRec] = field(default_factory=dict)
    handled_errors: list[str] = field(default_factory=list)
    streams: dict[str, StreamRec] = field(default_factory=dict)


class GuardMachine(RuleBasedStateMachine):
    BACKEND = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.ids = itertools.count()
        self.truth = Truth()
        self.release = Release()
        self.threads: list[threading.Thread] = []
        self.section_futures: list[Any] = []
        self.trigger_wall: float | None = None
        self.abandoned = True  # until _check_released_later knows better
        self.trigger_loop: float | None = None
        self.force_loop: float | None = None
        self.before_drain_hangs = 0
        self.stack = ExitStack()
        self.portal = self.stack.enter_context(
            anyio.from_thread.start_blocking_portal(self.BACKEND)
        )
        self.guard = TaskGuard(
            exit_wait_timeout=EXIT_WAIT,
            cancel_grace=CANCEL_GRACE,
            hook_timeout=HOOK_TIMEOUT,
            groups=GROUPS,
            error_handler=self._error_handler,
        )
        self.guard_cm = self.portal.wrap_async_context_manager(self.guard)
        self.guard_cm.__enter__()

    # -- helpers ------------------------------------------------------------------

    def _error_handler(self, exc: BaseException, handle: Any) -> None:
        self.truth.handled_errors.append(handle.name)
        if len(self.truth.handled_errors) % 3 == 0:
            raise RuntimeError("the error handler is broken too")

    def _refuse(self, key: str) -> None:
        # runs on the loop thread, right where the spawn raised: the state is exact
        self.truth.refused[key] += 1
        if self.guard.state is not State.CLOSED:
            self.truth.refused_before_close[key] += 1

    # -- rules --------------------------------------------------------------------

    @initialize(stubborn=st.booleans())
    def maybe_a_stubborn_task(self, stubborn: bool) -> None:
        # Half the examples surely abandon a task (it swallows cancellation until
        # released) that ends later, after the close; the others may abandon none,
        # and then the guard and its handles must be collectable.
        if stubborn:
            self.spawn("default", "swallow", 0.0)

    @rule(
        group=st.sampled_from(["d1", "d2", "c", "default"]),
        behaviour=st.sampled_from(["ok", "ok", "raise", "swallow_once", "swallow"]),
        duration=st.sampled_from([0.0, 0.02, 0.1, 0.25, 0.5, 1.2]),
    )
    def spawn_rule(self, group: str, behaviour: str, duration: float) -> None:
        self.spawn(group, behaviour, duration)

    def spawn(self, group: str, behaviour: str, duration: float) -> None:
        name = f"t{next(self.ids)}"
        job = Job(group, behaviour, duration)
        release = self.release

        async def work() -> str:
            job.started = True
            try:
                if behaviour == "swallow":
                    await release.swallow_cancellation()
                else:
                    try:
                        await anyio.sleep(duration)
                    except anyio.get_cancelled_exc_class():
                        if behaviour != "swallow_once":
                            raise
                        # swallows it once and returns (no await: on trio the
                        # cancelled scope would raise again at once)
                if behaviour == "raise":
                    job.outcome = "failed"
                    raise ValueError(name)
            except anyio.get_cancelled_exc_class():
                job.outcome = "cancelled"
                job.ended_at = anyio.current_time()
                raise
            job.ended_at = anyio.current_time()
            job.outcome = job.outcome or "completed"
            return name

        def do_spawn() -> None:
            try:
                handle = self.guard.spawn(work, group=group, name=name)
            except (ShuttingDownError, GroupFullError):
                self._refuse(group)
            else:
                self.truth.jobs[name] = job
                self.truth.handles[name] = handle

        self.portal.call(do_spawn)

    @rule(duration=st.sampled_from([0.0, 0.05, 0.3, 1.2]), shield=st.booleans())
    def guarded_async(self, duration: float, shield: bool) -> None:
        name = f"s{next(self.ids)}"
        rec = self.truth.sections[name] = Section("async")

        async def section() -> None:
            try:
                async with self.guard.guarded(name, shield=shield):
                    rec.entered = True
                    await anyio.sleep(duration)
            except ShuttingDownError:
                rec.outcome = "cut" if rec.entered else "refused"
            else:
                rec.outcome = "completed"

        self.section_futures.append(self.portal.start_task_soon(section))

    @rule(held=st.booleans(), duration=st.sampled_from([0.0, 0.05, 0.1]))
    def guarded_thread(self, held: bool, duration: float) -> None:
        name = f"s{next(self.ids)}"
        rec = self.truth.sections[name] = Section("thread-held" if held else "thread-short")
        release = self.release.event
        ready = threading.Event()

        def body() -> None:
            try:
                with self.guard.guarded(name):
                    rec.entered = True
                    ready.set()
                    if held:
                        release.wait(30)  # a blocking call: cannot be cancelled
                    else:
                        time.sleep(duration)
            except ShuttingDownError:
                rec.outcome = "refused"
            else:
                rec.outcome = "completed"
            finally:
                ready.set()

        thread = threading.Thread(target=body, daemon=True)
        self.threads.append(thread)
        thread.start()
        ready.wait(5)  # the section is open (or refused) before the next step

    @rule(
        stage=st.sampled_from(["before_drain", "after_drain"]),
        kind=st.sampled_from(["ok", "ok_async", "raise", "keyboard", "hang"]),
    )
    def hook(self, stage: str, kind: str) -> None:
        if kind == "hang" and stage == "before_drain":
            if self.before_drain_hangs >= 2:
                return  # keep the before_drain hooks well inside the exit wait
            self.before_drain_hangs += 1
        name = f"h{next(self.ids)}"
        rec = HookRec(name, stage, kind, registered_before_trigger=self.trigger_wall is None)

        def sync_hook() -> None:
            rec.runs += 1
            if kind == "raise":
                raise RuntimeError(name)
            if kind == "keyboard":
                raise KeyboardInterrupt(name)

        async def async_hook() -> None:
            rec.runs += 1
            if kind == "hang":
                await anyio.sleep_forever()
            await anyio.sleep(0)

        fn: Callable[[], object] = async_hook if kind in ("ok_async", "hang") else sync_hook
        timeout = HANG_TIMEOUT if kind == "hang" else None
        when: Stage = "before_drain" if stage == "before_drain" else "after_drain"

        def do_register() -> None:
            try:
                self.guard.on_shutdown(fn, stage=when, timeout=timeout, name=name)
            except ShuttingDownError:
                pass  # its stage already ran: refused at the call site
            else:
                self.truth.hooks[name] = rec

        self.portal.call(do_register)

    @rule(
        source=st.sampled_from(["finite", "endless", "fails"]),
        mode=st.sampled_from(["iterate", "break", "pump_ok", "pump_broken", "pump_stall"]),
        max_duration=st.sampled_from([None, None, 0.15]),
    )
    def open_stream(self, source: str, mode: str, max_duration: float | None) -> None:
        """A task of the guard (so the drain waits for it) consumes a stream."""
        name = f"st{next(self.ids)}"
        rec = StreamRec(source, mode)
        job = Job("streams", "stream", 0.0)

        async def produce() -> Any:
            rec.source_started = True
            try:
                for i in itertools.count():
                    if source == "finite" and i == 3:
                        return
                    if source == "fails" and i == 1:
                        raise ValueError("the source failed")
                    await anyio.sleep(0.01 if source == "finite" else 0.05)
                    yield i
            finally:
                rec.source_closed += 1

        async def send(item: object) -> None:
            if mode == "pump_broken" and item:
                raise BrokenPipeError("the client went away")
            if mode == "pump_stall":
                await anyio.sleep(1.0)

        async def consume() -> None:
            job.started = True
            stream = rec.stream = self.guard.stream(
                produce(),
                name=name,
                send_timeout=0.1 if mode == "pump_stall" else None,
                max_duration=max_duration,
            )
            try:
                if mode.startswith("pump"):
                    await stream.pump(send)
                else:
                    async for _ in stream:
                        if mode == "break":
                            break
                    await stream.aclose()
            except anyio.get_cancelled_exc_class():
                job.outcome = "cancelled"
                job.ended_at = anyio.current_time()
                raise
            except (StreamError, ValueError):
                pass
            finally:
                rec.outcome = None if stream.outcome is None else stream.outcome.value
            job.ended_at = anyio.current_time()
            job.outcome = "completed"

        def do_spawn() -> None:
            try:
                handle = self.guard.spawn(consume, group="streams", name=name)
            except ShuttingDownError:
                self._refuse("streams")
            else:
                self.truth.jobs[name] = job
                self.truth.handles[name] = handle
                self.truth.streams[name] = rec

        self.portal.call(do_spawn)

    @rule(index=st.integers(0, 20), how=st.sampled_from(["stop", "disconnected"]))
    def end_stream_from_outside(self, index: int, how: str) -> None:
        recs = [r for r in self.truth.streams.values() if r.stream is not None]
        if recs:
            stream = recs[index % len(recs)].stream
            self.portal.call(getattr(stream, how))

    @rule(force=st.booleans())
    def trigger(self, force: bool) -> None:
        def do_trigger() -> None:
            now = anyio.current_time()
            if self.guard.state is State.CLOSED:
                return
            if self.trigger_loop is None:
                self.trigger_loop = now
            if force and self.force_loop is None:
                self.force_loop = now
            self.guard.shutdown("hypothesis", force=force)

        if self.trigger_wall is None:
            self.trigger_wall = time.monotonic()
        self.portal.call(do_trigger)

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.2]))
    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    # -- the checks at close --------------------------------------------------------

    def teardown(self) -> None:
        checked = False
        try:
            if self.trigger_wall is None:
                self.trigger(False)
            self.guard_cm.__exit__(None, None, None)
            closed_wall = time.monotonic()
            # Snapshot the ground truth while the stuck work is still stuck.
            outcomes = {name: job.outcome for name, job in self.truth.jobs.items()}
            states = {name: h.state for name, h in self.truth.handles.items()}
            section_outcomes = {name: s.outcome for name, s in self.truth.sections.items()}
            self._check(closed_wall, outcomes, states, section_outcomes)
            checked = True
        finally:
            self.release.set()
            for thread in self.threads:
                thread.join(10)
            for fut in self.section_futures:
                fut.result(10)
            if checked:
                self._check_released_later()
            self.stack.close()
        if checked:
            self._check_collectable()

    def _check_released_later(self) -> None:
        """Released after the close, the abandoned tasks end; the report stays as built."""
        report = self.guard.report
        built = report.model_dump_json()
        stuck = {s.name for s in report.stuck}
        handles = [h for name, h in self.truth.handles.items() if name in stuck]
        deadline = time.monotonic() + RELEASED_END
        while not all(h.done() for h in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        for handle in handles:
            assert handle.state == "completed", handle  # it returned once released
            assert self.truth.jobs[handle.name].outcome == "completed"
        assert self.guard.report is report
        assert report.model_dump_json() == built  # the report already built does not change
        self.abandoned = bool(stuck)

    def _check_collectable(self) -> None:
        """Once the portal is closed, the guard and every handle can be collected
        (unless a task was abandoned: finding 2 of issue 11, see conftest.KNOWN_LEAKS)."""
        refs = [weakref.ref(self.guard), *map(weakref.ref, self.truth.handles.values())]
        self.guard = self.guard_cm = None  # type: ignore[assignment]
        self.truth.handles.clear()
        for rec in self.truth.streams.values():
            rec.stream = None
        # pytest keeps the log records; the traceback of a failed task's or stream's
        # record holds its frames, and so the guard (in production it is dropped)
        for handler in logging.getLogger().handlers:
            for record in getattr(handler, "records", ()):
                record.exc_info = None
        gc.collect()
        alive = [obj for ref in refs if (obj := ref()) is not None]
        if not self.abandoned:
            assert alive == [], alive
        event(
            "abandoned a task; " + ("still referenced (finding 2)" if alive else "nothing kept")
            if self.abandoned
            else "nothing abandoned; nothing kept"
        )

    def _check(
        self,
        closed_wall: float,
        outcomes: dict[str, str | None],
        states: dict[str, str],
        section_outcomes: dict[str, str | None],
    ) -> None:
        report = self.guard.report
        truth = self.truth
        assert self.trigger_wall is not None
        assert self.trigger_loop is not None

        # 1. bounded
        after_hooks = [h for h in truth.hooks.values() if h.stage == "after_drain"]
        bound = EXIT_WAIT + CANCEL_GRACE + SLACK
        bound += sum(
            (HANG_TIMEOUT if h.kind == "hang" else HOOK_TIMEOUT) + 0.5 for h in after_hooks
        )
        assert closed_wall - self.trigger_wall <= bound, (closed_wall - self.trigger_wall, bound)

        # 2. every accepted spawn ended in exactly one state, and the job agrees
        stuck_names = {s.name for s in report.stuck}
        expected: dict[str, Counter[str]] = {g: Counter() for g in report.groups}
        for name, job in truth.jobs.items():
            seen = outcomes[name]
            truth_state: str | None
            if name in stuck_names:
                assert seen is None, (name, seen)
                assert states[name] == "running", (name, states[name])
                truth_state = "stuck"
            else:
                assert states[name] in ("completed", "failed", "cancelled"), (name, states[name])
                # a job that never started was closed unrun: cancelled
                truth_state = seen if job.started else "cancelled"
                assert truth_state == states[name], (name, job, states[name])
            expected[job.group][truth_state] += 1
            if job.behaviour == "swallow" and job.started:
                # it never returns on its own: either stuck, or it never got going
                assert truth_state == "stuck", (name, job)

        # 3. the report's counts equal the ground truth
        for group, counts in report.groups.items():
            exp = expected[group]
            got = {k: getattr(counts, k) for k in ("completed", "failed", "cancelled", "stuck")}
            assert got == {k: exp[k] for k in got}, (group, got, dict(exp))
            assert counts.refused == truth.refused_before_close[group], group
            # 4. cut: only drain work, and only work that really did not finish
            if DRAINS.get(group, True):
                assert counts.cut == exp["cancelled"], (group, counts)
            else:
                assert counts.cut == 0, (group, counts)
        assert len(report.stuck) == sum(e["stuck"] for e in expected.values()) + (
            report.guarded.stuck
        )
        assert sorted(truth.handled_errors) == sorted(
            n for n, j in truth.jobs.items() if outcomes[n] == "failed" and n not in stuck_names
        )

        # 5. no drain work finished well after its deadline
        deadline = self.trigger_loop + EXIT_WAIT
        if self.force_loop is not None:
            deadline = min(deadline, self.force_loop)
        for name, job in truth.jobs.items():
            if outcomes[name] != "completed" or job.behaviour == "swallow_once":
                continue
            own = deadline
            if job.group == "d1":
                own = min(own, self.trigger_loop + GROUP_TIMEOUT)
            assert job.ended_at <= own + LATENESS, (name, job, own)

        # 6. hooks: each accepted one ran once and is reported once, with its outcome
        reported = Counter(h.name for h in report.hooks)
        outcome_of = {h.name: h.outcome for h in report.hooks}
        expected_outcome = {
            "ok": "ok",
            "ok_async": "ok",
            "raise": "error",
            "keyboard": "error",
            "hang": "timeout",
        }
        for name, rec in truth.hooks.items():
            assert rec.runs == 1, (name, rec)
            assert reported[name] == 1, (name, reported)
            assert outcome_of[name] == expected_outcome[rec.kind], (name, rec, outcome_of[name])
        assert set(reported) == set(truth.hooks)
        for stage in ("before_drain", "after_drain"):
            early = [
                n
                for n, h in truth.hooks.items()
                if h.stage == stage and h.registered_before_trigger
            ]
            order = [h.name for h in report.hooks if h.name in early]
            assert order == early[::-1], (stage, order, early)  # last registered runs first

        # 7. guarded sections
        sec_expected = Counter[str]()
        for name, sec in truth.sections.items():
            seen = section_outcomes[name]
            if sec.kind == "async":
                assert seen in ("completed", "cut", "refused", None), (name, seen)
            if seen == "refused":
                continue
            if sec.kind == "thread-held":
                sec_expected["stuck"] += 1  # a thread cannot be cancelled
            elif sec.kind == "thread-short":
                sec_expected["completed"] += 1
            elif seen is None:  # its task had not yet resumed: it raises as it exits
                sec_expected["cut"] += 1
            else:
                sec_expected[seen] += 1
        got_sections = {
            "completed": report.guarded.completed,
            "cut": report.guarded.cut,
            "stuck": report.guarded.stuck,
        }
        assert got_sections == {k: sec_expected[k] for k in got_sections}, (
            got_sections,
            dict(sec_expected),
        )
        if report.forced:
            assert self.force_loop is not None

        # 8. streams: each ended once, its source closed once, the report agrees
        seen_streams = Counter[str]()
        for name, rec in truth.streams.items():
            if rec.stream is None:
                continue  # its consumer never ran (cancelled before it started)
            assert rec.outcome is not None, (name, rec)
            assert rec.stream.outcome is not None, (name, rec)
            if rec.source_started:
                assert rec.source_closed == 1, (name, rec)  # its finally ran, once
            seen_streams[rec.outcome] += 1
        got_streams = {k: v for k, v in report.streams.items() if k != "open"}
        assert got_streams == dict(seen_streams), (report.streams, dict(seen_streams))
        assert "open" not in report.streams, report.streams


SETTINGS = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.slow
@pytest.mark.no_leak_check(
    reason="the machine checks per example that the guard and its handles are collectable "
    "(the conftest check would see the abandoned tasks of finding 2 in every run)"
)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_guard_state_machine(backend: str) -> None:
    machine = type(f"GuardMachine_{backend}", (GuardMachine,), {"BACKEND": backend})
    run_state_machine_as_test(machine, settings=SETTINGS)
