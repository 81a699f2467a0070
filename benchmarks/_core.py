"""Shared machinery: samples in fresh event loops, statistics, ratios and targets.

Every figure is a ratio to a baseline measured in the same run, interleaved
with it (round-robin per repeat), so that machine noise hits both alike. The
absolute times are printed for context only; nothing asserts on them.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Measurement",
    "Settings",
    "Target",
    "fmt",
    "have",
    "interleave",
    "link",
    "run_asyncio",
    "run_trio",
]


@dataclass(frozen=True)
class Settings:
    """What a run measures: sizes and repeats (``--quick`` shrinks both)."""

    quick: bool
    repeats: int
    sizes: tuple[int, ...]

    def pick(self, full: tuple[int, ...], quick: tuple[int, ...]) -> tuple[int, ...]:
        return quick if self.quick else full


@dataclass
class Measurement:
    """One implementation in one case variant: its samples and its ratio to the baseline."""

    case: str
    variant: str
    impl: str
    unit: str
    samples: list[float]
    baseline: str | None = None
    higher_is_better: bool = False
    ratio: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=self.min, max=self.max)
        return data


@dataclass
class Target:
    """A performance target (docs/benchmarks.md), checked against a measured figure."""

    case: str
    variant: str
    what: str
    value: float
    op: str  # "<=", "<" or ">="
    limit: float
    unit: str = "x"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        if self.op == "<=":
            return self.value <= self.limit
        if self.op == "<":
            return self.value < self.limit
        return self.value >= self.limit

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["met"] = self.met
        return data


def link(measurements: list[Measurement], baseline: str) -> list[Measurement]:
    """Set each measurement's ratio: its median over the baseline's median."""
    base = next(m for m in measurements if m.impl == baseline)
    for m in measurements:
        m.baseline = baseline
        # higher_is_better only flips how a target reads the ratio (>= instead of <=)
        m.ratio = m.median / base.median if base.median else None
    return measurements


def interleave(
    impls: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True
) -> dict[str, list[Any]]:
    """Run each implementation ``repeats`` times, rotating the order each round.

    A warm-up round (discarded) pays for imports and first-use allocations.
    """
    names = list(impls)
    results: dict[str, list[Any]] = {name: [] for name in names}
    if warmup:
        for name in names:
            gc.collect()
            impls[name]()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            results[name].append(impls[name]())
    return results


def have(module: str) -> bool:
    """Whether an optional peer (trio, uvicorn, ...) is installed; its cases skip if not."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_asyncio(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """One sample in a fresh asyncio event loop."""
    return asyncio.run(main())


def run_trio(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """One sample in a fresh trio run."""
    import trio

    return trio.run(main)


def fmt(value: float, unit: str) -> str:
    """Human format of a figure in its unit."""
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.1f} µs"
        if abs(value) < 1:
            return f"{value * 1e3:.2f} ms"
        return f"{value:.3f} s"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "objects":
        return f"{value:.2f} obj"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    return f"{value:.3g} {unit}"
