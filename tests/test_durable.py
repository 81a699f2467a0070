"""Durable tasks on the SQLite journal, in one process, on asyncio and trio.

Real SQLite files in tmp dirs; the journal is read back with the stdlib
``sqlite3`` to check what was (and was not) written.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

import taskguard
from taskguard import GuardConfig, JournalError, TaskCancelledError, TaskGuard, durable_context

pytestmark = pytest.mark.anyio

RUNS: list[tuple[str, Any, int, str | None]] = []
GATE: dict[str, anyio.Event] = {}


def rows(db: Path, table: str = "taskguard_entries") -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    RUNS.clear()
    GATE.clear()
    RECOVERIES.clear()
    return tmp_path / "journal.db"


def url(db: Path) -> str:
    return f"sqlite:///{db}"


RECOVERIES: dict[int, int] = {}


@taskguard.durable()
async def record(x: int, label: str = "") -> int:
    ctx = durable_context()
    RUNS.append(("record", x, ctx.attempt, ctx.key))
    RECOVERIES[x] = ctx.recoveries
    return x * 2


@taskguard.durable(max_attempts=3, backoff=0.01)
async def flaky(fail_times: int) -> str:
    ctx = durable_context()
    RUNS.append(("flaky", fail_times, ctx.attempt, ctx.key))
    if ctx.attempt <= fail_times:
        raise ValueError(f"failure {ctx.attempt}")
    return "done"


@taskguard.durable()
async def held(x: int) -> int:
    """Blocks until GATE['held'] is set (created on first use)."""
    ctx = durable_context()
    RUNS.append(("held", x, ctx.attempt, ctx.key))
    gate = GATE.setdefault("held", anyio.Event())
    await gate.wait()
    return x


@taskguard.durable(journal_on="cut")
async def cut_job(x: int) -> int:
    RUNS.append(("cut_job", x, durable_context().attempt, None))
    if "cut_job" not in GATE:  # the first run blocks until cut; a resumed one completes
        await anyio.sleep_forever()
    return x


@taskguard.durable()
async def shapes(a: int, /, *more: int, flag: bool = False, **extra: str) -> None:
    RUNS.append(("shapes", (a, more, flag, extra), durable_context().attempt, None))
    if "shapes" not in GATE:
        await anyio.sleep_forever()


@taskguard.durable()
async def anything(value: Any) -> None:
    RUNS.append(("anything", value, 1, None))


async def test_spawn_is_acknowledged_once_journaled_and_deleted_on_completion(db: Path) -> None:
    async with TaskGuard(journal=url(db)) as guard:
        handle = await held.spawn(7)
        # acknowledged: the entry is committed, owned by this process
        (entry,) = rows(db)
        assert entry["name"] == held.name == f"{__name__}:held"
        assert entry["attempt"] == 1
        assert entry["owner"] is not None
        assert '"x":7' in entry["payload"]
        GATE.setdefault("held", anyio.Event()).set()
        assert await handle.wait() == 7
    assert rows(db) == []
    durable = guard.report.durable
    assert durable is not None
    assert (durable.journaled, durable.completed) == (1, 1)
    assert "durable (sqlite:///" in guard.report.summary()


async def test_retried_with_backoff_then_dead_lettered(db: Path) -> None:
    async with TaskGuard(journal=url(db)):
        ok = await flaky.spawn(2)
        assert await ok.wait() == "done"
        bad = await flaky.spawn(5)
        with pytest.raises(ValueError, match="failure 3"):
            await bad.wait()
    assert [r[2] for r in RUNS if r[1] == 2] == [1, 2, 3]
    assert [r[2] for r in RUNS if r[1] == 5] == [1, 2, 3]
    assert rows(db) == []
    (dead,) = rows(db, "taskguard_dead")
    assert dead["attempts"] == 3
    assert dead["error"] == "ValueError: failure 3"
    assert '"fail_times":5' in dead["payload"]


async def test_a_journaled_key_returns_the_existing_handle(db: Path) -> None:
    async with TaskGuard(journal=url(db)):
        first, second = await held.spawn(1, key="k1"), await held.spawn(2, key="k1")
        assert first is second
        GATE.setdefault("held", anyio.Event()).set()
        await first.wait()
    assert [r for r in RUNS if r[0] == "held"] == [("held", 1, 1, "k1")]


async def test_concurrent_spawns_share_a_commit_and_run_once_per_key(db: Path) -> None:
    handles: dict[int, Any] = {}

    async def spawn(i: int) -> None:
        handles[i] = await held.spawn(i, key=f"k{i % 10}")

    async with TaskGuard(journal=url(db)):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(spawn, i)
        assert len(rows(db)) == 10  # one entry per key
        for i in range(50):
            assert handles[i] is handles[i % 10]
        GATE.setdefault("held", anyio.Event()).set()
    assert sorted(str(r[3]) for r in RUNS) == sorted(f"k{i}" for i in range(10))


async def test_arguments_are_validated_and_refused_naming_the_argument(db: Path) -> None:
    async with TaskGuard(journal=url(db)):
        with pytest.raises(ValueError, match="invalid argument 'x'"):
            await record.spawn("not a number")
        with pytest.raises(ValueError, match="argument 'value' cannot be journaled"):
            await anything.spawn(object())
        with pytest.raises(TypeError, match="missing a required argument: 'x'"):
            await record.spawn()
        with pytest.raises(TypeError, match=r"key=.* must be a str"):
            await record.spawn(1, key=5)  # type: ignore[arg-type]
    assert rows(db) == []
    assert RUNS == []


async def test_cut_at_the_deadline_then_resumed_by_the_next_start(db: Path) -> None:
    cfg = GuardConfig(journal=url(db), exit_wait_timeout=0.2, cancel_grace=0.5)
    async with TaskGuard(cfg) as guard:
        await held.spawn(3, key="order-3")
        await anyio.sleep(0.05)
    assert guard.report.groups["default"].cut == 1
    (entry,) = rows(db)
    assert entry["owner"] is None  # given back at close: the next start takes it at once
    assert entry["attempt"] == 1  # a graceful cut gives its attempt back
    GATE["held"] = anyio.Event()
    GATE["held"].set()
    async with TaskGuard(cfg) as guard:
        pass  # resumed before the body runs; the drain awaits it
    assert RUNS == [("held", 3, 1, "order-3"), ("held", 3, 1, "order-3")]
    assert guard.report.durable is not None
    assert guard.report.durable.resumed == 1
    assert rows(db) == []


async def test_every_parameter_kind_round_trips_through_the_journal(db: Path) -> None:
    cfg = GuardConfig(journal=url(db), exit_wait_timeout=0.2, cancel_grace=0.5)
    async with TaskGuard(cfg):
        await shapes.spawn(1, 2, "3", flag=True, colour="red")
        with pytest.raises(TypeError, match="multiple values for argument"):
            await record.spawn(1, x=2)
        with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
            await record.spawn(1, y=2)
        await anyio.sleep(0.05)
    GATE["shapes"] = anyio.Event()
    async with TaskGuard(cfg):
        pass
    expected = (1, (2, 3), True, {"colour": "red"})
    assert [r[1] for r in RUNS] == [expected, expected]  # as spawned, then as resumed


async def test_cut_mode_writes_nothing_until_the_deadline(db: Path) -> None:
    cfg = GuardConfig(journal=url(db), exit_wait_timeout=0.2, cancel_grace=0.5)
    async with TaskGuard(cfg) as guard:
        await cut_job.spawn(11)
        await anyio.sleep(0.05)
        assert rows(db) == []  # the normal path writes nothing
    assert guard.report.durable is not None
    assert guard.report.durable.saved_at_cut == 1
    (entry,) = rows(db)
    assert entry["owner"] is None
    assert '"x":11' in entry["payload"]
    GATE["cut_job"] = anyio.Event()
    async with TaskGuard(cfg) as guard:
        pass
    assert [r[1] for r in RUNS] == [11, 11]
    assert guard.report.durable is not None
    assert guard.report.durable.resumed == 1
    assert rows(db) == []


async def test_a_task_cancelled_by_its_caller_leaves_the_journal(db: Path) -> None:
    async with TaskGuard(journal=url(db)):
        handle = await held.spawn(1)
        await anyio.sleep(0.02)
        handle.cancel()
        with pytest.raises(TaskCancelledError):
            await handle.wait()
    assert rows(db) == []


async def test_durable_spawn_needs_a_journal_and_a_started_guard(db: Path) -> None:
    guard = TaskGuard()
    with pytest.raises(taskguard.NotStartedError):
        await guard.spawn_durable(record, 1)
    async with guard:
        with pytest.raises(JournalError, match="has no journal"):
            await record.spawn(1)
    assert guard.report.durable is None
    assert "durable" not in guard.report.summary()
    with pytest.raises(TypeError, match="declared with @durable"):
        async with TaskGuard(journal=url(db)) as g:
            await g.spawn_durable(record.fn, 1)  # type: ignore[arg-type]


async def test_guard_bound_declaration(db: Path) -> None:
    guard = TaskGuard(journal=url(db))

    @guard.durable(name="bound-job")
    async def job(n: int) -> int:
        return n + 1

    async with guard:
        assert await (await job.spawn(1)).wait() == 2
        assert await job(5) == 6  # a plain call runs it inline
    assert guard.report.durable is not None
    assert guard.report.durable.completed == 1


async def test_entries_of_a_dead_owner_are_claimed_at_once_and_expired_leases_too(
    db: Path, tmp_path: Path
) -> None:
    import fcntl
    import os
    import time

    async with TaskGuard(journal=url(db)):
        pass  # creates the tables
    conn = sqlite3.connect(db)
    live = os.open(f"{db}.owners/alive.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(live, fcntl.LOCK_EX)  # an owner that is alive (its lock is held)
    far = time.time() + 3600
    entries = [
        ("a1", "dead", far, 1),  # no lock file: its process is gone -> claimed, recovered
        ("a2", "alive", far, 2),  # alive with a valid lease -> left alone
        ("a3", "alive", time.time() - 1, 3),  # alive but its lease expired -> rescued
    ]
    for i, owner, lease, x in entries:
        conn.execute(
            "INSERT INTO taskguard_entries (id, name, grp, payload, key, attempt, created, owner,"
            " lease_until) VALUES (?, ?, 'default', ?, NULL, 1, 0, ?, ?)",
            (i, record.name, f'{{"x":{x}}}', owner, lease),
        )
    conn.commit()
    conn.close()
    try:
        async with TaskGuard(journal=url(db)) as guard:
            pass
    finally:
        os.close(live)
    assert sorted((r[1], r[2]) for r in RUNS) == [(1, 1), (3, 1)]  # attempts: failures only
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT recoveries FROM taskguard_entries").fetchall() == [(0,)]
    conn.close()
    assert RECOVERIES == {1: 1, 3: 1}
    assert [r["id"] for r in rows(db)] == ["a2"]
    assert guard.report.durable is not None
    assert guard.report.durable.resumed == 2


def test_declaration_errors() -> None:
    def sync_fn() -> None: ...

    with pytest.raises(TypeError, match="async function"):
        taskguard.durable()(sync_fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        taskguard.durable(max_attempts=0)(record.fn)
    with pytest.raises(ValueError, match="journal_on"):
        taskguard.durable(journal_on="never")(record.fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already declared"):

        @taskguard.durable(name=record.name)
        async def other(x: int) -> None: ...

    with pytest.raises(TypeError, match="named 'key'"):

        @taskguard.durable(name="with-key")
        async def keyed(key: str) -> None: ...

    with pytest.raises(TypeError, match="with parentheses"):
        taskguard.durable(record.fn)  # type: ignore[arg-type]


def test_journal_and_lease_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKGUARD_JOURNAL", "sqlite:///from-env.db")
    monkeypatch.setenv("TASKGUARD_LEASE_TIMEOUT", "12")
    cfg = GuardConfig.from_env()
    assert (cfg.journal, cfg.lease_timeout) == ("sqlite:///from-env.db", 12.0)
    monkeypatch.setenv("TASKGUARD_JOURNAL", "redis://localhost")
    with pytest.raises(ValidationError, match="unknown journal URL scheme 'redis'"):
        GuardConfig.from_env()


def test_journal_url_is_validated() -> None:
    with pytest.raises(ValidationError, match="unknown journal URL scheme 'redis'"):
        GuardConfig(journal="redis://localhost/0")
    with pytest.raises(ValidationError, match="in-memory"):
        GuardConfig(journal="sqlite:///:memory:")
    with pytest.raises(ValidationError, match="lease_timeout"):
        GuardConfig(journal="sqlite:///j.db", lease_timeout=0)
    with pytest.raises(ValidationError, match="synchronous"):
        GuardConfig(journal="sqlite:///j.db?sync=off")
    assert GuardConfig(journal="sqlite:///j.db?synchronous=FULL").lease_timeout == 30.0


async def test_a_key_held_by_another_process_gives_a_handle_that_ends_with_it(db: Path) -> None:
    """Two guards (two owners) on one journal: the second spawn of a key that the
    first holds gets a handle that ends when the first one's task has ended."""
    async with TaskGuard(journal=url(db)) as first, TaskGuard(journal=url(db)):
        held_there = await first.spawn_durable(held, 1, key="shared")
        watching = await held.spawn(2, key="shared")
        assert watching is not held_there
        await anyio.sleep(0.1)
        assert not watching.done()
        GATE.setdefault("held", anyio.Event()).set()
        assert await held_there.wait() == 1
        with anyio.fail_after(10):
            assert await watching.wait() is None
    assert [r[1] for r in RUNS] == [1]  # the second spawn ran nothing


async def test_the_heartbeat_keeps_a_long_task_from_being_rescued(db: Path) -> None:
    """Leases of 0.3 s, a task of 1.2 s: the heartbeat renews its lease, so the
    other guard polling the journal never takes it over."""
    cfg = GuardConfig(journal=url(db), lease_timeout=0.3)
    async with TaskGuard(cfg) as owner, TaskGuard(cfg) as other:
        handle = await owner.spawn_durable(held, 1)
        await anyio.sleep(1.2)
        GATE.setdefault("held", anyio.Event()).set()
        await handle.wait()
    assert [r[1] for r in RUNS] == [1]
    assert other.report.durable is not None
    assert other.report.durable.resumed == 0


async def test_a_journal_that_cannot_be_opened_fails_the_start(tmp_path: Path) -> None:
    guard = TaskGuard(journal=f"sqlite:///{tmp_path / 'missing-dir' / 'j.db'}")
    with pytest.raises(JournalError, match="cannot open the journal"):
        async with guard:
            pass
    assert guard.state is taskguard.State.CLOSED


async def test_a_key_spawned_again_while_its_commit_is_in_flight(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second spawn of a key whose first spawn's batch is being written waits
    for that commit and gets the same handle (it waited forever on an empty
    batch before)."""
    from taskguard._journal._sqlite import SqliteJournal

    real_apply = SqliteJournal.apply

    async def slow_apply(self: SqliteJournal, batch: Any) -> Any:
        await anyio.sleep(0.2)  # the commit is in flight meanwhile
        return await real_apply(self, batch)

    monkeypatch.setattr(SqliteJournal, "apply", slow_apply)
    handles: list[Any] = []

    async def spawn() -> None:
        handles.append(await held.spawn(1, key="in-flight"))

    async with TaskGuard(journal=url(db)):
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(spawn)
                await anyio.sleep(0.05)  # the flusher took the first batch
                tg.start_soon(spawn)
        assert handles[0] is handles[1]
        GATE.setdefault("held", anyio.Event()).set()


async def test_an_entry_whose_processes_keep_dying_is_dead_lettered(db: Path) -> None:
    """Kills do not use up max_attempts (a deploy loop must not dead-letter work),
    but after MAX_RECOVERIES takeovers the entry is a crash loop: dead-lettered."""
    from taskguard._journal._runner import MAX_RECOVERIES

    async with TaskGuard(journal=url(db)):
        pass
    conn = sqlite3.connect(db)
    for i, recoveries in (("r1", MAX_RECOVERIES - 1), ("r2", MAX_RECOVERIES)):
        conn.execute(
            "INSERT INTO taskguard_entries (id, name, grp, payload, key, attempt, created, owner,"
            " lease_until, recoveries) VALUES (?, ?, 'default', '{\"x\":5}', NULL, 1, 0,"
            " 'gone', 9e99, ?)",
            (i, record.name, recoveries),
        )
    conn.commit()
    conn.close()
    async with TaskGuard(journal=url(db)) as guard:
        pass
    assert [r[1] for r in RUNS] == [5]  # r1 ran (its 99th recovery); r2 did not
    (dead,) = rows(db, "taskguard_dead")
    assert dead["id"] == "r2"
    assert "died 101 times" in dead["error"]
    assert guard.report.durable is not None
    assert guard.report.durable.dead_lettered == 1


@taskguard.durable(journal_on="cut", group="slow")
async def cut_slow(x: int) -> None:
    RUNS.append(("cut_slow", x, 1, None))
    await anyio.sleep_forever()


@taskguard.durable(journal_on="cut", group="bg")
async def cut_bg(x: int) -> None:
    RUNS.append(("cut_bg", x, 1, None))
    await anyio.sleep_forever()


async def test_cut_mode_saves_at_a_group_timeout_and_for_a_cancel_group(db: Path) -> None:
    cfg = GuardConfig(
        journal=url(db),
        exit_wait_timeout=5,
        groups={"slow": {"timeout": 0.1}, "bg": {"on_shutdown": "cancel"}},
    )
    async with TaskGuard(cfg) as guard:
        await cut_slow.spawn(1)
        await cut_bg.spawn(2)
        await anyio.sleep(0.05)
        assert rows(db) == []
    assert guard.report.duration < 4  # cut at the group timeout, not the exit wait
    assert guard.report.durable is not None
    assert guard.report.durable.saved_at_cut == 2
    assert sorted(r["grp"] for r in rows(db)) == ["bg", "slow"]


def test_import_taskguard_loads_no_journal_code_and_sqlite_loads_no_driver(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = f"""
import sys, anyio, taskguard
assert not [m for m in sys.modules if m.startswith(("taskguard._journal", "taskguard._durable"))]
# (coverage, measuring this child process, keeps its own data in sqlite3)
assert "sqlite3" not in sys.modules or "coverage" in sys.modules
async def main():
    async with taskguard.TaskGuard(journal="sqlite:///{tmp_path / "j.db"}"):
        pass
anyio.run(main)
assert "psycopg" not in sys.modules, "the PostgreSQL driver was imported for a SQLite journal"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
