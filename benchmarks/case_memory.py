"""Case 5: memory per pending task (tracemalloc and RSS; and gc-tracked objects).

Each figure comes from a fresh subprocess (``python -m benchmarks.case_memory
IMPL N``), so one measurement's allocator state never leaks into the
next. A pending task is a started task awaiting a shared future. Target:
taskguard ≤ 1.3x a raw task (create_task + reference set + done callback).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tracemalloc

from ._core import Measurement, Settings, Target, link

IMPLS = {
    "raw": "create_task+set (baseline)",
    "taskguard": "taskguard.spawn",
    "aiojobs": "aiojobs spawn",
    "anyio": "anyio start_soon",
    "taskgroup": "asyncio.TaskGroup",
}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def _measure(impl: str, n: int, mode: str) -> float:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def pending() -> None:
        await gate

    def probe() -> int:
        gc.collect()
        if mode == "objects":  # objects the garbage collector tracks (and traverses)
            return len(gc.get_objects())
        return tracemalloc.get_traced_memory()[0] if mode == "tracemalloc" else _rss()

    if impl == "raw":
        tasks: set[asyncio.Task[None]] = set()
        before = probe()
        for _ in range(n):
            task = asyncio.create_task(pending())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0)
        after = probe()
        gate.set_result(None)
        while tasks:
            await asyncio.sleep(0)
    elif impl == "taskguard":
        from taskguard import TaskGuard

        async with TaskGuard() as guard:
            before = probe()
            for _ in range(n):
                guard.spawn(pending())
            await asyncio.sleep(0)
            after = probe()
            gate.set_result(None)
    elif impl == "aiojobs":
        import aiojobs

        scheduler = aiojobs.Scheduler(limit=None)
        before = probe()
        for _ in range(n):
            await scheduler.spawn(pending())
        await asyncio.sleep(0)
        after = probe()
        gate.set_result(None)
        await scheduler.wait_and_close()
    elif impl == "anyio":
        import anyio

        async with anyio.create_task_group() as tg:
            before = probe()
            for _ in range(n):
                tg.start_soon(pending)
            await asyncio.sleep(0)
            after = probe()
            gate.set_result(None)
    else:
        async with asyncio.TaskGroup() as atg:  # type: ignore[attr-defined,unused-ignore]
            before = probe()
            for _ in range(n):
                atg.create_task(pending())
            await asyncio.sleep(0)
            after = probe()
            gate.set_result(None)
    return (after - before) / n


def _child(impl: str, n: int) -> None:
    # Import everything first: module objects are not per-task memory.
    import aiojobs  # noqa: F401
    import anyio  # noqa: F401

    import taskguard  # noqa: F401

    # RSS first, while the allocator is fresh; then tracemalloc, which counts
    # allocated bytes exactly (reused memory does not hide anything from it).
    rss = asyncio.run(_measure(impl, n, "rss"))
    objects = asyncio.run(_measure(impl, n, "objects"))
    tracemalloc.start()
    traced = asyncio.run(_measure(impl, n, "tracemalloc"))
    print(json.dumps({"rss": rss, "tracemalloc": traced, "objects": objects}))


def _sample(impl: str, n: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.case_memory", impl, str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    n = 20_000 if settings.quick else 100_000
    # The figures are deterministic to a few bytes from one process to the next:
    # more repeats only cost time (a full-size sample takes ~15 s).
    repeats = 1
    variant = f"N={n:,}"
    samples: dict[str, dict[str, list[float]]] = {
        mode: {label: [] for label in IMPLS.values()} for mode in ("tracemalloc", "rss", "objects")
    }
    impls = {k: v for k, v in IMPLS.items() if k != "taskgroup" or hasattr(asyncio, "TaskGroup")}
    samples = {mode: {label: [] for label in impls.values()} for mode in samples}
    for _ in range(repeats):
        for impl, label in impls.items():
            for mode, value in _sample(impl, n).items():
                samples[mode][label].append(value)
    measurements: list[Measurement] = []
    targets: list[Target] = []
    for mode, by_impl in samples.items():
        unit = "objects" if mode == "objects" else "B"
        group = [Measurement(f"memory-{mode}", variant, k, unit, v) for k, v in by_impl.items()]
        measurements += link(group, IMPLS["raw"])
        if mode == "objects":
            group[0].note = "gc-tracked objects per pending task: no target, explains GC cost"
            continue
        tg = next(m for m in group if m.impl == IMPLS["taskguard"])
        assert tg.ratio is not None
        targets.append(Target(f"memory-{mode}", variant, "taskguard / raw", tg.ratio, "<=", 1.3))
    return measurements, targets


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
