"""The example gRPC ``Jobs`` server, with taskguard: run it, then send it SIGTERM.

    .venv/bin/python examples/rpc_server.py --data-dir /tmp/jobs            # prints PORT <n>
    .venv/bin/python examples/rpc_server.py --data-dir /tmp/jobs --port 50051
    .venv/bin/python examples/rpc_server.py --data-dir /tmp/jobs --plain    # the usual way

(After the README's set-up, which installs the ``grpc`` extra.) A ``Jobs``
service on real ``grpc.aio``, with generic method handlers and JSON messages
(no protoc step):

- ``Submit({"payload": ..., "seconds": 2})`` answers at once with a job id and
  spawns the job into the ``jobs`` group (``drain``). The job works a few
  seconds, then records itself through a gRPC client channel to an ``Audit``
  service (standing in for an external system, like Temporal in the RoadRunner
  incident), which writes a row to SQLite: the durable side effect.
- ``Watch({"count": 100, "offset": 0, "interval": 0.1})`` streams messages
  ``offset .. count-1``, 100 ms apart; resume with ``offset`` = where it ended.
- a ``metrics`` group (``cancel``): a periodic reporter and a slow per-job push,
  work that may die at shutdown.

It prints ``PORT <n>`` on stdout once it serves, event lines ``EVENT {json}``,
and on exit ``TASKGUARD-REPORT {json}`` on stderr. ``--plain`` runs the same
service the usual way, without taskguard: ``asyncio.create_task`` for jobs and
``server.stop(grace)`` on SIGTERM. ``taskguard demo`` runs this file (and
``rpc_client.py``) and reports what it measured; ``examples/rpc_client.py`` is
a client to play with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

import taskguard
from taskguard.grpc import GuardInterceptor, serve

SERVICE = "taskguard.example.Jobs"
AUDIT = "taskguard.example.Audit"
REPORT_MARKER = "TASKGUARD-REPORT "
PLAIN_MARKER = "PLAIN-REPORT "


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def decode(data: bytes) -> Any:
    return json.loads(data)


def event(name: str, **fields: Any) -> None:
    """One ``EVENT {json}`` line on stdout, for the demo and the tests to read."""
    fields = {"event": name, "t": round(time.time(), 3), **fields}
    print("EVENT " + json.dumps(fields), flush=True)


# -- the durable side effect -----------------------------------------------------


class JobStore:
    """Finished jobs, one row each, in ``<data_dir>/jobs.sqlite``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / "jobs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, payload TEXT, "
                "mode TEXT, pid INTEGER, submitted_at REAL, finished_at REAL)"
            )

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(self.path, timeout=10))

    def record(self, job: dict[str, Any]) -> None:
        with self._connect() as db, db:  # closed, and committed
            db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job["id"],
                    json.dumps(job.get("payload")),
                    job.get("mode", ""),
                    os.getpid(),
                    job.get("submitted_at"),
                    time.time(),
                ),
            )

    def finished_ids(self) -> set[str]:
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT id FROM jobs")}


class AuditServer:
    """The upstream ``Audit`` service (in-process here): ``Record(job)`` writes the row.

    An async context manager that yields its port.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    AUDIT,
                    {"Record": grpc.unary_unary_rpc_method_handler(self.record, decode, encode)},
                )
            ]
        )

    async def record(self, job: dict[str, Any], context: Any) -> dict[str, Any]:
        await asyncio.to_thread(self.store.record, job)
        return {"ok": True}

    async def __aenter__(self) -> int:
        port = int(self.server.add_insecure_port("127.0.0.1:0"))
        await self.server.start()
        return port

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.stop(1.0)


# -- the Jobs service ------------------------------------------------------------


class Jobs:
    """The handlers; ``spawn(coro, group)`` is how they start background work."""

    def __init__(
        self,
        spawn: Callable[[Coroutine[Any, Any, Any], str], object],
        audit: grpc.aio.Channel,
        mode: str,
    ) -> None:
        self.spawn = spawn
        self.mode = mode
        self._record = audit.unary_unary(
            f"/{AUDIT}/Record", request_serializer=encode, response_deserializer=decode
        )

    async def submit(self, request: dict[str, Any], context: Any) -> dict[str, Any]:
        job = {
            "id": uuid.uuid4().hex[:12],
            "payload": request.get("payload"),
            "seconds": float(request.get("seconds", 2.0)),
            "submitted_at": time.time(),
            "mode": self.mode,
        }
        self.spawn(self.run_job(job), "jobs")
        try:
            self.spawn(push_metric(f"job {job['id']} accepted"), "metrics")
        except Exception as exc:  # refused while shutting down: a metric may die
            event("metric_refused", error=str(exc))
        event("job_submitted", id=job["id"], seconds=job["seconds"])
        return {"id": job["id"]}

    async def run_job(self, job: dict[str, Any]) -> None:
        event("job_started", id=job["id"])
        await asyncio.sleep(job["seconds"])  # the work
        # The last step needs the client channel: it must still be open.
        await self._record(job, timeout=10)
        event("job_finished", id=job["id"])

    async def watch(self, request: dict[str, Any], context: Any) -> AsyncIterator[dict[str, Any]]:
        count = int(request.get("count", 100))
        offset = int(request.get("offset", 0))
        interval = float(request.get("interval", 0.1))
        produced = 0
        event("watch_opened", offset=offset, count=count)
        try:
            for seq in range(offset, count):
                await asyncio.sleep(interval)
                produced += 1
                yield {"seq": seq, "count": count}
        finally:
            # Runs however the stream ends: taskguard closes the generator.
            event("watch_closed", offset=offset, produced=produced)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Submit": grpc.unary_unary_rpc_method_handler(self.submit, decode, encode),
                "Watch": grpc.unary_stream_rpc_method_handler(self.watch, decode, encode),
            },
        )


async def push_metric(what: str) -> None:
    """A slow push to a metrics collector: fine to lose at shutdown."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        event("metric_cancelled", what=what)
        raise


async def metrics_reporter() -> None:
    """Report metrics every half second, until cancelled."""
    ticks = 0
    while True:
        await asyncio.sleep(0.5)
        ticks += 1


# -- running it under taskguard ------------------------------------------------


async def guarded_main(guard: taskguard.TaskGuard, args: argparse.Namespace) -> None:
    store = JobStore(args.data_dir)

    def flush_metrics() -> None:
        event("hook", hook="flush metrics")

    # after_drain steps run last registered first: this one runs last.
    guard.on_shutdown(flush_metrics, name="flush metrics")
    # Resources exit after the drain, last entered first: the channel the jobs
    # use closes only once every job is done, then the upstream it talks to.
    audit_port = await guard.enter_async_context(AuditServer(store))
    channel = await guard.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{audit_port}"))
    jobs = Jobs(lambda coro, group: guard.spawn(coro, group=group), channel, "taskguard")
    guard.spawn(metrics_reporter, group="metrics")
    server = grpc.aio.server(interceptors=[GuardInterceptor(guard, send_timeout=args.send_timeout)])
    server.add_generic_rpc_handlers([jobs.handler()])
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()  # serve() would start it; started here to print the port
    print(f"PORT {port}", flush=True)
    await serve(server, guard)


def run_guarded(args: argparse.Namespace) -> int:
    config = taskguard.GuardConfig(
        exit_wait_timeout=args.exit_wait,
        cancel_grace=1.0,
        hook_timeout=3.0,
        groups={
            "jobs": taskguard.GroupConfig(on_shutdown="drain"),
            "metrics": taskguard.GroupConfig(on_shutdown="cancel"),
        },
    )
    report = taskguard.run(guarded_main, args, config=config)
    print(REPORT_MARKER + report.model_dump_json(), file=sys.stderr, flush=True)
    return 0 if report.clean else 1


# -- the same service, the usual way (for the comparison) -----------------------


async def plain_main(args: argparse.Namespace) -> int:
    store = JobStore(args.data_dir)
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any], group: str) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async with AuditServer(store) as audit_port:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{audit_port}")
        jobs = Jobs(spawn, channel, "plain")
        spawn(metrics_reporter(), "metrics")
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([jobs.handler()])
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before "PORT": a SIGTERM may follow it
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        print(f"PORT {port}", flush=True)
        await stop.wait()
        started = time.monotonic()
        await server.stop(args.exit_wait)  # the usual way: stop with a grace period
        stopped_after = time.monotonic() - started
        await channel.close()
    pending = len(tasks)  # asyncio.run() cancels these as it returns
    summary = {"server_stop_seconds": round(stopped_after, 3), "tasks_left": pending}
    print(PLAIN_MARKER + json.dumps(summary), file=sys.stderr, flush=True)
    return 0


# -- command line ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The example gRPC Jobs server, with taskguard (or --plain, without). "
        "Prints PORT <n> once it serves; send it SIGTERM to see the graceful shutdown."
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("TASKGUARD_DEMO_DIR"),
        help="where jobs.sqlite lives (default: $TASKGUARD_DEMO_DIR)",
    )
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument(
        "--exit-wait", type=float, default=10.0, help="exit wait (plain: server.stop grace)"
    )
    parser.add_argument("--send-timeout", type=float, default=5.0)
    parser.add_argument("--plain", action="store_true", help="without taskguard, for comparison")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("give --data-dir or set TASKGUARD_DEMO_DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    if args.plain:
        return asyncio.run(plain_main(args))
    return run_guarded(args)


if __name__ == "__main__":
    sys.exit(main())
