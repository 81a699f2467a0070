"""Race: 10,000 spawns from many tasks while shutdown is triggered (and forced) mid-way.

No task is lost (each accepted spawn ends in exactly one state, and the job
itself agrees), the only exception at a call site is ShuttingDownError, the
report's counts match what the spawners saw, and after close the guard holds
no reference to any handle or coroutine (weakrefs die after gc).
"""

from __future__ import annotations

import gc
import io
import logging
import random
import weakref
from collections import Counter
from typing import Any

import anyio
import pytest

from taskguard import GroupConfig, ShuttingDownError, State, TaskGuard, TaskHandle

pytestmark = pytest.mark.anyio

SPAWNERS = 100
PER_SPAWNER = 100
TOTAL = SPAWNERS * PER_SPAWNER  # 10,000
GROUPS = ("drain", "cancel", "limited")


async def test_ten_thousand_spawns_racing_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest's log capture keeps every record, and a failed task's record holds
    # its exception, whose traceback holds the runner frame, which holds the
    # handle: the leak check would see pytest's reference, not the guard's.
    # Log to a stream instead (formatted, then dropped, as in production).
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    tg_logger = logging.getLogger("taskguard")
    monkeypatch.setattr(tg_logger, "propagate", False)
    tg_logger.addHandler(handler)
    try:
        await _race(log)
    finally:
        tg_logger.removeHandler(handler)


async def _race(log: io.StringIO) -> None:
    guard = TaskGuard(
        exit_wait_timeout=10,
        cancel_grace=2,
        groups={
            "drain": GroupConfig(on_shutdown="drain"),
            "cancel": GroupConfig(on_shutdown="cancel"),
            "limited": GroupConfig(on_shutdown="drain", limit=20),
        },
    )
    rng = random.Random(1234)
    accepted: dict[str, list[TaskHandle[Any]]] = {g: [] for g in GROUPS}
    refused = Counter[str]()
    # The report is built when the guard closes: later refusals are not in it.
    refused_before_close = Counter[str]()
    unexpected: list[BaseException] = []
    # What the jobs themselves saw: job id -> "completed" / "cancelled" / "failed"
    seen: dict[int, str] = {}
    attempts = 0
    triggered_at: dict[str, int] = {}

    async def job(job_id: int, delay: float, fail: bool) -> int:
        try:
            await anyio.sleep(delay)
        except anyio.get_cancelled_exc_class():
            seen[job_id] = "cancelled"
            raise
        if fail:
            seen[job_id] = "failed"
            raise ValueError(f"job {job_id}")
        seen[job_id] = "completed"
        return job_id

    closed = anyio.Event()

    async def spawner(index: int) -> None:
        nonlocal attempts
        for k in range(PER_SPAWNER):
            if k == PER_SPAWNER - 5:
                await closed.wait()  # the last spawns land after the close, whatever the timing
            job_id = index * PER_SPAWNER + k
            group = GROUPS[job_id % 3]
            attempts += 1
            try:
                handle = guard.spawn(
                    job,
                    job_id,
                    rng.random() * 0.02,
                    job_id % 97 == 0,
                    group=group,
                    name=str(job_id),
                )
            except ShuttingDownError:
                refused[group] += 1
                if guard.state is not State.CLOSED:
                    refused_before_close[group] += 1
            except BaseException as exc:
                unexpected.append(exc)
            else:
                accepted[group].append(handle)
            if k % 7 == 0:
                await anyio.sleep(0)
            if job_id % 1000 == 0:
                gc.collect()  # a task the guard did not hold strongly would vanish here

    async def trigger() -> None:
        while attempts < TOTAL * 0.3:
            await anyio.sleep(0)
        triggered_at["shutdown"] = attempts
        guard.shutdown("race")
        while attempts < TOTAL * 0.6:
            await anyio.sleep(0)
        triggered_at["force"] = attempts
        guard.shutdown("race: force", force=True)
        await guard.wait_closed()
        closed.set()

    async with guard, anyio.create_task_group() as tg:
        tg.start_soon(trigger)
        for index in range(SPAWNERS):
            tg.start_soon(spawner, index)
    report = guard.report

    assert unexpected == []
    assert attempts == TOTAL
    assert sum(len(h) for h in accepted.values()) + sum(refused.values()) == TOTAL
    # The trigger really landed mid-way, and both kinds of refusal happened.
    assert TOTAL * 0.3 <= triggered_at["shutdown"] < triggered_at["force"] < TOTAL
    assert refused["cancel"] > refused["drain"] > 0
    assert 0 < sum(refused_before_close.values()) < sum(refused.values())
    assert report.forced

    for group in GROUPS:
        counts = report.groups[group]
        states = Counter(h.state for h in accepted[group])
        assert set(states) <= {"completed", "failed", "cancelled"}, states
        assert counts.stuck == 0
        assert counts.completed == states["completed"]
        assert counts.failed == states["failed"]
        assert counts.cancelled == states["cancelled"]
        assert counts.refused == refused_before_close[group]
        for handle in accepted[group]:
            job_id = int(handle.name)
            # The job agrees with its handle; a job cancelled before it ever ran saw nothing.
            assert seen.get(job_id, "cancelled") == handle.state, (job_id, handle.state)
        # the guard's own bookkeeping is empty
        assert guard.stats().groups[group].running == 0
        assert guard.stats().groups[group].pending == 0
    assert report.groups["drain"].completed > 0
    assert report.groups["cancel"].cancelled > 0

    # No leak: once the test drops its handles, nothing keeps them (or their
    # coroutines) alive: not the guard, not its groups, not the event loop.
    refs = [weakref.ref(h) for handles in accepted.values() for h in handles]
    accepted.clear()
    handle = None  # type: ignore[assignment]
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == [], alive[:5]
    assert guard.state.value == "closed"
    # ... and every failure was logged, with its traceback
    failures = sum(report.groups[g].failed for g in GROUPS)
    assert failures > 0
    assert log.getvalue().count("ValueError: job") == failures
