"""The ground truth of tests/test_stateful.py's state machine, and its checks at close.

Every task, section, hook and stream the machine makes records what it really
did here; :class:`TruthChecks` compares that with the guard's report when the
guard has closed (see the module docstring of tests/test_stateful.py for the
list of checks).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from taskguard import GroupConfig

if TYPE_CHECKING:
    from taskguard import TaskGuard

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


class TruthChecks:
    """Mixin of the state machine: the checks of the report against the truth."""

    BACKEND: str

    if TYPE_CHECKING:
        guard: TaskGuard
        truth: Truth
        trigger_wall: float | None
        trigger_loop: float | None
        force_loop: float | None

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

        # 5. no drain work finished well after its deadline (plus however late the
        # guard itself woke up: on a starved machine a task whose sleep ends in the
        # loop step where the supervisor acts completes, and rightly so)
        deadline = self.trigger_loop + EXIT_WAIT
        if self.force_loop is not None:
            deadline = min(deadline, self.force_loop)
        drained = sum(report.phases.get(k, 0.0) for k in ("drain_delay", "before_drain", "drain"))
        lag = max(0.0, self.trigger_loop + drained - deadline)
        for name, job in truth.jobs.items():
            if outcomes[name] != "completed" or job.behaviour == "swallow_once":
                continue
            own = deadline
            if job.group == "d1":
                own = min(own, self.trigger_loop + GROUP_TIMEOUT)
            assert job.ended_at <= own + LATENESS + lag, (name, job, own, lag)

        # 6. hooks: each accepted one ran once and is reported once, with its outcome
        reported = Counter(h.name for h in report.hooks)
        outcome_of = {h.name: h.outcome for h in report.hooks}
        error_of = {h.name: h.error or "" for h in report.hooks}
        expected_outcome = {
            "ok": "ok",
            "ok_async": "ok",
            "raise": "error",
            "keyboard": "error",
            "hang": "timeout",
        }
        for name, rec in truth.hooks.items():
            assert reported[name] == 1, (name, reported)
            if rec.runs == 0 and not rec.registered_before_trigger:
                # The budget is fixed at the trigger (the hard deadline counts on it):
                # a hook added during the drain runs only if time is left for it,
                # else it is reported as not run.
                assert outcome_of[name] == "timeout", (name, rec, outcome_of[name])
                assert error_of[name].startswith("not run"), (name, error_of[name])
                continue
            assert rec.runs == 1, (name, rec)
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
        want = {k: sec_expected[k] for k in got_sections}
        assert got_sections == want, (got_sections, dict(sec_expected))
        if report.forced:
            assert self.force_loop is not None

        # 8. streams: each ended once, its source closed once, the report agrees
        seen_streams = Counter[str]()
        for name, stream_rec in truth.streams.items():
            if stream_rec.stream is None:
                continue  # its consumer never ran (cancelled before it started)
            assert stream_rec.outcome is not None, (name, stream_rec)
            assert stream_rec.stream.outcome is not None, (name, stream_rec)
            if stream_rec.source_started:
                assert stream_rec.source_closed == 1, (name, stream_rec)  # its finally ran, once
            seen_streams[stream_rec.outcome] += 1
        got_streams = {k: v for k, v in report.streams.items() if k != "open"}
        assert got_streams == dict(seen_streams), (report.streams, dict(seen_streams))
        assert "open" not in report.streams, report.streams
