"""Rolling restart of three gRPC servers under load: failed RPCs, taskguard vs plain grpc.aio.

Three server processes on 127.0.0.1 (fixed ports). One client process (this
one) with a single channel over the three addresses, ``round_robin`` and
client-side health checking (``healthCheckConfig``: the channel watches each
backend's ``grpc.health.v1`` status and routes only to SERVING ones), sends a
steady rate of unary RPCs and keeps a few server streams open, resuming each
stream that ends with a resume point (trailing metadata ``taskguard-sent``)
from there. Meanwhile each server in turn gets SIGTERM; once it has exited, a
replacement starts on the same port; three full rollouts.

- ``taskguard``: each server runs under ``taskguard.run`` with
  ``GuardInterceptor`` and ``serve()`` (health service, ``drain_delay``).
- ``plain``: the same servicer the usual way: on SIGTERM ``server.stop(grace)``
  (no health service, so the channel treats every connected backend as
  healthy, as gRPC does for a server answering UNIMPLEMENTED).

Counted (the client's view, no application-level retry; grpc's own
transparent retry of RPCs that never reached a server application is on, as
by default): a unary RPC fails when its final status is not OK. A stream end
is *resumed* when it carries a resume point (the documented shutdown ending),
*broken* when it ends non-OK without one (the client can only guess where to
go on). Every logical stream is checked for gaps and duplicates.

    python -m benchmarks.grpc_rolling                      # both, 3 rollouts each
    python -m benchmarks.grpc_rolling --kinds taskguard --rollouts 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(ROOT))

SERVICE = "bench.Roll"
#: seconds between two messages of a stream
INTERVAL = 0.05


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def decode(raw: bytes) -> Any:
    return json.loads(raw)


# -- the servers ---------------------------------------------------------------------------


def handlers() -> Any:
    import grpc

    pid = os.getpid()

    async def hello(request: Any, context: Any) -> Any:
        return {"pid": pid, "n": request["n"]}

    async def count(request: Any, context: Any) -> Any:
        for seq in range(request["offset"], request["offset"] + request["count"]):
            await asyncio.sleep(INTERVAL)
            yield {"seq": seq, "pid": pid}

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Hello": grpc.unary_unary_rpc_method_handler(hello, decode, encode),
            "Count": grpc.unary_stream_rpc_method_handler(count, decode, encode),
        },
    )


def serve_taskguard(port: int, drain_delay: float, exit_wait: float) -> int:
    import grpc.aio

    import taskguard
    from taskguard.grpc import GuardInterceptor, serve

    async def main(guard: taskguard.TaskGuard) -> None:
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
        server.add_generic_rpc_handlers([handlers()])
        server.add_insecure_port(f"127.0.0.1:{port}")
        print("READY", flush=True)
        await serve(server, guard, services=[SERVICE])

    report = taskguard.run(main, drain_delay=drain_delay, exit_wait_timeout=exit_wait)
    return 0 if report.clean else 1


def serve_plain(port: int, grace: float) -> int:
    import grpc.aio

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([handlers()])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("READY", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(grace)

    asyncio.run(main())
    return 0


# -- the client ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the client saw."""

    unary: Counter[str] = field(default_factory=Counter)  # status name -> count
    served_by: Counter[int] = field(default_factory=Counter)  # pid -> unary RPCs
    draining_served: int = 0  # unary RPCs a server answered after its SIGTERM
    stream_ends: Counter[str] = field(default_factory=Counter)  # completed/resumed/broken
    streams_exact: int = 0
    streams_inexact: int = 0
    signalled: dict[int, float] = field(default_factory=dict)  # pid -> SIGTERM time


def channel_options() -> list[tuple[str, Any]]:
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    return [
        ("grpc.service_config", json.dumps(config)),
        # a restarted backend is back in the rotation within about a second
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


async def unary_load(channel: Any, rate: float, tally: Tally, stop: asyncio.Event) -> None:
    import grpc.aio

    hello = channel.unary_unary(f"/{SERVICE}/Hello", request_serializer=encode,
                                response_deserializer=decode)  # fmt: skip
    pending: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        try:
            reply = await hello({"n": n}, timeout=10)
        except grpc.aio.AioRpcError as exc:
            tally.unary[exc.code().name] += 1
            return
        tally.unary["OK"] += 1
        tally.served_by[reply["pid"]] += 1
        if reply["pid"] in tally.signalled:
            tally.draining_served += 1

    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        task = asyncio.ensure_future(one(n))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*pending)


async def stream_load(channel: Any, length: int, tally: Tally, stop: asyncio.Event) -> None:
    """Logical streams of ``length`` messages, one after the other, resumed across ends."""
    import grpc.aio

    from taskguard.grpc import RESUME_KEY

    count = channel.unary_stream(f"/{SERVICE}/Count", request_serializer=encode,
                                 response_deserializer=decode)  # fmt: skip
    while not stop.is_set():
        seqs: list[int] = []
        offset = 0
        while offset < length:
            call = count({"offset": offset, "count": length - offset}, timeout=60)
            try:
                async for message in call:
                    seqs.append(message["seq"])
                tally.stream_ends["completed"] += 1
                break
            except grpc.aio.AioRpcError as exc:
                trailing = dict(exc.trailing_metadata() or ())
                if RESUME_KEY in trailing:
                    tally.stream_ends["resumed"] += 1
                    offset += int(trailing[RESUME_KEY])
                else:
                    tally.stream_ends[f"broken ({exc.code().name})"] += 1
                    offset = len(seqs)  # the best guess a client has: what it received
        exact = seqs == list(range(length))
        tally.streams_exact += exact
        tally.streams_inexact += not exact


# -- the rollout ---------------------------------------------------------------------------


async def start_server(kind: str, port: int, args: argparse.Namespace) -> Any:
    cmd = [sys.executable, "-m", "benchmarks.grpc_rolling", "server", kind, str(port),
           "--drain-delay", str(args.drain_delay), "--grace", str(args.grace)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line.startswith(b"READY"):
        raise RuntimeError(f"the {kind} server on port {port} did not start")
    return proc


async def run_kind(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    import grpc.aio

    from benchmarks._servers import free_port

    ports = [free_port() for _ in range(3)]
    procs = [await start_server(kind, port, args) for port in ports]
    tally = Tally()
    stop = asyncio.Event()
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    rollout_times: list[float] = []
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        load = [asyncio.ensure_future(unary_load(channel, args.rate, tally, stop))]
        load += [
            asyncio.ensure_future(stream_load(channel, args.stream_length, tally, stop))
            for _ in range(args.streams)
        ]
        await asyncio.sleep(args.settle)
        try:
            for _ in range(args.rollouts):
                for i, port in enumerate(ports):
                    started = time.monotonic()
                    tally.signalled[procs[i].pid] = started
                    procs[i].send_signal(signal.SIGTERM)
                    await asyncio.wait_for(procs[i].wait(), args.exit_wait + 10)
                    procs[i] = await start_server(kind, port, args)
                    rollout_times.append(time.monotonic() - started)
                    await asyncio.sleep(args.settle)
        finally:
            stop.set()
            results = await asyncio.gather(*load, return_exceptions=True)
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(proc.wait() for proc in procs))
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    failed = sum(v for k, v in tally.unary.items() if k != "OK")
    broken = sum(v for k, v in tally.stream_ends.items() if k.startswith("broken"))
    return {
        "kind": kind,
        "unary_sent": sum(tally.unary.values()),
        "unary_failed": failed,
        "unary_by_status": dict(tally.unary),
        "unary_served_after_sigterm": tally.draining_served,
        "stream_ends": dict(tally.stream_ends),
        "streams_broken": broken,
        "logical_streams_exact": tally.streams_exact,
        "logical_streams_inexact": tally.streams_inexact,
        "sigterm_to_replacement_ready_s": [round(t, 2) for t in rollout_times],
        "client_errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpc_rolling")
    sub = parser.add_subparsers(dest="command")
    server = sub.add_parser("server", help="(internal) one server process")
    server.add_argument("kind", choices=("taskguard", "plain"))
    server.add_argument("port", type=int)
    for p in (parser, server):
        p.add_argument("--drain-delay", type=float, default=2.0, help="taskguard's (s)")
        p.add_argument("--grace", type=float, default=5.0, help="plain server.stop(grace) (s)")
    parser.add_argument("--kinds", default="taskguard,plain")
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0, help="unary RPCs per second")
    parser.add_argument("--streams", type=int, default=4, help="concurrent logical streams")
    parser.add_argument("--stream-length", type=int, default=200, help="messages, 50 ms apart")
    parser.add_argument("--settle", type=float, default=2.0, help="s between two restarts")
    parser.add_argument("--exit-wait", type=float, default=10.0)
    parser.add_argument("--output", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)
    if args.command == "server":
        if args.kind == "taskguard":
            return serve_taskguard(args.port, args.drain_delay, args.exit_wait)
        return serve_plain(args.port, args.grace)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - {"taskguard", "plain"}
    if unknown:
        parser.error(f"unknown kind(s) {sorted(unknown)}: choose taskguard, plain")
    print(
        f"grpc rolling restart: 3 servers, {args.rollouts} rollout(s), {args.rate:g} unary RPC/s, "
        f"{args.streams} streams of {args.stream_length} messages; load {os.getloadavg()}"
    )
    results = []
    for kind in kinds:
        result = asyncio.run(run_kind(kind, args))
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    print(f"load {os.getloadavg()}")
    if args.output:
        args.output.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    taskguard_runs = [r for r in results if r["kind"] == "taskguard"]
    ok = all(
        r["unary_failed"] == 0 and r["streams_broken"] == 0 and r["logical_streams_inexact"] == 0
        for r in taskguard_runs
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
