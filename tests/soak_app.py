"""A small ``taskguard.run`` server for the soak test (tests/test_soak.py); run as a script.

    python tests/soak_app.py DB_PATH BACKEND

Listens on 127.0.0.1 (a free port, printed as ``PORT <n>``). Each request is
a line ``JOB <id>``; the server spawns a job into the drain group ``jobs``
and only then answers ``ACK <id>`` (or ``NO <id>`` if the guard refused it).
The job waits a little (the "work") and inserts a row into the SQLite table
``done`` — its side effect. An acknowledged job must therefore leave exactly
one row, whenever the process gets its SIGTERM.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import sys

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import taskguard
from taskguard import ShuttingDownError, TaskGuard


def main_entry(db_path: str, backend: str) -> int:
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS done (job INTEGER NOT NULL, pid INTEGER NOT NULL)")

    async def job(job_id: int) -> None:
        await anyio.sleep(random.random() * 0.3)
        # Sync and quick on the loop thread: the row is committed when this returns.
        db.execute("INSERT INTO done (job, pid) VALUES (?, ?)", (job_id, _pid()))

    async def handle(guard: TaskGuard, stream: SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            while True:
                try:
                    line = await reader.receive_until(b"\n", 64)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                job_id = int(line.split()[1])
                try:
                    guard.spawn(job, job_id, group="jobs", name=f"job-{job_id}")
                except ShuttingDownError:
                    reply = f"NO {job_id}\n"
                else:
                    reply = f"ACK {job_id}\n"  # only once the job is the guard's
                try:
                    await stream.send(reply.encode())
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def main(guard: TaskGuard) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        print("PORT", listener.extra(SocketAttribute.local_port), flush=True)
        async with anyio.create_task_group() as tg:

            async def serve() -> None:
                async with listener:
                    await listener.serve(lambda s: handle(guard, s))

            tg.start_soon(serve)
            await guard.wait_for_shutdown()
            # Stop intake: close the listener and the open connections. A
            # request cut here got no ACK, so its client does not count on it.
            tg.cancel_scope.cancel()

    report = taskguard.run(
        main,
        backend=backend,  # type: ignore[arg-type]
        exit_wait_timeout=5,
        cancel_grace=1,
        groups={"jobs": {"on_shutdown": "drain"}},
    )
    db.close()
    print("CLEAN" if report.clean else "NOT CLEAN", flush=True)
    return 0 if report.clean else 1


def _pid() -> int:
    import os

    return os.getpid()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(main_entry(sys.argv[1], sys.argv[2]))
