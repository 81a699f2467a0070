"""Cases 3 and 4: drain latency and cancel latency at the deadline.

Drain: N tasks sleeping 50 ms; the trigger comes once all are sleeping;
figure = trigger → closed, minus 50 ms. Peers: gather (the baseline),
TaskGroup, anyio task group, aiojobs ``wait_and_close``. Also, per
implementation, the tail: the last task's end → closed. Targets: taskguard ≤
1.0x gather's figure, and a tail < 1 ms.

Cancel: N tasks sleeping an hour; the deadline comes ``WAIT`` after the
trigger; figure = deadline → closed (all cancelled and accounted). Peers: raw
cancel-all + wait (the baseline), TaskGroup at a timeout, anyio task group at a
deadline, aiojobs close. Target: taskguard ≤ 1.2x raw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from time import perf_counter

import anyio

from taskguard import TaskGuard

from ._core import Measurement, Settings, Target, interleave, link, run_asyncio

SLEEP = 0.05
WAIT = 0.1  # the exit wait of the cancel case

# -- drain -------------------------------------------------------------------------


async def _sleeper(mark: list[float]) -> None:
    await asyncio.sleep(SLEEP)
    mark[0] = perf_counter()  # tasks end in timer order: the last write is the last end


def _drain(impl: str, n: int) -> tuple[float, float]:
    """(trigger → closed - 50 ms, last task's end → closed)."""

    async def main() -> tuple[float, float]:
        mark = [0.0]
        if impl == "gather":
            tasks = [asyncio.create_task(_sleeper(mark)) for _ in range(n)]
            await asyncio.sleep(0)
            t_trig = perf_counter()
            await asyncio.gather(*tasks)
        elif impl == "taskgroup":
            async with asyncio.TaskGroup() as tg:  # type: ignore[attr-defined,unused-ignore]
                for _ in range(n):
                    tg.create_task(_sleeper(mark))
                await asyncio.sleep(0)
                t_trig = perf_counter()
        elif impl == "anyio":
            async with anyio.create_task_group() as atg:
                for _ in range(n):
                    atg.start_soon(_sleeper, mark)
                await asyncio.sleep(0)
                t_trig = perf_counter()
        elif impl == "aiojobs":
            import aiojobs

            scheduler = aiojobs.Scheduler(limit=None, wait_timeout=60)
            for _ in range(n):
                await scheduler.spawn(_sleeper(mark))
            await asyncio.sleep(0)
            t_trig = perf_counter()
            await scheduler.wait_and_close()
        else:
            guard = TaskGuard(exit_wait_timeout=60)
            async with guard:
                for _ in range(n):
                    guard.spawn(_sleeper(mark))
                await asyncio.sleep(0)
                t_trig = perf_counter()  # the body ends: that triggers the shutdown
            assert guard.report.groups["default"].completed == n
        t_closed = perf_counter()
        return t_closed - t_trig - SLEEP, t_closed - mark[0]

    return run_asyncio(main)  # type: ignore[no-any-return]


# -- cancel ------------------------------------------------------------------------


async def _forever() -> None:
    await asyncio.sleep(3600)


def _cancel(impl: str, n: int) -> float:
    """Deadline (trigger + WAIT) → closed."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        if impl == "raw":
            tasks: set[asyncio.Task[None]] = set()
            empty = loop.create_future()

            def done(task: asyncio.Task[None]) -> None:
                tasks.discard(task)
                if not tasks and not empty.done():
                    empty.set_result(None)

            for _ in range(n):
                task = asyncio.create_task(_forever())
                tasks.add(task)
                task.add_done_callback(done)
            await asyncio.sleep(0)
            t_trig = perf_counter()
            await asyncio.sleep(WAIT)
            for task in list(tasks):
                task.cancel()
            await empty
        elif impl == "taskgroup":
            try:
                async with (
                    asyncio.timeout(None) as cm,  # type: ignore[attr-defined,unused-ignore]
                    asyncio.TaskGroup() as tg,  # type: ignore[attr-defined,unused-ignore]
                ):
                    for _ in range(n):
                        tg.create_task(_forever())
                    await asyncio.sleep(0)
                    t_trig = perf_counter()
                    cm.reschedule(loop.time() + WAIT)
            except TimeoutError:
                pass
        elif impl == "anyio":
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as atg:
                    for _ in range(n):
                        atg.start_soon(_forever)
                    await asyncio.sleep(0)
                    t_trig = perf_counter()
                    scope.deadline = anyio.current_time() + WAIT
        elif impl == "aiojobs":
            import aiojobs

            scheduler = aiojobs.Scheduler(limit=None, close_timeout=60)
            for _ in range(n):
                await scheduler.spawn(_forever())
            await asyncio.sleep(0)
            t_trig = perf_counter()
            await asyncio.sleep(WAIT)
            await scheduler.close()
        else:
            guard = TaskGuard(exit_wait_timeout=WAIT, cancel_grace=30)
            async with guard:
                for _ in range(n):
                    guard.spawn(_forever())
                await asyncio.sleep(0)
                t_trig = perf_counter()
            assert guard.report.groups["default"].cancelled == n
        return perf_counter() - (t_trig + WAIT)

    return run_asyncio(main)  # type: ignore[no-any-return]


def _impls(
    fn: Callable[[str, int], object], n: int, names: dict[str, str]
) -> dict[str, Callable[[], object]]:
    if not hasattr(asyncio, "TaskGroup"):  # Python 3.10
        names = {k: v for k, v in names.items() if k != "taskgroup"}
    return {label: partial(fn, impl, n) for impl, label in names.items()}


DRAIN = {
    "gather": "asyncio.gather (baseline)",
    "taskgroup": "asyncio.TaskGroup",
    "anyio": "anyio task group",
    "aiojobs": "aiojobs wait_and_close",
    "taskguard": "taskguard",
}
CANCEL = {
    "raw": "cancel-all + wait (baseline)",
    "taskgroup": "asyncio.TaskGroup at timeout",
    "anyio": "anyio task group at deadline",
    "aiojobs": "aiojobs close",
    "taskguard": "taskguard at exit_wait_timeout",
}


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    measurements: list[Measurement] = []
    targets: list[Target] = []
    sizes = settings.pick((1_000, 10_000, 100_000), (1_000,))
    for n in sizes:
        variant = f"N={n:,}"
        repeats = settings.repeats if n < 100_000 else max(3, settings.repeats // 2)
        drain: dict[str, list[tuple[float, float]]] = interleave(_impls(_drain, n, DRAIN), repeats)
        group = [Measurement("drain", variant, k, "s", [a for a, _ in v]) for k, v in drain.items()]
        measurements += link(group, DRAIN["gather"])
        tails = [
            Measurement("drain-tail", variant, k, "s", [b for _, b in v]) for k, v in drain.items()
        ]
        measurements += link(tails, DRAIN["gather"])
        tg = next(m for m in group if m.impl == "taskguard")
        tail = next(m for m in tails if m.impl == "taskguard")
        assert tg.ratio is not None
        targets.append(Target("drain", variant, "taskguard / gather", tg.ratio, "<=", 1.0))
        targets.append(
            Target("drain-tail", variant, "last task end → closed", tail.median, "<", 1e-3, "s")
        )

        cancel: dict[str, list[float]] = interleave(_impls(_cancel, n, CANCEL), repeats)
        group = [Measurement("cancel", variant, k, "s", v) for k, v in cancel.items()]
        measurements += link(group, CANCEL["raw"])
        tg = group[-1]
        assert tg.ratio is not None
        targets.append(Target("cancel", variant, "taskguard / raw cancel-all", tg.ratio, "<=", 1.2))
    return measurements, targets
