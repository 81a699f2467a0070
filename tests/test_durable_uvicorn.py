"""Durable tasks under a real ``uvicorn --workers 2``, on one SQLite journal.

Each worker process acknowledges durable tasks from HTTP requests (through the
ASGI middleware's lifespan, which starts the guard and so the journal). The
tasks stall in the process that spawned them; one worker is SIGKILLed, and its
acknowledged tasks are finished by another process (the surviving worker's
rescue, or the replacement worker's resume), never lost.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from servers import running_server

pytestmark = pytest.mark.slow

APP = """
import os, sqlite3
import anyio, anyio.to_thread
import taskguard
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from taskguard.asgi import TaskGuardMiddleware


def effect(key):
    conn = sqlite3.connect(os.environ["EFFECTS"], timeout=30)
    conn.execute("INSERT OR IGNORE INTO done VALUES (?, ?)", (key, os.getpid()))
    conn.commit()
    conn.close()


@taskguard.durable(name="uvicorn.work")
async def work(spawner: int) -> None:
    if os.getpid() == spawner:  # stalls where it was spawned: only a takeover finishes it
        await anyio.sleep_forever()
    await anyio.to_thread.run_sync(effect, taskguard.durable_context().key)


async def spawn(request):
    key = request.query_params["key"]
    await work.spawn(os.getpid(), key=key)
    return JSONResponse({"pid": os.getpid(), "key": key})


config = taskguard.GuardConfig(journal=os.environ["JOURNAL"], lease_timeout=60)
app = TaskGuardMiddleware(
    Starlette(routes=[Route("/spawn", spawn, methods=["POST"])]),
    config=config,
    readiness_path="/healthz/ready",
)
"""


def done(effects: Path) -> dict[str, int]:
    conn = sqlite3.connect(effects)
    try:
        return dict(conn.execute("SELECT key, pid FROM done").fetchall())
    finally:
        conn.close()


def test_a_killed_workers_acknowledged_tasks_are_finished_by_another(tmp_path: Path) -> None:
    (tmp_path / "durable_app.py").write_text(textwrap.dedent(APP))
    effects = tmp_path / "effects.db"
    conn = sqlite3.connect(effects)
    conn.execute("CREATE TABLE done (key TEXT PRIMARY KEY, pid INTEGER)")
    conn.commit()
    conn.close()
    env = {"JOURNAL": f"sqlite:///{tmp_path / 'journal.db'}", "EFFECTS": str(effects)}
    with running_server("uvicorn-workers", "durable_app:app", tmp_path, env=env) as server:
        by_pid: dict[int, list[str]] = {}
        for i in range(16):  # a new connection each: the kernel spreads them over the workers
            answer = httpx.post(f"{server.url}/spawn", params={"key": f"k{i}"}, timeout=10)
            assert answer.status_code == 200, server.output()
            by_pid.setdefault(answer.json()["pid"], []).append(answer.json()["key"])
        victim = max(by_pid, key=lambda pid: len(by_pid[pid]))
        acked = set(by_pid[victim])
        assert not acked & done(effects).keys()  # they stall in the victim
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not acked <= done(effects).keys() and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = done(effects)
        assert acked <= finished.keys(), server.output()
        assert victim not in {finished[k] for k in acked}
