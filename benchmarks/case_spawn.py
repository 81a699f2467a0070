"""Case 1: spawn → all complete, per task.

Baseline: ``asyncio.create_task`` with a reference set and a discard
done-callback (what a careful user writes by hand). Peers: asyncio.TaskGroup,
anyio ``start_soon``, aiojobs ``Scheduler.spawn``. On trio: nursery
``start_soon`` vs ``taskguard.spawn``, with a reference row: a nursery task
that only enters a CancelScope of its own (taskguard gives each task one, so
that it can be cancelled alone: that row is the floor). The task bodies are empty, so the
figure is the pure per-task overhead (the worst case for any ratio).
Target: taskguard.spawn ≤ 1.3x the baseline; on trio ≤ 1.2x the nursery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter

import anyio

from taskguard import TaskGuard

from ._core import Measurement, Settings, Target, have, interleave, link, run_asyncio, run_trio

CASE = "spawn"


async def _job() -> None:
    return None


def _baseline(n: int) -> float:
    async def main() -> float:
        tasks: set[asyncio.Task[None]] = set()
        discard = tasks.discard
        create_task = asyncio.create_task
        t0 = perf_counter()
        for _ in range(n):
            task = create_task(_job())
            tasks.add(task)
            task.add_done_callback(discard)
        while tasks:
            await asyncio.sleep(0)
        return (perf_counter() - t0) / n

    return run_asyncio(main)  # type: ignore[no-any-return]


def _taskgroup(n: int) -> float:
    async def main() -> float:
        t0 = perf_counter()
        async with asyncio.TaskGroup() as tg:  # type: ignore[attr-defined,unused-ignore]
            create_task = tg.create_task
            for _ in range(n):
                create_task(_job())
        return (perf_counter() - t0) / n

    return run_asyncio(main)  # type: ignore[no-any-return]


def _anyio(n: int) -> float:
    async def main() -> float:
        t0 = perf_counter()
        async with anyio.create_task_group() as tg:
            start_soon = tg.start_soon
            for _ in range(n):
                start_soon(_job)
        return (perf_counter() - t0) / n

    return run_asyncio(main)  # type: ignore[no-any-return]


def _aiojobs(n: int) -> float:
    import aiojobs

    async def main() -> float:
        scheduler = aiojobs.Scheduler(limit=None, wait_timeout=None)
        spawn = scheduler.spawn
        t0 = perf_counter()
        for _ in range(n):
            await spawn(_job())
        await scheduler.wait_and_close()
        return (perf_counter() - t0) / n

    return run_asyncio(main)  # type: ignore[no-any-return]


async def _wait_idle(guard: TaskGuard, sleep0: object) -> None:
    # Empty bodies finish within a loop iteration or two: yield until the
    # group is empty (a handful of iterations, not a polling interval).
    while guard.stats().groups["default"].running:
        await sleep0()  # type: ignore[operator]


def _taskguard(n: int, coro_form: bool) -> float:
    async def main() -> float:
        async with TaskGuard() as guard:
            spawn = guard.spawn
            t0 = perf_counter()
            if coro_form:
                for _ in range(n):
                    spawn(_job())
            else:
                for _ in range(n):
                    spawn(_job)
            await _wait_idle(guard, lambda: asyncio.sleep(0))
            elapsed = perf_counter() - t0
            assert guard.stats().groups["default"].running == 0
        return elapsed / n

    return run_asyncio(main)  # type: ignore[no-any-return]


async def _scoped_job() -> None:
    # The floor of any design in which each task can be cancelled on its own
    # on trio: a nursery task that only enters a CancelScope of its own.
    import trio

    with trio.CancelScope():
        return None


def _trio_nursery(n: int, job: Callable[[], Awaitable[None]] = _job) -> float:
    import trio

    async def main() -> float:
        t0 = perf_counter()
        async with trio.open_nursery() as nursery:
            start_soon = nursery.start_soon
            for _ in range(n):
                start_soon(job)
        return (perf_counter() - t0) / n

    return run_trio(main)  # type: ignore[no-any-return]


def _trio_taskguard(n: int) -> float:
    import trio

    async def main() -> float:
        async with TaskGuard() as guard:
            spawn = guard.spawn
            t0 = perf_counter()
            for _ in range(n):
                spawn(_job)
            await _wait_idle(guard, lambda: trio.sleep(0))
            elapsed = perf_counter() - t0
        return elapsed / n

    return run_trio(main)  # type: ignore[no-any-return]


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    measurements: list[Measurement] = []
    targets: list[Target] = []
    sizes = settings.pick((1_000, 10_000, 100_000), (1_000, 10_000))
    for n in sizes:
        variant = f"N={n:,}"
        repeats = settings.repeats if n < 100_000 else max(3, settings.repeats // 2)
        impls: dict[str, Callable[[], float]] = {
            "create_task+set (baseline)": partial(_baseline, n),
            "asyncio.TaskGroup": partial(_taskgroup, n),
            "anyio start_soon": partial(_anyio, n),
            "aiojobs spawn": partial(_aiojobs, n),
            "taskguard.spawn(coro)": partial(_taskguard, n, True),
            "taskguard.spawn(fn)": partial(_taskguard, n, False),
        }
        if not hasattr(asyncio, "TaskGroup"):  # Python 3.10
            del impls["asyncio.TaskGroup"]
        samples = interleave(impls, repeats)
        group = [Measurement(CASE, variant, k, "s", v) for k, v in samples.items()]
        measurements += link(group, "create_task+set (baseline)")
        for m in group:
            if m.impl.startswith("taskguard") and m.ratio is not None:
                targets.append(Target(CASE, variant, f"{m.impl} / baseline", m.ratio, "<=", 1.3))

        if not have("trio"):
            print("  trio variants skipped: trio is not installed")
            continue
        trio_samples = interleave(
            {
                "trio nursery.start_soon (baseline)": partial(_trio_nursery, n),
                "nursery task in its own CancelScope": partial(_trio_nursery, n, _scoped_job),
                "taskguard.spawn(fn) on trio": partial(_trio_taskguard, n),
            },
            repeats,
        )
        tgroup = [Measurement(CASE + "-trio", variant, k, "s", v) for k, v in trio_samples.items()]
        measurements += link(tgroup, "trio nursery.start_soon (baseline)")
        tgroup[1].note = "the floor of a design where each task can be cancelled on its own"
        ratio = tgroup[2].ratio
        assert ratio is not None
        targets.append(
            Target(CASE + "-trio", variant, "taskguard on trio / nursery", ratio, "<=", 1.2)
        )
    return measurements, targets
