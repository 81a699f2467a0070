"""Case: durable tasks (issue 15): acknowledged spawns/s, resume latency, the cut.

- **spawn**: 1,000 concurrent spawners each ``await fn.spawn(i)`` in a loop, on
  a fresh SQLite journal (and PostgreSQL, a throwaway cluster with default
  durability settings, when its binaries and psycopg are here). The rate counts
  acknowledged spawns (the entry committed) per second of wall time. The same
  spawners with a plain ``guard.spawn`` are the baseline; "added per spawn" is
  (durable time - plain time) / spawns, per sample, p50 over the samples.
  The acknowledgement latency of single spawns (p50, p99) is printed beside it:
  with 1,000 spawners it is one group commit's worth of waiting, by design.
- **resume**: 10,000 entries journaled (no owner); a guard starts: the time from
  entering ``async with`` to the first resumed task running, and to
  ``__aenter__`` returning (all 10,000 re-spawned).
- **cut**: 10,000 ``journal_on="cut"`` tasks blocked at the exit wait: the time
  to write them (the guard's ``save_cut`` step, timed around the call).
- **dbos**: DBOS's workflow start rate on SQLite in the same run, when a
  separate venv with ``dbos`` exists (``DBOS_VENV``, default ``/tmp/dbos-venv``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import anyio

import taskguard
from taskguard import TaskGuard
from taskguard._journal import Batch, Entry, open_journal

from ._core import Measurement, Settings, Target, have

CASE = "durable"
RESUMED: list[float] = []


@taskguard.durable(name="bench.noop")
async def noop(i: int) -> None:
    return None


@taskguard.durable(name="bench.first")
async def first(i: int) -> None:
    if not RESUMED:
        RESUMED.append(perf_counter())


@taskguard.durable(name="bench.blocked", journal_on="cut")
async def blocked(i: int) -> None:
    await anyio.sleep_forever()


async def _spawners(
    spawn: Callable[[int], Awaitable[Any]], spawners: int, each: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def one(base: int) -> None:
        for i in range(each):
            t = perf_counter()
            await spawn(base + i)
            latencies.append(perf_counter() - t)

    t0 = perf_counter()
    async with anyio.create_task_group() as tg:
        for s in range(spawners):
            tg.start_soon(one, s * each)
    return perf_counter() - t0, latencies


def _spawn_sample(url: str | None, spawners: int, each: int) -> tuple[float, list[float]]:
    async def main() -> tuple[float, list[float]]:
        if url is None:
            async with TaskGuard() as guard:

                async def plain(i: int) -> None:
                    guard.spawn(noop.fn, i)

                return await _spawners(plain, spawners, each)
        async with TaskGuard(journal=url):
            return await _spawners(noop.spawn, spawners, each)

    return asyncio.run(main())


def _fresh_sqlite() -> str:
    return f"sqlite:///{tempfile.mkdtemp(prefix='tg-bench-')}/journal.db"


def _fresh_pg(server: str) -> str:
    import psycopg

    name = f"bench_{time.monotonic_ns()}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name


def _spawn_case(
    label: str, fresh: Callable[[], str], settings: Settings, spawners: int, each: int, limit: float
) -> tuple[list[Measurement], list[Target]]:
    polls = _poll_cost(fresh())
    rescue = [_rescue_latency(fresh()) for _ in range(1 if settings.quick else 3)]
    n = spawners * each
    durable_t: list[float] = []
    plain_t: list[float] = []
    lat: list[float] = []
    _spawn_sample(fresh(), spawners, max(1, each // 10))  # warm-up
    for _ in range(settings.repeats):
        t, latencies = _spawn_sample(fresh(), spawners, each)
        durable_t.append(t)
        lat = latencies
        plain_t.append(_spawn_sample(None, spawners, each)[0])
    rates = [n / t for t in durable_t]
    added = [(d - p) / n for d, p in zip(durable_t, plain_t, strict=True)]
    lat.sort()
    note = (
        f"{n} spawns by {spawners} spawners; ack latency p50 {lat[len(lat) // 2] * 1e3:.2f} ms, "
        f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms (one group commit's wait); "
        f"plain guard.spawn {statistics.median([n / t for t in plain_t]):,.0f}/s"
    )
    ms = [
        Measurement(CASE, f"spawn {label}", "durable spawn", "spawns/s", rates, note=note,
                    higher_is_better=True),
        Measurement(CASE, f"spawn {label}", "added per spawn", "s", added),
        Measurement(CASE, f"rescue {label}", "idle rescue poll", "s", polls,
                    note="a claim finding nothing, 1,000 entries held by a live owner"),
        Measurement(CASE, f"rescue {label}", "SIGKILL to rescued", "s", rescue,
                    note="20 stalled acknowledged tasks, a live process polling, lease 60 s"),
    ]  # fmt: skip
    targets = [
        Target(CASE, f"spawn {label}", "acknowledged spawns/s", statistics.median(rates), ">=",
               limit, unit="spawns/s"),
    ]  # fmt: skip
    if label == "sqlite":
        targets.append(
            Target(CASE, "spawn sqlite", "p50 added per spawn", statistics.median(added), "<=",
                   50e-6, unit="s")
        )  # fmt: skip
    return ms, targets


def _journal_entries(url: str, name: str, n: int) -> None:
    async def fill() -> None:
        journal = open_journal(url)
        await journal.open(None, 30.0)
        now = time.time()
        await journal.apply(
            Batch(inserts=[Entry(f"{i:012d}", name, "default", f'{{"i":{i}}}', None, 1, now)
                           for i in range(n)])
        )  # fmt: skip
        await journal.close()

    anyio.run(fill)


def _resume_sample(n: int) -> tuple[float, float]:
    url = _fresh_sqlite()
    _journal_entries(url, first.name, n)
    RESUMED.clear()

    async def main() -> tuple[float, float]:
        guard = TaskGuard(journal=url)
        t0 = perf_counter()
        async with guard:
            entered = perf_counter() - t0
            while not RESUMED:
                await anyio.sleep(0)
            return RESUMED[0] - t0, entered

    return asyncio.run(main())


def _cut_sample(n: int) -> float:
    url = _fresh_sqlite()
    took: list[float] = []

    async def main() -> None:
        guard = TaskGuard(journal=url, exit_wait_timeout=0.5, cancel_grace=5)
        async with guard:
            manager = guard._durable_manager()
            save = manager.save_cut

            async def timed(groups: set[str] | None) -> None:
                t = perf_counter()
                await save(groups)
                if groups is None:
                    took.append(perf_counter() - t)

            manager.save_cut = timed  # type: ignore[method-assign]
            for i in range(n):
                await blocked.spawn(i)
        report = guard.report.durable
        assert report is not None, "no durable report"
        assert report.saved_at_cut == n, report

    asyncio.run(main())
    return took[0]


def _poll_cost(url: str, held: int = 1000, polls: int = 200) -> list[float]:
    """The idle rescue poll: ``held`` entries all held by a live owner, nothing to claim."""

    async def main() -> list[float]:
        journal = open_journal(url)
        await journal.open(f"{os.getpid():016x}", 30.0)
        now = time.time()
        await journal.apply(
            Batch(inserts=[Entry(f"p{i:08d}", noop.name, "default", '{"i":0}', None, 1, now,
                                 owner=f"{os.getpid():016x}", lease_until=now + 3600)
                           for i in range(held)])
        )  # fmt: skip
        other = open_journal(url)
        await other.open(f"{os.getpid() + 1:016x}", 30.0)
        times = []
        for _ in range(polls):
            t = perf_counter()
            assert await other.claim([noop.name], 100) == []
            times.append(perf_counter() - t)
        await other.close()
        await journal.close()
        return times

    return asyncio.run(main())


def _rescue_latency(url: str) -> float:
    """Seconds from SIGKILLing a process that holds acknowledged (stalled) tasks to
    the last of them done by a live process (lease 60 s: liveness detection)."""
    import sqlite3

    from ._durable_worker import init_effects
    from .durable_soak import Worker, parse

    work = Path(tempfile.mkdtemp(prefix="tg-rescue-"))
    effects = work / "effects.db"
    init_effects(str(effects))
    args = parse(["--journal", url, "--lease", "60"])
    rescuer = Worker(args, effects, "rescuer", spawn=False)
    victim = Worker(args, effects, "victim", spawn=True, env={"SOAK_STALL": "1"})
    try:
        rescuer.ready.wait(60)
        while len(victim.acked) < 20:
            time.sleep(0.01)
        victim.kill()
        acked = set(victim.acked)
        killed = perf_counter()
        while True:
            conn = sqlite3.connect(effects)
            done = {k for (k,) in conn.execute("SELECT key FROM effects")}
            conn.close()
            if acked <= done or perf_counter() - killed > 60:
                return perf_counter() - killed
            time.sleep(0.005)
    finally:
        rescuer.stop()
        victim.kill()


def _dbos(n: int, repeats: int) -> Measurement | None:
    venv = Path(os.environ.get("DBOS_VENV", "/tmp/dbos-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    script = Path(__file__).with_name("_dbos_start.py")
    rates = []
    for _ in range(repeats):
        out = subprocess.run([str(python), str(script), str(n)], capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        if out.returncode:
            return Measurement(CASE, "spawn sqlite", "DBOS start_workflow_async", "spawns/s", [0.0],
                               note=f"DBOS failed: {out.stderr.strip()[-300:]}")  # fmt: skip
        rates.append(json.loads(out.stdout.strip().splitlines()[-1])["rate"])
    note = f"DBOS {n} workflow starts, SQLite system database, 1 process"
    return Measurement(CASE, "spawn sqlite", "DBOS start_workflow_async", "spawns/s", rates,
                       higher_is_better=True, note=note)  # fmt: skip


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    spawners, each = (1000, 5) if settings.quick else (1000, 30)
    n = 2000 if settings.quick else 10_000
    ms, targets = _spawn_case("sqlite", _fresh_sqlite, settings, spawners, each, 20_000)
    # DBOS starts ~100 workflows/s here: fewer, or its rows alone take minutes
    dbos = _dbos(min(spawners * each, 5000), 1 if settings.quick else 3)
    if dbos is not None:
        ms.append(dbos)
    if have("psycopg"):
        from ._pg import Cluster, find_bindir

        bindir = find_bindir()
        if bindir is not None:
            with Cluster(bindir, fsync=True) as server:
                pg_ms, pg_t = _spawn_case(
                    "postgresql", lambda: _fresh_pg(server), settings, spawners, each, 5_000
                )
            ms += pg_ms
            targets += pg_t
    resume = [_resume_sample(n) for _ in range(settings.repeats)]
    first_run = [r[0] for r in resume]
    entered = statistics.median(r[1] for r in resume) * 1e3
    note = f"after entering `async with guard`; all re-spawned in {entered:.1f} ms (median)"
    ms.append(Measurement(CASE, f"resume {n}", "first resumed task runs", "s", first_run,
                          note=note))  # fmt: skip
    targets.append(Target(CASE, f"resume {n}", "first resumed task after start",
                          statistics.median(first_run), "<=", 0.1, unit="s"))  # fmt: skip
    cut = [_cut_sample(n) for _ in range(settings.repeats)]
    ms.append(Measurement(CASE, f"cut {n}", "cut tasks written", "s", cut))
    targets.append(Target(CASE, f"cut {n}", "write the cut tasks", statistics.median(cut), "<=",
                          0.1, unit="s"))  # fmt: skip
    return ms, targets
