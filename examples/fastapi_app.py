"""A FastAPI app whose background work and streams survive a deploy.

Run it (after the README's set-up):

    .venv/bin/pip install fastapi uvicorn
    .venv/bin/uvicorn examples.fastapi_app:app

and, from a second terminal:

    curl -X POST 'localhost:8000/signup?user=ada'    # 202 at once; the row lands 2 s later
    curl -N localhost:8000/server-stream/100         # 100 lines, 100 ms apart
    curl -N localhost:8000/events/100                # the same as server-sent events
    curl localhost:8000/healthz/ready                # 200 while running

Press Ctrl-C (or ``kill -TERM <pid>``) while a stream runs and right after a
signup: the streams end at once (the SSE one with an event carrying the resume
point), the pending signup is still written (the drain waits for it), then the
app's own lifespan shutdown runs and the process exits (uvicorn: by the signal,
status -15 / 143). From the exit signal on, ``/healthz/ready`` answers 503
while other requests are still served, for ``drain_delay`` (0 s here); then
the server stops accepting connections. A second Ctrl-C cuts what is left, and
the lifespan shutdown says so. Without taskguard the stream holds the exit
until it ends and the signup row is lost. hypercorn works the same way
(``hypercorn --workers 0``, docs/asgi.md).

Settings (environment): EXAMPLE_DB (SQLite file, default
``taskguard-example.sqlite3`` in the temporary directory), EXAMPLE_JOB_SECONDS
(2), EXAMPLE_SEND_TIMEOUT (5).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

import taskguard
from taskguard.asgi import StreamControl, TaskGuardMiddleware, stream_control

# Show taskguard's shutdown progress and report next to the server's own log
# (servers configure their loggers, not the "taskguard" one).
_log = logging.getLogger("taskguard")
if not _log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[taskguard] %(levelname)s %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)

DB = os.environ.get("EXAMPLE_DB") or os.path.join(
    tempfile.gettempdir(), "taskguard-example.sqlite3"
)
JOB_SECONDS = float(os.environ.get("EXAMPLE_JOB_SECONDS", "2"))

guard = taskguard.TaskGuard(
    exit_wait_timeout=10.0,
    cancel_grace=2.0,
    groups={"jobs": taskguard.GroupConfig(on_shutdown="drain", timeout=8.0)},
)
#: per stream: items generated, and whether its generator's finally ran
progress: dict[str, dict[str, int | bool]] = {}


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(DB, timeout=5)
    conn.execute("CREATE TABLE IF NOT EXISTS signups (user TEXT, finished_at REAL)")
    return conn


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    _db().close()
    yield
    # Runs after taskguard's drain: the background jobs could still use
    # whatever this closes (a DB pool, an HTTP client).
    report = guard.report
    cut = sum(g.cut for g in report.groups.values()) + report.guarded.cut + len(report.stuck)
    if cut:
        print(f"app lifespan shutdown: background work was cut ({cut} unfinished)", flush=True)
    else:
        print("app lifespan shutdown: background work already drained", flush=True)


api = FastAPI(lifespan=lifespan)


async def send_welcome_and_record(user: str) -> None:
    """The slow follow-up work of a signup (an email, an audit row)."""
    await anyio.sleep(JOB_SECONDS)

    def write() -> None:
        with _db() as conn:
            conn.execute("INSERT INTO signups VALUES (?, julianday('now'))", (user,))

    await anyio.to_thread.run_sync(write)


@api.post("/signup", status_code=202)
async def signup(user: str) -> dict[str, str]:
    taskguard.spawn(send_welcome_and_record, user, group="jobs", name=f"signup {user}")
    return {"status": "accepted", "user": user}


@api.get("/slow/{ms}")
async def slow(ms: int) -> dict[str, int]:
    """A plain request that takes ``ms`` milliseconds: shutdown waits for it."""
    await anyio.sleep(ms / 1000)
    return {"slept_ms": ms}


@api.get("/signups")
async def signups() -> list[str]:
    with _db() as conn:
        return [row[0] for row in conn.execute("SELECT user FROM signups")]


async def _items(key: str, n: int, start: int, sse: bool, pad: int = 0) -> AsyncIterator[str]:
    state = progress[key] = {"generated": 0, "finally": False}
    try:
        for i in range(start, n):
            state["generated"] = int(state["generated"]) + 1
            line = json.dumps({"i": i, "pad": "x" * pad} if pad else {"i": i})
            yield f"id: {i}\ndata: {line}\n\n" if sse else line + "\n"
            await anyio.sleep(0.1)
    finally:
        state["finally"] = True


@api.get("/server-stream/{n}")
async def server_stream(n: int, key: str = "default", pad: int = 0) -> StreamingResponse:
    """``n`` JSON lines, 100 ms apart (``pad`` bytes of filler each). Cut by
    shutdown, the body is aborted: the client sees an incomplete response."""
    items = _items(key, n, 0, sse=False, pad=pad)
    return StreamingResponse(items, media_type="application/x-ndjson")


@api.get("/events/{n}")
async def events(
    n: int,
    ctl: Annotated[StreamControl, Depends(stream_control)],
    key: str = "default",
    after: int = -1,
) -> StreamingResponse:
    """Server-sent events; on shutdown a last event tells the client where to resume."""
    start = after + 1

    def resume_event(sent: int) -> str:
        return f"event: shutdown\ndata: {json.dumps({'resume_after': start + sent - 1})}\n\n"

    ctl.final_message = resume_event
    return StreamingResponse(_items(key, n, start, sse=True), media_type="text/event-stream")


@api.get("/progress")
async def get_progress() -> dict[str, object]:
    return {"streams": progress, "guard": guard.stats().model_dump(mode="json")}


app = TaskGuardMiddleware(
    api,
    guard,
    send_timeout=float(os.environ.get("EXAMPLE_SEND_TIMEOUT", "5")),
    readiness_path="/healthz/ready",
)
