"""Case 8: gRPC overhead, messages/s and RPCs/s of grpc.aio with and without taskguard.

Three server processes run at once on 127.0.0.1 with the same servicer (raw
bytes, no serialisation, so the interceptor's share is as large as it gets):
plain ``grpc.aio`` (``server.start()`` / ``wait_for_termination()``) twice -
the baseline and an A/A control whose ratio to it shows the measurement's
noise - and under ``taskguard.run`` with ``GuardInterceptor`` and ``serve()``
(health service included). Each sample is a fresh client process (``client``
subcommand) that loads the servers in turns, one burst each per round, the
order rotated every round, so load that comes and goes on the machine hits
them alike. Besides the throughput the client sees, each server process's own
CPU time per message or RPC is read from ``/proc`` (Linux), which does not
depend on the client keeping up. Targets (issue 12): streams ≥ 0.9x and unary
≥ 0.95x plain grpc.aio. For context, no target: the CPU the interceptor adds to
a handler in process (``in_process``: unary, and streams of 1 and 50
messages), free of the machine's noise.

    python -m benchmarks --cases grpc --repeats 7
    python -m benchmarks.case_grpc serve guarded      # one server, prints PORT n
    python -m benchmarks.case_grpc client '{"plain": 5001, "guarded": 5002}' stream 200 50 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._core import Measurement, Settings, Target, link

CASE = "grpc"
ROOT = Path(__file__).resolve().parent.parent
SERVICE = "bench.Load"
PAYLOAD = b"x" * 64
IMPLS = {
    "plain": "grpc.aio (baseline)",
    "control": "grpc.aio again (A/A control)",
    "guarded": "grpc.aio + GuardInterceptor + serve()",
}


# -- the servicer (the same for both servers) ------------------------------------------


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield PAYLOAD


def handlers() -> Any:
    import grpc

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


# -- the servers --------------------------------------------------------------------------


def serve_plain() -> None:
    import grpc.aio

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([handlers()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"PORT {port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_guarded() -> None:
    import grpc.aio

    import taskguard
    from taskguard.grpc import GuardInterceptor, serve

    async def main(guard: taskguard.TaskGuard) -> None:
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard)])
        server.add_generic_rpc_handlers([handlers()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"PORT {port}", flush=True)
        await serve(server, guard, services=[SERVICE])

    taskguard.run(main, exit_wait_timeout=5)


@contextmanager
def server(kind: str) -> Iterator[tuple[int, int]]:
    """Run ``serve <kind>`` in a subprocess; yield (pid, port); killed at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.case_grpc", "serve", kind],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the {kind} gRPC server did not start (rc={proc.poll()})")
        yield proc.pid, int(line.split()[1])
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client -------------------------------------------------------------------------


async def load(ports: dict[str, int], mode: str, concurrency: int, per: int, rounds: int) -> Any:
    """Messages (stream) or RPCs (unary) per second of each server, ``concurrency`` at once.

    The servers take turns, one burst each per round, the order rotated every
    round: load that comes and goes on the machine hits them alike.
    """
    import grpc.aio

    channels = {
        kind: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for kind, port in ports.items()
    }

    async def burst(channel: Any) -> float:
        stream = channel.unary_stream(f"/{SERVICE}/Count")
        unary = channel.unary_unary(f"/{SERVICE}/Echo")

        async def one_stream() -> int:
            return sum([1 async for _ in stream(str(per).encode())])

        async def unary_worker() -> int:
            for _ in range(per):
                await unary(PAYLOAD)
            return per

        work = one_stream if mode == "stream" else unary_worker
        t0 = time.perf_counter()
        done = sum(await asyncio.gather(*(work() for _ in range(concurrency))))
        if done != concurrency * per:
            raise RuntimeError(f"only {done} of {concurrency * per} messages arrived")
        return time.perf_counter() - t0

    try:
        for channel in channels.values():  # connected and warm before the clock runs
            await channel.unary_unary(f"/{SERVICE}/Echo")(PAYLOAD, wait_for_ready=True)
            await burst(channel)
        elapsed = dict.fromkeys(channels, 0.0)
        order = list(channels)
        for _ in range(rounds):
            for kind in order:
                elapsed[kind] += await burst(channels[kind])
            order = order[1:] + order[:1]
    finally:
        for channel in channels.values():
            await channel.close()
    return {kind: rounds * concurrency * per / t for kind, t in elapsed.items()}


def sample(
    servers: dict[str, tuple[int, int]], mode: str, concurrency: int, per: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """One fresh client process: per server, (its rate, its CPU µs per message or RPC)."""
    before = {kind: cpu_seconds(pid) for kind, (pid, _) in servers.items()}
    ports = json.dumps({kind: port for kind, (_, port) in servers.items()})
    args = (ports, mode, concurrency, per, rounds)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.case_grpc", "client", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rates = json.loads(out)
    work = rounds * concurrency * per
    # each server's CPU time covers its own bursts and the untimed warm-up burst
    return {
        kind: (rates[kind], (cpu_seconds(pid) - before[kind]) / (work + concurrency * per) * 1e6)
        for kind, (pid, _) in servers.items()
    }


class _CallDetails:
    def __init__(self, method: str) -> None:
        self.method = f"/{SERVICE}/{method}"
        self.invocation_metadata = ()


class _Context:
    """Stands in for grpc's servicer context in process: a write takes a turn of
    the event loop, as grpc's does (it awaits the completion of its batch)."""

    async def write(self, message: bytes) -> None:
        await asyncio.sleep(0)

    def time_remaining(self) -> None:
        return None


def in_process(rounds: int, batch: int = 200) -> dict[str, dict[str, list[float]]]:
    """CPU µs per RPC handler in a fresh task (as grpc runs each RPC): the servicer
    alone vs through ``GuardInterceptor`` (``intercept_service`` and the wrapped
    handler), alternating batches, thread CPU time. No network, no grpc core:
    what the interceptor itself adds, without the machine's noise. Streams are
    timed at 1 and at 50 messages: the difference is the per-message cost."""
    import grpc

    import taskguard
    from taskguard.grpc import GuardInterceptor

    async def main() -> dict[str, dict[str, list[float]]]:
        loop = asyncio.get_running_loop()
        async with taskguard.TaskGuard() as guard:
            interceptor = GuardInterceptor(guard)
            methods = {
                "Echo": grpc.unary_unary_rpc_method_handler(echo),
                "Count": grpc.unary_stream_rpc_method_handler(count),
            }

            async def continuation(details: _CallDetails) -> Any:
                return methods[details.method.rsplit("/", 1)[1]]

            async def guarded(method: str, request: bytes) -> None:
                wrapped = await interceptor.intercept_service(continuation, _CallDetails(method))
                if method == "Echo":
                    await wrapped.unary_unary(request, _Context())
                else:
                    await wrapped.unary_stream(request, _Context())

            async def plain(method: str, request: bytes) -> None:
                if method == "Echo":
                    await echo(request, _Context())
                    return
                context = _Context()
                async for message in count(request, context):  # what grpc does with it
                    await context.write(message)

            shapes = {"unary": ("Echo", PAYLOAD), "stream x1": ("Count", b"1")}
            shapes["stream x50"] = ("Count", b"50")
            times = {shape: {"plain": [], "guarded": []} for shape in shapes}
            for _ in range(rounds):
                for shape, args in shapes.items():
                    for kind, rpc in (("plain", plain), ("guarded", guarded)):
                        t0 = time.thread_time()
                        for _ in range(batch):
                            await loop.create_task(rpc(*args))
                        times[shape][kind].append((time.thread_time() - t0) / batch * 1e6)
            return times

    return asyncio.run(main())


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    try:
        import grpc_health.v1  # noqa: F401

        import taskguard.grpc  # noqa: F401
    except ImportError as exc:
        print(f"  skipped: {exc} (pip install -e '.[dev]')")
        return [], []
    rounds = 2 if settings.quick else 4
    modes = {
        # mode: (concurrency, per, target)
        "stream": (200, 50, 0.9),
        "unary": (50, 40 if settings.quick else 100, 0.95),
    }
    measurements: list[Measurement] = []
    targets: list[Target] = []
    with server("plain") as plain, server("plain") as control, server("guarded") as guarded:
        servers = {"plain": plain, "control": control, "guarded": guarded}
        for mode, (concurrency, per, target) in modes.items():
            what = "messages" if mode == "stream" else "RPCs"
            if mode == "stream":
                variant = f"{concurrency} concurrent server streams x {per} messages"
            else:
                variant = f"{concurrency} concurrent callers x {per} unary RPCs"
            variant += f", {rounds} bursts each"
            samples = [
                sample(servers, mode, concurrency, per, rounds) for _ in range(settings.repeats)
            ]
            rates = [
                Measurement(
                    CASE, variant, IMPLS[k], f"{what}/s", [s[k][0] for s in samples],
                    higher_is_better=True,
                )
                for k in servers
            ]  # fmt: skip
            cpu = [
                Measurement(
                    CASE + "-server-cpu", variant, IMPLS[k], f"µs/{what[:-1]}",
                    [s[k][1] for s in samples],
                )
                for k in servers
            ]  # fmt: skip
            link(rates, IMPLS["plain"])
            link(cpu, IMPLS["plain"])
            for m in rates:
                m.note = "samples: " + ", ".join(f"{s:,.0f}" for s in m.samples)
                if m is not rates[0]:
                    paired = [x / p for p, x in zip(rates[0].samples, m.samples, strict=True)]
                    m.note += "; per-sample ratios: " + ", ".join(f"{r:.2f}" for r in paired)
            rates[1].note += " (the noise: the same server twice)"
            measurements += rates + cpu
            ratio = rates[2].ratio
            assert ratio is not None
            targets.append(
                Target(CASE, variant, f"guarded {what}/s / plain {what}/s", ratio, ">=", target)
            )
    for shape, times in in_process(10 if settings.quick else 30).items():
        variant = f"{shape} handler in a fresh task, in process (CPU per RPC)"
        added = [
            Measurement(CASE + "-inprocess", variant, IMPLS[k], "µs/RPC", v)
            for k, v in times.items()
        ]
        link(added, IMPLS["plain"])
        added[-1].note = f"the interceptor adds {added[1].median - added[0].median:.1f} µs per RPC"
        measurements += added
    return measurements, targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.case_grpc")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run one server; prints PORT n")
    serve_cmd.add_argument("kind", choices=("plain", "guarded"))
    client = sub.add_parser("client", help="load the servers in turns; prints their rates")
    client.add_argument("ports", type=json.loads, help='JSON, e.g. {"plain": 5001}')
    client.add_argument("mode", choices=("stream", "unary"))
    client.add_argument("concurrency", type=int)
    client.add_argument("per", type=int)
    client.add_argument("rounds", type=int)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_plain() if args.kind == "plain" else serve_guarded()
    else:
        rates = asyncio.run(load(args.ports, args.mode, args.concurrency, args.per, args.rounds))
        print(json.dumps(rates))


if __name__ == "__main__":
    main()
