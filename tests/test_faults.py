"""Fault injection into the shutdown sequence itself: each step raises (or hangs) once.

The sequence under test is one application with a bit of everything: a drain
task, a failing task (for the error_handler), a before_drain and an
after_drain hook, a resource, and a stream consumed by a background task.
Each test makes one step fail once, by the means a user (or the platform)
really has: a hook or a resource exit that raises, an error_handler that
raises, a stream source whose ``aclose()`` raises, a logging handler whose
``emit`` raises (on the ``taskguard`` logger or on the root logger, at each
record of the sequence in turn), the report's construction or its
``summary()`` raising, the shutdown trigger callback of ``taskguard.run``
(its watchdog) failing to start. Then:

- the rest of the sequence still runs: the drain work is awaited, the other
  hooks run, the resource is exited, the guard closes, ``async with guard``
  returns (no exception) within its budget;
- the report says not clean, and the bookkeeping error is in
  ``report.errors`` (design.md: "The supervisor survives its own bookkeeping
  errors: it logs them, marks the report not clean and carries on").

The hang variants (a hook that hangs, a source whose ``aclose`` hangs, an
error_handler that blocks the loop) check that the shutdown stays bounded.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from faults_scenario import (
    BACKENDS,
    BUDGET,
    CANCEL_GRACE,
    EXIT_WAIT,
    EXPECTED_STEPS,
    HOOK_TIMEOUT,
    SLACK,
    Faults,
    Injected,
    Seen,
    check_survived,
    errors_of,
    fail_once,
    run_scenario,
    scenario,
)
from helpers_reliability import Hygiene, forget_dead_guard

import taskguard
from taskguard import ShutdownReport, TaskGuard
from taskguard._backends import BackendName

# -- the baseline: nothing fails --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_scenario_is_clean_without_faults(backend: str) -> None:
    seen, report, took, escaped = run_scenario(backend, Faults())
    report = check_survived(seen, report, took, escaped)
    assert report.clean, report.summary()
    assert report.streams == {"completed": 1}
    assert seen.steps.count("source closed") == 1


# -- a step raises once -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", ["before_drain", "after_drain", "resource_exit"])
def test_a_hook_or_resource_exit_that_raises_is_reported_and_the_rest_runs(
    backend: str, step: str
) -> None:
    fault: dict[str, Any] = {step: "raise"}  # the field the parameter names
    seen, report, took, escaped = run_scenario(backend, Faults(**fault))
    report = check_survived(seen, report, took, escaped)
    failed = [h for h in report.hooks if h.outcome != "ok"]
    assert [h.outcome for h in failed] == ["error"], report.hooks
    assert "Injected" in (failed[0].error or "")
    assert not report.clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_handler_that_raises_is_a_bookkeeping_error(backend: str) -> None:
    seen, report, took, escaped = run_scenario(backend, Faults(error_handler="raise"))
    report = check_survived(seen, report, took, escaped)
    assert any("error_handler" in e or "Injected" in e for e in errors_of(report))
    assert not report.clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_source_whose_aclose_raises_is_a_bookkeeping_error(backend: str) -> None:
    seen, report, took, escaped = run_scenario(backend, Faults(source_aclose="raise"))
    report = check_survived(seen, report, took, escaped)
    assert seen.steps.count("source closed") == 1
    assert any("feed" in e or "Injected" in e for e in errors_of(report))
    assert not report.clean


# -- logging fails ------------------------------------------------------------------------


class _FailingHandler(logging.Handler):
    """A user's handler whose ``emit`` raises at record number ``at`` (0-based), once."""

    def __init__(self, at: int) -> None:
        super().__init__(logging.DEBUG)
        self.at = at
        self.seen = 0
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        n, self.seen = self.seen, self.seen + 1
        if n == self.at:
            self.fired = True
            raise Injected(f"log sink down at record {n}: {record.msg!r}")


@contextmanager
def failing_handler(where: str, at: int) -> Iterator[_FailingHandler]:
    handler = _FailingHandler(at)
    log = logging.getLogger("taskguard" if where == "taskguard" else None)
    taskguard_log = logging.getLogger("taskguard")
    level = taskguard_log.level
    taskguard_log.setLevel(logging.INFO)  # every record of the sequence is made
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        taskguard_log.setLevel(level)


def _records_of_the_scenario(backend: str) -> int:
    with failing_handler("taskguard", at=-1) as counter:
        run_scenario(backend, Faults())
    return counter.seen


#: records the clean scenario logs (at least: started, the task failure, the summary)
RECORDS = 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_scenario_logs_the_records_the_logging_faults_hit(backend: str) -> None:
    # The logging tests below make record 0..RECORDS-1 fail: make sure they exist.
    assert _records_of_the_scenario(backend) >= RECORDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["taskguard", "root"])
@pytest.mark.parametrize("at", range(RECORDS))
def test_a_logging_handler_that_raises_once_does_not_break_the_sequence(
    backend: str, where: str, at: int
) -> None:
    with Hygiene() as hygiene, failing_handler(where, at) as handler:
        seen, report, took, escaped = run_scenario(backend, Faults())
    assert handler.fired
    report = check_survived(seen, report, took, escaped)
    assert errors_of(report), "a failed log record is not reported"
    assert not report.clean
    hygiene.check()


# -- the report fails ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_building_the_report_raises_once(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import taskguard._shutdown as shutdown_module

    # (ShutdownReport: the class _shutdown builds; taskguard exports it)
    build_once_failing = fail_once(ShutdownReport, "building the report failed")
    monkeypatch.setattr(shutdown_module, "ShutdownReport", build_once_failing)
    seen, report, took, escaped = run_scenario(backend, Faults())
    report = check_survived(seen, report, took, escaped)
    assert errors_of(report)
    assert not report.clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_guard_whose_shutdown_failed_is_not_current_any_more(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskguard._shutdown as shutdown_module

    def cannot_build(**fields: Any) -> ShutdownReport:
        raise Injected("building the report failed")

    monkeypatch.setattr(shutdown_module, "ShutdownReport", cannot_build)
    guard = TaskGuard(exit_wait_timeout=EXIT_WAIT)

    async def main() -> None:
        try:
            async with guard:
                pass
        except Exception:  # test_building_the_report_raises_once covers that part
            pass

    try:
        anyio.run(main, backend=backend)
    except BaseException:  # trio: TrioInternalError
        pass
    try:
        with pytest.raises(taskguard.NoGuardError):
            taskguard.current()
    finally:
        forget_dead_guard(guard)
        gc.collect()  # see run_scenario


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_report_summary_raises_once(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    summary_once_failing = fail_once(ShutdownReport.summary, "summary failed")
    monkeypatch.setattr(ShutdownReport, "summary", summary_once_failing)
    seen, report, took, escaped = run_scenario(backend, Faults())
    report = check_survived(seen, report, took, escaped)
    assert errors_of(report)
    assert not report.clean


# -- the trigger callback (taskguard.run's watchdog) fails -----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_watchdog_that_fails_to_start_is_reported(
    backend: BackendName, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shutdown trigger callback of taskguard.run starts the hard-deadline
    # timer thread; a process out of threads makes that raise ("can't start new
    # thread"). The shutdown goes on, but the process has no hard deadline: the
    # report must say so.
    import taskguard._watchdog as watchdog_module

    def cannot_start(self: Any, *args: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(watchdog_module.Watchdog, "__init__", cannot_start)
    seen = Seen()

    async def main(guard: TaskGuard) -> None:
        await scenario(guard, seen, Faults())

    started = time.monotonic()
    try:
        report = taskguard.run(
            main,
            backend=backend,
            exit_wait_timeout=EXIT_WAIT,
            cancel_grace=CANCEL_GRACE,
            hook_timeout=HOOK_TIMEOUT,
            handle_signals=False,
        )
    finally:
        gc.collect()  # see run_scenario
    assert time.monotonic() - started < BUDGET + SLACK
    assert set(seen.steps) >= EXPECTED_STEPS
    assert errors_of(report)
    assert not report.clean


# -- a step hangs -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", ["before_drain", "after_drain", "resource_exit"])
def test_a_hook_or_resource_exit_that_hangs_is_cut_and_the_rest_runs(
    backend: str, step: str
) -> None:
    fault: dict[str, Any] = {step: "hang"}  # the field the parameter names
    seen, report, took, escaped = run_scenario(backend, Faults(**fault))
    report = check_survived(seen, report, took, escaped)
    cut = [h for h in report.hooks if h.outcome != "ok"]
    assert len(cut) == 1, report.hooks
    # A resource exit cut at its timeout says "error" (TimeoutError: ... cancelled at
    # its timeout), or "timeout" when the supervisor's backstop fires first (under
    # load): timing decides the outcome (reported to the lead, not pinned here).
    assert cut[0].outcome == "timeout" or "timeout" in (cut[0].error or ""), cut
    assert not report.clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_handler_that_blocks_delays_but_does_not_break_the_shutdown(
    backend: str,
) -> None:
    # A sync handler runs on the loop thread: the loop (the supervisor included)
    # stands still for its second; the shutdown then resumes, bounded.
    seen, report, took, escaped = run_scenario(backend, Faults(error_handler="block"))
    check_survived(seen, report, took, escaped, extra=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_source_whose_aclose_hangs_leaves_the_shutdown_bounded(backend: str) -> None:
    # aclose runs shielded (the source's finally must run): a hanging one holds
    # its consumer task, which the guard then abandons after cancel_grace.
    faults = Faults(source_aclose="hang")
    seen, report, took, escaped = run_scenario(backend, faults)
    expect = EXPECTED_STEPS - {"stream consumed"}
    report = check_survived(seen, report, took, escaped, expect_steps=expect)
    assert [s.name for s in report.stuck] == ["consumer"]
    assert not report.clean
