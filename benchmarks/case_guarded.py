"""Case 2: ``guarded()`` enter + exit.

Async form: ``async with guard.guarded():`` (including building the section
object, as a handler does) vs a bare ``anyio.CancelScope()`` enter/exit, on
asyncio and on trio. Target ≤ 1.3x. Thread form: ``with guard.guarded():`` in a
worker thread vs ``threading.Lock`` acquire/release (no target: context).
"""

from __future__ import annotations

import threading
from functools import partial
from time import perf_counter

import anyio

from taskguard import TaskGuard

from ._core import Measurement, Settings, Target, have, interleave, link

CASE = "guarded"


def _on(backend: str, main: object) -> float:
    return anyio.run(main, backend=backend)  # type: ignore[arg-type]


def _bare_scope(m: int, backend: str) -> float:
    async def main() -> float:
        cancel_scope = anyio.CancelScope
        t0 = perf_counter()
        for _ in range(m):
            with cancel_scope():
                pass
        return (perf_counter() - t0) / m

    return _on(backend, main)


def _guarded(m: int, backend: str, shield: bool = False) -> float:
    async def main() -> float:
        async with TaskGuard() as guard:
            section = guard.guarded
            t0 = perf_counter()
            if shield:
                for _ in range(m):
                    async with section(shield=True):
                        pass
            else:
                for _ in range(m):
                    async with section():
                        pass
            return (perf_counter() - t0) / m

    return _on(backend, main)


def _lock_in_thread(m: int) -> float:
    def body() -> float:
        lock = threading.Lock()
        t0 = perf_counter()
        for _ in range(m):
            with lock:
                pass
        return (perf_counter() - t0) / m

    async def main() -> float:
        return await anyio.to_thread.run_sync(body)

    return _on("asyncio", main)


def _guarded_in_thread(m: int) -> float:
    async def main() -> float:
        async with TaskGuard() as guard:

            def body() -> float:
                section = guard.guarded
                t0 = perf_counter()
                for _ in range(m):
                    with section():
                        pass
                return (perf_counter() - t0) / m

            return await anyio.to_thread.run_sync(body)

    return _on("asyncio", main)


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    m = 20_000 if settings.quick else 100_000
    variant = f"{m:,} enter+exit"
    measurements: list[Measurement] = []
    targets: list[Target] = []
    for backend in ("asyncio", "trio") if have("trio") else ("asyncio",):
        base = f"anyio.CancelScope() (baseline, {backend})"
        samples = interleave(
            {
                base: partial(_bare_scope, m, backend),
                f"async with guard.guarded() ({backend})": partial(_guarded, m, backend),
                f"guarded(shield=True) ({backend})": partial(_guarded, m, backend, True),
            },
            settings.repeats,
        )
        group = [Measurement(f"{CASE}-{backend}", variant, k, "s", v) for k, v in samples.items()]
        measurements += link(group, base)
        for item in group[1:]:
            assert item.ratio is not None
            targets.append(
                Target(item.case, variant, f"{item.impl} / bare scope", item.ratio, "<=", 1.3)
            )
    samples = interleave(
        {
            "threading.Lock (baseline)": lambda: _lock_in_thread(m),
            "with guard.guarded() in a thread": lambda: _guarded_in_thread(m),
        },
        settings.repeats,
    )
    group = [Measurement(f"{CASE}-thread", variant, k, "s", v) for k, v in samples.items()]
    measurements += link(group, "threading.Lock (baseline)")
    group[1].note = "no target; context for the thread form"
    return measurements, targets
