"""Case 6: streams.

In process: 1,000 open guarded streams (each consumer blocked on a source that
yields once an hour); trigger → every consumer saw its stream end. Target:
< 50 ms median (asyncio; trio for context). Raw reference: cancelling 1,000
equivalent consumer tasks.

End to end: ``uvicorn --factory benchmarks._asgi_app:make_guarded`` serves a
100-item stream (100 ms apart); SIGTERM after a few items. Target: the client's
stream ends cleanly (with the app's final message) and the process exits
< 0.5 s after the signal. The stock-uvicorn control (9.3 s in the issue) runs
only in the full run.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from time import perf_counter

import anyio

from taskguard import TaskGuard

from ._core import Measurement, Settings, Target, have, interleave, link
from ._servers import asgi_available, uvicorn

CASE = "streams"
N = 1_000


async def _source() -> AsyncIterator[int]:
    while True:
        await anyio.sleep(3600)
        yield 0


def _guarded_streams(backend: str) -> tuple[float, float]:
    """(trigger → all streams ended, trigger → closed)."""

    async def main() -> tuple[float, float]:
        ends: list[float] = []
        guard = TaskGuard(exit_wait_timeout=30)

        async def consumer() -> None:
            async for _ in guard.stream(_source()):
                pass
            ends.append(perf_counter())

        async with guard:
            for _ in range(N):
                guard.spawn(consumer)
            while guard.stats().streams < N:
                await anyio.sleep(0)
            t_trig = perf_counter()
        t_closed = perf_counter()
        assert len(ends) == N
        assert guard.report.streams.get("interrupted") == N
        return max(ends) - t_trig, t_closed - t_trig

    return anyio.run(main, backend=backend)


def _raw_cancel() -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        ends: list[float] = []

        async def consumer() -> None:
            try:
                async for _ in _source():
                    pass
            finally:
                ends.append(perf_counter())

        async with anyio.create_task_group() as tg:
            for _ in range(N):
                tg.start_soon(consumer)
            await anyio.sleep(0.01)
            t_trig = perf_counter()
            tg.cancel_scope.cancel()
        done = perf_counter()
        return max(ends) - t_trig, done - t_trig

    return anyio.run(main, backend="asyncio")


def _end_to_end(factory: str, *extra: str) -> dict[str, object]:
    """SIGTERM during /server-stream/100: how the client's stream ends, and exit time."""
    import httpx

    with uvicorn(factory, *extra) as (proc, port):
        exited: list[float] = []

        def watch() -> None:
            proc.wait()
            exited.append(perf_counter())

        watcher = threading.Thread(target=watch)
        watcher.start()
        lines: list[str] = []
        outcome = "clean"
        t_sig = 0.0
        try:
            with (
                httpx.Client(timeout=30) as client,
                client.stream("GET", f"http://127.0.0.1:{port}/server-stream/100") as resp,
            ):
                for line in resp.iter_lines():
                    lines.append(line)
                    if len(lines) == 5:
                        t_sig = perf_counter()
                        os.kill(proc.pid, signal.SIGTERM)
        except httpx.HTTPError as exc:
            outcome = f"error: {type(exc).__name__}"
        t_client = perf_counter()
        watcher.join(timeout=30)
        if not exited:
            proc.kill()
            watcher.join()
    return {
        "client_end_s": t_client - t_sig,
        "exit_s": exited[0] - t_sig if exited else float("inf"),
        "items": sum(1 for line in lines if line.startswith("item")),
        "last_line": lines[-1] if lines else "",
        "outcome": outcome,
        "returncode": proc.returncode,
    }


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    variant = f"{N:,} open streams"
    impls: dict[str, Callable[[], tuple[float, float]]] = {
        "raw task-group cancel (reference)": _raw_cancel,
        "taskguard streams (asyncio)": partial(_guarded_streams, "asyncio"),
    }
    if have("trio"):
        impls["taskguard streams (trio)"] = partial(_guarded_streams, "trio")
    samples = interleave(impls, settings.repeats)
    ended = [Measurement(CASE, variant, k, "s", [a for a, _ in v]) for k, v in samples.items()]
    closed = [
        Measurement(CASE + "-closed", variant, k, "s", [b for _, b in v])
        for k, v in samples.items()
    ]
    measurements = [*link(ended, "raw task-group cancel (reference)")]
    measurements += link(closed, "raw task-group cancel (reference)")
    # The target is for asyncio (targets are, unless stated); trio is context.
    asyncio_streams = ended[1]
    if len(ended) > 2:
        ended[2].note = "no target (context): trio's cancel delivery per scope costs more"
    targets = [
        Target(
            CASE, variant, "trigger → all ended (asyncio)", asyncio_streams.median, "<", 0.05, "s"
        )
    ]
    why = asgi_available()
    if why is not None:
        print(f"  end-to-end uvicorn stream skipped: {why}")
        return measurements, targets
    runs = [_end_to_end("make_guarded") for _ in range(1 if settings.quick else 3)]
    e2e = "uvicorn /server-stream/100, SIGTERM after 5 items"
    exits = Measurement(CASE + "-e2e", e2e, "taskguard: SIGTERM → exit", "s", [])
    exits.samples = [float(r["exit_s"]) for r in runs]  # type: ignore[arg-type]
    exits.note = "; ".join(
        f"{r['outcome']}, {r['items']} items, last line {r['last_line']!r}, rc {r['returncode']}"
        for r in runs
    )
    measurements.append(exits)
    clean = all(r["outcome"] == "clean" and str(r["last_line"]).startswith("resume") for r in runs)
    targets.append(Target(CASE + "-e2e", e2e, "SIGTERM → exit", exits.median, "<", 0.5, "s"))
    targets.append(
        Target(CASE + "-e2e", e2e, "client stream ends cleanly", float(clean), ">=", 1.0, "bool")
    )
    if not settings.quick:
        control = _end_to_end("make_plain")
        stock = Measurement(CASE + "-e2e", e2e, "stock uvicorn: SIGTERM → exit", "s", [])
        stock.samples = [float(control["exit_s"])]  # type: ignore[arg-type]
        stock.note = f"{control['outcome']}, {control['items']} items"
        measurements.append(stock)
    return measurements, targets
