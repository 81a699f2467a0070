"""The app under test: a small FastAPI service, bare or behind ``TaskGuardMiddleware``.

One module for both variants, so they differ only in what taskguard adds;
``ROLLING_APP`` picks the variant when a server imports ``app``:

- ``bare``: what an app does without taskguard. Signup jobs are
  ``asyncio.create_task`` (kept in a set so they are not garbage-collected);
  ``/healthz/ready`` always answers 200; nothing happens at shutdown but what
  the server does itself.
- ``taskguard``: jobs are spawned into a ``drain`` group of a
  ``TaskGuard(drain_delay=..., exit_wait_timeout=...)``; the middleware
  answers ``/healthz/ready`` (503 from the exit signal on) and ends a stream
  cut by shutdown with an SSE event carrying its resume point.

Routes: ``GET /work?ms=`` (a plain request taking ``ms`` milliseconds),
``POST /signup?id=`` (202 at once; the job writes the row ``id`` to the
SQLite file ``ROLLING_DB`` ``ROLLING_JOB_SECONDS`` later), ``GET
/events?n=&after=`` (server-sent events ``after+1 .. n-1``, one every 100 ms,
then ``event: end``), ``WS /ws`` (echo). Settings: ``ROLLING_DRAIN_DELAY``
(3 s), ``ROLLING_EXIT_WAIT`` (20 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from typing import Any

import anyio
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from benchmarks.rolling import VARIANTS

ITEM_SECONDS = 0.1


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _record(db: str, job_id: str) -> None:
    with closing(sqlite3.connect(db, timeout=30)) as conn, conn:
        conn.execute("INSERT INTO jobs VALUES (?, ?, julianday('now'))", (job_id, os.getpid()))


def _create_db(db: str) -> None:
    # WAL: the harness reads while the backends write.
    with closing(sqlite3.connect(db, timeout=30)) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT, pid INTEGER, done_at REAL)")


def build(variant: str) -> Any:
    """The ASGI app of ``variant`` (``bare`` or ``taskguard``)."""
    if variant not in VARIANTS:
        raise ValueError(f"ROLLING_APP must be one of {', '.join(VARIANTS)}, not {variant!r}")
    db = _setting("ROLLING_DB", "rolling.sqlite3")
    job_seconds = float(_setting("ROLLING_JOB_SECONDS", "1"))
    _create_db(db)
    api = FastAPI()

    async def job(job_id: str) -> None:
        await anyio.sleep(job_seconds)
        await anyio.to_thread.run_sync(_record, db, job_id)

    spawn: Callable[[str], object]
    if variant == "bare":
        running: set[asyncio.Task[None]] = set()

        def spawn(job_id: str) -> object:
            task = asyncio.create_task(job(job_id))
            running.add(task)
            task.add_done_callback(running.discard)
            return task

        @api.get("/healthz/ready")
        async def ready() -> dict[str, bool]:
            return {"ready": True}

    else:
        import taskguard

        guard = taskguard.TaskGuard(
            drain_delay=float(_setting("ROLLING_DRAIN_DELAY", "3")),
            exit_wait_timeout=float(_setting("ROLLING_EXIT_WAIT", "20")),
            cancel_grace=2.0,
            groups={"jobs": taskguard.GroupConfig(on_shutdown="drain")},
        )

        def spawn(job_id: str) -> object:
            return guard.spawn(job, job_id, group="jobs", name=f"signup {job_id}")

    @api.get("/work")
    async def work(ms: int = 0) -> dict[str, int]:
        await anyio.sleep(ms / 1000)
        return {"ms": ms}

    @api.post("/signup", status_code=202)
    async def signup(id: str) -> dict[str, str]:
        spawn(id)
        return {"accepted": id}

    @api.get("/events")
    async def events(request: Request, n: int, after: int = -1) -> StreamingResponse:
        start = after + 1
        if variant == "taskguard":
            from taskguard.asgi import stream_control

            def resume_event(sent: int) -> str:
                return (
                    f"event: shutdown\ndata: {json.dumps({'resume_after': start + sent - 1})}\n\n"
                )

            stream_control(request).final_message = resume_event
        return StreamingResponse(_items(start, n), media_type="text/event-stream")

    @api.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    if variant == "bare":
        return api
    from taskguard.asgi import TaskGuardMiddleware

    return TaskGuardMiddleware(api, guard, readiness_path="/healthz/ready")


async def _items(start: int, n: int) -> AsyncIterator[str]:
    for i in range(start, n):
        yield f"id: {i}\ndata: {i}\n\n"
        await anyio.sleep(ITEM_SECONDS)
    yield "event: end\ndata: {}\n\n"


app = build(_setting("ROLLING_APP", ""))
