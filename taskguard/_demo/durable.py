"""The durable-tasks demo: work cut at the deadline is resumed by the next start.

Two runs of an "app" share a SQLite journal in a temporary directory. The first
acknowledges two durable tasks that take longer than its exit wait, then shuts
down: one task was journaled at spawn (``journal_on="spawn"``), the other is
written as the deadline cuts it (``journal_on="cut"``). The second run resumes
both before its body starts, and they complete. Self-checking: returns 0 when
both ran to completion in the second run, 1 otherwise.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import anyio

from .._durable import DurableFunction, durable_context
from .._guard import TaskGuard
from .._journal import open_journal

__all__ = ["durable_demo"]

COMPLETED: list[str] = []
_T0 = [0.0]


def _say(text: str) -> None:
    print(f"[{time.monotonic() - _T0[0]:6.2f}s] {text}", flush=True)


def _declare(guard: TaskGuard, work: float) -> tuple[DurableFunction[None], DurableFunction[None]]:
    @guard.durable(name="demo.send_invoice")
    async def send_invoice(order: int, email: str) -> None:
        ctx = durable_context()
        _say(f"  send_invoice(order={order}) running (attempt {ctx.attempt}, key {ctx.key})")
        await anyio.sleep(work)
        COMPLETED.append(f"invoice {order}")
        _say(f"  send_invoice(order={order}) done: mailed {email}")

    @guard.durable(name="demo.rebuild_index", journal_on="cut")
    async def rebuild_index(shard: int) -> None:
        _say(f"  rebuild_index(shard={shard}) running")
        await anyio.sleep(work)
        COMPLETED.append(f"index {shard}")
        _say(f"  rebuild_index(shard={shard}) done")

    return send_invoice, rebuild_index


async def _list(url: str) -> None:
    journal = open_journal(url)
    await journal.open(None, 30.0)
    try:
        for e in await journal.entries(limit=10):
            holder = "held" if e.owner else "not held: the next start takes it"
            _say(f"  journal: {e.id} {e.name} {e.payload} attempt {e.attempt}, {holder}")
    finally:
        await journal.close()


async def _demo(url: str, quick: bool) -> bool:
    exit_wait = 0.3 if quick else 1.0
    work = exit_wait * 2
    config = {"journal": url, "exit_wait_timeout": exit_wait, "cancel_grace": 1.0}

    _say(f"run 1: exit_wait_timeout={exit_wait}s; each task needs {work}s")
    first = TaskGuard(config)
    send_invoice, rebuild_index = _declare(first, work)
    async with first:
        await send_invoice.spawn(1042, "ada@example.com", key="invoice-1042")
        _say("  acknowledged send_invoice(1042): its entry is committed (journal_on='spawn')")
        await rebuild_index.spawn(7)
        _say("  acknowledged rebuild_index(7): nothing written yet (journal_on='cut')")
        _say("  shutting down now; the exit wait will cut both tasks")
    d = first.report.durable
    assert d is not None
    _say(f"run 1 closed: cut={first.report.groups['default'].cut}, journaled={d.journaled}, "
         f"saved_at_cut={d.saved_at_cut}, completed={d.completed}")  # fmt: skip
    await _list(url)

    config["exit_wait_timeout"] = work * 4
    _say(f"run 2: a new start (a new guard, the same journal), exit_wait_timeout={work * 4}s")
    second = TaskGuard(config)
    _declare(second, work)
    async with second:
        _say("  the app takes work now; the resumed tasks were re-spawned before this line")
        _say("  shutting down: the drain awaits the resumed tasks")
    d = second.report.durable
    assert d is not None
    _say(f"run 2 closed: resumed={d.resumed}, completed={d.completed}")
    await _list(url)
    return sorted(COMPLETED) == ["index 7", "invoice 1042"] and d.completed == 2


def durable_demo(quick: bool = False) -> int:
    """Run the demo (see the module docstring); 0 when it checked out."""
    COMPLETED.clear()
    print("Durable tasks: work cut at the deadline, resumed by the next start (docs/durable.md)")
    _T0[0] = time.monotonic()
    log = logging.getLogger("taskguard")
    level = log.level
    log.setLevel(logging.ERROR)  # the demo narrates; the shutdown summaries would repeat it
    try:
        with tempfile.TemporaryDirectory(prefix="taskguard-durable-demo-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'journal.db'}"
            _say(f"journal: {url}")
            ok = anyio.run(_demo, url, quick)
    finally:
        log.setLevel(level)
    _say("OK: the work cut at the deadline was resumed and completed by the next start"
         if ok else "FAILED: the cut work was not completed by the next start")  # fmt: skip
    return 0 if ok else 1
