"""Durable tasks on the PostgreSQL journal: a throwaway cluster started by the tests.

The cluster (``initdb`` + ``pg_ctl``, fsync off) starts once per session; each
test gets a database of its own. Without PostgreSQL or psycopg the tests skip,
with ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import taskguard
from taskguard import GuardConfig, TaskGuard, durable_context
from taskguard._journal import Batch, Entry, open_journal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_durable_process import check_soak  # noqa: E402

from benchmarks._pg import Cluster, find_bindir  # noqa: E402

RUNS: list[tuple[int, int]] = []


def _missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL (initdb, pg_ctl) is not installed; .ci/run installs it")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (the dev extra installs it)")
    assert bindir is not None
    cluster = Cluster(bindir, fsync=False)
    url = cluster.start()
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture
def pg(pg_server: str, request: pytest.FixtureRequest) -> str:
    """The URL of a fresh database for this test."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    RUNS.clear()
    return pg_server.rsplit("/", 1)[0] + "/" + name


def entries(url: str) -> list[Any]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id, owner, attempt, key FROM taskguard_entries").fetchall()


@taskguard.durable(max_attempts=2, backoff=0.01)
async def pg_job(x: int) -> int:
    RUNS.append((x, durable_context().attempt))
    if x < 0:
        raise ValueError("negative")
    if x >= 100:
        await anyio.sleep_forever()
    return x


@pytest.mark.anyio
async def test_write_ahead_retry_dead_letter_and_keys(pg: str) -> None:
    async with TaskGuard(journal=pg) as guard:
        blocked = await pg_job.spawn(100, key="k")
        assert await pg_job.spawn(100, key="k") is blocked
        ((_, owner, attempt, key),) = entries(pg)
        assert owner is not None
        assert (attempt, key) == (1, "k")
        blocked.cancel()
        assert await (await pg_job.spawn(5)).wait() == 5
        with pytest.raises(ValueError, match="negative"):
            await (await pg_job.spawn(-1)).wait()
    assert entries(pg) == []
    journal = open_journal(pg)
    await journal.open(None, 30)
    (dead,) = await journal.dead_letters(limit=10)
    await journal.close()
    assert (dead.attempts, dead.error) == (2, "ValueError: negative")
    report = guard.report.durable
    assert report is not None
    assert (report.journaled, report.completed, report.retried, report.dead_lettered) == (
        3,
        1,
        1,
        1,
    )


@pytest.mark.anyio
async def test_cut_then_resumed_by_the_next_start(pg: str) -> None:
    cfg = GuardConfig(journal=pg, exit_wait_timeout=0.2, cancel_grace=0.5)
    async with TaskGuard(cfg):
        await pg_job.spawn(100)
        await anyio.sleep(0.05)
    ((_, owner, attempt, _),) = entries(pg)
    assert (owner, attempt) == (None, 1)
    async with TaskGuard(cfg) as guard:
        await anyio.sleep(0.05)
    assert RUNS == [(100, 1), (100, 1)]
    assert guard.report.durable is not None
    assert guard.report.durable.resumed == 1


@pytest.mark.anyio
async def test_claims_skip_locked_and_a_dead_sessions_entries_are_claimable_at_once(
    pg: str,
) -> None:
    """Two owners claim concurrently: disjoint sets. An owner whose session ended
    (its advisory lock dropped) loses its entries at once, lease or not; a live
    owner with a valid lease keeps them."""
    holder = open_journal(pg)
    await holder.open("00000000000000aa", 3600)
    await holder.apply(
        Batch(inserts=[Entry(f"e{i:03d}", pg_job.name, "default", '{"x":1}', None, 1, 0.0)
                       for i in range(200)])
    )  # fmt: skip
    a, b = open_journal(pg), open_journal(pg)
    await a.open("00000000000000a1", 3600)
    await b.open("00000000000000b1", 3600)
    got: dict[str, list[Entry]] = {}

    async def take(name: str, journal: Any) -> None:
        got[name] = await journal.claim([pg_job.name], 150)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "a", a)
        tg.start_soon(take, "b", b)
    ids_a, ids_b = {e.id for e in got["a"]}, {e.id for e in got["b"]}
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == 200
    assert await holder.claim([pg_job.name], 10) == []  # all held by live owners
    await b.close()  # gives b's back: claimable, attempt unchanged
    again = await holder.claim([pg_job.name], 500)
    assert {e.id for e in again} == ids_b
    assert {(e.attempt, e.recoveries) for e in again} == {(1, 0)}
    await a._call(lambda conn: conn.close())  # type: ignore[attr-defined]  # a "dies"
    rescued: list[Entry] = []
    with anyio.fail_after(10):  # the server ends the session (and drops its lock) just after
        while not rescued:
            rescued = await holder.claim([pg_job.name], 500)
            await anyio.sleep(0.01)
    assert {e.id for e in rescued} == ids_a
    assert {(e.attempt, e.recoveries) for e in rescued} == {(1, 1)}  # its owner died
    await holder.close()


def test_three_processes_sigkill_soak(pg: str, tmp_path: Path) -> None:
    """Three worker processes on one PostgreSQL journal, one SIGKILLed at random
    each cycle and restarted; the live ones rescue its entries."""
    check_soak(tmp_path, "--journal", pg, "--procs", "3", "--cycles", "4", "--seed", "3")
